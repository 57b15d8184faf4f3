//! Prometheus text exposition of the balancer's state. Pure: nodes and counters in, text out.
//!
//! Each scrape builds a fresh `prometheus-client` registry from one [`Snapshot`] and encodes it
//! in the Prometheus text format (version 0.0.4), served as [`CONTENT_TYPE`].

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{prometheus_text, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::pgpool::Process;
use crate::pool_node::PoolNode;

/// `Content-Type` of [`render`]'s output: the Prometheus text format, version 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Everything `/metrics` reports.
pub struct Snapshot<'a> {
    /// pgpool answers SQL.
    pub pgpool_up: bool,
    /// Restarts of pgpool by the agent.
    pub restarts: u64,
    /// Backends.
    pub nodes: &'a [PoolNode],
    /// Pool processes.
    pub processes: &'a [Process],
}

/// Labels of every per-node series, in exposition order.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    node: u32,
    host: String,
    role: String,
}

impl From<&PoolNode> for NodeLabels {
    fn from(n: &PoolNode) -> Self {
        NodeLabels {
            node: n.slot,
            host: n.host.clone(),
            role: n.role.clone(),
        }
    }
}

/// A gauge holding `v`.
fn gauge(v: i64) -> Gauge {
    let g = Gauge::default();
    g.set(v);
    g
}

/// One series per node whose `value` is known, set from it: a node whose value is unknown
/// has no sample rather than a made-up one.
fn per_node<M: Default, V>(
    nodes: &[PoolNode],
    value: impl Fn(&PoolNode) -> Option<V>,
    set: impl Fn(&M, V),
) -> Family<NodeLabels, M> {
    let family = Family::default();
    for n in nodes {
        if let Some(v) = value(n) {
            set(&family.get_or_create(&NodeLabels::from(n)), v);
        }
    }
    family
}

