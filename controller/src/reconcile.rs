//! The reconcile core shared by every backend: from a plan and an observation, decide the
//! next actions (pure), apply them, and repeat until the cluster matches the plan.
//!
//! Ordering rules live here and only here: the network first; instances created together
//! (replicas wait for the primary themselves); the balancer only once every instance is ready,
//! so that pgpool never marks a still-cloning replica down; a removed instance is detached
//! from every balancer before it is deleted; the primary is never removed (the plan always
//! holds it).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::future::join_all;
use thiserror::Error;

use crate::backend::{Action, Backend, BackendError, Observed, ObservedBalancer};
use crate::plan::{Plan, Role};

/// Why a cluster did not converge.
#[derive(Debug, Error)]
pub enum ConvergeError<E: std::error::Error + 'static> {
    /// The backend failed in a way retrying does not fix.
    #[error("{action} failed")]
    Apply {
        action: String,
        #[source]
        source: E,
    },
    /// Observation failed.
    #[error("cannot observe the cluster")]
    Observe(#[source] E),
    /// Still not ready when time ran out.
    #[error("not ready after {seconds} s: {pending}")]
    Timeout { seconds: u64, pending: String },
    /// What runs contradicts the record of the primary; nothing was touched.
    #[error("{0}")]
    Conflict(String),
    /// The planned primary keeps refusing to start (its entrypoint said why): waiting longer
    /// changes nothing. Only a failover (the controller's, once the command returns) or the
    /// user can.
    #[error(
        "{instance}, the primary, cannot start: {why}. The controller takes over once this \
         command returns (`pgbalancer status` shows what it does)"
    )]
    PrimaryCannotStart { instance: String, why: String },
    /// A replica keeps refusing to start (its entrypoint said why); only the user can help.
    #[error("{instance} cannot start: {why}")]
    ReplicaCannotStart { instance: String, why: String },
}

/// How long an instance may keep refusing to start before `converge` stops waiting (a
/// refusal seen once may be a stale line of a container about to restart).
pub const REFUSAL_GRACE: Duration = Duration::from_secs(10);

/// Who is primary, durably (the CR status on Kubernetes, the state file locally). A change
/// of primary first moves `target`, then acts, then sets `current`; every step is observed
/// before the next, so a controller that stops half-way resumes where it was.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Record {
    /// The instance known to be primary; `None` before the first one was seen.
    pub current: Option<u32>,
    /// The instance that should be primary.
    pub target: u32,
    /// Why the primary is changing (meaningful only while it changes; status reports it).
    pub kind: ChangeKind,
}

/// Why a change of primary was started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ChangeKind {
    /// Asked for (`switchover`), with the old primary still serving.
    #[default]
    Switchover,
    /// Started by the controller because the primary was lost.
    Failover,
}

impl Record {
    /// A record whose primary is `ordinal`, with no change in progress.
    pub fn settled(ordinal: u32) -> Record {
        Record {
            current: Some(ordinal),
            target: ordinal,
            kind: ChangeKind::Switchover,
        }
    }

    /// A change of primary is in progress.
    pub fn changing(&self) -> bool {
        self.current.is_some_and(|c| c != self.target)
    }

    /// The record once `observed` is taken into account: `current` follows `target` as soon
    /// as the target is the only instance that accepts writes.
    pub fn advance(&self, observed: &Observed) -> Record {
        let writable = writable(observed);
        if self.current != Some(self.target) && writable == [self.target] {
            Record::settled(self.target)
        } else {
            *self
        }
    }
}

/// Ordinals of the running instances that answered as primaries; without SQL, those the
/// engine reports ready while marked primary.
fn writable(observed: &Observed) -> Vec<u32> {
    observed
        .instances
        .iter()
        .filter(|(_, s)| {
            s.running
                && match s.in_recovery {
                    Some(in_recovery) => !in_recovery,
                    None => s.engine_ready == Some(true) && s.marked == Some(Role::Primary),
                }
        })
        .map(|(&o, _)| o)
        .collect()
}

