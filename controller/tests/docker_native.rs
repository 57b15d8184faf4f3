//! The native balancer engine on the real Docker engine, against real PostgreSQL (one primary,
//! two streaming replicas): `pgbench` in the simple, extended and prepared protocols,
//! select-only and TPC-B, each run through the balancer and the same run direct to the
//! primary, with the same outcome; reads spread over the replicas; a session reads its own
//! writes; transactions, errors in the extended protocol, prepared statements moved between
//! servers, session settings, temporary tables, COPY both ways, cancel requests and a wrong
//! password behave as on one server; and a failover while a writer runs: writes resume through
//! the same balancer, which is not restarted, and nothing acknowledged is lost.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::traffic::*;
use common::*;
use serde_json::Value;
use tokio_postgres::NoTls;

const NAME: &str = "it-native";

/// `pgbench` against 127.0.0.1:`port`; whether it succeeded with no failed transaction, and
/// its tps.
fn pgbench(port: u16, password: &str, args: &[&str]) -> (bool, f64, String) {
    let out = Command::new("pgbench")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "app"])
        .args(args)
        .arg("app")
        .env("PGPASSWORD", password)
        // Plain text on every path, as the engine speaks to the servers.
        .env("PGSSLMODE", "disable")
        .output()
        .expect("run pgbench");
    let report = text(&out);
    let processed = report
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.split('/').next())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let failed = report
        .lines()
        .find_map(|l| l.strip_prefix("number of failed transactions: "))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(u64::MAX);
    let tps = report
        .lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    (
        out.status.success() && processed > 0 && failed == 0,
        tps,
        report,
    )
}

