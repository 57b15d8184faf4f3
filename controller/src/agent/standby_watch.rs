//! Takes a standby out of pgpool's rotation the moment its server goes away.
//!
//! pgpool learns that a backend died from its health check, seconds later; until then every
//! new session tries to connect to the dead server first and waits for `connect_timeout` when
//! its address no longer answers (a container or pod that is gone), so clients with a short
//! connect timeout of their own fail although only a replica was lost. Here the agent keeps
//! one idle connection to each configured backend (TCP keepalives on) and asks it every few
//! seconds whether it is a standby. A server that stops, crashes or is killed ends that
//! connection at once (a host that vanished: within a few seconds, by TCP timeouts); when
//! the server then does not answer a new one either (refused, unreachable, or shutting down;
//! an authentication error or a full server is an answer), it said it was a standby, and
//! pgpool's nodes as last read show it up and not as the primary, the agent detaches it
//! through PCP. pgpool handles that as a switchover: only the sessions reading from that node
//! end, writes go on. The backend sync loop attaches the node again once it answers as a
//! standby.
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
const CONFIRM_TIMEOUT: Duration = Duration::from_millis(300);
/// First pause between attempts to open the kept connection; it doubles up to [`RETRY_MAX`]
/// while the server does not answer.
const RETRY: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// How often the kept connection asks whether its server is a standby.
const RECHECK: Duration = Duration::from_secs(2);
/// Longest wait for that answer, and for sent data to be acknowledged, before the server
/// counts as gone.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the set of watched backends follows `pgpool.conf`.
const FOLLOW: Duration = Duration::from_secs(1);

/// Watches every configured backend, following `pgpool.conf`, forever.
pub async fn run(agent: Arc<Agent>) {
    let mut watchers: HashMap<(u32, String), JoinHandle<()>> = HashMap::new();
    loop {
        // An unreadable file leaves the watches as they are.
        if let Ok(conf) = std::fs::read_to_string(agent.config.path("pgpool.conf")) {
            let wanted = configured_backends(&conf);
            // A watch that ended (it never returns; a panic would) is started again.
            watchers.retain(|key, task| {
                let keep = wanted.contains(key);
                if !keep {
                    task.abort();
                }
                keep && !task.is_finished()
            });
            for (slot, host) in wanted {
                watchers
                    .entry((slot, host.clone()))
                    .or_insert_with(|| tokio::spawn(watch(agent.clone(), slot, host)));
            }
        }
        tokio::time::sleep(FOLLOW).await;
    }
}

/// Holds a connection to `host` and reacts each time it ends.
async fn watch(agent: Arc<Agent>, slot: u32, host: String) {
    let mut pause = RETRY;
    loop {
        match hold(&agent, &host).await {
            Held::Never => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(RETRY_MAX);
                continue;
            }
            Held::Ended { standby } => {
                pause = RETRY;
                if standby && !answers(&agent, &host).await {
                    detach(&agent, slot, &host).await;
                }
            }
        }
        tokio::time::sleep(pause).await;
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
        .keepalives_retries(2)
        // Keepalives stop while sent data is unacknowledged: this bounds that case.
        .tcp_user_timeout(ANSWER_TIMEOUT);
    config
}

/// How a kept connection went.
enum Held {
    /// It could not be opened.
    Never,
    /// It was open and ended; whether the server last said it was a standby.
    Ended { standby: bool },
}

/// Opens the kept connection and holds it until it ends, asking every [`RECHECK`] whether the
/// server is a standby.
async fn hold(agent: &Agent, host: &str) -> Held {
    let timeout = crate::pg::CONNECT_TIMEOUT;
    let config = config(agent, host, timeout);
    let Ok(Ok((client, mut connection))) =
        tokio::time::timeout(timeout * 2, config.connect(NoTls)).await
    else {
        return Held::Never;
    };
    let mut standby = false;
    loop {
        let check = async {
            let asked = client.query_one("SELECT pg_is_in_recovery()", &[]);
            let answer = tokio::time::timeout(ANSWER_TIMEOUT, asked).await;
            if matches!(answer, Ok(Ok(_))) {
                tokio::time::sleep(RECHECK).await;
            }
            answer
        };
        tokio::select! {
            // Resolves when the server closes the socket or it breaks.
            _ = &mut connection => return Held::Ended { standby },
            answer = check => match answer {
                Ok(Ok(row)) => standby = row.get(0),
                // No answer in time: the server or the path to it is gone.
                Err(_) => return Held::Ended { standby },
                Ok(Err(e)) if e.is_closed() => return Held::Ended { standby },
                // The server refused the question but is there: start over, detach nothing.
                Ok(Err(_)) => return Held::Ended { standby: false },
            },
        }
    }
}

/// Whether the server answers a new connection right now (it may only have ended ours). A
/// refusal by the server itself (authentication, too many clients) is an answer; only no
/// connection at all, or a server shutting down or starting, is not.
async fn answers(agent: &Agent, host: &str) -> bool {
    let config = config(agent, host, CONFIRM_TIMEOUT);
    match tokio::time::timeout(CONFIRM_TIMEOUT, config.connect(NoTls)).await {
        Ok(Ok((client, connection))) => {
            // Polled once more after the client is gone, it says goodbye to the server.
            drop(client);
            tokio::spawn(connection);
            true
        }
        Ok(Err(e)) => e.as_db_error().is_some_and(|db| {
            !matches!(
                db.code().code(),
                "57P01" | "57P02" | "57P03" | "57P04" | "57P05"
            )
        }),
        Err(_) => false,
    }
}

/// Detaches `slot` through PCP, unless pgpool's nodes as the sync loop last read them show
/// it down, as the primary, or for another host. That view is used rather than a fresh one:
/// listing the nodes through PCP costs a round of its own (tens of milliseconds, during which
/// new sessions still meet the dead server), and a SQL session to pgpool would itself wait
/// for it. Detaching pgpool's primary would restart every pgpool child and stop writes.
async fn detach(agent: &Agent, slot: u32, host: &str) {
    if !agent.engine.is_running() {
        return;
    }
    let known = agent.pool_nodes.lock().ok().and_then(|last| {
        last.nodes
            .iter()
            .find(|n| n.slot == slot)
            .map(|n| n.is_up() && n.role != "primary" && n.host == host)
    });
    if known != Some(true) {
        return;
    }
    match pgpool::pcp(&agent.config, "pcp_detach_node", Some(slot)).await {
        Ok(_) => tracing::info!(node = slot, %host, "detached: its server went away"),
        Err(e) => tracing::debug!(node = slot, error = pgpool::report(&e), "not detached"),
    }
}
