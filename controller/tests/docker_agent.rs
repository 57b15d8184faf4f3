//! The balancer's management face against real pgpool and PostgreSQL in Docker: every REST
//! endpoint, every `bctl` command, Prometheus metrics, bad requests, pgpool restarted by the
//! agent, and a client session that survives scaling up and down.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

const NAME: &str = "it-agent";

struct Api {
    base: String,
    token: String,
}

impl Api {
    fn call(&self, method: &str, path: &str, token: Option<&str>) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        let mut req = ureq::request(method, &url).timeout(Duration::from_secs(30));
        if let Some(t) = token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let (code, body) = match req.call() {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
            Err(e) => panic!("{method} {url}: {e}"),
        };
        (
            code,
            serde_json::from_str(&body).unwrap_or(Value::String(body)),
        )
    }

    fn get(&self, path: &str) -> (u16, Value) {
        self.call("GET", path, None)
    }

    fn post(&self, path: &str) -> (u16, Value) {
        self.call("POST", path, Some(&self.token))
    }
}

fn bctl(port: u16, args: &[&str], token: Option<&str>) -> (bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bctl"));
    cmd.args(args)
        .env("BCTL_PORT", port.to_string())
        .env_remove("PGBALANCER_TOKEN");
    if let Some(t) = token {
        cmd.env("PGBALANCER_TOKEN", t);
    }
    let out = cmd.output().unwrap();
    (out.status.success(), text(&out))
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_api_bctl_metrics_and_live_scaling() {
    let s = Scenario::new(NAME);
    let file = s.file(
        "c.yaml",
        &cluster_yaml(
            NAME,
            "  replicas: 1\n  balancer: {numInitChildren: 8, maxPool: 2}\n",
        ),
    );
    assert_success(&s.pgbalancer(&["up", "-f", file.to_str().unwrap()]));
    let doc = s.status(NAME);
    let rest = doc["balancer"]["instances"][0]["restPort"]
        .as_u64()
        .expect("rest port published") as u16;
    let sql = doc["balancer"]["port"].as_u64().unwrap();
    let password = doc["secrets"]["password"].as_str().unwrap().to_owned();
    let api = Api {
        base: format!("http://127.0.0.1:{rest}"),
        token: doc["secrets"]["apiToken"].as_str().unwrap().to_owned(),
    };

    // Reads: live data in pgBalancer's shapes.
    let (code, status) = api.get("/api/v1/status");
    assert_eq!(code, 200);
    assert_eq!(status["status"], "running");
    assert_eq!(status["nodes"], 2);
    assert_eq!(status["healthy_nodes"], 2);
    assert!(status["version"].as_str().unwrap().starts_with("4.6"));
    let (code, nodes) = api.get("/api/v1/nodes");
    assert_eq!(code, 200);
    let roles: Vec<(u64, String)> = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["id"].as_u64().unwrap(),
                n["role"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        roles,
        [(0, "primary".to_owned()), (1, "standby".to_owned())]
    );
    assert_eq!(nodes["nodes"][1]["host"], format!("{NAME}-1"));
    assert!(nodes["nodes"][1]["replication_lag"].is_i64());
    let (code, one) = api.get("/api/v1/nodes/1");
    assert_eq!((code, one["id"].as_u64()), (200, Some(1)));

    // Bad requests: JSON errors, nothing changed.
    assert_eq!(api.get("/api/v1/nodes/7").0, 404);
    assert_eq!(api.get("/api/v1/nodes/x1").0, 400);
    assert_eq!(api.get("/api/v1/nope").0, 404);
    assert_eq!(api.get("/api/v1/nope").1["error"], "Endpoint not found");
    assert_eq!(api.get("/api/v1/control/reload").0, 405);
    assert_eq!(api.call("POST", "/api/v1/nodes/1/detach", None).0, 401);
    assert_eq!(
        api.call("POST", "/api/v1/nodes/1/detach", Some("wrong")).0,
        401
    );
    // Tried systematically: every answer is a 4xx with a JSON error, nothing changes.
    let big = vec![b'x'; 4 << 20];
    let mut tried = Vec::new();
    for (method, path, token, body) in [
        ("GET", "/api/v1/nodes/-1", None, None),
        ("GET", "/api/v1/nodes/99999999999999999999", None, None),
        ("GET", "/api/v1/nodes/1%3BDROP", None, None),
        ("GET", "/api/v1/nodes/1.5", None, None),
        ("GET", "/api/v1/nodes/%00", None, None),
        ("PUT", "/api/v1/nodes", None, None),
        ("DELETE", "/api/v1/nodes/1", Some(api.token.as_str()), None),
        ("PATCH", "/api/v1/status", None, None),
        (
            "POST",
            "/api/v1/nodes/x/detach",
            Some(api.token.as_str()),
            None,
        ),
        (
            "POST",
            "/api/v1/nodes/99/detach",
            Some(api.token.as_str()),
            None,
        ),
        ("POST", "/api/v1/nodes/1/detach", Some(""), None),
        ("POST", "/api/v1/nodes/1/detach", Some("Bearer"), None),
        (
            "POST",
            "/api/v1/nodes/1/detach",
            None,
            Some(&b"{not json"[..]),
        ),
        ("POST", "/api/v1/control/reload", None, Some(&big[..])),
        (
            "POST",
            "/api/v1/nodes/1/detach",
            Some("wrong"),
            Some(&big[..]),
        ),
    ] {
        let url = format!("{}{path}", api.base);
        let mut req = ureq::request(method, &url).timeout(Duration::from_secs(30));
        if let Some(t) = token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let answer = match body {
            Some(b) => req.send_bytes(b),
            None => req.call(),
        };
        let code = match answer {
            Ok(r) => r.status(),
            Err(ureq::Error::Status(code, _)) => code,
            // A server may close on a body it refuses to read.
            Err(e) if body.is_some_and(|b| b.len() > 1 << 20) => {
                tried.push(format!(
                    "{method} {path} ({} bytes): closed: {e}",
                    big.len()
                ));
                continue;
            }
            Err(e) => panic!("{method} {path}: {e}"),
        };
        assert!(
            (400..500).contains(&code),
            "{method} {path} answered {code}"
        );
        tried.push(format!("{method} {path}: {code}"));
    }
    println!("tried on the REST API:\n{}", tried.join("\n"));
    assert_eq!(api.get("/api/v1/status").1["healthy_nodes"], 2);

    let (code, body) = api.post("/api/v1/nodes/0/detach");
    assert_eq!(code, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("primary"));
    assert_eq!(api.post("/api/v1/nodes/1/promote").0, 501);
    assert_eq!(api.get("/api/v1/status").1["healthy_nodes"], 2);

    // Changes: detach and attach a replica, reload.
    let (code, body) = api.post("/api/v1/nodes/1/detach");
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["node"]["status"], "down");
    assert_eq!(api.get("/api/v1/health/stats").1["health"], "degraded");
    let (code, body) = api.post("/api/v1/nodes/1/detach");
    assert_eq!(code, 409, "{body}");
    let (code, body) = api.post("/api/v1/nodes/1/attach");
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["node"]["status"], "up");
    assert_eq!(api.post("/api/v1/control/reload").0, 200);

    // Health and metrics count real traffic.
    let client = connect(sql, "app", &password, "app").await;
    for _ in 0..20 {
        client.simple_query("SELECT 1").await.unwrap();
    }
    let (code, health) = api.get("/api/v1/health/stats");
    assert_eq!(code, 200);
    assert_eq!(health["health"], "healthy");
    assert!(
        health["stats"]["total_selects"].as_i64().unwrap() >= 20,
        "{health}"
    );
    let metrics = ureq::get(&format!("{}/metrics", api.base))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    let scrape =
        prometheus_parse::Scrape::parse(metrics.lines().map(|l| Ok(l.to_owned()))).unwrap();
    let up: Vec<_> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "pgbalancer_node_up")
        .collect();
    assert_eq!(up.len(), 2);
    let selects: f64 = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "pgbalancer_node_select_total")
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum();
    assert!(selects >= 20.0, "{metrics}");
    assert_eq!(
        ureq::get(&format!("{}/healthz", api.base))
            .call()
            .unwrap()
            .status(),
        200
    );

    // bctl: every command, global options in any position, errors exit non-zero.
    let (ok, out) = bctl(rest, &["status"], None);
    assert!(
        ok && out.contains("Status: running") && out.contains("Healthy Nodes: 2"),
        "{out}"
    );
    let (ok, out) = bctl(rest, &["nodes", "list"], None);
    assert!(ok && out.contains(&format!("{NAME}-1")), "{out}");
    let (ok, out) = bctl(rest, &["-t", "nodes"], None);
    assert!(ok && out.contains("│ Rep Lag │"), "{out}");
    let (ok, out) = bctl(rest, &["nodes", "info", "1", "-j"], None);
    assert!(
        ok && serde_json::from_str::<Value>(&out).unwrap()["id"] == 1,
        "{out}"
    );
    let (ok, out) = bctl(rest, &["nodes", "1"], None);
    assert!(ok && out.contains("role: standby"), "{out}");
    let (ok, out) = bctl(rest, &["nodes-count"], None);
    assert!(ok && out.trim() == "2", "{out}");
    let (ok, out) = bctl(rest, &["health"], None);
    assert!(ok && out.contains("Health: healthy"), "{out}");
    let (ok, out) = bctl(rest, &["nodes", "detach", "1"], None);
    assert!(!ok && out.contains("401"), "{out}");
    let (ok, out) = bctl(rest, &["--token", &api.token, "nodes-detach", "1"], None);
    assert!(ok && out.contains("node 1 detached"), "{out}");
    let (ok, out) = bctl(rest, &["nodes", "attach", "1"], Some(&api.token));
    assert!(ok && out.contains("node 1 attached"), "{out}");
    let (ok, out) = bctl(rest, &["reload", "-H", "127.0.0.1"], Some(&api.token));
    assert!(ok && out.contains("reloaded"), "{out}");
    let (ok, out) = bctl(rest, &["nodes", "9"], None);
    assert!(!ok && out.contains("404"), "{out}");
    let (ok, out) = bctl(1, &["status"], None);
    assert!(!ok && out.contains("cannot reach the agent"), "{out}");
    // Inside the container bctl finds the token by itself.
    let inside = Command::new("docker")
        .args([
            "exec",
            &format!("{NAME}-balancer"),
            "bctl",
            "nodes-detach",
            "1",
        ])
        .output()
        .unwrap();
    assert!(inside.status.success(), "{}", text(&inside));
    let inside = Command::new("docker")
        .args([
            "exec",
            &format!("{NAME}-balancer"),
            "bctl",
            "nodes",
            "attach",
            "1",
        ])
        .output()
        .unwrap();
    assert!(inside.status.success(), "{}", text(&inside));

    // A session open through the balancer survives scaling up and down.
    let session = connect(sql, "app", &password, "app").await;
    session
        .batch_execute("CREATE TABLE IF NOT EXISTS ticks (n int)")
        .await
        .unwrap();
    assert_success(&s.pgbalancer(&["scale", NAME, "--replicas", "3"]));
    session
        .batch_execute("INSERT INTO ticks VALUES (1)")
        .await
        .unwrap();
    assert_eq!(api.get("/api/v1/status").1["healthy_nodes"], 4);
    assert_success(&s.pgbalancer(&["scale", NAME, "--replicas", "1"]));
    session
        .batch_execute("INSERT INTO ticks VALUES (2)")
        .await
        .unwrap();
    let n: i64 = session
        .query_one("SELECT count(*) FROM ticks", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    let settled = eventually(60, || async { api.get("/api/v1/status").1["nodes"] == 2 }).await;
    assert!(
        settled,
        "removed slots still reported: {}",
        api.get("/api/v1/nodes").1
    );

    // pgpool killed: the agent restarts it and health comes back.
    let kill = Command::new("docker")
        .args([
            "exec",
            &format!("{NAME}-balancer"),
            "pgpool",
            "-f",
            "/etc/pgbalancer/pgpool.conf",
            "-m",
            "immediate",
            "stop",
        ])
        .output()
        .unwrap();
    assert!(kill.status.success(), "{}", text(&kill));
    let back = eventually(60, || async {
        let (code, body) = api.get("/api/v1/status");
        code == 200 && body["status"] == "running" && body["pgpool_restarts"].as_u64() >= Some(1)
    })
    .await;
    assert!(
        back,
        "pgpool not restarted: {}",
        api.get("/api/v1/status").1
    );
    assert!(
        eventually(60, || async {
            ureq::get(&format!("{}/healthz", api.base)).call().is_ok()
        })
        .await
    );

    assert_success(&s.pgbalancer(&["down", NAME]));
}
