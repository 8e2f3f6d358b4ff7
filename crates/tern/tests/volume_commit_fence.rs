//! A coordinator frozen mid-commit cannot commit after its successor took over (real etcd, real
//! node processes).
//!
//! Node 1 is the coordinator. Its second metadata commit (a `create`) freezes it (SIGSTOP, the
//! debug-only fault point `commit-header`: the payload is written and flushed, the header that
//! would make it valid is not; the write is armed with node 1's commit watchdog). Its etcd
//! session runs out, and its commit watchdog — a process of its own — SIGKILLs it, which ends
//! a stopped process without letting it run again. Node 2 wins the election, waits the
//! watchdog's margin and commits under a higher generation — into the very slot node 1's
//! payload went to. Node 2 is then frozen too (so nothing it does can repair the LUN) and node
//! 1 is "continued": it is gone, its header never lands, and the newest valid metadata on the
//! LUN is still node 2's. (Without the kill, node 1 resumed between its last check and its
//! header write would land the header over node 2's slot: the slot's checksum fails and the
//! LUN falls back to node 1's older state and generation — what this test caught in 2 of 3
//! runs before, when the fault point's SIGSTOP reached the committing thread only after its
//! checks.)

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::volume::{Proc, call, format_lun};
use common::{free_port, scratch, tern, tern_cmd, wait_for};
use tern_test_support::{Etcd, require_tools};
use tern_volume::control::Request;
use tern_volume::lun::FileLun;
use tern_volume::store::Volume;

fn serve(dir: &Path, lun: &Path, etcd: &str, id: u32, env: &[(&str, &str)]) -> (String, Proc) {
    let addr = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(dir.join(format!("node{id}.log"))).unwrap();
    let mut cmd = Command::new(tern());
    cmd.args(["volume", "serve", "--node-id", &id.to_string()])
        .args(["--listen", &addr, "--etcd", etcd])
        .args(["--lease-ttl-ms", "1500", "--session-ttl", "2", "--lun"])
        .arg(lun)
        .stdout(Stdio::null())
        .stderr(log);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().unwrap();
    (addr, Proc(child))
}

fn status(addr: &str) -> Option<serde_json::Value> {
    call(addr, Request::Status).ok()
}

fn proc_state(pid: u32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit(')').next()?.trim().chars().next()
}

