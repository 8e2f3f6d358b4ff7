//! Live migration of a test-guest VM whose disk is a cluster-shared-volume file (real etcd, real
//! node processes, real KVM, loopback): the write lease moves with the VM at switch-over (one
//! compare-and-swap naming the target's node), the source host can no longer write, the guest
//! goes on on the target; a migration that fails before or after the hand-over leaves the lease
//! with the source host and the guest running there.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::volume::{Cluster, start_volume_guest};
use common::{RunningVm, field, free_port, tern_cmd, wait_for_text};
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

/// A pair of VMMs: the source runs the test guest on `volume://SRC_NODE/FILE` (virtio-blk check
/// first, then heartbeats), the target waits with `--disk volume://DST_NODE/FILE`.
struct Pair {
    dir: PathBuf,
    src: RunningVm,
    src_sock: PathBuf,
    dst_sock: PathBuf,
    port: u16,
}

impl Pair {
    fn start(dir: &Path, src_node: &str) -> Pair {
        let rt = dir.join("rt");
        let src_sock = dir.join("src.sock");
        let src = start_volume_guest(dir, &format!("volume://{src_node}/{FILE}"), &src_sock, &rt);
        Pair {
            dir: dir.to_path_buf(),
            src,
            src_sock,
            dst_sock: dir.join("dst.sock"),
            port: 0,
        }
    }

