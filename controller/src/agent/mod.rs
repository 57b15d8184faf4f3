//! The balancer agent (`pgbalancer-agent`): runs the balancer's engine in the balancer
//! container (pgpool-II, supervised, or the native engine, in process), keeps its backends in
//! line with the rendered configuration, and serves the pgBalancer REST API and Prometheus
//! metrics from the engine's live data.
//!
//! Layout: `init` (the container's first process: runs the agent, starts it again when it
//! dies), `drain` (a deleted balancer pod's wait for its traffic to move), `engine` (either
//! engine, one interface), `supervisor` (pgpool's lifecycle),
//! `pgpool` (SQL and PCP access), `sync` (pgpool's backend list follows `pgpool.conf` without
//! restarts; `primary_search` makes pgpool look for a primary it lost track of), `standby_watch` (a standby whose server went away leaves pgpool's rotation at
//! once), `native` (the native engine from the same files), `api` (HTTP), `metrics`
//! (text format, pure).

pub mod api;
pub mod drain;
pub mod engine;
pub mod init;
pub mod metrics;
pub mod native;
pub mod pgpool;
pub mod primary_search;
pub mod standby_watch;
pub mod supervisor;
pub mod sync;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use tokio::sync::Mutex;

/// Command line of the agent.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "pgbalancer-agent",
    version,
    about = "pgBalancer agent: supervises pgpool-II and serves its REST API"
)]
pub struct AgentConfig {
    /// Address of the REST API.
    #[arg(long, env = "PGBALANCER_AGENT_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: String,
    /// Directory of pgpool.conf, pcp.conf, pool_hba.conf and secrets/.
    #[arg(long, env = "PGBALANCER_CONFIG_DIR", default_value = "/etc/pgbalancer")]
    pub config_dir: PathBuf,
    /// pgpool binary.
    #[arg(long, default_value = "pgpool")]
    pub pgpool: String,
    /// Seconds between backend-list checks.
    #[arg(long, default_value_t = 1)]
    pub sync_interval: u64,
    /// The engine serving clients.
    #[arg(long, env = "PGBALANCER_ENGINE", value_enum, default_value_t = engine::EngineKind::Pgpool)]
    pub engine: engine::EngineKind,
    /// Native engine: which reads may go to replicas.
    #[arg(long, env = "PGBALANCER_CONSISTENCY", value_enum, default_value_t = crate::balancer::Consistency::Session)]
    pub consistency: crate::balancer::Consistency,
    /// Native engine: statements calling functions it does not know run on a replica too
    /// (declare that the application's functions do not write).
    #[arg(long, env = "PGBALANCER_READ_ONLY_FUNCTIONS")]
    pub read_only_functions: bool,
    /// Native engine: read-only transactions (`BEGIN READ ONLY`) may run on a replica.
    #[arg(long, env = "PGBALANCER_READ_ONLY_TRANSACTIONS_ON_REPLICAS")]
    pub read_only_transactions_on_replicas: bool,
    /// Native engine: TLS from clients, with `tls/tls.crt` and `tls/tls.key` (pgpool takes
    /// its TLS settings from `pgpool.conf` and `pool_hba.conf`).
    #[arg(long, env = "PGBALANCER_TLS", value_enum, default_value_t = crate::balancer::TlsMode::Disabled)]
    pub tls: crate::balancer::TlsMode,
    /// Instead of running: wait until clients stop opening connections to the balancer's
    /// port (at least 5 s, then 2 s without one, at most 20 s) and exit. The preStop hook of
    /// a balancer pod.
    #[arg(long)]
    pub drain: bool,
}

impl AgentConfig {
    /// Path of a file in the configuration directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.config_dir.join(name)
    }

    /// A secret from `secrets/`, trimmed; empty when absent (not configured: no API token
    /// disables changes) or unreadable, which is logged.
    pub fn secret(&self, name: &str) -> String {
        let path = self.config_dir.join("secrets").join(name);
        match std::fs::read_to_string(&path) {
            Ok(s) => s.trim().to_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read secret");
                String::new()
            }
        }
    }
}

