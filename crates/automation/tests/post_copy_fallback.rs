//! The post-copy fallback knob (`Policy::post_copy_fallback`) on recorded telemetry: a move the
//! migration model predicts pre-copy will not finish is held back by default, and planned with
//! post-copy — its reason and `post_copy_after` in the plan, carried into the migration action —
//! when the knob is on.
//!
//! `cargo test -p tern-automation --test post_copy_fallback`

mod common;

use common::Cluster;
use tern_api::automation::{
    ActionStatus, AutomationLevel, POST_COPY_FALLBACK_AFTER_ROUNDS, Plan, PlanAction, PlanState,
    Policy, SelectionKind,
};
use tern_automation::replay::Replay;
use tern_automation::{Action, Loop, LoopConfig, RoundReport};

const STEP_MS: u64 = 10_000;

/// h1 carries three busy VMs (2.7 of its 2 cores), h2 (4 cores) one light VM. `b`, the least
/// busy of h1 (the one selection MU moves), has 8 GiB and, as its agent measured, writes a
/// million pages a second: over the default 125 MB/s link its full copy alone outlasts the 60 s
/// timeout.
fn cluster() -> Cluster {
    let mut c = Cluster(Replay::default());
    c.host("h1", 2, "hp-ml110-g5", true);
    c.host("h2", 4, "hp-ml110-g5", true);
    c.vm("a", "h1", vec![0.9]);
    let b = c.vm("b", "h1", vec![0.5]);
    b.memory_mib = 8192;
    b.dirty = Some(1e6);
    c.vm("c", "h1", vec![0.9]);
    c.vm("d", "h2", vec![0.1]);
    c
}

fn round(post_copy_fallback: bool, level: AutomationLevel) -> (Cluster, Loop, Plan, RoundReport) {
    let mut c = cluster();
    let policy = Policy {
        automation: level,
        hold_s: 0,
        selection: SelectionKind::Mu,
        post_copy_fallback,
        ..Policy::default()
    };
    let mut lp = Loop::new(policy, LoopConfig::default()).unwrap();
    c.step(&mut lp, STEP_MS);
    let plan = lp
        .plans()
        .first()
        .map(|p| (*p).clone())
        .expect("a plan for the overloaded h1");
    let report = lp.last_round().clone();
    (c, lp, plan, report)
}

/// The plan's move of `vm`: (reason, post_copy_after, predicted converges, predicted pause ms).
fn move_of(plan: &Plan, vm: &str) -> Option<(String, Option<u32>, bool, f64)> {
    plan.actions.iter().find_map(|a| match a {
        PlanAction::Migrate {
            vm: v,
            reason,
            post_copy_after,
            predicted,
            ..
        } if v == vm => {
            let p = predicted.expect("a planned move carries its prediction");
            Some((reason.clone(), *post_copy_after, p.converges, p.downtime_ms))
        }
        _ => None,
    })
}

#[test]
fn by_default_a_move_predicted_not_to_converge_is_held_back() {
    let (_, _, plan, report) = round(false, AutomationLevel::Manual);
    assert_eq!(move_of(&plan, "b"), None, "{plan:?}");
    assert!(
        plan.reason
            .contains("b not moved: predicted not to converge"),
        "{}",
        plan.reason
    );
    assert_eq!(report.held_back[0].0, "b");
    // Every move the plan holds is pre-copy.
    assert!(
        plan.actions.iter().all(|a| !matches!(
            a,
            PlanAction::Migrate {
                post_copy_after: Some(_),
                ..
            }
        )),
        "{plan:?}"
    );
}

#[test]
fn with_the_knob_it_is_planned_with_post_copy_and_its_reason() {
    let (_, _, plan, report) = round(true, AutomationLevel::Manual);
    let (reason, after, converges, pause_ms) =
        move_of(&plan, "b").unwrap_or_else(|| panic!("b must move by post-copy: {plan:?}"));
    assert_eq!(after, Some(POST_COPY_FALLBACK_AFTER_ROUNDS));
    assert!(
        reason.starts_with(
            "overloaded host h1; post-copy after 1 round: pre-copy predicted not to converge"
        ),
        "{reason}"
    );
    // The prediction is post-copy's: pre-copy would not converge, the pause (the state and the
    // restore) fits the 50 ms budget.
    assert!(!converges);
    assert!(pause_ms > 0.0 && pause_ms <= 50.0, "{pause_ms}");
    assert!(report.held_back.is_empty(), "{report:?}");
    assert_eq!(plan.state, PlanState::Proposed);
}

#[test]
fn applying_the_plan_asks_the_migration_for_post_copy_and_the_move_lands() {
    let (mut c, mut lp, plan, _) = round(true, AutomationLevel::Manual);
    let actions = lp.apply(STEP_MS, plan.id).unwrap();
    let migrate = actions
        .iter()
        .find_map(|a| match a {
            Action::Migrate {
                vm,
                post_copy_after,
                ..
            } if vm == "b" => Some(*post_copy_after),
            _ => None,
        })
        .unwrap_or_else(|| panic!("applying must start b's move: {actions:?}"));
    assert_eq!(migrate, Some(POST_COPY_FALLBACK_AFTER_ROUNDS));
    c.take(actions);
    // The move lands as the cluster carries it out (the replay takes its predicted time).
    for _ in 0..30 {
        if lp.plan(plan.id).unwrap().state != PlanState::Applying {
            break;
        }
        c.step(&mut lp, STEP_MS);
    }
    assert_eq!(lp.plan(plan.id).unwrap().state, PlanState::Applied);
    assert_eq!(c.vms["b"].host, "h2");
}

#[test]
fn a_post_copy_move_is_not_carried_out_once_the_knob_is_turned_off() {
    let (_, mut lp, plan, _) = round(true, AutomationLevel::Manual);
    let off = Policy {
        post_copy_fallback: false,
        ..lp.policy().clone()
    };
    lp.set_policy(off).unwrap();
    let actions = lp.apply(STEP_MS, plan.id).unwrap_or_default();
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::Migrate { vm, .. } if vm == "b")),
        "b's post-copy move must not start: {actions:?}"
    );
    // b's move is failed with the reason (a's, planned with pre-copy, may still run)
    let p = lp.plan(plan.id).unwrap();
    let b_status = p.actions.iter().find_map(|a| match a {
        PlanAction::Migrate { vm, status, .. } if vm == "b" => Some(*status),
        _ => None,
    });
    assert_eq!(b_status, Some(ActionStatus::Failed), "{p:?}");
    assert_ne!(p.state, PlanState::Applied, "{p:?}");
    assert!(
        p.detail
            .as_deref()
            .unwrap_or("")
            .contains("no longer allows"),
        "{p:?}"
    );
}
