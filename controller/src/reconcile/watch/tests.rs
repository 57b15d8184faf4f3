//! Tests of the controller's memory and of what it holds back, on hand-built observations.

use std::collections::BTreeMap;

use super::*;
use crate::backend::ObservedInstance;
use crate::fixtures::{self, plan};
use crate::plan::Role;

fn serving(ordinal: u32, lsn: u64) -> ObservedInstance {
    ObservedInstance {
        received_lsn: Some(lsn),
        replayed_lsn: Some(lsn),
        ..fixtures::serving(ordinal)
    }
}

fn stopped(ordinal: u32) -> ObservedInstance {
    ObservedInstance {
        name: format!("demo-{ordinal}"),
        state: "exited".into(),
        marked: Some(Role::Primary),
        ..Default::default()
    }
}

fn observed(instances: Vec<(u32, ObservedInstance)>) -> Observed {
    Observed {
        network: true,
        instances: instances.into_iter().collect::<BTreeMap<_, _>>(),
        balancers: BTreeMap::new(),
    }
}

fn policy(delay: u64) -> FailoverPolicy {
    FailoverPolicy {
        enabled: true,
        delay: Duration::from_secs(delay),
        max_lag_bytes: 1024,
    }
}

#[test]
fn down_time_grows_while_the_primary_is_down_and_resets_once_it_answers() {
    let t0 = Instant::now();
    let record = Record::settled(0);
    let up = observed(vec![(0, serving(0, 5000)), (1, serving(1, 4900))]);
    let down = observed(vec![(0, stopped(0)), (1, serving(1, 4900))]);
    let mut watch = Watch::default();
    assert_eq!(watch.observe(&up, &record, t0), Duration::ZERO);
    assert_eq!(
        watch.observe(&down, &record, t0 + Duration::from_secs(1)),
        Duration::ZERO
    );
    assert_eq!(
        watch.observe(&down, &record, t0 + Duration::from_millis(3500)),
        Duration::from_millis(2500)
    );
    // It answered once: the next outage is measured from scratch.
    assert_eq!(
        watch.observe(&up, &record, t0 + Duration::from_secs(4)),
        Duration::ZERO
    );
    assert_eq!(
        watch.observe(&down, &record, t0 + Duration::from_secs(5)),
        Duration::ZERO
    );
    assert_eq!(
        watch.observe(&down, &record, t0 + Duration::from_secs(6)),
        Duration::from_secs(1)
    );
}

#[test]
fn a_missing_primary_container_counts_as_down() {
    let t0 = Instant::now();
    let gone = observed(vec![(1, serving(1, 10))]);
    let mut watch = Watch::default();
    watch.observe(&gone, &Record::settled(0), t0);
    assert_eq!(
        watch.observe(&gone, &Record::settled(0), t0 + Duration::from_secs(2)),
        Duration::from_secs(2)
    );
}

#[test]
fn the_last_written_lsn_comes_from_the_primary_while_it_answers() {
    let t0 = Instant::now();
    let record = Record::settled(0);
    let mut watch = Watch::default();
    assert_eq!(watch.last_primary_lsn(), None);
    watch.observe(
        &observed(vec![(0, serving(0, 7000)), (1, serving(1, 6000))]),
        &record,
        t0,
    );
    assert_eq!(watch.last_primary_lsn(), Some(7000));
    // Down: the last value is kept, never taken from a replica.
    watch.observe(
        &observed(vec![(0, stopped(0)), (1, serving(1, 6500))]),
        &record,
        t0,
    );
    assert_eq!(watch.last_primary_lsn(), Some(7000));
    // A primary that answers but is in recovery (a fenced one restarting) does not count.
    let mut recovering = serving(0, 9000);
    recovering.in_recovery = Some(true);
    watch.observe(
        &observed(vec![(0, recovering), (1, serving(1, 6500))]),
        &record,
        t0,
    );
    assert_eq!(watch.last_primary_lsn(), Some(7000));
}

