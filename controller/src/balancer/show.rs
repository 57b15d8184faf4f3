//! `SHOW POOL_NODES` and `SHOW POOL_VERSION`, answered by the native engine itself with
//! pgpool's column names, so that tools reading pgpool (the Docker backend's observation,
//! `psql`) read the native engine the same way.

use std::sync::atomic::Ordering;

use bytes::{BufMut, BytesMut};

use super::backends::Seen;
use super::wire;
use super::Engine;
use crate::pool_node::PoolNode;

/// pgpool's `SHOW POOL_NODES` columns.
const NODE_COLUMNS: &[&str] = &[
    "node_id",
    "hostname",
    "port",
    "status",
    "pg_status",
    "lb_weight",
    "role",
    "pg_role",
    "select_cnt",
    "load_balance_node",
    "replication_delay",
    "replication_state",
    "replication_sync_state",
    "last_status_change",
];

/// Every configured node, as the agent's API and `SHOW POOL_NODES` report it. The engine
/// keeps no replication state (empty, as pgpool shows a primary's); a standby's lag is
/// unknown while no primary answers, and a node's role while it does not answer.
pub fn nodes(engine: &Engine) -> Vec<PoolNode> {
    let set = engine.backends.all();
    let weight = 1.0 / set.len().max(1) as f64;
    let primary_lsn = engine.primary().map(|p| p.seen().lsn);
    set.iter()
        .map(|b| {
            let seen: Seen = b.seen();
            let up = seen.up && b.attached();
            PoolNode {
                slot: b.id,
                host: b.host.clone(),
                port: Some(b.port),
                status: if up { "up" } else { "down" }.into(),
                role: match seen.in_recovery {
                    Some(false) => "primary",
                    Some(true) => "standby",
                    None => "unknown",
                }
                .into(),
                lb_weight: Some(weight),
                select_count: i64::try_from(b.selects.load(Ordering::Relaxed)).ok(),
                replication_delay: match (seen.in_recovery, primary_lsn) {
                    (Some(false), _) => Some(0),
                    (Some(true), Some(p)) => i64::try_from(p.saturating_sub(seen.lsn)).ok(),
                    _ => None,
                },
                replication_state: Some(String::new()),
                last_status_change: k8s_openapi::jiff::Timestamp::try_from(seen.changed)
                    .ok()
                    .map(|t| t.strftime("%Y-%m-%d %H:%M:%S").to_string()),
            }
        })
        .collect()
}

/// A node as a `SHOW POOL_NODES` row, in [`NODE_COLUMNS`] order; an unknown value is empty.
fn row(n: &PoolNode) -> Vec<String> {
    let known = |v: Option<String>| v.unwrap_or_default();
    vec![
        n.slot.to_string(),
        n.host.clone(),
        known(n.port.map(|p| p.to_string())),
        n.status.clone(),
        n.status.clone(),
        known(n.lb_weight.map(|w| format!("{w:.6}"))),
        n.role.clone(),
        n.role.clone(),
        known(n.select_count.map(|c| c.to_string())),
        "false".into(),
        known(n.replication_delay.map(|d| d.to_string())),
        known(n.replication_state.clone()),
        String::new(),
        known(n.last_status_change.clone()),
    ]
}

/// The answer to `sql` when it is one of the engine's own `SHOW` commands.
pub fn answer(engine: &Engine, sql: &str) -> Option<BytesMut> {
    let words: Vec<String> = sql
        .trim()
        .trim_end_matches(';')
        .split_whitespace()
        .map(str::to_ascii_lowercase)
        .collect();
    let mut out = BytesMut::new();
    match words.as_slice() {
        [show, what] if show == "show" && what == "pool_nodes" => {
            let rows: Vec<Vec<String>> = nodes(engine).iter().map(row).collect();
            table(&mut out, NODE_COLUMNS, &rows);
        }
        [show, what] if show == "show" && what == "pool_version" => {
            let version = format!("pgbalancer native {}", env!("CARGO_PKG_VERSION"));
            table(&mut out, &["pool_version"], &[vec![version]]);
        }
        _ => return None,
    }
    Some(out)
}

/// `RowDescription`, `DataRow`s (all text) and `CommandComplete`.
fn table(out: &mut BytesMut, columns: &[&str], rows: &[Vec<String>]) {
    let mut body = Vec::new();
    body.put_i16(columns.len() as i16);
    for c in columns {
        wire::cstr(&mut body, c);
        body.put_i32(0);
        body.put_i16(0);
        body.put_i32(25);
        body.put_i16(-1);
        body.put_i32(-1);
        body.put_i16(0);
    }
    wire::put(out, b'T', &body);
    for row in rows {
        let mut body = Vec::new();
        body.put_i16(row.len() as i16);
        for v in row {
            body.put_i32(v.len() as i32);
            body.extend_from_slice(v.as_bytes());
        }
        wire::put(out, b'D', &body);
    }
    let mut tag = Vec::new();
    wire::cstr(&mut tag, &format!("SELECT {}", rows.len()));
    wire::put(out, b'C', &tag);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rendered_row_reads_back_as_the_same_node() {
        let node = PoolNode {
            slot: 1,
            host: "demo-1".into(),
            port: Some(5432),
            status: "up".into(),
            role: "standby".into(),
            lb_weight: Some(0.5),
            select_count: Some(9),
            replication_delay: Some(4096),
            replication_state: Some(String::new()),
            last_status_change: Some("2026-11-29 12:00:01".into()),
        };
        let cells = row(&node);
        assert_eq!(cells.len(), NODE_COLUMNS.len());
        let read = PoolNode::from_row(|name| {
            let i = NODE_COLUMNS.iter().position(|c| *c == name)?;
            Some(cells[i].as_str())
        });
        assert_eq!(read, Ok(node));
    }

    #[test]
    fn an_unknown_lag_is_rendered_empty_and_read_back_unknown() {
        let node = PoolNode {
            slot: 2,
            host: "demo-2".into(),
            port: Some(5432),
            status: "down".into(),
            role: "unknown".into(),
            replication_delay: None,
            ..PoolNode::default()
        };
        let cells = row(&node);
        let read = PoolNode::from_row(|name| {
            let i = NODE_COLUMNS.iter().position(|c| *c == name)?;
            Some(cells[i].as_str())
        })
        .unwrap();
        assert_eq!((read.replication_delay, read.select_count), (None, None));
    }
}
