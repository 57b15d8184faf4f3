//! Read-only transactions on a replica through the native engine
//! (`readOnlyTransactions: replica`), on the real Docker engine and real PostgreSQL (one
//! primary, one streaming replica): `BEGIN READ ONLY` and `START TRANSACTION READ ONLY` run on
//! the replica in both protocols, other transactions (`SERIALIZABLE`, `DEFERRABLE`, read-write,
//! after an isolation setting) on the primary; a session reads its own writes in them; what a
//! replica cannot run as the primary would (writes, session state, advisory locks, unknown
//! functions) fails with `25006` and leaves the transaction failed on the server as the
//! client is told, in a simple query, an extended batch, after a `Flush` and pipelined; and
//! pgbench's read-only transactions in all three protocols fail nothing. Without the setting,
//! read-only transactions run on the primary.

mod common;

use std::process::Command;

use common::raw::{self, Raw};
use common::traffic::*;
use common::*;
use tokio_postgres::Client;

const NAME: &str = "it-rotxn";
const PLUS_ONE: &str = "SELECT $1::int + 1, pg_is_in_recovery()";

/// Whether the statement after `begin`, in the transaction it opens, ran on a replica.
async fn on_replica(c: &Client, begin: &str) -> bool {
    c.batch_execute(begin).await.unwrap();
    let replica: bool = in_recovery_now(c).await;
    c.batch_execute("COMMIT").await.unwrap();
    replica
}

/// Whether the server running this session's next statement is a replica.
async fn in_recovery_now(c: &impl tokio_postgres::GenericClient) -> bool {
    c.query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0)
}

/// The SQLSTATE and message of a failed statement.
fn code(e: &tokio_postgres::Error) -> (String, String) {
    let db = e
        .as_db_error()
        .unwrap_or_else(|| panic!("not a server error: {e}"));
    (db.code().code().to_owned(), db.message().to_owned())
}

/// Runs `pgbench` through the balancer; whether it succeeded, and its output.
fn pgbench(balancer: u16, password: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new("pgbench")
        .args(["-h", "127.0.0.1", "-p", &balancer.to_string(), "-U", "app"])
        .args(args)
        .arg("app")
        .env("PGPASSWORD", password)
        .output()
        .expect("run pgbench");
    (out.status.success(), text(&out))
}

