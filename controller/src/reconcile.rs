//! The reconcile core shared by every backend: from a plan and an observation, decide the
//! next actions (pure), apply them, and repeat until the cluster matches the plan.
//!
//! Ordering rules live here and only here: the network first; instances created together
//! (replicas wait for the primary themselves); the balancer only once every instance is ready,
//! so that pgpool never marks a still-cloning replica down; a removed instance is detached
//! from every balancer before it is deleted; the primary is never removed (the plan always
//! holds it).

use std::time::{Duration, Instant};

use futures::future::join_all;
use thiserror::Error;

use crate::backend::{Action, Backend, BackendError, Observed};
use crate::plan::{Plan, Role};

/// Why a cluster did not converge.
#[derive(Debug, Error)]
pub enum ConvergeError<E: std::error::Error + 'static> {
    /// The backend failed in a way retrying does not fix.
    #[error("{action} failed")]
    Apply {
        action: String,
        #[source]
        source: E,
    },
    /// Observation failed.
    #[error("cannot observe the cluster")]
    Observe(#[source] E),
    /// Still not ready when time ran out.
    #[error("not ready after {seconds} s: {pending}")]
    Timeout { seconds: u64, pending: String },
}

/// Whether instance `ordinal` serves in its planned role.
pub fn instance_ready(plan: &Plan, observed: &Observed, ordinal: u32) -> bool {
    let (Some(inst), Some(seen)) = (plan.instance(ordinal), observed.instances.get(&ordinal))
    else {
        return false;
    };
    seen.running
        && seen.accepting
        && match inst.role {
            Role::Primary => seen.in_recovery == Some(false),
            Role::Replica => seen.in_recovery == Some(true) && seen.streaming,
        }
}

/// The next actions towards `plan`. Empty when nothing can be done but wait.
pub fn decide(plan: &Plan, observed: &Observed) -> Vec<Action> {
    if !observed.network {
        return vec![Action::EnsureNetwork];
    }
    let mut actions = Vec::new();
    for (&ordinal, seen) in &observed.instances {
        if plan.instance(ordinal).is_some() {
            continue;
        }
        let attached: Vec<Action> = observed
            .balancers
            .iter()
            .filter(|(_, b)| b.running && b.nodes.iter().any(|n| n.slot == ordinal && n.is_up()))
            .map(|(&balancer, _)| Action::DetachBackend {
                balancer,
                slot: ordinal,
            })
            .collect();
        if attached.is_empty() || !seen.running {
            actions.push(Action::RemoveInstance(ordinal));
        } else {
            actions.extend(attached);
        }
    }
    for inst in &plan.instances {
        match observed.instances.get(&inst.ordinal) {
            None => actions.push(Action::CreateInstance(inst.ordinal)),
            Some(seen) if !seen.up_to_date => actions.push(Action::ReplaceInstance(inst.ordinal)),
            Some(seen) if !seen.running && seen.state != "restarting" => {
                actions.push(Action::StartInstance(inst.ordinal))
            }
            Some(_) => {}
        }
    }
    let all_ready = plan
        .instances
        .iter()
        .all(|i| instance_ready(plan, observed, i.ordinal));
    for b in &plan.balancer.instances {
        match observed.balancers.get(&b.index) {
            None if all_ready => actions.push(Action::CreateBalancer(b.index)),
            None => {}
            Some(seen) if !seen.up_to_date => actions.push(Action::ReplaceBalancer(b.index)),
            Some(seen) if !seen.running && seen.state != "restarting" => {
                actions.push(Action::StartBalancer(b.index))
            }
            Some(seen) if seen.routing => {
                let missing = plan
                    .instances
                    .iter()
                    .any(|i| !seen.nodes.iter().any(|n| n.slot == i.ordinal));
                if missing {
                    actions.push(Action::UpdateBackends(b.index));
                    continue;
                }
                for inst in &plan.instances {
                    let down = seen
                        .nodes
                        .iter()
                        .any(|n| n.slot == inst.ordinal && !n.is_up());
                    if down && instance_ready(plan, observed, inst.ordinal) {
                        actions.push(Action::AttachBackend {
                            balancer: b.index,
                            slot: inst.ordinal,
                        });
                    }
                }
            }
            Some(_) => {}
        }
    }
    let planned_balancers = plan.balancer.instances.len() as u32;
    for &index in observed
        .balancers
        .keys()
        .filter(|i| **i >= planned_balancers)
    {
        actions.push(Action::RemoveBalancer(index));
    }
    actions
}