#[test]
fn a_new_recorded_primary_starts_a_fresh_watch() {
    let t0 = Instant::now();
    let mut watch = Watch::default();
    let down = observed(vec![(0, stopped(0)), (1, serving(1, 10))]);
    watch.observe(
        &observed(vec![(0, serving(0, 50)), (1, serving(1, 10))]),
        &Record::settled(0),
        t0,
    );
    watch.observe(&down, &Record::settled(0), t0);
    let moved = Record::settled(1);
    let mut one = serving(1, 80);
    one.in_recovery = Some(false);
    assert_eq!(
        watch.observe(
            &observed(vec![(0, stopped(0)), (1, one)]),
            &moved,
            t0 + Duration::from_secs(9)
        ),
        Duration::ZERO
    );
    assert_eq!(watch.last_primary_lsn(), Some(80));
}

#[test]
fn the_reason_says_what_was_seen_and_for_how_long() {
    let p = plan(1);
    let record = Record::settled(0);
    let secs = Duration::from_millis(3200);
    assert_eq!(
        down_reason(&p, &observed(vec![(0, stopped(0))]), &record, secs),
        "primary demo-0 not running (exited) for 3.2 s"
    );
    assert_eq!(
        down_reason(&p, &observed(vec![]), &record, secs),
        "primary demo-0 gone (not found) for 3.2 s"
    );
    let mut hung = serving(0, 1);
    hung.accepting = false;
    assert_eq!(
        down_reason(&p, &observed(vec![(0, hung)]), &record, secs),
        "primary demo-0 not accepting connections for 3.2 s"
    );
}

#[test]
fn a_lost_primary_is_not_restarted_while_a_failover_may_still_start() {
    let down = observed(vec![(0, stopped(0)), (1, serving(1, 10))]);
    let record = Record::settled(0);
    let decided = vec![
        Action::StartInstance(0),
        Action::AttachBackend {
            balancer: 0,
            slot: 1,
        },
        Action::EnsureSlots(1),
    ];
    assert_eq!(
        held_back(
            decided.clone(),
            &down,
            &record,
            &policy(3),
            Duration::from_secs(1)
        ),
        [Action::EnsureSlots(1)]
    );
    // The delay passed and nothing could be promoted: the old primary is started again.
    assert_eq!(
        held_back(
            decided.clone(),
            &down,
            &record,
            &policy(3),
            Duration::from_secs(3)
        ),
        [Action::StartInstance(0), Action::EnsureSlots(1)]
    );
    // Failover off: the primary is started at once.
    let off = FailoverPolicy {
        enabled: false,
        ..policy(3)
    };
    assert_eq!(
        held_back(decided, &down, &record, &off, Duration::ZERO),
        [Action::StartInstance(0), Action::EnsureSlots(1)]
    );
    // A stopped replica is started at once.
    let replica_down = observed(vec![(0, serving(0, 10)), (1, stopped(1))]);
    assert_eq!(
        held_back(
            vec![Action::StartInstance(1)],
            &replica_down,
            &record,
            &policy(3),
            Duration::ZERO
        ),
        [Action::StartInstance(1)]
    );
}

#[test]
fn only_the_primary_node_is_attached_by_the_loop() {
    let up = observed(vec![(0, serving(0, 10)), (1, serving(1, 10))]);
    let attach = |slot| Action::AttachBackend { balancer: 0, slot };
    assert_eq!(
        held_back(
            vec![attach(0), attach(1)],
            &up,
            &Record::settled(0),
            &policy(3),
            Duration::ZERO
        ),
        [attach(0)]
    );
}

fn with_balancer(mut observed: Observed, roles: &[(u32, &str, &str)]) -> Observed {
    let nodes = roles
        .iter()
        .map(|&(slot, status, role)| crate::backend::PoolNode {
            slot,
            host: format!("demo-{slot}"),
            status: status.into(),
            role: role.into(),
            ..Default::default()
        })
        .collect();
    observed.balancers.insert(
        0,
        crate::backend::ObservedBalancer {
            name: "demo-balancer".into(),
            running: true,
            nodes: Some(nodes),
            ..Default::default()
        },
    );
    observed
}