/// What is observed contradicts the record: more than one instance accepts writes, or the
/// one that does is neither the recorded nor the target primary. Nothing is touched then.
pub fn conflict(plan: &Plan, observed: &Observed, record: &Record) -> Option<String> {
    let name = |o: u32| crate::plan::instance_name(&plan.cluster, o);
    match writable(observed).as_slice() {
        [a, b, ..] => Some(format!(
            "{} and {} both accept writes; nothing is changed until one is stopped",
            name(*a),
            name(*b)
        )),
        [w] if Some(*w) != record.current && *w != record.target => Some(format!(
            "{} accepts writes but the record names {} as primary; nothing is changed",
            name(*w),
            name(record.current.unwrap_or(record.target))
        )),
        _ => None,
    }
}

/// Most bytes of WAL a switchover target may still have to replay when it is chosen.
pub const MAX_SWITCHOVER_LAG: i64 = 16 * 1024 * 1024;

/// The replica to promote: among ready replicas whose lag is at most `max_lag`, the one
/// with the highest received LSN, ties to the lowest ordinal. Pure; `None` when none
/// qualifies.
pub fn elect(plan: &Plan, observed: &Observed, max_lag: i64) -> Option<u32> {
    plan.instances
        .iter()
        .filter(|i| i.role == Role::Replica && instance_ready(plan, observed, i.ordinal))
        .filter_map(|i| Some((i.ordinal, observed.instances.get(&i.ordinal)?)))
        .filter(|(_, s)| s.lag_bytes.unwrap_or(i64::MAX) <= max_lag)
        .max_by(|(a, sa), (b, sb)| sa.received_lsn.cmp(&sb.received_lsn).then_with(|| b.cmp(a)))
        .map(|(o, _)| o)
}

/// What automated failover may do, from `spec.failover`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailoverPolicy {
    /// Fail over at all.
    pub enabled: bool,
    /// How long the primary must be unreachable first.
    pub delay: Duration,
    /// Most bytes a candidate may lack of what the primary last wrote.
    pub max_lag_bytes: i64,
}

impl FailoverPolicy {
    /// The policy of `spec`.
    pub fn of(spec: &pgbalancer_crd::FailoverSpec) -> Self {
        Self {
            enabled: spec.enabled,
            delay: Duration::from_secs(u64::from(spec.delay_seconds)),
            max_lag_bytes: spec.max_lag_bytes,
        }
    }
}

/// The recorded primary does not answer SQL (stopped, gone, or unreachable). Unknown (an
/// operator outside the cluster network) is not "down": only what was seen counts.
pub fn primary_down(observed: &Observed, record: &Record) -> bool {
    let Some(current) = record.current else {
        return false;
    };
    match observed.instances.get(&current) {
        None => true,
        Some(seen) => !seen.running || (!seen.accepting && seen.engine_ready != Some(true)),
    }
}

/// The failover to start, as the record to write: `None` unless failover is enabled, no
/// change is in progress, the recorded primary has been down for the policy's delay
/// (`down_for`), and [`failover_candidates`] finds one. The new target is the candidate with
/// the highest received LSN (ties to the lowest ordinal). Pure: the caller measures `down_for`
/// and remembers the primary's last written LSN.
pub fn failover(
    plan: &Plan,
    observed: &Observed,
    record: &Record,
    policy: &FailoverPolicy,
    down_for: Duration,
    last_primary_lsn: Option<u64>,
) -> Option<Record> {
    let current = record.current?;
    if !policy.enabled
        || record.changing()
        || down_for < policy.delay
        || !primary_down(observed, record)
    {
        return None;
    }
    failover_candidates(plan, observed, current, policy, last_primary_lsn)
        .ok()?
        .into_iter()
        .max_by(|(a, ra), (b, rb)| ra.cmp(rb).then_with(|| b.cmp(a)))
        .map(|(target, _)| Record {
            current: Some(current),
            target,
            kind: ChangeKind::Failover,
        })
}

