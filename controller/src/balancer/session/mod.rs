//! One client session after startup: every simple query and every extended-protocol batch
//! (the messages up to `Sync`) is routed as a unit, and the answers are relayed back.
//!
//! - Inside a transaction (the server's `ReadyForQuery` says so) everything follows the server
//!   that holds it; after session state that lives in one server (see `classify`) the session
//!   stays on the primary; writes go to the primary; reads go to a replica that is caught up
//!   enough (lag bound, read-your-writes), else to the primary.
//! - Server connections are opened when first needed, so a dead replica fails only the
//!   sessions that read from it, and a new primary takes writes without a reconnect.
//! - Prepared statements are prepared again, invisibly, on a server that lacks them; session
//!   settings (`SET`) are replayed on every server the session uses.
//! - Answers of one server are relayed in order; before a batch goes to another server, the
//!   previous one's answers are all relayed, so the client sees them in the order it asked.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use super::backends::Reader;
use super::classify::{classify, Class};
use super::client::ClientStream;
use super::replica_txn;
use super::server::{Login, Pending, Server};
use super::wire::{self, Message, WireError};
use super::{CancelSlot, Engine};

/// A prepared statement the client made.
#[derive(Clone)]
struct Statement {
    sql: Arc<[u8]>,
    class: Class,
    parse: Bytes,
}

/// What is waiting for `Sync`.
#[derive(Default)]
struct Batch {
    messages: Vec<Message>,
    class: Option<Class>,
    /// Statements the batch uses without preparing them in it.
    needs: Vec<String>,
    /// Set once a `Flush` sent part of the batch: the rest follows it.
    target: Option<u32>,
    /// The server answered part of the batch sent after a `Flush` with an error: it skips
    /// the rest up to `Sync`.
    failed: bool,
    /// The replica holding a read-only transaction got the raising statement for this batch
    /// (`replica_txn`): it skips the rest up to `Sync`.
    raised: bool,
    /// Session settings (`SET`, `RESET`) the batch executes, to record once they succeeded.
    settings: Vec<Arc<[u8]>>,
    /// Portals the batch bound to a `SET` or `RESET`: executing one makes a setting.
    set_portals: Vec<(String, Arc<[u8]>)>,
}

/// A session after startup.
pub struct Session {
    engine: Arc<Engine>,
    client: ClientStream,
    crbuf: BytesMut,
    out: BytesMut,
    params: Vec<(String, String)>,
    user: String,
    login: Login,
    servers: HashMap<u32, Server>,
    /// The server whose answers are being relayed.
    current: Option<u32>,
    /// The server holding an open transaction.
    txn: Option<u32>,
    /// The replica a read-only transaction was last opened on (`replica_txn`): while that
    /// replica holds the session's transaction, it runs only what `replica_txn` allows.
    txn_on_replica: Option<u32>,
    /// A raising statement was sent (`replica_txn`) and may not be answered yet: what is
    /// routed next waits for its answer, so that its error meets no later unit's swallowed
    /// messages.
    raise_unanswered: bool,
    /// Pinned to this server (session state lives there).
    pinned: Option<u32>,
    statements: HashMap<String, Statement>,
    batch: Batch,
    /// `SET`/`RESET` statements that succeeded outside a transaction, in order.
    settings: Vec<Arc<[u8]>>,
    /// When this session's last write was acknowledged.
    wrote_at: Option<Instant>,
    /// The replica this session reads from.
    reader: Option<Reader>,
    cancel: Arc<CancelSlot>,
    /// The server in COPY-in mode (it sent `CopyInResponse`), and whether an extended-protocol
    /// batch started the COPY.
    copy_in: Option<(u32, bool)>,
    /// Whether the unit sent last was an extended-protocol batch (not a simple query).
    extended: bool,
    /// An extended COPY ended: the messages up to the next `Sync` belong to the batch that
    /// started it, whose `ReadyForQuery` that `Sync` brings.
    sync_owed: bool,
    /// A server was lost in the middle of an extended-protocol batch: the client's messages
    /// up to the next `Sync` are dropped, as PostgreSQL skips them after an error, and that
    /// `Sync` is answered (`ReadyForQuery`) when the batch had not been answered yet.
    skip_to_sync: Option<bool>,
}

enum Event {
    Client(Result<Message, WireError>),
    Server(u32, Result<Message, WireError>),
}

mod batch;
mod relay;
mod route;