#[test]
fn a_balancer_that_has_the_primary_up_but_not_as_primary_gets_it_detached_after_the_grace() {
    let p = plan(1);
    let record = Record::settled(0);
    let instances = || vec![(0, serving(0, 5000)), (1, serving(1, 5000))];
    let stuck = with_balancer(
        observed(instances()),
        &[(0, "up", "standby"), (1, "up", "standby")],
    );
    let t0 = Instant::now();
    let mut watch = Watch::default();
    assert!(watch
        .unrecognised_primary(&p, &stuck, &record, t0)
        .is_empty());
    let almost = t0 + UNRECOGNISED_PRIMARY_GRACE - Duration::from_secs(1);
    assert!(watch
        .unrecognised_primary(&p, &stuck, &record, almost)
        .is_empty());
    let due = t0 + UNRECOGNISED_PRIMARY_GRACE;
    assert_eq!(
        watch.unrecognised_primary(&p, &stuck, &record, due),
        [Action::DetachBackend {
            balancer: 0,
            slot: 0
        }]
    );
    // Once acted on, the grace starts again, twice as long while it did not help.
    assert!(watch
        .unrecognised_primary(&p, &stuck, &record, due + Duration::from_secs(1))
        .is_empty());
    let second = due + Duration::from_secs(1) + UNRECOGNISED_PRIMARY_GRACE;
    assert!(watch
        .unrecognised_primary(&p, &stuck, &record, second)
        .is_empty());
    let second = due + Duration::from_secs(1) + UNRECOGNISED_PRIMARY_GRACE * 2;
    assert_eq!(
        watch
            .unrecognised_primary(&p, &stuck, &record, second)
            .len(),
        1
    );

    // Ticks that do not see the nodes keep the grace running.
    let mut watch = Watch::default();
    let mut unseen = stuck.clone();
    unseen.balancers.get_mut(&0).unwrap().nodes = None;
    assert!(watch
        .unrecognised_primary(&p, &stuck, &record, t0)
        .is_empty());
    assert!(watch
        .unrecognised_primary(&p, &unseen, &record, almost)
        .is_empty());
    assert_eq!(
        watch.unrecognised_primary(&p, &stuck, &record, due).len(),
        1
    );

    // A balancer that finds the primary in between starts a fresh grace.
    let mut watch = Watch::default();
    let fine = with_balancer(
        observed(instances()),
        &[(0, "up", "primary"), (1, "up", "standby")],
    );
    assert!(watch
        .unrecognised_primary(&p, &stuck, &record, t0)
        .is_empty());
    assert!(watch
        .unrecognised_primary(&p, &fine, &record, almost)
        .is_empty());
    assert!(watch
        .unrecognised_primary(&p, &stuck, &record, due)
        .is_empty());
}

#[test]
fn no_primary_in_the_balancer_is_left_alone_while_the_primary_changes_or_does_not_write() {
    let p = plan(1);
    let t0 = Instant::now();
    let later = t0 + UNRECOGNISED_PRIMARY_GRACE * 2;
    let roles = [(0, "up", "standby"), (1, "up", "standby")];
    // A change of primary runs: the balancer's search is part of it.
    let mut changing = Record::settled(0);
    changing.target = 1;
    let stuck = with_balancer(
        observed(vec![(0, serving(0, 5)), (1, serving(1, 5))]),
        &roles,
    );
    let mut watch = Watch::default();
    assert!(watch
        .unrecognised_primary(&p, &stuck, &changing, t0)
        .is_empty());
    assert!(watch
        .unrecognised_primary(&p, &stuck, &changing, later)
        .is_empty());
    // The recorded primary does not answer: that is the failover's business.
    let lost = with_balancer(observed(vec![(0, stopped(0)), (1, serving(1, 5))]), &roles);
    let mut watch = Watch::default();
    let record = Record::settled(0);
    assert!(watch
        .unrecognised_primary(&p, &lost, &record, t0)
        .is_empty());
    assert!(watch
        .unrecognised_primary(&p, &lost, &record, later)
        .is_empty());
    // The primary's node is down: `decide` attaches it, which makes the balancer search.
    let down = with_balancer(
        observed(vec![(0, serving(0, 5)), (1, serving(1, 5))]),
        &[(0, "down", "standby"), (1, "up", "standby")],
    );
    assert!(watch
        .unrecognised_primary(&p, &down, &record, t0)
        .is_empty());
    assert!(watch
        .unrecognised_primary(&p, &down, &record, later)
        .is_empty());
}