/// The exposition text: each family's HELP and TYPE, then all of its samples. A per-node family
/// is left out entirely when there are no nodes (pgpool did not answer).
pub fn render(s: &Snapshot<'_>) -> String {
    let mut registry = Registry::default();
    registry.register(
        "pgbalancer_pgpool_up",
        "1 when pgpool answers SQL",
        gauge(s.pgpool_up.into()),
    );
    let restarts = Counter::<u64>::default();
    restarts.inc_by(s.restarts);
    // Counters are registered without `_total` and help texts without their final full stop:
    // the encoder appends both.
    registry.register(
        "pgbalancer_pgpool_restarts",
        "Times the agent restarted pgpool",
        restarts,
    );
    registry.register(
        "pgbalancer_node_up",
        "1 when the backend node takes queries",
        per_node(
            s.nodes,
            |n| Some(i64::from(n.is_up())),
            |g: &Gauge, v| {
                g.set(v);
            },
        ),
    );
    registry.register(
        "pgbalancer_node_primary",
        "1 when the backend node is the primary",
        per_node(
            s.nodes,
            |n| Some(i64::from(n.role == "primary")),
            |g: &Gauge, v| {
                g.set(v);
            },
        ),
    );
    registry.register(
        "pgbalancer_node_replication_lag_bytes",
        "Replication delay of the node in bytes",
        per_node(
            s.nodes,
            |n| n.replication_delay,
            |g: &Gauge, v| {
                g.set(v);
            },
        ),
    );
    registry.register(
        "pgbalancer_node_select",
        "SELECT statements routed to the node",
        per_node(
            s.nodes,
            |n| n.select_count.and_then(|c| u64::try_from(c).ok()),
            |c: &Counter, v| {
                c.inc_by(v);
            },
        ),
    );
    registry.register(
        "pgbalancer_node_weight",
        "Normalised load-balance weight of the node",
        per_node(
            s.nodes,
            |n| n.lb_weight,
            |g: &Gauge<f64, AtomicU64>, v| {
                g.set(v);
            },
        ),
    );
    let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    registry.register(
        "pgbalancer_pool_processes",
        "Pool processes (num_init_children)",
        gauge(count(s.processes.len())),
    );
    registry.register(
        "pgbalancer_pool_processes_active",
        "Pool processes serving a client",
        gauge(count(s.processes.iter().filter(|p| p.is_active()).count())),
    );
    let mut out = String::new();
    prometheus_text::encode(&mut out, &registry).expect("encoding into a String cannot fail");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u32, host: &str, role: &str, status: &str) -> PoolNode {
        PoolNode {
            slot: id,
            host: host.into(),
            port: Some(5432),
            status: status.into(),
            lb_weight: Some(0.5),
            role: role.into(),
            select_count: Some(7),
            replication_delay: Some(128),
            replication_state: Some("streaming".into()),
            last_status_change: None,
        }
    }

    fn procs() -> Vec<Process> {
        vec![
            Process {
                pid: "1".into(),
                status: "Idle".into(),
            },
            Process {
                pid: "2".into(),
                status: "Wait for connection".into(),
            },
        ]
    }

    #[test]
    fn metrics_have_help_type_and_one_sample_per_node() {
        let nodes = vec![
            node(0, "db-0", "primary", "up"),
            node(1, "db-1", "standby", "down"),
        ];
        let procs = procs();
        let text = render(&Snapshot {
            pgpool_up: true,
            restarts: 2,
            nodes: &nodes,
            processes: &procs,
        });
        for line in [
            "# HELP pgbalancer_pgpool_up 1 when pgpool answers SQL.",
            "# TYPE pgbalancer_pgpool_up gauge",
            "pgbalancer_pgpool_up 1",
            "# HELP pgbalancer_pgpool_restarts_total Times the agent restarted pgpool.",
            "# TYPE pgbalancer_pgpool_restarts_total counter",
            "pgbalancer_pgpool_restarts_total 2",
            "# TYPE pgbalancer_node_up gauge",
            "pgbalancer_node_up{node=\"0\",host=\"db-0\",role=\"primary\"} 1",
            "pgbalancer_node_up{node=\"1\",host=\"db-1\",role=\"standby\"} 0",
            "# TYPE pgbalancer_node_primary gauge",
            "pgbalancer_node_primary{node=\"0\",host=\"db-0\",role=\"primary\"} 1",
            "pgbalancer_node_primary{node=\"1\",host=\"db-1\",role=\"standby\"} 0",
            "# TYPE pgbalancer_node_replication_lag_bytes gauge",
            "pgbalancer_node_replication_lag_bytes{node=\"1\",host=\"db-1\",role=\"standby\"} 128",
            "# TYPE pgbalancer_node_select_total counter",
            "pgbalancer_node_select_total{node=\"1\",host=\"db-1\",role=\"standby\"} 7",
            "# TYPE pgbalancer_node_weight gauge",
            "pgbalancer_node_weight{node=\"0\",host=\"db-0\",role=\"primary\"} 0.5",
            "# TYPE pgbalancer_pool_processes gauge",
            "pgbalancer_pool_processes 2",
            "# TYPE pgbalancer_pool_processes_active gauge",
            "pgbalancer_pool_processes_active 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        let scrape =
            prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
        assert_eq!(scrape.samples.len(), 4 + 5 * 2, "{text}");
        let lag = scrape
            .samples
            .iter()
            .find(|s| s.metric == "pgbalancer_node_replication_lag_bytes")
            .unwrap();
        assert!(lag.labels.get("host").is_some_and(|h| h.starts_with("db-")));
        let selects = scrape
            .samples
            .iter()
            .find(|s| s.metric == "pgbalancer_node_select_total")
            .unwrap();
        assert!(matches!(selects.value, prometheus_parse::Value::Counter(v) if v == 7.0));
    }

    #[test]
    fn label_values_are_escaped() {
        let nodes = vec![node(3, "a\"b\\c", "standby", "up")];
        let text = render(&Snapshot {
            pgpool_up: true,
            restarts: 0,
            nodes: &nodes,
            processes: &[],
        });
        assert!(
            text.contains(
                "pgbalancer_node_up{node=\"3\",host=\"a\\\"b\\\\c\",role=\"standby\"} 1\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn an_unknown_value_leaves_out_the_node_sample_not_zero() {
        let mut unknown = node(1, "db-1", "standby", "up");
        unknown.select_count = None;
        unknown.replication_delay = None;
        let nodes = vec![node(0, "db-0", "primary", "up"), unknown];
        let text = render(&Snapshot {
            pgpool_up: true,
            restarts: 0,
            nodes: &nodes,
            processes: &[],
        });
        let samples = |metric: &str| {
            text.lines()
                .filter(|l| l.starts_with(&format!("{metric}{{")))
                .count()
        };
        assert_eq!(samples("pgbalancer_node_up"), 2, "{text}");
        assert_eq!(samples("pgbalancer_node_select_total"), 1, "{text}");
        assert_eq!(
            samples("pgbalancer_node_replication_lag_bytes"),
            1,
            "{text}"
        );
    }

    #[test]
    fn pgpool_down_leaves_only_the_unlabelled_series() {
        let text = render(&Snapshot {
            pgpool_up: false,
            restarts: 5,
            nodes: &[],
            processes: &[],
        });
        let samples: Vec<_> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            samples,
            [
                "pgbalancer_pgpool_up 0",
                "pgbalancer_pgpool_restarts_total 5",
                "pgbalancer_pool_processes 0",
                "pgbalancer_pool_processes_active 0",
            ]
        );
    }
}
