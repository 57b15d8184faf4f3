//! The balancer pods (IO): listed in a stable order (the backend's balancer indexes), and
//! nudged so the kubelet refreshes their projected configuration now rather than at its next
//! periodic sync when the backend list changes.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};

use super::metrics::Metrics;
use super::objects;
use super::reconcile::Error;
use crate::labels;
use crate::plan::Plan;

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

/// Hash of the backend list in the balancer ConfigMap.
pub fn backends_hash(config: &ConfigMap) -> String {
    config
        .data
        .as_ref()
        .and_then(|d| d.get("pgpool.conf"))
        .map(objects::content_hash)
        .unwrap_or_default()
}

/// The cluster's balancer pods, sorted by name.
pub async fn pods(client: &Client, namespace: &str, plan: &Plan) -> Result<Vec<Pod>, Error> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let mut pods = api
        .list(&ListParams::default().labels(&selector(plan)))
        .await?
        .items;
    pods.sort_by_key(|p| p.name_any());
    Ok(pods)
}

/// Annotates balancer pods whose backend hash differs; the kubelet resyncs an updated pod and
/// refreshes its ConfigMap volume, so the agent sees the new `pgpool.conf` within seconds.
pub async fn nudge(
    client: &Client,
    metrics: &Metrics,
    namespace: &str,
    plan: &Plan,
    hash: &str,
) -> Result<(), Error> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    for pod in pods(client, namespace, plan).await? {
        if pod
            .annotations()
            .get(BACKENDS_ANNOTATION)
            .map(String::as_str)
            == Some(hash)
        {
            continue;
        }
        let patch = serde_json::json!({ "metadata": { "annotations": BTreeMap::from([(BACKENDS_ANNOTATION, hash)]) } });
        metrics.wrote("patch", "Pod");
        api.patch(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    }
    Ok(())
}
