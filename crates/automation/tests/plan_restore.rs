//! Plans handed from one loop to the next (a controller fail-over): the previous leader's
//! proposals stay proposed and can be applied when the cluster is as they were computed on, are
//! superseded when it is not, and a plan that was being applied is failed.

mod common;

use common::{host, vm};
use tern_api::automation::{ActionStatus, PlanAction, PlanState, Policy};
use tern_automation::telemetry::Telemetry;
use tern_automation::{Action, Loop, LoopConfig};

/// h1 overloaded (2.7 of 2 cores), h2 light.
fn cluster() -> Telemetry {
    Telemetry {
        hosts: vec![host("h1"), host("h2")],
        vms: vec![
            vm("a", "h1", 0.9),
            vm("b", "h1", 0.9),
            vm("c", "h1", 0.9),
            vm("d", "h2", 0.1),
        ],
    }
}

fn manual() -> Loop {
    let policy = Policy {
        hold_s: 0,
        ..Policy::default()
    };
    Loop::new(policy, LoopConfig::default()).unwrap()
}

/// A loop that has proposed one plan; the plan and its fingerprint as the shell stores them.
fn proposed() -> (Loop, tern_api::automation::Plan, u64) {
    let mut a = manual();
    // some history first, so this loop's version is well past a fresh loop's
    for t in 0..3 {
        a.observe(t * 10_000, &cluster()).unwrap();
        a.tick(t * 10_000);
    }
    let plan = a
        .plans()
        .into_iter()
        .find(|p| p.state == PlanState::Proposed)
        .cloned()
        .expect("a proposal");
    let fp = a.plan_fingerprint(plan.id).unwrap();
    assert_eq!(fp, a.placement_fingerprint());
    (a, plan, fp)
}

#[test]
fn a_restored_proposal_is_applied_by_the_next_loop_when_the_cluster_is_unchanged() {
    let (old, plan, fp) = proposed();
    let mut b = manual();
    b.restore_plans(0, vec![(plan.clone(), fp)]);
    assert_eq!(b.plan(plan.id).unwrap().state, PlanState::Proposed);
    b.observe(100_000, &cluster()).unwrap();
    assert_eq!(b.placement_fingerprint(), old.placement_fingerprint());
    let p = b.plan(plan.id).unwrap();
    assert_eq!(p.state, PlanState::Proposed);
    assert_eq!(p.basis, b.version(), "rebased on the new loop's version");
    // the new loop's first round keeps it (it says the same, or the loop is not warm yet)
    assert!(b.tick(100_000).is_empty());
    assert_eq!(b.plan(plan.id).unwrap().state, PlanState::Proposed);
    let actions = b.apply(101_000, plan.id).unwrap();
    let Some(Action::Migrate {
        vm: moved, from, ..
    }) = actions.first()
    else {
        panic!("{actions:?}")
    };
    assert_eq!(from, "h1");
    assert!(["a", "b", "c"].contains(&moved.as_str()));
    assert_eq!(b.plan(plan.id).unwrap().state, PlanState::Applying);
    // new plans are numbered after the restored ones
    let mut c = manual();
    c.restore_plans(0, vec![(plan.clone(), fp)]);
    let moved = Telemetry {
        vms: vec![
            vm("a", "h2", 0.9),
            vm("b", "h2", 0.9),
            vm("c", "h2", 0.9),
            vm("d", "h1", 0.1),
        ],
        ..cluster()
    };
    c.observe(0, &moved).unwrap();
    c.tick(0);
    let others: Vec<u64> = c
        .plans()
        .iter()
        .map(|p| p.id)
        .filter(|&id| id != plan.id)
        .collect();
    assert!(
        !others.is_empty() && others.iter().all(|&id| id > plan.id),
        "{others:?}"
    );
}

#[test]
fn a_restored_proposal_is_superseded_when_the_placement_moved_on() {
    let (_, plan, fp) = proposed();
    let mut b = manual();
    b.restore_plans(0, vec![(plan.clone(), fp)]);
    let mut t = cluster();
    t.vms[0].host = Some("h2".into());
    b.observe(0, &t).unwrap();
    let p = b.plan(plan.id).unwrap();
    assert_eq!(p.state, PlanState::Superseded, "{p:?}");
    assert!(b.apply(1, plan.id).is_err());
}

#[test]
fn a_plan_being_applied_is_failed_and_final_plans_are_kept() {
    let (mut a, plan, fp) = proposed();
    a.apply(40_000, plan.id).unwrap();
    let applying = a.plan(plan.id).unwrap().clone();
    assert_eq!(applying.state, PlanState::Applying);
    let mut rejected = plan.clone();
    rejected.id = plan.id + 1;
    rejected.state = PlanState::Rejected;
    let mut b = manual();
    b.restore_plans(5, vec![(applying, fp), (rejected.clone(), fp)]);
    let p = b.plan(plan.id).unwrap();
    assert_eq!(p.state, PlanState::Failed);
    assert!(
        p.detail.as_deref().unwrap().contains("stopped leading"),
        "{p:?}"
    );
    assert!(p.actions.iter().all(|a| matches!(
        a,
        PlanAction::Migrate {
            status: ActionStatus::Failed | ActionStatus::Skipped,
            ..
        }
    )));
    assert_eq!(b.plan(rejected.id).unwrap().state, PlanState::Rejected);
    b.observe(0, &cluster()).unwrap();
    assert_eq!(b.plan(rejected.id).unwrap().state, PlanState::Rejected);
}
