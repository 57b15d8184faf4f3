//! The native balancer engine: a PostgreSQL v3 proxy that splits reads from writes, follows
//! the live backend set (scale, failover) without dropping sessions, and offers
//! read-your-writes. It reads the same rendered configuration as pgpool (`pgpool.conf` for the
//! backends and lag bound, `secrets/pool_passwd` for the users of a primary without the
//! verifier lookup), so either engine runs from one set of files. Users log in with the
//! verifier the primary holds for them, and the session logs in to servers with the client key
//! their proof yields (SCRAM pass-through): the engine holds that key for the session's life,
//! never a password of theirs.
//!
//! Layout: `wire` (framing), `scram` (both halves of SCRAM), `verifiers` (users' verifiers,
//! read from the primary), `classify` (where a statement
//! may run, pure), `backends` (the live set and the pure choices), `monitor` (health and WAL
//! positions), `server` (connections to servers), `startup` and `session` (one client),
//! `show` (`SHOW POOL_NODES` and friends, answered by the engine).

pub mod backends;
pub mod classify;
pub mod client;
pub mod monitor;
pub mod replica_txn;
pub mod scram;
pub mod server;
pub mod session;
pub mod show;
pub mod startup;
pub mod verifiers;
pub mod wire;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use backends::{choose_primary, choose_replica, Backend, Backends};
use classify::UnknownFunctions;
use monitor::MonitorConfig;
use scram::Verifier;

/// Which reads may go to a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Consistency {
    /// Any replica within the lag bound.
    Eventual,
    /// A session reads its own writes: after it wrote, only replicas that replayed them.
    #[default]
    Session,
    /// A read sees every write acknowledged through this balancer before it began.
    Strict,
}

/// Whether clients use TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TlsMode {
    /// Clients asking for TLS are told no.
    #[default]
    Disabled,
    /// Clients may use TLS.
    Enabled,
    /// Clients must use TLS, except over loopback (the agent's own sessions).
    Required,
}

/// The engine's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Read consistency.
    pub consistency: Consistency,
    /// Replicas lagging more bytes than this take no reads.
    pub max_lag_bytes: u64,
    /// Where statements calling functions of unknown effect run.
    pub unknown_functions: UnknownFunctions,
    /// A replica may hold read-only transactions (`BEGIN READ ONLY`).
    pub read_only_transactions_on_replicas: bool,
    /// Monitor check interval.
    pub check_interval: Duration,
    /// Reads may go to replicas at all.
    pub load_balance: bool,
    /// TLS from clients.
    pub tls: TlsMode,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            consistency: Consistency::Session,
            max_lag_bytes: 10_000_000,
            unknown_functions: UnknownFunctions::Primary,
            read_only_transactions_on_replicas: false,
            check_interval: Duration::from_millis(20),
            load_balance: true,
            tls: TlsMode::Disabled,
        }
    }
}

/// A user from `pool_passwd`, for a primary without the verifier lookup.
#[derive(Clone)]
pub struct User {
    /// SCRAM verifier clients are checked against.
    pub verifier: Verifier,
    /// Password towards the servers.
    pub password: Arc<str>,
}

/// Where a read may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadFloor {
    /// A replica that replayed at least this position.
    AtLeast(u64),
    /// Only the primary has what the read must see.
    PrimaryOnly,
}

/// What a read must see (pure): nothing when reads may go anywhere within the lag bound;
/// otherwise the primary's position sampled after the write it must see (the session's own, or
/// with `strict` the last through this balancer), or the primary itself while no such sample
/// exists.
pub fn read_floor(
    settings: &Settings,
    session_wrote: Option<Instant>,
    last_write: Option<Instant>,
    primary: Option<&backends::Candidate>,
) -> ReadFloor {
    if !settings.load_balance {
        return ReadFloor::PrimaryOnly;
    }
    let since = match settings.consistency {
        Consistency::Eventual => None,
        Consistency::Session => session_wrote,
        Consistency::Strict => last_write,
    };
    let Some(since) = since else {
        return ReadFloor::AtLeast(0);
    };
    match primary {
        Some(p) if p.sampled.is_some_and(|t| t >= since) => ReadFloor::AtLeast(p.lsn),
        _ => ReadFloor::PrimaryOnly,
    }
}