fn signal(pid: u32, sig: &str) {
    assert!(
        Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
}

#[test]
fn a_coordinator_frozen_mid_commit_cannot_commit_after_its_successor() {
    require_tools(&["etcd"]);
    #[cfg(not(debug_assertions))]
    panic!("the fault point this test freezes the coordinator at exists in debug builds only");
    let dir = scratch();
    let etcd = Etcd::start();
    let lun = dir.path().join("lun");
    format_lun(&lun);
    let log = |id: u32| {
        std::fs::read_to_string(dir.path().join(format!("node{id}.log"))).unwrap_or_default()
    };

    // Node 1 alone: it becomes coordinator (commit 1, let through) before node 2 starts.
    let (n1, p1) = serve(
        dir.path(),
        &lun,
        &etcd.url,
        1,
        &[
            ("TERN_TEST_STOP_AT", "commit-header"),
            ("TERN_TEST_STOP_SKIP", "1"),
        ],
    );
    wait_for("node 1 to coordinate", Duration::from_secs(30), || {
        status(&n1).is_some_and(|s| s["coordinator"]["node_id"] == 1)
    });
    let g1 = status(&n1).unwrap()["coordinator"]["generation"]
        .as_u64()
        .unwrap();
    let (n2, p2) = serve(dir.path(), &lun, &etcd.url, 2, &[]);
    wait_for("node 2 to answer", Duration::from_secs(30), || {
        status(&n2).is_some()
    });
    let pid1 = p1.0.id();
    let pid2 = p2.0.id();

    // Commit 2 freezes node 1 between its payload and its header.
    let mut create = Command::new(tern())
        .args([
            "volume", "create", "late.raw", "--size", "4M", "--node", &n1,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while proc_state(pid1) != Some('T') {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "node 1 never reached its stop point; log:\n{}",
            log(1)
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    // Node 2 takes office (a commit under its own, higher generation).
    wait_for("node 2 to take office", Duration::from_secs(30), || {
        status(&n2).is_some_and(|s| s["role"] == "coordinator")
    });
    let g2 = status(&n2).unwrap()["coordinator"]["generation"]
        .as_u64()
        .unwrap();
    assert!(g2 > g1, "generations {g1} -> {g2}");
    let before = Volume::open(&FileLun::open(&lun).unwrap()).unwrap();
    assert_eq!(before.meta.generation, g2, "node 2's take-over commit");
    assert!(!before.meta.files.contains_key("late.raw"));

    // Node 1's commit watchdog killed it while it was stopped mid-commit (a zombie until
    // reaped here, or gone).
    wait_for(
        "node 1 to be killed by its commit watchdog",
        Duration::from_secs(10),
        || matches!(proc_state(pid1), Some('Z') | None),
    );
    let said = Instant::now();
    while !log(1).contains("commit watchdog: a metadata write was still pending") {
        assert!(
            said.elapsed() < Duration::from_secs(5),
            "node 1 died without its commit watchdog saying so; log:\n{}",
            log(1)
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Nothing node 2 does can mend the LUN from here; node 1 "resumes" mid-commit.
    signal(pid2, "-STOP");
    signal(pid1, "-CONT");
    std::thread::sleep(Duration::from_millis(1000));
    let after = Volume::open(&FileLun::open(&lun).unwrap()).unwrap();
    signal(pid2, "-CONT");
    // Node 2's session may run out while it is frozen, and node 1 may legitimately take office
    // again (a higher generation still); what must never be is node 1's stale commit (or the
    // LUN falling back to node 1's older generation).
    assert!(
        after.meta.generation >= g2,
        "the LUN went back to generation {} (< {g2}): the frozen coordinator's late header \
         landed over its successor's commit (node 1 log:\n{})",
        after.meta.generation,
        log(1)
    );
    if after.meta.generation == g2 {
        assert_eq!(
            after.meta.seq, before.meta.seq,
            "node 1's commit under {g2}?"
        );
        assert!(
            !after.meta.files.contains_key("late.raw"),
            "node 1's late create became valid"
        );
    }

    // The create asked of node 1 was never acknowledged (node 1 died under it); the cluster
    // carries on at node 2: the create again, and another one.
    let status = create.wait().unwrap();
    assert!(
        !status.success(),
        "the create at the killed node 1 reported success"
    );
    for name in ["late.raw", "next.raw"] {
        let (code, _, err) = tern_cmd(&["volume", "create", name, "--size", "4M", "--node", &n2]);
        assert_eq!(code, 0, "{err}");
    }
    let fin = Volume::open(&FileLun::open(&lun).unwrap()).unwrap();
    assert!(fin.meta.generation >= g2);
    assert!(fin.meta.files.contains_key("late.raw") && fin.meta.files.contains_key("next.raw"));
    drop((p1, p2));
}

/// The node's commit watchdog process: the child of `pid` started with the watchdog variable.
fn watchdog_of(pid: u32) -> Option<u32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(child) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        let env = std::fs::read(format!("/proc/{child}/environ")).unwrap_or_default();
        if ppid == Some(pid)
            && env
                .split(|&b| b == 0)
                .any(|v| v.starts_with(b"TERN_VOLUME_COMMIT_WATCHDOG="))
        {
            return Some(child);
        }
    }
    None
}

#[test]
fn a_coordinator_whose_commit_watchdog_was_killed_starts_another_and_goes_on_committing() {
    // Before, a node that outlived its watchdog refused every metadata write while keeping the
    // coordinator's office: creates, lease changes and fencing failed until the node died.
    require_tools(&["etcd"]);
    let dir = scratch();
    let etcd = Etcd::start();
    let lun = dir.path().join("lun");
    format_lun(&lun);
    let (n1, p1) = serve(dir.path(), &lun, &etcd.url, 1, &[]);
    wait_for("node 1 to coordinate", Duration::from_secs(30), || {
        status(&n1).is_some_and(|s| s["coordinator"]["node_id"] == 1)
    });
    let pid1 = p1.0.id();
    let first = watchdog_of(pid1).expect("node 1 runs a commit watchdog");
    signal(first, "-KILL");
    let log = || std::fs::read_to_string(dir.path().join("node1.log")).unwrap_or_default();
    wait_for(
        "node 1 to see its watchdog end",
        Duration::from_secs(10),
        || log().contains("the commit watchdog ended"),
    );
    let (code, _, err) = tern_cmd(&[
        "volume",
        "create",
        "after.raw",
        "--size",
        "4M",
        "--node",
        &n1,
    ]);
    assert_eq!(
        code,
        0,
        "a create after the watchdog's death: {err}\nnode log:\n{}",
        log()
    );
    let second = watchdog_of(pid1).expect("a new commit watchdog");
    assert_ne!(second, first);
    assert!(log().contains("starting another"), "{}", log());
    let v = Volume::open(&FileLun::open(&lun).unwrap()).unwrap();
    assert!(v.meta.files.contains_key("after.raw"));
}
