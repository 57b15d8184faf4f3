//! What a running controller remembers about one cluster between reconciles, and the small
//! decisions around `decide` that only a long-running loop needs. Shared by the local
//! controller (Docker) and the operator (Kubernetes). Pure: the caller passes the time;
//! nothing here reads a clock or talks to a backend.
//!
//! - how long the recorded primary has been down (reset as soon as it answers) and the WAL
//!   position it last wrote, which [`failover`] needs;
//! - whether a failover is due now, and the reason it is recorded with;
//! - which of `decide`'s actions the local controller holds back ([`held_back`]; the operator
//!   holds back only what [`hold_for_failover`] does, see `backend::kube::reconcile`).

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
}

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
