//! The operator against a real kube-apiserver + etcd + kube-controller-manager (started by
//! tests/k8s/control-plane.sh; KUBECONFIG points at it): CRD install, children with owner and
//! labels, status and printer columns, `kubectl scale` / `kubectl patch` both ways, an invalid
//! spec (Degraded, nothing touched), a no-op reconcile that writes nothing, an operator
//! restart mid-way, two operators with one leader, and deletion with garbage collection.

mod common;

use std::time::Duration;

use common::{eventually, kubectl};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{
    ConfigMap, Namespace, PersistentVolumeClaim, Pod, Secret, Service,
};
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};
use pgbalancer_controller::backend::kube::operator::{run_with, OperatorConfig, Probe};
use pgbalancer_crd::PgBalancerCluster;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn metric(port: u16, name: &str) -> u64 {
    let text = ureq::get(&format!("http://127.0.0.1:{port}/metrics"))
        .call()
        .map(|r| r.into_string().unwrap())
        .unwrap_or_default();
    // The sum over the metric's series, labelled (`name{…} v`) or not (`name v`).
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with([' ', '{']))
        })
        .filter_map(|l| {
            l.rsplit_once(' ')
                .and_then(|(_, v)| v.trim().parse::<u64>().ok())
        })
        .sum()
}

fn start_operator(
    client: &Client,
    ns: &str,
    identity: &str,
    port: u16,
) -> tokio::task::JoinHandle<()> {
    let config = OperatorConfig {
        namespace: Some(ns.to_owned()),
        lease_namespace: Some(ns.to_owned()),
        listen: format!("127.0.0.1:{port}"),
        identity: Some(identity.to_owned()),
        leader_elect: true,
        // From the host: no SQL to pod addresses; roles and readiness come from the pods.
        probe: Probe::Off,
    };
    let client = client.clone();
    tokio::spawn(async move {
        let _ = run_with(client, config).await;
    })
}

async fn names<K>(api: &Api<K>, selector: &str) -> Vec<String>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut n: Vec<String> = api
        .list(&ListParams::default().labels(selector))
        .await
        .unwrap()
        .iter()
        .map(|o| o.name_any())
        .collect();
    n.sort();
    n
}

