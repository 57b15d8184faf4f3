//! Live data from the local pgpool: `SHOW POOL_NODES`, `SHOW POOL_PROCESSES` and
//! `SHOW POOL_VERSION` over SQL as `pgbalancer_monitor`, and node changes through the PCP tools.

use std::time::Duration;

use thiserror::Error;
use tokio_postgres::{Client, SimpleQueryMessage};

use super::AgentConfig;
use crate::pg::{self, PgError};
use crate::plan::{BALANCER_PORT, MONITOR_USER, PCP_PORT, PCP_USER};
use crate::pool_node::PoolNode;

/// A failure talking to pgpool. Messages do not repeat their source: report them with
/// [`report`].
#[derive(Debug, Error)]
pub enum PgpoolError {
    /// Connecting to pgpool or reading its nodes failed.
    #[error("pgpool does not answer")]
    Pg(#[from] PgError),
    /// A statement to pgpool failed.
    #[error("pgpool does not answer")]
    Sql(#[from] tokio_postgres::Error),
    /// A PCP command failed.
    #[error("{tool} failed: {output}")]
    Pcp { tool: String, output: String },
    /// A PCP command could not run.
    #[error("cannot run {tool}")]
    Spawn {
        tool: String,
        #[source]
        source: std::io::Error,
    },
}

/// `e` and its causes on one line, as the REST API and the logs show it.
pub fn report(e: &PgpoolError) -> String {
    crate::local::controller::error_chain(e)
}

/// A pool process.
#[derive(Debug, Clone, PartialEq)]
pub struct Process {
    /// Process id.
    pub pid: String,
    /// Status text (`Wait for connection`, `Idle`, `Execute command`…).
    pub status: String,
}

impl Process {
    /// Serves a client right now.
    pub fn is_active(&self) -> bool {
        !self.status.is_empty() && !self.status.starts_with("Wait for connection")
    }
}

/// Connects to pgpool as the monitoring role.
pub async fn connect(config: &AgentConfig) -> Result<Client, PgpoolError> {
    Ok(pg::connect(
        "127.0.0.1",
        BALANCER_PORT,
        MONITOR_USER,
        &config.secret("monitor-password"),
        "postgres",
    )
    .await?)
}

fn rows(messages: Vec<SimpleQueryMessage>) -> Vec<tokio_postgres::SimpleQueryRow> {
    messages
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .collect()
}

/// `SHOW POOL_NODES`, read by the parser every balancer reader shares.
pub async fn nodes(client: &Client) -> Result<Vec<PoolNode>, PgpoolError> {
    Ok(pg::pool_nodes(client).await?)
}

/// The nodes through PCP (`pcp_node_info -a`), which answers even when pgpool refuses SQL
/// because every backend is down (a balancer that started before its instances).
pub async fn nodes_via_pcp(config: &AgentConfig) -> Result<Vec<PoolNode>, PgpoolError> {
    let output = pcp(config, "pcp_node_info", None).await?;
    Ok(parse_node_info(&output))
}

/// Parses `pcp_node_info -a` lines: `host port status weight status_name backend_status role
/// backend_role replication_delay replication_state replication_sync_state date time`. PCP
/// gives no select count; its `none` replication state is what `SHOW POOL_NODES` shows empty.
pub fn parse_node_info(output: &str) -> Vec<PoolNode> {
    output
        .lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .filter_map(|(id, line)| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            Some(PoolNode {
                slot: id as u32,
                host: f[0].to_owned(),
                port: f[1].parse().ok(),
                status: f[4].to_owned(),
                role: f[6].to_owned(),
                lb_weight: f[3].parse().ok(),
                select_count: None,
                replication_delay: f.get(8).and_then(|v| v.parse().ok()),
                replication_state: f
                    .get(9)
                    .map(|v| if *v == "none" { "" } else { v }.to_owned()),
                last_status_change: f.get(11..13).map(|d| d.join(" ")),
            })
        })
        .collect()
}

/// `SHOW POOL_PROCESSES`.
pub async fn processes(client: &Client) -> Result<Vec<Process>, PgpoolError> {
    Ok(rows(client.simple_query("SHOW POOL_PROCESSES").await?)
        .iter()
        .map(|r| {
            let t = |name: &str| r.try_get(name).ok().flatten().unwrap_or("").to_owned();
            Process {
                pid: t("pool_pid"),
                status: t("status"),
            }
        })
        .collect())
}

/// pgpool's version, e.g. `4.6.1 (chirikoboshi)`.
pub async fn version(client: &Client) -> Result<String, PgpoolError> {
    Ok(rows(client.simple_query("SHOW POOL_VERSION").await?)
        .first()
        .and_then(|r| r.get(0).map(str::to_owned))
        // pgpool answers one row; an answer without one shows as an empty version.
        .unwrap_or_default())
}

/// Runs PCP `tool` (optionally for node `node`) against the local pgpool.
pub async fn pcp(
    config: &AgentConfig,
    tool: &str,
    node: Option<u32>,
) -> Result<String, PgpoolError> {
    let mut cmd = tokio::process::Command::new(tool);
    cmd.args([
        "-w",
        "-h",
        "127.0.0.1",
        "-p",
        &PCP_PORT.to_string(),
        "-U",
        PCP_USER,
    ])
    .env("PCPPASSFILE", private_pcppass(config));
    match node {
        Some(n) => {
            cmd.args(["-n", &n.to_string()]);
        }
        None if tool == "pcp_node_info" => {
            cmd.arg("-a");
        }
        None => {}
    }
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .map_err(|_| PgpoolError::Pcp {
            tool: tool.into(),
            output: "timed out after 30 s".into(),
        })?
        .map_err(|source| PgpoolError::Spawn {
            tool: tool.into(),
            source,
        })?;
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(output)
    } else {
        Err(PgpoolError::Pcp {
            tool: tool.into(),
            output: output.trim().to_owned(),
        })
    }
}

