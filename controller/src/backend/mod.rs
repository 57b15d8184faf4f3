//! The `Backend` trait: what reconcile asks of Docker or Kubernetes, and what they observe.
//!
//! A backend observes the cluster in the plan's terms (instances by ordinal, balancers by
//! index, balancer nodes by slot) and applies one [`Action`] at a time. Every decision about
//! what to do lives in `reconcile`, the same for every backend.

pub mod docker;
pub mod kube;

use std::collections::BTreeMap;
use std::future::Future;

use crate::plan::Plan;

/// What a backend saw.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    /// The network (Docker) or namespace-level objects (Kubernetes) exist.
    pub network: bool,
    /// Instances found, by ordinal, including ones no longer planned.
    pub instances: BTreeMap<u32, ObservedInstance>,
    /// Balancers found, by index, including ones no longer planned.
    pub balancers: BTreeMap<u32, ObservedBalancer>,
}

/// One PostgreSQL instance as seen.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ObservedInstance {
    /// Container or pod name.
    pub name: String,
    /// Engine state (`running`, `exited`, `restarting`…).
    pub state: String,
    /// Engine health (`healthy`, `unhealthy`, `starting`) or empty.
    pub health: String,
    /// The process runs.
    pub running: bool,
    /// Built from the current plan (image, configuration, ports); otherwise it is replaced.
    pub up_to_date: bool,
    /// Accepts SQL connections.
    pub accepting: bool,
    /// `pg_is_in_recovery()`, when it answered.
    pub in_recovery: Option<bool>,
    /// The primary lists it in `pg_stat_replication` as `streaming`.
    pub streaming: bool,
    /// Bytes of WAL not yet replayed, from the primary's view.
    pub lag_bytes: Option<i64>,
    /// Published host port.
    pub host_port: Option<u16>,
}

/// One balancer as seen.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ObservedBalancer {
    /// Container or pod name.
    pub name: String,
    /// Engine state (`running`, `exited`, `restarting`…).
    pub state: String,
    /// Engine health (`healthy`, `unhealthy`, `starting`) or empty.
    pub health: String,
    /// The process runs.
    pub running: bool,
    /// Built from the current plan; otherwise it is replaced.
    pub up_to_date: bool,
    /// A query through it was answered.
    pub routing: bool,
    /// Its backend nodes (`SHOW POOL_NODES`).
    pub nodes: Vec<PoolNode>,
    /// Published host port of the SQL endpoint.
    pub host_port: Option<u16>,
    /// Published host port of the agent's REST API.
    pub rest_port: Option<u16>,
}

/// A row of `SHOW POOL_NODES`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PoolNode {
    /// Slot (node id), which is the instance ordinal.
    pub slot: u32,
    /// Backend hostname.
    pub host: String,
    /// `up`, `waiting`, `down` or `unused`.
    pub status: String,
    /// `primary` or `standby`.
    pub role: String,
    /// SELECTs routed to it.
    pub select_count: i64,
    /// Replication delay as pgpool measures it, in bytes.
    pub replication_delay: i64,
}

impl PoolNode {
    /// The node takes queries.
    pub fn is_up(&self) -> bool {
        matches!(self.status.as_str(), "up" | "waiting")
    }
}

/// One change a backend applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    /// Create the network (Docker) or shared objects.
    EnsureNetwork,
    /// Create instance `ordinal` with its storage and start it.
    CreateInstance(u32),
    /// Replace instance `ordinal` (keeping its storage) because the plan changed.
    ReplaceInstance(u32),
    /// Start stopped instance `ordinal`.
    StartInstance(u32),
    /// Remove instance `ordinal` (not planned any more), its storage and its replication slot.
    RemoveInstance(u32),
    /// Create balancer `index`.
    CreateBalancer(u32),
    /// Replace balancer `index` because its settings changed.
    ReplaceBalancer(u32),
    /// Start stopped balancer `index`.
    StartBalancer(u32),
    /// Remove balancer `index` (not planned any more).
    RemoveBalancer(u32),
    /// Give balancer `index` the planned backend list and reload it (no restart).
    UpdateBackends(u32),
    /// Attach node `slot` on balancer `balancer`.
    AttachBackend { balancer: u32, slot: u32 },
    /// Detach node `slot` on balancer `balancer`.
    DetachBackend { balancer: u32, slot: u32 },
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::EnsureNetwork => write!(f, "create network"),
            Action::CreateInstance(o) => write!(f, "create instance {o}"),
            Action::ReplaceInstance(o) => {
                write!(f, "replace instance {o} (settings changed, data kept)")
            }
            Action::StartInstance(o) => write!(f, "start instance {o}"),
            Action::RemoveInstance(o) => write!(f, "remove instance {o} and its volume"),
            Action::CreateBalancer(i) => write!(f, "create balancer {i}"),
            Action::ReplaceBalancer(i) => write!(f, "replace balancer {i} (settings changed)"),
            Action::StartBalancer(i) => write!(f, "start balancer {i}"),
            Action::RemoveBalancer(i) => write!(f, "remove balancer {i}"),
            Action::UpdateBackends(i) => write!(f, "reload balancer {i} with the new backend list"),
            Action::AttachBackend { balancer, slot } => {
                write!(f, "attach node {slot} on balancer {balancer}")
            }
            Action::DetachBackend { balancer, slot } => {
                write!(f, "detach node {slot} on balancer {balancer}")
            }
        }
    }
}

/// A backend failure, with whether retrying can help.
pub trait BackendError: std::error::Error + Send + Sync + 'static {
    /// Retrying the same step later may succeed (engine busy, process still starting).
    fn is_transient(&self) -> bool;
}

/// Docker or Kubernetes.
pub trait Backend: Sync {
    /// The backend's error type.
    type Error: BackendError;

    /// Observes the cluster of `plan`.
    fn observe(&self, plan: &Plan) -> impl Future<Output = Result<Observed, Self::Error>> + Send;

    /// Applies one action.
    fn apply(
        &self,
        plan: &Plan,
        action: Action,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}
