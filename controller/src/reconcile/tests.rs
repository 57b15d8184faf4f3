//! Tests of the reconcile decisions on hand-built observations.

use super::*;
use crate::backend::{ObservedInstance, PoolNode};
use crate::fixtures::{balancer, node, plan, serving as ready};
use crate::plan::Role;

/// The node list of balancer 0, which the test observation has.
fn nodes_of(observed: &mut Observed) -> &mut Vec<PoolNode> {
    observed
        .balancers
        .get_mut(&0)
        .and_then(|b| b.nodes.as_mut())
        .expect("balancer 0 with nodes")
}

fn converged(replicas: u32) -> Observed {
    Observed {
        network: true,
        instances: (0..=replicas).map(|o| (o, ready(o))).collect(),
        balancers: [(0, balancer((0..=replicas).map(|s| node(s, "up")).collect()))].into(),
    }
}

#[test]
fn empty_world_starts_with_the_network() {
    assert_eq!(
        decide(&plan(2), &Observed::default(), &Record::settled(0)),
        [Action::EnsureNetwork]
    );
}

#[test]
fn instances_are_created_together_and_the_balancer_waits_for_them() {
    let observed = Observed {
        network: true,
        ..Observed::default()
    };
    let actions = decide(&plan(2), &observed, &Record::settled(0));
    assert_eq!(
        actions,
        [
            Action::CreateInstance(0),
            Action::CreateInstance(1),
            Action::CreateInstance(2)
        ]
    );
    let mut cloning = converged(2);
    cloning.balancers.clear();
    cloning.instances.get_mut(&2).unwrap().streaming = false;
    assert_eq!(decide(&plan(2), &cloning, &Record::settled(0)), []);
    assert_eq!(
        pending(&plan(2), &cloning, &Record::settled(0))[0],
        "demo-2 not streaming from the primary"
    );
}

#[test]
fn converged_cluster_needs_nothing() {
    let observed = converged(2);
    assert!(decide(&plan(2), &observed, &Record::settled(0)).is_empty());
    assert!(pending(&plan(2), &observed, &Record::settled(0)).is_empty());
}

#[test]
fn scale_up_adds_the_slot_then_attaches_it() {
    let mut observed = converged(2);
    observed.instances.insert(3, ready(3));
    assert_eq!(
        decide(&plan(3), &observed, &Record::settled(0)),
        [Action::UpdateBackends(0)]
    );
    nodes_of(&mut observed).push(node(3, "down"));
    assert_eq!(
        decide(&plan(3), &observed, &Record::settled(0)),
        [Action::AttachBackend {
            balancer: 0,
            slot: 3
        }]
    );
}

#[test]
fn a_primary_node_down_is_attached_although_the_balancer_routes_nothing() {
    // The primary was cut off long enough for the balancer's health checks to take its node
    // down; it answers again, but the balancer has no primary and is not ready.
    let mut observed = converged(2);
    let b = observed.balancers.get_mut(&0).unwrap();
    b.routing = false;
    b.nodes.as_mut().unwrap()[0] = node(0, "down");
    assert_eq!(
        decide(&plan(2), &observed, &Record::settled(0)),
        [Action::AttachBackend {
            balancer: 0,
            slot: 0
        }]
    );
}

#[test]
fn scale_down_detaches_before_removing_and_never_touches_the_primary() {
    let mut observed = converged(2);
    let actions = decide(&plan(0), &observed, &Record::settled(0));
    assert_eq!(
        actions,
        [
            Action::DetachBackend {
                balancer: 0,
                slot: 1
            },
            Action::DetachBackend {
                balancer: 0,
                slot: 2
            }
        ]
    );
    for n in nodes_of(&mut observed) {
        if n.slot > 0 {
            n.status = "down".into();
        }
    }
    assert_eq!(
        decide(&plan(0), &observed, &Record::settled(0)),
        [Action::RemoveInstance(1), Action::RemoveInstance(2)]
    );
}

