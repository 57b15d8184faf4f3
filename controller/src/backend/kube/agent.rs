//! Calls to the balancer agents' REST API from the operator (IO, async, bounded in time):
//! the node list, and node attach/detach with the cluster's API token. Only made from inside
//! the cluster network, where pod addresses are reachable.

use std::time::Duration;

use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::backend::PoolNode;
use crate::plan::REST_PORT;

/// Longest one call may take, connection included.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// Sends `method path` to the agent at `ip`; the status and body, or why it failed.
async fn call(
    ip: &str,
    method: Method,
    path: &str,
    token: Option<&str>,
) -> Result<(StatusCode, bytes::Bytes), String> {
    let client: Client<HttpConnector, Empty<bytes::Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut request = Request::builder()
        .method(method)
        .uri(format!("http://{ip}:{REST_PORT}{path}"));
    if let Some(token) = token {
        request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request
        .body(Empty::new())
        .map_err(|e| format!("request to {ip}: {e}"))?;
    let response = tokio::time::timeout(CALL_TIMEOUT, async {
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
    .map_err(|_| format!("agent at {ip} did not answer within {CALL_TIMEOUT:?}"))??;
    Ok(response)
}

/// The agent's nodes (`GET /api/v1/nodes`).
pub async fn nodes(ip: &str) -> Result<Vec<PoolNode>, String> {
    let (status, body) = call(ip, Method::GET, "/api/v1/nodes", None).await?;
    if !status.is_success() {
        return Err(format!("agent at {ip} answered {status}"));
    }
    let value: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| format!("agent at {ip}: {e}"))?;
    Ok(value["nodes"]
        .as_array()
        .map(|nodes| nodes.iter().filter_map(pool_node).collect())
        .unwrap_or_default())
}

/// Attaches or detaches (`verb`) node `slot` through the agent at `ip`.
pub async fn node_action(ip: &str, slot: u32, verb: &str, token: &str) -> Result<(), String> {
    let path = format!("/api/v1/nodes/{slot}/{verb}");
    let (status, body) = call(ip, Method::POST, &path, Some(token)).await?;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!(
            "{verb} node {slot} at {ip}: {status}: {}",
            String::from_utf8_lossy(&body).trim()
        ))
    }
}

/// One node of the agent's answer, in the shape shared with the Docker backend and the agent.
pub fn pool_node(n: &serde_json::Value) -> Option<PoolNode> {
    Some(PoolNode {
        slot: u32::try_from(n["id"].as_u64()?).ok()?,
        host: n["host"].as_str().unwrap_or_default().to_owned(),
        status: n["status"].as_str()?.to_owned(),
        role: n["role"].as_str().unwrap_or_default().to_owned(),
        select_count: n["select_count"].as_i64().unwrap_or(0),
        replication_delay: n["replication_lag"].as_i64().unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_nodes_become_pool_nodes() {
        let v = serde_json::json!({"id": 2, "host": "demo-2-0.demo-hl", "status": "up",
            "role": "standby", "select_count": 7, "replication_lag": 64});
        let node = pool_node(&v).unwrap();
        assert_eq!(
            (node.slot, node.status.as_str(), node.role.as_str()),
            (2, "up", "standby")
        );
        assert_eq!((node.select_count, node.replication_delay), (7, 64));
        assert!(pool_node(&serde_json::json!({"id": "x"})).is_none());
    }

    #[tokio::test]
    async fn an_unreachable_agent_is_an_error_within_the_bound() {
        // 192.0.2.0/24 is TEST-NET-1: never routed.
        let started = std::time::Instant::now();
        assert!(nodes("192.0.2.1").await.is_err());
        assert!(started.elapsed() < CALL_TIMEOUT + Duration::from_secs(1));
    }
}