/// The replicas that may replace the lost primary `current`, with their received LSN, or why
/// none may. A candidate runs, is in recovery, and reports what it received.
/// - Asynchronous: it had received at least `last_primary_lsn - max_lag_bytes`.
/// - Synchronous (`ANY n` of the `m` planned replicas): a commit was acknowledged by `n` of
///   them, so any `m - n + 1` hold every acknowledged commit between them; failover waits
///   until that many report, and then the highest received LSN has them all. The lag bound
///   does not apply (what the primary wrote past the quorum was never acknowledged).
pub fn failover_candidates(
    plan: &Plan,
    observed: &Observed,
    current: u32,
    policy: &FailoverPolicy,
    last_primary_lsn: Option<u64>,
) -> Result<Vec<(u32, u64)>, String> {
    let synchronous = plan.postgres.synchronous;
    let seen: Vec<(u32, u64)> = plan
        .instances
        .iter()
        .filter(|i| i.ordinal != current)
        .filter_map(|i| Some((i.ordinal, observed.instances.get(&i.ordinal)?)))
        .filter(|(_, s)| s.running && s.in_recovery == Some(true))
        // With a quorum, a position must be all a standby holds: one that only replayed
        // (nothing streamed since it started) may hold an acknowledged commit beyond it.
        .filter(|(_, s)| synchronous.is_none() || !s.replay_only)
        .filter_map(|(o, s)| Some((o, s.received_lsn?)))
        .collect();
    if let Some(number) = synchronous {
        let standbys = plan.instances.len().saturating_sub(1);
        let needed = standbys.saturating_sub(number as usize) + 1;
        if seen.len() < needed {
            return Err(format!(
                "synchronous replication (ANY {number} of {standbys}): {} of the {needed} \
                 replicas needed to be sure of every acknowledged commit report their WAL",
                seen.len()
            ));
        }
        return Ok(seen);
    }
    let floor = last_primary_lsn.map_or(0, |lsn| {
        lsn.saturating_sub(u64::try_from(policy.max_lag_bytes).unwrap_or(0))
    });
    let near: Vec<(u32, u64)> = seen.iter().copied().filter(|(_, r)| *r >= floor).collect();
    if near.is_empty() {
        return Err(if seen.is_empty() {
            "no replica is running and reporting its WAL".to_owned()
        } else {
            format!(
                "no replica received WAL within spec.failover.maxLagBytes ({}) of the lost \
                 primary",
                policy.max_lag_bytes
            )
        });
    }
    Ok(near)
}

/// `actions` without those that would race a failover that may still start (enabled, no
/// change in progress, the primary down for less than the delay): bringing the lost primary
/// back (start, create, replace, or giving a new pod its role). Once the delay has passed with
/// no candidate to promote, the primary comes back as before.
pub fn hold_for_failover(
    actions: Vec<Action>,
    observed: &Observed,
    record: &Record,
    policy: &FailoverPolicy,
    down_for: Duration,
) -> Vec<Action> {
    let waiting = policy.enabled
        && !record.changing()
        && primary_down(observed, record)
        && down_for < policy.delay;
    if !waiting {
        return actions;
    }
    let primary = record.current;
    actions
        .into_iter()
        .filter(|action| match *action {
            Action::StartInstance(o)
            | Action::CreateInstance(o)
            | Action::ReplaceInstance(o)
            | Action::MarkRole(o) => Some(o) != primary,
            _ => true,
        })
        .collect()
}

