//! Status of a cluster, computed purely from the plan, what a backend observed, the record of
//! the primary and the previous status (to keep condition transition times). The same
//! function serves `pgbalancer status` and the `PgBalancerCluster` status, so both backends
//! report the same phases and conditions.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use pgbalancer_crd::{BalancerStatus, InstanceStatus, PgBalancerClusterStatus};

use crate::backend::Observed;
use crate::labels;
use crate::plan::{self, Plan, Role};
use crate::reconcile::{conflict, instance_ready, pending, ChangeKind, Record};

/// The phase of a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// No primary has been seen yet.
    Creating,
    /// Every instance and balancer serves.
    Running,
    /// Instances are being added or removed; the primary serves.
    Scaling,
    /// The primary is moving to another instance, as asked.
    SwitchingOver,
    /// The primary was lost and the controller is promoting another instance.
    FailingOver,
    /// Something does not serve, or what runs contradicts the record of the primary.
    Degraded,
    /// The primary does not serve: writes fail.
    Failed,
}

impl Phase {
    /// The phase's name in status.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Creating => "Creating",
            Phase::Running => "Running",
            Phase::Scaling => "Scaling",
            Phase::SwitchingOver => "SwitchingOver",
            Phase::FailingOver => "FailingOver",
            Phase::Degraded => "Degraded",
            Phase::Failed => "Failed",
        }
    }
}

/// The condition types a cluster carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionType {
    /// Every instance and balancer serves.
    Ready,
    /// The controller is changing something.
    Progressing,
    /// Something is wrong that may need the user: an invalid spec, a conflict, a failure.
    Degraded,
}

impl ConditionType {
    /// The condition's type in status.
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionType::Ready => "Ready",
            ConditionType::Progressing => "Progressing",
            ConditionType::Degraded => "Degraded",
        }
    }
}

