//! One monitor per server: a kept `pgbalancer_monitor` connection asks, every check interval,
//! whether the server is in recovery and its WAL position (current on a primary, replayed on a
//! standby). Routing trusts only fresh answers; read-your-writes compares positions sampled
//! after a write was acknowledged.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio_postgres::{Client, Statement};

use super::backends::{Backend, Backends};

/// How a monitor connects and how often it checks.
#[derive(Clone)]
pub struct MonitorConfig {
    /// Monitoring role.
    pub user: String,
    /// Its password.
    pub password: String,
    /// Time between checks.
    pub interval: Duration,
}

impl std::fmt::Debug for MonitorConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MonitorConfig")
            .field("user", &self.user)
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

const QUERY: &str = "SELECT r, pg_wal_lsn_diff(CASE WHEN r \
                     THEN coalesce(pg_last_wal_replay_lsn(), '0/0') \
                     ELSE pg_current_wal_lsn() END, '0/0')::bigint \
                     FROM (SELECT pg_is_in_recovery() AS r) s";

/// Watches `backend` until it is no longer configured.
pub async fn run(backends: Arc<Backends>, backend: Arc<Backend>, config: MonitorConfig) {
    let mut client: Option<(Client, Statement)> = None;
    while backends.contains(&backend) {
        if client.as_ref().is_none_or(|(c, _)| c.is_closed()) {
            client = connect(&backend, &config).await;
            if client.is_none() {
                mark(&backend, None);
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        }
        let Some((c, check)) = client.as_ref() else {
            continue;
        };
        let started = Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(2), c.query_one(check, &[])).await;
        match answer {
            Ok(Ok(row)) => {
                let in_recovery: bool = row.get(0);
                let lsn = row.get::<_, i64>(1).max(0) as u64;
                mark(&backend, Some((in_recovery, lsn, started)));
            }
            _ => {
                mark(&backend, None);
                client = None;
            }
        }
        tokio::time::sleep(config.interval).await;
    }
}

async fn connect(backend: &Backend, config: &MonitorConfig) -> Option<(Client, Statement)> {
    let client = crate::pg::connect(
        &backend.host,
        backend.port,
        &config.user,
        &config.password,
        "postgres",
    )
    .await
    .ok()?;
    let check = client.prepare(QUERY).await.ok()?;
    Some((client, check))
}

fn mark(backend: &Backend, answer: Option<(bool, u64, Instant)>) {
    let mut seen = backend.seen.lock().unwrap_or_else(|e| e.into_inner());
    let up = answer.is_some();
    if seen.up != up {
        seen.changed = SystemTime::now();
        if up {
            tracing::info!(node = backend.id, host = %backend.host, "backend up");
        } else {
            tracing::warn!(node = backend.id, host = %backend.host, "backend down");
        }
    }
    if seen.up && !up {
        backend.epoch.fetch_add(1, Ordering::Relaxed);
    }
    seen.up = up;
    if answer.is_some_and(|(in_recovery, _, _)| in_recovery)
        && backend.released.swap(false, Ordering::Relaxed)
    {
        backend.detached.store(false, Ordering::Relaxed);
        backend.epoch.fetch_add(1, Ordering::Relaxed);
        tracing::info!(node = backend.id, host = %backend.host, "attached again: answers as a standby");
    }
    if let Some((in_recovery, lsn, sampled)) = answer {
        if seen.in_recovery.is_some_and(|r| r != in_recovery) {
            seen.changed = SystemTime::now();
            backend.epoch.fetch_add(1, Ordering::Relaxed);
        }
        seen.in_recovery = Some(in_recovery);
        seen.lsn = lsn;
        seen.sampled = Some(sampled);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_released_node_is_attached_again_once_it_answers_as_a_standby() {
        let b = Backend::new(0, "demo-0", 5432);
        b.detached.store(true, Ordering::Relaxed);
        b.released.store(true, Ordering::Relaxed);
        // Still writable (not fenced yet), then gone: stays detached.
        mark(&b, Some((false, 100, Instant::now())));
        mark(&b, None);
        assert!(!b.attached());
        mark(&b, Some((true, 100, Instant::now())));
        assert!(b.attached());
        assert!(!b.released.load(Ordering::Relaxed));

        // Detached and held: a standby answer changes nothing.
        let held = Backend::new(1, "demo-1", 5432);
        held.detached.store(true, Ordering::Relaxed);
        mark(&held, Some((true, 100, Instant::now())));
        assert!(!held.attached());
    }
}