/// `SHOW POOL_NODES` through the balancer: (role, select count) per node.
async fn pool_nodes(balancer: u16, password: &str) -> Vec<(String, u64)> {
    pool_node_columns(balancer as u64, password, &["role", "select_cnt"])
        .await
        .into_iter()
        .map(|r| (r[0].clone(), r[1].parse().unwrap_or(0)))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_native_engine_serves_like_one_server_and_follows_a_failover() {
    let s = Scenario::new(NAME);
    let doc =
        up_with_ledger_spec(&s, NAME, "  replicas: 2\n  balancer:\n    engine: native\n").await;
    let Access {
        password,
        superuser,
        balancer,
    } = access(&doc);
    let primary_port = port(&doc["primary"]) as u16;
    let (ready, doc) = status_until(&s, NAME, 120, |d| {
        d["phase"] == "Running"
            && d["replicas"].as_array().is_some_and(|r| {
                r.len() == 2 && r.iter().all(|r| r["balancerNode"]["status"] == "up")
            })
    })
    .await;
    assert!(
        ready,
        "the native balancer never saw both replicas up: {doc}"
    );

    pgbench_through_the_balancer_and_direct(&doc, balancer, primary_port, &password).await;
    let nodes = pool_nodes(balancer, &password).await;
    let standby_reads: Vec<u64> = nodes
        .iter()
        .filter(|(role, _)| role == "standby")
        .map(|(_, n)| *n)
        .collect();
    assert_eq!(standby_reads.len(), 2, "{nodes:?}");
    assert!(
        standby_reads.iter().all(|n| *n > 0),
        "reads did not reach every replica: {nodes:?}"
    );
    eprintln!("MEASURED select counts per node after pgbench: {nodes:?}");

    one_server_semantics(balancer, &password).await;
    a_write_after_a_flush_moves_to_the_primary(balancer, &password).await;
    a_bound_setting_never_run_sets_nothing(balancer, &password).await;
    a_server_ending_a_connection_fails_only_its_query(&doc, balancer, &password, &superuser).await;
    driver_suite_passes_as_direct(primary_port, balancer, &superuser).await;
    wrong_password_is_refused(balancer).await;
    scale_under_readers(&s, balancer, &password).await;
    failover_under_a_writer(&s, balancer, &password, &superuser).await;
    switchover_under_a_writer(&s, balancer, &password, &superuser).await;
    assert_success(&s.pgbalancer(&["down", NAME]));
}

/// A `SET` bound but never executed makes no setting: it is not replayed on the other
/// servers the session reads from (only running its portal would have set it).
async fn a_bound_setting_never_run_sets_nothing(balancer: u16, password: &str) {
    use common::raw::{self, Raw};
    let mut session = Raw::connect(balancer, "app", password, "app").await;
    session
        .send(&raw::bind("SET application_name = 'bound-only'"))
        .await;
    session.send(&raw::sync()).await;
    let got = session.until(b'Z').await;
    assert_eq!(raw::tags(&got), "12Z");
    for _ in 0..20 {
        session
            .send(&raw::query("SELECT current_setting('application_name')"))
            .await;
        let got = session.until(b'Z').await;
        let name = raw::first_values(&got);
        assert_eq!(name.len(), 1, "{}", raw::tags(&got));
        assert_ne!(name[0].as_deref(), Some("bound-only"));
    }
}

/// A batch that a `Flush` sent to a replica (it began with a read) and that goes on with a
/// write: the write runs on the primary, and the client sees one answer per message and one
/// `ReadyForQuery` for its `Sync`, as on one server, also with batches pipelined before it on
/// the same replica. When the replica's part failed, the rest of the batch is skipped, as a
/// server skips to `Sync` after an error, and nothing of it runs; an error of a batch before
/// it does not count.
async fn a_write_after_a_flush_moves_to_the_primary(balancer: u16, password: &str) {
    use common::raw::{self, Raw};
    let mut c = connect(balancer as u64, "app", password, "app").await;
    c.batch_execute("CREATE TABLE flushed (v int)")
        .await
        .unwrap();
    let on_replica = "SELECT pg_is_in_recovery()";
    let fails_on_replica = "SELECT CASE WHEN pg_is_in_recovery() THEN 1/0 ELSE 0 END";
    // A new session whose first unit, `sql` and a Flush, ran on a replica: `true` where only
    // a replica answers `t`, or an error where only a replica fails.
    let replica_session = |sql: &'static str| async move {
        for _ in 0..50 {
            let mut session = Raw::connect(balancer, "app", password, "app").await;
            session.send(&raw::run(sql)).await;
            session.send(&raw::flush()).await;
            let mut got = Vec::new();
            while !got
                .last()
                .is_some_and(|m: &(u8, Vec<u8>)| m.0 == b'C' || m.0 == b'E')
            {
                got.push(session.recv().await);
            }
            let ran_on_replica = match got.last() {
                Some((b'E', body)) => raw::error_text(body).starts_with("22012"),
                _ => raw::first_values(&got) == [Some("t".to_owned())],
            };
            if ran_on_replica {
                return session;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no new session ran {sql} on a replica in 50 tries")
    };
    let errors = |got: &[(u8, Vec<u8>)]| -> Vec<String> {
        got.iter()
            .filter(|m| m.0 == b'E')
            .map(|m| raw::error_text(&m.1))
            .collect()
    };
    let in_step = |mut session: Raw, n: i32| async move {
        session.send(&raw::query(&format!("SELECT {n}"))).await;
        let got = session.until(b'Z').await;
        assert_eq!(
            raw::first_values(&got),
            [Some(n.to_string())],
            "{}",
            raw::tags(&got)
        );
    };

    // Read on a replica, Flush, then a write and Sync.
    let mut session = replica_session(on_replica).await;
    session
        .send(&raw::run(
            "INSERT INTO flushed VALUES (1) RETURNING pg_is_in_recovery()",
        ))
        .await;
    session.send(&raw::sync()).await;
    let got = session.until(b'Z').await;
    assert_eq!(
        raw::tags(&got),
        "12DCZ",
        "the write after a Flush: {:?}",
        errors(&got)
    );
    assert_eq!(raw::first_values(&got), [Some("f".to_owned())]);
    assert_eq!(got.last().map(|m| m.1.clone()), Some(vec![b'I']));
    in_step(session, 42).await;

    // The replica's part failed: the write after the Flush is skipped, its Sync answered.
    let mut session = replica_session(fails_on_replica).await;
    session
        .send(&raw::run("INSERT INTO flushed VALUES (2)"))
        .await;
    session.send(&raw::sync()).await;
    let got = session.until(b'Z').await;
    assert_eq!(
        raw::tags(&got),
        "Z",
        "after a failed part, only the Sync is answered"
    );
    in_step(session, 43).await;

    // Pipelined on one replica, sent at once: a failing batch, a read batch with a Flush, and
    // the write ending that batch. Only the first fails (at Bind: its plan divides by zero);
    // each Sync gets one ReadyForQuery.
    let mut session = replica_session(on_replica).await;
    session.send(&raw::sync()).await;
    assert_eq!(raw::tags(&session.until(b'Z').await), "Z");
    let mut pipeline = raw::run(fails_on_replica);
    pipeline.extend_from_slice(&raw::sync());
    pipeline.extend_from_slice(&raw::run(on_replica));
    pipeline.extend_from_slice(&raw::flush());
    pipeline.extend_from_slice(&raw::run("INSERT INTO flushed VALUES (3) RETURNING 3"));
    pipeline.extend_from_slice(&raw::sync());
    session.send(&pipeline).await;
    let mut got = session.until(b'Z').await;
    got.extend(session.until(b'Z').await);
    assert_eq!(raw::tags(&got), "1EZ12DC12DCZ", "{:?}", errors(&got));
    assert!(errors(&got)[0].starts_with("22012"), "{:?}", errors(&got));
    assert_eq!(
        raw::first_values(&got),
        [Some("t".to_owned()), Some("3".to_owned())]
    );
    in_step(session, 44).await;

    let txn = c.transaction().await.unwrap();
    let rows: Vec<i32> = txn
        .query("SELECT v FROM flushed ORDER BY v", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    txn.commit().await.unwrap();
    assert_eq!(
        rows,
        [1, 3],
        "each write after a Flush ran once, the skipped one not at all"
    );
    c.batch_execute("DROP TABLE flushed").await.unwrap();
}

/// The process id of the server process running this query, and whether that server is a
/// replica. Not `pg_backend_pid()`: a session calling it is pinned to the primary.
const OWN_PID_AND_ROLE: &str = "SELECT pid, pg_is_in_recovery() FROM pg_stat_activity \
     WHERE query LIKE '%own-pid-and-role%' AND state = 'active'";

/// A replica ending a session's connection (its backend terminated by an administrator, as a
/// shutdown does) fails only the query running there, as an `ERROR` with the server's code:
/// the session goes on. A connection ended while the session did not use it fails nothing:
/// the next read goes to a new one.
async fn a_server_ending_a_connection_fails_only_its_query(
    doc: &Value,
    balancer: u16,
    password: &str,
    superuser: &str,
) {
    let replicas: Vec<u64> = doc["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .map(port)
        .collect();
    let c = connect(balancer as u64, "app", password, "app").await;
    c.batch_execute("SET application_name = 'ended-by-server'")
        .await
        .unwrap();
    let row = c.query_one(OWN_PID_AND_ROLE, &[]).await.unwrap();
    let (pid, on_replica): (i32, bool) = (row.get(0), row.get(1));
    assert!(on_replica, "a fresh session's read did not go to a replica");
    let sleeper = {
        let c = connect(balancer as u64, "app", password, "app").await;
        tokio::spawn(async move {
            c.batch_execute("SET application_name = 'ended-by-server'")
                .await
                .unwrap();
            let e = c.simple_query("SELECT pg_sleep(30)").await;
            let after = c
                .query_one("SELECT 1", &[])
                .await
                .map(|r| r.get::<_, i32>(0));
            (e.map(|_| ()), after)
        })
    };
    let mut admins = Vec::new();
    for replica in &replicas {
        admins.push(connect(*replica, "postgres", superuser, "postgres").await);
    }
    // Until the sleep runs on a replica.
    let sleeping = || async {
        for admin in &admins {
            let running = admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = \
                     'ended-by-server' AND state = 'active' AND query LIKE 'SELECT pg_sleep%'",
                    &[],
                )
                .await
                .is_ok_and(|r| r.get::<_, i64>(0) > 0);
            if running {
                return true;
            }
        }
        false
    };
    assert!(
        eventually(30, sleeping).await,
        "the sleep never ran on a replica"
    );
    // Every backend of these sessions on the replicas: the idle one and the running sleep.
    let mut ended = 0;
    for admin in &admins {
        let n: i64 = admin
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE application_name = 'ended-by-server'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        ended += n;
    }
    assert!(ended >= 2, "{ended} backends terminated");
    let (slept, after) = tokio::time::timeout(Duration::from_secs(20), sleeper)
        .await
        .expect("the query on the ended connection did not end")
        .unwrap();
    let e = slept.expect_err("the query on the ended connection succeeded");
    let db = e.as_db_error().unwrap_or_else(|| panic!("{e:?}"));
    assert_eq!(
        (db.severity(), db.code().code()),
        ("ERROR", "57P01"),
        "{db:?}"
    );
    assert_eq!(
        after.expect("the session ended with its server connection"),
        1
    );
    // The idle session's server process is gone (it said so and closed its connection on the
    // way out): its next reads go to a new connection, none fails.
    let gone = eventually(60, || async {
        let mut left = 0;
        for replica in &replicas {
            let admin = connect(*replica, "postgres", superuser, "postgres").await;
            let n: i64 = admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
                    &[&pid],
                )
                .await
                .unwrap()
                .get(0);
            left += n;
        }
        left == 0
    })
    .await;
    assert!(gone, "the terminated backend {pid} did not end");
    for _ in 0..10 {
        let row = c
            .query_one(OWN_PID_AND_ROLE, &[])
            .await
            .expect("a read after the idle connection was ended by its server");
        assert_ne!(row.get::<_, i32>(0), pid, "the ended connection answered");
        assert!(
            row.get::<_, bool>(1),
            "the read after it did not run on a replica"
        );
    }
}

async fn pgbench_through_the_balancer_and_direct(
    doc: &Value,
    balancer: u16,
    primary: u16,
    password: &str,
) {
    let (ok, _, report) = pgbench(primary, password, &["-i", "-s", "2", "-q"]);
    assert!(
        report.contains("done in"),
        "pgbench -i failed (ok={ok}): {report}"
    );
    // The replicas have the tables before reads may go there.
    for r in doc["replicas"].as_array().unwrap() {
        let replica = port(r);
        let replayed = eventually(60, || async {
            let Some(c) = try_connect(replica as u16, "app", password, "app").await else {
                return false;
            };
            c.query_one("SELECT count(*) FROM pgbench_accounts", &[])
                .await
                .is_ok_and(|row| row.get::<_, i64>(0) == 200_000)
        })
        .await;
        assert!(
            replayed,
            "replica on port {replica} never had the pgbench tables"
        );
    }
    for mode in ["simple", "extended", "prepared"] {
        for (script, extra) in [("select-only", &["-S"][..]), ("tpcb", &[][..])] {
            let mut args = vec!["-n", "-c", "4", "-j", "2", "-T", "3", "-M", mode];
            args.extend_from_slice(extra);
            let (direct_ok, direct_tps, direct_report) = pgbench(primary, password, &args);
            let (ok, tps, report) = pgbench(balancer, password, &args);
            assert!(direct_ok, "direct {mode} {script} failed: {direct_report}");
            assert!(
                ok,
                "through the native balancer, {mode} {script} failed: {report}"
            );
            eprintln!(
                "MEASURED pgbench {mode} {script}: direct {direct_tps:.0} tps, native {tps:.0} tps ({:.2}x)",
                tps / direct_tps.max(1.0)
            );
        }
    }
}

async fn one_server_semantics(balancer: u16, password: &str) {
    let c = connect(balancer as u64, "app", password, "app").await;

    // A session reads its own writes, every time, right after each commit.
    c.batch_execute("CREATE TABLE ryw (id int PRIMARY KEY)")
        .await
        .unwrap();
    for id in 0..300 {
        c.execute("INSERT INTO ryw VALUES ($1)", &[&id])
            .await
            .unwrap();
        let seen: i64 = c
            .query_one("SELECT count(*) FROM ryw WHERE id = $1", &[&id])
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            seen, 1,
            "write {id} not seen by the next read of its session"
        );
    }

    // The same with the read pipelined behind the write (sent before the write's answer):
    // with both statements prepared, each query is sent when its future is first polled, in
    // the order `join!` polls them.
    let insert = c.prepare("INSERT INTO ryw VALUES ($1)").await.unwrap();
    let count = c
        .prepare("SELECT count(*) FROM ryw WHERE id = $1")
        .await
        .unwrap();
    for id in 300..400 {
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
        let (wrote, seen) = tokio::join!(c.execute(&insert, &params), c.query_one(&count, &params));
        wrote.unwrap();
        let seen: i64 = seen.unwrap().get(0);
        assert_eq!(
            seen, 1,
            "write {id} not seen by the read pipelined behind it"
        );
    }

    // A transaction stays on one server: it sees its own uncommitted rows.
    c.batch_execute("BEGIN; INSERT INTO ryw VALUES (1000)")
        .await
        .unwrap();
    let inside: i64 = c
        .query_one("SELECT count(*) FROM ryw WHERE id = 1000", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(inside, 1, "a read inside a transaction left it");
    c.batch_execute("ROLLBACK").await.unwrap();

    // A read-only transaction sees the session's writes; a write inside it fails as on one
    // server and the session goes on.
    for id in 2000..2050 {
        c.execute("INSERT INTO ryw VALUES ($1)", &[&id])
            .await
            .unwrap();
        c.batch_execute("BEGIN READ ONLY").await.unwrap();
        let seen: i64 = c
            .query_one("SELECT count(*) FROM ryw WHERE id = $1", &[&id])
            .await
            .unwrap()
            .get(0);
        c.batch_execute("COMMIT").await.unwrap();
        assert_eq!(seen, 1, "write {id} not seen by a read-only transaction");
    }
    c.batch_execute("BEGIN READ ONLY").await.unwrap();
    let e = c
        .execute("INSERT INTO ryw VALUES (2100)", &[])
        .await
        .unwrap_err();
    assert_eq!(e.as_db_error().unwrap().code().code(), "25006", "{e}");
    c.batch_execute("ROLLBACK").await.unwrap();
    c.execute("INSERT INTO ryw VALUES (2100)", &[])
        .await
        .unwrap();

    // An error in the extended protocol leaves the session usable.
    let e = c.query("SELECT 1/0", &[]).await.unwrap_err();
    assert_eq!(e.as_db_error().unwrap().code().code(), "22012");
    let one: i32 = c.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);

    // A prepared statement runs wherever the reads go (prepared again where missing).
    let st = c.prepare("SELECT $1::int + 1").await.unwrap();
    for i in 0..50 {
        let v: i32 = c.query_one(&st, &[&i]).await.unwrap().get(0);
        assert_eq!(v, i + 1);
    }

    // Session settings follow the reads.
    c.batch_execute("SET application_name = 'native-test'")
        .await
        .unwrap();
    for _ in 0..20 {
        let name: String = c
            .query_one("SELECT current_setting('application_name')", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(name, "native-test");
    }

    // A temporary table pins the session where it lives.
    c.batch_execute("CREATE TEMP TABLE scratch (v int); INSERT INTO scratch VALUES (7)")
        .await
        .unwrap();
    for _ in 0..20 {
        let v: i32 = c
            .query_one("SELECT v FROM scratch", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(v, 7);
    }

    // COPY in and out.
    let c2 = connect(balancer as u64, "app", password, "app").await;
    {
        use futures::SinkExt;
        let sink = c2.copy_in("COPY ryw (id) FROM STDIN").await.unwrap();
        let mut sink = std::pin::pin!(sink);
        sink.send(bytes::Bytes::from_static(b"5001\n5002\n5003\n"))
            .await
            .unwrap();
        assert_eq!(sink.as_mut().finish().await.unwrap(), 3);
    }
    {
        use futures::StreamExt;
        let stream = c2
            .copy_out("COPY (SELECT id FROM ryw WHERE id > 5000 ORDER BY id) TO STDOUT")
            .await
            .unwrap();
        let chunks: Vec<_> = stream.collect().await;
        let text: String = chunks
            .into_iter()
            .map(|c| String::from_utf8(c.unwrap().to_vec()).unwrap())
            .collect();
        assert_eq!(text, "5001\n5002\n5003\n");
    }

    // A cancel request reaches the server running the query.
    let token = c2.cancel_token();
    let started = Instant::now();
    let mut sleeper = tokio::spawn(async move { c2.simple_query("SELECT pg_sleep(30)").await });
    // Sent again until the query ends: one sent before the query reached its server is
    // ignored there.
    let cancelled = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            token.cancel_query(NoTls).await.unwrap();
            if let Ok(ended) = tokio::time::timeout(Duration::from_secs(2), &mut sleeper).await {
                return ended;
            }
        }
    })
    .await
    .expect("the cancelled query did not end")
    .unwrap()
    .unwrap_err();
    assert_eq!(
        cancelled.as_db_error().unwrap().code().code(),
        "57014",
        "{cancelled}"
    );
    eprintln!(
        "MEASURED cancel: the query ended {:.1} s after it started",
        started.elapsed().as_secs_f64()
    );
}

