//! Status of a cluster on Kubernetes, computed purely from the plan, what the StatefulSets
//! and the balancer Deployment report, the previous status (to keep transition times) and
//! the validation result.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use pgbalancer_crd::{BalancerStatus, InstanceStatus, PgBalancerClusterStatus};

use crate::labels;
use crate::plan::{Plan, Role};

/// What the workloads report.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Workloads {
    /// Ordinals whose StatefulSet exists.
    pub existing: Vec<u32>,
    /// Ordinals whose pod is ready (for replicas: streaming, see the readiness probe).
    pub ready: Vec<u32>,
    /// Ready balancer pods.
    pub balancers_ready: i32,
    /// Per-slot view of the first reachable balancer agent: (status, replication lag bytes).
    pub nodes: std::collections::BTreeMap<u32, (String, i64)>,
}

fn condition(
    previous: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    now: &Time,
    generation: Option<i64>,
) -> Condition {
    let status = if status { "True" } else { "False" };
    let since = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message: message.to_owned(),
        last_transition_time: since,
        observed_generation: generation,
    }
}

/// Status of a valid cluster.
pub fn compute(
    plan: &Plan,
    seen: &Workloads,
    previous: Option<&PgBalancerClusterStatus>,
    generation: Option<i64>,
    now: Time,
) -> PgBalancerClusterStatus {
    let instances: Vec<InstanceStatus> = plan
        .instances
        .iter()
        .map(|inst| InstanceStatus {
            name: inst.name.clone(),
            role: inst.role.as_str().to_owned(),
            ready: seen.ready.contains(&inst.ordinal),
            lag_bytes: (inst.role == Role::Replica)
                .then(|| seen.nodes.get(&inst.ordinal).map(|n| n.1))
                .flatten(),
            balancer_node: seen.nodes.get(&inst.ordinal).map(|n| n.0.clone()),
        })
        .collect();
    let replicas = plan
        .instances
        .iter()
        .filter(|i| i.role == Role::Replica && seen.existing.contains(&i.ordinal))
        .count() as i32;
    let ready_replicas = instances
        .iter()
        .filter(|i| i.role == "replica" && i.ready)
        .count() as i32;
    let wanted_balancers = plan.balancer.instances.len() as i32;
    let all_ready = instances.iter().all(|i| i.ready) && seen.balancers_ready >= wanted_balancers;
    let waiting: Vec<String> = instances
        .iter()
        .filter(|i| !i.ready)
        .map(|i| format!("{} not ready", i.name))
        .chain((seen.balancers_ready < wanted_balancers).then(|| {
            format!(
                "{} of {wanted_balancers} balancers ready",
                seen.balancers_ready
            )
        }))
        .collect();
    let previous_conditions = previous.map(|p| p.conditions.clone()).unwrap_or_default();
    let phase = if all_ready {
        "Running"
    } else if seen.existing.len() < plan.instances.len()
        || seen.existing.iter().any(|o| plan.instance(*o).is_none())
    {
        if previous.and_then(|p| p.phase.as_deref()) == Some("Running") || !seen.ready.is_empty() {
            "Scaling"
        } else {
            "Creating"
        }
    } else {
        "Creating"
    };
    // The API server rejects empty condition messages.
    let message = if waiting.is_empty() {
        "every instance and balancer is ready".to_owned()
    } else {
        waiting.join("; ")
    };
    PgBalancerClusterStatus {
        phase: Some(phase.to_owned()),
        replicas,
        ready_replicas,
        current_primary: Some(plan.primary().name.clone()),
        selector: Some(labels::postgres_selector(&plan.cluster)),
        observed_generation: generation,
        conditions: vec![
            condition(
                &previous_conditions,
                "Ready",
                all_ready,
                if all_ready { "AllReady" } else { "NotReady" },
                &message,
                &now,
                generation,
            ),
            condition(
                &previous_conditions,
                "Progressing",
                !all_ready,
                if all_ready { "Converged" } else { "Converging" },
                &message,
                &now,
                generation,
            ),
            condition(
                &previous_conditions,
                "Degraded",
                false,
                "SpecValid",
                "the spec is valid",
                &now,
                generation,
            ),
        ],
        instances,
        balancer: Some(BalancerStatus {
            ready_instances: seen.balancers_ready,
            endpoint: Some(format!(
                "{}-balancer:{}",
                plan.cluster,
                crate::plan::BALANCER_PORT
            )),
        }),
    }
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
    status.phase = Some("Degraded".into());
    status.observed_generation = generation;
    status.conditions = vec![
        condition(
            &previous_conditions,
            "Ready",
            false,
            "InvalidSpec",
            message,
            &now,
            generation,
        ),
        condition(
            &previous_conditions,
            "Progressing",
            false,
            "InvalidSpec",
            message,
            &now,
            generation,
        ),
        condition(
            &previous_conditions,
            "Degraded",
            true,
            "InvalidSpec",
            message,
            &now,
            generation,
        ),
    ];
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
mod tests {
    use super::*;
    use pgbalancer_crd::parse_documents;

    fn plan() -> Plan {
        let text = "apiVersion: pgbalancer.io/v1alpha1\nkind: PgBalancerCluster\nmetadata: {name: demo}\nspec: {replicas: 2}\n";
        Plan::kubernetes(&parse_documents(text).unwrap()[0], 0)
    }

    fn now() -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(1_000).unwrap())
    }

    #[test]
    fn all_ready_is_running_with_ready_condition() {
        let seen = Workloads {
            existing: vec![0, 1, 2],
            ready: vec![0, 1, 2],
            balancers_ready: 1,
            ..Default::default()
        };
        let s = compute(&plan(), &seen, None, Some(3), now());
        assert_eq!(s.phase.as_deref(), Some("Running"));
        assert_eq!((s.replicas, s.ready_replicas), (2, 2));
        assert_eq!(s.current_primary.as_deref(), Some("demo-0"));
        assert_eq!(s.conditions[0].status, "True");
        assert_eq!(s.observed_generation, Some(3));
    }

    #[test]
    fn the_balancer_view_gives_node_state_and_lag() {
        let mut seen = Workloads {
            existing: vec![0, 1, 2],
            ready: vec![0, 1, 2],
            balancers_ready: 1,
            ..Default::default()
        };
        seen.nodes.insert(0, ("up".into(), 0));
        seen.nodes.insert(2, ("down".into(), 4096));
        let s = compute(&plan(), &seen, None, Some(1), now());
        assert_eq!(s.instances[0].balancer_node.as_deref(), Some("up"));
        assert_eq!(s.instances[0].lag_bytes, None);
        assert_eq!(
            (
                s.instances[2].balancer_node.as_deref(),
                s.instances[2].lag_bytes
            ),
            (Some("down"), Some(4096))
        );
        assert_eq!(s.instances[1].balancer_node, None);
    }

    #[test]
    fn transition_time_is_kept_while_a_condition_holds() {
        let seen = Workloads {
            existing: vec![0, 1, 2],
            ready: vec![0, 1, 2],
            balancers_ready: 1,
            ..Default::default()
        };
        let first = compute(&plan(), &seen, None, Some(1), now());
        let later = Time(k8s_openapi::jiff::Timestamp::from_second(2_000).unwrap());
        let second = compute(&plan(), &seen, Some(&first), Some(1), later);
        assert_eq!(second.conditions[0].last_transition_time, now());
        assert!(same(&first, &second));
    }

    #[test]
    fn invalid_spec_is_degraded_and_keeps_what_was_observed() {
        let seen = Workloads {
            existing: vec![0, 1, 2],
            ready: vec![0, 1, 2],
            balancers_ready: 1,
            ..Default::default()
        };
        let running = compute(&plan(), &seen, None, Some(1), now());
        let bad = invalid(
            Some(&running),
            "spec.replicas: -1 is out of range",
            Some(2),
            now(),
        );
        assert_eq!(bad.phase.as_deref(), Some("Degraded"));
        assert_eq!(bad.replicas, 2);
        let degraded = bad
            .conditions
            .iter()
            .find(|c| c.type_ == "Degraded")
            .unwrap();
        assert_eq!(
            (degraded.status.as_str(), degraded.message.as_str()),
            ("True", "spec.replicas: -1 is out of range")
        );
    }
}
