//! A migration lost in post-copy, as the controller core sees it (driven directly): the source's
//! agent answers `migrate_out` with `lost` (`tern vm migrate` exit 4). Nothing is in doubt, so no
//! host is asked which copy runs: the task fails, both copies are stopped, and the VM goes back to
//! `pending` to start again from its disk. And how post-copy is asked for: `post_copy_after`
//! travels from the request to the source's `migrate_out`, and one out of range is refused.

mod common;

use common::{cluster, done, sent};
use tern_api::agent::{CommandBody, CommandReply};
use tern_api::cluster::{TaskState, VmState};
use tern_controller::core::Input;

#[test]
fn a_migration_lost_in_post_copy_fails_stops_both_copies_and_places_the_vm_again() {
    let mut c = cluster();
    let task = c.migrate_vm("m", Some("h2"), 10).unwrap().task;
    let cmds = sent(&mut c);
    let [(host, receive)] = cmds.as_slice() else {
        panic!("one receive expected: {cmds:?}");
    };
    assert_eq!(host, "h2");
    assert!(
        matches!(receive.body, CommandBody::Receive { .. }),
        "{receive:?}"
    );
    let listening = Input::Reply {
        cmd: receive.id,
        seq: 3,
        reply: done(Some("10.0.0.2:7100"), None),
    };
    c.step(listening, 20);
    let cmds = sent(&mut c);
    let [(host, out)] = cmds.as_slice() else {
        panic!("one migrate_out expected: {cmds:?}");
    };
    assert_eq!(host, "h1");
    assert!(
        matches!(out.body, CommandBody::MigrateOut { .. }),
        "{out:?}"
    );

    let lost = Input::Reply {
        cmd: out.id,
        seq: 4,
        reply: CommandReply::Lost {
            error: "post-copy failed after the switch".into(),
        },
    };
    c.step(lost, 30);

    let info = c.task(task).unwrap();
    assert_eq!(info.state, TaskState::Failed, "{info:?}");
    let error = info.error.unwrap_or_default();
    assert!(error.contains("lost in post-copy"), "{error}");
    // Nothing is in doubt: no host is asked, both copies are told to stop.
    let mut cmds: Vec<(String, String)> = sent(&mut c)
        .into_iter()
        .map(|(h, cmd)| {
            let what = match cmd.body {
                CommandBody::Stop { vm } => format!("stop {vm}"),
                other => format!("{other:?}"),
            };
            (h, what)
        })
        .collect();
    cmds.sort();
    assert_eq!(
        cmds,
        [
            ("h1".to_string(), "stop m".to_string()),
            ("h2".to_string(), "stop m".to_string())
        ]
    );
    let vm = c.vm("m").unwrap();
    assert_eq!(
        (vm.state, vm.host.as_deref()),
        (VmState::Pending, None),
        "{vm:?}"
    );
    assert!(
        vm.last_error
            .as_deref()
            .is_some_and(|e| e.contains("post-copy")),
        "{vm:?}"
    );
    assert!(
        c.events(0).iter().any(|e| e.kind == "migration_lost"),
        "a migration_lost event"
    );
}

/// The `migrate_out` a migration of `m` to h2 asked with `post_copy_after` sends to h1.
fn migrate_out_body(post_copy_after: Option<u32>) -> CommandBody {
    let mut c = cluster();
    c.migrate_vm_with("m", Some("h2"), post_copy_after, 10)
        .unwrap();
    let cmds = sent(&mut c);
    let [(_, receive)] = cmds.as_slice() else {
        panic!("one receive expected: {cmds:?}");
    };
    c.step(
        Input::Reply {
            cmd: receive.id,
            seq: 3,
            reply: done(Some("10.0.0.2:7100"), None),
        },
        20,
    );
    let cmds = sent(&mut c);
    let [(host, out)] = cmds.as_slice() else {
        panic!("one migrate_out expected: {cmds:?}");
    };
    assert_eq!(host, "h1");
    out.body.clone()
}

#[test]
fn post_copy_after_reaches_the_sources_migrate_out() {
    for asked in [None, Some(1), Some(2), Some(1000)] {
        let body = migrate_out_body(asked);
        assert!(
            matches!(body, CommandBody::MigrateOut { post_copy_after, .. } if post_copy_after == asked),
            "{asked:?}: {body:?}"
        );
    }
}

#[test]
fn post_copy_after_out_of_range_is_refused_by_name_and_nothing_is_queued() {
    let mut c = cluster();
    for bad in [0, 1001] {
        let e = c
            .migrate_vm_with("m", Some("h2"), Some(bad), 10)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("post_copy_after = {bad} is out of range: allowed 1..=1000")
        );
        assert_eq!(e.status(), 400, "{e}");
    }
    assert!(sent(&mut c).is_empty(), "nothing may be started");
    assert!(c.tasks(false).is_empty(), "no task may be queued");
}
