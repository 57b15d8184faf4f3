//! `pgbalancer controller run`: the long-running loop of local mode (IO), so that clusters
//! stay converged and fail over with no command running. `up` starts it in a container (see
//! `backend::docker::controller`).
//!
//! Every tick (500 ms apart), for each cluster stored in the state directory, concurrently:
//! skip it when a command holds its lock, when its state file is gone (`down`) or when it was
//! stopped with `down --keep-data`; observe; on a conflict log and touch nothing; advance the
//! record of the primary (saved when it changes); measure how long the recorded primary has
//! been down; when `reconcile::failover` says so, save the new record (with why and when)
//! before anything else; then apply one decision, as one iteration of `reconcile::converge`
//! would. Errors are logged and retried on the next tick; nothing stops the loop but SIGTERM
//! or SIGINT.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bollard::Docker;
use futures::future::join_all;
use tokio::signal::unix::{signal, SignalKind};

use super::ops::OpError;
use super::state::LastFailover;
use super::state::StateDir;
use crate::backend::docker::DockerBackend;
use crate::backend::{Action, Backend, BackendError};
use crate::reconcile::watch::{down_reason, held_back, Watch};
use crate::reconcile::{apply_all, conflict, decide, FailoverPolicy};
use crate::status;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// Pause between two ticks.
pub const TICK: Duration = Duration::from_millis(500);

/// Longest the loop waits for a balancer to answer a probe: while the primary is lost pgpool
/// holds new sessions for seconds, and the instances must still be observed every tick.
const BALANCER_PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// Balancers are probed over SQL one tick in this many: the loop only needs their node list
/// for repairs (a missing backend slot), which can wait a few seconds, and every probe is a
/// new pgpool session. Failover needs only the instances, seen every tick.
const BALANCER_PROBE_EVERY: u64 = 10;

/// Longest one cluster's tick may take (a fence waits up to 30 s for a clean shutdown);
/// past it the tick is abandoned and the next one starts over from a fresh observation.
const CLUSTER_TICK_LIMIT: Duration = Duration::from_secs(120);

/// What the loop remembers about one cluster between ticks.
#[derive(Debug, Default)]
struct Memory {
    watch: Watch,
    /// The last problem logged, so a persisting one is logged once.
    last_problem: Option<String>,
    /// The last actions applied, so a repeated decision is logged once.
    last_actions: Vec<Action>,
    /// Ticks so far.
    ticks: u64,
}

impl Memory {
    fn problem(&mut self, cluster: &str, problem: String) {
        if self.last_problem.as_deref() != Some(problem.as_str()) {
            tracing::warn!(%cluster, %problem, "not acting on the cluster");
        } else {
            tracing::debug!(%cluster, %problem, "still not acting on the cluster");
        }
        self.last_problem = Some(problem);
    }
}

/// Runs the loop over the clusters of `state` until SIGTERM or SIGINT.
pub async fn run(docker: Docker, state: StateDir) -> Result<(), OpError> {
    let mut term = signal(SignalKind::terminate()).map_err(OpError::Signal)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(OpError::Signal)?;
    tracing::info!(state_dir = %state.root().display(), "controller started");
    let mut memory: BTreeMap<String, Memory> = BTreeMap::new();
    loop {
        // A tick cut short by a signal is safe: every record is saved before it is acted on
        // and every action can be repeated.
        tokio::select! {
            _ = term.recv() => break,
            _ = interrupt.recv() => break,
            () = async {
                tick(&docker, &state, &mut memory).await;
                tokio::time::sleep(TICK).await;
            } => {}
        }
    }
    tracing::info!("controller stopped");
    Ok(())
}

/// One pass over every stored cluster.
async fn tick(docker: &Docker, state: &StateDir, memory: &mut BTreeMap<String, Memory>) {
    let names = match state.names() {
        Ok(names) => names,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list the stored clusters");
            return;
        }
    };
    memory.retain(|name, _| names.contains(name));
    for name in names {
        memory.entry(name).or_default();
    }
    let runs = memory.iter_mut().map(|(name, mem)| async move {
        match tokio::time::timeout(CLUSTER_TICK_LIMIT, tick_cluster(docker, state, name, mem)).await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => mem.problem(name, error_chain(&e)),
            Err(_) => mem.problem(
                name,
                format!(
                    "one step took over {} s; starting over",
                    CLUSTER_TICK_LIMIT.as_secs()
                ),
            ),
        }
    });
    join_all(runs).await;
}

