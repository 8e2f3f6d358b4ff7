//! A migration lost in post-copy, as the controller core sees it (driven directly): the source's
//! agent answers `migrate_out` with `lost` (`tern vm migrate` exit 4). Nothing is in doubt, so no
//! host is asked which copy runs: the task fails, both copies are stopped, and the VM goes back to
//! `pending` to start again from its disk. And how post-copy is asked for: `post_copy_after`
//! travels from the request to the source's `migrate_out`, and one out of range is refused.

use tern_api::agent::{
    AgentReport, Command, CommandBody, CommandReply, HostRecord, ObservedState, ObservedVm,
};
use tern_api::cluster::{HostCapacity, TaskState, VmCreate, VmState};
use tern_controller::core::{Action, Config, Controller, Input, VmRecord};

const HOSTS: [&str; 2] = ["h1", "h2"];

fn done(listen: Option<&str>) -> CommandReply {
    CommandReply::Done {
        listen: listen.map(Into::into),
        report: None,
        vm_state: None,
    }
}

/// The commands the core sent since the last call, as (host, command).
fn sent(c: &mut Controller) -> Vec<(String, Command)> {
    c.drain_actions()
        .into_iter()
        .filter_map(|a| match a {
            Action::Send { host, command, .. } => Some((host, command)),
            _ => None,
        })
        .collect()
}

/// A leading, ready controller over two hosts, VM `m` running on h1.
fn cluster() -> Controller {
    let mut c = Controller::new(Config::default());
    for (i, h) in HOSTS.iter().enumerate() {
        let record = HostRecord {
            name: (*h).into(),
            agent_url: format!("http://{h}:7000"),
            capacity: HostCapacity {
                cores: 4,
                memory_mib: 16 * 1024,
                power_model: "hp-ml110-g5".into(),
                volume_node: None,
                volume_node_id: None,
            },
            lease: i as u64 + 1,
        };
        c.step(Input::HostUp(record), 0);
    }
    let spec = VmCreate {
        name: "m".into(),
        vcpus: 1,
        memory_mib: 64,
        kernel: "builtin:testguest".into(),
        cmdline: String::new(),
        disk: None,
        host: None,
        anti_affinity: None,
        restart_priority: 50,
    };
    let desired = vec![VmRecord {
        spec,
        host: Some("h1".into()),
        run: true,
    }];
    let elected = Input::Elected {
        generation: 1,
        desired,
        maintenance: vec![],
    };
    c.step(elected, 1);
    for (host, cmd) in sent(&mut c) {
        let reply = Input::Reply {
            cmd: cmd.id,
            seq: 1,
            reply: done(None),
        };
        c.step(reply, 2);
        let vms = if host == "h1" {
            vec![ObservedVm {
                name: "m".into(),
                state: ObservedState::Running,
                cpu_utilization: Some(0.2),
                rss_mib: Some(64),
                guest_resident_kib: None,
                dirty_pages_per_sec: None,
            }]
        } else {
            vec![]
        };
        let report = AgentReport {
            host,
            generation_seen: 1,
            seq: 2,
            last_command_id: cmd.id,
            vms,
            cpu_utilization: Some(0.2),
            parked_cores: Some(0),
        };
        c.step(Input::Report(report), 3);
    }
    sent(&mut c);
    assert!(c.ready(), "every host reported");
    c
}

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
        reply: done(Some("10.0.0.2:7100")),
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
            reply: done(Some("10.0.0.2:7100")),
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
