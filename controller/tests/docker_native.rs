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
    wrong_password_is_refused(balancer).await;
    failover_under_a_writer(&s, balancer, &password, &superuser).await;
    assert_success(&s.pgbalancer(&["down", NAME]));
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
    let sleeper = tokio::spawn(async move { c2.simple_query("SELECT pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    token.cancel_query(NoTls).await.unwrap();
    let cancelled = tokio::time::timeout(Duration::from_secs(20), sleeper)
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
