//! Makes pgpool look for the primary again when it names none although an attached server
//! accepts writes.
//!
//! pgpool searches for the primary only when a node is detached or attached, for at most
//! `search_primary_node_timeout` attempts, and never again after a search that found nothing.
//! A search that ran while no attached server was writable (the old primary detached before
//! the operator promoted its replacement, and the promotion took longer than the search; a
//! primary that did not answer while a standby was attached) leaves pgpool with no primary
//! for good: writes go to whichever node it takes for the main one, replication delay is no
//! longer checked, and the agent's health check fails, so the balancer leaves its Service.
//!
//! Once pgpool has named no primary for [`AFTER`] (longer than its own search) while exactly
//! one attached, configured server answers as writable, the agent detaches and attaches a
//! standby that is up (or that server itself when no standby is): every attach makes pgpool
//! search, and it finds that server. Only sessions reading from the cycled standby end. With
//! two writable servers nothing is done: which one is the primary is the operator's call.

use std::time::{Duration, Instant};

use super::pgpool;
use super::Agent;
use crate::pool_node::PoolNode;

/// How long pgpool may name no primary before the agent makes it search again (longer than
/// pgpool's own search of 10 attempts a second apart), and the least time between two such
/// searches; it doubles after each search that did not help, up to eight times.
pub const AFTER: Duration = Duration::from_secs(15);

/// How often the servers are asked again while pgpool names no primary but no search would
/// help (no server or two of them writable: a primary down with failover off, a promotion
/// still to come).
pub const LOOK_AGAIN: Duration = Duration::from_secs(3);

/// Since when pgpool names no primary, when the agent last asked the servers and last made
/// pgpool search, and how many searches in a row did not help.
#[derive(Debug, Default)]
pub struct Watch {
    since: Option<Instant>,
    looked: Option<Instant>,
    last: Option<Instant>,
    searches: u32,
}

impl Watch {
    /// Records one reading of the nodes at `now`; true when a search is due.
    pub fn due(&mut self, nodes: &[PoolNode], now: Instant) -> bool {
        let named = nodes.iter().any(|n| n.role == "primary" && n.is_up());
        let any_up = nodes.iter().any(PoolNode::is_up);
        if named || !any_up {
            *self = Watch::default();
            return false;
        }
        let since = *self.since.get_or_insert(now);
        let wait = AFTER * (1 << self.searches.min(3));
        now.duration_since(since) >= AFTER
            && self
                .looked
                .is_none_or(|l| now.duration_since(l) >= LOOK_AGAIN)
            && self.last.is_none_or(|l| now.duration_since(l) >= wait)
    }

    /// Marks the servers asked at `now`.
    pub fn looked(&mut self, now: Instant) {
        self.looked = Some(now);
    }

    /// Marks a search made at `now`.
    pub fn searched(&mut self, now: Instant) {
        self.last = Some(now);
        self.searches += 1;
    }
}

/// The node to detach and attach and the writable one, given the configured nodes that are
/// up and what each answered (`Some(true)`: a standby, `Some(false)`: writable, `None`: no
/// answer). `None` unless exactly one of them is writable.
pub fn node_to_cycle(answers: &[(u32, Option<bool>)]) -> Option<(u32, u32)> {
    let writable: Vec<u32> = answers
        .iter()
        .filter(|(_, a)| *a == Some(false))
        .map(|(slot, _)| *slot)
        .collect();
    let [primary] = writable[..] else {
        return None;
    };
    let cycle = answers
        .iter()
        .find(|(_, a)| *a == Some(true))
        .map_or(primary, |(slot, _)| *slot);
    Some((cycle, primary))
}

/// Detaches and attaches `slot`, so pgpool searches for the primary again.
pub async fn search_again(agent: &Agent, slot: u32, primary_host: &str) {
    tracing::warn!(
        node = slot,
        primary = primary_host,
        "pgpool names no primary although an attached server accepts writes: detaching and \
         attaching node {slot} so that it searches again"
    );
    for tool in ["pcp_detach_node", "pcp_attach_node"] {
        if let Err(e) = pgpool::pcp(&agent.config, tool, Some(slot)).await {
            tracing::warn!(node = slot, error = pgpool::report(&e), "{tool} failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(slot: u32, status: &str, role: &str) -> PoolNode {
        PoolNode {
            slot,
            status: status.into(),
            role: role.into(),
            ..PoolNode::default()
        }
    }

    #[test]
    fn a_search_is_due_only_after_a_while_with_no_primary_and_not_again_at_once() {
        let t = Instant::now();
        let headless = [node(0, "up", "standby"), node(1, "up", "standby")];
        let mut w = Watch::default();
        assert!(!w.due(&headless, t));
        assert!(!w.due(&headless, t + AFTER / 2));
        assert!(w.due(&headless, t + AFTER));
        w.searched(t + AFTER);
        assert!(!w.due(&headless, t + AFTER + AFTER / 2));
        // The wait doubles while searching does not help: 2, 4, then 8 times, no more.
        assert!(!w.due(&headless, t + AFTER * 2));
        assert!(w.due(&headless, t + AFTER * 3));
        w.searched(t + AFTER * 3);
        assert!(!w.due(&headless, t + AFTER * 6));
        assert!(w.due(&headless, t + AFTER * 7));
        w.searched(t + AFTER * 7);
        assert!(w.due(&headless, t + AFTER * 15));
        w.searched(t + AFTER * 15);
        assert!(!w.due(&headless, t + AFTER * 22));
        assert!(w.due(&headless, t + AFTER * 23));
    }

    #[test]
    fn servers_are_asked_again_only_every_few_seconds_while_no_search_would_help() {
        let t = Instant::now();
        let headless = [node(0, "up", "standby"), node(1, "up", "standby")];
        let mut w = Watch::default();
        assert!(!w.due(&headless, t));
        assert!(w.due(&headless, t + AFTER));
        w.looked(t + AFTER);
        assert!(!w.due(&headless, t + AFTER + LOOK_AGAIN / 2));
        assert!(w.due(&headless, t + AFTER + LOOK_AGAIN));
    }

    #[test]
    fn a_named_primary_or_no_node_up_resets_the_watch() {
        let t = Instant::now();
        let headless = [node(0, "up", "standby"), node(1, "up", "standby")];
        let mut w = Watch::default();
        assert!(!w.due(&headless, t));
        assert!(!w.due(
            &[node(0, "up", "primary"), node(1, "up", "standby")],
            t + AFTER
        ));
        assert!(!w.due(&headless, t + AFTER * 2));
        assert!(!w.due(&[node(0, "down", "standby")], t + AFTER * 3));
        assert!(!w.due(&headless, t + AFTER * 4));
        assert!(w.due(&headless, t + AFTER * 5));
    }

    #[test]
    fn a_standby_is_cycled_when_exactly_one_server_writes() {
        assert_eq!(
            node_to_cycle(&[(0, Some(false)), (1, Some(true))]),
            Some((1, 0))
        );
        assert_eq!(node_to_cycle(&[(1, None), (2, Some(false))]), Some((2, 2)));
        assert_eq!(node_to_cycle(&[(0, Some(false)), (1, Some(false))]), None);
        assert_eq!(node_to_cycle(&[(0, Some(true)), (1, None)]), None);
    }
}
