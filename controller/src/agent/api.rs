//! The pgBalancer REST API on live pgpool data (`/api/v1/...`), `/metrics` and `/healthz`.
//!
//! Shapes follow pgBalancer's (`/status`, `/nodes`), with `GET /nodes/{id}` added. Reads are
//! open (the port is published on loopback or reachable inside the cluster network only);
//! every POST needs `Authorization: Bearer <api-token>` from the cluster's credentials.
//! What the balancer does not do (promotion, online recovery, watchdog, query cache) answers
//! 501 with the reason, never a canned success.

// Handlers return ready-made error responses through `Result`, as axum intends.
#![allow(clippy::result_large_err)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::metrics::{self, Snapshot};
use super::pgpool;
use super::Agent;
use crate::pool_node::PoolNode;

type Shared = State<Arc<Agent>>;

/// All routes.
pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/api/v1/status", get(status))
        .route("/api/v1/nodes", get(nodes))
        .route("/api/v1/nodes/{id}", get(node))
        .route("/api/v1/nodes/{id}/attach", post(attach))
        .route("/api/v1/nodes/{id}/detach", post(detach))
        .route("/api/v1/nodes/{id}/promote", post(not_ours("promotion is done by the pgbalancer operator, which promotes in place and re-points the replicas")))
        .route("/api/v1/nodes/{id}/recovery", post(not_ours("online recovery is not used: replicas are re-cloned by the operator")))
        .route("/api/v1/control/reload", post(reload))
        .route("/api/v1/control/stop", post(not_ours("stop the balancer container or pod instead; the agent restarts pgpool when it exits")))
        .route("/api/v1/control/logrotate", post(not_ours("pgpool logs to the container's stderr; there is no log file to rotate")))
        .route("/api/v1/cache/invalidate", post(not_ours("the query cache is disabled (memory_cache_enabled = off)")))
        .route("/api/v1/watchdog/info", get(not_ours("the watchdog is not used; balancer replicas are independent")))
        .route("/api/v1/watchdog/status", get(not_ours("the watchdog is not used; balancer replicas are independent")))
        .route("/api/v1/processes", get(processes))
        .route("/api/v1/health/stats", get(health_stats))
        .route("/metrics", get(prometheus))
        .route("/healthz", get(healthz))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "Endpoint not found") })
        .method_not_allowed_fallback(|| async { error(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed") })
        .with_state(agent)
}

fn error(code: StatusCode, message: impl Into<String>) -> Response {
    (code, Json(json!({ "error": message.into() }))).into_response()
}

fn not_ours(reason: &'static str) -> impl Fn() -> std::future::Ready<Response> + Clone {
    move || std::future::ready(error(StatusCode::NOT_IMPLEMENTED, reason))
}

fn status_word(node: &PoolNode) -> &'static str {
    if node.is_up() {
        "up"
    } else {
        "down"
    }
}

/// A node as the API shows it: the node's own JSON shape (its keys are the API's), with the
/// status reduced to `up` or `down`.
fn node_json(n: &PoolNode) -> Value {
    let shown = PoolNode {
        status: status_word(n).into(),
        ..n.clone()
    };
    // A struct of strings, numbers and options always serializes.
    serde_json::to_value(shown).unwrap_or_default()
}

async fn live_nodes(agent: &Agent) -> Result<Vec<PoolNode>, Response> {
    let nodes = agent
        .engine
        .nodes(&agent.config)
        .await
        .map_err(|e| error(StatusCode::SERVICE_UNAVAILABLE, e))?;
    Ok(current(agent, nodes))
}

/// pgpool keeps a removed slot until it restarts; a slot gone from `pgpool.conf` and no
/// longer up is a scaled-down instance, not a failed one, so it is not reported.
fn current(agent: &Agent, nodes: Vec<PoolNode>) -> Vec<PoolNode> {
    let Ok(conf) = std::fs::read_to_string(agent.config.path("pgpool.conf")) else {
        return nodes;
    };
    let configured = pgpool::configured_backends(&conf);
    nodes
        .into_iter()
        .filter(|n| n.is_up() || configured.iter().any(|(slot, _)| *slot == n.slot))
        .collect()
}

fn parse_id(id: &str) -> Result<u32, Response> {
    id.parse().map_err(|_| {
        error(
            StatusCode::BAD_REQUEST,
            format!("node id `{id}` is not a non-negative integer"),
        )
    })
}

async fn status(State(agent): Shared) -> Response {
    let uptime = agent.started.elapsed().as_secs();
    match agent.engine.live(&agent.config).await {
        Ok(live) => {
            let nodes = current(&agent, live.nodes);
            Json(json!({
                "status": "running",
                "engine": agent.engine.name(),
                "uptime": uptime,
                "version": live.version,
                "connections": live.clients,
                "nodes": nodes.len(),
                "healthy_nodes": nodes.iter().filter(|n| n.is_up()).count(),
                "processes": live.processes.len(),
                "pgpool_restarts": agent.engine.restarts(),
            }))
            .into_response()
        }
        Err(e) => Json(json!({
            "status": if agent.engine.is_running() { "not answering" } else { "down" },
            "engine": agent.engine.name(),
            "uptime": uptime,
            "error": e,
            "pgpool_restarts": agent.engine.restarts(),
        }))
        .into_response(),
    }
}

async fn nodes(State(agent): Shared) -> Response {
    match live_nodes(&agent).await {
        Ok(nodes) => Json(json!({ "nodes": nodes.iter().map(node_json).collect::<Vec<_>>() }))
            .into_response(),
        Err(r) => r,
    }
}

async fn node(State(agent): Shared, Path(id): Path<String>) -> Response {
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    match live_nodes(&agent).await {
        Ok(nodes) => match nodes.iter().find(|n| n.slot == id) {
            Some(n) => Json(node_json(n)).into_response(),
            None => error(StatusCode::NOT_FOUND, format!("node {id} not found")),
        },
        Err(r) => r,
    }
}

fn authorized(agent: &Agent, headers: &HeaderMap) -> Result<(), Response> {
    let token = agent.config.secret("api-token");
    if token.is_empty() {
        return Err(error(
            StatusCode::FORBIDDEN,
            "no API token is configured; changes are disabled",
        ));
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Compare without an early exit so timing does not reveal the token.
    let same = given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        Ok(())
    } else {
        Err(error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token",
        ))
    }
}

