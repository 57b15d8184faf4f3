//! Tests of spec validation: each invalid input names its field.

use super::*;
use crate::parse_documents;

fn cluster(spec_yaml: &str) -> PgBalancerCluster {
    cluster_named("demo", spec_yaml)
}

fn cluster_named(name: &str, spec_yaml: &str) -> PgBalancerCluster {
    let text = format!(
        "apiVersion: pgbalancer.io/v1alpha1\nkind: PgBalancerCluster\nmetadata: {{name: {name}}}\nspec:\n{spec_yaml}"
    );
    parse_documents(&text).unwrap().remove(0)
}

fn fields(result: Result<(), ValidationErrors>) -> Vec<String> {
    result
        .err()
        .map(|e| e.0.into_iter().map(|e| e.field).collect())
        .unwrap_or_default()
}

#[test]
fn defaults_are_valid() {
    assert_eq!(validate(&cluster("  replicas: 2\n")), Ok(()));
}

#[test]
fn replica_count_out_of_range_names_spec_replicas() {
    assert_eq!(
        fields(validate(&cluster("  replicas: -1\n"))),
        ["spec.replicas"]
    );
    assert_eq!(
        fields(validate(&cluster("  replicas: 1000\n"))),
        ["spec.replicas"]
    );
}

#[test]
fn unknown_postgres_version_is_refused() {
    let err = validate(&cluster("  postgres: {version: 16}\n")).unwrap_err();
    assert_eq!(err.0[0].field, "spec.postgres.version");
    assert!(err.0[0].message.contains("[15, 17]"));
}

#[test]
fn bad_cluster_names_are_refused() {
    for name in ["Demo", "-x", "a_b", &"x".repeat(41)] {
        let c = cluster_named(&format!("'{name}'"), "  replicas: 1\n");
        assert_eq!(fields(validate(&c)), ["metadata.name"], "{name}");
    }
}

#[test]
fn managed_parameters_and_reserved_roles_are_refused() {
    let c =
        cluster("  postgres:\n    user: postgres\n    parameters: {port: '1', work_mem: 4MB}\n");
    assert_eq!(
        fields(validate(&c)),
        ["spec.postgres.user", "spec.postgres.parameters.port"]
    );
}

#[test]
fn pool_budget_beyond_max_connections_is_refused() {
    let c = cluster("  balancer: {numInitChildren: 100, maxPool: 4}\n");
    assert_eq!(fields(validate(&c)), ["spec.balancer.numInitChildren"]);
    let raised = cluster("  balancer: {numInitChildren: 100, maxPool: 4}\n  postgres:\n    parameters: {max_connections: '500'}\n");
    assert_eq!(validate(&raised), Ok(()));
}

#[test]
fn ip_outside_subnet_is_refused() {
    let c = cluster(
        "  local:\n    network: {subnet: 172.30.0.0/16}\n    instances:\n    - {ordinal: 0, ip: 10.0.0.5}\n    - {ordinal: 1, ip: 172.30.0.1}\n",
    );
    assert_eq!(
        fields(validate(&c)),
        ["spec.local.instances[0].ip", "spec.local.instances[1].ip"]
    );
}

#[test]
fn static_ip_without_subnet_is_refused() {
    let c = cluster("  local:\n    instances:\n    - {ordinal: 0, ip: 172.30.0.9}\n");
    assert_eq!(fields(validate(&c)), ["spec.local.instances[0].ip"]);
}

#[test]
fn duplicate_ports_within_a_cluster_are_refused() {
    let c = cluster("  replicas: 2\n  local:\n    ports: {postgres: 15432, balancer: 15433}\n");
    assert_eq!(
        fields(validate(&c)),
        ["spec.local.ports.balancer (balancer 0)"]
    );
}

#[test]
fn two_clusters_claiming_one_port_or_name_are_refused() {
    let a = cluster_named("a", "  local: {ports: {balancer: 19999}}\n");
    let b = cluster_named("b", "  local: {ports: {balancer: 19999}}\n");
    assert_eq!(
        fields(validate_set(&[a.clone(), b])),
        ["b: spec.local.ports.balancer (balancer 0)"]
    );
    assert_eq!(fields(validate_set(&[a.clone(), a])), ["a: metadata.name"]);
}

#[test]
fn replica_ports_follow_the_primary_port() {
    let c = cluster("  replicas: 3\n  local:\n    ports: {postgres: 15432}\n    instances:\n    - {ordinal: 2, port: 20000}\n");
    let local = c.spec.local.as_ref().unwrap();
    assert_eq!(local.instance_port(0), Some(15432));
    assert_eq!(local.instance_port(1), Some(15433));
    assert_eq!(local.instance_port(2), Some(20000));
    assert_eq!(local.instance_port(3), Some(15435));
}

#[test]
fn bootstrap_fields_cannot_change_on_existing_data() {
    let old = cluster("  replicas: 2\n");
    let new = cluster("  replicas: 3\n  postgres: {version: 15, database: other}\n");
    let err = validate_update(&old.spec, &new.spec).unwrap_err();
    let fields: Vec<_> = err.0.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(fields, ["spec.postgres.version", "spec.postgres.database"]);
    assert_eq!(
        validate_update(&old.spec, &cluster("  replicas: 5\n").spec),
        Ok(())
    );
}