/// Checks a requested switchover to `to` (an instance name or ordinal; the best replica when
/// absent) and returns the new target's ordinal, or why it is refused. Pure.
pub fn switchover_target(
    plan: &Plan,
    observed: &Observed,
    record: &Record,
    to: Option<&str>,
) -> Result<u32, String> {
    let name = |o: u32| crate::plan::instance_name(&plan.cluster, o);
    if let (true, Some(current)) = (record.changing(), record.current) {
        return Err(format!(
            "a change of primary is already in progress ({} to {}); wait for it to finish",
            name(current),
            name(record.target)
        ));
    }
    if let Some(conflict) = conflict(plan, observed, record) {
        return Err(conflict);
    }
    let current = record.current.unwrap_or(record.target);
    if !instance_ready(plan, observed, current) {
        return Err(format!(
            "the primary {} is not ready; a switchover needs a running primary",
            name(current)
        ));
    }
    let Some(to) = to else {
        return elect(plan, observed, MAX_SWITCHOVER_LAG)
            .ok_or_else(|| "no replica is streaming and caught up; nothing to switch to".into());
    };
    let ordinal = plan
        .instances
        .iter()
        .find(|i| i.name == to || i.container == to || i.ordinal.to_string() == to)
        .map(|i| i.ordinal)
        .ok_or_else(|| {
            let known: Vec<&str> = plan.instances.iter().map(|i| i.name.as_str()).collect();
            format!(
                "--to {to}: no such instance; instances: {}",
                known.join(", ")
            )
        })?;
    if ordinal == current {
        return Err(format!(
            "--to {to}: {} is already the primary",
            name(ordinal)
        ));
    }
    if !instance_ready(plan, observed, ordinal) {
        return Err(format!("--to {to}: {} is not streaming", name(ordinal)));
    }
    let lag = observed
        .instances
        .get(&ordinal)
        .and_then(|s| s.lag_bytes)
        .unwrap_or(i64::MAX);
    if lag > MAX_SWITCHOVER_LAG {
        return Err(format!(
            "--to {to}: {} lags {lag} bytes behind (at most {MAX_SWITCHOVER_LAG} allowed)",
            name(ordinal)
        ));
    }
    Ok(ordinal)
}

/// Whether instance `ordinal` serves in its planned role. Without SQL (an operator outside
/// the cluster network) the engine's readiness stands in for it.
pub fn instance_ready(plan: &Plan, observed: &Observed, ordinal: u32) -> bool {
    let (Some(inst), Some(seen)) = (plan.instance(ordinal), observed.instances.get(&ordinal))
    else {
        return false;
    };
    if !seen.running {
        return false;
    }
    match seen.in_recovery {
        Some(in_recovery) => {
            seen.accepting
                && match inst.role {
                    Role::Primary => !in_recovery,
                    Role::Replica => in_recovery && seen.streaming,
                }
        }
        None => seen.engine_ready == Some(true),
    }
}

/// The steps of a change of primary (`record.target` ≠ `record.current`), one at a time:
/// fence the old primary, mark the target, promote it once it replayed all it received.
/// `None` when no change is in progress or the target already accepts writes.
fn change_primary(observed: &Observed, record: &Record) -> Option<Vec<Action>> {
    let old = record.current.filter(|_| record.changing())?;
    let target = record.target;
    let mut steps = Vec::new();
    if let Some(seen) = observed.instances.get(&old) {
        if seen.running || seen.marked == Some(Role::Primary) {
            // Balancers let go of the old primary first: pgpool then holds new sessions while
            // it searches for the new primary, instead of failing them on a stopped server
            // until its health checks give up.
            steps.extend(
                observed
                    .balancers
                    .iter()
                    .filter(|(_, b)| {
                        b.running && b.nodes.iter().flatten().any(|n| n.slot == old && n.is_up())
                    })
                    .map(|(&balancer, _)| Action::DetachBackend {
                        balancer,
                        slot: old,
                    }),
            );
            steps.push(Action::Fence(old));
            if seen.running {
                // The next steps wait until it is seen stopped (a pod takes its time).
                return Some(steps);
            }
            // Already down (a failover): fencing only marks it, and the target goes on in the
            // same decision, step by step (see `apply_all`).
        }
    }
    let seen = observed.instances.get(&target)?;
    if seen.in_recovery == Some(false) {
        return (!steps.is_empty()).then_some(steps);
    }
    if !seen.running {
        steps.push(Action::StartInstance(target));
        return Some(steps);
    }
    let caught_up = match (seen.received_lsn, seen.replayed_lsn) {
        (Some(received), Some(replayed)) => replayed >= received,
        (None, Some(_)) => true,
        _ => false,
    };
    if seen.marked != Some(Role::Primary) {
        steps.push(Action::MarkRole(target));
    }
    // Applied in order: promoted only once marked (see `apply_all`).
    if seen.in_recovery == Some(true) && caught_up {
        steps.push(Action::Promote(target));
    }
    Some(steps)
}

