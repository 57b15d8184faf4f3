//! The operator's Prometheus metrics: reconciles, failures by reason, API writes, failovers by
//! kind and a reconcile duration histogram, kept in one `prometheus-client` registry and
//! rendered in the Prometheus text format (version 0.0.4), served as [`CONTENT_TYPE`].

use std::time::Duration;

use prometheus_client::encoding::{prometheus_text, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// `Content-Type` of [`Metrics::render`]'s output: the Prometheus text format, version 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Upper bounds of the reconcile duration buckets, in seconds.
const BUCKETS: [f64; 8] = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// Label of `pgbalancer_operator_reconcile_failures_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    reason: String,
}

/// Labels of `pgbalancer_operator_api_writes_total`: the request's verb (`apply`, `create`,
/// `patch`, `delete`) and the kind of object it wrote (`StatefulSet`, `Pod`, `status`…).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WriteLabels {
    verb: &'static str,
    object: &'static str,
}

/// Label of `pgbalancer_failovers_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailoverLabels {
    kind: String,
}

/// Operator metrics. The handles share their values with the registry, so counting is lock-free
/// for the plain counters and rendering always sees the latest values.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    writes: Family<WriteLabels, Counter>,
    /// All writes, whatever their labels (not registered: the family's sum).
    writes_total: Counter,
    failures: Family<FailureLabels, Counter>,
    duration: Histogram,
    failovers: Family<FailoverLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let reconciles = Counter::default();
        let writes = Family::<WriteLabels, Counter>::default();
        let failures = Family::<FailureLabels, Counter>::default();
        let duration = Histogram::new(BUCKETS);
        let failovers = Family::<FailoverLabels, Counter>::default();
        let mut registry = Registry::default();
        // Counters are registered without `_total` and help texts without their final full stop:
        // the encoder appends both.
        registry.register(
            "pgbalancer_operator_reconciles",
            "Reconciles run",
            reconciles.clone(),
        );
        registry.register(
            "pgbalancer_operator_api_writes",
            "Write requests sent to the API server, by verb and object",
            writes.clone(),
        );
        registry.register(
            "pgbalancer_operator_reconcile_failures",
            "Failed reconciles by reason",
            failures.clone(),
        );
        registry.register(
            "pgbalancer_operator_reconcile_duration_seconds",
            "Reconcile duration",
            duration.clone(),
        );
        registry.register(
            "pgbalancer_failovers",
            "Primary changes by kind (failover or switchover)",
            failovers.clone(),
        );
        Metrics {
            registry,
            reconciles,
            writes,
            writes_total: Counter::default(),
            failures,
            duration,
            failovers,
        }
    }
}

impl Metrics {
    /// Counts a finished reconcile and its duration.
    pub fn reconciled(&self, took: Duration) {
        self.reconciles.inc();
        self.duration.observe(took.as_secs_f64());
    }

