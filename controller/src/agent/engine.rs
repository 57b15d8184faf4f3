//! The engine behind the balancer's port, as the REST API and metrics see it: pgpool-II
//! (supervised, read over SQL, changed through PCP) or the native engine (read and changed in
//! process). Both answer with the same node and process types.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::pgpool::{self, Process};
use super::supervisor::Supervisor;
use super::AgentConfig;
use crate::balancer;
use crate::pool_node::PoolNode;

/// Which engine serves clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum EngineKind {
    /// pgpool-II, supervised by the agent.
    #[default]
    Pgpool,
    /// The native engine, inside the agent.
    Native,
}

/// The running engine.
pub enum Engine {
    /// pgpool-II.
    Pgpool(Supervisor),
    /// The native engine.
    Native(Arc<balancer::Engine>),
}

/// What the engine serves now.
pub struct Live {
    /// Backends.
    pub nodes: Vec<PoolNode>,
    /// Pool processes (pgpool only).
    pub processes: Vec<Process>,
    /// Client sessions being served.
    pub clients: usize,
    /// Engine version.
    pub version: String,
}

impl Engine {
    /// The engine's name, as `/api/v1/status` reports it.
    pub fn name(&self) -> &'static str {
        match self {
            Engine::Pgpool(_) => "pgpool",
            Engine::Native(_) => "native",
        }
    }

    /// The engine runs (the native engine runs as long as the agent).
    pub fn is_running(&self) -> bool {
        match self {
            Engine::Pgpool(s) => s.is_running(),
            Engine::Native(_) => true,
        }
    }

    /// Restarts of a supervised engine.
    pub fn restarts(&self) -> u64 {
        match self {
            Engine::Pgpool(s) => s.restarts(),
            Engine::Native(_) => 0,
        }
    }

    /// The backends as the engine sees them.
    pub async fn nodes(&self, config: &AgentConfig) -> Result<Vec<PoolNode>, String> {
        match self {
            Engine::Pgpool(_) => match pgpool::connect(config).await {
                Ok(client) => pgpool::nodes(&client).await,
                // pgpool refuses SQL while every backend is down; PCP still answers.
                Err(_) => pgpool::nodes_via_pcp(config).await,
            }
            .map_err(|e| pgpool::report(&e)),
            Engine::Native(engine) => Ok(balancer::show::nodes(engine)),
        }
    }

    /// Nodes, processes, clients and version.
    pub async fn live(&self, config: &AgentConfig) -> Result<Live, String> {
        match self {
            Engine::Pgpool(_) => {
                let live = async {
                    let client = pgpool::connect(config).await?;
                    let nodes = pgpool::nodes(&client).await?;
                    let processes = pgpool::processes(&client).await?;
                    let version = pgpool::version(&client).await?;
                    Ok::<_, pgpool::PgpoolError>(Live {
                        clients: processes.iter().filter(|p| p.is_active()).count(),
                        nodes,
                        processes,
                        version,
                    })
                };
                live.await.map_err(|e| pgpool::report(&e))
            }
            Engine::Native(engine) => Ok(Live {
                nodes: balancer::show::nodes(engine),
                processes: Vec::new(),
                clients: engine.clients.load(Ordering::Relaxed) as usize,
                version: format!("pgbalancer native {}", env!("CARGO_PKG_VERSION")),
            }),
        }
    }

    /// Attaches (`true`) or detaches a node.
    pub async fn set_attached(
        &self,
        config: &AgentConfig,
        id: u32,
        attached: bool,
    ) -> Result<(), String> {
        match self {
            Engine::Pgpool(_) => {
                let tool = if attached {
                    "pcp_attach_node"
                } else {
                    "pcp_detach_node"
                };
                pgpool::pcp(config, tool, Some(id))
                    .await
                    .map(|_| ())
                    .map_err(|e| pgpool::report(&e))
            }
            Engine::Native(engine) => match engine.backend(id) {
                Some(b) => {
                    b.released.store(false, Ordering::Relaxed);
                    b.detached.store(!attached, Ordering::Relaxed);
                    b.epoch.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
                None => Err(format!("node {id} is not configured")),
            },
        }
    }

    /// Lets a detached node be attached again once it answers as a standby: pgpool's nodes
    /// by the backend sync loop (nothing to do here), the native engine's by its monitor.
    pub fn release(&self, id: u32) {
        if let Engine::Native(engine) = self {
            if let Some(b) = engine.backend(id) {
                b.released.store(true, Ordering::Relaxed);
            }
        }
    }

    /// Reads the configuration again.
    pub async fn reload(&self, config: &AgentConfig) -> Result<(), String> {
        match self {
            Engine::Pgpool(_) => pgpool::pcp(config, "pcp_reload_config", None)
                .await
                .map(|_| ())
                .map_err(|e| pgpool::report(&e)),
            Engine::Native(engine) => super::native::apply(config, engine)
                .map_err(|e| crate::local::controller::error_chain(&e)),
        }
    }

    /// Stops a supervised engine cleanly.
    pub async fn stop(&self, config: &AgentConfig) {
        if let Engine::Pgpool(s) = self {
            s.stop(config).await;
        }
    }
}