/// Role marks and replication slots that differ from the plan, for instances that answer.
fn runtime_state(plan: &Plan, observed: &Observed) -> Vec<Action> {
    let mut actions = Vec::new();
    for inst in &plan.instances {
        let Some(seen) = observed.instances.get(&inst.ordinal) else {
            continue;
        };
        if !seen.running {
            continue;
        }
        let verified = match inst.role {
            Role::Primary => seen.in_recovery == Some(false),
            Role::Replica => seen.in_recovery == Some(true),
        } || (seen.in_recovery.is_none() && seen.engine_ready == Some(true));
        // An unmarked instance (a new pod) gets its planned role at once: its entrypoint
        // waits for it. A marked one is re-marked only once SQL confirms the planned role.
        if seen.marked != Some(inst.role) && (verified || seen.marked.is_none()) {
            actions.push(Action::MarkRole(inst.ordinal));
        }
        if inst.role == Role::Primary
            && seen.in_recovery == Some(false)
            && seen.lookup_schema == Some(false)
        {
            actions.push(Action::CreateLoginLookup(inst.ordinal));
        }
        if let Some(slots) = &seen.slots {
            if inst.role == Role::Primary && seen.in_recovery != Some(false) {
                continue;
            }
            let wanted = plan.slots_on(inst.ordinal, seen.in_recovery == Some(false));
            let missing = wanted.iter().any(|w| !slots.contains_key(*w));
            let stale = slots.iter().any(|(name, active)| {
                !active && crate::plan::is_instance_slot(name) && !wanted.contains(&name.as_str())
            });
            if missing || stale {
                actions.push(Action::EnsureSlots(inst.ordinal));
            }
        }
    }
    actions
}

/// The next actions towards `plan` (planned with `record.target` as primary). Empty when
/// nothing can be done but wait, or when the observation contradicts the record.
pub fn decide(plan: &Plan, observed: &Observed, record: &Record) -> Vec<Action> {
    if !observed.network {
        return vec![Action::EnsureNetwork];
    }
    if conflict(plan, observed, record).is_some() {
        return Vec::new();
    }
    if let Some(steps) = change_primary(observed, record) {
        return steps;
    }
    let mut actions = Vec::new();
    for (&ordinal, seen) in &observed.instances {
        if plan.instance(ordinal).is_some() {
            continue;
        }
        let attached: Vec<Action> = observed
            .balancers
            .iter()
            .filter(|(_, b)| {
                b.running
                    && b.nodes
                        .iter()
                        .flatten()
                        .any(|n| n.slot == ordinal && n.is_up())
            })
            .map(|(&balancer, _)| Action::DetachBackend {
                balancer,
                slot: ordinal,
            })
            .collect();
        if attached.is_empty() || !seen.running {
            actions.push(Action::RemoveInstance(ordinal));
        } else {
            actions.extend(attached);
        }
    }
    for inst in &plan.instances {
        match observed.instances.get(&inst.ordinal) {
            None => actions.push(Action::CreateInstance(inst.ordinal)),
            Some(seen) if !seen.up_to_date => actions.push(Action::ReplaceInstance(inst.ordinal)),
            Some(seen) if !seen.running && seen.state != "restarting" => {
                actions.push(Action::StartInstance(inst.ordinal))
            }
            Some(_) => {}
        }
    }
    actions.extend(runtime_state(plan, observed));
    // Restarted only once it has run a while: a start that did not refuse (its primary did
    // not answer in time) is tried again at most that often, not on every pass.
    actions.extend(
        foreign_replicas(plan, observed, record)
            .into_iter()
            .filter(|(ordinal, ..)| {
                observed
                    .instances
                    .get(ordinal)
                    .and_then(|s| s.running_for)
                    .is_some_and(|t| t >= FOREIGN_RESTART_AFTER)
            })
            .map(|(ordinal, ..)| Action::RestartForeign(ordinal)),
    );
    let all_ready = plan
        .instances
        .iter()
        .all(|i| instance_ready(plan, observed, i.ordinal));
    for b in &plan.balancer.instances {
        match observed.balancers.get(&b.index) {
            None if all_ready => actions.push(Action::CreateBalancer(b.index)),
            None => {}
            Some(seen) if !seen.up_to_date => actions.push(Action::ReplaceBalancer(b.index)),
            Some(seen) if !seen.running && seen.state != "restarting" => {
                actions.push(Action::StartBalancer(b.index))
            }
            // Its node list, not whether it routes: a balancer whose primary node went down
            // (its health checks failed while the primary was cut off) routes nothing until
            // that node is attached again.
            Some(
                seen @ ObservedBalancer {
                    running: true,
                    nodes: Some(nodes),
                    ..
                },
            ) => {
                let missing = plan
                    .instances
                    .iter()
                    .any(|i| !nodes.iter().any(|n| n.slot == i.ordinal));
                if missing {
                    actions.push(Action::UpdateBackends(b.index));
                    continue;
                }
                if let Some(slot) = stale_primary_node(plan, observed, seen) {
                    actions.push(Action::DetachBackend {
                        balancer: b.index,
                        slot,
                    });
                    continue;
                }
                for inst in &plan.instances {
                    let down = nodes.iter().any(|n| n.slot == inst.ordinal && !n.is_up());
                    if down && instance_ready(plan, observed, inst.ordinal) {
                        actions.push(Action::AttachBackend {
                            balancer: b.index,
                            slot: inst.ordinal,
                        });
                    }
                }
            }
            Some(_) => {}
        }
    }
    let planned_balancers = plan.balancer.instances.len() as u32;
    for &index in observed
        .balancers
        .keys()
        .filter(|i| **i >= planned_balancers)
    {
        actions.push(Action::RemoveBalancer(index));
    }
    actions
}

