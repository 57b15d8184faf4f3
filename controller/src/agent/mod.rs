//! The balancer agent (`pgbalancer-agent`): runs next to pgpool-II in the balancer container,
//! supervises it, keeps its backends in line with the rendered configuration, and serves the
//! pgBalancer REST API and Prometheus metrics from live pgpool data.
//!
//! Layout: `supervisor` (process lifecycle), `pgpool` (SQL and PCP access), `sync` (backend
//! list follows `pgpool.conf` without restarts), `api` (HTTP), `metrics` (text format, pure).

pub mod api;
pub mod metrics;
pub mod pgpool;
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
}

impl AgentConfig {
    /// Path of a file in the configuration directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.config_dir.join(name)
    }

    /// A secret from `secrets/`, trimmed; empty when absent.
    pub fn secret(&self, name: &str) -> String {
        std::fs::read_to_string(self.config_dir.join("secrets").join(name))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    }
}

/// State shared by the agent's tasks.
pub struct Agent {
    /// Configuration.
    pub config: AgentConfig,
    /// The supervised pgpool.
    pub pgpool: supervisor::Supervisor,
    /// When the agent started.
    pub started: Instant,
    /// Nodes detached through the API: the sync loop leaves them detached.
    pub manually_detached: Mutex<BTreeSet<u32>>,
    /// Last (time, total selects) sample, for selects per second.
    pub last_sample: Mutex<Option<(Instant, i64)>>,
}

/// Runs the agent until SIGTERM or SIGINT, then stops pgpool cleanly.
pub async fn run(config: AgentConfig) -> std::io::Result<()> {
    let pgpool = supervisor::Supervisor::start(&config);
    let agent = Arc::new(Agent {
        config: config.clone(),
        pgpool,
        started: Instant::now(),
        manually_detached: Mutex::new(BTreeSet::new()),
        last_sample: Mutex::new(None),
    });
    tokio::spawn(sync::run(agent.clone()));
    let listener = tokio::net::TcpListener::bind(&config.listen).await?;
    tracing::info!(listen = %config.listen, "agent serving");
    let app = api::router(agent.clone());
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = async { if let Some(t) = term.as_mut() { t.recv().await; } else { std::future::pending::<()>().await } } => {},
        }
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    agent.pgpool.stop(&config).await;
    Ok(())
}
