//! Tests of the status computation on observations shaped like each backend's.

use super::*;
use crate::backend::{ObservedBalancer, ObservedInstance, PoolNode};
use crate::fixtures;

fn plan() -> Plan {
    fixtures::plan(2)
}

fn now(second: i64) -> Time {
    Time(k8s_openapi::jiff::Timestamp::from_second(second).unwrap())
}

/// As Docker sees it: SQL answers.
fn docker_instance(ordinal: u32) -> ObservedInstance {
    fixtures::serving(ordinal)
}

/// As an operator outside the cluster network sees it: pods and labels, no SQL.
fn kube_instance(ordinal: u32, ready: bool) -> ObservedInstance {
    ObservedInstance {
        name: format!("demo-{ordinal}-0"),
        state: "Running".into(),
        running: true,
        up_to_date: true,
        engine_ready: Some(ready),
        marked: Some(if ordinal == 0 {
            Role::Primary
        } else {
            Role::Replica
        }),
        ..Default::default()
    }
}

fn balancer() -> ObservedBalancer {
    ObservedBalancer {
        running: true,
        up_to_date: true,
        routing: true,
        nodes: Some(
            (0..3)
                .map(|slot| PoolNode {
                    slot,
                    status: "up".into(),
                    role: if slot == 0 { "primary" } else { "standby" }.into(),
                    replication_delay: Some(64 * i64::from(slot)),
                    ..Default::default()
                })
                .collect(),
        ),
        ..Default::default()
    }
}

fn observed(instance: impl Fn(u32) -> ObservedInstance) -> Observed {
    Observed {
        network: true,
        instances: (0..3).map(|o| (o, instance(o))).collect(),
        balancers: [(0, balancer())].into(),
    }
}

#[test]
fn both_backends_report_running_the_same_way() {
    for seen in [
        observed(docker_instance),
        observed(|o| kube_instance(o, true)),
    ] {
        let s = compute(&plan(), &seen, &Record::settled(0), None, Some(3), now(1));
        assert_eq!(s.phase.as_deref(), Some("Running"), "{seen:?}");
        assert_eq!((s.replicas, s.ready_replicas), (2, 2));
        assert_eq!(s.current_primary.as_deref(), Some("demo-0"));
        assert_eq!(s.target_primary.as_deref(), Some("demo-0"));
        assert_eq!(s.conditions[0].status, "True");
        assert_eq!(s.observed_generation, Some(3));
    }
}

#[test]
fn a_pod_not_ready_without_sql_is_degraded_not_guessed_ready() {
    let seen = observed(|o| kube_instance(o, o != 2));
    let s = compute(&plan(), &seen, &Record::settled(0), None, None, now(1));
    assert_eq!(s.phase.as_deref(), Some("Degraded"));
    assert!(!s.instances[2].ready);
    assert_eq!(s.instances[2].timeline, None);
}

#[test]
fn lag_comes_from_sql_else_from_the_balancer() {
    let s = compute(
        &plan(),
        &observed(|o| kube_instance(o, true)),
        &Record::settled(0),
        None,
        None,
        now(1),
    );
    assert_eq!(s.instances[0].lag_bytes, None);
    assert_eq!(s.instances[2].lag_bytes, Some(128));
    assert_eq!(s.instances[2].balancer_node.as_deref(), Some("up"));
}

#[test]
fn a_stopped_primary_is_failed_and_degraded() {
    let mut seen = observed(docker_instance);
    let primary = seen.instances.get_mut(&0).unwrap();
    primary.running = false;
    primary.accepting = false;
    primary.in_recovery = None;
    let s = compute(&plan(), &seen, &Record::settled(0), None, None, now(1));
    assert_eq!(s.phase.as_deref(), Some("Failed"));
    let degraded = &s.conditions[2];
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "PrimaryUnavailable")
    );
}

#[test]
fn two_writable_instances_are_a_conflict() {
    let mut seen = observed(docker_instance);
    seen.instances.get_mut(&1).unwrap().in_recovery = Some(false);
    let s = compute(&plan(), &seen, &Record::settled(0), None, None, now(1));
    assert_eq!(s.phase.as_deref(), Some("Degraded"));
    assert_eq!(s.conditions[2].reason, "PrimaryConflict");
    assert!(s.conditions[2]
        .message
        .contains("demo-0 and demo-1 both accept writes"));
}

#[test]
fn a_moving_primary_is_switching_over_with_both_names() {
    let record = Record {
        current: Some(0),
        target: 1,
        kind: ChangeKind::Switchover,
    };
    let text = "apiVersion: pgbalancer.io/v1alpha1\nkind: PgBalancerCluster\nmetadata: {name: demo}\nspec: {replicas: 2}\n";
    let plan = Plan::new(&pgbalancer_crd::parse_documents(text).unwrap()[0], 1);
    let s = compute(
        &plan,
        &observed(docker_instance),
        &record,
        None,
        None,
        now(1),
    );
    assert_eq!(s.phase.as_deref(), Some("SwitchingOver"));
    assert_eq!(
        (s.current_primary.as_deref(), s.target_primary.as_deref()),
        (Some("demo-0"), Some("demo-1"))
    );
    let failing = Record {
        kind: ChangeKind::Failover,
        ..record
    };
    let s = compute(
        &plan,
        &observed(docker_instance),
        &failing,
        None,
        None,
        now(1),
    );
    assert_eq!(s.phase.as_deref(), Some("FailingOver"));
    assert_eq!(s.conditions[1].reason, "PrimaryMoving");
}

#[test]
fn transition_time_is_kept_while_a_condition_holds() {
    let seen = observed(docker_instance);
    let first = compute(
        &plan(),
        &seen,
        &Record::settled(0),
        None,
        Some(1),
        now(1_000),
    );
    let second = compute(
        &plan(),
        &seen,
        &Record::settled(0),
        Some(&first),
        Some(1),
        now(2_000),
    );
    assert_eq!(second.conditions[0].last_transition_time, now(1_000));
    assert!(same(&first, &second));
}

#[test]
fn invalid_spec_is_degraded_and_keeps_what_was_observed() {
    let running = compute(
        &plan(),
        &observed(docker_instance),
        &Record::settled(0),
        None,
        Some(1),
        now(1),
    );
    let bad = invalid(
        Some(&running),
        "spec.replicas: -1 is out of range",
        Some(2),
        now(2),
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