/// How long a replica of another database system runs before it is restarted (see
/// [`foreign_replicas`]).
pub const FOREIGN_RESTART_AFTER: Duration = Duration::from_secs(20);

/// Replicas running on data another database system made (a volume left by an earlier
/// cluster of the same name, or a primary whose volume was lost and made afresh): their
/// system identifier is not the one of the writable planned primary, so they can never
/// stream from it, and their reads answer from another database. Restarted, their entrypoint
/// refuses to start and says why; their data is left as it is. `(ordinal, theirs, the
/// primary's)`; none while the primary changes or is not seen writable.
pub fn foreign_replicas(plan: &Plan, observed: &Observed, record: &Record) -> Vec<(u32, u64, u64)> {
    let primary = observed.instances.get(&plan.primary().ordinal);
    let Some(system) = primary
        .filter(|p| p.in_recovery == Some(false) && !record.changing())
        .and_then(|p| p.system_identifier)
    else {
        return Vec::new();
    };
    plan.instances
        .iter()
        .filter(|i| i.role == Role::Replica)
        .filter_map(|i| {
            let seen = observed.instances.get(&i.ordinal)?;
            let theirs = seen.system_identifier.filter(|_| seen.running)?;
            (theirs != system).then_some((i.ordinal, theirs, system))
        })
        .collect()
}

/// The node a balancer still takes for the primary although SQL shows it is a standby and
/// the planned primary writes. pgpool searches for the primary only when a node fails; an old
/// primary that was back before its health checks failed (a quick switchover) leaves it
/// stale. Detaching that node makes pgpool search again; it is attached back once ready.
fn stale_primary_node(plan: &Plan, observed: &Observed, seen: &ObservedBalancer) -> Option<u32> {
    let primary = plan.primary().ordinal;
    let writes = |o: u32| observed.instances.get(&o).map(|s| s.in_recovery);
    if writes(primary) != Some(Some(false)) {
        return None;
    }
    seen.nodes
        .iter()
        .flatten()
        .find(|n| n.role == "primary" && n.is_up() && n.slot != primary)
        .map(|n| n.slot)
        .filter(|slot| writes(*slot) == Some(Some(true)))
}

