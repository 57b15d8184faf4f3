//! Automated failover on the real Docker engine with no command running: `up` leaves a
//! controller container; the primary container is stopped with `docker stop`; the controller
//! fences it, promotes the most advanced replica, moves `<name>-rw`, and the balancer sends
//! writes to the new primary without a restart. A writer through the balancer (one
//! connection per write, every acknowledged id checked afterwards; with the primary killed
//! outright, those begun up to a second before the kill) and a watcher sampling
//! every instance every 100 ms (failing if two ever accept writes) run throughout. The old
//! primary comes back as a streaming replica. A second scenario kills the controller right
//! after it recorded the failover and checks that the restarted controller finishes it. A
//! third runs with synchronous replication (ANY 1 of the replicas): commits wait for a replica,
//! and after the failover every acknowledged commit is on the new primary.
//!
//! Times are bounds, never what is tested; the measured write gap is printed.

mod common;

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::traffic::*;
use common::*;
use serde_json::Value;

/// The scenarios share the machine's two cores: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_primary_fails_over_with_no_command_running_and_rejoins_as_a_replica() {
    primary_lost("it-fail", &["stop"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_primary_fails_over_and_rejoins_as_a_replica() {
    // SIGKILL to the container's main process, PostgreSQL's postmaster.
    primary_lost("it-fail-k9", &["kill", "--signal", "KILL"]).await;
}

/// The primary of a new cluster `name` is lost by `docker <how> <name>-0`; with no command
/// running, the controller fails over, and the old primary comes back as a replica.
async fn primary_lost(name: &'static str, how: &[&str]) {
    let _serial = SERIAL.lock().await;
    let s = Scenario::new(name);
    let doc = up_with_ledger(&s, name).await;
    let Access {
        password,
        superuser,
        balancer,
    } = access(&doc);
    let ids_before = container_ids(name);

    let traffic = Traffic::start(name, balancer, &password, &superuser).await;

    // The primary goes away; no pgbalancer command runs from here on.
    let stopped_at = Instant::now();
    let doc = lose_primary(&s, name, how).await;
    let new_primary = primary(&doc).unwrap();
    let moved_in = stopped_at.elapsed();
    // The writer gets through again, several times.
    let after = eventually(60, || async { traffic.acked_since(stopped_at) >= 10 }).await;
    assert!(
        after,
        "writes through the balancer did not resume after the failover"
    );
    let Outcome {
        ledger,
        most_writable,
        ..
    } = traffic.finish().await;

    let gap = write_gap(&ledger);
    eprintln!(
        "MEASURED failover: status named the new primary {:.1} s after `docker {}`; writes through the balancer failed for {:.1} s",
        moved_in.as_secs_f64(),
        how.join(" "),
        gap.as_secs_f64(),
    );
    assert!(most_writable <= 1, "two instances accepted writes at once");
    let primary_port = s.status(name)["primary"]["port"].as_u64().unwrap();
    // A killed primary (no shutdown: asynchronous replication has not sent everything) may
    // take the commits of its last moments; a stopped one sends its standbys all it has.
    let killed = how.contains(&"KILL");
    let until = killed.then(|| stopped_at - Duration::from_secs(1));
    acknowledged_writes_present_until(primary_port, &password, &ledger, until).await;
    assert_eq!(
        container_ids(name),
        ids_before,
        "a failover recreated containers"
    );

    // The old primary, started again (the controller may have done it already), follows the
    // new one as a streaming replica.
    docker(&["start", &format!("{name}-0")]);
    let (rejoined, doc) = status_until(&s, name, 90, |d| {
        d["phase"] == "Running"
            && d["replicas"].as_array().is_some_and(|r| {
                r.iter()
                    .any(|i| i["name"] == format!("{name}-0") && i["ready"] == true)
            })
    })
    .await;
    assert!(
        rejoined,
        "old primary did not rejoin as a streaming replica: {doc}"
    );
    eprintln!(
        "MEASURED old primary streaming as a replica {:.1} s after `docker {}`",
        stopped_at.elapsed().as_secs_f64(),
        how.join(" ")
    );
    let old = doc["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == format!("{name}-0"))
        .unwrap();
    assert_eq!(in_recovery(port(old), &superuser).await, Some(true));
    assert_eq!(primary(&doc), Some(new_primary.clone()));
    let last = &doc["controller"]["lastFailover"];
    assert_eq!(last["from"], format!("{name}-0"), "{doc}");
    assert_eq!(last["to"], new_primary.as_str(), "{doc}");
    assert!(
        last["reason"]
            .as_str()
            .unwrap()
            .contains(&format!("primary {name}-0")),
        "{doc}"
    );
    assert!(last["at"].as_str().unwrap().ends_with('Z'), "{doc}");
    let table = text(&s.pgbalancer(&["status", name]));
    assert!(table.contains("controller: running"), "{table}");
    assert!(table.contains("last failover:"), "{table}");
    assert_eq!(container_ids(name), ids_before);
    let log = std::process::Command::new("docker")
        .args(["logs", doc["controller"]["name"].as_str().unwrap()])
        .output()
        .unwrap();
    eprintln!("controller log:\n{}", text(&log));

    // `down` of the last cluster removes the controller too.
    assert_success(&s.pgbalancer(&["down", name]));
    assert!(s.controllers().is_empty(), "controller left behind");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_controller_killed_after_recording_the_failover_is_finished_by_the_restarted_one() {
    const NAME: &str = "it-fail-kill";
    let _serial = SERIAL.lock().await;
    let s = Scenario::new(NAME);
    let doc = up_with_ledger(&s, NAME).await;
    let Access {
        password,
        superuser,
        balancer,
    } = access(&doc);
    let controller = doc["controller"]["name"].as_str().unwrap().to_owned();
    let state_file = s.state().join("clusters").join(format!("{NAME}.yaml"));
    let target_of = || -> Option<(Option<u64>, u64, bool)> {
        let text = std::fs::read_to_string(&state_file).ok()?;
        let v: serde_yaml::Value = serde_yaml::from_str(&text).ok()?;
        Some((
            v["currentPrimary"].as_u64(),
            v["targetPrimary"].as_u64()?,
            v["failingOver"].as_bool().unwrap_or(false),
        ))
    };
    assert_eq!(target_of(), Some((Some(0), 0, false)));
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_writable(NAME, superuser.clone(), stop.clone());

    // Stopped on a thread of its own: the primary refuses connections from the start of its
    // shutdown, so the failover may be recorded before `docker stop` returns.
    let stopping = std::thread::spawn(|| docker(&["stop", &format!("{NAME}-0")]));
    // The controller records the new target first; right then, take the cluster's lock as
    // a command would (the controller only holds it during a tick) and kill the controller.
    let deadline = Instant::now() + Duration::from_secs(60);
    while target_of().is_none_or(|(_, target, _)| target == 0) {
        assert!(Instant::now() < deadline, "no failover recorded in 60 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lock = File::create(s.state().join("locks").join(format!("{NAME}.lock"))).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while lock.try_lock().is_err() {
        assert!(Instant::now() < deadline, "cluster lock not free in 30 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    docker(&["kill", &controller]);
    stopping.join().expect("docker stop");
    let (current, target, failing_over) = target_of().unwrap();
    assert_eq!((current, failing_over), (Some(0), true), "already finished");
    let target_name = format!("{NAME}-{target}");
    let (seen, doc) = status_until(&s, NAME, 10, |d| d["phase"] == "FailingOver").await;
    assert!(
        seen,
        "phase is not FailingOver while the record moves: {doc}"
    );
    let target_port = |doc: &Value| {
        doc["replicas"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(std::iter::once(&doc["primary"]))
            .find(|i| i["name"] == target_name.as_str())
            .and_then(|i| i["port"].as_u64())
    };
    let port = target_port(&doc).expect("target has a port");
    assert_eq!(
        in_recovery(port, &superuser).await,
        Some(true),
        "the target was promoted before the controller was killed"
    );
    drop(lock);
    // Nothing moves while no controller runs.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(in_recovery(port, &superuser).await, Some(true));
    assert_ne!(
        docker(&["inspect", "-f", "{{.State.Running}}", &controller]),
        "true"
    );

    docker(&["start", &controller]);
    let (done, doc) = status_until(&s, NAME, 60, |d| {
        d["phase"] == "Running" && primary(d).as_deref() == Some(target_name.as_str())
    })
    .await;
    assert!(
        done,
        "the restarted controller did not finish the failover: {doc}"
    );
    assert!(
        writes_again(balancer, &password, 30).await,
        "no write through the balancer after the failover"
    );
    assert_eq!(target_of(), Some((Some(target), target, false)));
    assert_eq!(
        doc["controller"]["lastFailover"]["to"],
        target_name.as_str()
    );
    stop.store(true, Ordering::Relaxed);
    assert!(
        watcher.await.unwrap() <= 1,
        "two instances accepted writes at once"
    );
    assert_success(&s.pgbalancer(&["down", NAME]));
    assert!(s.controllers().is_empty(), "controller left behind");
}

/// Whether a write through the balancer is acknowledged within `secs` (ids no writer uses,
/// a new one per attempt: an attempt that timed out may still have committed).
async fn writes_again(balancer: u16, password: &str, secs: u64) -> bool {
    let next = std::sync::atomic::AtomicI32::new(1_000_000);
    eventually(secs, || {
        write(balancer, password, next.fetch_add(1, Ordering::Relaxed))
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn with_synchronous_replication_a_failover_keeps_every_acknowledged_commit() {
    const NAME: &str = "it-fail-sync";
    let _serial = SERIAL.lock().await;
    let s = Scenario::new(NAME);
    let doc = up_with_ledger_spec(
        &s,
        NAME,
        "  replicas: 2\n  postgres: {synchronous: {number: 1}}\n",
    )
    .await;
    let Access {
        password,
        superuser,
        balancer,
    } = access(&doc);
    let primary_port = doc["primary"]["port"].as_u64().unwrap();

    // The primary runs a quorum of one over its replicas, both candidates.
    let admin = connect(primary_port, "postgres", &superuser, "postgres").await;
    let names: String = admin
        .query_one("SHOW synchronous_standby_names", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        names.starts_with(&format!("ANY 1 (\"{NAME}-0\", \"{NAME}-1\"")),
        "{names}"
    );
    let quorum = eventually(30, || async {
        admin
            .query(
                "SELECT application_name FROM pg_stat_replication WHERE sync_state = 'quorum'",
                &[],
            )
            .await
            .is_ok_and(|rows| rows.len() == 2)
    })
    .await;
    assert!(quorum, "the replicas are not quorum standbys");
    drop(admin);

    let traffic = Traffic::start(NAME, balancer, &password, &superuser).await;

    let stopped_at = Instant::now();
    lose_primary(&s, NAME, &["stop"]).await;
    // With the old primary stopped, the other replica is the quorum: commits go on.
    let after = eventually(60, || async { traffic.acked_since(stopped_at) >= 10 }).await;
    assert!(
        after,
        "writes did not resume after the synchronous failover"
    );
    let Outcome {
        ledger,
        most_writable,
        ..
    } = traffic.finish().await;
    assert!(most_writable <= 1, "two instances accepted writes at once");
    eprintln!(
        "MEASURED synchronous failover: writes through the balancer failed for {:.1} s",
        write_gap(&ledger).as_secs_f64()
    );
    let new_port = s.status(NAME)["primary"]["port"].as_u64().unwrap();
    acknowledged_writes_present(new_port, &password, &ledger).await;
    assert_success(&s.pgbalancer(&["down", NAME]));
}
