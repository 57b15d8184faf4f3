//! The origin tool's command line on the real engine: `--init`, `--status`, `--add-replica`
//! (a real streaming replica, the balancer reconfigured live, the JSON rewritten) and
//! `--destroy` (containers, volumes and network gone), on a seed file with its own names,
//! subnet and ports.

mod common;

use common::*;
use serde_json::Value;

/// The shipped simple config, moved to names, subnet and ports no other test uses.
fn seed_json() -> String {
    let mut seed: Value = serde_json::from_str(include_str!(
        "../../examples/pgbalancer_cluster_simple.json"
    ))
    .unwrap();
    seed["cluster_name"] = "itseed".into();
    seed["network"] = serde_json::json!({"name": "itseed_net", "subnet": "10.231.0.0/16"});
    let b = &mut seed["balancers"][0];
    b["name"] = "itseed".into();
    b["container_name"] = "itseed_lb".into();
    b["ip_address"] = "10.231.7.10".into();
    b["port"] = 26999.into();
    b["pcp_port"] = 26898.into();
    b["rest_api_port"] = 26080.into();
    b["primary"] = serde_json::json!({"host": "itseed-primary", "port": 26432, "container_name": "itseed_primary", "ip_address": "10.231.7.20"});
    b["replicas"] = serde_json::json!([
        {"node_id": 1, "host": "itseed-replica1", "port": 26433, "container_name": "itseed_replica1", "ip_address": "10.231.7.21"}
    ]);
    serde_json::to_string_pretty(&seed).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn seed_json_init_add_replica_status_destroy() {
    let s = Scenario::new("itseed");
    let config = s.file("seed.json", &seed_json());
    let config = config.to_str().unwrap();

    // No action: help, exit 0. --add-replica without --balancer: exit 1.
    let out = s.seed_tool(&[]);
    assert!(
        out.status.success() && text(&out).contains("--add-replica"),
        "{}",
        text(&out)
    );
    let out = s.seed_tool(&["--add-replica", "--config", config]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("--balancer required for --add-replica"));
    let out = s.seed_tool(&["--status", "--config", "/nonexistent/cluster.json"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("Configuration file not found"));

    // --init: the JSON's names, IPs and ports are honoured and the replica streams.
    let out = s.seed_tool(&["--init", "--config", config]);
    assert_success(&out);
    let inspect = std::process::Command::new("docker")
        .args([
            "inspect",
            "itseed_replica1",
            "--format",
            "{{(index .NetworkSettings.Networks \"itseed_net\").IPAddress}}",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&inspect.stdout).trim(),
        "10.231.7.21"
    );
    let doc = s.status("itseed");
    let superuser = doc["secrets"]["superuserPassword"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(doc["balancer"]["port"], 26999);
    assert_eq!(doc["primary"]["port"], 26432);
    // The origin's clients connect as postgres to testdb through the balancer.
    let through = connect(26999, "postgres", &superuser, "testdb").await;
    through
        .batch_execute("CREATE TABLE seen (x int); INSERT INTO seen VALUES (42)")
        .await
        .unwrap();

    // --add-replica: next node id, port primary+id, next IP; streams; balancer routes to it.
    let out = s.seed_tool(&[
        "--add-replica",
        "--balancer",
        "itseed",
        "--count",
        "1",
        "--config",
        config,
    ]);
    assert_success(&out);
    let rewritten: Value = serde_json::from_str(&std::fs::read_to_string(config).unwrap()).unwrap();
    let added = &rewritten["balancers"][0]["replicas"][1];
    assert_eq!(added["node_id"], 2);
    assert_eq!(added["port"], 26434);
    assert_eq!(added["ip_address"], "10.231.7.22");
    assert_eq!(added["container_name"], "itseed_replica2");
    let replica = connect(26434, "postgres", &superuser, "testdb").await;
    let recovering: bool = replica
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(recovering);
    let has_row = eventually(60, || async {
        connect(26434, "postgres", &superuser, "testdb")
            .await
            .query_one("SELECT count(*) FROM seen", &[])
            .await
            .map(|r| r.get::<_, i64>(0) == 1)
            .unwrap_or(false)
    })
    .await;
    assert!(has_row, "added replica did not receive the row");
    let nodes = through.simple_query("SHOW POOL_NODES").await.unwrap();
    let node2 = nodes.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) if r.get("node_id") == Some("2") => {
            r.get("status").map(str::to_owned)
        }
        _ => None,
    });
    assert!(
        matches!(node2.as_deref(), Some("up") | Some("waiting")),
        "{node2:?}"
    );
    // The open session through the balancer survived the reconfiguration.
    through.simple_query("SELECT 1").await.unwrap();

    // --status sees the added replica from the rewritten JSON.
    let out = s.seed_tool(&["--status", "--config", config]);
    assert_success(&out);
    let status = text(&out);
    assert!(status.contains("[REPLICA 2] itseed_replica2"), "{status}");
    assert!(status.contains("Role: replica"), "{status}");

    // --destroy: containers, volumes and the network are gone.
    drop(through);
    drop(replica);
    let out = s.seed_tool(&["--destroy", "--config", config]);
    assert_success(&out);
    assert_eq!(labelled("itseed"), Vec::<String>::new());
    let nets = std::process::Command::new("docker")
        .args(["network", "ls", "-q", "--filter", "name=^itseed_net$"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&nets.stdout).trim().is_empty(),
        "network left behind"
    );
}
