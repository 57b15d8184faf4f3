//! Calls to a balancer agent's REST API (IO, async, bounded in time): the node list, and
//! node attach/detach with the cluster's API token. Both backends change balancer nodes only
//! through here, whatever the engine: the operator at pod addresses (from inside the cluster
//! network), the local controller at the agent's published port.

use std::time::Duration;

use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use serde::Deserialize;

use crate::backend::PoolNode;

/// Longest a read may take, connection included.
const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest a node change may take: the agent answers once the engine shows it (within 10 s).
const CHANGE_TIMEOUT: Duration = Duration::from_secs(12);

/// A node change that did not happen.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ChangeError {
    /// The agent refused the token (401, 403): trying again will not help.
    pub refused: bool,
    /// What happened.
    pub message: String,
}

/// `host:port` for a URL, with an IPv6 address in brackets.
pub fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Sends `method path` to the agent at `ip` (an [`authority`]); the status and body, or why it
/// failed.
async fn call(
    ip: &str,
    method: Method,
    path: &str,
    token: Option<&str>,
    timeout: Duration,
) -> Result<(StatusCode, bytes::Bytes), String> {
    let client: Client<HttpConnector, Empty<bytes::Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut request = Request::builder()
        .method(method)
        .uri(format!("http://{ip}{path}"));
    if let Some(token) = token {
        request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request
        .body(Empty::new())
        .map_err(|e| format!("request to {ip}: {e}"))?;
    let response = tokio::time::timeout(timeout, async {
        let response = client
            .request(request)
            .await
            .map_err(|e| format!("agent at {ip}: {e}"))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("agent at {ip}: {e}"))?
            .to_bytes();
        Ok::<_, String>((status, body))
    })
    .await
    .map_err(|_| format!("agent at {ip} did not answer within {timeout:?}"))??;
    Ok(response)
}

/// The agent's nodes (`GET /api/v1/nodes`) at `ip` (an [`authority`]).
pub async fn nodes(ip: &str) -> Result<Vec<PoolNode>, String> {
    let (status, body) = call(ip, Method::GET, "/api/v1/nodes", None, READ_TIMEOUT).await?;
    if !status.is_success() {
        return Err(format!("agent at {ip} answered {status}"));
    }
    let answer: NodesAnswer =
        serde_json::from_slice(&body).map_err(|e| format!("agent at {ip}: {e}"))?;
    Ok(answer.nodes)
}

/// The body of `GET /api/v1/nodes`: the nodes in the shape the agent serializes them.
#[derive(serde::Deserialize)]
struct NodesAnswer {
    nodes: Vec<PoolNode>,
}

/// Attaches or detaches (`verb`, with its query) node `slot` through the agent at `ip` (an
/// [`authority`]).
pub async fn node_action(ip: &str, slot: u32, verb: &str, token: &str) -> Result<(), ChangeError> {
    let path = format!("/api/v1/nodes/{slot}/{verb}");
    let (status, body) = call(ip, Method::POST, &path, Some(token), CHANGE_TIMEOUT)
        .await
        .map_err(|message| ChangeError {
            refused: false,
            message,
        })?;
    if status.is_success() {
        Ok(())
    } else {
        Err(ChangeError {
            refused: matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN),
            message: format!(
                "{verb} node {slot} at {ip}: {status}: {}",
                String::from_utf8_lossy(&body).trim()
            ),
        })
    }
}

/// One node of the agent's answer, in the type shared with the Docker backend and the agent;
/// `None` when it is not a node.
pub fn pool_node(n: &serde_json::Value) -> Option<PoolNode> {
    PoolNode::deserialize(n).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities_bracket_ipv6() {
        assert_eq!(authority("10.1.0.7", 8080), "10.1.0.7:8080");
        assert_eq!(authority("::1", 8080), "[::1]:8080");
    }

    #[test]
    fn agent_nodes_become_pool_nodes() {
        let v = serde_json::json!({"id": 2, "host": "demo-2-0.demo-hl", "status": "up",
            "role": "standby", "select_count": 7, "replication_lag": 64});
        let node = pool_node(&v).unwrap();
        assert_eq!(
            (node.slot, node.status.as_str(), node.role.as_str()),
            (2, "up", "standby")
        );
        assert_eq!(
            (node.select_count, node.replication_delay),
            (Some(7), Some(64))
        );
        assert!(pool_node(&serde_json::json!({"id": "x"})).is_none());
        // What the agent did not send is unknown, not zero.
        assert_eq!((node.port, node.lb_weight), (None, None));
    }

    #[test]
    fn the_nodes_answer_reads_back_what_the_agent_serializes() {
        let sent = PoolNode {
            slot: 1,
            host: "demo-1-0.demo-hl".into(),
            port: Some(5432),
            status: "down".into(),
            role: "standby".into(),
            lb_weight: Some(0.5),
            select_count: None,
            replication_delay: Some(0),
            replication_state: Some(String::new()),
            last_status_change: Some("2026-11-29 12:00:01".into()),
        };
        let body = serde_json::json!({ "nodes": [&sent] }).to_string();
        let answer: NodesAnswer = serde_json::from_str(&body).unwrap();
        assert_eq!(answer.nodes, [sent]);
        assert!(serde_json::from_str::<NodesAnswer>(r#"{"nodes":[{"id":1}]}"#).is_err());
    }

    #[tokio::test]
    async fn an_unreachable_agent_is_an_error_within_the_bound() {
        // 192.0.2.0/24 is TEST-NET-1: never routed.
        let started = std::time::Instant::now();
        assert!(nodes(&authority("192.0.2.1", 8080)).await.is_err());
        assert!(started.elapsed() < READ_TIMEOUT + Duration::from_secs(1));
    }
}
