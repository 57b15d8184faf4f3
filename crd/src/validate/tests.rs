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
fn tls_parameters_are_managed() {
    for key in ["ssl", "ssl_cert_file", "ssl_key_file"] {
        let c = cluster(&format!("  postgres:\n    parameters: {{{key}: 'off'}}\n"));
        assert_eq!(
            fields(validate(&c)),
            [format!("spec.postgres.parameters.{key}")],
            "{key}"
        );
    }
}

#[test]
fn initdb_databases_are_refused() {
    for db in ["postgres", "template0", "template1"] {
        let err = validate(&cluster(&format!("  postgres: {{database: {db}}}\n"))).unwrap_err();
        assert_eq!(err.0.len(), 1, "{db}");
        assert_eq!(err.0[0].field, "spec.postgres.database");
        assert!(err.0[0].message.contains(db), "{}", err.0[0].message);
    }
    let c = cluster("  postgres: {database: postgres2}\n");
    assert_eq!(validate(&c), Ok(()));
}

#[test]
fn default_pool_is_valid_for_every_balancer_count() {
    for instances in 1..=MAX_BALANCER_INSTANCES {
        let c = cluster(&format!("  balancer: {{instances: {instances}}}\n"));
        assert_eq!(validate(&c), Ok(()), "instances: {instances}");
        let derived = default_max_connections(&c.spec);
        assert!(
            pool_connections(&c.spec) + RESERVED_CONNECTIONS <= derived,
            "instances: {instances}, max_connections {derived}"
        );
    }
}

#[test]
fn derived_max_connections_moves_in_coarse_steps() {
    let table = [
        // (balancer spec, max_connections)
        ("{instances: 1}", 200),
        ("{instances: 2}", 300),
        ("{instances: 3}", 600),
        ("{instances: 4}", 600),
        ("{instances: 5}", 1100),
        ("{instances: 8}", 1100),
        ("{instances: 1, numInitChildren: 16, maxPool: 2}", 200),
        ("{instances: 4, numInitChildren: 16, maxPool: 2}", 200),
        ("{instances: 8, numInitChildren: 16, maxPool: 2}", 300),
        ("{instances: 1, numInitChildren: 100, maxPool: 4}", 500),
        ("{instances: 1, numInitChildren: 45, maxPool: 4}", 200),
        ("{instances: 1, numInitChildren: 46, maxPool: 4}", 300),
    ];
    for (balancer, expected) in table {
        let c = cluster(&format!("  balancer: {balancer}\n"));
        assert_eq!(default_max_connections(&c.spec), expected, "{balancer}");
        assert_eq!(validate(&c), Ok(()), "{balancer}");
    }
}

#[test]
fn explicit_max_connections_is_kept_and_must_hold_the_pool() {
    let table = [
        // (max_connections, balancer spec, valid)
        ("200", "{instances: 1}", true),
        ("138", "{instances: 1}", true),
        ("137", "{instances: 1}", false),
        ("200", "{instances: 2}", false),
        ("5000", "{instances: 8}", true),
        ("409", "{numInitChildren: 100, maxPool: 4}", false),
        ("410", "{numInitChildren: 100, maxPool: 4}", true),
    ];
    for (max_connections, balancer, valid) in table {
        let c = cluster(&format!(
            "  balancer: {balancer}\n  postgres:\n    parameters: {{max_connections: '{max_connections}'}}\n"
        ));
        let expected: &[&str] = if valid {
            &[]
        } else {
            &["spec.postgres.parameters.max_connections"]
        };
        assert_eq!(
            fields(validate(&c)),
            expected,
            "{max_connections} with {balancer}"
        );
        // The user's own line decides; the managed one no longer follows the balancers.
        assert_eq!(default_max_connections(&c.spec), DEFAULT_MAX_CONNECTIONS);
    }
    let low = cluster(
        "  balancer: {instances: 2}\n  postgres:\n    parameters: {max_connections: '200'}\n",
    );
    let message = &validate(&low).unwrap_err().0[0].message;
    assert!(message.contains("266"), "{message}");
}

#[test]
fn malformed_max_connections_is_named_once() {
    for value in ["lots", "5"] {
        let c = cluster(&format!(
            "  postgres:\n    parameters: {{max_connections: '{value}'}}\n"
        ));
        assert_eq!(
            fields(validate(&c)),
            ["spec.postgres.parameters.max_connections"],
            "{value}"
        );
    }
}