#[test]
fn changed_or_stopped_objects_are_replaced_or_started() {
    let mut observed = converged(1);
    observed.instances.get_mut(&1).unwrap().up_to_date = false;
    observed.balancers.get_mut(&0).unwrap().running = false;
    assert_eq!(
        decide(&plan(1), &observed, &Record::settled(0)),
        [Action::ReplaceInstance(1), Action::StartBalancer(0)]
    );
}

#[test]
fn a_down_node_is_attached_only_once_its_instance_is_ready() {
    let mut observed = converged(1);
    nodes_of(&mut observed)[1].status = "down".into();
    observed.instances.get_mut(&1).unwrap().streaming = false;
    assert!(decide(&plan(1), &observed, &Record::settled(0)).is_empty());
    observed.instances.get_mut(&1).unwrap().streaming = true;
    assert_eq!(
        decide(&plan(1), &observed, &Record::settled(0)),
        [Action::AttachBackend {
            balancer: 0,
            slot: 1
        }]
    );
}

fn plan_with_primary(replicas: i32, primary: u32) -> Plan {
    let text = format!(
        "apiVersion: pgbalancer.io/v1alpha1\nkind: PgBalancerCluster\nmetadata: {{name: demo}}\nspec: {{replicas: {replicas}}}\n"
    );
    Plan::new(&pgbalancer_crd::parse_documents(&text).unwrap()[0], primary)
}

fn moving(from: u32, to: u32) -> Record {
    Record {
        current: Some(from),
        target: to,
        kind: ChangeKind::Switchover,
    }
}

/// A failover from `from` to `to`, as `failover` records it.
fn failing(from: u32, to: u32) -> Record {
    Record {
        kind: ChangeKind::Failover,
        ..moving(from, to)
    }
}

#[test]
fn a_change_of_primary_detaches_then_fences_the_old_one_first() {
    let plan = plan_with_primary(2, 1);
    assert_eq!(
        decide(&plan, &converged(2), &moving(0, 1)),
        [
            Action::DetachBackend {
                balancer: 0,
                slot: 0
            },
            Action::Fence(0)
        ]
    );
    // A balancer that already let go of it (its health check did) is left alone.
    let mut observed = converged(2);
    let nodes = nodes_of(&mut observed);
    nodes.iter_mut().find(|n| n.slot == 0).unwrap().status = "down".into();
    assert_eq!(decide(&plan, &observed, &moving(0, 1)), [Action::Fence(0)]);
}

#[test]
fn the_target_is_marked_then_promoted_once_it_replayed_everything() {
    let plan = plan_with_primary(2, 1);
    let mut observed = converged(2);
    let old = observed.instances.get_mut(&0).unwrap();
    old.running = false;
    old.accepting = false;
    old.in_recovery = None;
    old.marked = Some(Role::Replica);
    // Caught up: marked and promoted in one decision, applied in that order.
    assert_eq!(
        decide(&plan, &observed, &moving(0, 1)),
        [Action::MarkRole(1), Action::Promote(1)]
    );
    let target = observed.instances.get_mut(&1).unwrap();
    target.received_lsn = Some(2000);
    target.replayed_lsn = Some(1500);
    assert_eq!(
        decide(&plan, &observed, &moving(0, 1)),
        [Action::MarkRole(1)]
    );
    observed.instances.get_mut(&1).unwrap().marked = Some(Role::Primary);
    assert_eq!(decide(&plan, &observed, &moving(0, 1)), []);
    observed.instances.get_mut(&1).unwrap().replayed_lsn = Some(2000);
    assert_eq!(
        decide(&plan, &observed, &moving(0, 1)),
        [Action::Promote(1)]
    );
}

#[test]
fn once_the_target_writes_the_record_follows_and_the_old_primary_starts_as_a_replica() {
    let plan = plan_with_primary(2, 1);
    let mut observed = converged(2);
    let old = observed.instances.get_mut(&0).unwrap();
    old.running = false;
    old.accepting = false;
    old.in_recovery = None;
    old.marked = Some(Role::Replica);
    let target = observed.instances.get_mut(&1).unwrap();
    target.in_recovery = Some(false);
    target.marked = Some(Role::Primary);
    let record = moving(0, 1).advance(&observed);
    assert_eq!(record, Record::settled(1));
    assert!(decide(&plan, &observed, &record).contains(&Action::StartInstance(0)));
}

