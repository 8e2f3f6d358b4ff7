//! `tern vm migrate --resolve` for a source whose disk is a cluster-shared-volume file (real etcd,
//! real node processes, real KVM, loopback): the migration handed the disk's write lease to the
//! target's node before its `Commit` went out unanswered, so settling it must also settle the
//! lease. A target that never ran the VM (it crashed during restore) → the source takes the lease
//! back (higher epoch) before it resumes; a target that runs the VM → the source is stopped and the
//! lease stays there; a target that took the disk over and then died → the lease cannot come back
//! (the hand-over was confirmed), so the source stays paused, in doubt (exit 3).

mod common;
#[path = "common/faultproxy.rs"]
mod faultproxy;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::volume::{Cluster, start_volume_guest};
use common::{RunningVm, free_port, tern, tern_cmd, wait_for_text};
use faultproxy::{Disposition, FaultProxy, Phase};
use serde_json::Value;
use tern_volume::client::{OpenError, VolumeDisk};

const FILE: &str = "vm1.raw";

/// `tern volume stat FILE --json`: (holder, epoch).
fn lease(node: &str) -> (Option<u64>, u64) {
    let (rc, out, err) = tern_cmd(&["volume", "stat", FILE, "--node", node, "--json"]);
    assert_eq!(rc, 0, "volume stat: {err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    (
        v["lease"]["holder"].as_u64(),
        v["lease"]["epoch"].as_u64().unwrap(),
    )
}

/// Whether a writer on `node` is refused the file (someone else holds or is handed the lease).
fn busy_for(node: &str) -> bool {
    matches!(
        VolumeDisk::open(&format!("{node}/{FILE}"), false),
        Err(OpenError::Busy { .. })
    )
}

/// A source VMM running the test guest on `volume://N1/FILE` (its virtio-blk check wrote and read
/// back the disk), and a target waiting with `--disk volume://N2/FILE`.
struct Setup {
    c: Cluster,
    n1: String,
    n2: String,
    src: RunningVm,
    dst: RunningVm,
    src_sock: PathBuf,
    dst_sock: PathBuf,
    port: u16,
}

