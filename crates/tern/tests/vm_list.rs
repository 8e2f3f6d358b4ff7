//! `tern vm list` and `--name` against real test-guest VMs: every VM gets a control socket in the
//! runtime directory's private `api/` directory by default, the control commands find it by name, and entries left by VMMs
//! that died are shown as `dead` and removed by `--prune`. Needs root and /dev/kvm.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{RunningVm, field, require_kvm, scratch, tern_cmd};

/// Starts the test guest named `name` (no --api-sock) with its entry in `rt`, and waits for its
/// second heartbeat.
fn start_guest(dir: &Path, rt: &Path, name: &str, vcpus: &str, mib: &str) -> RunningVm {
    let mut vm = RunningVm::start_tern(
        dir,
        name,
        &[
            "vm",
            "run",
            "--kernel",
            "builtin:testguest",
            "--memory-mib",
            mib,
            "--vcpus",
            vcpus,
            "--cmdline",
            "tern.hb_ms=50",
            "--name",
            name,
            "--runtime-dir",
            rt.to_str().unwrap(),
            "--snapshot-dir",
            dir.to_str().unwrap(),
        ],
    );
    vm.wait_line(Duration::from_secs(30), |l| {
        l.starts_with("HB ") && field(l, "seq").is_some_and(|s| s >= 2)
    });
    vm
}

fn list_json(rt: &Path) -> Vec<serde_json::Value> {
    let (rc, out, err) = tern_cmd(&[
        "vm",
        "list",
        "--json",
        "--runtime-dir",
        rt.to_str().unwrap(),
    ]);
    assert_eq!(rc, 0, "vm list --json: {err}");
    serde_json::from_str::<serde_json::Value>(&out)
        .unwrap_or_else(|e| panic!("vm list --json printed no JSON ({e}): {out}"))
        .as_array()
        .expect("a JSON array")
        .clone()
}

fn by_name<'a>(rows: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    rows.iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no row for {name}: {rows:?}"))
}

fn named(verb: &str, name: &str, rt: &Path) -> (i32, String, String) {
    tern_cmd(&[
        "vm",
        verb,
        "--name",
        name,
        "--runtime-dir",
        rt.to_str().unwrap(),
    ])
}

