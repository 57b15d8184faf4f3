//! A planned switchover on the real Docker engine, with a writer through the balancer (one
//! connection per write, every acknowledged id checked afterwards) and a watcher that samples
//! every instance every 100 ms and fails if two ever accept writes. The primary moves with
//! no container recreated, the old primary comes back as a streaming replica, and bad
//! requests (the current primary, an unknown instance) are refused with nothing touched.

mod common;

use std::time::Duration;

use common::traffic::*;
use common::*;

const NAME: &str = "it-switch";

#[tokio::test(flavor = "multi_thread")]
async fn switchover_moves_the_primary_without_losing_a_write_or_recreating_a_container() {
    let s = Scenario::new(NAME);
    let file = s.file("c.yaml", &cluster_yaml(NAME, "  replicas: 2\n"));
    assert_success(&s.pgbalancer(&["up", "-f", file.to_str().unwrap()]));
    let doc = s.status(NAME);
    assert_eq!(doc["primary"]["name"], "it-switch-0");
    let password = doc["secrets"]["password"].as_str().unwrap().to_owned();
    let superuser = doc["secrets"]["superuserPassword"]
        .as_str()
        .unwrap()
        .to_owned();
    let balancer = doc["balancer"]["port"].as_u64().unwrap();
    let ids_before = container_ids(NAME);
    connect(balancer, "app", &password, "app")
        .await
        .batch_execute("CREATE TABLE ledger (id int PRIMARY KEY)")
        .await
        .unwrap();

    // Refused, nothing touched.
    for (to, says) in [
        ("it-switch-0", "already the primary"),
        ("it-switch-9", "no such instance"),
    ] {
        let out = s.pgbalancer(&["switchover", NAME, "--to", to]);
        assert!(!out.status.success(), "switchover to {to} was accepted");
        assert!(text(&out).contains(says), "{}", text(&out));
    }
    assert_eq!(s.status(NAME)["primary"]["name"], "it-switch-0");

    let traffic = Traffic::start(NAME, balancer as u16, &password, &superuser).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let out = s.pgbalancer(&["switchover", NAME, "--to", "it-switch-1"]);
    assert_success(&out);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let outcome = traffic.finish().await;

    let doc = s.status(NAME);
    assert_eq!(doc["phase"], "Running", "{doc}");
    assert_eq!(doc["primary"]["name"], "it-switch-1");
    let old = doc["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "it-switch-0")
        .expect("the old primary is a replica");
    assert_eq!(old["ready"], true, "old primary not streaming: {doc}");
    assert_eq!(
        container_ids(NAME),
        ids_before,
        "a change of primary recreated containers"
    );
    assert!(
        outcome.most_writable <= 1,
        "two instances accepted writes at once"
    );

    // Every acknowledged write is on the new primary (read there directly: a read through the
    // balancer may go to a replica still replaying).
    let acked = outcome.ledger.iter().filter(|w| w.2).count();
    assert!(acked > 20, "too few writes went through: {acked}");
    acknowledged_writes_present(port(&doc["primary"]), &password, &outcome.ledger).await;

    // Without --to the most caught-up replica is chosen; a fresh write goes through.
    assert_success(&s.pgbalancer(&["switchover", NAME]));
    let doc = s.status(NAME);
    assert_ne!(doc["primary"]["name"], "it-switch-1");
    assert_eq!(doc["phase"], "Running", "{doc}");
    connect(balancer, "app", &password, "app")
        .await
        .execute("INSERT INTO ledger VALUES (100000)", &[])
        .await
        .unwrap();
    assert_success(&s.pgbalancer(&["down", NAME]));
}
