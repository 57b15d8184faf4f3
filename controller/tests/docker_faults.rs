//! The fault suite on the real Docker engine, each fault once on one cluster (two replicas,
//! one balancer): a replica's PostgreSQL killed, a replica container stopped and started,
//! pgpool killed inside the balancer, the balancer agent killed (started again in the same
//! container), the container's main process killed (the container restarts), the balancer
//! container stopped. A writer and a reader run through the balancer throughout and a watcher samples
//! every instance every 100 ms.
//!
//! Only invariants are asserted: nothing acknowledged is lost, never two writable instances,
//! and the cluster reports healthy again by itself (generous bound) with the same primary; a
//! killed replica is detached by the balancer's agent itself, not by pgpool's health check.
//! Afterwards no secret shows in containers' environment, arguments or logs, or in `status`.
//! What the faults cost (failed writes and reads, the longest write gap) is printed; the
//! figures over many rounds come from `bench/faults-docker.sh`.

mod common;

use std::time::{Duration, Instant};

use common::traffic::*;
use common::*;
use serde_json::Value;

const NAME: &str = "it-faults";

/// Running, the controller running, the balancer ready, and every replica streaming and up in
/// the balancer.
fn healthy(doc: &Value) -> bool {
    doc["phase"] == "Running"
        && doc["controller"]["state"] == "running"
        && doc["balancer"]["ready"] == true
        && doc["replicas"].as_array().is_some_and(|r| {
            !r.is_empty()
                && r.iter()
                    .all(|r| r["ready"] == true && r["balancerNode"]["status"] == "up")
        })
}

