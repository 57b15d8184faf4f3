//! Prometheus text exposition of the balancer's state. Pure: nodes and counters in, text out.

use std::fmt::Write;

use super::pgpool::{Node, Process};

/// Everything `/metrics` reports.
pub struct Snapshot<'a> {
    /// pgpool answers SQL.
    pub pgpool_up: bool,
    /// Restarts of pgpool by the agent.
    pub restarts: u64,
    /// Backends.
    pub nodes: &'a [Node],
    /// Pool processes.
    pub processes: &'a [Process],
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The exposition text: each family's HELP and TYPE, then all of its samples.
pub fn render(s: &Snapshot<'_>) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, String)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let per_node = |value: &dyn Fn(&Node) -> String| -> Vec<(String, String)> {
        s.nodes
            .iter()
            .map(|n| {
                let labels = format!(
                    "{{node=\"{}\",host=\"{}\",role=\"{}\"}}",
                    n.id,
                    escape(&n.host),
                    escape(&n.role)
                );
                (labels, value(n))
            })
            .collect()
    };
    let single = |v: String| vec![(String::new(), v)];
    family(
        "pgbalancer_pgpool_up",
        "gauge",
        "1 when pgpool answers SQL.",
        single(u8::from(s.pgpool_up).to_string()),
    );
    family(
        "pgbalancer_pgpool_restarts_total",
        "counter",
        "Times the agent restarted pgpool.",
        single(s.restarts.to_string()),
    );
    family(
        "pgbalancer_node_up",
        "gauge",
        "1 when the backend node takes queries.",
        per_node(&|n| u8::from(n.is_up()).to_string()),
    );
    family(
        "pgbalancer_node_primary",
        "gauge",
        "1 when the backend node is the primary.",
        per_node(&|n| u8::from(n.role == "primary").to_string()),
    );
    family(
        "pgbalancer_node_replication_lag_bytes",
        "gauge",
        "Replication delay of the node in bytes.",
        per_node(&|n| n.replication_delay.to_string()),
    );
    family(
        "pgbalancer_node_select_total",
        "counter",
        "SELECT statements routed to the node.",
        per_node(&|n| n.select_cnt.to_string()),
    );
    family(
        "pgbalancer_node_weight",
        "gauge",
        "Normalised load-balance weight of the node.",
        per_node(&|n| n.lb_weight.to_string()),
    );
    family(
        "pgbalancer_pool_processes",
        "gauge",
        "Pool processes (num_init_children).",
        single(s.processes.len().to_string()),
    );
    family(
        "pgbalancer_pool_processes_active",
        "gauge",
        "Pool processes serving a client.",
        single(
            s.processes
                .iter()
                .filter(|p| p.is_active())
                .count()
                .to_string(),
        ),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_have_help_type_and_one_sample_per_node() {
        let nodes = vec![Node {
            id: 1,
            host: "db-1".into(),
            port: 5432,
            status: "up".into(),
            lb_weight: 0.5,
            role: "standby".into(),
            select_cnt: 7,
            replication_delay: 128,
            replication_state: "streaming".into(),
            last_status_change: String::new(),
        }];
        let procs = vec![
            Process {
                pid: "1".into(),
                status: "Idle".into(),
            },
            Process {
                pid: "2".into(),
                status: "Wait for connection".into(),
            },
        ];
        let text = render(&Snapshot {
            pgpool_up: true,
            restarts: 2,
            nodes: &nodes,
            processes: &procs,
        });
        assert!(text.contains("# TYPE pgbalancer_node_up gauge\n"));
        assert!(text.contains("pgbalancer_node_replication_lag_bytes{node=\"1\",host=\"db-1\",role=\"standby\"} 128\n"));
        assert!(text.contains("pgbalancer_pool_processes_active 1\n"));
        assert!(text.contains("pgbalancer_pgpool_restarts_total 2\n"));
        let scrape =
            prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
        assert_eq!(scrape.samples.len(), 9);
        let lag = scrape
            .samples
            .iter()
            .find(|s| s.metric == "pgbalancer_node_replication_lag_bytes")
            .unwrap();
        assert_eq!(lag.labels.get("host"), Some("db-1"));
    }
}
