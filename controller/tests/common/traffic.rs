//! Traffic through a cluster under test: a writer through the balancer (one connection per
//! write, every attempt recorded), a reader, a watcher that samples every instance for how many
//! accept writes at once, and the checks made afterwards.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio_postgres::NoTls;

use super::*;

/// Connects with a short timeout; `None` when the server does not answer.
pub async fn try_connect(
    port: u16,
    user: &str,
    password: &str,
    db: &str,
) -> Option<tokio_postgres::Client> {
    let (client, conn) = tokio::time::timeout(
        Duration::from_secs(2),
        tokio_postgres::Config::new()
            .host("127.0.0.1")
            .port(port)
            .user(user)
            .password(password)
            .dbname(db)
            .connect_timeout(Duration::from_millis(800))
            .connect(NoTls),
    )
    .await
    .ok()?
    .ok()?;
    tokio::spawn(conn);
    Some(client)
}

/// An error with the server's message when there is one.
fn explain(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

/// One write through the balancer on a fresh connection; whether it was acknowledged. Why it
/// was not is printed.
pub async fn write(balancer: u16, password: &str, id: i32) -> bool {
    let attempt = async {
        let (client, conn) = tokio_postgres::Config::new()
            .host("127.0.0.1")
            .port(balancer)
            .user("app")
            .password(password)
            .dbname("app")
            .connect_timeout(Duration::from_millis(800))
            .connect(NoTls)
            .await
            .map_err(|e| format!("connect: {}", explain(&e)))?;
        tokio::spawn(conn);
        client
            .execute("INSERT INTO ledger VALUES ($1)", &[&id])
            .await
            .map_err(|e| format!("insert: {}", explain(&e)))
    };
    match tokio::time::timeout(Duration::from_secs(3), attempt).await {
        Ok(Ok(1)) => true,
        Ok(Ok(n)) => {
            eprintln!("write {id}: {n} rows");
            false
        }
        Ok(Err(e)) => {
            eprintln!("write {id}: {e}");
            false
        }
        Err(_) => {
            eprintln!("write {id}: no answer in 3 s");
            false
        }
    }
}

/// Host ports of the cluster's PostgreSQL containers that run now (they change when a
/// stopped container starts again).
pub fn instance_ports(name: &str) -> Vec<u16> {
    docker(&[
        "ps",
        "--filter",
        &format!("label=app.kubernetes.io/instance={name}"),
        "--filter",
        "label=app.kubernetes.io/component=postgres",
        "--format",
        "{{.Ports}}",
    ])
    .lines()
    .filter_map(|ports| {
        ports
            .split(", ")
            .find(|p| p.ends_with("->5432/tcp"))
            .and_then(|p| p.split("->").next())
            .and_then(|host| host.rsplit(':').next())
            .and_then(|port| port.parse().ok())
    })
    .collect()
}

/// Samples every instance every 100 ms until `stop`; the most that accepted writes at once.
pub fn watch_writable(
    name: &'static str,
    superuser: String,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<usize> {
    let most = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        let mut ports = instance_ports(name);
        for round in 0..6000 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            if round % 10 == 9 {
                ports = instance_ports(name);
            }
            let mut writable = 0;
            for &port in &ports {
                if let Some(c) = try_connect(port, "postgres", &superuser, "postgres").await {
                    if let Ok(row) = c.query_one("SELECT pg_is_in_recovery()", &[]).await {
                        if !row.get::<_, bool>(0) {
                            writable += 1;
                        }
                    }
                }
            }
            most.fetch_max(writable, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        most.load(Ordering::Relaxed)
    })
}

/// Every write attempted: id, when it started, and whether it was acknowledged.
pub type Ledger = Vec<(i32, Instant, bool)>;

/// Writes ids 1, 2, … through the balancer every 50 ms until `stop`, into `ledger`.
pub fn writer(
    balancer: u16,
    password: String,
    stop: Arc<AtomicBool>,
    ledger: Arc<Mutex<Ledger>>,
    first_id: i32,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for id in first_id..first_id + 4000 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let at = Instant::now();
            let ok = write(balancer, &password, id).await;
            ledger.lock().unwrap().push((id, at, ok));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

/// Acknowledged writes started after `since`.
pub fn acked_since(ledger: &Mutex<Ledger>, since: Instant) -> usize {
    ledger
        .lock()
        .unwrap()
        .iter()
        .filter(|w| w.2 && w.1 >= since)
        .count()
}

/// The longest time writes failed: from the last acknowledged write before a failure to the
/// next acknowledged one.
pub fn write_gap(ledger: &Ledger) -> Duration {
    let mut gap = Duration::ZERO;
    let mut last_ok: Option<Instant> = None;
    let mut failing = false;
    for &(_, at, ok) in ledger {
        match (ok, failing, last_ok) {
            (true, true, Some(before)) => {
                gap = gap.max(at - before);
                failing = false;
                last_ok = Some(at);
            }
            (true, _, _) => {
                failing = false;
                last_ok = Some(at);
            }
            (false, _, _) => failing = true,
        }
    }
    gap
}

/// Every acknowledged write is on the primary (read there directly: through the balancer the
/// read may go to a replica still replaying).
pub async fn acknowledged_writes_present(primary_port: u64, password: &str, ledger: &Ledger) {
    acknowledged_writes_present_until(primary_port, password, ledger, None).await
}

/// As [`acknowledged_writes_present`], for the writes started before `until` when given: a
/// primary killed outright (no shutdown) under asynchronous replication takes with it the
/// commits its standbys had not received yet; that is the replication mode's bargain, not a
/// fault. The writes after `until` lost are printed.
pub async fn acknowledged_writes_present_until(
    primary_port: u64,
    password: &str,
    ledger: &Ledger,
    until: Option<Instant>,
) {
    let counted = |at: &Instant| until.is_none_or(|until| *at < until);
    let acked: Vec<i32> = ledger
        .iter()
        .filter(|w| w.2 && counted(&w.1))
        .map(|w| w.0)
        .collect();
    let present: Vec<i32> = connect(primary_port, "app", password, "app")
        .await
        .query("SELECT id FROM ledger ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let missing: Vec<&i32> = acked.iter().filter(|id| !present.contains(id)).collect();
    assert!(missing.is_empty(), "acknowledged writes lost: {missing:?}");
    let last: Vec<i32> = ledger
        .iter()
        .filter(|w| w.2 && !counted(&w.1) && !present.contains(&w.0))
        .map(|w| w.0)
        .collect();
    if until.is_some() {
        eprintln!(
            "MEASURED acknowledged writes of the last moments lost: {}",
            last.len()
        );
    }
}

/// The primary's name in a status document, if any.
pub fn primary(doc: &Value) -> Option<String> {
    doc["primary"]["name"].as_str().map(str::to_owned)
}

/// Waits up to `secs` for `check` on the status document; the last document seen.
pub async fn status_until(
    s: &Scenario,
    name: &str,
    secs: u64,
    check: impl Fn(&Value) -> bool,
) -> (bool, Value) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        // The command blocks; the writer and the watcher keep running on other threads.
        let out = tokio::task::block_in_place(|| s.pgbalancer(&["status", name, "-o", "json"]));
        let doc: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if check(&doc) {
            return (true, doc);
        }
        if Instant::now() > deadline {
            return (false, doc);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// What a test reaches a cluster with, from its status document with secrets.
pub struct Access {
    /// The application role's password.
    pub password: String,
    /// The superuser's password.
    pub superuser: String,
    /// The balancer's published port.
    pub balancer: u16,
}

/// The [`Access`] in `doc`.
pub fn access(doc: &Value) -> Access {
    let secret = |k: &str| {
        doc["secrets"][k]
            .as_str()
            .unwrap_or_else(|| panic!("no secrets.{k} in {doc}"))
            .to_owned()
    };
    Access {
        password: secret("password"),
        superuser: secret("superuserPassword"),
        balancer: doc["balancer"]["port"].as_u64().expect("balancer port") as u16,
    }
}

/// Brings up `name` with two replicas and a ledger table; the status document with secrets.
pub async fn up_with_ledger(s: &Scenario, name: &str) -> Value {
    up_with_ledger_spec(s, name, "  replicas: 2\n").await
}

/// [`up_with_ledger`] with the given spec lines.
pub async fn up_with_ledger_spec(s: &Scenario, name: &str, spec: &str) -> Value {
    let file = s.file("c.yaml", &cluster_yaml(name, spec));
    let out = s.pgbalancer(&["up", "-f", file.to_str().unwrap()]);
    assert_success(&out);
    assert!(text(&out).contains("failover: automatic"), "{}", text(&out));
    let doc = s.status(name);
    assert_eq!(doc["controller"]["state"], "running", "{doc}");
    assert_eq!(primary(&doc).as_deref(), Some(format!("{name}-0").as_str()));
    let password = doc["secrets"]["password"].as_str().unwrap();
    connect(
        doc["balancer"]["port"].as_u64().unwrap(),
        "app",
        password,
        "app",
    )
    .await
    .batch_execute("CREATE TABLE ledger (id int PRIMARY KEY)")
    .await
    .unwrap();
    doc
}

/// `pg_is_in_recovery()` of the instance published on host port `port`, asked for up to about
/// 20 s; `None` when it never answered.
pub async fn in_recovery(port: u64, superuser: &str) -> Option<bool> {
    // A busy machine may take longer than one attempt's bound to answer.
    for _ in 0..8 {
        let answer = async {
            try_connect(port as u16, "postgres", superuser, "postgres")
                .await?
                .query_one("SELECT pg_is_in_recovery()", &[])
                .await
                .ok()
                .map(|r| r.get(0))
        };
        if let Some(recovering) = answer.await {
            return Some(recovering);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    None
}

/// One read through the balancer on a fresh connection; whether it answered.
pub async fn read(balancer: u16, password: &str) -> bool {
    let attempt = async {
        let c = try_connect(balancer, "app", password, "app").await?;
        c.query_one("SELECT count(*) FROM ledger", &[]).await.ok()
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(3), attempt).await,
        Ok(Some(_))
    )
}

/// A writer, a reader and the watcher running on one cluster.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    watcher: tokio::task::JoinHandle<usize>,
    ledger: Arc<Mutex<Ledger>>,
    writes: tokio::task::JoinHandle<()>,
    reads: tokio::task::JoinHandle<(usize, usize)>,
}

/// What the traffic saw once stopped.
pub struct Outcome {
    /// Every write attempted.
    pub ledger: Ledger,
    /// The most instances seen accepting writes at once.
    pub most_writable: usize,
    /// Reads attempted and reads that failed.
    pub reads: (usize, usize),
}

impl Outcome {
    pub fn failed_writes(&self) -> usize {
        self.ledger.iter().filter(|w| !w.2).count()
    }
}

impl Traffic {
    /// Starts the traffic on cluster `name` and returns once writes go through.
    pub async fn start(name: &'static str, balancer: u16, password: &str, superuser: &str) -> Self {
        Self::start_from(name, balancer, password, superuser, 1).await
    }

    /// [`Traffic::start`] with the writer's ids from `first_id` on.
    pub async fn start_from(
        name: &'static str,
        balancer: u16,
        password: &str,
        superuser: &str,
        first_id: i32,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let watcher = watch_writable(name, superuser.to_owned(), stop.clone());
        let ledger = Arc::new(Mutex::new(Ledger::new()));
        let writes = writer(
            balancer,
            password.to_owned(),
            stop.clone(),
            ledger.clone(),
            first_id,
        );
        let reads = {
            let (stop, password) = (stop.clone(), password.to_owned());
            tokio::spawn(async move {
                let (mut tried, mut failed) = (0, 0);
                for _ in 0..4000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    tried += 1;
                    if !read(balancer, &password).await {
                        failed += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                (tried, failed)
            })
        };
        let started = Instant::now();
        let before = eventually(30, || async { acked_since(&ledger, started) >= 10 }).await;
        assert!(before, "writes through the balancer do not go through");
        Traffic {
            stop,
            watcher,
            ledger,
            writes,
            reads,
        }
    }

    /// Acknowledged writes started after `since`.
    pub fn acked_since(&self, since: Instant) -> usize {
        acked_since(&self.ledger, since)
    }

    /// Stops everything and returns what was seen.
    pub async fn finish(self) -> Outcome {
        self.stop.store(true, Ordering::Relaxed);
        self.writes.await.unwrap();
        let reads = self.reads.await.unwrap();
        let most_writable = self.watcher.await.unwrap();
        let ledger = std::mem::take(&mut *self.ledger.lock().unwrap());
        Outcome {
            ledger,
            most_writable,
            reads,
        }
    }
}

/// `docker <how> <name>-0`, then waits (at most 60 s) for the status to name another
/// primary; that status document.
pub async fn lose_primary(s: &Scenario, name: &str, how: &[&str]) -> Value {
    let old = format!("{name}-0");
    assert!(!docker(&[how, &[old.as_str()]].concat()).is_empty());
    let (moved, doc) = status_until(s, name, 60, |d| primary(d).is_some_and(|p| p != old)).await;
    assert!(
        moved,
        "no new primary 60 s after the old one stopped: {doc}"
    );
    doc
}
