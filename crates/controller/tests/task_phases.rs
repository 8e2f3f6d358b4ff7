//! Where a migration task's time went, as the controller core records it (driven directly, the
//! time an argument): the wait for a slot, the target's start (`receive` sent → its answer)
//! and the migration (`migrate_out` sent → the source's answer), and the measured time the
//! automation learns from — the whole move, not the source VMM's `total_ms` alone.

mod common;

use common::{cluster, done};
use tern_api::agent::{Command, CommandBody, CommandReply};
use tern_api::cluster::{TaskPhases, TaskState};
use tern_controller::core::{Controller, Input};
use tern_controller::shell::automation::actual_of;

/// The commands the core sent since the last call.
fn sent(c: &mut Controller) -> Vec<Command> {
    common::sent(c).into_iter().map(|(_, cmd)| cmd).collect()
}

/// The one command of `cmds` with a body `is` accepts.
fn one(cmds: &[Command], is: fn(&CommandBody) -> bool) -> u64 {
    let found: Vec<&Command> = cmds.iter().filter(|c| is(&c.body)).collect();
    assert_eq!(found.len(), 1, "{cmds:?}");
    found[0].id
}

#[test]
fn a_migration_task_times_the_targets_start_and_the_migration() {
    let mut c = cluster();
    let task = c.migrate_vm("m", Some("h2"), 10).unwrap().task;
    let receive = one(&sent(&mut c), |b| matches!(b, CommandBody::Receive { .. }));
    // a task that has started shows its wait, nothing of the phases under way
    let started = c.task(task).unwrap();
    assert_eq!(
        started.phases,
        Some(TaskPhases {
            queued_ms: Some(0),
            target_start_ms: None,
            migrate_ms: None,
        })
    );
    // the receiver listens 62 ms after the command went out
    let listening = Input::Reply {
        cmd: receive,
        seq: 3,
        reply: done(Some("10.0.0.2:7100"), None),
    };
    c.step(listening, 72);
    let out = one(&sent(&mut c), |b| {
        matches!(b, CommandBody::MigrateOut { .. })
    });
    // the source answers 95 ms later with the VMM's report (its own total: 40 ms)
    let report = serde_json::json!({"total_ms": 40, "downtime_ms": 2, "rounds": 2,
        "bytes_sent": 254_190u64, "pages_zero_skipped": 0, "throttle_max_pct": 0.0,
        "converged": true, "outcome": "completed"});
    let moved = Input::Reply {
        cmd: out,
        seq: 4,
        reply: done(None, Some(report)),
    };
    c.step(moved, 167);
    let info = c.task(task).unwrap();
    assert_eq!(info.state, TaskState::Succeeded, "{info:?}");
    let phases = info.phases.unwrap();
    assert_eq!(
        phases,
        TaskPhases {
            queued_ms: Some(0),
            target_start_ms: Some(62),
            migrate_ms: Some(95),
        }
    );
    assert_eq!(phases.move_ms(), Some(157));
    assert_eq!(info.finished_ms, Some(167));
    // GET /v1/tasks/{id} shows them
    let json = serde_json::to_value(&info).unwrap();
    assert_eq!(json["phases"]["target_start_ms"], 62, "{json}");
    // what the automation learns from is the whole move, with the report's bytes and pause
    let actual = actual_of(&info).unwrap();
    assert!((actual.time_s - 0.157).abs() < 1e-12, "{actual:?}");
    assert_eq!((actual.bytes, actual.downtime_ms), (254_190, 2.0));
}

#[test]
fn a_failed_move_keeps_the_phase_it_reached_and_teaches_nothing() {
    let mut c = cluster();
    let first = c.migrate_vm("m", Some("h2"), 10).unwrap().task;
    let receive = one(&sent(&mut c), |b| matches!(b, CommandBody::Receive { .. }));
    // the target cannot start its receiver: the task fails with the phase it reached timed
    let refused = Input::Reply {
        cmd: receive,
        seq: 3,
        reply: CommandReply::Failed {
            error: "no room".into(),
        },
    };
    c.step(refused, 40);
    let info = c.task(first).unwrap();
    assert_eq!(info.state, TaskState::Failed, "{info:?}");
    let phases = info.phases.unwrap();
    assert_eq!(phases.target_start_ms, Some(30), "{phases:?}");
    assert_eq!((phases.migrate_ms, phases.move_ms()), (None, None));
    assert_eq!(actual_of(&info), None);
}