#[test]
fn a_controller_that_stopped_half_way_resumes_at_the_same_step() {
    // Fenced and marked, then the controller stopped: the next one promotes, no fence again.
    let plan = plan_with_primary(1, 1);
    let mut observed = converged(1);
    observed.instances.get_mut(&0).unwrap().running = false;
    observed.instances.get_mut(&0).unwrap().in_recovery = None;
    observed.instances.get_mut(&0).unwrap().marked = Some(Role::Replica);
    observed.instances.get_mut(&1).unwrap().marked = Some(Role::Primary);
    assert_eq!(
        decide(&plan, &observed, &moving(0, 1)),
        [Action::Promote(1)]
    );
}

#[test]
fn two_writable_instances_stop_every_action() {
    let mut observed = converged(2);
    observed.instances.get_mut(&2).unwrap().in_recovery = Some(false);
    observed.instances.remove(&1);
    assert!(conflict(&plan(2), &observed, &Record::settled(0)).is_some());
    assert_eq!(decide(&plan(2), &observed, &Record::settled(0)), []);
}

#[test]
fn a_primary_the_record_does_not_name_is_a_conflict_not_a_guess() {
    let mut observed = converged(1);
    observed.instances.get_mut(&0).unwrap().in_recovery = Some(true);
    observed.instances.get_mut(&1).unwrap().in_recovery = Some(false);
    let message = conflict(&plan(1), &observed, &Record::settled(0)).unwrap();
    assert!(message.contains("demo-1 accepts writes but the record names demo-0"));
}

#[test]
fn the_first_primary_seen_settles_an_empty_record() {
    let fresh = Record::default();
    assert_eq!(fresh.advance(&converged(2)), Record::settled(0));
    assert_eq!(fresh.advance(&Observed::default()), fresh);
}

#[test]
fn the_primary_gets_slots_for_every_replica_and_standbys_none() {
    let mut observed = converged(2);
    observed.instances.get_mut(&0).unwrap().slots = Some([("instance_1".to_owned(), true)].into());
    observed.instances.get_mut(&1).unwrap().slots = Some(Default::default());
    assert_eq!(
        decide(&plan(2), &observed, &Record::settled(0)),
        [Action::EnsureSlots(0)]
    );
    observed.instances.get_mut(&0).unwrap().slots = Some(
        [
            ("instance_1".to_owned(), true),
            ("instance_2".to_owned(), true),
        ]
        .into(),
    );
    observed.instances.get_mut(&1).unwrap().slots = Some([("instance_2".to_owned(), false)].into());
    assert_eq!(
        decide(&plan(2), &observed, &Record::settled(0)),
        [Action::EnsureSlots(1)]
    );
}

#[test]
fn a_primary_without_the_lookup_schema_gets_it_and_only_the_primary() {
    let mut observed = converged(1);
    observed.instances.get_mut(&0).unwrap().lookup_schema = Some(false);
    assert_eq!(
        decide(&plan(1), &observed, &Record::settled(0)),
        [Action::CreateLoginLookup(0)]
    );
    // Present, or not seen: nothing to do.
    for seen in [Some(true), None] {
        observed.instances.get_mut(&0).unwrap().lookup_schema = seen;
        assert_eq!(decide(&plan(1), &observed, &Record::settled(0)), []);
    }
    // A standby is never written to, whatever it reports.
    observed.instances.get_mut(&1).unwrap().lookup_schema = Some(false);
    assert_eq!(decide(&plan(1), &observed, &Record::settled(0)), []);
}

