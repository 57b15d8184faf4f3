//! Tests of the planner.

use super::*;
use pgbalancer_crd::parse_documents;

fn cluster(spec: &str) -> PgBalancerCluster {
    let text = format!("apiVersion: pgbalancer.io/v1alpha1\nkind: PgBalancerCluster\nmetadata: {{name: demo}}\nspec:\n{spec}");
    parse_documents(&text).unwrap().remove(0)
}

#[test]
fn instances_are_named_by_ordinal_and_the_first_is_primary() {
    let plan = Plan::new(&cluster("  replicas: 2\n"), 0);
    let names: Vec<_> = plan
        .instances
        .iter()
        .map(|i| (i.name.as_str(), i.role))
        .collect();
    assert_eq!(
        names,
        [
            ("demo-0", Role::Primary),
            ("demo-1", Role::Replica),
            ("demo-2", Role::Replica)
        ]
    );
    assert_eq!(plan.primary().name, "demo-0");
    assert_eq!(plan.local.network, "pgbalancer-demo");
    assert_eq!(plan.balancer.instances[0].container, "demo-balancer");
    assert_eq!(plan.postgres.image, "pgbalancer/postgres:17");
}

#[test]
fn scale_down_never_removes_the_primary() {
    let plan = Plan::new(&cluster("  replicas: 1\n"), 3);
    let ordinals: Vec<_> = plan.instances.iter().map(|i| i.ordinal).collect();
    assert_eq!(ordinals, [0, 3]);
    assert_eq!(plan.primary().ordinal, 3);
    let alone = Plan::new(&cluster("  replicas: 0\n"), 2);
    assert_eq!(alone.instances.len(), 1);
    assert_eq!(alone.primary().ordinal, 2);
}

#[test]
fn explicit_local_identity_and_ports_are_used() {
    let plan = Plan::new(
        &cluster(
            "  replicas: 1\n  local:\n    network: {name: net, subnet: 10.9.0.0/16}\n    ports: {postgres: 15432, balancer: 19999}\n    instances:\n    - {ordinal: 1, containerName: r1, hostname: replica-one, ip: 10.9.0.21}\n",
        ),
        0,
    );
    let r = plan.instance(1).unwrap();
    assert_eq!(
        (r.container.as_str(), r.host.as_str()),
        ("r1", "replica-one")
    );
    assert_eq!(r.ip, Some("10.9.0.21".parse().unwrap()));
    assert_eq!(r.host_port, Some(15433));
    assert_eq!(plan.balancer.instances[0].sql_port, Some(19999));
    assert_eq!(plan.instance(0).unwrap().host, "demo-0");
}

#[test]
fn kubernetes_plans_reach_instances_through_pod_dns() {
    let plan = Plan::kubernetes(
        &cluster(
            "  replicas: 1\n  local:\n    instances:\n    - {ordinal: 1, hostname: ignored}\n",
        ),
        0,
    );
    assert_eq!(plan.instance(1).unwrap().host, "demo-1-0.demo-hl");
    assert_eq!(plan.instance(0).unwrap().name, "demo-0");
}