/// A server and the key of one of its sessions: where a cancel request goes.
type CancelTarget = (String, u16, (i32, i32));

/// The server a session's cancel request goes to.
#[derive(Debug, Default)]
pub struct CancelSlot {
    target: Mutex<Option<CancelTarget>>,
}

impl CancelSlot {
    /// The session now runs on `backend` with server key `key`.
    pub fn set(&self, backend: &Backend, key: (i32, i32)) {
        let mut t = self.target.lock().unwrap_or_else(|e| e.into_inner());
        if t.as_ref()
            .is_none_or(|(h, p, k)| *k != key || *h != backend.host || *p != backend.port)
        {
            *t = Some((backend.host.clone(), backend.port, key));
        }
    }
}

/// The engine: shared by every session.
pub struct Engine {
    /// Settings.
    pub settings: Settings,
    /// The live backend set.
    pub backends: Arc<Backends>,
    users: RwLock<HashMap<String, User>>,
    /// Users' verifiers, read from the primary.
    pub verifiers: verifiers::Verifiers,
    cancels: Mutex<HashMap<(i32, i32), Arc<CancelSlot>>>,
    last_write: Mutex<Option<Instant>>,
    monitor: MonitorConfig,
    /// Client sessions now.
    pub clients: AtomicU32,
    /// Client sessions since start.
    pub accepted: AtomicU64,
    /// When the engine started.
    pub started: Instant,
    /// The secret decoy verifiers are made from: a user that may not log in goes through the
    /// same exchange as one that may, with a salt of its own (`Verifier::decoy`).
    decoy_secret: [u8; 32],
    /// The TLS server side, and the certificate and key files it was made from.
    tls: RwLock<Option<(tokio_rustls::TlsAcceptor, Vec<u8>)>>,
}

impl Engine {
    /// An engine with no backends and no users yet.
    pub fn new(settings: Settings, monitor: MonitorConfig) -> Arc<Self> {
        // Stable across restarts (a user's decoy salt must not change when the engine
        // restarts, as a real one does not), and secret.
        let decoy_secret = {
            use sha2::Digest;
            sha2::Sha256::digest(format!("pgbalancer decoy\0{}", monitor.password)).into()
        };
        Arc::new(Self {
            settings,
            backends: Arc::new(Backends::default()),
            users: RwLock::new(HashMap::new()),
            verifiers: verifiers::Verifiers::new(monitor.clone()),
            cancels: Mutex::new(HashMap::new()),
            last_write: Mutex::new(None),
            monitor,
            clients: AtomicU32::new(0),
            accepted: AtomicU64::new(0),
            started: Instant::now(),
            decoy_secret,
            tls: RwLock::new(None),
        })
    }

    /// Serves TLS with this certificate chain and key (PEM). Unchanged files keep the
    /// configuration; files that are not a usable pair keep the previous one and are the error.
    pub fn configure_tls(&self, cert: &[u8], key: &[u8]) -> Result<(), String> {
        let source = [cert, b"\0", key].concat();
        let mut tls = self.tls.write().unwrap_or_else(|e| e.into_inner());
        if tls.as_ref().is_some_and(|(_, s)| *s == source) {
            return Ok(());
        }
        let config = crate::tls::server_config(cert, key)?;
        *tls = Some((tokio_rustls::TlsAcceptor::from(config), source));
        tracing::info!("TLS certificate loaded");
        Ok(())
    }

    /// The TLS server side, when TLS is on and a certificate was loaded.
    pub fn tls_acceptor(&self) -> Option<tokio_rustls::TlsAcceptor> {
        if self.settings.tls == TlsMode::Disabled {
            return None;
        }
        let tls = self.tls.read().unwrap_or_else(|e| e.into_inner());
        tls.as_ref().map(|(a, _)| a.clone())
    }

