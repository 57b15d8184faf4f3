//! Bad input is refused before anything is created: a non-zero exit, a message naming the
//! file, field or argument, no container or volume, and no stored state.

mod common;

use common::*;

fn refused(s: &Scenario, args: &[&str], expect: &str) {
    let out = s.pgbalancer(args);
    assert!(!out.status.success(), "{args:?} succeeded: {}", text(&out));
    assert!(
        text(&out).contains(expect),
        "{args:?}: expected `{expect}` in: {}",
        text(&out)
    );
    assert_eq!(
        labelled(&s.name),
        Vec::<String>::new(),
        "{args:?} created objects"
    );
    assert!(
        !s.state()
            .join("clusters")
            .join(format!("{}.yaml", s.name))
            .exists(),
        "{args:?} stored state"
    );
}

fn refused_file(s: &Scenario, yaml: &str, expect: &str) {
    let file = s.file("bad.yaml", yaml);
    refused(s, &["up", "-f", file.to_str().unwrap()], expect);
}

#[test]
fn invalid_files_are_refused_naming_the_field() {
    let s = Scenario::new("it-bad");
    refused_file(&s, "apiVersion: [", "invalid YAML");
    refused_file(
        &s,
        &cluster_yaml("it-bad", "  postgres:\n    verison: 17\n"),
        "spec.postgres",
    );
    refused_file(
        &s,
        &cluster_yaml("it-bad", "  replicas: -1\n"),
        "spec.replicas",
    );
    refused_file(
        &s,
        &cluster_yaml("it-bad", "  replicas: 100000\n"),
        "spec.replicas",
    );
    refused_file(
        &s,
        &cluster_yaml("it-bad", "  postgres: {version: 16}\n"),
        "spec.postgres.version",
    );
    refused_file(
        &s,
        &cluster_yaml("It_Bad", "  replicas: 1\n"),
        "metadata.name",
    );
    refused_file(
        &s,
        &cluster_yaml(
            "it-bad",
            "  local:\n    network: {subnet: 10.232.0.0/16}\n    instances:\n    - {ordinal: 0, ip: 10.99.0.5}\n",
        ),
        "spec.local.instances[0].ip",
    );
    let two = format!(
        "{}---\n{}",
        cluster_yaml("it-bad", "  local: {ports: {balancer: 27999}}\n"),
        cluster_yaml("it-bad-2", "  local: {ports: {balancer: 27999}}\n")
    );
    refused_file(&s, &two, "host port 27999");
    refused(
        &s,
        &["up", "-f", "/nonexistent/cluster.yaml"],
        "/nonexistent/cluster.yaml",
    );
}

#[test]
fn a_host_port_in_use_is_refused_before_anything_is_created() {
    let s = Scenario::new("it-bad-port");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    refused_file(
        &s,
        &cluster_yaml(
            "it-bad-port",
            &format!("  local: {{ports: {{postgres: {port}}}}}\n"),
        ),
        &format!("host port {port}"),
    );
}

#[test]
fn unreachable_docker_is_reported() {
    let s = Scenario::new("it-bad-docker");
    let file = s.file("ok.yaml", &cluster_yaml("it-bad-docker", "  replicas: 1\n"));
    let out = run(
        env!("CARGO_BIN_EXE_pgbalancer"),
        &["up", "-f", file.to_str().unwrap()],
        &s.state(),
        &[("DOCKER_HOST", "unix:///nonexistent/docker.sock")],
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("cannot reach the Docker engine"),
        "{}",
        text(&out)
    );
}

#[test]
fn unknown_cluster_and_bad_arguments_are_refused() {
    let s = Scenario::new("it-bad-args");
    refused(
        &s,
        &["scale", "it-bad-args", "--replicas", "2"],
        "no cluster named `it-bad-args`",
    );
    refused(
        &s,
        &["down", "it-bad-args"],
        "no cluster named `it-bad-args`",
    );
    refused(
        &s,
        &["images", "build", "--postgres-version", "16"],
        "--postgres-version 16",
    );
    refused(&s, &["scale", "it-bad-args"], "--replicas");
}