#[test]
fn a_pool_beyond_what_postgres_allows_is_refused() {
    let c = cluster("  balancer: {instances: 8, numInitChildren: 2048, maxPool: 64}\n");
    assert_eq!(fields(validate(&c)), ["spec.balancer.numInitChildren"]);
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

#[test]
fn synchronous_number_must_fit_the_replicas() {
    let sync = |replicas: i32, number: u32| {
        fields(validate(&cluster(&format!(
            "  replicas: {replicas}\n  postgres: {{synchronous: {{number: {number}}}}}\n"
        ))))
    };
    assert!(sync(2, 1).is_empty());
    assert!(sync(2, 2).is_empty());
    assert_eq!(sync(1, 2), ["spec.postgres.synchronous.number"]);
    assert_eq!(sync(2, 0), ["spec.postgres.synchronous.number"]);
    assert_eq!(
        fields(validate(&cluster(
            "  postgres: {parameters: {synchronous_standby_names: '*'}}\n"
        ))),
        ["spec.postgres.parameters.synchronous_standby_names"]
    );
}

/// Every field, with wrong types and values out of range: each is refused, and the message
/// names the field. The list of what was tried is printed (`cargo test -- --nocapture`).
#[test]
fn every_field_refuses_wrong_types_and_ranges_naming_itself() {
    let cases: &[(&str, &str)] = &[
        ("  replicas: three\n", "spec.replicas"),
        ("  replicas: -1\n", "spec.replicas"),
        ("  replicas: 33\n", "spec.replicas"),
        ("  replicas: 2.5\n", "spec.replicas"),
        ("  replicas: [1]\n", "spec.replicas"),
        ("  postgres: {version: 9}\n", "spec.postgres.version"),
        (
            "  postgres: {version: seventeen}\n",
            "spec.postgres.version",
        ),
        (
            "  postgres: {database: \"a b\"}\n",
            "spec.postgres.database",
        ),
        ("  postgres: {database: 5}\n", "spec.postgres.database"),
        ("  postgres: {user: postgres}\n", "spec.postgres.user"),
        ("  postgres: {user: \"\"}\n", "spec.postgres.user"),
        (
            "  postgres: {storage: {size: lots}}\n",
            "spec.postgres.storage.size",
        ),
        (
            "  postgres: {storage: {size: -1Gi}}\n",
            "spec.postgres.storage.size",
        ),
        (
            "  postgres: {storage: {fixPermissions: maybe}}\n",
            "spec.postgres.storage.fixPermissions",
        ),
        (
            "  postgres: {parameters: {max_connections: many}}\n",
            "spec.postgres.parameters.max_connections",
        ),
        (
            "  postgres: {parameters: {port: \"6000\"}}\n",
            "spec.postgres.parameters.port",
        ),
        (
            "  postgres: {parameters: [1, 2]}\n",
            "spec.postgres.parameters",
        ),
        (
            "  replicas: 1\n  postgres: {synchronous: {number: 2}}\n",
            "spec.postgres.synchronous.number",
        ),
        (
            "  postgres: {synchronous: {number: 0}}\n",
            "spec.postgres.synchronous.number",
        ),
        (
            "  postgres: {synchronous: {number: one}}\n",
            "spec.postgres.synchronous.number",
        ),
        (
            "  failover: {delaySeconds: 0}\n",
            "spec.failover.delaySeconds",
        ),
        (
            "  failover: {delaySeconds: 301}\n",
            "spec.failover.delaySeconds",
        ),
        (
            "  failover: {delaySeconds: soon}\n",
            "spec.failover.delaySeconds",
        ),
        ("  failover: {enabled: perhaps}\n", "spec.failover.enabled"),
        (
            "  failover: {maxLagBytes: -5}\n",
            "spec.failover.maxLagBytes",
        ),
        ("  balancer: {instances: 0}\n", "spec.balancer.instances"),
        ("  balancer: {instances: 100}\n", "spec.balancer.instances"),
        (
            "  balancer: {numInitChildren: 0}\n",
            "spec.balancer.numInitChildren",
        ),
        (
            "  balancer: {numInitChildren: lots}\n",
            "spec.balancer.numInitChildren",
        ),
        ("  balancer: {maxPool: 0}\n", "spec.balancer.maxPool"),
        ("  balancer: {maxPool: 1.5}\n", "spec.balancer.maxPool"),
        (
            "  local: {bindAddress: somewhere}\n",
            "spec.local.bindAddress",
        ),
        (
            "  local: {network: {name: \"bad name\"}}\n",
            "spec.local.network.name",
        ),
        (
            "  local: {network: {subnet: 10.0.0.0/99}}\n",
            "spec.local.network.subnet",
        ),
        (
            "  local: {network: {subnet: 10.0.0.0}}\n",
            "spec.local.network.subnet",
        ),
        (
            "  local: {ports: {postgres: 70000}}\n",
            "spec.local.ports.postgres",
        ),
        (
            "  local: {ports: {balancer: http}}\n",
            "spec.local.ports.balancer",
        ),
        (
            "  local: {ports: {postgres: 5432, balancer: 5432}}\n",
            "spec.local.ports",
        ),
        ("  unknownField: 1\n", "spec.unknownField"),
        ("  postgres: {verison: 17}\n", "spec.postgres.verison"),
    ];
    let mut tried = Vec::new();
    for (spec, field) in cases {
        let text = format!(
            "apiVersion: pgbalancer.io/v1alpha1\nkind: PgBalancerCluster\nmetadata: {{name: demo}}\nspec:\n{spec}"
        );
        let message = match parse_documents(&text) {
            Err(e) => e.to_string(),
            Ok(clusters) => match validate(&clusters[0]) {
                Err(e) => e.to_string(),
                Ok(()) => panic!("accepted: {spec}"),
            },
        };
        assert!(
            message.contains(field),
            "{spec:?}: the message does not name {field}: {message}"
        );
        tried.push(format!("{:<48} -> {message}", spec.trim()));
    }
    println!("tried {} bad specs:\n{}", tried.len(), tried.join("\n"));
}

#[test]
fn balancer_tls_names_its_fields() {
    assert_eq!(
        validate(&cluster("  balancer: {tls: {mode: required}}\n")),
        Ok(())
    );
    assert_eq!(
        fields(validate(&cluster(
            "  balancer: {tls: {mode: enabled, certificateSecret: Bad_Name}}\n"
        ))),
        ["spec.balancer.tls.certificateSecret"]
    );
    assert_eq!(
        fields(validate(&cluster(
            "  balancer: {tls: {certificateSecret: balancer-cert}}\n"
        ))),
        ["spec.balancer.tls.certificateSecret"]
    );
    let e = parse_documents(
        "apiVersion: pgbalancer.io/v1alpha1\nkind: PgBalancerCluster\nmetadata: {name: d}\nspec:\n  balancer: {tls: {mode: sometimes}}\n",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("tls") || e.contains("sometimes"), "{e}");
}