    /// Sets the backends (slot, host, port); new ones get a monitor.
    pub fn configure_backends(&self, configured: &[(u32, String, u16)]) {
        for b in self.backends.configure(configured) {
            tracing::info!(node = b.id, host = %b.host, port = b.port, "backend configured");
            tokio::spawn(monitor::run(self.backends.clone(), b, self.monitor.clone()));
        }
    }

    /// Sets the users from `user:password` pairs; unchanged users keep their verifier.
    pub fn configure_users(&self, pairs: &[(String, String)]) {
        let mut users = self.users.write().unwrap_or_else(|e| e.into_inner());
        let mut next = HashMap::new();
        for (name, password) in pairs {
            let user = match users.remove(name) {
                Some(u) if &*u.password == password.as_str() => u,
                _ => User {
                    verifier: Verifier::new(password),
                    password: password.as_str().into(),
                },
            };
            next.insert(name.clone(), user);
        }
        *users = next;
    }

    /// The verifier a user that may not log in is checked against.
    pub fn decoy(&self, user: &str) -> Verifier {
        Verifier::decoy(&self.decoy_secret, user)
    }

    /// The user named `name`.
    pub fn user(&self, name: &str) -> Option<User> {
        self.users
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Serves clients on `listener` forever.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (socket, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let engine = self.clone();
            tokio::spawn(async move {
                engine.clients.fetch_add(1, Ordering::Relaxed);
                engine.accepted.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = startup::serve(engine.clone(), socket).await {
                    tracing::debug!(%peer, error = %e, "client session ended");
                }
                engine.clients.fetch_sub(1, Ordering::Relaxed);
            });
        }
    }

    /// The server writes go to now.
    pub fn primary(&self) -> Option<Arc<Backend>> {
        let set = self.backends.all();
        choose_primary(&self.backends.candidates(&set)).map(|i| set[i].clone())
    }

    /// Any usable replica (a session starting while there is no primary).
    pub fn replica_any(&self) -> Option<Arc<Backend>> {
        let set = self.backends.all();
        choose_replica(&self.backends.candidates(&set), None, 0, u64::MAX, None)
            .map(|i| set[i].clone())
    }

    /// The configured server in slot `id`.
    pub fn backend(&self, id: u32) -> Option<Arc<Backend>> {
        self.backends.all().iter().find(|b| b.id == id).cloned()
    }

    /// A write was acknowledged at `at`.
    pub fn wrote(&self, at: Instant) {
        let mut last = self.last_write.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|l| l < at) {
            *last = Some(at);
        }
    }

    /// The server a read goes to, given the session's last acknowledged write and the
    /// replica it reads from now (`reader`, kept while it qualifies): a replica that has what
    /// the read must see, else the primary. The flag says whether it is a replica.
    pub fn read_target(
        &self,
        session_wrote: Option<Instant>,
        reader: Option<u32>,
    ) -> Option<(Arc<Backend>, bool)> {
        let set = self.backends.all();
        let candidates = self.backends.candidates(&set);
        let primary = choose_primary(&candidates).map(|i| &candidates[i]);
        let last_write = match self.settings.consistency {
            Consistency::Strict => *self.last_write.lock().unwrap_or_else(|e| e.into_inner()),
            _ => None,
        };
        let floor = read_floor(&self.settings, session_wrote, last_write, primary);
        let replica = match floor {
            ReadFloor::AtLeast(lsn) => choose_replica(
                &candidates,
                primary.map(|p| p.lsn),
                lsn,
                self.settings.max_lag_bytes,
                reader.and_then(|id| set.iter().position(|b| b.id == id)),
            ),
            ReadFloor::PrimaryOnly => None,
        };
        match replica {
            Some(i) => Some((set[i].clone(), true)),
            None => primary.map(|p| (set[p.index].clone(), false)),
        }
    }

    /// A new session's cancel key and slot. The key's process id is `pid`, the process id of
    /// the session's first server (so `pg_backend_pid()` on it matches what the client was
    /// told), with a random secret of the engine's own.
    pub fn register_session(&self, pid: i32) -> ((i32, i32), Arc<CancelSlot>) {
        let slot = Arc::new(CancelSlot::default());
        let mut cancels = self.cancels.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let key = (pid, rand::random::<i32>());
            if let std::collections::hash_map::Entry::Vacant(v) = cancels.entry(key) {
                v.insert(slot.clone());
                return (key, slot);
            }
        }
    }

    /// A session ended.
    pub fn unregister_session(&self, key: (i32, i32)) {
        self.cancels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
    }

    /// Passes a client's cancel request to the server its session runs on.
    pub async fn cancel(&self, pid: i32, secret: i32) {
        let target = self
            .cancels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(pid, secret))
            .and_then(|slot| {
                slot.target
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
            });
        let Some((host, port, (spid, ssecret))) = target else {
            return;
        };
        let sent = async {
            let mut s = TcpStream::connect((host.as_str(), port)).await?;
            s.write_all(&wire::cancel_packet(spid, ssecret)).await?;
            s.shutdown().await
        };
        if let Err(e) = tokio::time::timeout(server::CONNECT_TIMEOUT, sent)
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
        {
            tracing::info!(%host, error = %e, "cancel request not delivered");
        }
    }

    /// The engine's answer to `SHOW POOL_NODES` and friends, when `sql` is one.
    pub fn answer_show(&self, sql: &[u8]) -> Option<bytes::BytesMut> {
        // Every simple query passes here: anything else is turned away before any allocation.
        let start = sql.trim_ascii_start();
        if !start
            .get(..4)
            .is_some_and(|w| w.eq_ignore_ascii_case(b"show"))
        {
            return None;
        }
        show::answer(self, std::str::from_utf8(sql).ok()?)
    }
}