#[test]
fn a_slot_still_in_use_by_a_removed_replica_is_left_until_it_disconnects() {
    let mut observed = converged(1);
    observed.instances.get_mut(&0).unwrap().slots = Some(
        [
            ("instance_1".to_owned(), true),
            ("instance_2".to_owned(), true),
        ]
        .into(),
    );
    assert_eq!(decide(&plan(1), &observed, &Record::settled(0)), []);
    observed.instances.get_mut(&0).unwrap().slots = Some(
        [
            ("instance_1".to_owned(), true),
            ("instance_2".to_owned(), false),
        ]
        .into(),
    );
    assert_eq!(
        decide(&plan(1), &observed, &Record::settled(0)),
        [Action::EnsureSlots(0)]
    );
}

/// An operator outside the cluster network: pods, readiness and labels, no SQL.
fn kube_shaped(ordinal: u32, ready: bool, marked: Option<Role>) -> ObservedInstance {
    ObservedInstance {
        name: format!("demo-{ordinal}-0"),
        state: "running".into(),
        running: true,
        up_to_date: true,
        engine_ready: Some(ready),
        marked,
        ..Default::default()
    }
}

#[test]
fn without_sql_an_unmarked_pod_gets_its_role_and_readiness_comes_from_the_engine() {
    let observed = Observed {
        network: true,
        instances: [
            (0, kube_shaped(0, false, None)),
            (1, kube_shaped(1, false, Some(Role::Replica))),
        ]
        .into(),
        balancers: Default::default(),
    };
    assert_eq!(
        decide(&plan(1), &observed, &Record::default()),
        [Action::MarkRole(0)]
    );
    let ready = Observed {
        network: true,
        instances: [
            (0, kube_shaped(0, true, Some(Role::Primary))),
            (1, kube_shaped(1, true, Some(Role::Replica))),
        ]
        .into(),
        balancers: Default::default(),
    };
    assert!(instance_ready(&plan(1), &ready, 0));
    assert_eq!(Record::default().advance(&ready), Record::settled(0));
    assert_eq!(
        decide(&plan(1), &ready, &Record::settled(0)),
        [Action::CreateBalancer(0)]
    );
}

fn policy() -> FailoverPolicy {
    FailoverPolicy {
        enabled: true,
        delay: Duration::from_secs(3),
        max_lag_bytes: 100,
    }
}

/// Primary 0 stopped; replicas with the given received LSNs.
fn primary_lost(received: &[(u32, u64)]) -> Observed {
    let mut observed = converged(received.len() as u32);
    let primary = observed.instances.get_mut(&0).unwrap();
    primary.running = false;
    primary.accepting = false;
    primary.in_recovery = None;
    for &(o, lsn) in received {
        observed.instances.get_mut(&o).unwrap().received_lsn = Some(lsn);
    }
    observed
}

#[test]
fn failover_waits_for_the_delay_then_elects_the_highest_received_lsn() {
    let observed = primary_lost(&[(1, 900), (2, 1000)]);
    let record = Record::settled(0);
    let early = failover(
        &plan(2),
        &observed,
        &record,
        &policy(),
        Duration::from_secs(2),
        None,
    );
    assert_eq!(early, None);
    let late = failover(
        &plan(2),
        &observed,
        &record,
        &policy(),
        Duration::from_secs(3),
        None,
    );
    assert_eq!(late, Some(failing(0, 2)));
}

#[test]
fn failover_ties_go_to_the_lowest_ordinal() {
    let observed = primary_lost(&[(1, 1000), (2, 1000), (3, 1000)]);
    let chosen = failover(
        &plan(3),
        &observed,
        &Record::settled(0),
        &policy(),
        Duration::from_secs(9),
        None,
    );
    assert_eq!(chosen, Some(failing(0, 1)));
}

#[test]
fn failover_skips_candidates_too_far_behind_and_stopped_ones() {
    let mut observed = primary_lost(&[(1, 850), (2, 1000)]);
    observed.instances.get_mut(&2).unwrap().running = false;
    let record = Record::settled(0);
    let wait = Duration::from_secs(9);
    // Primary last wrote 1000; 1 lacks 150 > 100 bytes: nobody qualifies.
    assert_eq!(
        failover(&plan(2), &observed, &record, &policy(), wait, Some(1000)),
        None
    );
    assert_eq!(
        failover(&plan(2), &observed, &record, &policy(), wait, Some(900)),
        Some(failing(0, 1))
    );
}

