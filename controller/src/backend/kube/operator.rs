//! `pgbalancer operator`: the controller process. Holds the leader Lease (in its own namespace
//! unless told otherwise; none with `--leader-elect=false`), watches `PgBalancerCluster`s and
//! every child kind it owns (label-selected), and serves `/metrics`, `/healthz` and `/readyz`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::http::header;
use axum::routing::get;
use axum::Router;
use clap::Args;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Secret, Service};
use kube::api::Api;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{watcher, Controller};
use kube::{Client, ResourceExt};
use pgbalancer_crd::PgBalancerCluster;
use thiserror::Error;

use super::leader;
use super::metrics::{self, Metrics};
use super::reconcile::{error_policy, reconcile, Context};
use crate::labels;

/// Options of `pgbalancer operator`.
#[derive(Args, Debug, Clone)]
pub struct OperatorConfig {
    /// Watch only this namespace (all namespaces when absent).
    #[arg(long, env = "PGBALANCER_WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    /// Namespace of the leader-election Lease. Default: the operator's own namespace in a pod
    /// (POD_NAMESPACE, else its service account's), otherwise the kubeconfig context's
    /// namespace (`default` when the context names none).
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "PGBALANCER_OPERATOR_LISTEN",
        default_value = "0.0.0.0:8080"
    )]
    pub listen: String,
    /// This replica's identity in the Lease (the pod name in a cluster).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Elect a leader through a Lease, so that several operators are safe. With
    /// `--leader-elect=false` this process reconciles at once, without a Lease: run only one.
    #[arg(
        long,
        default_value_t = true,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub leader_elect: bool,
    /// Probe PostgreSQL and the balancer agents at pod addresses (needed for failover):
    /// `auto` does when the operator runs in a pod.
    #[arg(long, value_enum, default_value_t = Probe::Auto, env = "PGBALANCER_PROBE")]
    pub probe: Probe,
}

/// Whether the operator reaches pod addresses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Probe {
    /// In a pod: yes; against a kubeconfig from outside: no.
    #[default]
    Auto,
    /// Always.
    On,
    /// Never: roles from pod labels, readiness from pods, no automated failover.
    Off,
}

