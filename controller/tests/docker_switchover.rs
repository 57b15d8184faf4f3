//! A planned switchover on the real Docker engine, with a writer through the balancer (one
//! connection per write, every acknowledged id checked afterwards) and a watcher that samples
//! every instance every 100 ms and fails if two ever accept writes. The primary moves with
//! no container recreated, the old primary comes back as a streaming replica, and bad
//! requests (the current primary, an unknown instance) are refused with nothing touched.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::Value;
use tokio_postgres::NoTls;

const NAME: &str = "it-switch";

/// Connects with a short timeout; `None` when the server does not answer.
async fn try_connect(
    port: u64,
    user: &str,
    password: &str,
    db: &str,
) -> Option<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(port as u16)
        .user(user)
        .password(password)
        .dbname(db)
        .connect_timeout(Duration::from_millis(800))
        .connect(NoTls)
        .await
        .ok()?;
    tokio::spawn(conn);
    Some(client)
}

fn instance_ports(doc: &Value) -> Vec<u64> {
    doc["primary"]
        .as_object()
        .into_iter()
        .map(|p| p["port"].as_u64().unwrap())
        .chain(
            doc["replicas"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["port"].as_u64().unwrap()),
        )
        .collect()
}

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
    let ports = instance_ports(&doc);
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

    let stop = Arc::new(AtomicBool::new(false));
    let most_writable = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let (stop, most, ports, superuser) = (
            stop.clone(),
            most_writable.clone(),
            ports.clone(),
            superuser.clone(),
        );
        tokio::spawn(async move {
            for _ in 0..3000 {
                if stop.load(Ordering::Relaxed) {
                    break;
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
        })
    };
    let writer = {
        let (stop, password) = (stop.clone(), password.clone());
        tokio::spawn(async move {
            let mut acked = Vec::new();
            for id in 1..=3000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                if let Some(c) = try_connect(balancer, "app", &password, "app").await {
                    if c.execute("INSERT INTO ledger VALUES ($1)", &[&id])
                        .await
                        .is_ok()
                    {
                        acked.push(id);
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            acked
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let out = s.pgbalancer(&["switchover", NAME, "--to", "it-switch-1"]);
    assert_success(&out);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let acked = writer.await.unwrap();
    watcher.await.unwrap();

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
        most_writable.load(Ordering::Relaxed) <= 1,
        "two instances accepted writes at once"
    );

    // Every acknowledged write is on the new primary (read there directly: a read through the
    // balancer may go to a replica still replaying).
    assert!(
        acked.len() > 20,
        "too few writes went through: {}",
        acked.len()
    );
    let client = connect(port(&doc["primary"]), "app", &password, "app").await;
    let present: Vec<i32> = client
        .query("SELECT id FROM ledger ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let missing: Vec<&i32> = acked.iter().filter(|id| !present.contains(id)).collect();
    assert!(missing.is_empty(), "acknowledged writes lost: {missing:?}");

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
