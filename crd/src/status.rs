//! `PgBalancerClusterStatus`: what a backend observed, written by the controller or printed by
//! `pgbalancer status`. Computed by a pure function in the controller from the observation.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Observed state of a cluster.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PgBalancerClusterStatus {
    /// `Running` when every instance and balancer is ready, else `Creating`, `Scaling`,
    /// `SwitchingOver`, `Degraded` or `Failed` (the primary does not serve).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Replicas that exist (primary not counted), for the scale subresource.
    #[serde(default)]
    pub replicas: i32,
    /// Replicas that are streaming from the primary.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Name of the instance that is primary now: the durable record of the primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_primary: Option<String>,
    /// Name of the instance that should be primary; differs from `currentPrimary` while a
    /// change of primary is in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_primary: Option<String>,
    /// Label selector of the cluster's PostgreSQL pods, for the scale subresource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing` and `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// One entry per PostgreSQL instance.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instances: Vec<InstanceStatus>,
    /// The balancers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balancer: Option<BalancerStatus>,
}

/// Observed state of one PostgreSQL instance.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstanceStatus {
    /// Instance name (`<cluster>-<ordinal>`).
    pub name: String,
    /// `primary` or `replica`, as observed (`pg_is_in_recovery()`), else as planned.
    pub role: String,
    /// Accepting connections and, for a replica, streaming from the primary.
    pub ready: bool,
    /// Bytes of WAL the replica has not replayed yet (replicas only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_bytes: Option<i64>,
    /// Timeline the instance is on, when it could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<u32>,
    /// This instance's node in the balancer (`up` or `down`), as the balancer's agent reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balancer_node: Option<String>,
}

/// Observed state of the balancers.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BalancerStatus {
    /// Balancer pods or containers that route queries.
    pub ready_instances: i32,
    /// Where clients connect (`host:port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}
