//! SQL probes over the ports published on the host: readiness, role, replication and the
//! balancer's node list. Short timeouts: a probe that hangs must not stall reconcile.

use std::collections::HashMap;
use std::time::Duration;

use tokio_postgres::{Client, Config, NoTls, SimpleQueryMessage};

use super::error::DockerError;
use crate::backend::PoolNode;

const CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);

/// Opens a connection; the connection task ends when the client is dropped.
pub async fn connect(
    host: &str,
    port: u16,
    user: &str,
    password: &str,
    db: &str,
) -> Result<Client, DockerError> {
    let mut config = Config::new();
    config
        .host(host)
        .port(port)
        .user(user)
        .password(password)
        .dbname(db)
        .application_name("pgbalancer")
        .connect_timeout(CONNECT_TIMEOUT);
    let (client, connection) = config
        .connect(NoTls)
        .await
        .map_err(|source| DockerError::Sql {
            what: format!("cannot connect to {host}:{port} as {user}"),
            source,
        })?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

fn sql(what: &str) -> impl FnOnce(tokio_postgres::Error) -> DockerError + '_ {
    move |source| DockerError::Sql {
        what: what.to_owned(),
        source,
    }
}

/// `pg_is_in_recovery()`.
pub async fn in_recovery(client: &Client) -> Result<bool, DockerError> {
    let row = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .map_err(sql("pg_is_in_recovery"))?;
    Ok(row.get(0))
}

/// The primary's view of its standbys: application_name → (state, replay lag in bytes).
pub async fn replication(client: &Client) -> Result<HashMap<String, (String, i64)>, DockerError> {
    let rows = client
        .query(
            "SELECT application_name, state, \
             COALESCE(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn), 0)::bigint \
             FROM pg_stat_replication",
            &[],
        )
        .await
        .map_err(sql("reading pg_stat_replication"))?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                (r.get::<_, Option<String>>(1).unwrap_or_default(), r.get(2)),
            )
        })
        .collect())
}

/// Drops an inactive physical slot if it exists; true when no such slot remains.
pub async fn drop_slot(client: &Client, slot: &str) -> Result<bool, DockerError> {
    let rows = client
        .query(
            "SELECT active, CASE WHEN NOT active THEN pg_drop_replication_slot(slot_name) IS NULL END \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(sql("dropping a replication slot"))?;
    Ok(rows.iter().all(|r| !r.get::<_, bool>(0)))
}

/// `SHOW POOL_NODES` through the balancer.
pub async fn pool_nodes(client: &Client) -> Result<Vec<PoolNode>, DockerError> {
    let messages = client
        .simple_query("SHOW POOL_NODES")
        .await
        .map_err(sql("SHOW POOL_NODES"))?;
    let mut nodes = Vec::new();
    for message in messages {
        if let SimpleQueryMessage::Row(row) = message {
            let text = |name: &str| row.try_get(name).ok().flatten().unwrap_or("").to_owned();
            let number = |name: &str| text(name).parse::<i64>().unwrap_or(0);
            nodes.push(PoolNode {
                slot: text("node_id").parse().unwrap_or(u32::MAX),
                host: text("hostname"),
                status: text("status"),
                role: text("role"),
                select_count: number("select_cnt"),
                replication_delay: number("replication_delay"),
            });
        }
    }
    Ok(nodes)
}