/// The checks every node change starts with: the token, a well-formed id, live nodes.
async fn change_target(
    agent: &Agent,
    headers: &HeaderMap,
    id: &str,
) -> Result<(u32, Vec<PoolNode>), Response> {
    authorized(agent, headers)?;
    let id = parse_id(id)?;
    Ok((id, live_nodes(agent).await?))
}

async fn attach(State(agent): Shared, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let (id, nodes) = match change_target(&agent, &headers, &id).await {
        Ok(target) => target,
        Err(r) => return r,
    };
    let Some(node) = nodes.iter().find(|n| n.slot == id) else {
        return error(StatusCode::NOT_FOUND, format!("node {id} not found"));
    };
    agent.manually_detached.lock().await.remove(&id);
    if node.is_up() {
        return Json(json!({ "message": format!("node {id} is already attached") }))
            .into_response();
    }
    match agent.engine.set_attached(&agent.config, id, true).await {
        Ok(()) => settled(&agent, id, true, "attached").await,
        Err(e) => error(StatusCode::BAD_GATEWAY, e),
    }
}

/// Options of a detach:
/// - `?force=true`: the primary or the last node up too. The operator moving the primary
///   detaches the old one first, so that pgpool searches for the new primary instead of
///   failing sessions on the old one.
/// - `?release=true`: the node is not held detached: the backend sync attaches it again once
///   it answers as a standby while configured (the local controller detaching an old primary
///   before it is fenced). Without it a detached node stays detached until attached through
///   the API.
#[derive(serde::Deserialize, Default)]
struct DetachOptions {
    #[serde(default)]
    force: bool,
    #[serde(default)]
    release: bool,
}

