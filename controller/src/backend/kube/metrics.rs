//! The operator's Prometheus metrics: reconciles, failures by reason, API writes and a
//! reconcile duration histogram. Counters are atomics; rendering is pure.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

const BUCKETS: [f64; 8] = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// Operator metrics.
#[derive(Default)]
pub struct Metrics {
    reconciles: AtomicU64,
    writes: AtomicU64,
    failures: Mutex<BTreeMap<String, u64>>,
    buckets: [AtomicU64; 8],
    duration_sum_micros: AtomicU64,
}

impl Metrics {
    /// Counts a finished reconcile and its duration.
    pub fn reconciled(&self, took: Duration) {
        self.reconciles.fetch_add(1, Ordering::Relaxed);
        let secs = took.as_secs_f64();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.duration_sum_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    /// Counts a failed reconcile by reason.
    pub fn failed(&self, reason: &str) {
        if let Ok(mut f) = self.failures.lock() {
            *f.entry(reason.to_owned()).or_default() += 1;
        }
    }

    /// Counts one write request to the API server.
    pub fn wrote(&self) {
        self.writes.fetch_add(1, Ordering::Relaxed);
    }

    /// Write requests so far.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Reconciles so far.
    pub fn reconciles(&self) -> u64 {
        self.reconciles.load(Ordering::Relaxed)
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let count = self.reconciles.load(Ordering::Relaxed);
        let _ = writeln!(out, "# HELP pgbalancer_operator_reconciles_total Reconciles run.\n# TYPE pgbalancer_operator_reconciles_total counter\npgbalancer_operator_reconciles_total {count}");
        let _ = writeln!(out, "# HELP pgbalancer_operator_api_writes_total Write requests sent to the API server.\n# TYPE pgbalancer_operator_api_writes_total counter\npgbalancer_operator_api_writes_total {}", self.writes());
        let _ = writeln!(out, "# HELP pgbalancer_operator_reconcile_failures_total Failed reconciles by reason.\n# TYPE pgbalancer_operator_reconcile_failures_total counter");
        if let Ok(f) = self.failures.lock() {
            for (reason, n) in f.iter() {
                let _ = writeln!(
                    out,
                    "pgbalancer_operator_reconcile_failures_total{{reason=\"{reason}\"}} {n}"
                );
            }
        }
        let _ = writeln!(out, "# HELP pgbalancer_operator_reconcile_duration_seconds Reconcile duration.\n# TYPE pgbalancer_operator_reconcile_duration_seconds histogram");
        for (i, bound) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "pgbalancer_operator_reconcile_duration_seconds_bucket{{le=\"{bound}\"}} {}",
                self.buckets[i].load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "pgbalancer_operator_reconcile_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "pgbalancer_operator_reconcile_duration_seconds_sum {}",
            self.duration_sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "pgbalancer_operator_reconcile_duration_seconds_count {count}"
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_parse_and_count() {
        let m = Metrics::default();
        m.reconciled(Duration::from_millis(30));
        m.reconciled(Duration::from_millis(300));
        m.failed("kube");
        m.wrote();
        let text = m.render();
        let scrape =
            prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
        let total = scrape
            .samples
            .iter()
            .find(|s| s.metric == "pgbalancer_operator_reconciles_total")
            .unwrap();
        assert!(matches!(total.value, prometheus_parse::Value::Counter(v) if v == 2.0));
        assert!(
            text.contains("pgbalancer_operator_reconcile_duration_seconds_bucket{le=\"0.05\"} 1\n")
        );
        assert!(text.contains("pgbalancer_operator_reconcile_failures_total{reason=\"kube\"} 1\n"));
    }
}