/// Builds a condition, keeping the previous transition time while its status holds. The API
/// server refuses empty messages, so an empty one becomes the reason.
fn condition(
    previous: &[Condition],
    type_: ConditionType,
    status: bool,
    reason: &str,
    message: &str,
    now: &Time,
    generation: Option<i64>,
) -> Condition {
    let status = if status { "True" } else { "False" };
    let since = previous
        .iter()
        .find(|c| c.type_ == type_.as_str() && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    Condition {
        type_: type_.as_str().to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message: if message.is_empty() { reason } else { message }.to_owned(),
        last_transition_time: since,
        observed_generation: generation,
    }
}

/// The phase from what is observed.
pub fn phase(plan: &Plan, observed: &Observed, record: &Record) -> Phase {
    if conflict(plan, observed, record).is_some() {
        return Phase::Degraded;
    }
    if record.changing() {
        return match record.kind {
            ChangeKind::Switchover => Phase::SwitchingOver,
            ChangeKind::Failover => Phase::FailingOver,
        };
    }
    if pending(plan, observed, record).is_empty() {
        return Phase::Running;
    }
    if record.current.is_none() {
        return Phase::Creating;
    }
    if !instance_ready(plan, observed, plan.primary().ordinal) {
        return Phase::Failed;
    }
    let missing = plan
        .instances
        .iter()
        .any(|i| !observed.instances.contains_key(&i.ordinal));
    let unplanned = observed
        .instances
        .keys()
        .any(|o| plan.instance(*o).is_none());
    if missing || unplanned {
        Phase::Scaling
    } else {
        Phase::Degraded
    }
}

/// Status of `plan`'s cluster given `observed` and the record of the primary. `previous`
/// keeps transition times; `now` stamps new ones.
pub fn compute(
    plan: &Plan,
    observed: &Observed,
    record: &Record,
    previous: Option<&PgBalancerClusterStatus>,
    generation: Option<i64>,
    now: Time,
) -> PgBalancerClusterStatus {
    let waiting = pending(plan, observed, record);
    let instances: Vec<InstanceStatus> = plan
        .instances
        .iter()
        .map(|inst| {
            let seen = observed.instances.get(&inst.ordinal);
            // The role as observed: SQL first, then the runtime mark, then the plan.
            let role = match seen.and_then(|s| s.in_recovery) {
                Some(true) => Role::Replica,
                Some(false) => Role::Primary,
                None => seen.and_then(|s| s.marked).unwrap_or(inst.role),
            };
            let node = observed
                .balancers
                .values()
                .find_map(|b| b.nodes.iter().flatten().find(|n| n.slot == inst.ordinal));
            InstanceStatus {
                name: inst.name.clone(),
                role: role.as_str().to_owned(),
                ready: instance_ready(plan, observed, inst.ordinal),
                lag_bytes: if role == Role::Replica {
                    seen.and_then(|s| s.lag_bytes)
                        .or_else(|| node.and_then(|n| n.replication_delay))
                } else {
                    None
                },
                timeline: seen.and_then(|s| s.timeline),
                balancer_node: node.map(|n| if n.is_up() { "up" } else { "down" }.to_owned()),
            }
        })
        .collect();
    let replicas = plan
        .instances
        .iter()
        .filter(|i| i.role == Role::Replica && observed.instances.contains_key(&i.ordinal))
        .count() as i32;
    let ready_replicas = plan
        .instances
        .iter()
        .filter(|i| i.role == Role::Replica && instance_ready(plan, observed, i.ordinal))
        .count() as i32;
    let name = |o: u32| plan::instance_name(&plan.cluster, o);
    let phase = phase(plan, observed, record);
    let ready = phase == Phase::Running;
    let message = waiting.join("; ");
    let previous_conditions = previous.map(|p| p.conditions.clone()).unwrap_or_default();
    let conflict = conflict(plan, observed, record);
    let degraded = matches!(phase, Phase::Degraded | Phase::Failed);
    PgBalancerClusterStatus {
        phase: Some(phase.as_str().to_owned()),
        replicas,
        ready_replicas,
        current_primary: record.current.map(name),
        target_primary: Some(name(record.target)),
        selector: Some(labels::postgres_selector(&plan.cluster)),
        observed_generation: generation,
        conditions: vec![
            condition(
                &previous_conditions,
                ConditionType::Ready,
                ready,
                if ready { "AllReady" } else { "NotReady" },
                if ready {
                    "every instance and balancer is ready"
                } else {
                    &message
                },
                &now,
                generation,
            ),
            condition(
                &previous_conditions,
                ConditionType::Progressing,
                !ready && !degraded,
                match phase {
                    Phase::Running => "Converged",
                    Phase::SwitchingOver | Phase::FailingOver => "PrimaryMoving",
                    _ => "Converging",
                },
                if ready {
                    "nothing in progress"
                } else {
                    &message
                },
                &now,
                generation,
            ),
            condition(
                &previous_conditions,
                ConditionType::Degraded,
                degraded,
                match (&conflict, phase) {
                    (Some(_), _) => "PrimaryConflict",
                    (None, Phase::Failed) => "PrimaryUnavailable",
                    (None, Phase::Degraded) => "NotReady",
                    _ => "SpecValid",
                },
                if degraded {
                    conflict.as_deref().unwrap_or(&message)
                } else {
                    "the spec is valid"
                },
                &now,
                generation,
            ),
        ],
        instances,
        balancer: Some(BalancerStatus {
            ready_instances: observed.balancers.values().filter(|b| b.routing).count() as i32,
            endpoint: None,
        }),
    }
}

/// The conflict a status reports, if any (the Degraded condition's message).
pub fn conflict_message(status: &PgBalancerClusterStatus) -> Option<String> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == ConditionType::Degraded.as_str() && c.reason == "PrimaryConflict")
        .map(|c| c.message.clone())
}

/// Status of a cluster whose spec is invalid: Degraded, everything else as it was.
pub fn invalid(
    previous: Option<&PgBalancerClusterStatus>,
    message: &str,
    generation: Option<i64>,
    now: Time,
) -> PgBalancerClusterStatus {
    let mut status = previous.cloned().unwrap_or_default();
    let previous_conditions = status.conditions.clone();
    status.phase = Some(Phase::Degraded.as_str().to_owned());
    status.observed_generation = generation;
    status.conditions = [
        (ConditionType::Ready, false),
        (ConditionType::Progressing, false),
        (ConditionType::Degraded, true),
    ]
    .into_iter()
    .map(|(type_, value)| {
        condition(
            &previous_conditions,
            type_,
            value,
            "InvalidSpec",
            message,
            &now,
            generation,
        )
    })
    .collect();
    status
}

/// Two statuses equal but for condition timestamps: nothing to write.
pub fn same(a: &PgBalancerClusterStatus, b: &PgBalancerClusterStatus) -> bool {
    let strip = |s: &PgBalancerClusterStatus| {
        let mut s = s.clone();
        for c in &mut s.conditions {
            c.last_transition_time = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        }
        s
    };
    strip(a) == strip(b)
}

#[cfg(test)]
mod tests;
