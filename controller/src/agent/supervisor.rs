//! Supervision of the pgpool process: start it, restart it when it exits (after a short
//! backoff), and stop it cleanly (`pgpool -m fast stop`) when the agent stops.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::AgentConfig;

/// Handle to the supervised pgpool.
pub struct Supervisor {
    running: Arc<AtomicBool>,
    restarts: Arc<AtomicU64>,
    stopping: Arc<AtomicBool>,
}

impl Supervisor {
    /// Starts pgpool and the task that keeps it running.
    pub fn start(config: &AgentConfig) -> Self {
        let running = Arc::new(AtomicBool::new(false));
        let restarts = Arc::new(AtomicU64::new(0));
        let stopping = Arc::new(AtomicBool::new(false));
        let (r, n, s, cfg) = (
            running.clone(),
            restarts.clone(),
            stopping.clone(),
            config.clone(),
        );
        tokio::spawn(async move {
            let mut first = true;
            while !s.load(Ordering::SeqCst) {
                if !first {
                    n.fetch_add(1, Ordering::SeqCst);
                    tracing::warn!("pgpool exited; restarting");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                first = false;
                let child = tokio::process::Command::new(&cfg.pgpool)
                    .args(["-n", "-D", "-f"])
                    .arg(cfg.path("pgpool.conf"))
                    .arg("-F")
                    .arg(cfg.path("pcp.conf"))
                    .arg("-a")
                    .arg(cfg.path("pool_hba.conf"))
                    .spawn();
                match child {
                    Ok(mut child) => {
                        r.store(true, Ordering::SeqCst);
                        let status = child.wait().await;
                        r.store(false, Ordering::SeqCst);
                        tracing::info!(?status, "pgpool exited");
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start pgpool");
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                }
            }
        });
        Self {
            running,
            restarts,
            stopping,
        }
    }

    /// The pgpool process is alive.
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }

    /// Times pgpool was restarted after exiting.
    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::SeqCst)
    }

    /// Stops pgpool (fast shutdown) and waits up to 10 s for it.
    pub async fn stop(&self, config: &AgentConfig) {
        self.stopping.store(true, Ordering::SeqCst);
        // Whether the stop command itself succeeded matters less than whether pgpool is gone,
        // which the loop below checks.
        let _ = tokio::process::Command::new(&config.pgpool)
            .args(["-f"])
            .arg(config.path("pgpool.conf"))
            .args(["-m", "fast", "stop"])
            .status()
            .await;
        for _ in 0..100 {
            if !self.is_running() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