#[test]
fn no_failover_when_disabled_in_progress_or_primary_up_or_unseen() {
    let observed = primary_lost(&[(1, 1000)]);
    let wait = Duration::from_secs(9);
    let off = FailoverPolicy {
        enabled: false,
        ..policy()
    };
    assert_eq!(
        failover(&plan(1), &observed, &Record::settled(0), &off, wait, None),
        None
    );
    assert_eq!(
        failover(&plan(1), &observed, &moving(0, 1), &policy(), wait, None),
        None
    );
    assert_eq!(
        failover(
            &plan(1),
            &converged(1),
            &Record::settled(0),
            &policy(),
            wait,
            None
        ),
        None
    );
    // Without SQL a ready pod is not "down".
    let mut unseen = Observed {
        network: true,
        instances: [
            (0, kube_shaped(0, true, Some(Role::Primary))),
            (1, kube_shaped(1, true, Some(Role::Replica))),
        ]
        .into(),
        balancers: Default::default(),
    };
    assert!(!primary_down(&unseen, &Record::settled(0)));
    unseen.instances.remove(&0);
    assert!(primary_down(&unseen, &Record::settled(0)));
}

#[test]
fn switchover_requests_are_checked() {
    let observed = converged(2);
    let record = Record::settled(0);
    let p = plan(2);
    assert_eq!(
        switchover_target(&p, &observed, &record, Some("demo-2")),
        Ok(2)
    );
    assert_eq!(switchover_target(&p, &observed, &record, Some("1")), Ok(1));
    assert!(switchover_target(&p, &observed, &record, Some("demo-0"))
        .unwrap_err()
        .contains("already the primary"));
    assert!(switchover_target(&p, &observed, &record, Some("demo-7"))
        .unwrap_err()
        .contains("no such instance"));
    assert!(
        switchover_target(&p, &observed, &moving(0, 1), Some("demo-2"))
            .unwrap_err()
            .contains("already in progress")
    );
    let mut lagging = converged(2);
    lagging.instances.get_mut(&2).unwrap().lag_bytes = Some(MAX_SWITCHOVER_LAG + 1);
    assert!(switchover_target(&p, &lagging, &record, Some("demo-2"))
        .unwrap_err()
        .contains("lags"));
    // Without a name: the most caught-up ready replica.
    lagging.instances.get_mut(&1).unwrap().received_lsn = Some(5);
    assert_eq!(switchover_target(&p, &lagging, &record, None), Ok(1));
}

#[test]
fn a_balancer_that_still_takes_the_old_primary_for_primary_detaches_it_then_reattaches() {
    // Switched over to 1; the old primary 0 came back as a standby before pgpool noticed.
    let plan = plan_with_primary(2, 1);
    let mut observed = converged(2);
    observed.instances.get_mut(&0).unwrap().in_recovery = Some(true);
    observed.instances.get_mut(&0).unwrap().streaming = true;
    observed.instances.get_mut(&1).unwrap().in_recovery = Some(false);
    observed.instances.get_mut(&1).unwrap().marked = Some(Role::Primary);
    observed.instances.get_mut(&0).unwrap().marked = Some(Role::Replica);
    let record = Record::settled(1);
    assert_eq!(
        decide(&plan, &observed, &record),
        [Action::DetachBackend {
            balancer: 0,
            slot: 0
        }]
    );
    // pgpool searched and found 1; node 0 is down until attached back.
    let nodes = nodes_of(&mut observed);
    nodes[0].status = "down".into();
    nodes[0].role = "standby".into();
    nodes[1].role = "primary".into();
    assert_eq!(
        decide(&plan, &observed, &record),
        [Action::AttachBackend {
            balancer: 0,
            slot: 0
        }]
    );
}