impl Setup {
    fn start(crash_after_restore: bool) -> Setup {
        let mut c = Cluster::start();
        let n1 = c.spawn(1, &[]);
        let n2 = c.spawn(2, &[]);
        let (code, _, err) = tern_cmd(&["volume", "create", FILE, "--size", "4M", "--node", &n1]);
        assert_eq!(code, 0, "{err}");
        let dir = c.dir.path().join("vms");
        common::private_dir(&dir);
        let rt = dir.join("rt");
        let src_sock = dir.join("src.sock");
        let dst_sock = dir.join("dst.sock");
        let src = start_volume_guest(&dir, &format!("volume://{n1}/{FILE}"), &src_sock, &rt);
        let port = free_port();
        let mut rcv = Command::new(tern());
        rcv.args(["vm", "receive", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--name", "dst", "--disk", &format!("volume://{n2}/{FILE}")])
            .args(["--api-sock", dst_sock.to_str().unwrap()])
            .args(["--runtime-dir", rt.to_str().unwrap()]);
        if crash_after_restore {
            rcv.env("TERN_TEST_FAULT", "crash-after-restore");
        }
        let dst = RunningVm::start_command(&dir, "dst", rcv);
        wait_for_text(
            &dir.join("dst.stderr"),
            "waiting for a migration",
            Duration::from_secs(20),
        );
        Setup {
            c,
            n1,
            n2,
            src,
            dst,
            src_sock,
            dst_sock,
            port,
        }
    }

    /// `tern vm migrate --to 127.0.0.1:PORT --disk-successor 2 --json`: exit status, report,
    /// stderr.
    fn migrate(&self, port: u16) -> (i32, Value, String) {
        let (rc, out, err) = tern_cmd(&[
            "vm",
            "migrate",
            "--api-sock",
            self.src_sock.to_str().unwrap(),
            "--to",
            &format!("127.0.0.1:{port}"),
            "--disk-successor",
            "2",
            "--json",
        ]);
        (
            rc,
            serde_json::from_str(out.trim()).unwrap_or(Value::Null),
            err,
        )
    }

    /// `tern vm migrate --resolve` against the target's own address.
    fn resolve(&self) -> (i32, String) {
        common::resolve_in_doubt(&self.src_sock, self.port)
    }

    fn src_state(&self) -> String {
        let (rc, out, err) = tern_cmd(&[
            "vm",
            "status",
            "--api-sock",
            self.src_sock.to_str().unwrap(),
        ]);
        assert_eq!(rc, 0, "vm status: {err}");
        out
    }

    /// Migrates and expects the source paused in doubt, with the lease handed to node 2 (a higher
    /// epoch than before). Returns the hand-over's epoch.
    fn migrate_into_doubt(&self, port: u16, epoch_before: u64) -> u64 {
        let (rc, report, err) = self.migrate(port);
        assert_eq!(
            (rc, report["outcome"].as_str()),
            (3, Some("in_doubt")),
            "migrate: {err}\nreport: {report}\ntarget:\n{}",
            self.dst.stderr()
        );
        assert!(
            self.src_state().contains("\"paused\""),
            "a source in doubt stays paused"
        );
        let (holder, epoch) = lease(&self.n1);
        assert_eq!(
            holder,
            Some(2),
            "the lease went to the target's node before the commit"
        );
        assert!(epoch > epoch_before, "{epoch_before} → {epoch}");
        epoch
    }
}

/// The guest's heartbeats on `vm` advance by at least 5 within about 1.4 s.
fn assert_runs(vm: &mut RunningVm, who: &str) {
    vm.collect_for(Duration::from_millis(200));
    let before = vm.last_hb().unwrap_or(0);
    vm.collect_for(Duration::from_millis(1200));
    vm.assert_no_panic();
    let after = vm.last_hb().unwrap_or(0);
    assert!(
        after >= before + 5,
        "the guest must run on the {who}: heartbeat {before} → {after}\nstderr:\n{}",
        vm.stderr()
    );
}

/// The target crashed right after restoring the state, before it took the disk over or ran the
/// guest: `--resolve` finds its address free, the source takes the lease back and resumes, owns
/// the disk again (node 2 is refused), and releases the lease when it stops.
#[test]
fn resolve_takes_the_lease_back_when_the_target_never_ran() {
    let t0 = Instant::now();
    let mut s = Setup::start(true);
    let (holder, epoch0) = lease(&s.n1);
    assert_eq!(holder, Some(1), "the source host holds the write lease");
    let epoch_h = s.migrate_into_doubt(s.port, epoch0);
    assert_ne!(
        s.dst.wait_exit(Duration::from_secs(20)),
        0,
        "the target crashed"
    );
    assert!(
        s.dst.stderr().contains("crash-after-restore"),
        "{}",
        s.dst.stderr()
    );
    assert!(
        !s.dst.seen.iter().any(|l| l.starts_with("HB ")),
        "the target never ran the guest"
    );

    let (rc, why) = s.resolve();
    assert_eq!(rc, 1, "resolve: {why}");
    assert!(why.contains("resumed here"), "{why}");
    let (holder, epoch) = lease(&s.n1);
    assert_eq!(holder, Some(1), "the lease is back with the source's node");
    assert!(
        epoch > epoch_h,
        "taken back at a higher epoch: {epoch_h} → {epoch}"
    );
    assert!(busy_for(&s.n2), "node 2 must no longer get write access");
    assert_runs(&mut s.src, "source");
    assert!(
        !s.src.stderr().contains("taking the disk"),
        "{}",
        s.src.stderr()
    );

    // The source's disk is a writer again: stopping the VM flushes and releases the lease (a
    // disk still handed over would leave it pending to node 2).
    let (rc, _, err) = tern_cmd(&["vm", "stop", "--api-sock", s.src_sock.to_str().unwrap()]);
    assert_eq!(rc, 0, "{err}");
    assert_eq!(
        s.src.wait_exit(Duration::from_secs(10)),
        0,
        "{}",
        s.src.stderr()
    );
    assert_eq!(
        lease(&s.n1).0,
        None,
        "the source released its lease on exit"
    );
    assert!(!busy_for(&s.n1), "the file is free for a new writer");
    eprintln!(
        "resolve_takes_the_lease_back_when_the_target_never_ran: {:?}",
        t0.elapsed()
    );
}

/// The target committed and runs the guest; its `Running` is black-holed, so the source ends in
/// doubt (30 s acknowledgement timeout). `--resolve` stops the source; the lease stays with node 2.
/// Then a second migration whose target is killed once it took the disk over and ran (its
/// `Running` dies with it): its address is free, but the lease cannot come back, so `--resolve`
/// leaves the source paused (exit 3) rather than run a second history of the disk.
#[test]
fn resolve_leaves_the_lease_with_a_target_that_took_it() {
    let t0 = Instant::now();
    let mut s = Setup::start(false);
    let (_, epoch0) = lease(&s.n1);
    let proxy = FaultProxy::start(s.port, Phase::AfterCommit, || Disposition::BlackHole);
    let epoch_h = s.migrate_into_doubt(proxy.port, epoch0);
    assert!(proxy.fired());
    assert_runs(&mut s.dst, "target");

    let (rc, why) = s.resolve();
    assert_eq!(rc, 0, "resolve: {why}");
    assert_eq!(
        s.src.wait_exit(Duration::from_secs(10)),
        0,
        "{}",
        s.src.stderr()
    );
    drop(proxy);
    assert_eq!(
        lease(&s.n1),
        (Some(2), epoch_h),
        "the target keeps the lease"
    );
    assert!(busy_for(&s.n1), "node 1 must not get write access");
    assert_runs(&mut s.dst, "target");
    eprintln!(
        "  in doubt, target runs: resolve 0 after {:?}",
        t0.elapsed()
    );

    // Back from node 2 to node 1 over a proxy that kills the new target (on node 1) as its
    // `Running` passes: it confirmed the hand-over and ran the guest.
    let (n1, n2) = (s.n1.clone(), s.n2.clone());
    let dir = s.c.dir.path().join("vms");
    let rt = dir.join("rt");
    let port = free_port();
    let mut back = RunningVm::start_tern(
        &dir,
        "back",
        &[
            "vm",
            "receive",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--name",
            "back",
            "--disk",
            &format!("volume://{n1}/{FILE}"),
            "--api-sock",
            dir.join("back.sock").to_str().unwrap(),
            "--runtime-dir",
            rt.to_str().unwrap(),
        ],
    );
    wait_for_text(
        &dir.join("back.stderr"),
        "waiting for a migration",
        Duration::from_secs(20),
    );
    let back_pid = back.child.id();
    let proxy = FaultProxy::start(port, Phase::AfterCommit, move || {
        let _ = Command::new("kill")
            .args(["-KILL", &back_pid.to_string()])
            .status();
        std::thread::sleep(Duration::from_millis(100));
        Disposition::Drop
    });
    let (rc, out, err) = tern_cmd(&[
        "vm",
        "migrate",
        "--api-sock",
        s.dst_sock.to_str().unwrap(),
        "--to",
        &format!("127.0.0.1:{}", proxy.port),
        "--disk-successor",
        "1",
        "--json",
    ]);
    let report: Value = serde_json::from_str(out.trim()).unwrap_or(Value::Null);
    assert_eq!(
        (rc, report["outcome"].as_str()),
        (3, Some("in_doubt")),
        "{err}\n{report}"
    );
    assert!(proxy.fired());
    drop(proxy);
    assert_eq!(back.wait_exit(Duration::from_secs(10)), -1, "killed");
    // It sent `Running`: it had confirmed the hand-over (before its guest's first instruction).
    assert_ne!(
        lease(&n2).0,
        Some(2),
        "the killed target's node took the lease"
    );
    let (rc, _, why) = tern_cmd(&[
        "vm",
        "migrate",
        "--api-sock",
        s.dst_sock.to_str().unwrap(),
        "--to",
        &format!("127.0.0.1:{port}"),
        "--resolve",
    ]);
    assert_eq!(rc, 3, "resolve: {why}");
    assert!(why.contains("still in doubt"), "{why}");
    let (rc, out, err) = tern_cmd(&["vm", "status", "--api-sock", s.dst_sock.to_str().unwrap()]);
    assert_eq!(rc, 0, "{err}");
    assert!(
        out.contains("\"paused\""),
        "the node-2 copy stays paused: {out}"
    );
    assert_ne!(
        lease(&n2).0,
        Some(2),
        "node 2 did not get the lease back from a confirmed hand-over"
    );
    let (rc, _, err) = tern_cmd(&["vm", "stop", "--api-sock", s.dst_sock.to_str().unwrap()]);
    assert_eq!(rc, 0, "{err}");
    assert_eq!(
        s.dst.wait_exit(Duration::from_secs(10)),
        0,
        "{}",
        s.dst.stderr()
    );
    eprintln!(
        "resolve_leaves_the_lease_with_a_target_that_took_it: {:?}",
        t0.elapsed()
    );
}