/// What is still missing, for progress and timeout messages. Empty when converged.
pub fn pending(plan: &Plan, observed: &Observed, record: &Record) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(conflict) = conflict(plan, observed, record) {
        out.push(conflict);
    }
    if let (true, Some(old)) = (record.changing(), record.current) {
        out.push(format!(
            "primary moving from {} to {}",
            crate::plan::instance_name(&plan.cluster, old),
            crate::plan::instance_name(&plan.cluster, record.target)
        ));
    }
    let foreign = foreign_replicas(plan, observed, record);
    for inst in &plan.instances {
        if instance_ready(plan, observed, inst.ordinal) {
            continue;
        }
        let seen = observed.instances.get(&inst.ordinal);
        let why = match seen {
            None => "not created".to_owned(),
            Some(s) if !s.running => "not running".to_owned(),
            Some(s) if !s.accepting => "not accepting connections".to_owned(),
            Some(s) if inst.role == Role::Primary && s.in_recovery != Some(false) => {
                "not primary".to_owned()
            }
            Some(_) => match foreign.iter().find(|(o, ..)| *o == inst.ordinal) {
                Some((_, theirs, primary)) => format!(
                    "holds the data of another database system (identifier {theirs}; the \
                     primary's is {primary}) and cannot stream from the primary"
                ),
                None => "not streaming from the primary".to_owned(),
            },
        };
        match seen.and_then(|s| s.start_failure.as_deref()) {
            Some(failure) => out.push(format!("{} {why}: it cannot start: {failure}", inst.name)),
            None => out.push(format!("{} {why}", inst.name)),
        }
    }
    for b in &plan.balancer.instances {
        match observed.balancers.get(&b.index) {
            None => out.push(format!("{} not created", b.container)),
            Some(seen) if !seen.routing => out.push(format!("{} not routing queries", b.container)),
            // Nodes that could not be seen (an operator outside the cluster network) are
            // unknown, not pending.
            Some(ObservedBalancer { nodes: None, .. }) => {}
            Some(ObservedBalancer {
                nodes: Some(nodes), ..
            }) => {
                let primary = plan.primary();
                let writes_to = nodes.iter().find(|n| n.role == "primary");
                if writes_to.is_none_or(|n| n.slot != primary.ordinal) {
                    out.push(format!(
                        "{} does not send writes to {} yet",
                        b.container, primary.name
                    ));
                }
                for inst in &plan.instances {
                    if !nodes.iter().any(|n| n.slot == inst.ordinal && n.is_up()) {
                        out.push(format!(
                            "{} node {} ({}) not up",
                            b.container, inst.ordinal, inst.name
                        ));
                    }
                }
            }
        }
    }
    for &ordinal in observed
        .instances
        .keys()
        .filter(|o| plan.instance(**o).is_none())
    {
        out.push(format!("instance {ordinal} still to be removed"));
    }
    out
}

/// Applies one decision. The steps of a change of primary (balancers let go of the old
/// primary, it is fenced, the target marked, then promoted) and role marks run one at a time
/// in the decision's order, and stop at the first failure: a later step is never taken without
/// the earlier one. The rest is independent and runs concurrently. The results of the actions
/// attempted.
pub async fn apply_all<B: Backend>(
    backend: &B,
    plan: &Plan,
    actions: &[Action],
) -> Vec<(Action, Result<(), B::Error>)> {
    let (ordered, rest): (Vec<Action>, Vec<Action>) = actions.iter().partition(|a| a.is_ordered());
    let timed = |action: Action| async move {
        let started = Instant::now();
        let result = backend.apply(plan, action).await;
        let ms = started.elapsed().as_millis() as u64;
        tracing::debug!(%action, ms, ok = result.is_ok(), "applied");
        (action, result)
    };
    let mut results = Vec::with_capacity(actions.len());
    for action in ordered {
        let (action, result) = timed(action).await;
        let failed = result.is_err();
        results.push((action, result));
        if failed {
            break;
        }
    }
    results.extend(join_all(rest.into_iter().map(timed)).await);
    results
}

