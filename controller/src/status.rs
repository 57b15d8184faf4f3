//! Status of a cluster, computed purely from the plan and what a backend observed.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use pgbalancer_crd::{BalancerStatus, InstanceStatus, PgBalancerClusterStatus};

use crate::backend::Observed;
use crate::labels;
use crate::plan::{Plan, Role};
use crate::reconcile::{instance_ready, pending};

/// Status of `plan`'s cluster given `observed`. `now` stamps condition transitions.
pub fn compute(plan: &Plan, observed: &Observed, now: Time) -> PgBalancerClusterStatus {
    let waiting = pending(plan, observed);
    let instances: Vec<InstanceStatus> = plan
        .instances
        .iter()
        .map(|inst| {
            let seen = observed.instances.get(&inst.ordinal);
            let role = match seen.and_then(|s| s.in_recovery) {
                Some(true) => Role::Replica,
                Some(false) => Role::Primary,
                None => inst.role,
            };
            InstanceStatus {
                name: inst.name.clone(),
                role: role.as_str().to_owned(),
                ready: instance_ready(plan, observed, inst.ordinal),
                lag_bytes: if role == Role::Replica {
                    seen.and_then(|s| s.lag_bytes)
                } else {
                    None
                },
                balancer_node: observed
                    .balancers
                    .get(&0)
                    .and_then(|b| b.nodes.iter().find(|n| n.slot == inst.ordinal))
                    .map(|n| if n.is_up() { "up" } else { "down" }.to_owned()),
            }
        })
        .collect();
    let replicas = instances.iter().filter(|i| i.role == "replica").count() as i32;
    let ready_replicas = instances
        .iter()
        .filter(|i| i.role == "replica" && i.ready)
        .count() as i32;
    let current_primary = instances
        .iter()
        .find(|i| i.role == "primary")
        .map(|i| i.name.clone());
    let ready_balancers = observed.balancers.values().filter(|b| b.routing).count() as i32;
    let endpoint = observed
        .balancers
        .get(&0)
        .and_then(|b| b.host_port)
        .map(|port| format!("{}:{port}", plan.connect_address()));
    let ready = waiting.is_empty();
    let phase = if ready {
        "Running"
    } else if observed.instances.is_empty() {
        "Creating"
    } else if current_primary.is_none() {
        "Failed"
    } else {
        "Degraded"
    };
    let condition = |type_: &str, status: bool, reason: &str, message: String| Condition {
        type_: type_.to_owned(),
        status: if status { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message,
        last_transition_time: now.clone(),
        observed_generation: None,
    };
    PgBalancerClusterStatus {
        phase: Some(phase.to_owned()),
        replicas,
        ready_replicas,
        current_primary,
        selector: Some(labels::postgres_selector(&plan.cluster)),
        observed_generation: None,
        conditions: vec![
            condition(
                "Ready",
                ready,
                if ready { "AllReady" } else { "NotReady" },
                if ready {
                    "every instance and balancer is ready".into()
                } else {
                    waiting.join("; ")
                },
            ),
            condition("Progressing", false, "Idle", "nothing in progress".into()),
            condition(
                "Degraded",
                !ready && !observed.instances.is_empty(),
                if ready { "AllReady" } else { "NotReady" },
                waiting.join("; "),
            ),
        ],
        instances,
        balancer: Some(BalancerStatus {
            ready_instances: ready_balancers,
            endpoint,
        }),
    }
}