/// Where `tests/driver/setup.sh` keeps psycopg2's suite and its Python environment.
fn driver_dir() -> std::path::PathBuf {
    std::env::var_os("PGBALANCER_DRIVER_DIR")
        .map(Into::into)
        .unwrap_or_else(|| "/var/cache/pgbalancer/psycopg2".into())
}

/// Runs psycopg2's suite (or the given tests of it) as the superuser against 127.0.0.1:`port`;
/// the ids of the tests that failed, and how many ran.
fn driver_suite(port: u16, superuser: &str, only: &[String]) -> (Vec<String>, u64) {
    let dir = driver_dir();
    let source = dir.join("psycopg2-2.9.10");
    assert!(
        source.join("tests").is_dir(),
        "psycopg2's suite is not in {}: run tests/driver/setup.sh",
        dir.display()
    );
    let runner = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/driver/run.py");
    let out = Command::new(dir.join("venv/bin/python"))
        .arg(runner)
        .args(only)
        .current_dir(&source)
        .env("PSYCOPG2_TESTDB", "psycopg2_test")
        .env("PSYCOPG2_TESTDB_HOST", "127.0.0.1")
        .env("PSYCOPG2_TESTDB_PORT", port.to_string())
        .env("PSYCOPG2_TESTDB_USER", "postgres")
        .env("PSYCOPG2_TESTDB_PASSWORD", superuser)
        .output()
        .expect("run psycopg2's suite");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ran = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("psycopg2's suite did not report: {}", text(&out)));
    let failed = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("FAILED "))
        .map(str::to_owned)
        .collect();
    (failed, ran)
}

