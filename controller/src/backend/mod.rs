//! The `Backend` trait: what reconcile asks of Docker or Kubernetes, and what they observe.
//!
//! A backend observes the cluster in the plan's terms (instances by ordinal, balancers by
//! index, balancer nodes by slot) and applies one [`Action`] at a time. Every decision about
//! what to do lives in `reconcile`, the same for every backend.

pub mod agent_client;
pub mod docker;
pub mod kube;

use std::collections::BTreeMap;
use std::future::Future;

use crate::plan::{Plan, Role};
pub use crate::pool_node::PoolNode;

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

impl Observed {
    /// Takes the primary's view of its standbys (`application_name` → (state, replay lag in
    /// bytes), see `pg::standbys`) into each instance's `streaming` and `lag_bytes`.
    pub fn set_replication(
        &mut self,
        plan: &Plan,
        standbys: &std::collections::HashMap<String, (String, i64)>,
    ) {
        for (ordinal, seen) in self.instances.iter_mut() {
            let name = crate::plan::instance_name(&plan.cluster, *ordinal);
            if let Some((state, lag)) = standbys.get(&name) {
                seen.streaming = state == "streaming";
                seen.lag_bytes = Some(*lag);
            }
        }
    }
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
    /// SQL was tried on it. `false` when it does not run, or when the observer cannot reach
    /// its network (an operator outside the Kubernetes cluster): then `accepting: false` and
    /// the `None`s below mean "not seen", not "refused".
    pub probed: bool,
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
    /// Timeline it writes (primary) or follows (standby), when it answered.
    pub timeline: Option<u32>,
    /// WAL received (standby) or written (primary), bytes from `0/0`, when it answered.
    pub received_lsn: Option<u64>,
    /// WAL replayed, bytes from `0/0`, when it answered.
    pub replayed_lsn: Option<u64>,
    /// The standby's WAL receiver: `None` when none runs or the instance did not answer.
    pub receiver: Option<WalReceiver>,
    /// The role the controller gave it at runtime (Docker: holds the `<cluster>-rw` alias;
    /// Kubernetes: the pod's role label). `None` when that could not be seen.
    pub marked: Option<Role>,
    /// The engine's own readiness (Kubernetes: the pod's Ready condition, which checks
    /// streaming on standbys), used when SQL could not reach the instance.
    pub engine_ready: Option<bool>,
    /// A standby that has streamed nothing since it started: `received_lsn` is what it
    /// replayed, and it may hold more WAL than that.
    pub replay_only: bool,
    /// How long its server process has been running, when the engine says.
    pub running_for: Option<std::time::Duration>,
    /// Its database system identifier (`pg_control_system()`), when it answered.
    pub system_identifier: Option<u64>,
    /// Physical replication slots on it (name → in use); read on the primary only.
    pub slots: Option<BTreeMap<String, bool>>,
    /// Its `postgres` database has the `pgbalancer` schema (see [`crate::pg::login_lookup`]);
    /// read on a writable instance only.
    pub lookup_schema: Option<bool>,
    /// Why its last start failed, in the entrypoint's words, while it does not accept
    /// connections (Docker: its log's last entrypoint line, when a refusal; Kubernetes: the
    /// container's last termination message, while it is not running again).
    pub start_failure: Option<String>,
}

/// A standby's WAL receiver (`pg_stat_wal_receiver`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WalReceiver {
    /// `streaming`, `starting`, `waiting`…
    pub status: String,
    /// Host it streams from, as it resolved it.
    pub sender_host: Option<String>,
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
    /// Its backend nodes (`SHOW POOL_NODES`, or its agent's `/api/v1/nodes`); `None` when
    /// they could not be seen (not running, an operator outside the cluster network, an agent
    /// that did not answer).
    pub nodes: Option<Vec<PoolNode>>,
    /// Published host port of the SQL endpoint.
    pub host_port: Option<u16>,
    /// Published host port of the agent's REST API.
    pub rest_port: Option<u16>,
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
    /// Give instance `ordinal` its planned role at runtime (Docker: the `<cluster>-rw` alias
    /// and the role file; Kubernetes: the pod's role label). Recreates nothing.
    MarkRole(u32),
    /// Make the replication slots on instance `ordinal` what its role needs: on the primary
    /// one per planned replica, on a standby none; slots in use are never dropped.
    EnsureSlots(u32),
    /// Create the native engine's verifier lookup on primary `ordinal`, whose database has
    /// none (made by an earlier version; see [`crate::pg::login_lookup`]).
    CreateLoginLookup(u32),
    /// Stop the old primary `ordinal` and mark it a replica, so that it can never take a write
    /// again and rejoins as a standby when it starts.
    Fence(u32),
    /// Promote standby `ordinal` (`pg_promote()`).
    Promote(u32),
    /// Restart standby `ordinal`, whose data another database system made (it can never
    /// stream from the primary): its entrypoint then refuses to start and says why. Its
    /// storage is kept as it is.
    RestartForeign(u32),
}

impl Action {
    /// A step that must not be taken unless the ones before it in its decision succeeded: the
    /// steps of a change of primary (detach, fence, mark, promote). See
    /// [`crate::reconcile::apply_all`].
    pub fn is_ordered(&self) -> bool {
        matches!(
            self,
            Action::DetachBackend { .. }
                | Action::Fence(_)
                | Action::MarkRole(_)
                | Action::Promote(_)
        )
    }
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
            Action::MarkRole(o) => write!(f, "give instance {o} its role"),
            Action::EnsureSlots(o) => write!(f, "reconcile replication slots on instance {o}"),
            Action::CreateLoginLookup(o) => {
                write!(f, "create the verifier lookup function on instance {o}")
            }
            Action::Fence(o) => write!(f, "fence instance {o} (stop it, mark it a replica)"),
            Action::Promote(o) => write!(f, "promote instance {o}"),
            Action::RestartForeign(o) => write!(
                f,
                "restart instance {o} (its data belongs to another database system; kept)"
            ),
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
