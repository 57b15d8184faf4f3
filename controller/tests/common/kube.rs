//! Helpers of the tests against the test Kubernetes: kubectl as JSON, Secrets, pod addresses,
//! and a client pod so that SQL to Service and pod addresses runs inside the cluster network.

use std::process::Command;

use serde_json::Value;

use super::kubectl;

pub mod session;

pub fn get_json(args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let (ok, out) = kubectl(&all);
    if !ok {
        return Value::Null;
    }
    serde_json::from_str(&out).unwrap_or(Value::Null)
}

pub fn secret(ns: &str, name: &str, key: &str) -> String {
    let v = get_json(&["-n", ns, "get", "secret", name]);
    let b64 = v["data"][key].as_str().unwrap_or_default();
    let out = Command::new("base64")
        .arg("-d")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(b64.as_bytes())?;
            c.wait_with_output()
        });
    String::from_utf8_lossy(&out.unwrap().stdout).into_owned()
}

pub fn pod_ips(ns: &str, selector: &str) -> Vec<(String, String)> {
    let v = get_json(&["-n", ns, "get", "pods", "-l", selector]);
    v["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|p| {
                    Some((
                        p["metadata"]["name"].as_str()?.to_owned(),
                        p["status"]["podIP"].as_str()?.to_owned(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A pod in `ns` with `psql`, so that SQL to Service and pod addresses runs inside the cluster
/// network, never from the host.
pub fn start_sql_client(ns: &str) {
    let manifest = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: sql-client, namespace: {ns}}}\nspec:\n  \
         terminationGracePeriodSeconds: 0\n  containers:\n  - name: psql\n    \
         image: pgbalancer/postgres:17\n    imagePullPolicy: Never\n    \
         command: [sleep, '3600']\n"
    );
    let file = std::env::temp_dir().join("pgbalancer-e2e-sql-client.yaml");
    std::fs::write(&file, manifest).unwrap();
    let (ok, out) = kubectl(&["apply", "-f", file.to_str().unwrap()]);
    assert!(ok, "{out}");
    let (ok, out) = kubectl(&[
        "-n",
        ns,
        "wait",
        "--for=condition=Ready",
        "pod/sql-client",
        "--timeout=120s",
    ]);
    assert!(ok, "{out}");
}

/// Runs `sql` as the application user on `host` from the client pod; its output, or `None`
/// when psql failed. The password goes through the environment of the exec.
pub fn psql_in_cluster(
    ns: &str,
    host: &str,
    port: u16,
    password: &str,
    sql: &str,
) -> Option<String> {
    psql_as_in_cluster(ns, host, port, ("app", "app"), password, sql)
}

/// Runs `sql` from the client pod as `user` on database `db` of `host` (the pair `(user, db)`
/// is one argument); its output, or `None` when psql failed. The password goes through the
/// environment of the exec.
pub fn psql_as_in_cluster(
    ns: &str,
    host: &str,
    port: u16,
    (user, db): (&str, &str),
    password: &str,
    sql: &str,
) -> Option<String> {
    let out = Command::new("kubectl")
        .args(["-n", ns, "exec", "sql-client", "--", "env"])
        .arg(format!("PGPASSWORD={password}"))
        .args([
            "PGCONNECT_TIMEOUT=3",
            "psql",
            "-X",
            "-q",
            "-t",
            "-A",
            "-v",
            "ON_ERROR_STOP=1",
        ])
        .args(["-h", host, "-p", &port.to_string(), "-U", user, "-d", db])
        .args(["-c", sql])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Runs the statements of `script` (psql reads it from its input, one query per statement)
/// in one session as the application user on `host` from the client pod; its output, or
/// `None` when psql failed.
pub fn psql_script_in_cluster(
    ns: &str,
    host: &str,
    port: u16,
    password: &str,
    script: &str,
) -> Option<String> {
    use std::io::Write;
    let mut child = Command::new("kubectl")
        .args(["-n", ns, "exec", "-i", "sql-client", "--", "env"])
        .arg(format!("PGPASSWORD={password}"))
        .args(["PGCONNECT_TIMEOUT=3", "psql", "-X", "-q", "-t", "-A"])
        .args(["-v", "ON_ERROR_STOP=1", "-h", host, "-p", &port.to_string()])
        .args(["-U", "app", "-d", "app", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .ok()?;
    child.stdin.take()?.write_all(script.as_bytes()).ok()?;
    let out = child.wait_with_output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// `kubectl delete pod NAME` in `ns`, at once (`--grace-period=0 --force`) when `force`;
/// without waiting for the pod to be gone.
pub fn delete_pod(ns: &str, name: &str, force: bool) {
    let mut args = vec!["-n", ns, "delete", "pod", name, "--wait=false"];
    if force {
        args.extend(["--grace-period=0", "--force"]);
    }
    let (ok, out) = kubectl(&args);
    assert!(ok, "{out}");
}

/// Kills the operator pod that holds the leader Lease (force-deleted); its name.
pub fn kill_leading_operator() -> String {
    let leader = get_json(&["-n", "pgbalancer-system", "get", "leases"])["items"]
        .as_array()
        .and_then(|l| l.first())
        .and_then(|l| l["spec"]["holderIdentity"].as_str())
        .expect("a lease holder")
        .to_owned();
    delete_pod("pgbalancer-system", &leader, true);
    leader
}

/// The operator from its own manifests (CRD, ServiceAccount, RBAC, two replicas), rolled out.
/// Retries the apply while an earlier removal of the namespace is still finishing.
pub fn install_operator() {
    let apply = || {
        kubectl(&[
            "apply",
            "-f",
            &repo_path("manifests/crd.yaml"),
            "-f",
            &repo_path("manifests/operator.yaml"),
        ])
    };
    let mut result = apply();
    for _ in 0..60 {
        if result.0 || !result.1.contains("being terminated") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_secs(2));
        result = apply();
    }
    let (ok, out) = result;
    assert!(ok, "{out}");
    let (ok, out) = kubectl(&[
        "-n",
        "pgbalancer-system",
        "rollout",
        "status",
        "deployment/pgbalancer-operator",
        "--timeout",
        "120s",
    ]);
    if !ok {
        let (_, pods) = kubectl(&["-n", "pgbalancer-system", "describe", "pods"]);
        panic!("{out}\n{pods}");
    }
}

/// Removes the operator and waits (at most two minutes) until its namespace is gone.
pub fn uninstall_operator() {
    let _ = kubectl(&[
        "delete",
        "-f",
        &repo_path("manifests/operator.yaml"),
        "--timeout=120s",
    ]);
}

/// A file of the repository, by its path from the root.
pub fn repo_path(p: &str) -> String {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(p)
        .to_str()
        .unwrap()
        .to_owned()
}

/// Waits up to `secs` for the status of PgBalancerCluster `name` in `ns` to pass `check`;
/// panics naming `what` with the last status otherwise.
pub async fn await_status(
    ns: &str,
    name: &str,
    secs: u64,
    what: &str,
    check: impl Fn(&Value) -> bool,
) {
    let status = || get_json(&["-n", ns, "get", "pgbc", name])["status"].clone();
    let ok = super::eventually(secs, || async { check(&status()) }).await;
    assert!(ok, "{what} within {secs} s: {}", status());
}