/// Runs `inject` under traffic and checks the invariants; returns what the traffic saw.
async fn survive(s: &Scenario, next_id: &mut i32, fault: &str, inject: impl FnOnce()) {
    let (ready, doc) = status_until(s, NAME, 120, healthy).await;
    assert!(ready, "not healthy before {fault}: {doc}");
    let doc = s.status(NAME);
    let Access {
        password,
        superuser,
        balancer,
    } = access(&doc);
    let primary_before = primary(&doc);

    let traffic_started = Instant::now();
    let traffic = Traffic::start_from(NAME, balancer, &password, &superuser, *next_id).await;
    let at = Instant::now();
    inject();
    let (recovered, doc) = status_until(s, NAME, 180, healthy).await;
    let healthy_after = at.elapsed();
    assert!(recovered, "not healthy again 180 s after {fault}: {doc}");
    // Writes go through again after the recovery, several times.
    let again = Instant::now();
    let resumed = eventually(60, || async { traffic.acked_since(again) >= 5 }).await;
    let outcome = traffic.finish().await;
    *next_id = outcome.ledger.last().map_or(*next_id, |w| w.0 + 1);
    assert!(resumed, "writes did not go through after {fault}");
    assert!(
        outcome.most_writable <= 1,
        "two instances accepted writes at once during {fault}"
    );
    assert_eq!(primary(&doc), primary_before, "{fault} moved the primary");
    acknowledged_writes_present(port(&doc["primary"]), &password, &outcome.ledger).await;
    let failures: Vec<String> = outcome
        .ledger
        .iter()
        .filter(|w| !w.2)
        .map(|w| {
            format!(
                "{:+.1}",
                w.1.duration_since(traffic_started).as_secs_f64()
                    - at.duration_since(traffic_started).as_secs_f64()
            )
        })
        .collect();
    eprintln!("failures at (s from the fault): {failures:?}");
    eprintln!(
        "MEASURED {fault}: {} failed writes, longest write gap {:.2} s, {} of {} reads failed, healthy again after {:.1} s",
        outcome.failed_writes(),
        write_gap(&outcome.ledger).as_secs_f64(),
        outcome.reads.1,
        outcome.reads.0,
        healthy_after.as_secs_f64(),
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cluster_survives_each_fault_by_itself() {
    let s = Scenario::new(NAME);
    up_with_ledger(&s, NAME).await;
    let replica = format!("{NAME}-1");
    let balancer = s.status(NAME)["balancer"]["instances"][0]["name"]
        .as_str()
        .expect("a balancer instance")
        .to_owned();

    let mut next_id = 1;
    // The agent keeps a connection to each backend, so the moment the replica's server goes it
    // takes the node out of pgpool's rotation (before pgpool's health check would).
    let watched = || {
        docker(&[
            "exec",
            &replica,
            "psql",
            "-X",
            "-A",
            "-t",
            "-h",
            "/var/run/postgresql",
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-c",
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgbalancer-watch'",
        ])
    };
    assert!(
        eventually(60, || async { watched() == "1" }).await,
        "the balancer keeps no connection to {replica}: {}",
        watched()
    );
    survive(&s, &mut next_id, "replica killed", || {
        docker(&["kill", "-s", "KILL", &replica]);
    })
    .await;
    let logs = text(
        &std::process::Command::new("docker")
            .args(["logs", &balancer])
            .output()
            .expect("docker logs"),
    );
    assert!(
        logs.lines()
            .any(|l| l.contains("detached: its server went away") && l.contains("node=1")),
        "the balancer did not detach the killed replica itself:\n{logs}"
    );
    survive(&s, &mut next_id, "replica stopped and started", || {
        docker(&["stop", &replica]);
        std::thread::sleep(Duration::from_secs(3));
        docker(&["start", &replica]);
    })
    .await;
    survive(&s, &mut next_id, "pgpool killed", || {
        docker(&[
            "exec",
            &balancer,
            "sh",
            "-c",
            "kill -KILL \"$(head -n 1 /var/run/pgbalancer/pgpool.pid)\"",
        ]);
    })
    .await;
    // The agent is started again by the container's first process, in the same container.
    let started = || {
        docker(&[
            "inspect",
            "-f",
            "{{.RestartCount}} {{.State.StartedAt}}",
            &balancer,
        ])
    };
    let before = started();
    let agent_pid = || docker(&["exec", &balancer, "cat", "/var/run/pgbalancer/agent.pid"]);
    let first_agent = agent_pid();
    assert!(!first_agent.trim().is_empty(), "no agent pid file");
    survive(&s, &mut next_id, "agent killed", || {
        docker(&[
            "exec",
            &balancer,
            "sh",
            "-c",
            "kill -KILL \"$(cat /var/run/pgbalancer/agent.pid)\"",
        ]);
    })
    .await;
    assert_eq!(started(), before, "the balancer container restarted");
    assert_ne!(agent_pid(), first_agent, "the agent was not started again");
    survive(&s, &mut next_id, "balancer's main process killed", || {
        docker(&["kill", "-s", "KILL", &balancer]);
    })
    .await;
    survive(&s, &mut next_id, "balancer stopped", || {
        docker(&["stop", &balancer]);
    })
    .await;
    secrets_stay_secret(&s);
    assert_success(&s.pgbalancer(&["down", NAME]));
}

/// No password or token in any container's environment, command or process arguments, in any
/// log (the faults above made them talk), or in `status` without `--show-secrets`.
fn secrets_stay_secret(s: &Scenario) {
    let doc = s.status(NAME);
    let secrets: Vec<String> = [
        "password",
        "superuserPassword",
        "replicationPassword",
        "pcpPassword",
        "apiToken",
    ]
    .iter()
    .map(|k| doc["secrets"][k].as_str().expect(k).to_owned())
    .collect();
    assert!(secrets.iter().all(|v| v.len() >= 16), "weak secrets");
    let mut places: Vec<(String, String)> = Vec::new();
    let mut containers = container_ids(NAME);
    containers.extend(s.controllers());
    for id in &containers {
        places.push((
            format!("{id}: environment and command"),
            docker(&[
                "inspect",
                "-f",
                "{{json .Config.Env}} {{json .Config.Cmd}} {{json .Args}}",
                id,
            ]),
        ));
        places.push((
            format!("{id}: processes"),
            docker(&["top", id, "-eo", "pid,args"]),
        ));
        let logs = std::process::Command::new("docker")
            .args(["logs", id])
            .output()
            .expect("docker logs");
        places.push((format!("{id}: logs"), text(&logs)));
    }
    for args in [
        vec!["status", NAME],
        vec!["status", NAME, "-o", "json"],
        vec!["status", NAME, "-o", "yaml"],
    ] {
        places.push((format!("pgbalancer {args:?}"), text(&s.pgbalancer(&args))));
    }
    assert!(places.len() > 10, "nothing inspected");
    for (place, content) in &places {
        assert!(!content.is_empty(), "{place}: nothing read");
        for (i, secret) in secrets.iter().enumerate() {
            assert!(!content.contains(secret.as_str()), "secret #{i} in {place}");
        }
    }
}