#[test]
fn list_shows_running_vms_and_name_drives_them_through_their_default_sockets() {
    require_kvm();
    let dir = scratch();
    let rt = dir.path().join("rt");
    let mut one = start_guest(dir.path(), &rt, "one", "1", "64");
    let mut two = start_guest(dir.path(), &rt, "two", "2", "96");

    // Started without --api-sock, each VM serves RUNTIME_DIR/api/NAME.sock.
    for name in ["one", "two"] {
        let sock = rt.join(format!("api/{name}.sock"));
        assert!(
            std::os::unix::net::UnixStream::connect(&sock).is_ok(),
            "{} is not served",
            sock.display()
        );
    }

    let rows = list_json(&rt);
    assert_eq!(rows.len(), 2, "{rows:?}");
    for (name, vm, vcpus, mib) in [("one", &one, 1, 64), ("two", &two, 2, 96)] {
        let r = by_name(&rows, name);
        assert_eq!(r["pid"], vm.child.id(), "{r}");
        assert_eq!(r["state"], "running", "{r}");
        assert_eq!(r["vcpus"], vcpus, "{r}");
        assert_eq!(r["memory_mib"], mib, "{r}");
        assert!(r["uptime_ms"].as_u64().is_some_and(|u| u > 0), "{r}");
        assert_eq!(
            r["api_sock"],
            rt.join(format!("api/{name}.sock")).to_str().unwrap(),
            "{r}"
        );
    }

    // The table: a header, then one aligned line per VM with the same facts.
    let (rc, out, err) = tern_cmd(&["vm", "list", "--runtime-dir", rt.to_str().unwrap()]);
    assert_eq!(rc, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME", "PID", "STATE", "VCPUS", "MEMORY", "UPTIME", "SOCKET"
        ]
    );
    let two_line: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(two_line[0], "two", "{out}");
    assert_eq!(two_line[1], two.child.id().to_string(), "{out}");
    assert_eq!(&two_line[2..5], ["running", "2", "96"], "{out}");
    let sock_col = lines[0].find("SOCKET").unwrap();
    assert_eq!(
        &lines[1][sock_col..],
        rt.join("api/one.sock").to_str().unwrap(),
        "columns are aligned:\n{out}"
    );

    // --name wherever --api-sock is accepted.
    assert_eq!(named("pause", "one", &rt).0, 0);
    let (rc, out, err) = named("status", "one", &rt);
    assert_eq!(rc, 0, "{err}");
    assert!(out.contains("\"paused\""), "{out}");
    assert_eq!(by_name(&list_json(&rt), "one")["state"], "paused");
    assert_eq!(by_name(&list_json(&rt), "two")["state"], "running");
    assert_eq!(named("resume", "one", &rt).0, 0);
    let before = {
        one.collect_for(Duration::from_millis(200));
        one.last_hb().unwrap()
    };
    one.collect_for(Duration::from_millis(500));
    assert!(one.last_hb().unwrap() > before, "resumed by name, it beats");

    let snap = dir.path().join("two.snap");
    let (rc, _, err) = tern_cmd(&[
        "vm",
        "snapshot",
        "--name",
        "two",
        "--runtime-dir",
        rt.to_str().unwrap(),
        "--out",
        snap.to_str().unwrap(),
        "--stop",
    ]);
    assert_eq!(rc, 0, "snapshot --name: {err}");
    assert_eq!(two.wait_exit(Duration::from_secs(10)), 0);
    assert!(snap.exists());
    assert!(
        two.stderr().contains(&format!(
            "VM stopped after its snapshot to {}",
            snap.display()
        )),
        "the VMM says where its VM went: {}",
        two.stderr()
    );

    let (rc, _, err) = named("stop", "one", &rt);
    assert_eq!(rc, 0, "stop --name: {err}");
    assert_eq!(one.wait_exit(Duration::from_secs(10)), 0);
    assert!(
        one.stderr().contains("VM stopped (tern vm stop)"),
        "{}",
        one.stderr()
    );
    assert!(
        !rt.join("api/one.sock").exists(),
        "the default socket goes with the VM"
    );
    assert!(!rt.join("one.json").exists());
    assert!(list_json(&rt).is_empty());
    let (rc, out, err) = tern_cmd(&["vm", "list", "--runtime-dir", rt.to_str().unwrap()]);
    assert_eq!((rc, out.as_str()), (0, ""), "{err}");
    assert!(err.contains("no VMs in"), "{err}");
}

/// A process that has exited: its PID names nobody (PIDs are not reused this soon).
fn dead_pid() -> u32 {
    let mut c = std::process::Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    pid
}

