//! The native balancer engine: a PostgreSQL v3 proxy that splits reads from writes, follows
//! the live backend set (scale, failover) without dropping sessions, and offers
//! read-your-writes. It reads the same rendered configuration as pgpool (`pgpool.conf` for the
//! backends and lag bound, `secrets/pool_passwd` for the users), so either engine runs from
//! one set of files.
//!
//! Layout: `wire` (framing), `scram` (client authentication), `classify` (where a statement
//! may run, pure), `backends` (the live set and the pure choices), `monitor` (health and WAL
//! positions), `server` (connections to servers), `startup` and `session` (one client),
//! `show` (`SHOW POOL_NODES` and friends, answered by the engine).

pub mod backends;
pub mod classify;
pub mod monitor;
pub mod scram;
pub mod server;
pub mod session;
pub mod show;
pub mod startup;
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

/// The engine's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Read consistency.
    pub consistency: Consistency,
    /// Replicas lagging more bytes than this take no reads.
    pub max_lag_bytes: u64,
    /// Where statements calling functions of unknown effect run.
    pub unknown_functions: UnknownFunctions,
    /// Monitor check interval.
    pub check_interval: Duration,
    /// Reads may go to replicas at all.
    pub load_balance: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            consistency: Consistency::Session,
            max_lag_bytes: 10_000_000,
            unknown_functions: UnknownFunctions::Primary,
            check_interval: Duration::from_millis(20),
            load_balance: true,
        }
    }
}

/// A user clients may log in as.
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
    cancels: Mutex<HashMap<(i32, i32), Arc<CancelSlot>>>,
    last_write: Mutex<Option<Instant>>,
    monitor: MonitorConfig,
    /// Client sessions now.
    pub clients: AtomicU32,
    /// Client sessions since start.
    pub accepted: AtomicU64,
    /// When the engine started.
    pub started: Instant,
}

impl Engine {
    /// An engine with no backends and no users yet.
    pub fn new(settings: Settings, monitor: MonitorConfig) -> Arc<Self> {
        Arc::new(Self {
            settings,
            backends: Arc::new(Backends::default()),
            users: RwLock::new(HashMap::new()),
            cancels: Mutex::new(HashMap::new()),
            last_write: Mutex::new(None),
            monitor,
            clients: AtomicU32::new(0),
            accepted: AtomicU64::new(0),
            started: Instant::now(),
        })
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

    /// The replica a read that must see position `min_lsn` goes to.
    pub fn replica(&self, min_lsn: u64) -> Option<Arc<Backend>> {
        let set = self.backends.all();
        let candidates = self.backends.candidates(&set);
        let primary_lsn = choose_primary(&candidates).map(|i| candidates[i].lsn);
        choose_replica(
            &candidates,
            primary_lsn,
            min_lsn,
            self.settings.max_lag_bytes,
        )
        .map(|i| set[i].clone())
    }

    /// Any usable replica (a session starting while there is no primary).
    pub fn replica_any(&self) -> Option<Arc<Backend>> {
        let set = self.backends.all();
        choose_replica(&self.backends.candidates(&set), None, 0, u64::MAX).map(|i| set[i].clone())
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

    /// What a read must see, given the session's last acknowledged write.
    pub fn read_floor(&self, session_wrote: Option<Instant>) -> ReadFloor {
        if !self.settings.load_balance {
            return ReadFloor::PrimaryOnly;
        }
        let since = match self.settings.consistency {
            Consistency::Eventual => None,
            Consistency::Session => session_wrote,
            Consistency::Strict => *self.last_write.lock().unwrap_or_else(|e| e.into_inner()),
        };
        let Some(since) = since else {
            return ReadFloor::AtLeast(0);
        };
        // The primary's position sampled after the write was acknowledged covers it.
        match self.primary().map(|p| p.seen()) {
            Some(seen) if seen.sampled.is_some_and(|t| t >= since) => ReadFloor::AtLeast(seen.lsn),
            _ => ReadFloor::PrimaryOnly,
        }
    }

    /// A new session's cancel key and slot.
    pub fn register_session(&self) -> ((i32, i32), Arc<CancelSlot>) {
        let slot = Arc::new(CancelSlot::default());
        let mut cancels = self.cancels.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let key = (rand::random::<i32>() & i32::MAX, rand::random::<i32>());
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
    pub fn answer_show(&self, sql: &str) -> Option<bytes::BytesMut> {
        show::answer(self, sql)
    }
}
