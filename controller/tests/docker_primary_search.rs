//! pgpool that lost track of its primary finds it again by itself (real Docker, PostgreSQL
//! and pgpool). pgpool searches for the primary only when a node is attached or detached, and
//! never again after a search that found none; a promotion that comes after that search (the
//! old primary detached first, the new one promoted more than the search's 10 s later) would
//! leave the balancer with no primary for good. Here the controller is stopped, the primary's
//! node detached (pgpool searches and finds none), and a replica promoted by hand: the agent
//! must make pgpool search again, so that it routes writes to the promoted replica.

mod common;

use std::time::{Duration, Instant};

use common::traffic::{access, in_recovery, try_connect};
use common::*;
use serde_json::Value;

const NAME: &str = "it-search";

fn nodes(rest: u16) -> Vec<(u64, String, String)> {
    ureq::get(&format!("http://127.0.0.1:{rest}/api/v1/nodes"))
        .timeout(Duration::from_secs(10))
        .call()
        .ok()
        .and_then(|r| r.into_json::<Value>().ok())
        .and_then(|v| {
            v["nodes"].as_array().map(|list| {
                list.iter()
                    .map(|n| {
                        (
                            n["id"].as_u64().unwrap_or(u64::MAX),
                            n["status"].as_str().unwrap_or_default().to_owned(),
                            n["role"].as_str().unwrap_or_default().to_owned(),
                        )
                    })
                    .collect()
            })
        })
        .unwrap_or_default()
}

fn primary_node(rest: u16) -> Option<u64> {
    nodes(rest)
        .into_iter()
        .find(|(_, status, role)| status == "up" && role == "primary")
        .map(|(id, _, _)| id)
}

#[tokio::test]
async fn a_balancer_with_no_primary_searches_again_once_one_writes() {
    let s = Scenario::new(NAME);
    let file = s.file("c.yaml", &cluster_yaml(NAME, "  replicas: 2\n"));
    assert_success(&s.pgbalancer(&["up", "-f", file.to_str().unwrap()]));
    let doc = s.status(NAME);
    let a = access(&doc);
    let rest = doc["balancer"]["instances"][0]["restPort"]
        .as_u64()
        .expect("rest port published") as u16;
    let token = doc["secrets"]["apiToken"].as_str().unwrap().to_owned();
    let replica_port = port(
        doc["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == format!("{NAME}-1"))
            .expect("replica 1 in status"),
    );
    assert_eq!(primary_node(rest), Some(0));

    // Nothing but the agent acts from here on.
    let controller = doc["controller"]["name"].as_str().unwrap().to_owned();
    docker(&["kill", &controller]);

    // The primary's node is detached (held): pgpool searches among the standbys and gives up.
    let detached = ureq::post(&format!(
        "http://127.0.0.1:{rest}/api/v1/nodes/0/detach?force=true"
    ))
    .set("Authorization", &format!("Bearer {token}"))
    .timeout(Duration::from_secs(60))
    .call();
    assert!(detached.is_ok(), "detach: {detached:?}");
    let headless = eventually(60, || async {
        let n = nodes(rest);
        n.len() == 3
            && n.iter()
                .all(|(id, status, role)| role != "primary" && (*id != 0 || status == "down"))
    })
    .await;
    assert!(headless, "pgpool still names a primary: {:?}", nodes(rest));

    // Promoted by hand, after pgpool's search ended: only another search can find it.
    let replica = try_connect(replica_port as u16, "postgres", &a.superuser, "postgres")
        .await
        .expect("superuser session on the replica");
    replica
        .batch_execute("SELECT pg_promote(true, 60)")
        .await
        .unwrap();
    assert_eq!(in_recovery(replica_port, &a.superuser).await, Some(false));
    let promoted_at = Instant::now();

    let found = eventually(120, || async { primary_node(rest) == Some(1) }).await;
    assert!(
        found,
        "pgpool did not find the promoted primary: {:?}",
        nodes(rest)
    );
    println!(
        "MEASURED pgpool routed to a primary promoted behind its back after {:.1} s",
        promoted_at.elapsed().as_secs_f64()
    );

    // Writes through the balancer reach it.
    let wrote = eventually(60, || async {
        match try_connect(a.balancer, "app", &a.password, "app").await {
            Some(c) => c
                .batch_execute("CREATE TABLE IF NOT EXISTS after_search (n int); INSERT INTO after_search VALUES (1)")
                .await
                .is_ok(),
            None => false,
        }
    })
    .await;
    assert!(wrote, "no write through the balancer: {:?}", nodes(rest));
    // The detached old primary stays detached: the agent only made pgpool search.
    assert!(
        nodes(rest)
            .iter()
            .any(|(id, status, _)| *id == 0 && status == "down"),
        "{:?}",
        nodes(rest)
    );
    assert_success(&s.pgbalancer(&["down", NAME]));
}