/// The refusal to start an instance of `plan` has kept up for [`REFUSAL_GRACE`] (the
/// primary's first), as the error that ends waiting; `since` remembers when each began.
fn lasting_refusal<E: std::error::Error + 'static>(
    plan: &Plan,
    observed: &Observed,
    since: &mut BTreeMap<u32, Instant>,
) -> Option<ConvergeError<E>> {
    let refusing: BTreeMap<u32, &String> = plan
        .instances
        .iter()
        .filter_map(|i| {
            let why = observed.instances.get(&i.ordinal)?.start_failure.as_ref()?;
            Some((i.ordinal, why))
        })
        .collect();
    since.retain(|o, _| refusing.contains_key(o));
    let now = Instant::now();
    for o in refusing.keys() {
        since.entry(*o).or_insert(now);
    }
    let lasting = |ordinal: u32| {
        since
            .get(&ordinal)
            .is_some_and(|t| now.duration_since(*t) >= REFUSAL_GRACE)
    };
    let primary = plan.primary();
    if lasting(primary.ordinal) {
        return Some(ConvergeError::PrimaryCannotStart {
            instance: primary.name.clone(),
            why: refusing[&primary.ordinal].clone(),
        });
    }
    let replica = plan.instances.iter().find(|i| lasting(i.ordinal))?;
    Some(ConvergeError::ReplicaCannotStart {
        instance: replica.name.clone(),
        why: refusing[&replica.ordinal].clone(),
    })
}

/// Drives `backend` until the cluster matches `plan`, reporting each action through `report`.
/// `record` is the durable record of the primary (`plan` is planned with its target); each
/// time it advances it is handed to `save` before anything else is done.
pub async fn converge<B: Backend>(
    backend: &B,
    plan: &Plan,
    mut record: Record,
    timeout: Duration,
    mut report: impl FnMut(&str),
    mut save: impl FnMut(&Record),
) -> Result<(Observed, Record), ConvergeError<B::Error>> {
    let started = Instant::now();
    let mut last_pending = String::new();
    let mut last_actions = Vec::new();
    let mut refused_since: BTreeMap<u32, Instant> = BTreeMap::new();
    loop {
        let observing = Instant::now();
        let observed = backend
            .observe(plan)
            .await
            .map_err(ConvergeError::Observe)?;
        tracing::debug!(ms = observing.elapsed().as_millis() as u64, "observed");
        if let Some(conflict) = conflict(plan, &observed, &record) {
            return Err(ConvergeError::Conflict(conflict));
        }
        let advanced = record.advance(&observed);
        if advanced != record {
            record = advanced;
            save(&record);
        }
        let actions = decide(plan, &observed, &record);
        let waiting = pending(plan, &observed, &record);
        if actions.is_empty() && waiting.is_empty() {
            return Ok((observed, record));
        }
        if let Some(e) = lasting_refusal(plan, &observed, &mut refused_since) {
            return Err(e);
        }
        if started.elapsed() > timeout {
            return Err(ConvergeError::Timeout {
                seconds: timeout.as_secs(),
                pending: waiting.join("; "),
            });
        }
        if actions != last_actions {
            actions.iter().for_each(|a| report(&a.to_string()));
        }
        let results = apply_all(backend, plan, &actions).await;
        for (action, result) in results {
            match result {
                Ok(()) => {}
                Err(e) if e.is_transient() => tracing::debug!(%action, error = %e, "will retry"),
                Err(source) => {
                    return Err(ConvergeError::Apply {
                        action: action.to_string(),
                        source,
                    })
                }
            }
        }
        let now = waiting.join("; ");
        if actions.is_empty() && !now.is_empty() && now != last_pending {
            report(&format!("waiting: {now}"));
            last_pending = now;
        }
        tokio::time::sleep(Duration::from_millis(if actions.is_empty() {
            150
        } else {
            50
        }))
        .await;
        last_actions = actions;
    }
}

pub mod watch;

#[cfg(test)]
mod tests;
