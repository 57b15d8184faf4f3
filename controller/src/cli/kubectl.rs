//! `kubectl pgbalancer …`: the `pgbalancer` binary answering as the `kubectl-pgbalancer`
//! plugin. `switchover NAME [--to INSTANCE]` asks the operator for a switchover through the
//! `pgbalancer.io/switchover` annotation, then follows the cluster's status until the new
//! primary serves, or prints why the operator refused.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use k8s_openapi::api::core::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::Client;
use pgbalancer_crd::PgBalancerCluster;

use crate::labels;

/// The kubectl plugin's command line.
#[derive(Parser, Debug)]
#[command(
    name = "kubectl pgbalancer",
    version,
    about = "Operate PgBalancerClusters"
)]
pub struct Plugin {
    /// Namespace of the cluster (the kubeconfig context's when absent).
    #[arg(short = 'n', long, global = true)]
    namespace: Option<String>,
    #[command(subcommand)]
    command: PluginCommand,
}

#[derive(Subcommand, Debug)]
enum PluginCommand {
    /// Move the primary: the operator waits for the target to catch up, shuts the old primary
    /// down cleanly, promotes the target and the old primary follows it.
    Switchover {
        /// Cluster name.
        name: String,
        /// Instance to promote (e.g. demo-1); the most caught-up replica when absent.
        #[arg(long)]
        to: Option<String>,
        /// Seconds to wait for the new primary to serve.
        #[arg(long, default_value_t = 180)]
        timeout: u64,
    },
}

/// Whether this process was started as the kubectl plugin.
pub fn invoked_as_plugin() -> bool {
    std::env::args_os()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .is_some_and(|n| n == "kubectl-pgbalancer")
}

/// Runs the plugin; the exit code.
pub async fn run(plugin: Plugin) -> ExitCode {
    match dispatch(plugin).await {
        Ok(message) => {
            println!("{message}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(plugin: Plugin) -> Result<String, String> {
    let client = Client::try_default()
        .await
        .map_err(|e| format!("cannot configure the Kubernetes client: {e}"))?;
    let namespace = plugin
        .namespace
        .unwrap_or_else(|| client.default_namespace().to_owned());
    match plugin.command {
        PluginCommand::Switchover { name, to, timeout } => {
            switchover(client, &namespace, &name, to.as_deref(), timeout).await
        }
    }
}

async fn switchover(
    client: Client,
    namespace: &str,
    name: &str,
    to: Option<&str>,
    timeout: u64,
) -> Result<String, String> {
    let clusters: Api<PgBalancerCluster> = Api::namespaced(client.clone(), namespace);
    let cluster = clusters
        .get_opt(name)
        .await
        .map_err(|e| format!("reading pgbc/{name}: {e}"))?
        .ok_or_else(|| format!("no PgBalancerCluster {name} in namespace {namespace}"))?;
    let status = cluster.status.unwrap_or_default();
    if status.current_primary.is_some() && status.current_primary != status.target_primary {
        return Err(format!(
            "a change of primary is already in progress ({} to {})",
            status.current_primary.unwrap_or_default(),
            status.target_primary.unwrap_or_default()
        ));
    }
    let before = status.target_primary.clone();
    let asked = Instant::now();
    let patch = serde_json::json!({ "metadata": { "annotations": { labels::SWITCHOVER_ANNOTATION: to.unwrap_or("") } } });
    clusters
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| format!("annotating pgbc/{name}: {e}"))?;
    let deadline = asked + Duration::from_secs(timeout);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let Ok(now) = clusters.get(name).await else {
            continue;
        };
        let pending = now
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(labels::SWITCHOVER_ANNOTATION));
        let status = now.status.unwrap_or_default();
        if pending {
            continue;
        }
        if status.target_primary == before {
            return Err(refusal(client, namespace, name)
                .await
                .unwrap_or_else(|| "the operator refused the switchover".into()));
        }
        if status.current_primary == status.target_primary
            && status.phase.as_deref() == Some("Running")
        {
            return Ok(format!(
                "{name}: primary is {} ({:.1} s)",
                status.current_primary.unwrap_or_default(),
                asked.elapsed().as_secs_f64()
            ));
        }
    }
    Err(format!(
        "pgbc/{name} did not finish the switchover within {timeout} s; see kubectl describe pgbc {name}"
    ))
}

/// The newest `SwitchoverRefused` Event of the cluster.
async fn refusal(client: Client, namespace: &str, name: &str) -> Option<String> {
    let events: Api<Event> = Api::namespaced(client, namespace);
    let list = events
        .list(&ListParams::default().fields(&format!(
            "involvedObject.name={name},reason=SwitchoverRefused"
        )))
        .await
        .ok()?;
    list.items
        .into_iter()
        .max_by_key(|e| {
            e.event_time
                .as_ref()
                .map(|t| t.0)
                .or(e.last_timestamp.as_ref().map(|t| t.0))
        })
        .and_then(|e| e.message)
        .map(|m| format!("the operator refused the switchover: {m}"))
}
