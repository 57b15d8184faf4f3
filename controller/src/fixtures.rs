//! Observations and plans the unit tests of `reconcile`, `reconcile::watch` and `status` share:
//! a cluster `demo` whose instance 0 is the primary, as the Docker backend sees it (SQL
//! answers). Tests change the fields that matter to them.

use crate::backend::{ObservedBalancer, ObservedInstance, PoolNode};
use crate::plan::{Plan, Role};

/// The plan of cluster `demo` with `replicas` replicas, instance 0 the primary.
pub fn plan(replicas: i32) -> Plan {
    let text = format!(
        "apiVersion: pgbalancer.io/v1alpha1\nkind: PgBalancerCluster\nmetadata: {{name: demo}}\nspec: {{replicas: {replicas}}}\n"
    );
    Plan::new(&pgbalancer_crd::parse_documents(&text).unwrap()[0], 0)
}

/// Instance `ordinal` running and answering SQL: 0 the primary, the others streaming from it
/// with no lag, every one at WAL position 1000, all of database system 7000.
pub fn serving(ordinal: u32) -> ObservedInstance {
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
        timeline: Some(1),
        received_lsn: Some(1000),
        replayed_lsn: Some(1000),
        system_identifier: Some(7000),
        marked: Some(if ordinal == 0 {
            Role::Primary
        } else {
            Role::Replica
        }),
        ..Default::default()
    }
}

/// Balancer node `slot` with `status`; slot 0 is the primary.
pub fn node(slot: u32, status: &str) -> PoolNode {
    PoolNode {
        slot,
        host: format!("demo-{slot}"),
        status: status.into(),
        role: if slot == 0 { "primary" } else { "standby" }.into(),
        ..PoolNode::default()
    }
}

/// A running, routing balancer with these nodes.
pub fn balancer(nodes: Vec<PoolNode>) -> ObservedBalancer {
    ObservedBalancer {
        name: "demo-balancer".into(),
        state: "running".into(),
        health: "healthy".into(),
        running: true,
        up_to_date: true,
        routing: true,
        nodes: Some(nodes),
        host_port: Some(19999),
        rest_port: None,
    }
}
