//! Keeps pgpool's backends in line with `pgpool.conf` without restarting it: a changed file is
//! reloaded (new slots appear `down`), configured slots whose server answers as a standby are
//! attached, and slots no longer configured are detached. Nodes detached through the API stay
//! detached. A writable server is attached only when no node is up at all: otherwise it may be
//! an old primary the operator detached before fencing it, and the operator attaches the
//! primary it promoted itself.
//!
//! When pgpool names no primary although an attached server writes, it is made to search
//! again (`primary_search`).
//!
//! The file is written by the Docker backend (upload) or projected from a ConfigMap
//! (Kubernetes), so both backends get live scaling from the same loop.

use std::sync::Arc;
use std::time::Duration;

use super::pgpool::{self, configured_backends};
use super::{primary_search, Agent};
use crate::pg;
use crate::plan::{MONITOR_USER, POSTGRES_PORT};

/// Runs the loop forever.
pub async fn run(agent: Arc<Agent>) {
    let mut applied: Option<String> =
        std::fs::read_to_string(agent.config.path("pgpool.conf")).ok();
    let interval = Duration::from_secs(agent.config.sync_interval.max(1));
    let mut search = primary_search::Watch::default();
    loop {
        tokio::time::sleep(interval).await;
        if let Err(e) = step(&agent, &mut applied, &mut search).await {
            tracing::debug!(error = pgpool::report(&e), "backend sync step failed");
        }
    }
}

async fn step(
    agent: &Agent,
    applied: &mut Option<String>,
    search: &mut primary_search::Watch,
) -> Result<(), pgpool::PgpoolError> {
    if !agent.engine.is_running() {
        return Ok(());
    }
    let Ok(conf) = std::fs::read_to_string(agent.config.path("pgpool.conf")) else {
        return Ok(());
    };
    if applied.as_deref() != Some(conf.as_str()) {
        pgpool::pcp(&agent.config, "pcp_reload_config", None).await?;
        tracing::info!("pgpool.conf changed: reloaded");
        *applied = Some(conf.clone());
    }
    let wanted = configured_backends(&conf);
    let restarts = agent.engine.restarts();
    let read_at = std::time::Instant::now();
    let (nodes, accepting) = match pgpool::connect(&agent.config).await {
        Ok(client) => (pgpool::nodes(&client).await?, true),
        // pgpool refuses SQL while every backend is down; PCP still answers.
        Err(_) => (pgpool::nodes_via_pcp(&agent.config).await?, false),
    };
    if let Ok(mut last) = agent.pool_nodes.lock() {
        *last = super::NodeSnapshot {
            nodes: nodes.clone(),
            read_at: Some(read_at),
            accepting,
            restarts,
        };
    }
    if accepting && search.due(&nodes, read_at) {
        let mut answered = Vec::new();
        for node in nodes.iter().filter(|n| n.is_up()) {
            if wanted.iter().any(|(slot, _)| *slot == node.slot) {
                answered.push((node.slot, answers(agent, &node.host).await));
            }
        }
        search.looked(read_at);
        if let Some((slot, writable)) = primary_search::node_to_cycle(&answered) {
            let host = nodes
                .iter()
                .find(|n| n.slot == writable)
                .map_or("", |n| n.host.as_str());
            primary_search::search_again(agent, slot, host).await;
            search.searched(std::time::Instant::now());
            return Ok(());
        }
    }
    let detached = agent.manually_detached.lock().await.clone();
    let none_up = !nodes.iter().any(|n| n.is_up());
    for node in &nodes {
        let configured = wanted.iter().any(|(slot, _)| *slot == node.slot);
        if configured
            && !node.is_up()
            && !detached.contains(&node.slot)
            && answers(agent, &node.host)
                .await
                .is_some_and(|standby| standby || none_up)
        {
            match pgpool::pcp(&agent.config, "pcp_attach_node", Some(node.slot)).await {
                Ok(_) => tracing::info!(node = node.slot, host = %node.host, "attached"),
                Err(e) => tracing::warn!(
                    node = node.slot,
                    error = pgpool::report(&e),
                    "attach failed"
                ),
            }
        }
        if !configured && node.is_up() && node.role != "primary" {
            match pgpool::pcp(&agent.config, "pcp_detach_node", Some(node.slot)).await {
                Ok(_) => tracing::info!(node = node.slot, "detached: no longer configured"),
                Err(e) => tracing::warn!(
                    node = node.slot,
                    error = pgpool::report(&e),
                    "detach failed"
                ),
            }
        }
    }
    Ok(())
}

/// Whether the backend is a standby, when it accepts a monitoring connection (so pgpool can
/// use it); `None` when it does not answer.
async fn answers(agent: &Agent, host: &str) -> Option<bool> {
    let client = pg::connect(
        host,
        POSTGRES_PORT,
        MONITOR_USER,
        &agent.config.secret("monitor-password"),
        "postgres",
    )
    .await
    .ok()?;
    let row = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .ok()?;
    row.try_get(0).ok()
}