async fn detach(
    State(agent): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(options): Query<DetachOptions>,
) -> Response {
    let (id, nodes) = match change_target(&agent, &headers, &id).await {
        Ok(target) => target,
        Err(r) => return r,
    };
    let Some(node) = nodes.iter().find(|n| n.slot == id) else {
        return error(StatusCode::NOT_FOUND, format!("node {id} not found"));
    };
    let (force, hold) = (options.force, !options.release);
    if !node.is_up() {
        return error(
            StatusCode::CONFLICT,
            format!("node {id} is already detached"),
        );
    }
    if force {
        return detach_now(&agent, id, hold).await;
    }
    if node.role == "primary" {
        return error(
            StatusCode::CONFLICT,
            format!("node {id} is the primary; writes would stop (switch over first)"),
        );
    }
    if nodes.iter().filter(|n| n.is_up()).count() <= 1 {
        return error(
            StatusCode::CONFLICT,
            format!("node {id} is the last node up"),
        );
    }
    detach_now(&agent, id, hold).await
}

/// Detaches node `id`, holding it detached (see [`DetachOptions`]) when `hold`.
async fn detach_now(agent: &Agent, id: u32, hold: bool) -> Response {
    if hold {
        agent.manually_detached.lock().await.insert(id);
    } else {
        agent.manually_detached.lock().await.remove(&id);
    }
    match agent.engine.set_attached(&agent.config, id, false).await {
        Ok(()) => {
            if !hold {
                agent.engine.release(id);
            }
            settled(agent, id, false, "detached").await
        }
        Err(e) => {
            agent.manually_detached.lock().await.remove(&id);
            error(StatusCode::BAD_GATEWAY, e)
        }
    }
}

/// pgpool applies attach/detach asynchronously: answer once the node shows the new status
/// (200), or with 202 if it has not after 10 s.
async fn settled(agent: &Agent, id: u32, up: bool, verb: &str) -> Response {
    for _ in 0..50 {
        if let Ok(nodes) = live_nodes(agent).await {
            if let Some(n) = nodes.iter().find(|n| n.slot == id && n.is_up() == up) {
                return Json(
                    json!({ "message": format!("node {id} {verb}"), "node": node_json(n) }),
                )
                .into_response();
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    (
        StatusCode::ACCEPTED,
        Json(json!({ "message": format!("node {id}: {verb} requested; pgpool has not applied it yet") })),
    )
        .into_response()
}

async fn reload(State(agent): Shared, headers: HeaderMap) -> Response {
    if let Err(r) = authorized(&agent, &headers) {
        return r;
    }
    match agent.engine.reload(&agent.config).await {
        Ok(()) => Json(json!({ "message": "configuration reloaded" })).into_response(),
        Err(e) => error(StatusCode::BAD_GATEWAY, e),
    }
}

async fn processes(State(agent): Shared) -> Response {
    match agent.engine.live(&agent.config).await {
        Ok(live) => Json(json!({
            "processes": live.processes.iter().map(|p| json!({ "pid": p.pid, "status": p.status })).collect::<Vec<_>>(),
            "clients": live.clients,
        }))
        .into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

async fn health_stats(State(agent): Shared) -> Response {
    let (nodes, procs, clients) = match agent.engine.live(&agent.config).await {
        Ok(live) => (current(&agent, live.nodes), live.processes, live.clients),
        Err(e) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "health": "unhealthy", "checks": { "pgpool": e } })),
            )
                .into_response()
        }
    };
    // Nodes whose count is unknown add nothing; the engines read over SQL count every node.
    let selects: i64 = nodes.iter().filter_map(|n| n.select_count).sum();
    let now = Instant::now();
    let rate = {
        let mut last = agent.last_sample.lock().await;
        let rate = last.map(|(t, s)| {
            let secs = now.duration_since(t).as_secs_f64();
            if secs > 0.0 {
                (selects - s).max(0) as f64 / secs
            } else {
                0.0
            }
        });
        *last = Some((now, selects));
        rate
    };
    let up = nodes.iter().filter(|n| n.is_up()).count();
    let primary = nodes.iter().find(|n| n.role == "primary" && n.is_up());
    let health = match (primary.is_some(), up == nodes.len()) {
        (true, true) => "healthy",
        (true, false) => "degraded",
        (false, _) => "unhealthy",
    };
    Json(json!({
        "health": health,
        "checks": {
            "pgpool_process": if agent.engine.is_running() { "running" } else { "down" },
            "backend_connectivity": format!("{up} of {} nodes up", nodes.len()),
            "primary": primary.map(|p| format!("node {}", p.slot)).unwrap_or_else(|| "none".into()),
        },
        "stats": {
            "total_connections": procs.len().max(clients),
            "active_connections": clients,
            "total_selects": selects,
            "selects_per_second": rate,
            "pgpool_restarts": agent.engine.restarts(),
        },
    }))
    .into_response()
}