#[tokio::test(flavor = "multi_thread")]
async fn read_only_transactions_run_on_a_replica_and_refuse_what_it_cannot_run() {
    let s = Scenario::new(NAME);
    let spec =
        "  replicas: 1\n  balancer:\n    engine: native\n    readOnlyTransactions: replica\n";
    let doc = up_with_ledger_spec(&s, NAME, spec).await;
    let Access {
        password, balancer, ..
    } = access(&doc);
    let (ready, doc) = status_until(&s, NAME, 120, |d| {
        d["replicas"][0]["balancerNode"]["status"] == "up"
    })
    .await;
    assert!(ready, "the balancer never saw the replica up: {doc}");
    let c = connect(balancer as u64, "app", &password, "app").await;

    // Where transactions run.
    for begin in [
        "BEGIN READ ONLY",
        "start transaction read only",
        "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY",
        "BEGIN READ ONLY NOT DEFERRABLE",
    ] {
        assert!(on_replica(&c, begin).await, "{begin} ran on the primary");
    }
    for begin in [
        "BEGIN",
        "BEGIN READ WRITE",
        "BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY",
        "BEGIN READ ONLY ISOLATION LEVEL SERIALIZABLE DEFERRABLE",
    ] {
        assert!(!on_replica(&c, begin).await, "{begin} ran on the replica");
    }
    // The extended protocol inside, and a statement prepared outside used inside.
    let prepared = c.prepare(PLUS_ONE).await.unwrap();
    for i in 0..3 {
        let mut c2 = connect(balancer as u64, "app", &password, "app").await;
        let txn = c2
            .build_transaction()
            .read_only(true)
            .start()
            .await
            .unwrap();
        let row = txn.query_one(PLUS_ONE, &[&i]).await.unwrap();
        assert_eq!((row.get::<_, i32>(0), row.get::<_, bool>(1)), (i + 1, true));
        txn.commit().await.unwrap();
        drop(c2);
        let row = c.query_one(&prepared, &[&i]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), i + 1);
    }
    c.batch_execute("BEGIN READ ONLY").await.unwrap();
    let row = c.query_one(&prepared, &[&7]).await.unwrap();
    assert_eq!((row.get::<_, i32>(0), row.get::<_, bool>(1)), (8, true));
    c.batch_execute("COMMIT").await.unwrap();

    // A session's setting is replayed on the replica; SET LOCAL runs there.
    c.batch_execute("SET application_name = 'rotxn-test'")
        .await
        .unwrap();
    c.batch_execute("BEGIN READ ONLY; SET LOCAL work_mem = '3MB'")
        .await
        .unwrap();
    let row = c
        .query_one(
            "SELECT current_setting('application_name'), current_setting('work_mem'), \
             pg_is_in_recovery()",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, String>(1), row.get(2)),
        ("rotxn-test".into(), "3MB".into(), true)
    );
    c.batch_execute("COMMIT").await.unwrap();

    // A cursor of the transaction, on the replica.
    let r0 = connect(balancer as u64, "app", &password, "app").await;
    r0.batch_execute(
        "BEGIN READ ONLY; DECLARE c CURSOR FOR SELECT pg_is_in_recovery() FROM generate_series(1, 3)",
    )
    .await
    .unwrap();
    let fetched: Vec<bool> = r0
        .query("FETCH 2 FROM c", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(fetched, [true, true]);
    r0.batch_execute("CLOSE c; COMMIT").await.unwrap();

    // The session reads its own writes in read-only transactions.
    let mut on_the_replica = 0;
    for id in 1..=40 {
        c.execute("INSERT INTO ledger VALUES ($1)", &[&id])
            .await
            .unwrap();
        if id % 4 == 0 {
            // Time for the replica to replay it: then it may hold the transaction.
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
        c.batch_execute("BEGIN READ ONLY").await.unwrap();
        let row = c
            .query_one(
                "SELECT count(*), pg_is_in_recovery() FROM ledger WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap();
        c.batch_execute("COMMIT").await.unwrap();
        assert_eq!(row.get::<_, i64>(0), 1, "write {id} not seen");
        on_the_replica += usize::from(row.get::<_, bool>(1));
    }
    eprintln!("MEASURED read-only transactions after a write that ran on the replica: {on_the_replica} of 40");

    // What the replica cannot run as the primary would fails with 25006, and the server's
    // transaction is failed as the client is told; ROLLBACK ends it. (A session that has
    // not written: its read-only transactions go to the replica at once.)
    c.batch_execute("CREATE FUNCTION app_fn() RETURNS int LANGUAGE sql AS 'SELECT 1'")
        .await
        .unwrap();
    let r = connect(balancer as u64, "app", &password, "app").await;
    for statement in [
        "INSERT INTO ledger VALUES (-1)",
        "SELECT pg_advisory_xact_lock(1)",
        "SELECT pg_advisory_lock(1)",
        "SET search_path = public",
        "CREATE TEMP TABLE scratch (a int)",
        "SELECT app_fn()",
        "LISTEN channel",
    ] {
        r.batch_execute("BEGIN READ ONLY").await.unwrap();
        let replica: bool = in_recovery_now(&r).await;
        assert!(
            replica,
            "the read-only transaction did not go to the replica"
        );
        let e = r.batch_execute(statement).await.unwrap_err();
        let (sqlstate, message) = code(&e);
        assert_eq!(sqlstate, "25006", "{statement}: {message}");
        assert!(
            message.contains("read-only transaction on a replica"),
            "{message}"
        );
        let e = r.batch_execute("SELECT 1").await.unwrap_err();
        assert_eq!(
            code(&e).0,
            "25P02",
            "{statement}: the server's transaction went on"
        );
        r.batch_execute("ROLLBACK").await.unwrap();
    }
    // The same in the extended protocol, then prepared statements still answer right.
    let mut c3 = connect(balancer as u64, "app", &password, "app").await;
    let txn = c3
        .build_transaction()
        .read_only(true)
        .start()
        .await
        .unwrap();
    let e = txn
        .execute("INSERT INTO ledger VALUES ($1)", &[&-2])
        .await
        .unwrap_err();
    assert_eq!(code(&e).0, "25006");
    txn.rollback().await.unwrap();
    let next = c3.prepare("SELECT $1::int * 2").await.unwrap();
    for i in 0..5 {
        assert_eq!(
            c3.query_one(&next, &[&i]).await.unwrap().get::<_, i32>(0),
            i * 2
        );
    }
    // The session's setting refused in the transaction was never recorded.
    let path: String = r.query_one("SHOW search_path", &[]).await.unwrap().get(0);
    assert_ne!(path, "public");
    // Outside a read-only transaction the same statements run.
    c.batch_execute("INSERT INTO ledger VALUES (-1)")
        .await
        .unwrap();
    assert_eq!(
        c.query_one("SELECT app_fn()", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        1
    );

    raw_protocol(balancer, &password).await;

    // An isolation setting keeps the session's read-only transactions on the primary, set in
    // a simple query or in the extended protocol.
    let c4 = connect(balancer as u64, "app", &password, "app").await;
    c4.batch_execute("SET default_transaction_isolation = 'repeatable read'")
        .await
        .unwrap();
    assert!(!on_replica(&c4, "BEGIN READ ONLY").await);
    let c5 = connect(balancer as u64, "app", &password, "app").await;
    c5.execute("SET default_transaction_isolation = 'serializable'", &[])
        .await
        .unwrap();
    assert!(!on_replica(&c5, "BEGIN READ ONLY").await);

    // Settings made in the extended protocol reach the replica too, repeated ones once.
    c.batch_execute("CREATE SCHEMA elsewhere; CREATE TABLE elsewhere.only_here (v int)")
        .await
        .unwrap();
    let (ready, doc) = status_until(&s, NAME, 30, |d| d["replicas"][0]["lagBytes"] == 0).await;
    assert!(ready, "{doc}");
    let e1 = connect(balancer as u64, "app", &password, "app").await;
    for name in ["a", "b", "a"] {
        e1.execute(&format!("SET application_name = '{name}'"), &[])
            .await
            .unwrap();
    }
    e1.execute("SET search_path = elsewhere", &[])
        .await
        .unwrap();
    let mut seen = None;
    for _ in 0..50 {
        let row = e1
            .query_one(
                "SELECT count(*), current_setting('application_name'), pg_is_in_recovery() \
                 FROM only_here",
                &[],
            )
            .await
            .unwrap();
        let got = (
            row.get::<_, i64>(0),
            row.get::<_, String>(1),
            row.get::<_, bool>(2),
        );
        if got.2 {
            seen = Some(got);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(seen, Some((0, "a".to_owned(), true)));
    // A setting pipelined behind a write that fails is recorded all the same.
    let e2 = connect(balancer as u64, "app", &password, "app").await;
    let (duplicate, set) = tokio::join!(
        e2.execute("INSERT INTO public.ledger VALUES (1)", &[]),
        e2.execute("SET search_path = elsewhere", &[])
    );
    assert_eq!(code(&duplicate.unwrap_err()).0, "23505");
    set.unwrap();
    let mut on_the_replica = false;
    for _ in 0..50 {
        let row = e2
            .query_one("SELECT count(*), pg_is_in_recovery() FROM only_here", &[])
            .await
            .unwrap();
        if row.get::<_, bool>(1) {
            on_the_replica = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(on_the_replica, "no read reached the replica");

    // A statement the replica must not run, only parsed in its transaction (a driver's
    // prepare): served, and it pins nothing: writes after the transaction go to the primary.
    let mut p1 = connect(balancer as u64, "app", &password, "app").await;
    let txn = p1
        .build_transaction()
        .read_only(true)
        .start()
        .await
        .unwrap();
    txn.prepare("SELECT pg_advisory_lock($1)").await.unwrap();
    let replica: bool = in_recovery_now(&txn).await;
    assert!(replica);
    txn.commit().await.unwrap();
    p1.execute("INSERT INTO ledger VALUES (-7)", &[])
        .await
        .unwrap();

    // pgbench: read-only transactions in the three protocols, none failed, on the replica.
    let (ok, out) = pgbench(balancer, &password, &["-i", "-s", "1", "-q"]);
    assert!(ok, "pgbench -i: {out}");
    let script = s.file(
        "read-only.sql",
        "\\set aid random(1, 100000 * :scale)\nBEGIN READ ONLY;\n\
         SELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n\
         SELECT count(*) FROM pgbench_branches;\nEND;\n",
    );
    let before = replica_selects(balancer, &password).await;
    for mode in ["simple", "extended", "prepared"] {
        let (ok, out) = pgbench(
            balancer,
            &password,
            &[
                "-n",
                "-M",
                mode,
                "-c",
                "4",
                "-j",
                "2",
                "-T",
                "3",
                "-f",
                script.to_str().unwrap(),
            ],
        );
        let none_failed = out
            .lines()
            .any(|l| l.starts_with("number of failed transactions: 0 "));
        assert!(ok && none_failed, "pgbench -M {mode}: {out}");
    }
    let after = replica_selects(balancer, &password).await;
    assert!(
        after > before + 100,
        "read-only transactions did not read on the replica: {before} -> {after}"
    );

    // Without the setting, read-only transactions run on the primary.
    let file = s.file(
        "c.yaml",
        &cluster_yaml(NAME, "  replicas: 1\n  balancer:\n    engine: native\n"),
    );
    assert_success(&s.pgbalancer(&["up", "-f", file.to_str().unwrap()]));
    let (ready, doc) = status_until(&s, NAME, 120, |d| {
        d["replicas"][0]["balancerNode"]["status"] == "up"
    })
    .await;
    assert!(ready, "{doc}");
    let balancer = doc["balancer"]["port"].as_u64().expect("balancer port") as u16;
    let c = connect(balancer as u64, "app", &password, "app").await;
    assert!(!on_replica(&c, "BEGIN READ ONLY").await);
    // Reads outside transactions still go to the replica (once the new balancer has it within
    // the lag bound).
    let mut replica = false;
    for _ in 0..100 {
        replica = in_recovery_now(&c).await;
        if replica {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(replica, "no read went to the replica");
    assert_success(&s.pgbalancer(&["down", NAME]));
}

/// The replica's select count, from `SHOW POOL_NODES` through the balancer.
async fn replica_selects(balancer: u16, password: &str) -> u64 {
    pool_node_columns(balancer as u64, password, &["role", "select_cnt"])
        .await
        .into_iter()
        .filter(|r| r[0] == "standby")
        .map(|r| r[1].parse::<u64>().unwrap_or(0))
        .sum()
}

/// Messages a driver does not send on its own: a refused write after a `Flush` in the
/// replica's transaction, and a write pipelined behind `BEGIN READ ONLY`.
async fn raw_protocol(balancer: u16, password: &str) {
    let errors = |got: &[(u8, Vec<u8>)]| -> Vec<String> {
        got.iter()
            .filter(|m| m.0 == b'E')
            .map(|m| raw::error_text(&m.1))
            .collect()
    };
    let mut session = Raw::connect(balancer, "app", password, "app").await;
    session.send(&raw::query("BEGIN READ ONLY")).await;
    let got = session.until(b'Z').await;
    assert_eq!(got.last().map(|m| m.1.clone()), Some(vec![b'T']));
    // A read, Flush: answered by the replica.
    session.send(&raw::run("SELECT pg_is_in_recovery()")).await;
    session.send(&raw::flush()).await;
    let got = session.until(b'C').await;
    assert_eq!(raw::first_values(&got), [Some("t".to_owned())]);
    // Then a write and Sync: refused as a whole (an error, then ReadyForQuery), the
    // transaction failed.
    session
        .send(&raw::run("INSERT INTO ledger VALUES (-3)"))
        .await;
    session.send(&raw::sync()).await;
    let got = session.until(b'Z').await;
    assert_eq!(raw::tags(&got), "EZ", "{:?}", errors(&got));
    assert!(errors(&got)[0].starts_with("25006"), "{:?}", errors(&got));
    assert_eq!(got.last().map(|m| m.1.clone()), Some(vec![b'E']));
    session.send(&raw::query("ROLLBACK")).await;
    let got = session.until(b'Z').await;
    assert_eq!(got.last().map(|m| m.1.clone()), Some(vec![b'I']));
    // Every message answered once afterwards.
    session.send(&raw::run("SELECT 5")).await;
    session.send(&raw::sync()).await;
    let got = session.until(b'Z').await;
    assert_eq!(raw::tags(&got), "12DCZ", "{:?}", errors(&got));
    assert_eq!(raw::first_values(&got), [Some("5".to_owned())]);

    // A write pipelined behind BEGIN READ ONLY (sent before its answer) is refused too.
    let mut pipeline = raw::query("BEGIN READ ONLY");
    pipeline.extend_from_slice(&raw::query("INSERT INTO ledger VALUES (-4)"));
    pipeline.extend_from_slice(&raw::query("ROLLBACK"));
    session.send(&pipeline).await;
    let mut got = session.until(b'Z').await;
    got.extend(session.until(b'Z').await);
    got.extend(session.until(b'Z').await);
    assert_eq!(raw::tags(&got), "CZEZCZ", "{:?}", errors(&got));
    assert!(errors(&got)[0].starts_with("25006"), "{:?}", errors(&got));

    // In the replica's transaction, a read batch and a write batch pipelined: the read is
    // answered, the write refused, each batch with its own ReadyForQuery.
    session.send(&raw::query("BEGIN READ ONLY")).await;
    session.until(b'Z').await;
    let mut pipeline = raw::run("SELECT pg_is_in_recovery()");
    pipeline.extend_from_slice(&raw::sync());
    pipeline.extend_from_slice(&raw::run("INSERT INTO ledger VALUES (-5)"));
    pipeline.extend_from_slice(&raw::sync());
    session.send(&pipeline).await;
    let mut got = session.until(b'Z').await;
    got.extend(session.until(b'Z').await);
    assert_eq!(raw::tags(&got), "12DCZEZ", "{:?}", errors(&got));
    assert_eq!(raw::first_values(&got), [Some("t".to_owned())]);
    session.send(&raw::query("ROLLBACK")).await;
    session.until(b'Z').await;

    // A portal bound in one batch would be executed by the next: binding is refused.
    session.send(&raw::query("BEGIN READ ONLY")).await;
    session.until(b'Z').await;
    let mut bind_only = raw::run("SELECT pg_advisory_lock(1)");
    bind_only.truncate(bind_only.len() - 10); // without its Execute ('E', length, "", 0)
    bind_only.extend_from_slice(&raw::sync());
    session.send(&bind_only).await;
    let got = session.until(b'Z').await;
    assert_eq!(raw::tags(&got), "EZ", "{:?}", errors(&got));
    session.send(&raw::query("ROLLBACK")).await;
    session.until(b'Z').await;

    // A COMMIT of the replica's transaction with a write pipelined behind it: the write runs
    // on the primary, after the COMMIT.
    session.send(&raw::query("BEGIN READ ONLY")).await;
    session.until(b'Z').await;
    let mut pipeline = raw::query("COMMIT");
    pipeline.extend_from_slice(&raw::query("INSERT INTO ledger VALUES (-6)"));
    session.send(&pipeline).await;
    let mut got = session.until(b'Z').await;
    got.extend(session.until(b'Z').await);
    assert_eq!(raw::tags(&got), "CZCZ", "{:?}", errors(&got));

    // A read-only transaction opened by a batch a Flush sent, then a statement the replica
    // must not run: refused, the transaction failed.
    let mut session = Raw::connect(balancer, "app", password, "app").await;
    session.send(&raw::run("BEGIN READ ONLY")).await;
    session.send(&raw::flush()).await;
    let got = session.until(b'C').await;
    assert_eq!(raw::tags(&got), "12C");
    session.send(&raw::run("SELECT pg_advisory_lock(1)")).await;
    session.send(&raw::sync()).await;
    let got = session.until(b'Z').await;
    assert_eq!(raw::tags(&got), "EZ", "{:?}", errors(&got));
    assert!(errors(&got)[0].starts_with("25006"), "{:?}", errors(&got));
    assert_eq!(got.last().map(|m| m.1.clone()), Some(vec![b'E']));
    session.send(&raw::query("ROLLBACK")).await;
    let got = session.until(b'Z').await;
    assert_eq!(got.last().map(|m| m.1.clone()), Some(vec![b'I']));

    let c = connect(balancer as u64, "app", password, "app").await;
    let ids: Vec<i32> = c
        .query("SELECT id FROM ledger WHERE id < -2 ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        ids,
        [-6],
        "a refused write ran, or the one after COMMIT did not"
    );
}
