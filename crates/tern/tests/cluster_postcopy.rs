//! Post-copy through the cluster: `POST /v1/vms/{name}/migrate` with `post_copy_after` moves a
//! test guest that rewrites its memory as fast as it can (pre-copy alone would have to throttle
//! it hard) from one host to the other; the task succeeds, its report shows post-copy did the
//! move, and the VM runs on the target without a restart. A `post_copy_after` out of range is a
//! 400 naming the range, and nothing is queued.
//!
//! `tern cluster up` with real etcd, network-namespace hosts, agents and a controller; needs root
//! (the target's userfaultfd), KVM and etcd, and fails loudly without them.

mod common;

use std::time::Duration;

use common::cluster::Lab;
use serde_json::{Value, json};
use tern_api::cluster::{TaskState, VmState};

#[test]
fn a_maximum_rate_writer_moves_by_post_copy_through_the_controller() {
    let lab = Lab::up("pc", 2, 1);
    // 128 MiB, 64 MiB of it rewritten at the vCPU's full speed (as in migrate_postcopy).
    let spec = json!({
        "name": "pc-w", "vcpus": 1, "memory_mib": 128, "kernel": "builtin:testguest",
        "cmdline": "tern.hb_ms=200 tern.dirty_mib=64 tern.dirty_rate=0",
    });
    let (st, body) = lab.api("POST", "/v1/vms", Some(&spec));
    assert!(st == 200 || st == 201, "POST /v1/vms: {st} {body}");
    let vms = lab.wait_running(&["pc-w"], Duration::from_secs(60));
    let from = vms[0].host.clone().expect("placed");
    let to = if from == "h0" { "h1" } else { "h0" };

    // Out of range: refused by name, nothing queued.
    for bad in [0, 1001] {
        let (st, body) = lab.api(
            "POST",
            "/v1/vms/pc-w/migrate",
            Some(&json!({"to": to, "post_copy_after": bad})),
        );
        assert_eq!(st, 400, "{body}");
        assert!(
            body.contains(&format!(
                "post_copy_after = {bad} is out of range: allowed 1..=1000"
            )),
            "{body}"
        );
    }
    let (st, body) = lab.api("GET", "/v1/tasks", None);
    assert_eq!(st, 200, "{body}");
    assert_eq!(body.trim(), "[]", "a refused request queues nothing");

    // After the full copy (one round): the switch comes whatever pre-copy would decide.
    let (st, body) = lab.api(
        "POST",
        "/v1/vms/pc-w/migrate",
        Some(&json!({"to": to, "post_copy_after": 1})),
    );
    assert_eq!(st, 202, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let id = v["task"].as_u64().expect("a task id");
    let t = lab.wait_task(id, Duration::from_secs(60));
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{}", lab.logs());
    let report = t.report.clone().expect("the source VMM's report");
    assert_eq!(report["outcome"], "completed", "{report}");
    assert_eq!(
        report["rounds"].as_u64(),
        Some(2),
        "the full copy, then the switch: {report}"
    );
    let pc = &report["post_copy"];
    let n = |k: &str| {
        pc[k]
            .as_u64()
            .unwrap_or_else(|| panic!("post_copy.{k} missing: {report}"))
    };
    assert!(
        n("pages_owed") > 256,
        "the writer's pages are owed: {report}"
    );
    assert!(
        n("pages_demanded") + n("pages_pushed") >= n("pages_owed"),
        "every owed page was sent: {report}"
    );
    // The VM runs on the target, moved live: no restart.
    let vms = lab.wait_running(&["pc-w"], Duration::from_secs(30));
    let vm = vms.iter().find(|v| v.name == "pc-w").unwrap();
    assert_eq!(vm.host.as_deref(), Some(to), "{vm:?}");
    assert_eq!(vm.state, VmState::Running);
    assert_eq!(vm.restarts, 0, "{vm:?}");
    eprintln!(
        "post-copy through the controller: {} ms, {}",
        report["total_ms"], report["post_copy"]
    );
}
