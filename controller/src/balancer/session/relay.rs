//! Servers' answers: relayed in order with what the engine injected swallowed, the
//! transaction status and settings they confirm recorded, and a server's loss answered.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use super::{Batch, Session};
use crate::balancer::classify::Class;
use crate::balancer::server::Swallow;
use crate::balancer::wire::{self, Message, WireError};

impl Session {
    pub(super) async fn on_server(
        &mut self,
        id: u32,
        m: Result<Message, WireError>,
    ) -> Result<(), WireError> {
        let m = match m {
            Ok(m) => m,
            Err(e) => return self.server_failed(id, e, None).await,
        };
        if m.tag == b'E' {
            if let Some(error) = wire::fatal_as_error(m.body()) {
                // The server ends this connection (shut down, or its process terminated).
                let (_, code, message) = wire::error_fields(m.body());
                let e =
                    WireError::Protocol(format!("server ended the connection: {code} {message}"));
                return self.server_failed(id, e, Some((m.frame, error))).await;
            }
        }
        let primary = self.engine.primary().map(|b| b.id);
        let server = self
            .servers
            .get_mut(&id)
            .expect("relaying from an open server");
        match server.swallow.front().copied() {
            Some(Swallow::Tag(t)) if t == m.tag => {
                server.swallow.pop_front();
                return Ok(());
            }
            Some(Swallow::UntilReady) => {
                if m.tag == b'E' {
                    let (_, code, message) = wire::error_fields(m.body());
                    tracing::warn!(node = id, %code, %message, "replaying a setting failed");
                }
                if m.tag == b'Z' {
                    server.swallow.pop_front();
                }
                return Ok(());
            }
            Some(Swallow::Tag(_)) if m.tag == b'E' => {
                // An injected message failed: the server skips to Sync; the client sees why.
                server.swallow.retain(|s| *s == Swallow::UntilReady);
            }
            _ => {}
        }
        let mut confirmed = Vec::new();
        match m.tag {
            b'Z' => {
                let status = m.body().first().copied().unwrap_or(b'I');
                // A transaction ended: whatever string ended it, it may have committed writes.
                let ended = server.status != b'I' && status == b'I';
                server.status = status;
                let unit = server.pending.pop_front();
                if unit.is_some() {
                    server.backend.in_flight.fetch_sub(1, Ordering::Relaxed);
                }
                let class = unit.as_ref().map(|u| u.class);
                self.copy_in = None;
                self.txn = (status != b'I').then_some(id);
                if status == b'I' && server.pending.is_empty() && self.txn_on_replica == Some(id) {
                    self.txn_on_replica = None;
                }
                if (ended || class.is_some_and(|c| matches!(c, Class::Write | Class::Pin)))
                    && Some(id) == primary
                {
                    let now = Instant::now();
                    self.wrote_at = Some(now);
                    self.engine.wrote(now);
                }
                // Settings the unit made, once it succeeded outside a transaction.
                if let Some(unit) = unit.filter(|u| status == b'I' && !u.failed) {
                    confirmed = unit.settings;
                }
                if server.pending.is_empty() && self.batch.target.is_none() {
                    self.current = None;
                }
                if class == Some(Class::Pin) && self.txn_on_replica != Some(id) {
                    self.pinned = Some(id);
                }
            }
            b'E' => {
                // Units sent before the batch are answered before it: an error while one is
                // pending is theirs (the first's: the others are answered after it).
                match server.pending.front_mut() {
                    Some(unit) => unit.failed = true,
                    None if self.batch.target == Some(id) => self.batch.failed = true,
                    None => {}
                }
            }
            b'G' => self.copy_in = Some((id, self.extended)),
            _ => {}
        }
        for setting in confirmed {
            self.record_setting(id, setting);
        }
        self.out.extend_from_slice(&m.frame);
        Ok(())
    }

    /// Records a session setting `id` ran: replayed on every other server the session uses.
    /// The same statement made earlier is dropped from the list (this one sets the same
    /// thing last), so a session repeating a `SET` does not grow it.
    pub(super) fn record_setting(&mut self, id: u32, setting: Arc<[u8]>) {
        if let Some(i) = self.settings.iter().position(|s| *s == setting) {
            self.settings.remove(i);
            for server in self.servers.values_mut() {
                if server.settings_applied > i {
                    server.settings_applied -= 1;
                }
            }
        }
        self.settings.push(setting);
        if let Some(server) = self.servers.get_mut(&id) {
            server.settings_applied = self.settings.len();
        }
    }

    /// A server connection broke, or the server ended it with `said` (its `FATAL` error as
    /// sent, and as an `ERROR`). Its answers cannot come; the client is told, and the session
    /// goes on with the other servers unless it held state there (then the client gets the
    /// server's `FATAL` as it was, or one of the engine's, and the session ends).
    pub(super) async fn server_failed(
        &mut self,
        id: u32,
        e: WireError,
        said: Option<(Bytes, BytesMut)>,
    ) -> Result<(), WireError> {
        tracing::info!(node = id, error = %e, "server connection lost");
        let lost = self.servers.remove(&id);
        if self.current == Some(id) {
            self.current = None;
        }
        let held_state = self.txn == Some(id) || self.pinned == Some(id);
        if held_state {
            match said {
                Some((fatal, _)) => self.out.extend_from_slice(&fatal),
                None => wire::error(
                    &mut self.out,
                    "FATAL",
                    "08006",
                    "the server holding this session's transaction or state was lost",
                ),
            }
            self.client.send(&self.out).await?;
            return Err(e);
        }
        let mut said = said.map(|(_, error)| error);
        let mut error = |out: &mut BytesMut| match said.take() {
            Some(error) => out.extend_from_slice(&error),
            None => wire::error(
                out,
                "ERROR",
                "08006",
                "the database server running this query was lost; try again",
            ),
        };
        // Each unit sent and not answered gets an error and its `ReadyForQuery`.
        for _ in 0..lost.map_or(0, |s| s.pending.len()) {
            error(&mut self.out);
            wire::ready(&mut self.out, b'I');
        }
        // An extended COPY on it: what the client still sends for it, up to and with its
        // `Sync` (answered above), is dropped.
        let copying = self
            .copy_in
            .is_some_and(|(server, extended)| server == id && extended);
        if self.copy_in.is_some_and(|(server, _)| server == id) {
            self.copy_in = None;
        }
        if self.batch.target == Some(id) {
            if self.sync_owed {
                // The rest of a COPY's batch, answered above.
                self.skip_to_sync = Some(false);
            } else {
                // Sent after a `Flush`, before its `Sync`: failed, and answered at that `Sync`.
                error(&mut self.out);
                self.skip_to_sync = Some(true);
            }
            self.batch = Batch::default();
            self.sync_owed = false;
        } else if copying {
            self.skip_to_sync = Some(false);
        }
        Ok(())
    }
}