/// psycopg2's own suite passes through the native engine as it passes direct: every test that
/// fails only through the balancer is run again both ways, and must be a timing flake.
async fn driver_suite_passes_as_direct(primary: u16, balancer: u16, superuser: &str) {
    connect(primary as u64, "postgres", superuser, "postgres")
        .await
        .batch_execute("CREATE DATABASE psycopg2_test")
        .await
        .unwrap();
    let (direct, ran_direct) = driver_suite(primary, superuser, &[]);
    let (native, ran_native) = driver_suite(balancer, superuser, &[]);
    eprintln!(
        "MEASURED psycopg2's suite: direct {ran_direct} run, {} failed {direct:?}; native {ran_native} run, {} failed {native:?}",
        direct.len(),
        native.len()
    );
    assert!(
        ran_direct > 500 && ran_native == ran_direct,
        "the suite did not run whole"
    );
    let only_native: Vec<String> = native.into_iter().filter(|t| !direct.contains(t)).collect();
    let mut regressions = Vec::new();
    for t in &only_native {
        let again_native = driver_suite(balancer, superuser, std::slice::from_ref(t)).0;
        let again_direct = driver_suite(primary, superuser, std::slice::from_ref(t)).0;
        if !again_native.is_empty() && again_direct.is_empty() {
            regressions.push(t.clone());
        }
    }
    assert!(
        regressions.is_empty(),
        "psycopg2 tests that fail only through the native balancer: {regressions:?}"
    );
}