#[test]
fn entries_of_dead_vmms_are_listed_as_dead_refused_by_name_and_pruned() {
    let dir = scratch();
    let rt = dir.path().join("rt");
    std::fs::create_dir_all(&rt).unwrap();
    let rts = rt.to_str().unwrap();
    let gone = dead_pid();
    // A VMM that died: its entry and its socket file stay behind.
    let sock = rt.join("crashed.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    std::fs::write(
        rt.join("crashed.json"),
        serde_json::json!({"name": "crashed", "pid": gone, "api_sock": sock, "vcpu_tids": [gone + 1],
                           "vcpus": 1, "memory_mib": 64, "started_unix_ms": 1, "pid_start_ticks": 5})
        .to_string(),
    )
    .unwrap();
    // Its PID reused by another process: the start time tells them apart.
    let me = std::process::id();
    std::fs::write(
        rt.join("reused.json"),
        serde_json::json!({"name": "reused", "pid": me, "api_sock": null, "vcpu_tids": [],
                           "pid_start_ticks": u64::MAX})
        .to_string(),
    )
    .unwrap();
    // An entry in the first format (no vcpus, memory, start time), by a live VMM without a socket.
    let mut sleeper = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    std::fs::write(
        rt.join("old.json"),
        format!(
            r#"{{"name":"old","pid":{},"api_sock":null,"vcpu_tids":[]}}"#,
            sleeper.id()
        ),
    )
    .unwrap();
    std::fs::write(rt.join("junk.json"), "{not an entry").unwrap();

    let rows = list_json(&rt);
    let states: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (r["name"].as_str().unwrap(), r["state"].as_str().unwrap()))
        .collect();
    assert_eq!(
        states,
        [("crashed", "dead"), ("old", "unknown"), ("reused", "dead")]
    );
    assert!(by_name(&rows, "old")["vcpus"].is_null());

    let (rc, out, err) = tern_cmd(&["vm", "list", "--runtime-dir", rts]);
    assert_eq!(rc, 0);
    assert!(
        out.lines()
            .any(|l| l.starts_with("crashed") && l.contains(" dead ")),
        "{out}"
    );
    assert!(err.contains("2 stale entries"), "{err}");
    assert!(err.contains("--prune"), "{err}");
    assert!(err.contains("junk.json"), "a bad entry is named: {err}");

    let (rc, _, err) = named("stop", "crashed", &rt);
    assert_ne!(rc, 0);
    assert!(
        err.contains("not running") && err.contains(&gone.to_string()),
        "{err}"
    );
    let (rc, _, err) = named("status", "old", &rt);
    assert_ne!(rc, 0);
    assert!(
        err.contains("without a control socket") && err.contains("kill -TERM"),
        "{err}"
    );
    let (rc, _, err) = named("status", "nosuch", &rt);
    assert_ne!(rc, 0);
    assert!(err.contains("no VM named \"nosuch\""), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");

    let (rc, out, err) = tern_cmd(&["vm", "list", "--prune", "--runtime-dir", rts]);
    assert_eq!(rc, 0, "{err}");
    assert!(
        err.contains("removed the stale entry of VM \"crashed\""),
        "{err}"
    );
    assert!(!rt.join("crashed.json").exists());
    assert!(!sock.exists(), "the dead VM's socket is removed too");
    assert!(!rt.join("reused.json").exists());
    assert!(rt.join("old.json").exists(), "a live VMM's entry stays");
    assert!(out.contains("old"), "{out}");
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
}

#[test]
fn control_commands_need_a_socket_or_a_name_but_not_both() {
    let (rc, _, err) = tern_cmd(&["vm", "status"]);
    assert_ne!(rc, 0);
    assert!(
        err.contains("--api-sock") && err.contains("--name"),
        "{err}"
    );
    let (rc, _, err) = tern_cmd(&["vm", "stop", "--api-sock", "/x.sock", "--name", "x"]);
    assert_ne!(rc, 0);
    assert!(err.contains("cannot be used with"), "{err}");
}

#[test]
fn a_live_vms_name_is_refused_but_a_dead_ones_whose_pid_was_reused_is_free() {
    require_kvm();
    let dir = scratch();
    let rt = dir.path().join("rt");
    let rts = rt.to_str().unwrap();
    let k = dir.path().join("k");
    std::fs::write(
        &k,
        tern_vmm::testing::tiny_pvh_elf("done\n", tern_vmm::testing::TinyEnd::PowerOff(0)),
    )
    .unwrap();
    let run = |name: &str| {
        tern_cmd(&[
            "vm",
            "run",
            "--kernel",
            k.to_str().unwrap(),
            "--memory-mib",
            "32",
            "--name",
            name,
            "--runtime-dir",
            rts,
        ])
    };
    // A dead VMM's entry whose PID now belongs to another live process (this test).
    std::fs::create_dir_all(&rt).unwrap();
    std::fs::write(
        rt.join("ghost.json"),
        serde_json::json!({"name": "ghost", "pid": std::process::id(), "api_sock": null,
                           "vcpu_tids": [], "pid_start_ticks": u64::MAX})
        .to_string(),
    )
    .unwrap();
    let (rc, out, err) = run("ghost");
    assert_eq!((rc, out.as_str()), (0, "done\n"), "{err}");
    assert!(!rt.join("ghost.json").exists());

    let mut live = start_guest(dir.path(), &rt, "busy", "1", "64");
    let (rc, _, err) = run("busy");
    assert_ne!(rc, 0);
    assert!(
        err.contains(&format!("already running as pid {}", live.child.id())),
        "{err}"
    );
    assert_eq!(named("stop", "busy", &rt).0, 0);
    assert_eq!(live.wait_exit(Duration::from_secs(10)), 0);
}