/// Why the operator stopped.
#[derive(Debug, Error)]
pub enum OperatorError {
    /// No usable kubeconfig or in-cluster configuration.
    #[error("cannot configure the Kubernetes client")]
    Client(#[source] kube::Error),
    /// The CRD is not installed.
    #[error("the PgBalancerCluster CRD is not installed (kubectl apply -f manifests/crd.yaml)")]
    NoCrd(#[source] kube::Error),
    /// The API server answered a list of clusters with a refusal (RBAC, authentication).
    #[error("the API server refused to list PgBalancerClusters")]
    Refused(#[source] kube::Error),
    /// The health server could not start.
    #[error("cannot listen on {0}")]
    Listen(String, #[source] std::io::Error),
}

/// Waits until the API server answers a list of clusters. An API server that does not answer
/// yet (it restarts, or the node's network is not up) is waited for, every 2 s, with one log
/// line; a refusal (401, 403) for at most [`REFUSALS_FOR`], as a restarting API server may
/// refuse until its caches are filled. A missing CRD, a lasting refusal or a local error ends
/// the operator with the reason.
async fn reachable(clusters: &Api<PgBalancerCluster>) -> Result<(), OperatorError> {
    let mut said = false;
    let mut refused_since = None;
    loop {
        let e = match clusters
            .list(&kube::api::ListParams::default().limit(1))
            .await
        {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => {
                return Err(OperatorError::NoCrd(kube::Error::Api(status)))
            }
            Err(e) => e,
        };
        match Failure::of(&e) {
            Failure::Lasting => return Err(OperatorError::Refused(e)),
            Failure::Refused
                if refused_since
                    .get_or_insert_with(std::time::Instant::now)
                    .elapsed()
                    > REFUSALS_FOR =>
            {
                return Err(OperatorError::Refused(e))
            }
            Failure::Refused | Failure::Passing => {}
        }
        if !said {
            tracing::warn!(error = %e, "the API server does not answer yet; waiting");
            said = true;
        }
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
}

/// How long [`reachable`] waits while the API server refuses.
const REFUSALS_FOR: std::time::Duration = std::time::Duration::from_secs(60);

/// What a failed API call at start says about the next one.
#[derive(Debug, PartialEq, Eq)]
enum Failure {
    /// No answer, or busy / not ready (429, 5xx): may pass by itself.
    Passing,
    /// 401 or 403: lasting unless the API server is still starting.
    Refused,
    /// Any other answer (400, 404, …) or a local error (configuration, TLS, decoding).
    Lasting,
}

impl Failure {
    fn of(e: &kube::Error) -> Self {
        match e {
            kube::Error::Api(status) if status.code == 429 || status.code >= 500 => {
                Failure::Passing
            }
            kube::Error::Api(status) if status.code == 401 || status.code == 403 => {
                Failure::Refused
            }
            kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::ReadEvents(_) => {
                Failure::Passing
            }
            _ => Failure::Lasting,
        }
    }
}

/// An API for one namespace, or all of them.
fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs the operator until SIGTERM or SIGINT.
pub async fn run(config: OperatorConfig) -> Result<(), OperatorError> {
    let client = Client::try_default().await.map_err(OperatorError::Client)?;
    run_with(client, config).await
}

/// Runs the operator with an existing client.
pub async fn run_with(client: Client, config: OperatorConfig) -> Result<(), OperatorError> {
    let clusters: Api<PgBalancerCluster> = match &config.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    // Health and metrics are served while the API server is still waited for: a liveness
    // probe must not restart an operator that only waits.
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .map_err(|e| OperatorError::Listen(config.listen.clone(), e))?;
    let (served_metrics, ready_flag) = (metrics.clone(), ready.clone());
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let text = served_metrics.render();
                std::future::ready(([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text))
            }),
        )
        .route("/healthz", get(|| std::future::ready("ok\n")))
        .route(
            "/readyz",
            get(move || {
                let ok = ready_flag.load(Ordering::SeqCst);
                std::future::ready(if ok {
                    (axum::http::StatusCode::OK, "ok\n")
                } else {
                    (
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        "waiting for the leader lease\n",
                    )
                })
            }),
        );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the metrics and health server stopped");
        }
    });

