//! Extended-protocol batches: their messages kept until `Sync` (or sent at once after a
//! `Flush` chose the server), their class, the statements they use prepared again where they
//! run, and a batch moved off a replica when it goes on with what the replica must not run.

use std::sync::Arc;

use bytes::BytesMut;

use super::{Batch, Session};
use crate::balancer::classify::Class;
use crate::balancer::replica_txn;
use crate::balancer::server::{Pending, Swallow};
use crate::balancer::wire::{self, Message, WireError};

impl Session {
    /// A message of an extended-protocol batch: kept until `Sync`, or sent at once after a
    /// `Flush` chose the server.
    pub(super) async fn push(&mut self, m: Message) -> Result<(), WireError> {
        match self.batch.target {
            Some(target) if self.servers.contains_key(&target) => {
                if m.tag == b'P' {
                    let mut body = m.body();
                    let name = wire::take_name(&mut body)?;
                    let sql = self.statements.get(&name).map(|s| s.sql.clone());
                    if let (Some(server), Some(sql)) = (self.servers.get_mut(&target), sql) {
                        server.prepared.insert(name, sql);
                    }
                }
                self.write_to(target, &m.frame).await
            }
            _ => {
                self.batch.messages.push(m);
                Ok(())
            }
        }
    }

    /// The class of the client's statement `name` (a read when there is none: the server
    /// reports that).
    pub(super) fn class_of(&self, name: &str) -> Class {
        self.statements.get(name).map_or(Class::Read, |s| s.class)
    }

    /// A message of `class` came in a batch that a `Flush` already sent to a replica (the
    /// batch began with reads). When it must run on the primary, the replica's part ends with
    /// a `Sync` of the engine's (its answers are relayed, its `ReadyForQuery` is not: the
    /// client's own `Sync` gets one), and the rest of the batch starts over, routed again at
    /// its next `Flush` or `Sync`. `true` when the replica's part had failed: as on one
    /// server, the rest of the batch up to its `Sync` is skipped, and that `Sync` answered.
    ///
    /// A portal bound on the replica does not exist on the primary: executing it there after
    /// the move fails, as a portal of an ended transaction does.
    pub(super) async fn leave_flushed_replica(&mut self, class: Class) -> Result<bool, WireError> {
        let Some(target) = self.batch.target else {
            return Ok(false);
        };
        // Inside a transaction, only to refuse what the replica holding it must not run: the
        // rest of the batch is then routed again, and refused as a whole (`route_batch`).
        let refused = self.refused_in_replica_txn(target, class);
        if class == Class::Read
            || self.sync_owed
            || (self.txn.or(self.pinned).is_some() && !refused)
            || (self.engine.primary().map(|b| b.id) == Some(target) && !refused)
        {
            return Ok(false);
        }
        let mut sync = BytesMut::new();
        wire::put(&mut sync, b'S', &[]);
        self.write_to(target, &sync).await?;
        while let Some(server) = self.servers.get_mut(&target) {
            let m = server.read().await;
            // Units pipelined before the batch are answered first, and a replayed setting's
            // `ReadyForQuery` is swallowed: the one after them all is the engine's `Sync`'s.
            let ours = matches!(&m, Ok(m) if m.tag == b'Z')
                && server.pending.is_empty()
                && !server.swallow.contains(&Swallow::UntilReady);
            if self.out.len() > 65_536 {
                self.client.send(&self.out).await?;
                self.out.clear();
            }
            let before = self.out.len();
            self.on_server(target, m).await?;
            if ours {
                self.out.truncate(before);
                break;
            }
        }
        if self.current == Some(target) {
            self.current = None;
        }
        if self.skip_to_sync.is_some() {
            // The replica was lost: its part was answered with an error (`server_failed`).
            return Ok(true);
        }
        let failed = self.batch.failed;
        self.batch = Batch::default();
        if failed {
            self.skip_to_sync = Some(true);
        }
        Ok(failed)
    }

    /// The batch uses statement `name`: its class counts, and it must exist where it runs.
    pub(super) fn uses(&mut self, name: &str) {
        if self.batch.raised {
            // The server skips the rest of this batch (`replica_txn`).
            return;
        }
        let parsed_here = self.batch.messages.iter().any(|m| {
            m.tag == b'P' && {
                let mut b = m.body();
                wire::take_name(&mut b).is_ok_and(|n| n == name)
            }
        });
        if let Some(st) = self.statements.get(name) {
            self.batch.class = Some(self.batch.class.map_or(st.class, |c| c.max(st.class)));
        }
        if !parsed_here && !self.batch.needs.iter().any(|n| n == name) {
            self.batch.needs.push(name.to_owned());
        }
    }