/// pgpool's nodes as one step of the sync loop read them.
#[derive(Debug, Clone, Default)]
pub struct NodeSnapshot {
    /// The nodes.
    pub nodes: Vec<crate::pool_node::PoolNode>,
    /// When they were read; `None` before the first read.
    pub read_at: Option<Instant>,
    /// Whether pgpool accepted the SQL session they were read through (it refuses sessions
    /// while no backend is up; the nodes then come from PCP).
    pub accepting: bool,
    /// The engine's restart count before they were read: a list from a pgpool that has
    /// since been restarted says nothing about the new one.
    pub restarts: u64,
}

impl NodeSnapshot {
    /// The nodes, when they were read through an accepted session less than `max_age` ago,
    /// from the pgpool of restart count `restarts`.
    pub fn fresh(
        &self,
        max_age: std::time::Duration,
        restarts: u64,
    ) -> Option<&[crate::pool_node::PoolNode]> {
        let read_at = self.read_at?;
        (self.accepting && self.restarts == restarts && read_at.elapsed() <= max_age)
            .then_some(self.nodes.as_slice())
    }
}

/// State shared by the agent's tasks.
pub struct Agent {
    /// Configuration.
    pub config: AgentConfig,
    /// The engine serving clients.
    pub engine: engine::Engine,
    /// When the agent started.
    pub started: Instant,
    /// Nodes detached through the API: the sync loop leaves them detached.
    pub manually_detached: Mutex<BTreeSet<u32>>,
    /// pgpool's nodes as the sync loop last read them (every second).
    pub pool_nodes: std::sync::Mutex<NodeSnapshot>,
    /// Last (time, total selects) sample, for selects per second.
    pub last_sample: Mutex<Option<(Instant, i64)>>,
}

/// Runs the agent until SIGTERM or SIGINT, then stops pgpool cleanly.
pub async fn run(config: AgentConfig) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    // Handled from the start: a stop asked for while the engine starts still stops pgpool
    // cleanly (the agent is not process 1, which the kernel would shield from them).
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let engine = match config.engine {
        engine::EngineKind::Pgpool => {
            engine::Engine::Pgpool(supervisor::Supervisor::start(&config))
        }
        engine::EngineKind::Native => {
            let settings = crate::balancer::Settings {
                consistency: config.consistency,
                unknown_functions: if config.read_only_functions {
                    crate::balancer::classify::UnknownFunctions::Replica
                } else {
                    crate::balancer::classify::UnknownFunctions::Primary
                },
                read_only_transactions_on_replicas: config.read_only_transactions_on_replicas,
                tls: config.tls,
                ..Default::default()
            };
            engine::Engine::Native(native::start(&config, settings).await?)
        }
    };
    let agent = Arc::new(Agent {
        config: config.clone(),
        engine,
        started: Instant::now(),
        manually_detached: Mutex::new(BTreeSet::new()),
        pool_nodes: std::sync::Mutex::new(NodeSnapshot::default()),
        last_sample: Mutex::new(None),
    });
    if matches!(agent.engine, engine::Engine::Pgpool(_)) {
        tokio::spawn(sync::run(agent.clone()));
        tokio::spawn(standby_watch::run(agent.clone()));
    }
    let listener = tokio::net::TcpListener::bind(&config.listen).await?;
    tracing::info!(listen = %config.listen, "agent serving");
    let app = api::router(agent.clone());
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    agent.engine.stop(&config).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn only_a_recent_list_read_through_an_accepted_session_is_fresh() {
        let minute = Duration::from_secs(60);
        assert!(NodeSnapshot::default().fresh(minute, 0).is_none());
        let read = NodeSnapshot {
            nodes: Vec::new(),
            read_at: Some(Instant::now()),
            accepting: true,
            restarts: 2,
        };
        assert!(read.fresh(minute, 2).is_some());
        assert!(read.fresh(minute, 3).is_none(), "pgpool restarted since");
        let refused = NodeSnapshot {
            accepting: false,
            ..read.clone()
        };
        assert!(refused.fresh(minute, 2).is_none());
        let old = NodeSnapshot {
            read_at: Instant::now().checked_sub(Duration::from_secs(5)),
            ..read
        };
        assert!(old.fresh(Duration::from_secs(3), 2).is_none());
        assert!(old.fresh(minute, 2).is_some());
    }
}