async fn wrong_password_is_refused(balancer: u16) {
    let e = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(balancer)
        .user("app")
        .password("not-the-password")
        .dbname("app")
        .connect(NoTls)
        .await
        .err()
        .expect("a wrong password was accepted");
    assert_eq!(e.as_db_error().unwrap().code().code(), "28P01", "{e}");
}

/// Scaling up and back down while `pgbench` reads through the engine (back-to-back 3 s
/// runs over the whole change): every transaction succeeds (a replica is drained from the
/// balancer before it is removed).
async fn scale_under_readers(s: &Scenario, balancer: u16, password: &str) {
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, password) = (stop.clone(), password.to_owned());
        std::thread::spawn(move || {
            let mut runs = Vec::new();
            // Bounded: at most 100 runs of 3 s.
            for _ in 0..100 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let args = ["-n", "-S", "-c", "4", "-j", "2", "-T", "3"];
                runs.push(pgbench(balancer, &password, &args));
            }
            runs
        })
    };
    let replicas_up = |n: usize| {
        move |d: &Value| {
            d["phase"] == "Running"
                && d["replicas"].as_array().is_some_and(|r| {
                    r.len() == n && r.iter().all(|r| r["balancerNode"]["status"] == "up")
                })
        }
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_success(&s.pgbalancer(&["scale", NAME, "--replicas", "3"]));
    let (up, doc) = status_until(s, NAME, 120, replicas_up(3)).await;
    assert!(up, "the third replica was never routed to: {doc}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_success(&s.pgbalancer(&["scale", NAME, "--replicas", "2"]));
    let (down, doc) = status_until(s, NAME, 120, replicas_up(2)).await;
    assert!(down, "not back to two replicas: {doc}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    let runs = reader.join().expect("the reader thread");
    assert!(runs.len() >= 3, "too few pgbench runs: {}", runs.len());
    for (ok, _, report) in &runs {
        assert!(ok, "reads failed while scaling: {report}");
    }
    let tps: Vec<String> = runs.iter().map(|r| format!("{:.0}", r.1)).collect();
    eprintln!(
        "MEASURED pgbench -S in 3 s runs during scale 2 -> 3 -> 2 through the native engine: {} runs, none failed; tps {tps:?}",
        runs.len()
    );
}

async fn failover_under_a_writer(s: &Scenario, balancer: u16, password: &str, superuser: &str) {
    let ids_before = container_ids(NAME);
    let traffic = Traffic::start(NAME, balancer, password, superuser).await;
    let stopped_at = Instant::now();
    let doc = lose_primary(s, NAME, &["stop"]).await;
    let resumed = eventually(60, || async { traffic.acked_since(stopped_at) >= 10 }).await;
    let outcome = traffic.finish().await;
    assert!(resumed, "writes through the native balancer did not resume");
    assert!(
        outcome.most_writable <= 1,
        "two instances accepted writes at once"
    );
    // The status names the new primary before it has observed its port: wait for that.
    let (seen, doc) = status_until(s, NAME, 60, |d| {
        primary(d) == primary(&doc) && d["primary"]["port"].is_u64()
    })
    .await;
    assert!(seen, "the new primary's port never showed: {doc}");
    acknowledged_writes_present(port(&doc["primary"]), password, &outcome.ledger).await;
    assert_eq!(
        container_ids(NAME),
        ids_before,
        "the failover recreated containers (the balancer was restarted)"
    );
    eprintln!(
        "MEASURED native failover: writes failed for {:.1} s, {} failed writes",
        write_gap(&outcome.ledger).as_secs_f64(),
        outcome.failed_writes()
    );
}

/// A planned switchover with the native engine: node changes go through the agent, as with
/// pgpool. The command succeeds, writes resume on the new primary, nothing acknowledged is
/// lost, and the old primary comes back as a replica the engine routes to.
async fn switchover_under_a_writer(s: &Scenario, balancer: u16, password: &str, superuser: &str) {
    let settled = |d: &Value| {
        d["phase"] == "Running"
            && d["replicas"]
                .as_array()
                .is_some_and(|r| r.iter().all(|r| r["balancerNode"]["status"] == "up"))
    };
    let (ready, before) = status_until(s, NAME, 120, settled).await;
    assert!(ready, "not settled after the failover: {before}");
    let old = primary(&before).expect("a primary");
    let ids_before = container_ids(NAME);
    // Ids past the failover's writer's, so that no write fails as a duplicate.
    let traffic = Traffic::start_from(NAME, balancer, password, superuser, 1_000_000).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let at = Instant::now();
    let out = s.pgbalancer(&["switchover", NAME]);
    assert_success(&out);
    let resumed = eventually(60, || async { traffic.acked_since(at) >= 10 }).await;
    let outcome = traffic.finish().await;
    assert!(resumed, "writes did not resume after the switchover");
    assert!(
        outcome.most_writable <= 1,
        "two instances accepted writes at once"
    );
    let (back, doc) = status_until(s, NAME, 120, |d| {
        settled(d)
            && primary(d).is_some_and(|p| p != old)
            && d["replicas"]
                .as_array()
                .is_some_and(|r| r.iter().any(|r| r["name"] == old.as_str()))
    })
    .await;
    assert!(
        back,
        "the old primary {old} is not a replica up in the balancer: {doc}"
    );
    acknowledged_writes_present(port(&doc["primary"]), password, &outcome.ledger).await;
    assert_eq!(
        container_ids(NAME),
        ids_before,
        "a switchover recreated containers"
    );
    eprintln!(
        "MEASURED native switchover: writes failed for {:.1} s, {} failed writes",
        write_gap(&outcome.ledger).as_secs_f64(),
        outcome.failed_writes()
    );
}
