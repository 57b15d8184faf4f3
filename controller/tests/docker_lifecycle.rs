//! End to end on the real Docker engine: `up` a cluster, write through the balancer and read
//! the row on every replica, converge idempotently, refuse a bad change without touching
//! anything, scale 2→3→1, `down --keep-data` then `up` finds the data, a lost primary volume
//! is replaced by a failover (no empty database made over the cluster's), a replica whose data
//! another database system made refuses to start and says so, `down` leaves nothing.

mod common;

use common::*;
use serde_json::Value;

const NAME: &str = "it-life";

async fn row_count(port: u64, password: &str) -> Option<i64> {
    let client = connect(port, "app", password, "app").await;
    client
        .query_one("SELECT count(*) FROM marks", &[])
        .await
        .ok()
        .map(|r| r.get(0))
}

async fn assert_replicas_have_rows(doc: &Value, password: &str, rows: i64) {
    for replica in doc["replicas"].as_array().unwrap() {
        let port = port(replica);
        let client = connect(port, "app", password, "app").await;
        let recovering: bool = client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .unwrap()
            .get(0);
        assert!(recovering, "{} is not a standby", replica["name"]);
        let replicated = eventually(60, || async {
            row_count(port, password).await == Some(rows)
        })
        .await;
        assert!(
            replicated,
            "{} does not have the {rows} rows written through the balancer",
            replica["name"]
        );
    }
}

/// Runs the `docker` command line (test set-up and checks only), with its exit status.
fn docker_cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new("docker")
        .args(args)
        .output()
        .unwrap()
}

/// `up` converges, and the balancer and every replica have the `rows` rows written before.
async fn up_finds_the_rows(s: &Scenario, file: &str, password: &str, rows: i64) {
    assert_success(&s.pgbalancer(&["up", "-f", file]));
    let doc = s.status(NAME);
    let balancer = doc["balancer"]["port"].as_u64().unwrap();
    assert_eq!(row_count(balancer, password).await, Some(rows));
    assert_replicas_have_rows(&doc, password, rows).await;
}

