//! Tests of the reconcile decisions on hand-built observations.

use super::*;
use crate::backend::{ObservedBalancer, ObservedInstance, PoolNode};
use pgbalancer_crd::parse_documents;

fn plan(replicas: i32) -> Plan {
    let text = format!(
        "apiVersion: pgbalancer.io/v1alpha1\nkind: PgBalancerCluster\nmetadata: {{name: demo}}\nspec: {{replicas: {replicas}}}\n"
    );
    Plan::new(&parse_documents(&text).unwrap()[0], 0)
}

fn ready(ordinal: u32) -> ObservedInstance {
    ObservedInstance {
        name: format!("demo-{ordinal}"),
        state: "running".into(),
        health: "healthy".into(),
        running: true,
        up_to_date: true,
        accepting: true,
        in_recovery: Some(ordinal != 0),
        streaming: ordinal != 0,
        lag_bytes: Some(0),
        host_port: Some(15432 + ordinal as u16),
    }
}

fn node(slot: u32, status: &str) -> PoolNode {
    PoolNode {
        slot,
        host: format!("demo-{slot}"),
        status: status.into(),
        role: if slot == 0 { "primary" } else { "standby" }.into(),
        ..PoolNode::default()
    }
}

fn balancer(nodes: Vec<PoolNode>) -> ObservedBalancer {
    ObservedBalancer {
        name: "demo-balancer".into(),
        state: "running".into(),
        health: "healthy".into(),
        running: true,
        up_to_date: true,
        routing: true,
        nodes,
        host_port: Some(19999),
        rest_port: None,
    }
}

fn converged(replicas: u32) -> Observed {
    Observed {
        network: true,
        instances: (0..=replicas).map(|o| (o, ready(o))).collect(),
        balancers: [(0, balancer((0..=replicas).map(|s| node(s, "up")).collect()))].into(),
    }
}

#[test]
fn empty_world_starts_with_the_network() {
    assert_eq!(
        decide(&plan(2), &Observed::default()),
        [Action::EnsureNetwork]
    );
}

#[test]
fn instances_are_created_together_and_the_balancer_waits_for_them() {
    let observed = Observed {
        network: true,
        ..Observed::default()
    };
    let actions = decide(&plan(2), &observed);
    assert_eq!(
        actions,
        [
            Action::CreateInstance(0),
            Action::CreateInstance(1),
            Action::CreateInstance(2)
        ]
    );
    let mut cloning = converged(2);
    cloning.balancers.clear();
    cloning.instances.get_mut(&2).unwrap().streaming = false;
    assert_eq!(decide(&plan(2), &cloning), []);
    assert_eq!(
        pending(&plan(2), &cloning)[0],
        "demo-2 not streaming from the primary"
    );
}

#[test]
fn converged_cluster_needs_nothing() {
    let observed = converged(2);
    assert!(decide(&plan(2), &observed).is_empty());
    assert!(pending(&plan(2), &observed).is_empty());
}

#[test]
fn scale_up_adds_the_slot_then_attaches_it() {
    let mut observed = converged(2);
    observed.instances.insert(3, ready(3));
    assert_eq!(decide(&plan(3), &observed), [Action::UpdateBackends(0)]);
    observed
        .balancers
        .get_mut(&0)
        .unwrap()
        .nodes
        .push(node(3, "down"));
    assert_eq!(
        decide(&plan(3), &observed),
        [Action::AttachBackend {
            balancer: 0,
            slot: 3
        }]
    );
}

#[test]
fn scale_down_detaches_before_removing_and_never_touches_the_primary() {
    let mut observed = converged(2);
    let actions = decide(&plan(0), &observed);
    assert_eq!(
        actions,
        [
            Action::DetachBackend {
                balancer: 0,
                slot: 1
            },
            Action::DetachBackend {
                balancer: 0,
                slot: 2
            }
        ]
    );
    for n in &mut observed.balancers.get_mut(&0).unwrap().nodes {
        if n.slot > 0 {
            n.status = "down".into();
        }
    }
    assert_eq!(
        decide(&plan(0), &observed),
        [Action::RemoveInstance(1), Action::RemoveInstance(2)]
    );
}

#[test]
fn changed_or_stopped_objects_are_replaced_or_started() {
    let mut observed = converged(1);
    observed.instances.get_mut(&1).unwrap().up_to_date = false;
    observed.balancers.get_mut(&0).unwrap().running = false;
    assert_eq!(
        decide(&plan(1), &observed),
        [Action::ReplaceInstance(1), Action::StartBalancer(0)]
    );
}

#[test]
fn a_down_node_is_attached_only_once_its_instance_is_ready() {
    let mut observed = converged(1);
    observed.balancers.get_mut(&0).unwrap().nodes[1].status = "down".into();
    observed.instances.get_mut(&1).unwrap().streaming = false;
    assert!(decide(&plan(1), &observed).is_empty());
    observed.instances.get_mut(&1).unwrap().streaming = true;
    assert_eq!(
        decide(&plan(1), &observed),
        [Action::AttachBackend {
            balancer: 0,
            slot: 1
        }]
    );
}
