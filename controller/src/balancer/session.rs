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
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use super::backends::Reader;
use super::classify::{classify, Class};
use super::client::ClientStream;
use super::replica_txn;
use super::server::{ConnectError, Pending, Server, Swallow};
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
    /// Session settings (`SET`, `RESET`) the batch binds, to record once they succeeded.
    settings: Vec<Arc<[u8]>>,
}

/// A session after startup.
pub struct Session {
    engine: Arc<Engine>,
    client: ClientStream,
    crbuf: BytesMut,
    out: BytesMut,
    params: Vec<(String, String)>,
    user: String,
    password: Arc<str>,
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

impl Session {
    /// A session whose first server connection is `first`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        engine: Arc<Engine>,
        client: ClientStream,
        crbuf: BytesMut,
        params: Vec<(String, String)>,
        user: String,
        password: Arc<str>,
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
            password,
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
                let _portal = wire::take_bytes(&mut body)?;
                let name = wire::take_name(&mut body)?;
                if self.leave_flushed_replica(self.class_of(&name)).await? {
                    return Ok(());
                }
                if let Some(st) = self.statements.get(&name).filter(|s| s.class == Class::Set) {
                    self.batch.settings.push(st.sql.clone());
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
            b'D' | b'E' | b'C' => self.push(m).await,
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

    /// A message of an extended-protocol batch: kept until `Sync`, or sent at once after a
    /// `Flush` chose the server.
    async fn push(&mut self, m: Message) -> Result<(), WireError> {
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
    fn class_of(&self, name: &str) -> Class {
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
    async fn leave_flushed_replica(&mut self, class: Class) -> Result<bool, WireError> {
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
    fn uses(&mut self, name: &str) {
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

    async fn route_batch(&mut self) -> Result<Option<u32>, WireError> {
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

    /// The class a unit is routed as: a read-only transaction's opening stays on the primary
    /// unless replicas may hold such transactions (and the session set no isolation level,
    /// which `route` checks once what was sent before is answered). With strict consistency
    /// they stay on the primary too: a `READ COMMITTED` transaction's later statements must
    /// see writes acknowledged after it began, which a replica may not have replayed yet.
    fn effective(&self, class: Class) -> Class {
        let settings = &self.engine.settings;
        if class == Class::ReadOnlyBegin
            && !(settings.read_only_transactions_on_replicas
                && settings.load_balance
                && settings.consistency != super::Consistency::Strict)
        {
            return Class::Write;
        }
        class
    }

    /// Whether a unit of `class` is going to the replica holding the session's read-only
    /// transaction, which must not run it (`replica_txn`).
    fn refused_in_replica_txn(&self, target: u32, class: Class) -> bool {
        self.txn_on_replica == Some(target)
            && self.txn == Some(target)
            && self.engine.primary().map(|b| b.id) != Some(target)
            && !replica_txn::may_run(class)
    }

    /// Sends the batch (and `Sync` when `class` is given) to `target`, preparing first the
    /// statements it uses that `target` lacks.
    async fn send_batch(&mut self, target: u32, class: Option<Class>) -> Result<(), WireError> {
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
                self.current = Some(target);
                if let Some(server) = self.servers.get(&target) {
                    self.cancel.set(&server.backend, server.key);
                }
                self.write_to(target, &bytes).await
            }
        }
    }

    /// Sends bytes that end in a `ReadyForQuery` answer.
    async fn send(&mut self, target: u32, class: Class, bytes: &[u8]) -> Result<(), WireError> {
        self.send_unit(target, Pending::of(class), bytes).await
    }

    /// [`Self::send`] of a unit that may make session settings.
    async fn send_unit(
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
    async fn write_to(&mut self, target: u32, bytes: &[u8]) -> Result<(), WireError> {
        let server = self.servers.get_mut(&target).expect("an open server");
        match server.write(bytes).await {
            Err(e) => self.server_failed(target, e, None).await,
            Ok(()) => Ok(()),
        }
    }

    async fn on_server(&mut self, id: u32, m: Result<Message, WireError>) -> Result<(), WireError> {
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
    fn record_setting(&mut self, id: u32, setting: Arc<[u8]>) {
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
    async fn server_failed(
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

    /// Relays what the current server still owes before another server is used.
    async fn finish_current(&mut self) -> Result<(), WireError> {
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
    async fn route(&mut self, class: Class) -> Result<Option<u32>, WireError> {
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
            match Server::connect(backend, &self.params, &self.user, Some(&self.password)).await {
                Ok(s) => {
                    self.servers.insert(target, s);
                }
                Err(ConnectError::Refused(error)) => {
                    self.out.extend_from_slice(&error.frame);
                    wire::ready(&mut self.out, b'I');
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
    async fn replay_settings(&mut self, target: u32) -> Result<(), WireError> {
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
    async fn refuse(&mut self, code: &str, message: &str) -> Result<(), WireError> {
        self.batch = Batch::default();
        wire::error(&mut self.out, "ERROR", code, message);
        wire::ready(&mut self.out, b'I');
        Ok(())
    }
}

fn close_statement(out: &mut BytesMut, name: &str) {
    let mut body = vec![b'S'];
    wire::cstr(&mut body, name);
    wire::put(out, b'C', &body);
}
