//! End to end on a real node (tests/k8s/node.sh: kubelet on this Docker engine, kube-proxy,
//! cluster DNS, host-path PVCs), with the operator running in the cluster from
//! manifests/operator.yaml under its own ServiceAccount and RBAC: pods Ready, a row written
//! through the balancer Service read on every replica, `kubectl scale` changing the streaming
//! set and the balancer's backends, `kubectl delete` leaving no pod, PVC or PV.
//! Prints the seconds each step took (the Kubernetes benchmark reads them).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::kube::session::PodSession;
use common::kube::*;
use common::{eventually, kubectl, text};
use serde_json::Value;

/// The balancer pods of the cluster `demo`.
const BALANCERS: &str = "app.kubernetes.io/instance=demo,app.kubernetes.io/component=balancer";

/// Whether every balancer pod's agent (`bctl --json nodes`, run in the pod against its own
/// REST port) reports exactly `n` nodes up; false while there is no balancer pod or no answer.
fn balancers_report_up(ns: &str, n: usize) -> bool {
    let pods = pod_ips(ns, BALANCERS);
    !pods.is_empty()
        && pods.iter().all(|(pod, _)| {
            let out = Command::new("kubectl")
                .args(["-n", ns, "exec", pod, "--", "bctl", "--json", "nodes"])
                .output();
            out.ok()
                .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
                .and_then(|v| {
                    v["nodes"]
                        .as_array()
                        .map(|nodes| nodes.iter().filter(|n| n["status"] == "up").count())
                })
                == Some(n)
        })
}

