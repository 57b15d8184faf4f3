//! A balancer's view of one backend node, the one type for it everywhere: the agent reads it
//! from its engine and serves it on its REST API, the Docker backend reads it with
//! `SHOW POOL_NODES` through the balancer's port, the Kubernetes backend from the agent's
//! REST answer, and the native engine answers `SHOW POOL_NODES` from it. Pure: the type, its
//! JSON shape (the agent's API keys, through serde) and the parser of a `SHOW POOL_NODES` row.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// One backend node as a balancer sees it. What a source does not give is `None`, never a
/// stand-in value: `SHOW POOL_NODES` of other pgpool versions lacks columns, `pcp_node_info`
/// has no select count, and the native engine knows no lag while no primary answers.
///
/// Serialized with the agent's REST API keys (`id`, `weight`, `replication_lag`); an unknown
/// value is `null`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PoolNode {
    /// Slot (node id), which is the instance ordinal.
    #[serde(rename = "id")]
    pub slot: u32,
    /// Backend hostname.
    pub host: String,
    /// Backend port.
    pub port: Option<u16>,
    /// `up`, `waiting`, `down` or `unused` (the agent's API reports `up` or `down`).
    pub status: String,
    /// `primary`, `standby` or `unknown`.
    pub role: String,
    /// Normalised load-balance weight (0-1).
    #[serde(rename = "weight")]
    pub lb_weight: Option<f64>,
    /// SELECTs routed to it.
    pub select_count: Option<i64>,
    /// Replication delay in bytes, as the balancer measures it.
    #[serde(rename = "replication_lag")]
    pub replication_delay: Option<i64>,
    /// `streaming`, `catchup`, or empty when the balancer reports none (a primary).
    pub replication_state: Option<String>,
    /// Last status change, `YYYY-MM-DD HH:MM:SS`.
    pub last_status_change: Option<String>,
}

/// A `SHOW POOL_NODES` row the node cannot be read from.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("SHOW POOL_NODES row without a valid {column}")]
pub struct RowError {
    /// The missing or unreadable column.
    pub column: &'static str,
}

impl PoolNode {
    /// The node takes queries.
    pub fn is_up(&self) -> bool {
        matches!(self.status.as_str(), "up" | "waiting")
    }

    /// Reads a `SHOW POOL_NODES` row, given its text value by column name (`None` for a
    /// column that is absent or NULL). The node id, hostname, status and role must be there;
    /// any other column that is absent or not a number where one is expected (a delay shown
    /// in seconds, with `delay_threshold_by_time`) is unknown.
    pub fn from_row<'a>(column: impl Fn(&str) -> Option<&'a str>) -> Result<Self, RowError> {
        let text = |name: &'static str| {
            column(name)
                .map(str::to_owned)
                .ok_or(RowError { column: name })
        };
        Ok(PoolNode {
            slot: number(column("node_id")).ok_or(RowError { column: "node_id" })?,
            host: text("hostname")?,
            port: number(column("port")),
            status: text("status")?,
            role: text("role")?,
            lb_weight: number(column("lb_weight")),
            select_count: number(column("select_cnt")),
            replication_delay: number(column("replication_delay")),
            replication_state: column("replication_state").map(str::to_owned),
            last_status_change: column("last_status_change").map(str::to_owned),
        })
    }
}

/// A column's number; `None` when it is absent or not one.
fn number<T: std::str::FromStr>(text: Option<&str>) -> Option<T> {
    text.and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row<'a>(cells: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<&'a str> {
        move |name| cells.iter().find(|(c, _)| *c == name).map(|(_, v)| *v)
    }

    #[test]
    fn a_pgpool_row_is_read_whole() {
        let cells = [
            ("node_id", "1"),
            ("hostname", "demo-1"),
            ("port", "5432"),
            ("status", "waiting"),
            ("pg_status", "up"),
            ("lb_weight", "0.500000"),
            ("role", "standby"),
            ("select_cnt", "12"),
            ("replication_delay", "128"),
            ("replication_state", "streaming"),
            ("last_status_change", "2026-11-29 12:00:01"),
        ];
        let node = PoolNode::from_row(row(&cells)).unwrap();
        assert_eq!(
            node,
            PoolNode {
                slot: 1,
                host: "demo-1".into(),
                port: Some(5432),
                status: "waiting".into(),
                role: "standby".into(),
                lb_weight: Some(0.5),
                select_count: Some(12),
                replication_delay: Some(128),
                replication_state: Some("streaming".into()),
                last_status_change: Some("2026-11-29 12:00:01".into()),
            }
        );
        assert!(node.is_up());
    }

    #[test]
    fn absent_or_unreadable_columns_are_unknown_not_zero() {
        let cells = [
            ("node_id", "0"),
            ("hostname", "demo-0"),
            ("status", "up"),
            ("role", "primary"),
            ("replication_delay", "0.000000 second"),
        ];
        let node = PoolNode::from_row(row(&cells)).unwrap();
        assert_eq!(
            (node.port, node.select_count, node.replication_delay),
            (None, None, None)
        );
        assert_eq!((node.lb_weight, node.replication_state), (None, None));
    }

    #[test]
    fn a_row_without_its_identity_is_an_error() {
        let no_id = [
            ("hostname", "demo-0"),
            ("status", "up"),
            ("role", "primary"),
        ];
        assert_eq!(
            PoolNode::from_row(row(&no_id)),
            Err(RowError { column: "node_id" })
        );
        let bad_id = [("node_id", "x"), ("hostname", "demo-0"), ("status", "up")];
        assert_eq!(
            PoolNode::from_row(row(&bad_id)),
            Err(RowError { column: "node_id" })
        );
        let no_status = [
            ("node_id", "0"),
            ("hostname", "demo-0"),
            ("role", "primary"),
        ];
        assert_eq!(
            PoolNode::from_row(row(&no_status)),
            Err(RowError { column: "status" })
        );
    }

    #[test]
    fn json_uses_the_agent_api_keys_and_reads_back_the_same() {
        let node = PoolNode {
            slot: 2,
            host: "demo-2".into(),
            port: Some(5432),
            status: "up".into(),
            role: "standby".into(),
            lb_weight: Some(0.25),
            select_count: None,
            replication_delay: Some(64),
            replication_state: Some(String::new()),
            last_status_change: None,
        };
        let value = serde_json::to_value(&node).unwrap();
        assert_eq!(
            value.to_string(),
            r#"{"host":"demo-2","id":2,"last_status_change":null,"port":5432,"replication_lag":64,"replication_state":"","role":"standby","select_count":null,"status":"up","weight":0.25}"#
        );
        assert_eq!(serde_json::from_value::<PoolNode>(value).unwrap(), node);
    }
}
