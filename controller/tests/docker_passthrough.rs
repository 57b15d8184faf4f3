//! Logins through the native engine with the verifier the database holds (SCRAM
//! pass-through), on the real Docker engine and real PostgreSQL (one primary, one streaming
//! replica): a role made in the database logs in through the balancer, and its reads run on
//! the replica (the session logged in there with the client key from the client's proof); a
//! wrong password, an unknown role, `NOLOGIN` and an expired role are refused; a
//! changed password takes effect at once, and a session logged in before the change is told
//! so when it needs another server; the lookup function is closed to other roles; without
//! it the engine checks users against `pool_passwd` as before; and a primary without its
//! schema (a cluster made by an earlier version) gets it from the controller.

mod common;

use std::time::Duration;

use common::traffic::*;
use common::*;
use tokio_postgres::Client;

const NAME: &str = "it-passthrough";

/// Connects through the balancer as `user`; the error's SQLSTATE when the login fails.
async fn try_login(balancer: u16, user: &str, password: &str) -> Result<Client, String> {
    let (client, conn) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(balancer)
        .user(user)
        .password(password)
        .dbname("app")
        .connect_timeout(Duration::from_secs(10))
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| {
            e.as_db_error()
                .map(|d| d.code().code().to_owned())
                .unwrap_or_else(|| format!("not a server error: {e}"))
        })?;
    tokio::spawn(conn);
    Ok(client)
}