impl Session {
    /// A session whose first server connection is `first`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        engine: Arc<Engine>,
        client: ClientStream,
        crbuf: BytesMut,
        params: Vec<(String, String)>,
        user: String,
        login: Login,
        first: Server,
        cancel: Arc<CancelSlot>,
    ) -> Self {
        let mut servers = HashMap::new();
        servers.insert(first.backend.id, first);
        Self {
            engine,
            client,
            crbuf,
            out: BytesMut::with_capacity(8192),
            params,
            user,
            login,
            servers,
            current: None,
            txn: None,
            txn_on_replica: None,
            raise_unanswered: false,
            pinned: None,
            statements: HashMap::new(),
            batch: Batch::default(),
            settings: Vec::new(),
            wrote_at: None,
            reader: None,
            cancel,
            copy_in: None,
            extended: false,
            sync_owed: false,
            skip_to_sync: None,
        }
    }

    /// Runs until the client leaves or a connection fails.
    pub async fn run(&mut self) -> Result<(), WireError> {
        loop {
            let event = {
                let Self {
                    client,
                    crbuf,
                    servers,
                    current,
                    pinned,
                    ..
                } = self;
                // Idle, a pinned session still hears its server (notifications, a shutdown).
                let listening = current
                    .or(*pinned)
                    .and_then(|id| servers.get_mut(&id).map(|s| (id, s)));
                match listening {
                    Some((id, server)) => tokio::select! {
                        m = wire::read_message(client, crbuf) => Event::Client(m),
                        m = wire::read_message(&mut server.stream, &mut server.rbuf) => Event::Server(id, m),
                    },
                    None => Event::Client(wire::read_message(client, crbuf).await),
                }
            };
            match event {
                Event::Client(Err(WireError::Closed)) => return self.terminate().await,
                Event::Client(Err(e)) => return Err(e),
                Event::Client(Ok(m)) if m.tag == b'X' => return self.terminate().await,
                Event::Client(Ok(m)) => self.on_client(m).await?,
                Event::Server(id, m) => self.on_server(id, m).await?,
            }
            self.flush_if_idle().await?;
        }
    }

    /// Ends the session's server connections the way a client does (`Terminate`), so the
    /// servers do not log a lost connection.
    async fn terminate(&mut self) -> Result<(), WireError> {
        let mut bye = BytesMut::new();
        wire::put(&mut bye, b'X', &[]);
        for server in self.servers.values_mut() {
            // A courtesy: the connection is dropped next, delivered or not.
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(1), server.write(&bye)).await;
        }
        Ok(())
    }

    /// Writes what is buffered for the client once the current server has nothing more
    /// buffered (one write per answer, not per message).
    async fn flush_if_idle(&mut self) -> Result<(), WireError> {
        let more = self
            .current
            .and_then(|id| self.servers.get(&id))
            .is_some_and(|s| wire::has_message(&s.rbuf));
        if !self.out.is_empty() && (!more || self.out.len() > 65_536) {
            self.client.send(&self.out).await?;
            self.out.clear();
        }
        Ok(())
    }

    async fn on_client(&mut self, m: Message) -> Result<(), WireError> {
        if let Some(answer) = self.skip_to_sync {
            if m.tag == b'S' {
                self.skip_to_sync = None;
                if answer {
                    // Inside a transaction, the failed batch failed it.
                    wire::ready(&mut self.out, self.txn.map_or(b'I', |_| b'E'));
                }
            }
            return Ok(());
        }
        match m.tag {
            b'Q' | b'F' => self.extended = false,
            b'H' | b'S' => self.extended = true,
            _ => {}
        }
        match m.tag {
            b'Q' => {
                let mut body = m.body();
                let sql = wire::take_bytes(&mut body)?;
                if let Some(answer) = self.engine.answer_show(sql) {
                    self.finish_current().await?;
                    self.out.extend_from_slice(&answer);
                    wire::ready(&mut self.out, self.txn.map_or(b'I', |_| b'T'));
                    return Ok(());
                }
                let class = self.effective(classify(sql, self.engine.settings.unknown_functions));
                let setting: Option<Arc<[u8]>> = (class == Class::Set).then(|| sql.into());
                let target = self.route(class).await?;
                let Some(target) = target else { return Ok(()) };
                if self.refused_in_replica_txn(target, class) {
                    let raise = replica_txn::simple_query();
                    if let Some(server) = self.servers.get_mut(&target) {
                        server.prepared.remove("");
                    }
                    self.raise_unanswered = true;
                    return self.send(target, Class::TxnControl, &raise).await;
                }
                let server = self
                    .servers
                    .get_mut(&target)
                    .expect("routed to an open server");
                // A simple query ends the unnamed statement.
                server.prepared.remove("");
                let unit = Pending {
                    settings: setting.into_iter().collect(),
                    ..Pending::of(class)
                };
                self.send_unit(target, unit, m.frame.as_ref()).await
            }
            b'P' => {
                let mut body = m.body();
                let name = wire::take_name(&mut body)?;
                let sql = wire::take_bytes(&mut body)?;
                let class = classify(sql, self.engine.settings.unknown_functions);
                if self.leave_flushed_replica(class).await? {
                    return Ok(());
                }
                let st = Statement {
                    sql: sql.into(),
                    class,
                    parse: m.frame.clone(),
                };
                self.statements.insert(name, st);
                self.batch.class = Some(self.batch.class.map_or(class, |c| c.max(class)));
                self.push(m).await
            }
            b'B' => {
                let mut body = m.body();
                let portal = wire::take_name(&mut body)?;
                let name = wire::take_name(&mut body)?;
                if self.leave_flushed_replica(self.class_of(&name)).await? {
                    return Ok(());
                }
                // Binding a portal replaces the one of that name.
                self.batch.set_portals.retain(|(p, _)| *p != portal);
                if let Some(st) = self.statements.get(&name).filter(|s| s.class == Class::Set) {
                    self.batch.set_portals.push((portal, st.sql.clone()));
                }
                self.uses(&name);
                self.push(m).await
            }
            b'D' if m.body().first() == Some(&b'S') => {
                let mut body = &m.body()[1..];
                let name = wire::take_name(&mut body)?;
                if self.leave_flushed_replica(self.class_of(&name)).await? {
                    return Ok(());
                }
                self.uses(&name);
                self.push(m).await
            }
            b'C' if m.body().first() == Some(&b'S') => {
                let mut body = &m.body()[1..];
                let name = wire::take_name(&mut body)?;
                self.statements.remove(&name);
                self.push(m).await
            }
            b'E' => {
                // A setting is made when its portal runs, not when it is bound.
                let portal = wire::take_name(&mut m.body())?;
                if let Some((_, sql)) = self.batch.set_portals.iter().find(|(p, _)| *p == portal) {
                    self.batch.settings.push(sql.clone());
                }
                self.push(m).await
            }
            b'D' | b'C' => self.push(m).await,
            b'H' => {
                self.push(m).await?;
                if self.skip_to_sync.is_some() {
                    // Writing it failed: the batch is answered at its `Sync`.
                    return Ok(());
                }
                let target = match self.batch.target {
                    Some(t) => t,
                    None => match self.route_batch().await? {
                        Some(t) => t,
                        None => {
                            // Refused and answered (error and `ReadyForQuery`): the rest of the
                            // batch, up to and with its `Sync`, is dropped unanswered.
                            self.skip_to_sync = Some(false);
                            return Ok(());
                        }
                    },
                };
                self.batch.target = Some(target);
                self.send_batch(target, None).await
            }
            b'S' if self.sync_owed => {
                // PostgreSQL ignores a Sync sent during COPY-in; this one ends the batch that
                // started the COPY (already counted), on the server that ran it.
                self.sync_owed = false;
                let batch = std::mem::take(&mut self.batch);
                match batch.target.and_then(|id| self.servers.get_mut(&id)) {
                    Some(server) => server.write(&m.frame).await,
                    None => Ok(()),
                }
            }
            b'S' => {
                let target = match self.batch.target {
                    Some(t) => t,
                    None => match self.route_batch().await? {
                        Some(t) => t,
                        None => return Ok(()),
                    },
                };
                let class = match self.batch.raised {
                    // What followed the raising statement was skipped: it pins nothing.
                    true => Class::TxnControl,
                    false => self.batch.class.unwrap_or(Class::Read),
                };
                self.batch.messages.push(m);
                self.send_batch(target, Some(class)).await
            }
            b'd' | b'c' | b'f' => {
                if matches!(m.tag, b'c' | b'f') {
                    // After a Flush the batch is still open and its Sync counts it as usual.
                    if let Some((id, true)) =
                        self.copy_in.take().filter(|_| self.batch.target.is_none())
                    {
                        self.batch = Batch {
                            target: Some(id),
                            class: Some(Class::Write),
                            ..Batch::default()
                        };
                        self.sync_owed = true;
                    }
                }
                match self.current.and_then(|id| self.servers.get_mut(&id)) {
                    Some(server) => server.write(&m.frame).await,
                    None => Ok(()),
                }
            }
            b'F' => {
                let Some(target) = self.route(Class::Write).await? else {
                    return Ok(());
                };
                if self.refused_in_replica_txn(target, Class::Write) {
                    let raise = replica_txn::simple_query();
                    if let Some(server) = self.servers.get_mut(&target) {
                        server.prepared.remove("");
                    }
                    self.raise_unanswered = true;
                    return self.send(target, Class::TxnControl, &raise).await;
                }
                self.send(target, Class::Write, m.frame.as_ref()).await
            }
            other => Err(WireError::Protocol(format!(
                "unexpected message '{}'",
                other.escape_ascii()
            ))),
        }
    }
}