/// What is still missing, for progress and timeout messages. Empty when converged.
pub fn pending(plan: &Plan, observed: &Observed) -> Vec<String> {
    let mut out = Vec::new();
    for inst in &plan.instances {
        if instance_ready(plan, observed, inst.ordinal) {
            continue;
        }
        let why = match observed.instances.get(&inst.ordinal) {
            None => "not created",
            Some(s) if !s.running => "not running",
            Some(s) if !s.accepting => "not accepting connections",
            Some(s) if inst.role == Role::Primary && s.in_recovery != Some(false) => "not primary",
            Some(_) => "not streaming from the primary",
        };
        out.push(format!("{} {why}", inst.name));
    }
    for b in &plan.balancer.instances {
        match observed.balancers.get(&b.index) {
            None => out.push(format!("{} not created", b.container)),
            Some(seen) if !seen.routing => out.push(format!("{} not routing queries", b.container)),
            Some(seen) => {
                for inst in &plan.instances {
                    if !seen
                        .nodes
                        .iter()
                        .any(|n| n.slot == inst.ordinal && n.is_up())
                    {
                        out.push(format!(
                            "{} node {} ({}) not up",
                            b.container, inst.ordinal, inst.name
                        ));
                    }
                }
            }
        }
    }
    for &ordinal in observed
        .instances
        .keys()
        .filter(|o| plan.instance(**o).is_none())
    {
        out.push(format!("instance {ordinal} still to be removed"));
    }
    out
}

/// Drives `backend` until the cluster matches `plan`, reporting each action through `report`.
pub async fn converge<B: Backend>(
    backend: &B,
    plan: &Plan,
    timeout: Duration,
    mut report: impl FnMut(&str),
) -> Result<Observed, ConvergeError<B::Error>> {
    let started = Instant::now();
    let mut last_pending = String::new();
    let mut last_actions = Vec::new();
    loop {
        let observed = backend
            .observe(plan)
            .await
            .map_err(ConvergeError::Observe)?;
        let actions = decide(plan, &observed);
        let waiting = pending(plan, &observed);
        if actions.is_empty() && waiting.is_empty() {
            return Ok(observed);
        }
        if started.elapsed() > timeout {
            return Err(ConvergeError::Timeout {
                seconds: timeout.as_secs(),
                pending: waiting.join("; "),
            });
        }
        // The network must exist before anything joins it; everything else in one decision
        // is independent and runs concurrently.
        if actions != last_actions {
            actions.iter().for_each(|a| report(&a.to_string()));
        }
        let results = join_all(
            actions
                .iter()
                .map(|&action| async move { (action, backend.apply(plan, action).await) }),
        )
        .await;
        for (action, result) in results {
            match result {
                Ok(()) => {}
                Err(e) if e.is_transient() => tracing::debug!(%action, error = %e, "will retry"),
                Err(source) => {
                    return Err(ConvergeError::Apply {
                        action: action.to_string(),
                        source,
                    })
                }
            }
        }
        let now = waiting.join("; ");
        if actions.is_empty() && !now.is_empty() && now != last_pending {
            report(&format!("waiting: {now}"));
            last_pending = now;
        }
        tokio::time::sleep(Duration::from_millis(if actions.is_empty() {
            150
        } else {
            50
        }))
        .await;
        last_actions = actions;
    }
}

#[cfg(test)]
mod tests;
