//! Takes a standby out of pgpool's rotation the moment its server goes away.
//!
//! pgpool learns that a backend died from its health check, seconds later; until then every
//! new session tries to connect to the dead server first and waits for `connect_timeout` when
//! its address no longer answers (a container or pod that is gone), so clients with a short
//! connect timeout of their own fail although only a replica was lost. Here the agent keeps
//! one idle connection to each configured backend (TCP keepalives on). A server that stops,
//! crashes or is killed closes it at once; when a fresh connection is then refused too and
//! pgpool still has the node up as a standby, the agent detaches it through PCP. pgpool
//! handles that as a switchover: only the sessions reading from that node end, writes go on.
//! The backend sync loop attaches the node again once it answers as a standby.
//!
//! A primary is never detached here: losing it is a failover, which belongs to the operator.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_postgres::{Config, NoTls};

use super::pgpool::{self, configured_backends};
use super::Agent;
use crate::plan::{MONITOR_USER, POSTGRES_PORT};

/// How long a confirming connection may take before the server counts as gone.
const CONFIRM_TIMEOUT: Duration = Duration::from_millis(500);
/// Time between attempts to open the kept connection while the server does not answer.
const RETRY: Duration = Duration::from_millis(500);
/// How often the set of watched backends follows `pgpool.conf`.
const FOLLOW: Duration = Duration::from_secs(1);

/// Watches every configured backend, following `pgpool.conf`, forever.
pub async fn run(agent: Arc<Agent>) {
    let mut watchers: HashMap<(u32, String), JoinHandle<()>> = HashMap::new();
    loop {
        let conf = std::fs::read_to_string(agent.config.path("pgpool.conf")).unwrap_or_default();
        let wanted = configured_backends(&conf);
        watchers.retain(|key, task| {
            let keep = wanted.contains(key);
            if !keep {
                task.abort();
            }
            keep
        });
        for (slot, host) in wanted {
            watchers
                .entry((slot, host.clone()))
                .or_insert_with(|| tokio::spawn(watch(agent.clone(), slot, host)));
        }
        tokio::time::sleep(FOLLOW).await;
    }
}

/// Holds a connection to `host` and reacts each time it ends.
async fn watch(agent: Arc<Agent>, slot: u32, host: String) {
    loop {
        if hold(&agent, &host).await && !accepts(&agent, &host).await {
            detach(&agent, slot, &host).await;
        }
        tokio::time::sleep(RETRY).await;
    }
}

fn config(agent: &Agent, host: &str, timeout: Duration) -> Config {
    let mut config = Config::new();
    config
        .host(host)
        .port(POSTGRES_PORT)
        .user(MONITOR_USER)
        .password(agent.config.secret("monitor-password"))
        .dbname("postgres")
        .application_name("pgbalancer-watch")
        .connect_timeout(timeout)
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(2))
        .keepalives_interval(Duration::from_secs(1))
        .keepalives_retries(2);
    config
}

/// Opens the kept connection and waits until it ends; `false` when it could not be opened.
async fn hold(agent: &Agent, host: &str) -> bool {
    let timeout = crate::pg::CONNECT_TIMEOUT;
    let config = config(agent, host, timeout);
    let Ok(Ok((client, connection))) =
        tokio::time::timeout(timeout * 2, config.connect(NoTls)).await
    else {
        return false;
    };
    // The connection future resolves when the server closes the socket or it breaks.
    let _ = connection.await;
    drop(client);
    true
}

/// Whether the server accepts a new connection right now (it may only have ended ours).
async fn accepts(agent: &Agent, host: &str) -> bool {
    let config = config(agent, host, CONFIRM_TIMEOUT);
    matches!(
        tokio::time::timeout(CONFIRM_TIMEOUT, config.connect(NoTls)).await,
        Ok(Ok(_))
    )
}

/// Detaches `slot` when pgpool runs and has it up as a standby.
async fn detach(agent: &Agent, slot: u32, host: &str) {
    if !agent.engine.is_running() {
        return;
    }
    let Ok(nodes) = agent.engine.nodes(&agent.config).await else {
        return;
    };
    let Some(node) = nodes.iter().find(|n| n.slot == slot) else {
        return;
    };
    if !node.is_up() || node.role == "primary" || node.host != host {
        return;
    }
    match pgpool::pcp(&agent.config, "pcp_detach_node", Some(slot)).await {
        Ok(_) => tracing::info!(node = slot, %host, "detached: its server went away"),
        Err(e) => tracing::warn!(node = slot, error = pgpool::report(&e), "detach failed"),
    }
}