async fn prometheus(State(agent): Shared) -> Response {
    let (up, nodes, procs) = match agent.engine.live(&agent.config).await {
        Ok(live) => (true, current(&agent, live.nodes), live.processes),
        Err(_) => (false, Vec::new(), Vec::new()),
    };
    let text = metrics::render(&Snapshot {
        pgpool_up: up,
        restarts: agent.engine.restarts(),
        nodes: &nodes,
        processes: &procs,
    });
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response()
}

/// Ready when the engine runs and has a primary up. With pgpool, the answer comes from the
/// sync loop's last node list while it is fresh (read through an accepted session, from the
/// running pgpool, within three sync intervals and at least 6 s: a step that waits for a
/// down node's connection takes a while): a probe of its own would open a SCRAM session
/// through pgpool (which connects to every backend) every two seconds, and under load that
/// can outlast the probe's timeout and take a healthy balancer out of its Service.
async fn healthz(State(agent): Shared) -> Response {
    if !agent.engine.is_running() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the engine is not running");
    }
    let max_age = Duration::from_secs((3 * agent.config.sync_interval).max(6));
    let restarts = agent.engine.restarts();
    let recent = agent
        .pool_nodes
        .lock()
        .ok()
        .and_then(|last| last.fresh(max_age, restarts).map(<[PoolNode]>::to_vec));
    let nodes = match recent {
        Some(nodes) => nodes,
        None => match live_nodes(&agent).await {
            Ok(nodes) => nodes,
            Err(r) => return r,
        },
    };
    if nodes.iter().any(|n| n.role == "primary" && n.is_up()) {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        error(StatusCode::SERVICE_UNAVAILABLE, "no primary is up")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(status: &str) -> PoolNode {
        PoolNode {
            slot: 1,
            host: "demo-1".into(),
            port: Some(5432),
            status: status.into(),
            role: "standby".into(),
            lb_weight: Some(0.5),
            select_count: Some(7),
            replication_delay: Some(128),
            replication_state: Some("streaming".into()),
            last_status_change: Some("2026-11-29 12:00:01".into()),
        }
    }

    #[test]
    fn a_node_has_the_documented_keys_and_value_types() {
        let expected = json!({
            "id": 1,
            "host": "demo-1",
            "port": 5432,
            "status": "up",
            "weight": 0.5,
            "role": "standby",
            "replication_lag": 128,
            "replication_state": "streaming",
            "select_count": 7,
            "last_status_change": "2026-11-29 12:00:01",
        });
        let shown = node_json(&node("waiting"));
        assert_eq!(shown, expected);
        assert_eq!(shown.to_string(), expected.to_string());
        assert_eq!(node_json(&node("unused"))["status"], "down");
    }

    #[test]
    fn an_unknown_value_is_null_under_its_key() {
        let shown = node_json(&PoolNode {
            select_count: None,
            replication_delay: None,
            ..node("up")
        });
        assert_eq!(shown.as_object().map(|o| o.len()), Some(10));
        assert!(shown["select_count"].is_null() && shown["replication_lag"].is_null());
        let read: PoolNode = serde_json::from_value(shown).unwrap();
        assert_eq!((read.slot, read.select_count), (1, None));
    }
}
