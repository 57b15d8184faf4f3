//! Where a unit goes: the server chosen for its class (the transaction's or the pinned
//! server, a replica for a read, else the primary), connected and given the session's
//! settings first; what a replica holding a read-only transaction must not run; and the
//! sending of units that end in `ReadyForQuery`.

use std::sync::atomic::Ordering;

use bytes::BytesMut;

use super::{Batch, Session};
use crate::balancer::backends::Reader;
use crate::balancer::classify::Class;
use crate::balancer::replica_txn;
use crate::balancer::server::{ConnectError, Pending, Server, Swallow};
use crate::balancer::wire::{self, WireError};
use crate::balancer::Consistency;

impl Session {
    /// The class a unit is routed as: a read-only transaction's opening stays on the primary
    /// unless replicas may hold such transactions (and the session set no isolation level,
    /// which `route` checks once what was sent before is answered). With strict consistency
    /// they stay on the primary too: a `READ COMMITTED` transaction's later statements must
    /// see writes acknowledged after it began, which a replica may not have replayed yet.
    pub(super) fn effective(&self, class: Class) -> Class {
        let settings = &self.engine.settings;
        if class == Class::ReadOnlyBegin
            && !(settings.read_only_transactions_on_replicas
                && settings.load_balance
                && settings.consistency != Consistency::Strict)
        {
            return Class::Write;
        }
        class
    }

    /// Whether a unit of `class` is going to the replica holding the session's read-only
    /// transaction, which must not run it (`replica_txn`).
    pub(super) fn refused_in_replica_txn(&self, target: u32, class: Class) -> bool {
        self.txn_on_replica == Some(target)
            && self.txn == Some(target)
            && self.engine.primary().map(|b| b.id) != Some(target)
            && !replica_txn::may_run(class)
    }

    /// Sends bytes that end in a `ReadyForQuery` answer.
    pub(super) async fn send(
        &mut self,
        target: u32,
        class: Class,
        bytes: &[u8],
    ) -> Result<(), WireError> {
        self.send_unit(target, Pending::of(class), bytes).await
    }

    /// [`Self::send`] of a unit that may make session settings.
    pub(super) async fn send_unit(
        &mut self,
        target: u32,
        unit: Pending,
        bytes: &[u8],
    ) -> Result<(), WireError> {
        let class = unit.class;
        let server = self
            .servers
            .get_mut(&target)
            .expect("routed to an open server");
        server.pending.push_back(unit);
        server.backend.in_flight.fetch_add(1, Ordering::Relaxed);
        if class == Class::Read {
            server.backend.selects.fetch_add(1, Ordering::Relaxed);
        }
        self.cancel.set(&server.backend, server.key);
        self.current = Some(target);
        self.write_to(target, bytes).await
    }

    /// Writes to the open server `target`; a failure is the server's loss (its pending units
    /// and an open batch are answered with errors, at the batch's `Sync`).
    pub(super) async fn write_to(&mut self, target: u32, bytes: &[u8]) -> Result<(), WireError> {
        let server = self.servers.get_mut(&target).expect("an open server");
        match server.write(bytes).await {
            Err(e) => self.server_failed(target, e, None).await,
            Ok(()) => Ok(()),
        }
    }

    /// Relays what the current server still owes before another server is used.
    pub(super) async fn finish_current(&mut self) -> Result<(), WireError> {
        while let Some(id) = self.current {
            let Some(server) = self.servers.get_mut(&id) else {
                self.current = None;
                break;
            };
            if server.pending.is_empty() {
                self.current = None;
                break;
            }
            let m = server.read().await;
            self.on_server(id, m).await?;
        }
        if !self.out.is_empty() {
            self.client.send(&self.out).await?;
            self.out.clear();
        }
        Ok(())
    }

