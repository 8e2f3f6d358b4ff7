//! The migration fault matrix (docs/migration.md, "Fault matrix"): every fault at every phase of
//! a live migration of a real KVM test guest with a writer, and `tern vm migrate --resolve` for
//! the cells that end in doubt. A frame-aware proxy between source and target (common/faultproxy.rs)
//! strikes when the stream reaches the phase. Each cell asserts the exit codes of
//! `tern vm migrate` (and `--resolve`), the report's outcome, which process runs the guest
//! afterwards (its heartbeats advance there and nowhere else), and that the losing side's VMM is
//! gone. One test per fault; its phases run in parallel threads.

mod common;
#[path = "common/faultproxy.rs"]
mod faultproxy;

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::{
    RunningVm, field, free_port, pki, require_kvm, scratch, tern, tern_cmd, wait_for_text,
};
use faultproxy::{Disposition, FaultProxy, Phase};

/// 64 MiB guest, heartbeat every 50 ms, a writer dirtying 8 MiB at 2,000 pages/s.
const GUEST: &str = "tern.hb_ms=50 tern.dirty_mib=8 tern.dirty_rate=2000";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    TargetKilled,
    SourceKilled,
    TargetFrozen,
    LinkBlackHoled,
    CorruptFrame,
    ThirdParty,
    TargetCrashInRestore,
    Cancel,
}

/// Who runs the guest once the cell is settled (after `--resolve` where it ended in doubt).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Runs {
    Source,
    Target,
    /// The source was killed before the target could run it: the guest died with its host.
    Neither,
    /// In doubt until the frozen target thaws; then whichever the target decided (its idle
    /// timeout and the buffered commit race), and `--resolve` follows it.
    Either,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Expect {
    /// `tern vm migrate`'s exit status.
    rc: i32,
    /// The report's outcome ("" when there is no report: the source VMM died).
    outcome: &'static str,
    runs: Runs,
}

/// A cell's outcome, or either of two where the fault races the source's own next step.
type Cell2 = (Expect, Option<Expect>);

const fn e(rc: i32, outcome: &'static str, runs: Runs) -> Option<Cell2> {
    Some((Expect { rc, outcome, runs }, None))
}

/// Either `a` or `b`: the fault lands while the source computes the memory digest, paused;
/// whether the source writes the commit before it notices the fault is a race.
const fn race(a: Option<Cell2>, b: Option<Cell2>) -> Option<Cell2> {
    match (a, b) {
        (Some((a, _)), Some((b, _))) => Some((a, Some(b))),
        _ => None,
    }
}

/// The matrix (docs/migration.md). `None`: the fault cannot happen in that phase.
fn expect(f: Fault, p: Phase) -> Option<Cell2> {
    use Phase::*;
    use Runs::*;
    match (f, p) {
        (Fault::TargetKilled, Handshake | PreCopy) => e(1, "failed", Source),
        (Fault::TargetKilled, StopAndCopy) => {
            race(e(1, "failed", Source), e(3, "in_doubt", Source))
        }
        (Fault::TargetKilled, Commit | AfterCommit) => e(3, "in_doubt", Source),
        (Fault::SourceKilled, Handshake | PreCopy | StopAndCopy) => e(1, "", Neither),
        (Fault::SourceKilled, Commit | AfterCommit) => e(1, "", Target),
        (Fault::TargetFrozen, Handshake | PreCopy) => e(1, "failed", Source),
        // The last frames and the commit fit in the socket buffers: the source cannot tell.
        (Fault::TargetFrozen, StopAndCopy | Commit) => e(3, "in_doubt", Either),
        (Fault::TargetFrozen, AfterCommit) => e(0, "completed", Target),
        (Fault::LinkBlackHoled, Handshake | PreCopy) => e(1, "failed", Source),
        (Fault::LinkBlackHoled, StopAndCopy | Commit) => e(3, "in_doubt", Source),
        (Fault::LinkBlackHoled, AfterCommit) => e(3, "in_doubt", Target),
        (Fault::CorruptFrame, Handshake | PreCopy | StopAndCopy | Commit) => e(1, "failed", Source),
        (Fault::CorruptFrame, AfterCommit) => e(3, "in_doubt", Target),
        (Fault::ThirdParty, _) => e(0, "completed", Target),
        (Fault::TargetCrashInRestore, Commit) => e(3, "in_doubt", Source),
        (Fault::TargetCrashInRestore, _) => None,
        (Fault::Cancel, Handshake | PreCopy) => e(1, "cancelled", Source),
        (Fault::Cancel, StopAndCopy) => race(e(1, "cancelled", Source), e(0, "completed", Target)),
        (Fault::Cancel, Commit | AfterCommit) => e(0, "completed", Target),
    }
}

fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(st.success(), "kill -{sig} {pid} failed");
}

fn alive(vm: &mut RunningVm) -> bool {
    matches!(vm.child.try_wait(), Ok(None))
}

struct Cell {
    fault: Fault,
    phase: Phase,
    dir: tempfile::TempDir,
    port: u16,
    src: RunningVm,
    dst: RunningVm,
    src_sock: PathBuf,
    dst_sock: PathBuf,
}

impl Cell {
    fn tag(&self) -> String {
        format!("{:?}×{}", self.fault, self.phase.name())
    }

    fn start(fault: Fault, phase: Phase) -> Cell {
        let dir = scratch();
        let port = free_port();
        let rt = dir.path().join("rt");
        let src_sock = dir.path().join("src.sock");
        let dst_sock = dir.path().join("dst.sock");
        let mut rcv = Command::new(tern());
        rcv.args(["vm", "receive", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--name", "dst", "--api-sock", dst_sock.to_str().unwrap()])
            .args(["--runtime-dir", rt.to_str().unwrap()]);
        if fault == Fault::TargetCrashInRestore {
            rcv.env("TERN_TEST_FAULT", "crash-after-restore");
        }
        let dst = RunningVm::start_command(dir.path(), "dst", rcv);
        wait_for_text(
            &dir.path().join("dst.stderr"),
            "waiting for a migration",
            Duration::from_secs(20),
        );
        let mut src = RunningVm::start_tern(
            dir.path(),
            "src",
            &[
                "vm",
                "run",
                "--kernel",
                "builtin:testguest",
                "--memory-mib",
                "64",
                "--cmdline",
                GUEST,
                "--name",
                "src",
                "--api-sock",
                src_sock.to_str().unwrap(),
                "--runtime-dir",
                rt.to_str().unwrap(),
            ],
        );
        src.wait_line(Duration::from_secs(30), |l| {
            l.starts_with("HB ") && field(l, "seq").is_some_and(|s| s >= 3)
        });
        Cell {
            fault,
            phase,
            dir,
            port,
            src,
            dst,
            src_sock,
            dst_sock,
        }
    }

    /// The fault the proxy runs when the phase is reached.
    fn fault_fn(&self) -> Box<dyn FnOnce() -> Disposition + Send> {
        let (src_pid, dst_pid, port) = (self.src.child.id(), self.dst.child.id(), self.port);
        let src_sock = self.src_sock.clone();
        match self.fault {
            // The marking frame dies with the target (a frame it sent had not left it yet).
            Fault::TargetKilled => Box::new(move || {
                signal(dst_pid, "KILL");
                thread::sleep(Duration::from_millis(100));
                Disposition::Drop
            }),
            Fault::SourceKilled => Box::new(move || {
                signal(src_pid, "KILL");
                thread::sleep(Duration::from_millis(100));
                Disposition::Forward
            }),
            Fault::TargetFrozen => Box::new(move || {
                signal(dst_pid, "STOP");
                Disposition::Forward
            }),
            Fault::LinkBlackHoled => Box::new(|| Disposition::BlackHole),
            Fault::CorruptFrame => Box::new(|| Disposition::Corrupt),
            Fault::ThirdParty => Box::new(move || {
                // A stranger's connection to the receive port: a frame-looking join with a bad
                // checksum, and a second connection that says nothing.
                let mut bad = TcpStream::connect(("127.0.0.1", port)).expect("third party");
                let mut join = b"TRNM\x01\x04\x00\x00\x0a\x00\x00\x00\xde\xad\xbe\xef".to_vec();
                join.extend_from_slice(&[7u8; 10]);
                let _ = bad.write_all(&join);
                let silent = TcpStream::connect(("127.0.0.1", port)).expect("third party");
                thread::sleep(Duration::from_millis(300));
                drop((bad, silent));
                Disposition::Forward
            }),
            Fault::TargetCrashInRestore => Box::new(|| Disposition::Forward),
            Fault::Cancel => Box::new(move || {
                let (rc, _, err) = tern_cmd(&[
                    "vm",
                    "migrate",
                    "--api-sock",
                    src_sock.to_str().unwrap(),
                    "--cancel",
                ]);
                assert_eq!(rc, 0, "migrate --cancel: {err}");
                Disposition::Forward
            }),
        }
    }

    fn migrate(&self, port: u16) -> (i32, serde_json::Value, String) {
        let (rc, out, err) = tern_cmd(&[
            "vm",
            "migrate",
            "--api-sock",
            self.src_sock.to_str().unwrap(),
            "--to",
            &format!("127.0.0.1:{port}"),
            "--json",
            // The digest of all memory keeps the source paused, before it writes the commit,
            // for a while after the last pages: long enough for a fault to land there.
            "--verify-memory",
        ]);
        let report = serde_json::from_str(out.trim()).unwrap_or(serde_json::Value::Null);
        (rc, report, err)
    }

    fn resolve(&self) -> (i32, String) {
        common::resolve_in_doubt(&self.src_sock, self.port)
    }

    /// The heartbeats of `vm` advance by at least 5 within 1.5 s.
    fn assert_runs(vm: &mut RunningVm, who: &str, tag: &str) {
        vm.collect_for(Duration::from_millis(300));
        let before = vm.last_hb().unwrap_or(0);
        vm.collect_for(Duration::from_millis(1500));
        vm.assert_no_panic();
        let after = vm.last_hb().unwrap_or(0);
        assert!(
            after >= before + 5,
            "{tag}: the {who} must run the guest: heartbeat {before} → {after}\nstderr:\n{}",
            vm.stderr()
        );
    }

    fn status(sock: &Path) -> String {
        tern_cmd(&["vm", "status", "--api-sock", sock.to_str().unwrap()]).1
    }
}

/// Runs one cell to the end; returns its line for the log.
fn run_cell(fault: Fault, phase: Phase, (ex, alt): Cell2) -> String {
    let t0 = Instant::now();
    let mut c = Cell::start(fault, phase);
    let tag = c.tag();
    let proxy = FaultProxy::start(c.port, phase, c.fault_fn());
    let (rc, report, err) = c.migrate(proxy.port);
    assert!(proxy.fired(), "{tag}: the phase was never reached: {err}");
    let outcome = report["outcome"].as_str().unwrap_or("").to_string();
    let ex = match alt {
        Some(b) if (rc, outcome.as_str()) == (b.rc, b.outcome) => b,
        _ => ex,
    };
    assert_eq!(
        (rc, outcome.as_str()),
        (ex.rc, ex.outcome),
        "{tag}: tern vm migrate's exit status and outcome (or {alt:?}); stderr:\n{err}\nreport {report}\ntarget:\n{}",
        c.dst.stderr()
    );
    // Settle a migration in doubt the way an operator would.
    let mut resolves = Vec::new();
    if rc == 3 {
        let paused = Cell::status(&c.src_sock);
        assert!(
            paused.contains("\"paused\""),
            "{tag}: a source in doubt stays paused: {paused}"
        );
        if fault == Fault::TargetFrozen {
            // A frozen target accepts the connection but never answers: still in doubt.
            let (r, why) = c.resolve();
            assert_eq!(r, 3, "{tag}: resolve with the target frozen: {why}");
            assert!(why.contains("still in doubt"), "{tag}: {why}");
            resolves.push(r);
            signal(c.dst.child.id(), "CONT");
        }
        let deadline = Instant::now() + Duration::from_secs(50);
        loop {
            let (r, why) = c.resolve();
            resolves.push(r);
            if r != 3 {
                let want = match ex.runs {
                    Runs::Source => Some(1),
                    Runs::Target => Some(0),
                    _ => None,
                };
                if let Some(w) = want {
                    assert_eq!(r, w, "{tag}: resolve's exit status: {why}");
                }
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{tag}: still in doubt after 50 s: {why}\ntarget:\n{}",
                c.dst.stderr()
            );
            thread::sleep(Duration::from_millis(1000));
        }
    } else if fault == Fault::TargetFrozen {
        signal(c.dst.child.id(), "CONT");
    }
    let runs = match (ex.runs, resolves.last()) {
        (Runs::Either, Some(0)) => Runs::Target,
        (Runs::Either, Some(1)) => Runs::Source,
        (r, _) => r,
    };
    let tgt_rc;
    match runs {
        Runs::Source => {
            Cell::assert_runs(&mut c.src, "source", &tag);
            let st = Cell::status(&c.src_sock);
            assert!(st.contains("\"running\""), "{tag}: source status {st}");
            tgt_rc = c.dst.wait_exit(Duration::from_secs(45));
            assert_ne!(tgt_rc, 0, "{tag}: a target that lost exits non-zero");
            c.dst.collect_for(Duration::from_millis(100));
            // A target killed after it committed may have printed a heartbeat before it died;
            // everywhere else the guest never ran there.
            if !(fault == Fault::TargetKilled && phase == Phase::AfterCommit) {
                assert!(
                    !c.dst.seen.iter().any(|l| l.starts_with("HB ")),
                    "{tag}: the guest ran on the losing target: {:?}",
                    c.dst.seen
                );
            }
            let _ = tern_cmd(&["vm", "stop", "--api-sock", c.src_sock.to_str().unwrap()]);
            assert_eq!(c.src.wait_exit(Duration::from_secs(15)), 0, "{tag}");
        }
        Runs::Target => {
            Cell::assert_runs(&mut c.dst, "target", &tag);
            let src_rc = c.src.wait_exit(Duration::from_secs(15));
            if fault != Fault::SourceKilled {
                assert_eq!(src_rc, 0, "{tag}: the source VMM stops cleanly");
            }
            c.src.collect_for(Duration::from_millis(100));
            let (r, _, e2) = tern_cmd(&["vm", "stop", "--api-sock", c.dst_sock.to_str().unwrap()]);
            assert_eq!(r, 0, "{tag}: stop the target: {e2}");
            tgt_rc = c.dst.wait_exit(Duration::from_secs(15));
            assert_eq!(tgt_rc, 0, "{tag}: tern vm receive's exit status");
        }
        Runs::Neither => {
            assert_ne!(c.src.wait_exit(Duration::from_secs(5)), 0, "{tag}");
            tgt_rc = c.dst.wait_exit(Duration::from_secs(45));
            assert_ne!(tgt_rc, 0, "{tag}: a target that lost exits non-zero");
            c.dst.collect_for(Duration::from_millis(100));
            assert!(
                !c.dst.seen.iter().any(|l| l.starts_with("HB ")),
                "{tag}: the target must not run a guest it did not get: {:?}",
                c.dst.seen
            );
        }
        Runs::Either => unreachable!(),
    }
    assert!(
        !alive(&mut c.src) && !alive(&mut c.dst),
        "{tag}: processes left"
    );
    drop(proxy);
    let line = format!(
        "{tag}: migrate exit {rc} ({outcome}), resolve {resolves:?}, runs on {runs:?}, receive exit {tgt_rc}, {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    eprintln!("{line}");
    drop(c.dir);
    line
}

/// Runs every phase of `fault` in parallel and fails with every failed cell's message.
fn run_fault(fault: Fault) {
    require_kvm();
    let mut handles = Vec::new();
    for phase in Phase::ALL {
        let Some(ex) = expect(fault, phase) else {
            continue;
        };
        handles.push((phase, thread::spawn(move || run_cell(fault, phase, ex))));
        // Stagger the boots a little on a small machine.
        thread::sleep(Duration::from_millis(400));
    }
    let mut failed = Vec::new();
    for (phase, h) in handles {
        if let Err(p) = h.join() {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failed.push(format!("{fault:?}×{}: {msg}", phase.name()));
        }
    }
    assert!(failed.is_empty(), "failed cells:\n{}", failed.join("\n\n"));
}

#[test]
fn target_killed() {
    run_fault(Fault::TargetKilled);
}

#[test]
fn source_killed() {
    run_fault(Fault::SourceKilled);
}

#[test]
fn target_frozen() {
    run_fault(Fault::TargetFrozen);
}

#[test]
fn link_black_holed() {
    run_fault(Fault::LinkBlackHoled);
}

#[test]
fn corrupt_frame() {
    run_fault(Fault::CorruptFrame);
}

#[test]
fn third_party_connection() {
    run_fault(Fault::ThirdParty);
}

#[test]
fn target_crash_during_restore() {
    run_fault(Fault::TargetCrashInRestore);
}

#[test]
fn cancel() {
    run_fault(Fault::Cancel);
}

/// The status query over mutual TLS: a receive with --tls-dir that committed answers only a host
/// certificate of its CA, and checks out by name. A paused VM of the migrated VM's shape stands in
/// for a source left in doubt (a real one is in the matrix above). --resolve refuses a VM that is
/// not paused; a plain query and one with another CA's certificate leave it paused (exit 3); the
/// right certificate stops it (exit 0) while the target runs on.
#[test]
fn resolve_asks_over_mutual_tls_and_refuses_a_running_vm() {
    require_kvm();
    let tmp = scratch();
    let ca = pki(tmp.path(), &[("node-a", "host"), ("node-b", "host")]);
    let other = pki(&tmp.path().join("other"), &[("node-a", "host")]);
    let mut p = common::MigrationPair::start(
        64,
        1,
        "tern.hb_ms=50",
        &["--tls-dir", ca.join("node-b").to_str().unwrap()],
    );
    let src_tls = ca.join("node-a");
    let (rc, report, err) = p.migrate(&[
        "--tls-dir",
        src_tls.to_str().unwrap(),
        "--tls-name",
        "node-b",
    ]);
    assert_eq!((rc, &report["outcome"]), (0, &"completed".into()), "{err}");
    assert_eq!(p.src.wait_exit(Duration::from_secs(15)), 0);

    let vm_dir = tmp.path().join("copy");
    common::private_dir(&vm_dir);
    let (mut copy, sock) = RunningVm::start_testguest(&vm_dir, "copy", 64, "tern.hb_ms=50");
    copy.wait_line(Duration::from_secs(30), |l| l.starts_with("HB "));
    let to = format!("127.0.0.1:{}", p.port);
    let resolve = |extra: &[&str]| {
        let mut args = vec![
            "vm",
            "migrate",
            "--api-sock",
            sock.to_str().unwrap(),
            "--to",
            &to,
            "--resolve",
        ];
        args.extend_from_slice(extra);
        let (rc, _, err) = tern_cmd(&args);
        (rc, err)
    };
    let with_tls = |dir: &Path| {
        [
            "--tls-dir".to_string(),
            dir.to_str().unwrap().to_string(),
            "--tls-name".to_string(),
            "node-b".to_string(),
        ]
    };

    let (rc, err) = resolve(&[]);
    assert_eq!(rc, 1, "a running VM is refused: {err}");
    assert!(err.contains("not paused"), "{err}");
    assert!(Cell::status(&sock).contains("\"running\""));

    let (rc, _, err) = tern_cmd(&["vm", "pause", "--api-sock", sock.to_str().unwrap()]);
    assert_eq!(rc, 0, "pause: {err}");
    let (rc, err) = resolve(&[]);
    assert_eq!(
        rc, 3,
        "a plain query gets no answer from a TLS receive: {err}"
    );
    assert!(err.contains("still in doubt"), "{err}");
    let foreign = with_tls(&other.join("node-a"));
    let foreign: Vec<&str> = foreign.iter().map(String::as_str).collect();
    let (rc, err) = resolve(&foreign);
    assert_eq!(rc, 3, "another CA's certificate gets no answer: {err}");
    assert!(
        Cell::status(&sock).contains("\"paused\""),
        "nothing changed"
    );

    let good = with_tls(&src_tls);
    let good: Vec<&str> = good.iter().map(String::as_str).collect();
    let (rc, err) = resolve(&good);
    assert_eq!(rc, 0, "the target answers the cluster's host: {err}");
    assert!(err.contains("committed the migration"), "{err}");
    assert_eq!(
        copy.wait_exit(Duration::from_secs(15)),
        0,
        "the paused copy stops"
    );
    Cell::assert_runs(&mut p.dst, "target", "tls");
    assert!(
        p.dst
            .stderr()
            .contains("migration status query not answered"),
        "the refused queries are logged: {}",
        p.dst.stderr()
    );
    let (rc, _, err) = tern_cmd(&["vm", "stop", "--api-sock", p.dst_sock.to_str().unwrap()]);
    assert_eq!(rc, 0, "{err}");
    assert_eq!(p.dst.wait_exit(Duration::from_secs(15)), 0);
}

/// The black-holed link for real, between two network-namespace hosts: the target's switch port
/// is taken down in the middle of pre-copy (no RST, no data). The source gives up on its write
/// or acknowledgement timeout and keeps the VM; the target discards on its idle timeout and exits
/// non-zero without ever running the guest.
#[test]
fn link_down_between_namespaced_hosts_mid_pre_copy() {
    require_kvm();
    let spec = tern_netlab::TopologySpec {
        client: false,
        replace_stale: true,
        ..tern_netlab::TopologySpec::new(format!("mmb{}", std::process::id() % 10_000), 2)
    };
    let topo = tern_netlab::Topology::build(spec)
        .expect("build the two-host topology (needs root, iproute2)");
    let mut p = common::MigrationPair::start_on(
        Some(&topo.host_ns(0)),
        Some((&topo.host_ns(1), topo.host_addr(1))),
        64,
        1,
        GUEST,
        &[],
    );
    // 4 MiB/s: round 0 takes a few seconds.
    let m = Command::new(tern())
        .args(["vm", "migrate", "--api-sock", p.src_sock.to_str().unwrap()])
        .args([
            "--to",
            &format!("{}:{}", topo.host_addr(1), p.port),
            "--json",
        ])
        .args(["--max-bandwidth-mibps", "4"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn tern vm migrate");
    thread::sleep(Duration::from_millis(1000));
    let st = Command::new("ip")
        .args(["-n", &topo.switch_ns(), "link", "set"])
        .arg(topo.switch_port_of_host(1))
        .arg("down")
        .status()
        .expect("run ip");
    assert!(st.success(), "ip link set down");
    let t0 = Instant::now();
    let out = m.wait_with_output().expect("migrate output");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        (out.status.code(), &report["outcome"]),
        (Some(1), &"failed".into()),
        "the source gives up and keeps the VM: {err} {report}"
    );
    eprintln!(
        "link down mid pre-copy: source gave up after {:.1} s: {err}",
        t0.elapsed().as_secs_f64()
    );
    p.assert_source_kept();
    drop(p);
    topo.teardown().expect("tear down the topology");
}