    pub(super) async fn route_batch(&mut self) -> Result<Option<u32>, WireError> {
        let class = self.effective(self.batch.class.unwrap_or(Class::Read));
        self.batch.class = Some(class);
        let target = self.route(class).await?;
        match target {
            // The error was answered; what the client sent up to Sync is dropped with it.
            None => self.batch = Batch::default(),
            // A batch that only parses and describes runs nothing: served, as transaction
            // control (it pins nothing).
            Some(target)
                if self.refused_in_replica_txn(target, class)
                    && !self
                        .batch
                        .messages
                        .iter()
                        .any(|m| matches!(m.tag, b'B' | b'E')) =>
            {
                self.batch.class = Some(Class::TxnControl);
                self.batch.settings.clear();
            }
            // One that binds or executes something (a portal bound here may be executed by a
            // later batch) is refused.
            Some(target) if self.refused_in_replica_txn(target, class) => {
                // The batch is replaced by the raising statement (a `Flush` that ended it
                // stays); the server skips what follows up to `Sync`, as after any error.
                let flush = self.batch.messages.pop().filter(|m| m.tag == b'H');
                let server = self
                    .servers
                    .get_mut(&target)
                    .expect("routed to an open server");
                server.swallow.push_back(Swallow::Tag(b'1'));
                server.swallow.push_back(Swallow::Tag(b'2'));
                server.prepared.remove("");
                // Tagged as the `Execute` it ends with: no statement of the client's is
                // recorded as prepared on the server for it.
                self.batch.messages = vec![Message {
                    tag: b'E',
                    frame: replica_txn::extended().freeze(),
                }];
                self.batch.messages.extend(flush);
                self.batch.needs.clear();
                // Answered as transaction control: the refused unit pins nothing.
                self.batch.class = Some(Class::TxnControl);
                self.batch.raised = true;
                self.batch.settings.clear();
                self.raise_unanswered = true;
            }
            Some(_) => {}
        }
        Ok(target)
    }

    /// Sends the batch (and `Sync` when `class` is given) to `target`, preparing first the
    /// statements it uses that `target` lacks.
    pub(super) async fn send_batch(
        &mut self,
        target: u32,
        class: Option<Class>,
    ) -> Result<(), WireError> {
        let batch = std::mem::take(&mut self.batch);
        let server = self
            .servers
            .get_mut(&target)
            .expect("routed to an open server");
        let mut bytes = BytesMut::new();
        for name in &batch.needs {
            let Some(st) = self.statements.get(name) else {
                continue;
            };
            if server
                .prepared
                .get(name)
                .is_some_and(|s| Arc::ptr_eq(s, &st.sql))
            {
                continue;
            }
            if !name.is_empty() && server.prepared.contains_key(name) {
                close_statement(&mut bytes, name);
                server.swallow.push_back(Swallow::Tag(b'3'));
            }
            bytes.extend_from_slice(&st.parse);
            server.swallow.push_back(Swallow::Tag(b'1'));
            server.prepared.insert(name.clone(), st.sql.clone());
        }
        for m in &batch.messages {
            let mut body = m.body();
            match m.tag {
                b'P' => {
                    let name = wire::take_name(&mut body)?;
                    if !name.is_empty() && server.prepared.contains_key(&name) {
                        close_statement(&mut bytes, &name);
                        server.swallow.push_back(Swallow::Tag(b'3'));
                    }
                    if let Some(st) = self.statements.get(&name) {
                        server.prepared.insert(name, st.sql.clone());
                    }
                }
                b'C' if body.first() == Some(&b'S') => {
                    body = &body[1..];
                    server.prepared.remove(&wire::take_name(&mut body)?);
                }
                _ => {}
            }
            bytes.extend_from_slice(&m.frame);
        }
        match class {
            Some(class) => {
                // A batch that failed before its `Sync` (after a `Flush`) made no setting.
                let settings = if batch.failed {
                    Vec::new()
                } else {
                    batch.settings
                };
                let unit = Pending {
                    settings,
                    ..Pending::of(class)
                };
                self.send_unit(target, unit, &bytes).await
            }
            None => {
                self.batch.target = batch.target;
                self.batch.class = batch.class;
                self.batch.failed = batch.failed;
                self.batch.raised = batch.raised;
                self.batch.settings = batch.settings;
                self.batch.set_portals = batch.set_portals;
                self.current = Some(target);
                if let Some(server) = self.servers.get(&target) {
                    self.cancel.set(&server.backend, server.key);
                }
                self.write_to(target, &bytes).await
            }
        }
    }
}

pub(super) fn close_statement(out: &mut BytesMut, name: &str) {
    let mut body = vec![b'S'];
    wire::cstr(&mut body, name);
    wire::put(out, b'C', &body);
}