/// Asserts that a login as `user` with `password` is refused with `28P01`, within 10 s: a
/// lookup that found no primary in time (a busy machine) checks the verifier read before.
async fn assert_refused(balancer: u16, user: &str, password: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let answer = try_login(balancer, user, password).await.err();
        if answer.as_deref() == Some("28P01") || std::time::Instant::now() > deadline {
            assert_eq!(answer.as_deref(), Some("28P01"), "login as {user}");
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether a read of `t` by `c` runs on the replica and sees `rows` rows.
async fn reads_on_replica(c: &Client, rows: i64) -> bool {
    match c
        .query_one("SELECT pg_is_in_recovery(), count(*) FROM t", &[])
        .await
    {
        Ok(row) => row.get::<_, bool>(0) && row.get::<_, i64>(1) == rows,
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn roles_made_in_the_database_log_in_through_the_engine_with_their_own_verifier() {
    let s = Scenario::new(NAME);
    let doc =
        up_with_ledger_spec(&s, NAME, "  replicas: 1\n  balancer:\n    engine: native\n").await;
    let Access {
        password,
        superuser,
        balancer,
    } = access(&doc);
    let primary_port = doc["primary"]["port"].as_u64().expect("primary port") as u16;
    let (ready, doc) = status_until(&s, NAME, 120, |d| {
        d["replicas"][0]["balancerNode"]["status"] == "up"
    })
    .await;
    assert!(ready, "the balancer never saw the replica up: {doc}");
    let admin = connect(primary_port as u64, "postgres", &superuser, "app").await;
    admin
        .batch_execute(
            "CREATE ROLE alice LOGIN PASSWORD 'first: a password, with commas';
             CREATE TABLE t (id int);
             INSERT INTO t VALUES (1), (2);
             GRANT SELECT, INSERT ON t TO alice;
             GRANT SELECT ON t TO app;",
        )
        .await
        .unwrap();

    // A role the balancer was never told about logs in; its reads run on the replica, which
    // the session logged in to with the key from alice's own proof; its writes on the primary.
    let alice = try_login(balancer, "alice", "first: a password, with commas")
        .await
        .expect("alice logs in through the balancer");
    assert!(
        eventually(30, || reads_on_replica(&alice, 2)).await,
        "alice's read never ran on the replica"
    );
    alice
        .batch_execute("INSERT INTO t VALUES (3)")
        .await
        .unwrap();
    // Read-your-writes: on the primary, or on the replica once it replayed the insert.
    let row = alice
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 3, "read-your-writes");
    let user: String = alice
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(user, "alice");

    // Refused: a wrong password, an unknown role, with the same answer.
    assert_refused(balancer, "alice", "wrong").await;
    assert_refused(balancer, "mallory", "first: a password, with commas").await;

    // A changed password takes effect at once: the old one is refused, the new one logs in and
    // reads on the replica once it replayed the change.
    admin
        .batch_execute("ALTER ROLE alice PASSWORD 'second'")
        .await
        .unwrap();
    assert_refused(balancer, "alice", "first: a password, with commas").await;
    let alice2 = try_login(balancer, "alice", "second")
        .await
        .expect("alice logs in with her new password");
    assert!(
        eventually(30, || reads_on_replica(&alice2, 3)).await,
        "after the change alice's read never ran on the replica"
    );

    // The lookups cross the network encrypted (the instances serve TLS), and so do the
    // controller's superuser connections.
    let encrypted = |who: &'static str| {
        let admin = &admin;
        async move {
            admin
                .query(
                    "SELECT s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
                     WHERE a.usename = $1 AND a.application_name = 'pgbalancer' \
                     AND ($1 <> 'pgbalancer_monitor' OR a.query LIKE '%scram_verifier%')",
                    &[&who],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect::<Vec<bool>>()
        }
    };
    assert!(
        eventually(30, || async {
            encrypted("pgbalancer_monitor").await == [true]
        })
        .await,
        "one encrypted lookup connection: {:?}",
        encrypted("pgbalancer_monitor").await
    );
    assert!(
        eventually(30, || async {
            let seen = encrypted("postgres").await;
            !seen.is_empty() && seen.iter().all(|ssl| *ssl)
        })
        .await,
        "the controller's connections encrypted: {:?}",
        encrypted("postgres").await
    );

    // A session that logged in before a password change and then needs another server is
    // told so, and goes on with the servers it has.
    let before = try_login(balancer, "alice", "second").await.unwrap();
    admin
        .batch_execute("ALTER ROLE alice PASSWORD 'third'")
        .await
        .unwrap();
    let replica_port = doc["replicas"][0]["port"].as_u64().expect("replica port");
    let replica_admin = connect(replica_port, "postgres", &superuser, "postgres").await;
    let on_primary: String = admin
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = 'alice'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        eventually(30, || async {
            replica_admin
                .query_one(
                    "SELECT rolpassword FROM pg_authid WHERE rolname = 'alice'",
                    &[],
                )
                .await
                .is_ok_and(|r| r.get::<_, String>(0) == on_primary)
        })
        .await,
        "the replica never replayed the password change"
    );
    // Reads go to the replica while the balancer sees it fresh; one that went to the primary
    // (a stale sample) is asked again.
    let mut refused = None;
    for _ in 0..50 {
        match before
            .query_one("SELECT pg_is_in_recovery(), count(*) FROM t", &[])
            .await
        {
            Ok(row) => {
                assert!(
                    !row.get::<_, bool>(0),
                    "logged in to the replica with an old key"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let refused = refused.expect("a new server connection with the old password's key");
    let db = refused.as_db_error().expect("a server error");
    assert_eq!(db.code().code(), "28P01", "{refused}");
    assert!(db.message().contains("changed"), "{refused}");
    before
        .batch_execute("INSERT INTO t VALUES (4)")
        .await
        .expect("the session goes on on the primary");
    admin
        .batch_execute("ALTER ROLE alice PASSWORD 'second'")
        .await
        .unwrap();

    // The superuser logs in through the balancer like any role.
    let su = try_login(balancer, "postgres", &superuser)
        .await
        .expect("the superuser logs in");
    assert!(eventually(30, || reads_on_replica(&su, 4)).await);

    // NOLOGIN and an expired role are refused.
    admin
        .batch_execute("ALTER ROLE alice NOLOGIN")
        .await
        .unwrap();
    assert_refused(balancer, "alice", "second").await;
    admin
        .batch_execute("ALTER ROLE alice LOGIN VALID UNTIL '2001-01-01'")
        .await
        .unwrap();
    assert_refused(balancer, "alice", "second").await;
    admin
        .batch_execute("ALTER ROLE alice VALID UNTIL 'infinity'")
        .await
        .unwrap();
    try_login(balancer, "alice", "second")
        .await
        .expect("alice logs in again");

    // The cluster's own user, and the lookup closed to every role but the monitoring one.
    let app = try_login(balancer, "app", &password)
        .await
        .expect("app logs in");
    assert!(eventually(30, || reads_on_replica(&app, 4)).await);
    let direct_app = connect(primary_port as u64, "app", &password, "postgres").await;
    let denied = direct_app
        .query_one("SELECT pgbalancer.scram_verifier('postgres')", &[])
        .await
        .expect_err("app may not read verifiers");
    assert_eq!(
        denied.as_db_error().map(|d| d.code().code()),
        Some("42501"),
        "{denied}"
    );

    // A primary without the function (a cluster made by an earlier version): the users of
    // pool_passwd log in with their password, other roles are refused.
    connect(primary_port as u64, "postgres", &superuser, "postgres")
        .await
        .batch_execute("DROP FUNCTION pgbalancer.scram_verifier(text)")
        .await
        .unwrap();
    let app = try_login(balancer, "app", &password)
        .await
        .expect("app logs in from pool_passwd");
    assert!(eventually(30, || reads_on_replica(&app, 4)).await);
    assert_refused(balancer, "alice", "second").await;

    // No schema at all (a cluster made before the function existed): the controller makes it,
    // and roles made in the database log in again.
    connect(primary_port as u64, "postgres", &superuser, "postgres")
        .await
        .batch_execute("DROP SCHEMA pgbalancer CASCADE")
        .await
        .unwrap();
    assert!(
        eventually(90, || async {
            match try_login(balancer, "alice", "second").await {
                Ok(alice) => reads_on_replica(&alice, 4).await,
                Err(_) => false,
            }
        })
        .await,
        "the lookup was never made again"
    );
    drop(s);
}