fn synchronous(replicas: i32, number: u32) -> Plan {
    let mut plan = plan(replicas);
    plan.postgres.synchronous = Some(number);
    plan
}

#[test]
fn synchronous_failover_waits_for_enough_replicas_to_cover_the_quorum() {
    let record = Record::settled(0);
    let wait = Duration::from_secs(9);
    // ANY 1 of 2: a commit may sit on either replica alone, so both must report.
    let mut observed = primary_lost(&[(1, 900), (2, 1000)]);
    observed.instances.get_mut(&2).unwrap().running = false;
    let plan = synchronous(2, 1);
    assert_eq!(
        failover(&plan, &observed, &record, &policy(), wait, None),
        None
    );
    let why = failover_candidates(&plan, &observed, 0, &policy(), None).unwrap_err();
    assert!(
        why.contains("ANY 1 of 2") && why.contains("1 of the 2"),
        "{why}"
    );
    // ANY 2 of 2: every commit is on both, either one will do.
    assert_eq!(
        failover(
            &synchronous(2, 2),
            &observed,
            &record,
            &policy(),
            wait,
            None
        ),
        Some(failing(0, 1))
    );
}

#[test]
fn a_standby_that_only_replayed_counts_without_a_quorum_only() {
    // Replica 2 restarted and streamed nothing since: its position is what it replayed.
    let mut observed = primary_lost(&[(1, 900), (2, 1000)]);
    observed.instances.get_mut(&2).unwrap().replay_only = true;
    let record = Record::settled(0);
    let wait = Duration::from_secs(9);
    // Asynchronous: it is a candidate like any other (it holds at least that much).
    assert_eq!(
        failover(&plan(2), &observed, &record, &policy(), wait, None),
        Some(failing(0, 2))
    );
    // ANY 1 of 2: it may hold an acknowledged commit past what it replayed, so it does not
    // count towards the replicas that must report, and failover waits.
    let why = failover_candidates(&synchronous(2, 1), &observed, 0, &policy(), None);
    assert!(why.unwrap_err().contains("1 of the 2"));
}

#[test]
fn synchronous_failover_ignores_the_lag_bound_and_takes_the_most_wal() {
    // The primary's last LSN was far ahead, but nothing past the quorum was acknowledged.
    let observed = primary_lost(&[(1, 10), (2, 20)]);
    let chosen = failover(
        &synchronous(2, 1),
        &observed,
        &Record::settled(0),
        &policy(),
        Duration::from_secs(9),
        Some(1_000_000),
    );
    assert_eq!(chosen, Some(failing(0, 2)));
    // Asynchronous, the same replicas are too far behind.
    let why = failover_candidates(&plan(2), &observed, 0, &policy(), Some(1_000_000));
    assert!(why.unwrap_err().contains("maxLagBytes"));
}

#[test]
fn a_lost_primary_is_fenced_and_the_target_promoted_in_one_decision() {
    let plan = plan_with_primary(2, 1);
    let mut observed = converged(2);
    let old = observed.instances.get_mut(&0).unwrap();
    old.running = false;
    old.accepting = false;
    old.in_recovery = None;
    old.marked = Some(Role::Primary);
    // pgpool has not noticed yet: it lets go of the node first.
    assert_eq!(
        decide(&plan, &observed, &failing(0, 1)),
        [
            Action::DetachBackend {
                balancer: 0,
                slot: 0
            },
            Action::Fence(0),
            Action::MarkRole(1),
            Action::Promote(1)
        ]
    );
    // Still running: the next steps wait until it is seen stopped.
    observed.instances.get_mut(&0).unwrap().running = true;
    assert_eq!(
        decide(&plan, &observed, &failing(0, 1)),
        [
            Action::DetachBackend {
                balancer: 0,
                slot: 0
            },
            Action::Fence(0)
        ]
    );
}