/// A session through the balancer Service, held in the client pod. The Service refuses
/// sessions while no balancer pod is ready; how long that lasted is printed, as it is an
/// outage to clients.
async fn through_service(ns: &str, password: &str) -> PodSession {
    let started = Instant::now();
    let mut last = None;
    while started.elapsed() < Duration::from_secs(60) {
        match PodSession::open(ns, "demo-balancer", 9999, password) {
            Ok(session) => {
                if last.is_some() {
                    eprintln!(
                        "MEASURED the balancer Service refused sessions for {:.1} s ({last:?}); balancer pods: {}",
                        started.elapsed().as_secs_f64(),
                        kubectl(&["-n", ns, "get", "pods", "-l", BALANCERS, "-o", "wide"]).1
                    );
                }
                return session;
            }
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("the balancer Service refused sessions for 60 s: {last:?}");
}

/// The rows of `marks` on the instance at pod address `ip`, asked from the client pod; `None`
/// when it cannot be read or the instance is not a replica (not in recovery).
fn rows_on(ns: &str, ip: &str, password: &str) -> Option<i64> {
    let sql = "SELECT pg_is_in_recovery(), (SELECT count(*) FROM marks)";
    let out = psql_in_cluster(ns, ip, 5432, password, sql)?;
    match out.split_once('|')? {
        ("t", count) => count.parse().ok(),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn operator_in_cluster_runs_a_real_cluster() {
    assert!(
        std::env::var_os("PGBALANCER_E2E").is_some(),
        "needs the node from tests/k8s/node.sh (scripts/test.sh starts it and sets PGBALANCER_E2E)"
    );
    let ns = "e2e";
    let sel = "app.kubernetes.io/instance=demo,app.kubernetes.io/component=postgres";

    // The operator from its own manifests: ServiceAccount, RBAC, two replicas.
    install_operator();
    let _ = kubectl(&["create", "namespace", ns]);

    let cluster = "apiVersion: pgbalancer.io/v1alpha1\nkind: PgBalancerCluster\nmetadata:\n  name: demo\nspec:\n  replicas: 2\n  postgres:\n    version: 17\n    storage: {size: 1Gi, fixPermissions: true}\n  balancer: {instances: 1, numInitChildren: 16, maxPool: 2}\n";
    let file = std::env::temp_dir().join("pgbalancer-e2e-cluster.yaml");
    std::fs::write(&file, cluster).unwrap();
    let started = Instant::now();
    let (ok, out) = kubectl(&["-n", ns, "apply", "-f", file.to_str().unwrap()]);
    assert!(ok, "{out}");
    let children = eventually(60, || async { pod_ips(ns, sel).len() == 3 }).await;
    let objects_created = started.elapsed().as_secs_f64();
    assert!(children, "instance pods not created");
    let running = eventually(300, || async {
        get_json(&["-n", ns, "get", "pgbc", "demo"])["status"]["phase"] == "Running"
    })
    .await;
    let ready_after = started.elapsed().as_secs_f64();
    assert!(
        running,
        "not Running: {}",
        get_json(&["-n", ns, "get", "pgbc", "demo"])["status"]
    );
    let attached = eventually(60, || async {
        get_json(&["-n", ns, "get", "pgbc", "demo"])["status"]["instances"]
            .as_array()
            .is_some_and(|i| i.len() == 3 && i.iter().all(|i| i["balancerNode"] == "up"))
    })
    .await;
    assert!(
        attached,
        "status lacks the balancer's view: {}",
        get_json(&["-n", ns, "get", "pgbc", "demo"])["status"]
    );
    println!("BENCH k8s_apply_to_pods_created_seconds {objects_created:.1}");
    println!("BENCH k8s_apply_to_ready_seconds {ready_after:.1}");

    // A row through the balancer Service, read on every replica. SQL to the Service and pod
    // addresses runs in the client pod, inside the cluster network.
    start_sql_client(ns);
    let password = secret(ns, "demo-credentials", "app-password");
    let through_balancer = |sql: &str| psql_in_cluster(ns, "demo-balancer", 9999, &password, sql);
    // The phase says the balancer routes; the Service follows once the kubelet reports the
    // pod ready and kube-proxy has the endpoint, which can come a moment later.
    let mut c = through_service(ns, &password).await;
    for sql in [
        "CREATE TABLE marks (n int)",
        "INSERT INTO marks SELECT generate_series(1, 3)",
    ] {
        c.query(sql).unwrap_or_else(|e| panic!("{e}"));
    }
    for (pod, ip) in pod_ips(ns, sel)
        .into_iter()
        .filter(|(p, _)| p != "demo-0-0")
    {
        let seen = eventually(60, || async { rows_on(ns, &ip, &password) == Some(3) }).await;
        assert!(seen, "{pod} does not stream the row");
    }

    // Sessions open through the balancer, each bound by pgpool to one node for its reads.
    let mut sessions = Vec::new();
    for _ in 0..6 {
        let mut session = through_service(ns, &password).await;
        let node = session
            .query("SHOW POOL_NODES")
            .unwrap_or_else(|e| panic!("{e}"))
            .records()
            .find(|r| r.get("load_balance_node") == Some(&"true"))
            .and_then(|r| r.get("node_id")?.parse::<u32>().ok())
            .expect("a load-balance node in SHOW POOL_NODES");
        sessions.push((node, session));
    }

    // kubectl scale: a new replica streams and the balancer routes to it, without a restart.
    let balancer_pods = pod_ips(ns, BALANCERS);
    let scaled = Instant::now();
    let (ok, out) = kubectl(&["-n", ns, "scale", "pgbc/demo", "--replicas=3"]);
    assert!(ok, "{out}");
    assert!(
        eventually(180, || async { balancers_report_up(ns, 4) }).await,
        "balancer did not attach the new replica"
    );
    println!(
        "BENCH k8s_scale_up_to_routed_seconds {:.1}",
        scaled.elapsed().as_secs_f64()
    );
    let new_ip = pod_ips(ns, sel)
        .into_iter()
        .find(|(p, _)| p == "demo-3-0")
        .expect("demo-3-0")
        .1;
    assert!(eventually(30, || async { rows_on(ns, &new_ip, &password) == Some(3) }).await);
    assert_eq!(pod_ips(ns, BALANCERS), balancer_pods, "balancer restarted");
    c.query("SELECT 1")
        .expect("session through the balancer survived scale up");
    for (node, session) in &mut sessions {
        session
            .query("SELECT count(*) FROM marks")
            .unwrap_or_else(|e| panic!("session on node {node} lost at scale up: {e}"));
    }

    // kubectl patch down to one replica: pods go, the balancer stops routing to them.
    patch_demo(ns, r#"{"spec":{"replicas":1}}"#);
    assert!(eventually(120, || async { pod_ips(ns, sel).len() == 2 }).await);
    assert!(eventually(120, || async { balancers_report_up(ns, 2) }).await);
    // Sessions reading from kept nodes go on; pgpool ends those bound to a removed replica.
    for (node, session) in sessions.iter_mut().filter(|(n, _)| *n <= 1) {
        session
            .query("SELECT count(*) FROM marks")
            .unwrap_or_else(|e| panic!("session on node {node} lost at scale down: {e}"));
    }
    assert!(
        sessions.iter().any(|(n, _)| *n <= 1),
        "no session was bound to a kept node"
    );
    drop((c, sessions));

    // The removed replicas' replication slots are dropped on the primary.
    let superuser = secret(ns, "demo-credentials", "superuser-password");
    let primary_ip = pod_ips(ns, sel)
        .into_iter()
        .find(|(p, _)| p == "demo-0-0")
        .expect("primary pod")
        .1;
    let slots_left = || {
        let sql = "SELECT slot_name FROM pg_replication_slots ORDER BY 1";
        psql_as_in_cluster(
            ns,
            &primary_ip,
            5432,
            ("postgres", "postgres"),
            &superuser,
            sql,
        )
        .map(|out| out.lines().map(str::to_owned).collect::<Vec<_>>())
    };
    let dropped = eventually(60, || async {
        slots_left() == Some(vec!["instance_1".to_owned()])
    })
    .await;
    assert!(dropped, "slots on the primary: {:?}", slots_left());

    // The primary moved by hand (the record's target changed): the operator fences demo-0,
    // promotes demo-1 in place and demo-0 rejoins as its replica. No StatefulSet template
    // changes, demo-1's pod is the same pod, writes through the balancer go on.
    let generations = || {
        let mut g: Vec<(String, i64)> = get_json(&["-n", ns, "get", "statefulsets", "-l", sel])
            ["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["metadata"]["name"].as_str().unwrap().to_owned(),
                    s["metadata"]["generation"].as_i64().unwrap(),
                )
            })
            .collect();
        g.sort();
        g
    };
    let pod_uid = |pod: &str| {
        get_json(&["-n", ns, "get", "pod", pod])["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let (before, replica_uid) = (generations(), pod_uid("demo-1-0"));
    let client = kube::Client::try_default().await.unwrap();
    let clusters: kube::Api<pgbalancer_crd::PgBalancerCluster> = kube::Api::namespaced(client, ns);
    // Status writes are conditional on the version read: a status the operator computed before
    // this patch is refused, never written over it.
    clusters
        .patch_status(
            "demo",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"status": {"targetPrimary": "demo-1"}})),
        )
        .await
        .unwrap();
    for _ in 0..5 {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let status = &get_json(&["-n", ns, "get", "pgbc", "demo"])["status"];
        assert!(
            status["targetPrimary"] == "demo-1" || status["currentPrimary"] == "demo-1",
            "the operator put the old target back: {status}"
        );
    }
    await_status(ns, "demo", 180, "primary not moved", |status| {
        status["currentPrimary"] == "demo-1" && status["phase"] == "Running"
    })
    .await;
    assert_eq!(
        generations(),
        before,
        "a change of primary changed a StatefulSet"
    );
    assert_eq!(
        pod_uid("demo-1-0"),
        replica_uid,
        "the promoted pod was recreated"
    );
    // Pods of removed replicas may still be terminating (the kubelet reports them gone
    // later): only the cluster's pods count.
    let labels = get_json(&["-n", ns, "get", "pods", "-l", sel])["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .map(|p| {
            (
                p["metadata"]["name"].as_str().unwrap().to_owned(),
                p["metadata"]["labels"]["pgbalancer.io/role"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                // Marked after the cluster had a primary: neither pod may make a new, empty
                // database should its volume come back empty.
                p["metadata"]["labels"]["pgbalancer.io/initialised"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect::<Vec<_>>();
    let marked = |name: &str, role: &str| (name.to_owned(), role.to_owned(), "true".to_owned());
    assert_eq!(
        labels,
        [marked("demo-0-0", "replica"), marked("demo-1-0", "primary")]
    );
    let wrote = eventually(60, || async {
        through_balancer("INSERT INTO marks VALUES (4)").is_some()
    })
    .await;
    assert!(wrote, "no write through the balancer after the move");
    let old_ip = pod_ips(ns, sel)
        .into_iter()
        .find(|(p, _)| p == "demo-0-0")
        .expect("old primary pod")
        .1;
    assert!(
        eventually(60, || async { rows_on(ns, &old_ip, &password) == Some(4) }).await,
        "the old primary does not stream from the new one"
    );

    // `kubectl pgbalancer switchover`: refused for the current primary (nothing touched), then
    // back to demo-0, the annotation handled by the operator.
    let plugin_dir = tempfile::tempdir().unwrap();
    let plugin = plugin_dir.path().join("kubectl-pgbalancer");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_pgbalancer"), &plugin).unwrap();
    let run_plugin = |args: &[&str]| {
        let out = Command::new(&plugin).args(args).output().unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (ok, out) = run_plugin(&["-n", ns, "switchover", "demo", "--to", "demo-1"]);
    assert!(!ok && out.contains("already the primary"), "{out}");
    assert_eq!(
        get_json(&["-n", ns, "get", "pgbc", "demo"])["status"]["currentPrimary"],
        "demo-1"
    );
    let (ok, out) = run_plugin(&["-n", ns, "switchover", "demo", "--to", "demo-0"]);
    assert!(ok, "{out}");
    assert!(out.contains("primary is demo-0"), "{out}");
    assert_eq!(generations(), before, "a switchover changed a StatefulSet");

    // Automated failover: the primary pod force-deleted. Its replacement gets no role while a
    // failover may start; the operator fences it, promotes demo-1 in place, and the replacement
    // rejoins as a replica. Writes through the balancer Service (from a pod) resume.
    assert_eq!(
        through_balancer("INSERT INTO marks VALUES (5) RETURNING n").as_deref(),
        Some("5")
    );
    let lost_at = Instant::now();
    delete_pod(ns, "demo-0-0", true);
    await_status(ns, "demo", 120, "no failover", |s| {
        s["currentPrimary"] == "demo-1"
    })
    .await;
    let resumed = eventually(60, || async {
        through_balancer("INSERT INTO marks VALUES (6)").is_some()
    })
    .await;
    assert!(resumed, "writes through the balancer did not resume");
    println!(
        "BENCH k8s_primary_pod_deleted_to_write_seconds {:.1}",
        lost_at.elapsed().as_secs_f64()
    );
    // Nothing acknowledged before the loss is missing; demo-0 streams from demo-1 again.
    assert_eq!(
        marks_on_primary(ns, &password).await.as_deref(),
        Some("1,2,3,4,5,6")
    );
    await_status(
        ns,
        "demo",
        180,
        "the old primary did not rejoin",
        |status| status["phase"] == "Running" && status["currentPrimary"] == "demo-1",
    )
    .await;
    let old_ip = pod_ips(ns, sel)
        .into_iter()
        .find(|(p, _)| p == "demo-0-0")
        .expect("replacement pod")
        .1;
    assert_eq!(
        psql_in_cluster(ns, &old_ip, 5432, &password, "SELECT pg_is_in_recovery()").as_deref(),
        Some("t"),
        "the old primary came back writable"
    );
    let events = kubectl(&[
        "-n",
        ns,
        "get",
        "events",
        "--field-selector",
        "involvedObject.kind=PgBalancerCluster",
    ])
    .1;
    assert!(events.contains("FailoverStarted"), "{events}");
    assert_eq!(generations(), before, "a failover changed a StatefulSet");

    // An isolated primary steps down by itself. The operator is told to wait long before a
    // failover, and demo-1's pod network is cut (iptables in the pod's network namespace): no
    // standby replies and the API server does not answer, so its liveness check fails and the
    // kubelet stops PostgreSQL; the restarted container does not start it while cut off.
    // Joined again, it comes back as the primary and writes resume.
    patch_failover_delay(ns, 300);
    let restarts = || {
        get_json(&["-n", ns, "get", "pod", "demo-1-0"])["status"]["containerStatuses"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["name"] == "postgres"))
            .and_then(|c| c["restartCount"].as_u64())
            .unwrap_or(0)
    };
    let restarts_before = restarts();
    let accepting = || {
        kubectl(&[
            "-n",
            ns,
            "exec",
            "demo-1-0",
            "-c",
            "postgres",
            "--",
            "pg_isready",
            "-h",
            "/var/run/postgresql",
        ])
    };
    assert!(accepting().0, "the primary does not answer before the cut");
    let cut_at = Instant::now();
    let cut = NetworkCut::pod(ns, "demo-1-0");
    // Stepped down: PostgreSQL refuses connections (shutting down, or not started again).
    let stepped_down = eventually(120, || async { !accepting().0 }).await;
    let step_down_seconds = cut_at.elapsed().as_secs_f64();
    let restarted = eventually(120, || async { restarts() > restarts_before }).await;
    let writable_while_cut = accepting();
    drop(cut);
    assert!(
        stepped_down && restarted,
        "the isolated primary did not step down: {}",
        kubectl(&["-n", ns, "describe", "pod", "demo-1-0"]).1
    );
    println!("BENCH k8s_isolated_primary_stepped_down_seconds {step_down_seconds:.1}");
    assert!(
        !writable_while_cut.0,
        "PostgreSQL answered on the cut-off primary after it stepped down: {}",
        writable_while_cut.1
    );
    let events = kubectl(&[
        "-n",
        ns,
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=demo-1-0",
    ])
    .1;
    assert!(events.contains("stepping down: isolated"), "{events}");
    let resumed = eventually(180, || async {
        through_balancer("INSERT INTO marks VALUES (7)").is_some()
    })
    .await;
    assert!(
        resumed,
        "writes did not resume once the primary was joined again"
    );
    assert_eq!(
        get_json(&["-n", ns, "get", "pgbc", "demo"])["status"]["currentPrimary"],
        "demo-1"
    );
    patch_failover_delay(ns, 2);
    // Replication is asynchronous: the next failover keeps what demo-0 has received, so it
    // starts once mark 7 is there (a write acknowledged before its replica reconnected could
    // be lost by design; synchronous replication is the option that rules that out).
    let replicated = eventually(120, || async {
        pod_ips(ns, sel).iter().any(|(p, ip)| {
            p == "demo-0-0"
                && psql_in_cluster(
                    ns,
                    ip,
                    5432,
                    &password,
                    "SELECT count(*) FROM marks WHERE n = 7",
                )
                .as_deref()
                    == Some("1")
        })
    })
    .await;
    assert!(replicated, "mark 7 never reached demo-0");

    // The operator killed in the middle of a failover: demo-1's pod force-deleted, and once the
    // failover is recorded (targetPrimary moved) the leading operator pod is killed too. The
    // other operator replica takes the lease and finishes: demo-0 writable, nothing lost,
    // demo-1 back as its replica.
    delete_pod(ns, "demo-1-0", true);
    await_status(ns, "demo", 60, "no failover recorded", |s| {
        s["targetPrimary"] == "demo-0"
    })
    .await;
    kill_leading_operator();
    await_status(
        ns,
        "demo",
        180,
        "the failover did not finish after the operator was killed",
        |status| status["phase"] == "Running" && status["currentPrimary"] == "demo-0",
    )
    .await;
    let resumed = eventually(60, || async {
        through_balancer("INSERT INTO marks VALUES (8)").is_some()
    })
    .await;
    assert!(resumed, "writes did not resume after the second failover");
    assert_eq!(
        marks_on_primary(ns, &password).await.as_deref(),
        Some("1,2,3,4,5,6,7,8")
    );
    let rejoined = eventually(120, || async {
        pod_ips(ns, sel).iter().any(|(p, ip)| {
            p == "demo-1-0"
                && psql_in_cluster(ns, ip, 5432, &password, "SELECT pg_is_in_recovery()").as_deref()
                    == Some("t")
        })
    })
    .await;
    assert!(rejoined, "demo-1 did not rejoin as a replica");
    native_engine(ns, &password, &run_plugin).await;
    let _ = kubectl(&["-n", ns, "delete", "pod", "sql-client", "--wait=false"]);

    // No secret in the resource, its status or description, Events, pod specs, the
    // operator's logs or the instances' logs (after failovers, switchovers and step-downs).
    let secrets: Vec<String> = get_json(&["-n", ns, "get", "secret", "demo-credentials"])["data"]
        .as_object()
        .expect("credentials")
        .keys()
        .map(|k| secret(ns, "demo-credentials", k))
        .filter(|v| v.len() >= 16)
        .collect();
    assert!(secrets.len() >= 4, "too few secrets: {}", secrets.len());
    // And the balancer's TLS key (a line of its PEM text).
    let mut secrets = secrets;
    let key = secret(ns, "demo-balancer-tls", "tls.key");
    secrets.push(key.lines().nth(1).expect("a PEM key").to_owned());
    let places = [
        kubectl(&["-n", ns, "get", "pgbc", "demo", "-o", "yaml"]),
        kubectl(&["-n", ns, "describe", "pgbc", "demo"]),
        kubectl(&["-n", ns, "get", "events", "-o", "yaml"]),
        kubectl(&[
            "-n",
            ns,
            "get",
            "pods,statefulsets,deployments,configmaps",
            "-o",
            "yaml",
        ]),
        kubectl(&["-n", ns, "describe", "pods"]),
        kubectl(&[
            "-n",
            "pgbalancer-system",
            "logs",
            "-l",
            "app.kubernetes.io/name=pgbalancer-operator",
            "--tail=-1",
        ]),
        kubectl(&["-n", ns, "logs", "demo-0-0", "-c", "postgres", "--tail=-1"]),
        kubectl(&[
            "-n",
            ns,
            "logs",
            "-l",
            "app.kubernetes.io/component=balancer",
            "--tail=-1",
        ]),
    ];
    for (i, (ok, content)) in places.iter().enumerate() {
        assert!(ok, "place #{i}: {content}");
        for secret in &secrets {
            assert!(!content.contains(secret.as_str()), "a secret in place #{i}");
        }
    }

    // kubectl delete: no pod, PVC or PV left.
    let (ok, out) = kubectl(&["-n", ns, "delete", "pgbc", "demo"]);
    assert!(ok, "{out}");
    let gone = eventually(180, || async {
        let pods = get_json(&["-n", ns, "get", "pods"]);
        let pvcs = get_json(&["-n", ns, "get", "pvc"]);
        let pvs = get_json(&["get", "pv"]);
        [pods, pvcs, pvs]
            .iter()
            .all(|v| v["items"].as_array().is_some_and(|a| a.is_empty()))
    })
    .await;
    assert!(
        gone,
        "left behind: {}",
        kubectl(&["get", "pods,pvc,pv", "-A"]).1
    );
    uninstall_operator();
}

/// The native engine on Kubernetes (demo-0 primary, demo-1 its replica): `engine: native`
/// rolls the balancer pods; through the Service a session reads each of its writes, reads and
/// read-only transactions are served by the replica, and after a switchover writes go on
/// through the same balancer pods.
async fn native_engine(ns: &str, password: &str, run_plugin: &dyn Fn(&[&str]) -> (bool, String)) {
    let through_balancer = |sql: &str| psql_in_cluster(ns, "demo-balancer", 9999, password, sql);
    // With TLS required: psql's default `sslmode=prefer` below takes it without being told.
    patch_demo(
        ns,
        r#"{"spec":{"balancer":{"engine":"native","tls":{"mode":"required"},"readOnlyTransactions":"replica"}}}"#,
    );
    let started = Instant::now();
    let native = eventually(180, || async {
        (0..5).all(|_| {
            through_balancer("SHOW POOL_VERSION")
                .is_some_and(|v| v.starts_with("pgbalancer native"))
        })
    })
    .await;
    assert!(
        native,
        "the balancer Service does not reach the native engine: {}",
        kubectl(&["-n", ns, "get", "pods", "-o", "wide"]).1
    );
    println!(
        "BENCH k8s_engine_change_seconds {:.1}",
        started.elapsed().as_secs_f64()
    );
    // Every balancer pod runs the new settings (no pgpool pod without TLS left behind).
    let (ok, out) = kubectl(&[
        "-n",
        ns,
        "rollout",
        "status",
        "deployment/demo-balancer",
        "--timeout=180s",
    ]);
    assert!(ok, "{out}");
    balancer_tls(ns, password);

    // Read-your-writes: one session, each statement its own query, each read right after
    // its write.
    assert!(through_balancer("CREATE TABLE ryw (id int PRIMARY KEY)").is_some());
    let script: String = (1..=50)
        .map(|i| {
            format!("INSERT INTO ryw VALUES ({i});\nSELECT count(*) FROM ryw WHERE id = {i};\n")
        })
        .collect();
    let seen = psql_script_in_cluster(ns, "demo-balancer", 9999, password, &script)
        .expect("the read-your-writes session failed");
    assert_eq!(seen.lines().filter(|l| *l == "1").count(), 50, "{seen}");

    // Reads outside a transaction go to the replica.
    let answers: Vec<_> = (0..20)
        .map(|_| through_balancer("SELECT pg_is_in_recovery()"))
        .collect();
    assert!(answers.iter().all(Option::is_some), "{answers:?}");
    assert!(
        answers.iter().any(|a| a.as_deref() == Some("t")),
        "no read reached the replica: {answers:?}"
    );
    // Read-only transactions go there too (`readOnlyTransactions: replica`).
    let transactions: Vec<_> = (0..20)
        .map(|_| {
            psql_script_in_cluster(
                ns,
                "demo-balancer",
                9999,
                password,
                "BEGIN READ ONLY;\nSELECT pg_is_in_recovery();\nCOMMIT;\n",
            )
        })
        .collect();
    assert!(transactions.iter().all(Option::is_some), "{transactions:?}");
    assert!(
        transactions.iter().any(|a| a.as_deref() == Some("t")),
        "no read-only transaction reached the replica: {transactions:?}"
    );

    // A switchover: the same balancer pods send writes to the new primary.
    let pods = || {
        let mut names = get_json(&[
            "-n",
            ns,
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/component=balancer",
        ])["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
            .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_owned))
            .collect::<Vec<_>>();
        names.sort();
        names
    };
    let before = pods();
    let (ok, out) = run_plugin(&["-n", ns, "switchover", "demo", "--to", "demo-1"]);
    assert!(ok, "{out}");
    let resumed = eventually(60, || async {
        through_balancer("INSERT INTO ryw VALUES (51) RETURNING pg_is_in_recovery()").as_deref()
            == Some("f")
    })
    .await;
    assert!(
        resumed,
        "writes through the native engine did not resume after the switchover"
    );
    assert_eq!(
        through_balancer("SELECT count(*) FROM ryw").as_deref(),
        Some("51")
    );
    assert_eq!(pods(), before, "the balancer pods changed in a switchover");
}

/// TLS through the balancer Service, as a client in the cluster sees it: the generated
/// certificate verifies against the CA in `demo-balancer-tls` by the Service's names, and a
/// plain-text session is refused.
fn balancer_tls(ns: &str, password: &str) {
    let ca = secret(ns, "demo-balancer-tls", "ca.crt");
    assert!(
        ca.contains("BEGIN CERTIFICATE"),
        "no CA in demo-balancer-tls"
    );
    let mut put = Command::new("kubectl")
        .args(["-n", ns, "exec", "-i", "sql-client", "--", "sh", "-c"])
        .arg("cat > /tmp/ca.crt")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut put.stdin.take().unwrap(), ca.as_bytes()).unwrap();
    assert!(put.wait().unwrap().success(), "the CA could not be copied");
    // The Service's address: libpq connects there and verifies the name given as the host
    // (the test node's DNS answers short names and full names, not `<svc>.<ns>.svc`).
    let service_ip = get_json(&["-n", ns, "get", "service", "demo-balancer"])["spec"]["clusterIP"]
        .as_str()
        .expect("a ClusterIP")
        .to_owned();
    let psql = |host: &str, sslmode: &str| {
        let out = Command::new("kubectl")
            .args(["-n", ns, "exec", "sql-client", "--", "env"])
            .arg(format!("PGPASSWORD={password}"))
            .arg(format!("PGSSLMODE={sslmode}"))
            .arg(format!("PGHOSTADDR={service_ip}"))
            .args([
                "PGSSLROOTCERT=/tmp/ca.crt",
                "PGCONNECT_TIMEOUT=5",
                "psql",
                "-X",
            ])
            .args(["-h", host, "-p", "9999", "-U", "app", "-d", "app"])
            .args(["-c", "\\conninfo"])
            .output()
            .unwrap();
        (out.status.success(), text(&out))
    };
    for host in [
        "demo-balancer",
        &format!("demo-balancer.{ns}"),
        &format!("demo-balancer.{ns}.svc"),
        &format!("demo-balancer.{ns}.svc.cluster.local"),
    ] {
        let (ok, out) = psql(host, "verify-full");
        assert!(
            ok && out.to_lowercase().contains("ssl connection"),
            "verify-full to {host}: {out}"
        );
    }
    let (ok, out) = psql("not-the-balancer.example", "verify-full");
    assert!(
        !ok && out.contains("does not match host name"),
        "a name the certificate is not for was accepted: {out}"
    );
    let (ok, out) = psql("demo-balancer", "disable");
    assert!(
        !ok && out.contains("TLS"),
        "plain text through the balancer: {out}"
    );
}

fn patch_failover_delay(ns: &str, seconds: u32) {
    patch_demo(
        ns,
        &format!("{{\"spec\":{{\"failover\":{{\"delaySeconds\":{seconds}}}}}}}"),
    );
}

/// `kubectl patch --type=merge` of the cluster `demo` in `ns`.
fn patch_demo(ns: &str, patch: &str) {
    let (ok, out) = kubectl(&[
        "-n",
        ns,
        "patch",
        "pgbc",
        "demo",
        "--type=merge",
        "-p",
        patch,
    ]);
    assert!(ok, "{out}");
}

/// A pod cut off from the network: every packet on its interface dropped, from inside the
/// pod's network namespace (so the kubelet and the exec channel still work). Undone on drop.
struct NetworkCut {
    pid: String,
}

impl NetworkCut {
    const RULES: [[&'static str; 5]; 2] = [
        ["INPUT", "-i", "eth0", "-j", "DROP"],
        ["OUTPUT", "-o", "eth0", "-j", "DROP"],
    ];

    fn pod(ns: &str, pod: &str) -> Self {
        let out = Command::new("docker")
            .args(["ps", "-q", "--filter"])
            .arg(format!("label=io.kubernetes.pod.name={pod}"))
            .arg("--filter")
            .arg(format!("label=io.kubernetes.pod.namespace={ns}"))
            .args(["--filter", "label=io.kubernetes.docker.type=podsandbox"])
            .output()
            .expect("docker ps");
        let sandbox = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(!sandbox.is_empty(), "no sandbox for pod {pod}");
        let out = Command::new("docker")
            .args(["inspect", "-f", "{{.State.Pid}}", &sandbox])
            .output()
            .expect("docker inspect");
        let pid = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let cut = NetworkCut { pid };
        for rule in Self::RULES {
            cut.iptables("-I", &rule);
        }
        cut
    }

    fn iptables(&self, op: &str, rule: &[&str]) {
        let status = Command::new("nsenter")
            .args(["-t", &self.pid, "-n", "iptables", op, rule[0]])
            .args(&rule[1..])
            .status()
            .expect("nsenter");
        assert!(status.success(), "iptables {op} {rule:?} in {}", self.pid);
    }
}

impl Drop for NetworkCut {
    fn drop(&mut self) {
        for rule in Self::RULES {
            let _ = Command::new("nsenter")
                .args(["-t", &self.pid, "-n", "iptables", "-D", rule[0]])
                .args(&rule[1..])
                .status();
        }
    }
}

/// The marks on the primary (through the `-rw` Service, from the client pod), retried for up to
/// 30 s while sessions are cut by a change of primary; the last answer.
async fn marks_on_primary(ns: &str, password: &str) -> Option<String> {
    let sql = "SELECT string_agg(n::text, ',' ORDER BY n) FROM marks";
    let mut last = None;
    for _ in 0..30 {
        last = psql_in_cluster(ns, "demo-rw", 5432, password, sql);
        if last.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
    last
}