/// The PCP password file as the PCP tools accept it (mode 0600). A Kubernetes Secret volume
/// makes it group-readable, which the tools refuse, so a private copy is used then.
fn private_pcppass(config: &AgentConfig) -> std::path::PathBuf {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let source = config.config_dir.join("secrets/pcppass");
    let private = std::fs::metadata(&source)
        .map(|m| m.permissions().mode() & 0o077 == 0)
        .unwrap_or(true);
    if private {
        return source;
    }
    let copy = std::env::temp_dir().join("pgbalancer-pcppass");
    let written = std::fs::read(&source).and_then(|bytes| {
        // A copy left by an earlier run is replaced; none at all is the usual case.
        let _ = std::fs::remove_file(&copy);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&copy)?;
        std::io::Write::write_all(&mut f, &bytes)
    });
    if written.is_ok() {
        copy
    } else {
        source
    }
}

/// Backend slots configured in a `pgpool.conf` text: (slot, host).
pub fn configured_backends(conf: &str) -> Vec<(u32, String)> {
    let mut out: Vec<(u32, String)> = conf
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let rest = line.strip_prefix("backend_hostname")?;
            let (slot, value) = rest.split_once('=')?;
            let slot = slot.trim().parse().ok()?;
            Some((slot, value.trim().trim_matches('\'').to_owned()))
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcp_node_info_lines_become_nodes() {
        let out = "db-0 5432 2 0.500000 up up primary primary 0 none none 2026-11-29 12:00:00\n\
                   db-1.hl 5432 3 0.500000 down down standby unknown 0 none none 2026-11-29 12:00:01\n";
        let nodes = parse_node_info(out);
        assert_eq!(nodes.len(), 2);
        assert_eq!(
            (
                nodes[1].slot,
                nodes[1].host.as_str(),
                nodes[1].status.as_str()
            ),
            (1, "db-1.hl", "down")
        );
        assert_eq!(nodes[0].role, "primary");
        assert_eq!(
            nodes[1].last_status_change.as_deref(),
            Some("2026-11-29 12:00:01")
        );
        assert_eq!(
            (
                nodes[0].port,
                nodes[0].lb_weight,
                nodes[0].replication_delay
            ),
            (Some(5432), Some(0.5), Some(0))
        );
        assert_eq!(nodes[0].replication_state.as_deref(), Some(""));
        // PCP does not count SELECTs: unknown, not zero.
        assert_eq!(nodes[0].select_count, None);
    }

    #[test]
    fn backends_are_read_from_the_rendered_configuration() {
        let conf = "port = 9999\nbackend_hostname0 = 'db-0'\nbackend_port0 = 5432\nbackend_hostname2 = 'db-2'\n# backend_hostname9 = 'x'\n";
        assert_eq!(
            configured_backends(conf),
            [(0, "db-0".into()), (2, "db-2".into())]
        );
    }
}