    /// Chooses the server for a unit of `class`, connects to it if needed and replays the
    /// session's settings on it. `None` when no server can take it: the client got an error.
    pub(super) async fn route(&mut self, class: Class) -> Result<Option<u32>, WireError> {
        // A read pipelined behind anything else waits for its answer first: a `BEGIN`, a
        // setting or a write decides where the read may go once it is acknowledged.
        // And anything pipelined behind a read-only transaction's opening waits for it: the
        // server it went to holds what follows.
        let reads = matches!(class, Class::Read | Class::ReadOnlyBegin);
        if self.txn.or(self.pinned).is_none()
            && self
                .current
                .and_then(|id| self.servers.get(&id))
                .is_some_and(|s| {
                    s.pending.iter().any(|u| {
                        u.class == Class::ReadOnlyBegin || (reads && u.class != Class::Read)
                    })
                })
        {
            self.finish_current().await?;
        }
        // A unit the replica holding the transaction must not run, pipelined behind what may
        // end that transaction (a `COMMIT`), waits for it: after the end it runs as usual. And
        // anything waits for a raising statement's answer.
        let unanswered = self
            .current
            .and_then(|id| self.servers.get(&id))
            .is_some_and(|s| !s.pending.is_empty());
        if unanswered
            && (std::mem::take(&mut self.raise_unanswered)
                || (self.txn.is_some()
                    && self.txn == self.txn_on_replica
                    && !replica_txn::may_run(class)))
        {
            self.finish_current().await?;
        }
        self.raise_unanswered = false;
        // A session that set a transaction isolation (answered by now: a read-only
        // transaction's opening waits for what was sent before it) keeps its read-only
        // transactions on the primary: a standby refuses `SERIALIZABLE`.
        let class = if class == Class::ReadOnlyBegin && !replica_txn::settings_allow(&self.settings)
        {
            Class::Write
        } else {
            class
        };
        let reads = matches!(class, Class::Read | Class::ReadOnlyBegin);
        let wanted = if let Some(id) = self.txn.or(self.pinned) {
            Some(id)
        } else if reads {
            let chosen = self
                .engine
                .read_target(self.wrote_at, self.reader.as_ref().map(Reader::id));
            // A read the primary serves (no replica has what it must see yet) leaves the
            // session's replica kept for the next one.
            if let Some((b, true)) = &chosen {
                if self.reader.as_ref().map(Reader::id) != Some(b.id) {
                    self.reader = Some(Reader::new(b.clone()));
                }
            }
            chosen.map(|(b, _)| b.id)
        } else {
            self.engine.primary().map(|b| b.id)
        };
        let Some(target) = wanted else {
            self.refuse("57P03", "no primary database server is available right now")
                .await?;
            return Ok(None);
        };
        if self.current.is_some_and(|c| c != target) {
            self.finish_current().await?;
        }
        let held = self.txn.or(self.pinned) == Some(target);
        if !held
            && self
                .servers
                .get(&target)
                .is_some_and(|s| s.epoch != s.backend.epoch.load(Ordering::Relaxed))
        {
            // The server went down or changed role since this connection was opened: what it
            // still owes is relayed (or fails) first, then the connection is not used again.
            if self.current == Some(target) {
                self.finish_current().await?;
            }
            self.servers.remove(&target);
        }
        if !held
            && self.current != Some(target)
            && self
                .servers
                .get_mut(&target)
                .is_some_and(Server::ended_while_idle)
        {
            // Ended by the server while the session did not use it (terminated, timed out):
            // the unit goes to a new connection instead of failing on this one.
            tracing::debug!(node = target, "idle server connection ended by the server");
            self.servers.remove(&target);
        }
        if !self.servers.contains_key(&target) {
            if held {
                self.refuse("08006", "the server holding this session's state was lost")
                    .await?;
                return Ok(None);
            }
            let backend = self
                .engine
                .backend(target)
                .expect("chosen from the current set");
            match Server::connect(backend, &self.params, &self.user, &self.login).await {
                Ok(s) => {
                    self.servers.insert(target, s);
                }
                Err(ConnectError::Refused(error)) => {
                    self.batch = Batch::default();
                    self.out.extend_from_slice(&error.frame);
                    wire::ready(&mut self.out, b'I');
                    return Ok(None);
                }
                Err(e @ ConnectError::PasswordChanged { .. }) => {
                    self.refuse("28P01", &e.to_string()).await?;
                    return Ok(None);
                }
                Err(e) => {
                    tracing::info!(node = target, error = %e, "server connection failed");
                    self.refuse("08006", "the database server is not reachable right now")
                        .await?;
                    return Ok(None);
                }
            }
        }
        self.replay_settings(target).await?;
        if !self.servers.contains_key(&target) {
            // Lost while the settings were replayed: nothing answered this unit yet.
            self.refuse("08006", "the database server is not reachable right now")
                .await?;
            return Ok(None);
        }
        if class == Class::ReadOnlyBegin
            && !held
            && self.engine.primary().map(|b| b.id) != Some(target)
        {
            self.txn_on_replica = Some(target);
        }
        Ok(Some(target))
    }

    /// Sends the settings `target` has not had yet, answers swallowed.
    pub(super) async fn replay_settings(&mut self, target: u32) -> Result<(), WireError> {
        let server = self.servers.get_mut(&target).expect("open");
        if server.settings_applied >= self.settings.len() {
            return Ok(());
        }
        // One query each: a setting that fails there (logged) undoes no other.
        let mut bytes = BytesMut::new();
        for setting in &self.settings[server.settings_applied..] {
            let mut body = setting.to_vec();
            body.push(0);
            wire::put(&mut bytes, b'Q', &body);
            server.swallow.push_back(Swallow::UntilReady);
        }
        server.settings_applied = self.settings.len();
        server.prepared.remove("");
        if let Err(e) = server.write(&bytes).await {
            return self.server_failed(target, e, None).await;
        }
        Ok(())
    }

    /// An error and `ReadyForQuery` for a unit no server could take.
    pub(super) async fn refuse(&mut self, code: &str, message: &str) -> Result<(), WireError> {
        self.batch = Batch::default();
        wire::error(&mut self.out, "ERROR", code, message);
        wire::ready(&mut self.out, b'I');
        Ok(())
    }
}
