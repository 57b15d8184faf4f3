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
