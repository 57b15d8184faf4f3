//! `SHOW POOL_NODES` and `SHOW POOL_VERSION`, answered by the native engine itself with
//! pgpool's column names, so that tools reading pgpool (the Docker backend's observation,
//! `psql`) read the native engine the same way.

use std::sync::atomic::Ordering;

use bytes::{BufMut, BytesMut};

use super::backends::Seen;
use super::wire;
use super::Engine;

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

/// One node as the engine sees it, in pgpool's terms.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    /// Slot.
    pub id: u32,
    /// Host.
    pub host: String,
    /// Port.
    pub port: u16,
    /// `up` (attached and answering) or `down`.
    pub status: &'static str,
    /// `primary`, `standby` or `unknown`.
    pub role: &'static str,
    /// Reads sent to it.
    pub select_cnt: u64,
    /// Bytes behind the primary (standbys).
    pub replication_delay: u64,
    /// Sessions connected to it.
    pub sessions: u32,
    /// Batches running on it.
    pub in_flight: u32,
    /// When its status last changed, `YYYY-MM-DD HH:MM:SS` UTC.
    pub last_status_change: String,
}

/// Every configured node.
pub fn nodes(engine: &Engine) -> Vec<NodeView> {
    let set = engine.backends.all();
    let primary_lsn = engine.primary().map(|p| p.seen().lsn);
    set.iter()
        .map(|b| {
            let seen: Seen = b.seen();
            let up = seen.up && b.attached();
            NodeView {
                id: b.id,
                host: b.host.clone(),
                port: b.port,
                status: if up { "up" } else { "down" },
                role: match seen.in_recovery {
                    Some(false) => "primary",
                    Some(true) => "standby",
                    None => "unknown",
                },
                select_cnt: b.selects.load(Ordering::Relaxed),
                replication_delay: match (seen.in_recovery, primary_lsn) {
                    (Some(true), Some(p)) => p.saturating_sub(seen.lsn),
                    _ => 0,
                },
                sessions: b.sessions.load(Ordering::Relaxed),
                in_flight: b.in_flight.load(Ordering::Relaxed),
                last_status_change: k8s_openapi::jiff::Timestamp::try_from(seen.changed)
                    .map(|t| t.strftime("%Y-%m-%d %H:%M:%S").to_string())
                    .unwrap_or_default(),
            }
        })
        .collect()
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
            let views = nodes(engine);
            let weight = format!("{:.6}", 1.0 / views.len().max(1) as f64);
            let rows: Vec<Vec<String>> = views
                .iter()
                .map(|n| {
                    vec![
                        n.id.to_string(),
                        n.host.clone(),
                        n.port.to_string(),
                        n.status.into(),
                        n.status.into(),
                        weight.clone(),
                        n.role.into(),
                        n.role.into(),
                        n.select_cnt.to_string(),
                        "false".into(),
                        n.replication_delay.to_string(),
                        String::new(),
                        String::new(),
                        n.last_status_change.clone(),
                    ]
                })
                .collect();
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