#[cfg(test)]
mod tests {
    use super::backends::Candidate;
    use super::*;

    fn primary(lsn: u64, sampled: Instant) -> Candidate {
        Candidate {
            index: 0,
            usable: true,
            in_recovery: Some(false),
            lsn,
            in_flight: 0,
            readers: 0,
            sessions: 0,
            selects: 0,
            sampled: Some(sampled),
        }
    }

    fn settings(consistency: Consistency) -> Settings {
        Settings {
            consistency,
            ..Settings::default()
        }
    }

    #[test]
    fn reads_see_the_writes_their_consistency_promises() {
        let t0 = Instant::now();
        let before = t0;
        let write = t0 + Duration::from_millis(5);
        let after = t0 + Duration::from_millis(10);
        let session = settings(Consistency::Session);
        let strict = settings(Consistency::Strict);
        let eventual = settings(Consistency::Eventual);
        let cases = [
            // No write yet: any replica within the lag bound.
            (
                &session,
                None,
                None,
                primary(10, before),
                ReadFloor::AtLeast(0),
            ),
            // The session wrote after the last sample: only the primary has it.
            (
                &session,
                Some(write),
                None,
                primary(10, before),
                ReadFloor::PrimaryOnly,
            ),
            // A sample taken after the write covers it.
            (
                &session,
                Some(write),
                None,
                primary(42, after),
                ReadFloor::AtLeast(42),
            ),
            // Strict: another session's write counts; the session's own alone does not.
            (
                &strict,
                None,
                Some(write),
                primary(10, before),
                ReadFloor::PrimaryOnly,
            ),
            (
                &strict,
                Some(write),
                None,
                primary(10, before),
                ReadFloor::AtLeast(0),
            ),
            (
                &strict,
                None,
                Some(write),
                primary(42, after),
                ReadFloor::AtLeast(42),
            ),
            // Eventual: writes do not hold reads back.
            (
                &eventual,
                Some(write),
                Some(write),
                primary(10, before),
                ReadFloor::AtLeast(0),
            ),
        ];
        for (i, (s, own, last, p, want)) in cases.into_iter().enumerate() {
            assert_eq!(read_floor(s, own, last, Some(&p)), want, "case {i}");
        }
        // Without a primary nothing is known about recent writes.
        assert_eq!(
            read_floor(&session, Some(write), None, None),
            ReadFloor::PrimaryOnly
        );
        let off = Settings {
            load_balance: false,
            ..Settings::default()
        };
        assert_eq!(read_floor(&off, None, None, None), ReadFloor::PrimaryOnly);
    }
}