/// An instance as the operator sees it from inside the cluster: a pod (`<name>-<n>-0`) with
/// its Ready condition and role label, and SQL on its pod address; no published port.
fn in_cluster(ordinal: u32) -> ObservedInstance {
    ObservedInstance {
        name: format!("demo-{ordinal}-0"),
        health: String::new(),
        host_port: None,
        probed: true,
        engine_ready: Some(true),
        ..ready(ordinal)
    }
}

/// A balancer pod whose nodes came from its agent's `/api/v1/nodes`.
fn balancer_pod(replicas: u32) -> ObservedBalancer {
    let nodes = (0..=replicas)
        .map(|s| PoolNode {
            host: format!("demo-{s}-0.demo-hl"),
            ..node(s, "up")
        })
        .collect();
    ObservedBalancer {
        name: "demo-balancer-6d9f7c-x2x4k".into(),
        health: String::new(),
        host_port: None,
        ..balancer(nodes)
    }
}

fn kube_converged(replicas: u32) -> Observed {
    Observed {
        network: true,
        instances: (0..=replicas).map(|o| (o, in_cluster(o))).collect(),
        balancers: [(0, balancer_pod(replicas))].into(),
    }
}

#[test]
fn an_in_cluster_kubernetes_observation_that_converged_needs_nothing() {
    let observed = kube_converged(2);
    let record = Record::settled(0);
    assert_eq!(decide(&plan(2), &observed, &record), []);
    assert!(pending(&plan(2), &observed, &record).is_empty());
    assert_eq!(
        crate::status::phase(&plan(2), &observed, &record),
        crate::status::Phase::Running
    );
}

#[test]
fn an_in_cluster_primary_pod_that_restarts_is_failed_over_and_fenced() {
    let mut observed = kube_converged(2);
    observed.instances.insert(
        0,
        ObservedInstance {
            name: "demo-0-0".into(),
            state: "restarting".into(),
            up_to_date: true,
            engine_ready: Some(false),
            marked: Some(Role::Primary),
            ..Default::default()
        },
    );
    observed.instances.get_mut(&1).unwrap().received_lsn = Some(900);
    let record = Record::settled(0);
    let mut watch = watch::Watch::default();
    let t0 = Instant::now();
    // Before the delay: no failover, and the lost primary is not brought back meanwhile.
    let (due, down_for) = watch.failover_due(&plan(2), &observed, &record, &policy(), t0);
    assert_eq!(due, None);
    let held = watch::held_back(
        decide(&plan(2), &observed, &record),
        &observed,
        &record,
        &policy(),
        down_for,
    );
    assert!(!held.contains(&Action::StartInstance(0)), "{held:?}");
    // After it: the replica with the most WAL is the target, and one decision fences the
    // old primary's pod, marks the target and promotes it.
    let later = t0 + Duration::from_secs(3);
    let (due, _) = watch.failover_due(&plan(2), &observed, &record, &policy(), later);
    assert_eq!(due, Some(failing(0, 2)));
    assert_eq!(
        decide(&plan_with_primary(2, 2), &observed, &failing(0, 2)),
        [
            Action::DetachBackend {
                balancer: 0,
                slot: 0
            },
            Action::Fence(0),
            Action::MarkRole(2),
            Action::Promote(2)
        ]
    );
}

#[test]
fn unseen_balancer_nodes_are_unknown_and_an_empty_list_is_not() {
    let mut observed = kube_converged(1);
    observed.balancers.get_mut(&0).unwrap().nodes = None;
    let record = Record::settled(0);
    assert_eq!(decide(&plan(1), &observed, &record), []);
    assert!(pending(&plan(1), &observed, &record).is_empty());
    observed.balancers.get_mut(&0).unwrap().nodes = Some(Vec::new());
    assert_eq!(
        decide(&plan(1), &observed, &record),
        [Action::UpdateBackends(0)]
    );
    assert!(!pending(&plan(1), &observed, &record).is_empty());
}

