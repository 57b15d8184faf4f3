//! Keeping the balancer pods in step with the backend list (IO): nudge the kubelet to refresh
//! their projected configuration now rather than at its next periodic sync, and ask their
//! agents whether a slot is still attached before its instance is deleted, so pgpool stops
//! routing to a replica before the replica goes away.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};

use super::reconcile::{Context, Error};
use crate::backend::PoolNode;
use crate::labels;
use crate::plan::{Plan, REST_PORT};

/// Annotation on balancer pods carrying the hash of the backend list they should have.
pub const BACKENDS_ANNOTATION: &str = "pgbalancer.io/backends-hash";

fn selector(plan: &Plan) -> String {
    format!(
        "{}={},{}={}",
        labels::INSTANCE,
        plan.cluster,
        labels::COMPONENT,
        labels::BALANCER
    )
}

/// Annotates balancer pods whose backend hash differs; the kubelet resyncs an updated pod and
/// refreshes its ConfigMap volume, so the agent sees the new `pgpool.conf` within seconds.
pub async fn nudge(
    client: &Client,
    ctx: &Context,
    namespace: &str,
    plan: &Plan,
    hash: &str,
) -> Result<(), Error> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    for pod in pods
        .list(&ListParams::default().labels(&selector(plan)))
        .await?
    {
        if pod
            .annotations()
            .get(BACKENDS_ANNOTATION)
            .map(String::as_str)
            == Some(hash)
        {
            continue;
        }
        let patch = serde_json::json!({ "metadata": { "annotations": BTreeMap::from([(BACKENDS_ANNOTATION, hash)]) } });
        ctx.metrics.wrote();
        pods.patch(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    }
    Ok(())
}

async fn balancer_ips(client: &Client, namespace: &str, plan: &Plan) -> Result<Vec<String>, Error> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    Ok(pods
        .list(&ListParams::default().labels(&selector(plan)))
        .await?
        .into_iter()
        .filter_map(|p| p.status.and_then(|s| s.pod_ip))
        .collect())
}

async fn get_json(url: String) -> Option<serde_json::Value> {
    tokio::task::spawn_blocking(move || {
        ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(1))
            .build()
            .get(&url)
            .call()
            .ok()
            .and_then(|r| r.into_json::<serde_json::Value>().ok())
    })
    .await
    .ok()
    .flatten()
}

/// The first reachable agent's nodes (`/api/v1/nodes`). Empty when no agent answers (not
/// running yet, or an operator outside the cluster network).
pub async fn nodes(client: &Client, namespace: &str, plan: &Plan) -> Result<Vec<PoolNode>, Error> {
    for ip in balancer_ips(client, namespace, plan).await? {
        if let Some(v) = get_json(format!("http://{ip}:{REST_PORT}/api/v1/nodes")).await {
            return Ok(v["nodes"]
                .as_array()
                .map(|nodes| nodes.iter().filter_map(pool_node).collect())
                .unwrap_or_default());
        }
    }
    Ok(Vec::new())
}

/// One node of the agent's REST answer.
fn pool_node(n: &serde_json::Value) -> Option<PoolNode> {
    Some(PoolNode {
        slot: u32::try_from(n["id"].as_u64()?).ok()?,
        host: n["host"].as_str().unwrap_or_default().to_owned(),
        status: n["status"].as_str()?.to_owned(),
        role: n["role"].as_str().unwrap_or_default().to_owned(),
        select_count: n["select_count"].as_i64().unwrap_or(0),
        replication_delay: n["replication_lag"].as_i64().unwrap_or(0),
    })
}

/// Whether any reachable balancer agent still routes to node `slot`. Unreachable agents
/// (not running yet, or an operator outside the cluster network) do not hold removal up.
pub async fn still_routes(
    client: &Client,
    namespace: &str,
    plan: &Plan,
    slot: u32,
) -> Result<bool, Error> {
    for ip in balancer_ips(client, namespace, plan).await? {
        if get_json(format!("http://{ip}:{REST_PORT}/api/v1/nodes/{slot}"))
            .await
            .is_some_and(|n| n["status"] == "up")
        {
            return Ok(true);
        }
    }
    Ok(false)
}