#[tokio::test(flavor = "multi_thread")]
async fn operator_against_a_real_api_server() {
    assert!(
        std::env::var_os("KUBECONFIG").is_some(),
        "KUBECONFIG must point at the test cluster (scripts/test.sh starts it)"
    );
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let (ok, out) = kubectl(&[
        "apply",
        "-f",
        root.join("manifests/crd.yaml").to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    let (ok, out) = kubectl(&[
        "wait",
        "--for",
        "condition=Established",
        "crd/pgbalancerclusters.pgbalancer.io",
        "--timeout",
        "30s",
    ]);
    assert!(ok, "{out}");

    let client = Client::try_default().await.unwrap();
    let ns = format!("it-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let mut namespace = Namespace::default();
    namespace.metadata.name = Some(ns.clone());
    namespaces
        .create(&PostParams::default(), &namespace)
        .await
        .unwrap();

    let port = free_port();
    let operator = start_operator(&client, &ns, "op-a", port);
    let clusters: Api<PgBalancerCluster> = Api::namespaced(client.clone(), &ns);
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
    let sel = "app.kubernetes.io/instance=demo";

    // Apply the example: every child, owned and labelled. The test node's host-path volumes
    // belong to root: the opt-in init container hands them to the PostgreSQL user.
    let dir = tempfile::tempdir().unwrap();
    let example = dir.path().join("cluster.yaml");
    std::fs::write(
        &example,
        std::fs::read_to_string(root.join("examples/cluster.yaml"))
            .unwrap()
            .replace(
                "      size: 1Gi\n",
                "      size: 1Gi\n      fixPermissions: true\n",
            )
            .replace("numInitChildren: 32", "numInitChildren: 8")
            .replace("maxPool: 4", "maxPool: 2"),
    )
    .unwrap();
    let (ok, out) = kubectl(&["-n", &ns, "apply", "-f", example.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(
        eventually(30, || async { names(&sets, sel).await.len() == 3 }).await,
        "statefulsets not created"
    );
    let uid = clusters.get("demo").await.unwrap().uid().unwrap();
    for sts in sets.list(&ListParams::default().labels(sel)).await.unwrap() {
        let owner = &sts.owner_references()[0];
        assert_eq!(
            (owner.uid.as_str(), owner.controller),
            (uid.as_str(), Some(true))
        );
        assert_eq!(
            sts.labels()["app.kubernetes.io/managed-by"],
            "pgbalancer-operator"
        );
        assert_eq!(sts.spec.as_ref().unwrap().replicas, Some(1));
    }
    assert_eq!(names(&sets, sel).await, ["demo-0", "demo-1", "demo-2"]);
    assert_eq!(
        names(&services, sel).await,
        ["demo-balancer", "demo-hl", "demo-ro", "demo-rw"]
    );
    assert_eq!(names(&maps, sel).await, ["demo-balancer", "demo-postgres"]);
    assert_eq!(
        names(&secrets, sel).await,
        ["demo-balancer", "demo-credentials", "demo-postgres"]
    );
    // Each instance's PVC is created by the operator, owned by the cluster from the start.
    for claim in claims
        .list(&ListParams::default().labels(sel))
        .await
        .unwrap()
    {
        assert_eq!(claim.owner_references()[0].uid, uid, "{}", claim.name_any());
    }
    // The balancer comes once every instance serves: the primary pod is labelled primary at
    // runtime (no role in any template), the replicas clone through demo-rw and stream.
    assert!(
        eventually(180, || async {
            clusters
                .get_status("demo")
                .await
                .ok()
                .and_then(|c| c.status)
                .and_then(|s| s.phase)
                .as_deref()
                == Some("Running")
        })
        .await,
        "not Running: {:?}",
        clusters
            .get_status("demo")
            .await
            .ok()
            .and_then(|c| c.status)
    );
    assert_eq!(names(&deployments, sel).await, ["demo-balancer"]);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let roles: Vec<(String, String)> = pods
        .list(&ListParams::default().labels(&format!("{sel},app.kubernetes.io/component=postgres")))
        .await
        .unwrap()
        .iter()
        .map(|p| (p.name_any(), p.labels()["pgbalancer.io/role"].clone()))
        .collect();
    assert_eq!(
        roles,
        [
            ("demo-0-0".to_owned(), "primary".to_owned()),
            ("demo-1-0".to_owned(), "replica".to_owned()),
            ("demo-2-0".to_owned(), "replica".to_owned())
        ]
    );
    let password =
        secrets.get("demo-credentials").await.unwrap().data.unwrap()["superuser-password"].clone();

    // Status and printer columns.
    assert!(
        eventually(30, || async {
            clusters
                .get_status("demo")
                .await
                .ok()
                .and_then(|c| c.status)
                .is_some_and(|s| s.replicas == 2 && s.observed_generation == Some(1))
        })
        .await
    );
    let status = clusters.get_status("demo").await.unwrap().status.unwrap();
    assert_eq!(status.current_primary.as_deref(), Some("demo-0"));
    assert_eq!(status.target_primary.as_deref(), Some("demo-0"));
    assert_eq!(status.ready_replicas, 2);
    assert!(status
        .selector
        .unwrap()
        .contains("app.kubernetes.io/instance=demo"));
    let types: Vec<_> = status.conditions.iter().map(|c| c.type_.as_str()).collect();
    assert_eq!(types, ["Ready", "Progressing", "Degraded"]);
    let (ok, out) = kubectl(&["-n", &ns, "get", "pgbc"]);
    assert!(
        ok && out.contains("REPLICAS")
            && out.contains("PRIMARY")
            && out.contains("PHASE")
            && out.contains("demo-0"),
        "{out}"
    );

    // A reconcile with nothing to change writes nothing.
    let writes = metric(port, "pgbalancer_operator_api_writes_total");
    let reconciles = metric(port, "pgbalancer_operator_reconciles_total");
    assert!(writes > 0, "creating the cluster counted no API writes");
    assert!(kubectl(&["-n", &ns, "annotate", "pgbc", "demo", "touched=1"]).0);
    assert!(
        eventually(60, || async {
            metric(port, "pgbalancer_operator_reconciles_total") > reconciles
        })
        .await
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        metric(port, "pgbalancer_operator_api_writes_total"),
        writes,
        "a no-op reconcile wrote"
    );

    // kubectl scale up, then kubectl patch down: instances follow, the primary stays, PVCs go.
    let (ok, out) = kubectl(&["-n", &ns, "scale", "pgbc/demo", "--replicas=3"]);
    assert!(ok, "{out}");
    assert!(eventually(30, || async { names(&sets, sel).await.len() == 4 }).await);
    let conf = maps.get("demo-balancer").await.unwrap().data.unwrap()["pgpool.conf"].clone();
    assert!(
        conf.contains("backend_hostname3 = 'demo-3-0.demo-hl'"),
        "{conf}"
    );
    let (ok, out) = kubectl(&[
        "-n",
        &ns,
        "patch",
        "pgbc",
        "demo",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"replicas":1}}"#,
    ]);
    assert!(ok, "{out}");
    assert!(
        eventually(30, || async {
            names(&sets, sel).await == ["demo-0", "demo-1"]
        })
        .await,
        "{:?}",
        names(&sets, sel).await
    );
    // PVCs go once their pods have stopped (pvc-protection); bounded generously.
    assert!(
        eventually(120, || async {
            names(&claims, sel)
                .await
                .iter()
                .all(|c| c == "data-demo-0-0" || c == "data-demo-1-0")
        })
        .await
    );
    let conf = maps.get("demo-balancer").await.unwrap().data.unwrap()["pgpool.conf"].clone();
    assert!(!conf.contains("backend_hostname2"), "{conf}");

    // An invalid spec: Degraded with the field named, an Event, nothing touched.
    let before: Vec<String> = sets
        .list(&ListParams::default().labels(sel))
        .await
        .unwrap()
        .iter()
        .map(|s| s.resource_version().unwrap())
        .collect();
    let (ok, out) = kubectl(&[
        "-n",
        &ns,
        "patch",
        "pgbc",
        "demo",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"postgres":{"version":16}}}"#,
    ]);
    assert!(ok, "{out}");
    assert!(
        eventually(60, || async {
            clusters
                .get_status("demo")
                .await
                .unwrap()
                .status
                .unwrap()
                .conditions
                .iter()
                .any(|c| {
                    c.type_ == "Degraded"
                        && c.status == "True"
                        && c.message.contains("spec.postgres.version")
                })
        })
        .await
    );
    let after: Vec<String> = sets
        .list(&ListParams::default().labels(sel))
        .await
        .unwrap()
        .iter()
        .map(|s| s.resource_version().unwrap())
        .collect();
    assert_eq!(before, after, "an invalid spec changed StatefulSets");
    let (_, events) = kubectl(&[
        "-n",
        &ns,
        "get",
        "events",
        "--field-selector",
        "reason=InvalidSpec",
    ]);
    assert!(events.contains("spec.postgres.version"), "{events}");
    assert!(
        kubectl(&[
            "-n",
            &ns,
            "patch",
            "pgbc",
            "demo",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"postgres":{"version":17}}}"#
        ])
        .0
    );
    assert!(
        eventually(60, || async {
            clusters
                .get_status("demo")
                .await
                .unwrap()
                .status
                .unwrap()
                .conditions
                .iter()
                .any(|c| c.type_ == "Degraded" && c.status == "False")
        })
        .await
    );

    // Operator restarted mid-way: no duplicate and no lost object.
    let (ok, out) = kubectl(&["-n", &ns, "scale", "pgbc/demo", "--replicas=4"]);
    assert!(ok, "{out}");
    tokio::time::sleep(Duration::from_millis(150)).await;
    operator.abort();
    let _ = operator.await;
    let port2 = free_port();
    let operator = start_operator(&client, &ns, "op-a", port2);
    assert!(
        eventually(30, || async {
            names(&sets, sel).await == ["demo-0", "demo-1", "demo-2", "demo-3", "demo-4"]
        })
        .await,
        "{:?}",
        names(&sets, sel).await
    );
    assert_eq!(names(&services, sel).await.len(), 4);
    assert_eq!(names(&deployments, sel).await.len(), 1);
    assert_eq!(
        secrets.get("demo-credentials").await.unwrap().data.unwrap()["superuser-password"],
        password,
        "credentials were regenerated"
    );

    // A second operator waits for the lease instead of reconciling too.
    let port3 = free_port();
    let standby = start_operator(&client, &ns, "op-b", port3);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ready = |p: u16| {
        ureq::get(&format!("http://127.0.0.1:{p}/readyz"))
            .call()
            .is_ok()
    };
    assert!(ready(port2), "leader not ready");
    assert!(!ready(port3), "standby claims to lead");
    assert_eq!(metric(port3, "pgbalancer_operator_reconciles_total"), 0);
    standby.abort();

    // Delete: garbage collection removes every child, PVCs and pods included, every time.
    // (No PodDisruptionBudget here: Kubernetes 1.20 serves no policy/v1, so none is made.)
    for round in 0..5 {
        if round > 0 {
            let (ok, out) = kubectl(&["-n", &ns, "apply", "-f", example.to_str().unwrap()]);
            assert!(ok, "{out}");
            assert!(
                eventually(60, || async {
                    names(&sets, sel).await.len() == 3 && names(&claims, sel).await.len() == 3
                })
                .await,
                "round {round}: not created: {:?} {:?}",
                names(&sets, sel).await,
                names(&claims, sel).await
            );
        }
        let (ok, out) = kubectl(&["-n", &ns, "delete", "pgbc", "demo", "--wait=true"]);
        assert!(ok, "{out}");
        // Pods end after their grace period: generous.
        assert!(
            eventually(180, || async {
                names(&sets, sel).await.is_empty()
                    && names(&services, sel).await.is_empty()
                    && names(&maps, sel).await.is_empty()
                    && names(&secrets, sel).await.is_empty()
                    && names(&deployments, sel).await.is_empty()
                    && names(&claims, sel).await.is_empty()
                    && names(&pods, sel).await.is_empty()
            })
            .await,
            "round {round}: children left after delete: {:?} {:?} {:?} {:?}",
            names(&sets, sel).await,
            names(&secrets, sel).await,
            names(&claims, sel).await,
            names(&pods, sel).await
        );
    }
    operator.abort();
    let _ = kubectl(&["delete", "namespace", &ns, "--wait=false"]);
}