    /// Starts `tern vm receive --disk volume://DST_NODE/FILE EXTRA…` under `tag`.
    fn receive(&mut self, tag: &str, dst_node: &str, extra: &[&str]) -> RunningVm {
        self.port = free_port();
        let listen = format!("127.0.0.1:{}", self.port);
        let disk = format!("volume://{dst_node}/{FILE}");
        let rt = self.dir.join("rt");
        let mut args = vec![
            "vm",
            "receive",
            "--listen",
            &listen,
            "--name",
            tag,
            "--disk",
            &disk,
            "--api-sock",
            self.dst_sock.to_str().unwrap(),
            "--runtime-dir",
            rt.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let vm = RunningVm::start_tern(&self.dir, tag, &args);
        wait_for_text(
            &self.dir.join(format!("{tag}.stderr")),
            "waiting for a migration",
            Duration::from_secs(20),
        );
        vm
    }

    /// `tern vm migrate … --json EXTRA…`: exit status, report, stderr.
    fn migrate(&self, extra: &[&str]) -> (i32, Value, String) {
        let to = format!("127.0.0.1:{}", self.port);
        let mut args = vec![
            "vm",
            "migrate",
            "--api-sock",
            self.src_sock.to_str().unwrap(),
            "--to",
            &to,
            "--json",
        ];
        args.extend_from_slice(extra);
        let (rc, out, err) = tern_cmd(&args);
        (
            rc,
            serde_json::from_str(out.trim()).unwrap_or(Value::Null),
            err,
        )
    }

    /// The source guest still beats (and runs), over about a second.
    fn assert_source_runs(&mut self) {
        self.src.collect_for(Duration::from_millis(200));
        let before = self.src.last_hb().expect("source heartbeats");
        self.src.collect_for(Duration::from_millis(1200));
        self.src.assert_no_panic();
        let after = self.src.last_hb().unwrap();
        assert!(
            after >= before + 5,
            "the source guest must keep running: heartbeat {before} → {after}\nstderr:\n{}",
            self.src.stderr()
        );
    }
}

#[test]
fn volume_disk_lease_moves_with_the_vm() {
    let mut c = Cluster::start();
    let n1 = c.spawn(1, &[]);
    let n2 = c.spawn(2, &[]);
    let (code, _, err) = tern_cmd(&["volume", "create", FILE, "--size", "4M", "--node", &n1]);
    assert_eq!(code, 0, "{err}");
    let dir = c.dir.path().join("vms");
    common::private_dir(&dir);
    let mut p = Pair::start(&dir, &n1);
    let (holder, epoch_before) = lease(&n1);
    assert_eq!(holder, Some(1), "the source host holds the write lease");
    let mut dst = p.receive("dst", &n2, &[]);

    // Without a successor the migration is refused up front; nothing moves.
    let (rc, _, err) = p.migrate(&[]);
    assert_eq!(rc, 1, "{err}");
    assert!(err.contains("--disk-successor"), "{err}");
    assert_eq!(lease(&n1), (Some(1), epoch_before));

    let (rc, report, err) = p.migrate(&["--disk-successor", "2"]);
    assert_eq!(rc, 0, "migrate: {err}\nreport: {report}");
    assert_eq!(report["outcome"], "completed", "{report}");

    // The source VMM ended; the target continues the guest's heartbeat sequence.
    assert_eq!(
        p.src.wait_exit(Duration::from_secs(15)),
        0,
        "{}",
        p.src.stderr()
    );
    p.src.collect_for(Duration::from_millis(200));
    let last = p.src.last_hb().unwrap();
    let first = dst.wait_line(Duration::from_secs(10), |l| l.starts_with("HB "));
    assert_eq!(field(&first, "seq"), Some(last + 1), "{first}");
    dst.collect_for(Duration::from_millis(1000));
    dst.assert_no_panic();
    assert!(
        dst.last_hb().unwrap() >= last + 10,
        "the guest goes on on the target"
    );

    // The lease moved to node 2 with a higher epoch; node 1 can no longer get write access.
    let (holder, epoch_after) = lease(&n1);
    assert_eq!(
        holder,
        Some(2),
        "node 2 holds the lease after the hand-over"
    );
    assert!(epoch_after > epoch_before, "{epoch_before} → {epoch_after}");
    assert_eq!(lease(&n2), (Some(2), epoch_after));
    assert!(
        matches!(
            VolumeDisk::open(&format!("{n1}/{FILE}"), false),
            Err(OpenError::Busy { .. })
        ),
        "the source host's writes must be refused after the hand-over"
    );
    let (rc, _, _) = tern_cmd(&["volume", "lease", "acquire", FILE, "--node", &n1]);
    assert_ne!(rc, 0, "node 1 must not re-acquire the lease");
    let src_err = p.src.stderr();
    assert!(
        !src_err.contains("release"),
        "the source must not release a lease it handed over: {src_err}"
    );

    let (rc, _, err) = tern_cmd(&["vm", "stop", "--api-sock", p.dst_sock.to_str().unwrap()]);
    assert_eq!(rc, 0, "{err}");
    assert_eq!(
        dst.wait_exit(Duration::from_secs(10)),
        0,
        "{}",
        dst.stderr()
    );
    assert_eq!(
        lease(&n1).0,
        None,
        "the target releases the lease when it stops"
    );
}

#[test]
fn failed_migrations_leave_the_lease_and_the_guest_on_the_source() {
    let mut c = Cluster::start();
    let n1 = c.spawn(1, &[]);
    let n2 = c.spawn(2, &[]);
    let _n3 = c.spawn(3, &[]);
    let (code, _, err) = tern_cmd(&["volume", "create", FILE, "--size", "4M", "--node", &n1]);
    assert_eq!(code, 0, "{err}");
    let dir = c.dir.path().join("vms");
    common::private_dir(&dir);
    let mut p = Pair::start(&dir, &n1);
    let (_, epoch0) = lease(&n1);

    // Refused at the handshake (config mismatch): before the pause, the lease never moves.
    let mut dst = p.receive("dst1", &n2, &["--vcpus", "2"]);
    let (rc, report, err) = p.migrate(&["--disk-successor", "2"]);
    assert_eq!(rc, 1, "{err}");
    assert_eq!(report["outcome"], "refused", "{report}");
    assert_ne!(dst.wait_exit(Duration::from_secs(20)), 0);
    assert_eq!(lease(&n1), (Some(1), epoch0));
    p.assert_source_runs();

    // The source hands the lease to node 3 while the target sits on node 2: the target's
    // take-over is refused after Commit, it answers Failed and discards; the source takes the
    // lease back (higher epoch) before its guest runs again.
    let mut dst = p.receive("dst2", &n2, &[]);
    let (rc, report, err) = p.migrate(&["--disk-successor", "3"]);
    assert_eq!(rc, 1, "{err}\nreport: {report}");
    assert_eq!(report["outcome"], "failed", "{report}");
    assert!(err.contains("take-over"), "{err}");
    assert_ne!(dst.wait_exit(Duration::from_secs(20)), 0);
    dst.collect_for(Duration::from_millis(50));
    assert!(
        !dst.seen.iter().any(|l| l.starts_with("HB ")),
        "the target must not run: {:?}",
        dst.seen
    );
    let (holder, epoch1) = lease(&n1);
    assert_eq!(holder, Some(1), "the lease came back to the source host");
    assert!(epoch1 > epoch0, "{epoch0} → {epoch1}");
    p.assert_source_runs();

    // The source owns the disk again: stopping it flushes and releases the lease.
    let (rc, _, err) = tern_cmd(&["vm", "stop", "--api-sock", p.src_sock.to_str().unwrap()]);
    assert_eq!(rc, 0, "{err}");
    assert_eq!(
        p.src.wait_exit(Duration::from_secs(10)),
        0,
        "{}",
        p.src.stderr()
    );
    assert_eq!(lease(&n1).0, None, "the source released its lease on exit");
}
