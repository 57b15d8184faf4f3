//! What a running controller remembers about one cluster between reconciles, and the small
//! decisions around `decide` that only a long-running loop needs. Shared by the local
//! controller (Docker) and the operator (Kubernetes). Pure: the caller passes the time;
//! nothing here reads a clock or talks to a backend.
//!
//! - how long the recorded primary has been down (reset as soon as it answers) and the WAL
//!   position it last wrote, which [`failover`] needs;
//! - whether a failover is due now, and the reason it is recorded with;
//! - since when each balancer has had every node but none it takes for the primary, while the
//!   recorded primary writes ([`Watch::unrecognised_primary`]);
//! - which of `decide`'s actions the local controller holds back ([`held_back`]; the operator
//!   holds back only what [`hold_for_failover`] does, see `backend::kube::reconcile`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::backend::{Action, Observed};
use crate::plan::{instance_name, Plan};
use crate::reconcile::{failover, hold_for_failover, primary_down, FailoverPolicy, Record};

/// What the controller remembers about one cluster's primary.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Watch {
    /// The recorded primary these measurements are about.
    primary: Option<u32>,
    /// Since when it has been seen down, continuously.
    down_since: Option<Instant>,
    /// WAL it had written when it last answered, bytes from `0/0`.
    last_primary_lsn: Option<u64>,
    /// Per balancer: since when its primary's node has been up without the balancer taking
    /// it for the primary.
    unrecognised_since: BTreeMap<u32, Instant>,
    /// Per balancer: how often that node was detached for it in a row without the balancer
    /// finding the primary since; each time the grace doubles (at most 16 times as long).
    unrecognised_repairs: BTreeMap<u32, u32>,
}

/// How long a balancer may keep the recorded primary's node up without taking it for the
/// primary before that node is detached, which makes the balancer search for the primary
/// again (`decide` attaches the node back once it is down). Longer than pgpool's own search
/// (`search_primary_node_timeout`, 10 s), so a search in progress is never cut short.
pub const UNRECOGNISED_PRIMARY_GRACE: Duration = Duration::from_secs(20);

impl Watch {
    /// Takes one observation made at `now` and returns how long the recorded primary has been
    /// down without interruption (zero while it answers). A new recorded primary starts a
    /// fresh watch.
    pub fn observe(&mut self, observed: &Observed, record: &Record, now: Instant) -> Duration {
        if self.primary != record.current {
            *self = Watch {
                primary: record.current,
                ..Watch::default()
            };
        }
        if !primary_down(observed, record) {
            self.down_since = None;
            if let Some(lsn) = record
                .current
                .and_then(|c| observed.instances.get(&c))
                .filter(|seen| seen.in_recovery == Some(false))
                .and_then(|seen| seen.received_lsn)
            {
                self.last_primary_lsn = Some(lsn);
            }
            return Duration::ZERO;
        }
        now.saturating_duration_since(*self.down_since.get_or_insert(now))
    }