/// One tick of one cluster.
async fn tick_cluster(
    docker: &Docker,
    state: &StateDir,
    name: &str,
    mem: &mut Memory,
) -> Result<(), OpError> {
    // A command is working on it: it converges the cluster itself.
    let Some(_lock) = state.try_lock(name)? else {
        return Ok(());
    };
    // Removed (`down`) since the directory was listed, or stopped with `--keep-data`.
    let Some(mut stored) = state.load(name)? else {
        return Ok(());
    };
    if stored.stopped {
        return Ok(());
    }
    let plan = stored.plan();
    let probe_balancers = mem.ticks.is_multiple_of(BALANCER_PROBE_EVERY);
    mem.ticks += 1;
    let backend = DockerBackend::new(docker.clone(), stored.credentials.clone())
        .with_balancer_probe(probe_balancers.then_some(BALANCER_PROBE_TIMEOUT));
    let started = Instant::now();
    let observed = backend.observe(&plan).await?;
    let observed_in = started.elapsed();
    let mut record = stored.record();
    // Conditions only from ticks that probed the balancers: on the others their routing is
    // not seen, and the conditions would flap.
    if probe_balancers {
        let computed = status::compute(
            &plan,
            &observed,
            &record,
            Some(&stored.previous_status()),
            None,
            Time(k8s_openapi::jiff::Timestamp::now()),
        );
        if computed.conditions != stored.conditions {
            stored.conditions = computed.conditions;
            state.save(&stored)?;
        }
    }
    if let Some(conflict) = conflict(&plan, &observed, &record) {
        mem.problem(name, conflict);
        return Ok(());
    }
    let advanced = record.advance(&observed);
    if advanced != record {
        if record.changing() {
            tracing::info!(
                cluster = %name,
                primary = %crate::plan::instance_name(name, advanced.target),
                kind = ?record.kind,
                "change of primary finished"
            );
        }
        record = advanced;
        stored.set_record(&record);
        state.save(&stored)?;
    }
    let policy = FailoverPolicy::of(&stored.cluster.spec.failover);
    let (due, down_for) =
        mem.watch
            .failover_due(&plan, &observed, &record, &policy, Instant::now());
    if let Some(next) = due {
        let reason = down_reason(&plan, &observed, &record, down_for);
        let last = LastFailover::new(&plan, &next, reason, now_rfc3339());
        stored.set_record(&next);
        stored.last_failover = Some(last.clone());
        // Saved before anything is done: a controller that stops now resumes the failover.
        state.save(&stored)?;
        tracing::warn!(
            cluster = %name,
            from = %last.from,
            to = %last.to,
            reason = %last.reason,
            "failing over"
        );
        // Acted on from the next tick, as the operator does: between the two the cluster is
        // visibly FailingOver, and a command (or a restarted controller) may take over.
        return Ok(());
    }
    let actions = held_back(
        decide(&plan, &observed, &record),
        &observed,
        &record,
        &policy,
        down_for,
    );
    if actions != mem.last_actions {
        for action in &actions {
            tracing::info!(cluster = %name, %action, "applying");
        }
    }
    let results = apply_all(&backend, &plan, &actions).await;
    tracing::debug!(
        cluster = %name,
        observe_ms = observed_in.as_millis() as u64,
        tick_ms = started.elapsed().as_millis() as u64,
        actions = mem.last_actions.len().max(actions.len()),
        "tick"
    );
    mem.last_actions = actions;
    let mut failed = Vec::new();
    for (action, result) in results {
        match result {
            Ok(()) => {}
            Err(e) if e.is_transient() => {
                tracing::debug!(cluster = %name, %action, error = %e, "will retry")
            }
            Err(e) => failed.push(format!("{action}: {}", error_chain(&e))),
        }
    }
    if failed.is_empty() {
        mem.last_problem = None;
    } else {
        mem.problem(name, failed.join("; "));
    }
    Ok(())
}

/// Now, as RFC 3339 in UTC to the second.
fn now_rfc3339() -> String {
    format!("{:.0}", k8s_openapi::jiff::Timestamp::now())
}

/// An error and its causes on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failover_times_are_rfc3339_utc_to_the_second() {
        let at = now_rfc3339();
        let parsed: k8s_openapi::jiff::Timestamp = at.parse().unwrap();
        assert!(at.ends_with('Z') && !at.contains('.'), "{at}");
        assert_eq!(format!("{parsed:.0}"), at);
    }
}