    /// Counts a failed reconcile by reason.
    pub fn failed(&self, reason: &str) {
        self.failures
            .get_or_create(&FailureLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Counts one write request to the API server: `verb` is `apply`, `create`, `patch` or
    /// `delete`; `object` the kind written (`status` for the cluster's status subresource).
    pub fn wrote(&self, verb: &'static str, object: &'static str) {
        self.writes
            .get_or_create(&WriteLabels { verb, object })
            .inc();
        self.writes_total.inc();
    }

    /// Counts a change of primary: `kind` is `failover` (the primary was lost) or `switchover`
    /// (planned). Exposed as `pgbalancer_failovers_total{kind="…"}`.
    pub fn failover(&self, kind: &str) {
        self.failovers
            .get_or_create(&FailoverLabels {
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// Write requests so far.
    pub fn writes(&self) -> u64 {
        self.writes_total.get()
    }

    /// Reconciles so far.
    pub fn reconciles(&self) -> u64 {
        self.reconciles.get()
    }

    /// Prometheus text exposition. A labelled family with no series yet (no failure, no
    /// failover) is left out entirely.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_text::encode(&mut out, &self.registry)
            .expect("encoding into a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_lines(text: &str, lines: &[&str]) {
        for line in lines {
            assert!(
                text.lines().any(|l| l == *line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn metrics_parse_and_count() {
        let m = Metrics::default();
        // Binary fractions, so the sum is exact.
        m.reconciled(Duration::from_micros(31_250));
        m.reconciled(Duration::from_millis(500));
        m.failed("kube_api");
        m.failed("kube_api");
        m.failed("invalid_spec");
        m.wrote("apply", "StatefulSet");
        m.wrote("patch", "status");
        m.wrote("patch", "status");
        assert_eq!((m.reconciles(), m.writes()), (2, 3));
        let text = m.render();
        assert_lines(
            &text,
            &[
                "# HELP pgbalancer_operator_reconciles_total Reconciles run.",
                "# TYPE pgbalancer_operator_reconciles_total counter",
                "pgbalancer_operator_reconciles_total 2",
                "# TYPE pgbalancer_operator_api_writes_total counter",
                "pgbalancer_operator_api_writes_total{verb=\"apply\",object=\"StatefulSet\"} 1",
                "pgbalancer_operator_api_writes_total{verb=\"patch\",object=\"status\"} 2",
                "# TYPE pgbalancer_operator_reconcile_failures_total counter",
                "pgbalancer_operator_reconcile_failures_total{reason=\"kube_api\"} 2",
                "pgbalancer_operator_reconcile_failures_total{reason=\"invalid_spec\"} 1",
                "# TYPE pgbalancer_operator_reconcile_duration_seconds histogram",
                "pgbalancer_operator_reconcile_duration_seconds_bucket{le=\"0.01\"} 0",
                "pgbalancer_operator_reconcile_duration_seconds_bucket{le=\"0.05\"} 1",
                "pgbalancer_operator_reconcile_duration_seconds_bucket{le=\"0.25\"} 1",
                "pgbalancer_operator_reconcile_duration_seconds_bucket{le=\"0.5\"} 2",
                "pgbalancer_operator_reconcile_duration_seconds_bucket{le=\"1\"} 2",
                "pgbalancer_operator_reconcile_duration_seconds_bucket{le=\"10\"} 2",
                "pgbalancer_operator_reconcile_duration_seconds_bucket{le=\"+Inf\"} 2",
                "pgbalancer_operator_reconcile_duration_seconds_sum 0.53125",
                "pgbalancer_operator_reconcile_duration_seconds_count 2",
            ],
        );
        assert!(!text.contains("pgbalancer_failovers"), "{text}");
        let scrape =
            prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
        let total = scrape
            .samples
            .iter()
            .find(|s| s.metric == "pgbalancer_operator_reconciles_total")
            .unwrap();
        assert!(matches!(total.value, prometheus_parse::Value::Counter(v) if v == 2.0));
        // 1 counter, 2 write series, 2 failure reasons, 9 buckets, sum and count.
        let samples = text.lines().filter(|l| !l.starts_with('#')).count();
        assert_eq!(samples, 1 + 2 + 2 + 9 + 2, "{text}");
    }

    #[test]
    fn failovers_are_counted_by_kind() {
        let m = Metrics::default();
        m.failover("failover");
        m.failover("switchover");
        m.failover("switchover");
        let text = m.render();
        assert_lines(
            &text,
            &[
                "# HELP pgbalancer_failovers_total Primary changes by kind (failover or switchover).",
                "# TYPE pgbalancer_failovers_total counter",
                "pgbalancer_failovers_total{kind=\"failover\"} 1",
                "pgbalancer_failovers_total{kind=\"switchover\"} 2",
            ],
        );
    }

    #[test]
    fn fresh_metrics_expose_zeroes() {
        let text = Metrics::default().render();
        let samples: Vec<_> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(samples.len(), 1 + 9 + 2, "{text}");
        assert_lines(
            &text,
            &[
                "pgbalancer_operator_reconciles_total 0",
                "pgbalancer_operator_reconcile_duration_seconds_count 0",
            ],
        );
    }
}