async fn pool_nodes(port: u64, password: &str) -> Vec<(String, String)> {
    pool_node_columns(port, password, &["node_id", "status"])
        .await
        .into_iter()
        .map(|r| (r[0].clone(), r[1].clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_lifecycle_on_docker() {
    let s = Scenario::new(NAME);
    let file = s.file(
        "cluster.yaml",
        &cluster_yaml(
            NAME,
            "  replicas: 2\n  balancer: {numInitChildren: 8, maxPool: 2}\n",
        ),
    );
    let file = file.to_str().unwrap();

    // Up: every instance ready, the balancer routing.
    let out = s.pgbalancer(&["up", "-f", file]);
    assert_success(&out);
    assert!(text(&out).contains("is ready"), "{}", text(&out));
    let doc = s.status(NAME);
    assert_eq!(doc["phase"], "Running");
    assert_eq!(doc["primary"]["role"], "primary");
    assert_eq!(doc["replicas"].as_array().unwrap().len(), 2);
    assert!(doc["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["ready"] == true));
    let password = doc["secrets"]["password"].as_str().unwrap().to_owned();
    let balancer = doc["balancer"]["port"].as_u64().unwrap();

    // Secrets only when asked.
    let plain = s.pgbalancer(&["status", NAME, "-o", "json"]);
    assert!(!text(&plain).contains(&password));

    // Write through the balancer; read it back on each replica's own port.
    let client = connect(balancer, "app", &password, "app").await;
    client
        .batch_execute("CREATE TABLE marks (id int PRIMARY KEY); INSERT INTO marks SELECT generate_series(1, 5)")
        .await
        .unwrap();
    let primary_recovering: bool = connect(port(&doc["primary"]), "app", &password, "app")
        .await
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!primary_recovering);
    assert_replicas_have_rows(&doc, &password, 5).await;

    // Replicas stream from whichever instance holds the `<name>-rw` alias, not a fixed host.
    let superuser = doc["secrets"]["superuserPassword"].as_str().unwrap();
    for replica in doc["replicas"].as_array().unwrap() {
        let client = connect(port(replica), "postgres", superuser, "postgres").await;
        let sender: Option<String> = client
            .query_one("SELECT sender_host FROM pg_stat_wal_receiver", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            sender.as_deref(),
            Some(&*format!("{NAME}-rw")),
            "{}",
            replica["name"]
        );
    }

    // The same conditions as a PgBalancerCluster's, with transition times the controller keeps.
    let ready_since = |doc: &Value| {
        doc["conditions"]
            .as_array()
            .and_then(|c| {
                c.iter()
                    .find(|c| c["type"] == "Ready" && c["status"] == "True")
            })
            .map(|c| c["lastTransitionTime"].clone())
    };
    assert!(ready_since(&doc).is_some(), "{doc:#}");
    let kept = eventually(30, || async {
        let first = ready_since(&s.status(NAME));
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        first.is_some() && first == ready_since(&s.status(NAME))
    })
    .await;
    assert!(
        kept,
        "Ready's transition time is not kept: {:#}",
        s.status(NAME)
    );

    // A second up changes nothing.
    let before = container_ids(NAME);
    assert_success(&s.pgbalancer(&["up", "-f", file]));
    assert_eq!(
        container_ids(NAME),
        before,
        "idempotent up recreated containers"
    );

    // A bad change is refused and nothing is touched.
    let bad = s.file("bad.yaml", &cluster_yaml(NAME, "  replicas: -3\n"));
    let out = s.pgbalancer(&["up", "-f", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out).contains("spec.replicas"), "{}", text(&out));
    assert_eq!(container_ids(NAME), before);
    let upgrade = s.file(
        "upgrade.yaml",
        &cluster_yaml(NAME, "  replicas: 2\n  postgres: {version: 15}\n"),
    );
    let out = s.pgbalancer(&["up", "-f", upgrade.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("spec.postgres.version: cannot change from 17 to 15"),
        "{}",
        text(&out)
    );
    assert_eq!(container_ids(NAME), before);

    // Scale up: the new replica streams and the balancer routes to it (no restart).
    let balancer_id = |doc: &Value| {
        doc["balancer"]["instances"][0]["name"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let balancer_before = balancer_id(&doc);
    let out = s.pgbalancer(&["scale", NAME, "--replicas", "3"]);
    assert_success(&out);
    let doc = s.status(NAME);
    assert_eq!(doc["replicas"].as_array().unwrap().len(), 3);
    assert_replicas_have_rows(&doc, &password, 5).await;
    assert_eq!(balancer_id(&doc), balancer_before);
    let nodes = pool_nodes(balancer, &password).await;
    assert!(
        nodes.contains(&("3".into(), "up".into()))
            || nodes.contains(&("3".into(), "waiting".into())),
        "{nodes:?}"
    );
    assert_eq!(container_ids(NAME).len(), 5);

    // Scale down to one replica: the primary stays, removed replicas lose their volumes and slots.
    assert_success(&s.pgbalancer(&["scale", NAME, "--replicas", "1"]));
    let doc = s.status(NAME);
    assert_eq!(doc["primary"]["name"], format!("{NAME}-0"));
    let replicas: Vec<&str> = doc["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(replicas, [format!("{NAME}-1")]);
    let left = labelled(NAME);
    assert!(
        !left
            .iter()
            .any(|o| o.contains(&format!("{NAME}-2")) || o.contains(&format!("{NAME}-3"))),
        "{left:?}"
    );
    let superuser = doc["secrets"]["superuserPassword"].as_str().unwrap();
    let slots: Vec<String> = connect(port(&doc["primary"]), "postgres", superuser, "postgres")
        .await
        .query("SELECT slot_name FROM pg_replication_slots ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(slots, ["instance_1"]);
    assert_eq!(row_count(balancer, &password).await, Some(5));

    // down --keep-data, then up finds the data again.
    assert_success(&s.pgbalancer(&["down", NAME, "--keep-data"]));
    assert!(container_ids(NAME).is_empty());
    up_finds_the_rows(&s, file, &password, 5).await;

    // The primary's volume lost while the cluster was down: instance 0 is given the primary
    // role with an empty data directory, and refuses to make a new, empty database over the
    // cluster's. `up` fails naming why; the controller then fails over to the replica that
    // holds the data, and the empty instance clones from it. Nothing written is lost.
    assert_success(&s.pgbalancer(&["down", NAME, "--keep-data"]));
    let volume = |o: u32| format!("pgbalancer-{NAME}-{o}-data");
    assert_success(&docker_cli(&["volume", "rm", &volume(0)]));
    // `up` stops waiting once the refusal has lasted (not at its timeout).
    let out = s.pgbalancer(&["up", "-f", file, "--timeout", "150"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!(
            "{NAME}-0, the primary, cannot start: this instance is to be the primary, but its \
             data directory is empty"
        )),
        "{}",
        text(&out)
    );
    let failed_over = eventually(120, || async {
        let doc = s.status(NAME);
        doc["primary"]["name"] == format!("{NAME}-1") && doc["phase"] == "Running"
    })
    .await;
    assert!(failed_over, "{}", s.status(NAME));
    up_finds_the_rows(&s, file, &password, 5).await;

    // A replica whose volume holds another database system's data (made here by initdb in a
    // throwaway container): it can never stream from the primary. It refuses to start, `up`
    // fails naming why, and its data is left as it was.
    assert_success(&s.pgbalancer(&["down", NAME, "--keep-data"]));
    let foreign = "rm -rf /var/lib/pgbalancer/data && initdb -D /var/lib/pgbalancer/data \
                   >/dev/null && touch /var/lib/pgbalancer/data/standby.signal";
    let mount = format!("{}:/var/lib/pgbalancer", volume(0));
    // A shell script run in a throwaway container on instance 0's volume.
    let in_volume = |script: &str| {
        let image = "pgbalancer/postgres:17";
        let out = docker_cli(&[
            "run",
            "--rm",
            "-v",
            &mount,
            "--entrypoint",
            "sh",
            image,
            "-c",
            script,
        ]);
        assert_success(&out);
        text(&out)
    };
    in_volume(foreign);
    let system = "pg_controldata /var/lib/pgbalancer/data | grep 'system identifier'";
    let before = in_volume(system);
    // Restarted by the controller if it started before the primary answered; `up` stops
    // waiting once the refusal has lasted (not at its timeout).
    let out = s.pgbalancer(&["up", "-f", file, "--timeout", "150"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!(
            "{NAME}-0 cannot start: the data directory /var/lib/pgbalancer/data belongs to \
             another database system"
        )),
        "{}",
        text(&out)
    );
    assert_success(&s.pgbalancer(&["down", NAME, "--keep-data"]));
    assert_eq!(before, in_volume(system), "the replica's data was changed");

    // down: nothing labelled remains, and the state is forgotten.
    let out = s.pgbalancer(&["down", NAME]);
    assert_success(&out);
    assert_eq!(labelled(NAME), Vec::<String>::new());
    assert!(!s
        .state()
        .join("clusters")
        .join(format!("{NAME}.yaml"))
        .exists());
    let out = s.pgbalancer(&["status", NAME]);
    assert!(!out.status.success());
    assert!(text(&out).contains("no cluster named"), "{}", text(&out));
}