#[test]
fn a_replica_of_another_database_system_is_restarted_and_named() {
    let mut observed = converged(2);
    let replica = observed.instances.get_mut(&2).unwrap();
    replica.system_identifier = Some(42);
    replica.streaming = false;
    // Just started: named, not restarted yet.
    replica.running_for = Some(Duration::from_secs(3));
    let actions = decide(&plan(2), &observed, &Record::settled(0));
    assert!(!actions.contains(&Action::RestartForeign(2)), "{actions:?}");
    let waiting = pending(&plan(2), &observed, &Record::settled(0));
    assert!(
        waiting[0].contains("another database system"),
        "{waiting:?}"
    );
    let replica = observed.instances.get_mut(&2).unwrap();
    replica.running_for = Some(FOREIGN_RESTART_AFTER);
    let actions = decide(&plan(2), &observed, &Record::settled(0));
    assert!(actions.contains(&Action::RestartForeign(2)), "{actions:?}");
    assert!(!actions.contains(&Action::RestartForeign(1)), "{actions:?}");
    let waiting = pending(&plan(2), &observed, &Record::settled(0));
    assert_eq!(
        waiting,
        [
            "demo-2 holds the data of another database system (identifier 42; the primary's is \
          7000) and cannot stream from the primary"
        ]
    );
    // Not while the primary changes, nor while the primary's system is not seen.
    let moving_actions = decide(&plan(2), &observed, &moving(0, 1));
    assert!(!moving_actions.contains(&Action::RestartForeign(2)));
    let mut unseen = observed.clone();
    unseen.instances.get_mut(&0).unwrap().system_identifier = None;
    let actions = decide(&plan(2), &unseen, &Record::settled(0));
    assert!(!actions.contains(&Action::RestartForeign(2)), "{actions:?}");
    // Once its entrypoint refuses to start, it is left alone, and why is said.
    let refused = observed.instances.get_mut(&2).unwrap();
    *refused = ObservedInstance {
        name: "demo-2".into(),
        state: "restarting".into(),
        start_failure: Some("the data directory belongs to another database system".into()),
        ..ObservedInstance::default()
    };
    let actions = decide(&plan(2), &observed, &Record::settled(0));
    assert!(!actions.contains(&Action::RestartForeign(2)), "{actions:?}");
    assert_eq!(
        pending(&plan(2), &observed, &Record::settled(0)),
        [
            "demo-2 not running: it cannot start: the data directory belongs to another database \
          system"
        ]
    );
}

#[test]
fn waiting_stops_once_a_refusal_to_start_has_lasted_the_primarys_first() {
    type E = std::io::Error;
    let refusing = |observed: &mut Observed, o: u32, why: &str| {
        let seen = observed.instances.get_mut(&o).unwrap();
        seen.running = false;
        seen.start_failure = Some(why.into());
    };
    let mut observed = converged(2);
    let mut since = BTreeMap::new();
    assert!(lasting_refusal::<E>(&plan(2), &observed, &mut since).is_none());
    assert!(since.is_empty());
    // Seen once: it may be a stale line; it is remembered, not acted on.
    refusing(&mut observed, 2, "foreign data");
    assert!(lasting_refusal::<E>(&plan(2), &observed, &mut since).is_none());
    assert!(since.contains_key(&2));
    since.insert(2, Instant::now() - REFUSAL_GRACE);
    let e = lasting_refusal::<E>(&plan(2), &observed, &mut since).unwrap();
    assert_eq!(e.to_string(), "demo-2 cannot start: foreign data");
    // The primary's refusal is the one named.
    refusing(&mut observed, 0, "empty data");
    since.insert(0, Instant::now() - REFUSAL_GRACE);
    let e = lasting_refusal::<E>(&plan(2), &observed, &mut since).unwrap();
    assert!(
        e.to_string()
            .starts_with("demo-0, the primary, cannot start: empty data."),
        "{e}"
    );
    // A refusal that ended is forgotten: seen again, it starts over.
    observed.instances.get_mut(&0).unwrap().start_failure = None;
    observed.instances.get_mut(&2).unwrap().start_failure = None;
    assert!(lasting_refusal::<E>(&plan(2), &observed, &mut since).is_none());
    assert!(since.is_empty());
}