    /// The balancers that have had the recorded primary's node up for
    /// [`UNRECOGNISED_PRIMARY_GRACE`] (doubled after each repair that did not help) without
    /// taking it, or any node, for the primary, while
    /// that primary writes and no change of primary runs: each gets that node detached. pgpool
    /// searches for the primary only for `search_primary_node_timeout` after a node event; a
    /// search that ended while the primary did not answer (a cut network, a pod marked not
    /// ready) leaves it routing no writes until the next event. This makes that event.
    pub fn unrecognised_primary(
        &mut self,
        plan: &Plan,
        observed: &Observed,
        record: &Record,
        now: Instant,
    ) -> Vec<Action> {
        let primary = plan.primary().ordinal;
        let writes = !record.changing()
            && observed
                .instances
                .get(&primary)
                .is_some_and(|seen| seen.accepting && seen.in_recovery == Some(false));
        let mut actions = Vec::new();
        for (&index, seen) in &observed.balancers {
            // Nodes not seen this time (the local controller reads them every few ticks, an
            // agent may not answer) neither start nor end the grace.
            let Some(nodes) = seen.nodes.as_ref().filter(|_| writes && seen.running) else {
                if !writes || !seen.running {
                    self.unrecognised_since.remove(&index);
                }
                continue;
            };
            let stuck = nodes.iter().any(|n| n.slot == primary && n.is_up())
                && !nodes.iter().any(|n| n.role == "primary" && n.is_up());
            if !stuck {
                self.unrecognised_since.remove(&index);
                self.unrecognised_repairs.remove(&index);
                continue;
            }
            let since = *self.unrecognised_since.entry(index).or_insert(now);
            let repairs = self.unrecognised_repairs.get(&index).copied().unwrap_or(0);
            let grace = UNRECOGNISED_PRIMARY_GRACE * (1 << repairs.min(4));
            if now.saturating_duration_since(since) >= grace {
                self.unrecognised_since.remove(&index);
                self.unrecognised_repairs.insert(index, repairs + 1);
                actions.push(Action::DetachBackend {
                    balancer: index,
                    slot: primary,
                });
            }
        }
        self.unrecognised_since
            .retain(|index, _| observed.balancers.contains_key(index));
        self.unrecognised_repairs
            .retain(|index, _| observed.balancers.contains_key(index));
        actions
    }

    /// WAL the recorded primary had written when it last answered.
    pub fn last_primary_lsn(&self) -> Option<u64> {
        self.last_primary_lsn
    }

    /// Takes one observation made at `now` and returns the failover to record now, if one is
    /// due, and how long the recorded primary has been down. The caller checks for a
    /// [`conflict`](crate::reconcile::conflict) first: a failover is never started over one.
    pub fn failover_due(
        &mut self,
        plan: &Plan,
        observed: &Observed,
        record: &Record,
        policy: &FailoverPolicy,
        now: Instant,
    ) -> (Option<Record>, Duration) {
        let down_for = self.observe(observed, record, now);
        let due = failover(
            plan,
            observed,
            record,
            policy,
            down_for,
            self.last_primary_lsn,
        );
        (due, down_for)
    }
}

/// Why the recorded primary counts as down, for the log and `lastFailover.reason`, e.g.
/// `primary demo-0 not running (exited) for 3.0 s`.
pub fn down_reason(
    plan: &Plan,
    observed: &Observed,
    record: &Record,
    down_for: Duration,
) -> String {
    let ordinal = record.current.unwrap_or(record.target);
    let name = instance_name(&plan.cluster, ordinal);
    let what = match observed.instances.get(&ordinal) {
        None => "gone (not found)".to_owned(),
        Some(seen) if !seen.running => format!("not running ({})", seen.state),
        Some(_) => "not accepting connections".to_owned(),
    };
    format!("primary {name} {what} for {:.1} s", down_for.as_secs_f64())
}

/// The actions of `decide` the loop applies. Held back:
/// - attaching balancer nodes other than the primary's: each balancer's agent re-attaches a
///   standby that answers again and, unlike `decide`, leaves alone a node someone detached on
///   purpose; it never attaches a writable server while another node is up (it may be an old
///   primary), so the primary's node is attached from here;
/// - what [`hold_for_failover`] holds: bringing a lost primary back while a failover may still
///   start.
pub fn held_back(
    actions: Vec<Action>,
    observed: &Observed,
    record: &Record,
    policy: &FailoverPolicy,
    down_for: Duration,
) -> Vec<Action> {
    let primary = record.current.filter(|_| !record.changing());
    hold_for_failover(actions, observed, record, policy, down_for)
        .into_iter()
        .filter(|action| match *action {
            Action::AttachBackend { slot, .. } => Some(slot) == primary,
            _ => true,
        })
        .collect()
}

#[cfg(test)]
mod tests;