    reachable(&clusters).await?;
    let identity = config.identity.clone().unwrap_or_else(|| {
        format!(
            "pgbalancer-operator-{}",
            crate::credentials::Credentials::generate().api_token[..8].to_lowercase()
        )
    });
    let pdb_supported = client
        .list_api_group_resources("policy/v1")
        .await
        .map(|list| {
            list.resources
                .iter()
                .any(|r| r.name == "poddisruptionbudgets")
        })
        .unwrap_or(false);
    if !pdb_supported {
        tracing::info!(
            "policy/v1 PodDisruptionBudgets are not served here; balancer PDBs are skipped"
        );
    }
    let in_cluster = match config.probe {
        Probe::Auto => std::env::var_os("KUBERNETES_SERVICE_HOST").is_some(),
        Probe::On => true,
        Probe::Off => false,
    };
    tracing::info!(
        in_cluster,
        "SQL and balancer-agent probes are {}",
        if in_cluster {
            "on"
        } else {
            "off (roles from pod labels, readiness from pods; no failover)"
        }
    );
    let ctx = Arc::new(Context {
        pdb_supported,
        in_cluster,
        watches: Default::default(),
        certificates: Default::default(),
        client: client.clone(),
        metrics,
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: labels::MANAGER.into(),
                instance: Some(identity.clone()),
            },
        ),
    });
    // As PID 1 in a container, SIGTERM is ignored unless handled: a standby waiting for the
    // lease exits at once; the leader gets a few seconds to finish the reconcile in flight.
    let leading = ready.clone();
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = async { if let Some(t) = term.as_mut() { t.recv().await; } else { std::future::pending::<()>().await } } => {},
        }
        if leading.load(Ordering::SeqCst) {
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        }
        std::process::exit(0);
    });
    let _leadership = if config.leader_elect {
        let (lease_namespace, source) = leader::lease_namespace(
            config.lease_namespace.as_deref(),
            client.default_namespace(),
        );
        tracing::info!(
            lease = labels::MANAGER,
            namespace = %lease_namespace,
            from = source.describe(),
            "electing a leader"
        );
        Some(leader::hold(client.clone(), &lease_namespace, labels::MANAGER, identity).await)
    } else {
        tracing::warn!(
            "leader election is off (--leader-elect=false): reconciling without a Lease; \
             run no other operator against this cluster"
        );
        None
    };
    ready.store(true, Ordering::SeqCst);

    let owned =
        watcher::Config::default().labels(&format!("{}={}", labels::MANAGED_BY, labels::MANAGER));
    let ns = config.namespace.as_deref();
    let sets: Api<StatefulSet> = scoped(&client, ns);
    let services: Api<Service> = scoped(&client, ns);
    let maps: Api<ConfigMap> = scoped(&client, ns);
    let secrets: Api<Secret> = scoped(&client, ns);
    let deployments: Api<Deployment> = scoped(&client, ns);
    let claims: Api<PersistentVolumeClaim> = scoped(&client, ns);
    let pods: Api<Pod> = scoped(&client, ns);
    Controller::new(clusters, watcher::Config::default())
        .owns(sets, owned.clone())
        .owns(services, owned.clone())
        .owns(maps, owned.clone())
        .owns(secrets, owned.clone())
        .owns(deployments, owned.clone())
        .owns(claims, owned.clone())
        // Pods belong to StatefulSets and the Deployment: map them to their cluster by label,
        // so a new pod gets its role and a lost primary is seen at once.
        .watches(pods, owned, |pod| {
            let cluster = pod.labels().get(labels::INSTANCE).cloned()?;
            Some(ObjectRef::new(&cluster).within(&pod.namespace()?))
        })
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile error");
            }
        })
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{Failure, OperatorConfig};

    #[test]
    fn failures_at_start_are_waited_for_only_when_they_may_pass() {
        let api = |code| {
            kube::Error::Api(
                kube::core::Status::failure("x", "y")
                    .with_code(code)
                    .boxed(),
            )
        };
        assert_eq!(Failure::of(&api(503)), Failure::Passing);
        assert_eq!(Failure::of(&api(429)), Failure::Passing);
        assert_eq!(Failure::of(&api(403)), Failure::Refused);
        assert_eq!(Failure::of(&api(401)), Failure::Refused);
        assert_eq!(Failure::of(&api(400)), Failure::Lasting);
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(Failure::of(&kube::Error::ReadEvents(io)), Failure::Passing);
        let bad: serde_json::Error = serde_json::from_str::<u8>("x").unwrap_err();
        assert_eq!(Failure::of(&kube::Error::SerdeError(bad)), Failure::Lasting);
    }

    #[derive(Parser)]
    struct Command {
        #[command(flatten)]
        config: OperatorConfig,
    }

    fn parse(args: &[&str]) -> Result<OperatorConfig, clap::Error> {
        Command::try_parse_from(std::iter::once("operator").chain(args.iter().copied()))
            .map(|c| c.config)
    }

    #[test]
    fn leader_election_is_on_unless_turned_off() {
        let table: [(&[&str], bool); 4] = [
            (&[], true),
            (&["--leader-elect"], true),
            (&["--leader-elect=true"], true),
            (&["--leader-elect=false"], false),
        ];
        for (args, expected) in table {
            assert_eq!(parse(args).unwrap().leader_elect, expected, "{args:?}");
        }
        assert!(parse(&["--leader-elect=maybe"]).is_err());
    }

    #[test]
    fn an_explicit_lease_namespace_is_kept() {
        let config = parse(&["--lease-namespace", "ops"]).unwrap();
        assert_eq!(config.lease_namespace.as_deref(), Some("ops"));
    }
}
