//! Helpers of the integration tests: run the real binaries against the real Docker engine
//! with a private state directory, talk SQL to the published ports, and find what is left.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio_postgres::{Client, NoTls};

pub mod kube;
pub mod raw;
pub mod traffic;

/// A scenario: a cluster name, a private state directory, and cleanup on drop.
pub struct Scenario {
    pub name: String,
    pub dir: tempfile::TempDir,
}

impl Scenario {
    pub fn new(name: &str) -> Self {
        let s = Self {
            name: name.to_owned(),
            dir: tempfile::tempdir().unwrap(),
        };
        s.force_cleanup();
        s
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Runs `pgbalancer ARGS` with this scenario's state directory.
    pub fn pgbalancer(&self, args: &[&str]) -> Output {
        run(env!("CARGO_BIN_EXE_pgbalancer"), args, &self.state(), &[])
    }

    /// Runs `pgbalancer-cluster ARGS` in the scenario directory.
    pub fn seed_tool(&self, args: &[&str]) -> Output {
        run(
            env!("CARGO_BIN_EXE_pgbalancer-cluster"),
            args,
            &self.state(),
            &[],
        )
    }

    /// Writes `text` to a file in the scenario directory.
    pub fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// `pgbalancer status NAME -o json --show-secrets`.
    pub fn status(&self, name: &str) -> Value {
        let out = self.pgbalancer(&["status", name, "-o", "json", "--show-secrets"]);
        assert_success(&out);
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Removes anything labelled with this scenario's cluster name, whatever state says,
    /// and the controller `up` started for this scenario's state directory.
    pub fn force_cleanup(&self) {
        // The controller first: while it runs it would create again what is being removed.
        for id in self.controllers() {
            docker(&["rm", "-f", &id]);
        }
        remove_labelled(&self.name);
    }

    /// The state directory as the controller container's label names it.
    pub fn state_label(&self) -> String {
        let state = self.state();
        std::fs::canonicalize(&state)
            .unwrap_or(state)
            .display()
            .to_string()
    }

    /// IDs of the controller containers of this scenario's state directory (all states).
    pub fn controllers(&self) -> Vec<String> {
        docker(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=pgbalancer.io/state-dir={}", self.state_label()),
        ])
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        self.force_cleanup();
    }
}

pub fn run(bin: &str, args: &[&str], state: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .env("PGBALANCER_STATE_DIR", state)
        .env("RUST_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run binary")
}

pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn assert_success(out: &Output) {
    assert!(out.status.success(), "command failed: {}", text(out));
}

/// A cluster document.
pub fn cluster_yaml(name: &str, spec: &str) -> String {
    format!("apiVersion: pgbalancer.io/v1alpha1\nkind: PgBalancerCluster\nmetadata:\n  name: {name}\nspec:\n{spec}")
}

/// Runs the docker CLI; its trimmed standard output.
pub fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("docker CLI");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Containers, volumes and networks labelled as belonging to cluster `name`.
pub fn labelled(name: &str) -> Vec<String> {
    let filter = format!("label=app.kubernetes.io/instance={name}");
    let mut all = Vec::new();
    for kind in [
        vec!["ps", "-a"],
        vec!["volume", "ls"],
        vec!["network", "ls"],
    ] {
        let mut args = kind.clone();
        args.extend(["--filter", &filter, "--format", "{{.Name}}"]);
        if kind[0] == "ps" {
            args.pop();
            args.pop();
            args.extend(["--format", "{{.Names}}"]);
        }
        all.extend(
            docker(&args)
                .lines()
                .filter(|l| !l.is_empty())
                .map(|l| format!("{}:{l}", kind[0])),
        );
    }
    all
}

/// IDs of the running containers of cluster `name`, sorted.
pub fn container_ids(name: &str) -> Vec<String> {
    let mut ids: Vec<String> = docker(&[
        "ps",
        "-aq",
        "--no-trunc",
        "--filter",
        &format!("label=app.kubernetes.io/instance={name}"),
    ])
    .lines()
    .map(str::to_owned)
    .collect();
    ids.sort();
    ids
}

fn remove_labelled(name: &str) {
    let filter = format!("label=app.kubernetes.io/instance={name}");
    let ids = docker(&["ps", "-aq", "--filter", &filter]);
    for id in ids.lines() {
        docker(&["rm", "-f", "-v", id]);
    }
    for v in docker(&["volume", "ls", "-q", "--filter", &filter]).lines() {
        docker(&["volume", "rm", "-f", v]);
    }
    for n in docker(&["network", "ls", "-q", "--filter", &filter]).lines() {
        docker(&["network", "rm", n]);
    }
}

/// Connects to 127.0.0.1:`port`.
pub async fn connect(port: u64, user: &str, password: &str, db: &str) -> Client {
    let (client, conn) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(port as u16)
        .user(user)
        .password(password)
        .dbname(db)
        .connect_timeout(Duration::from_secs(5))
        .connect(NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to {port} as {user}: {e}"));
    tokio::spawn(conn);
    client
}

/// `SHOW POOL_NODES` through the balancer on 127.0.0.1:`port`: the given columns of each row.
pub async fn pool_node_columns(port: u64, password: &str, columns: &[&str]) -> Vec<Vec<String>> {
    connect(port, "app", password, "app")
        .await
        .simple_query("SHOW POOL_NODES")
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                columns
                    .iter()
                    .map(|c| r.get(*c).unwrap_or_default().to_owned())
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// Retries `check` for up to `secs` seconds until it returns true.
pub async fn eventually<F, Fut>(secs: u64, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// Port of an instance document.
pub fn port(doc: &Value) -> u64 {
    doc["port"]
        .as_u64()
        .unwrap_or_else(|| panic!("no port in {doc}"))
}

/// Runs kubectl; success and its output.
pub fn kubectl(args: &[&str]) -> (bool, String) {
    let out = Command::new("kubectl")
        .args(args)
        .output()
        .expect("kubectl");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}
