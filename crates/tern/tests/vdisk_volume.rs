//! `tern vm run --disk volume://NODE_ADDR/FILE`: a test-guest VM on a cluster-shared-volume file
//! (real etcd, real node processes, real KVM): the guest's write/flush/read-back check passes and
//! the file holds its pattern (read back with `qemu-img convert` over NBD); a second writer is
//! refused while the first runs, on another host's node and on the same node, and gets in after
//! the first exits (its claim file removed); a read-only open takes no lease; writes made while the node is redirected
//! (injected LUN fault) land on the LUN, and the node returns to direct I/O after.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::volume::{Cluster, call, wait_for};
use common::{RunningVm, field, require_kvm, tern_cmd};
use tern_volume::control::{LeaseAction, Request};

const FILE: &str = "vm1.raw";

fn lease_holder(addr: &str) -> Option<u64> {
    call(
        addr,
        Request::Stat {
            name: FILE.into(),
            map: false,
        },
    )
    .unwrap()["lease"]["holder"]
        .as_u64()
}

/// The file's bytes, read back by `qemu-img convert` from the node's NBD export.
fn read_back(addr: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join("readback.raw");
    let _ = std::fs::remove_file(&out);
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(format!("nbd://{addr}/{FILE}"))
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "qemu-img convert: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    std::fs::read(out).unwrap()
}

/// The VMM's path counters for its volume disk, from its exit line on stderr:
/// (direct writes, writes through the node, replayed, redirects).
fn path_counters(stderr: &str) -> (u64, u64, u64, u64) {
    let line = stderr
        .lines()
        .find(|l| l.contains("volume disk"))
        .unwrap_or_else(|| panic!("no volume disk counters on stderr:\n{stderr}"));
    let f = |k| field(line, k).unwrap_or_else(|| panic!("no {k} in {line}"));
    (
        f("direct_writes"),
        f("node_writes"),
        f("replayed"),
        f("redirects"),
    )
}

fn pattern_mismatch(image: &[u8]) -> Option<u64> {
    tern_guest_image::blk_pattern_mismatch(image, tern_guest_image::BLK_VERIFY_SECTORS)
}

/// Starts a test-guest VM on `disk` running the virtio-blk check; `poweroff` ends it after.
fn start_vm(dir: &Path, tag: &str, disk: &str, poweroff: bool) -> RunningVm {
    let vm_dir = dir.join(tag);
    common::private_dir(&vm_dir);
    let rt = vm_dir.join("rt").display().to_string();
    let sock = vm_dir.join("api.sock").display().to_string();
    let cmdline = if poweroff {
        "tern.hb_ms=0 tern.blk=verify tern.poweroff_ms=100"
    } else {
        "tern.hb_ms=200 tern.blk=verify"
    };
    RunningVm::start(
        &vm_dir,
        &[
            "--kernel",
            "builtin:testguest",
            "--memory-mib",
            "128",
            "--disk",
            disk,
            "--cmdline",
            cmdline,
            "--runtime-dir",
            &rt,
            "--api-sock",
            &sock,
            "--name",
            tag,
        ],
    )
}

fn expect_verify_ok(vm: &mut RunningVm) {
    let line = vm.wait_line(Duration::from_secs(60), |l| l.starts_with("BLK verify"));
    assert!(line.starts_with("BLK verify ok"), "{line}");
    assert_eq!(
        field(&line, "sectors"),
        Some(tern_guest_image::BLK_VERIFY_SECTORS),
        "{line}"
    );
}

/// A VM that must be refused at start: returns its stderr.
fn expect_refused(dir: &Path, tag: &str, disk: &str) -> String {
    let mut vm = start_vm(dir, tag, disk, true);
    let code = vm.wait_exit(Duration::from_secs(60));
    let err = vm.stderr();
    assert_ne!(code, 0, "a second writer must be refused; stderr: {err}");
    assert!(
        vm.collect_for(Duration::from_millis(10))
            .iter()
            .all(|l| !l.starts_with("BLK")),
        "the refused VM must not have run its guest"
    );
    err
}

#[test]
fn volume_disk_verify_and_one_writer_at_a_time() {
    require_kvm();
    let mut c = Cluster::start();
    let n1 = c.spawn(1, &[]);
    let n2 = c.spawn(2, &[]);
    let (code, _, err) = tern_cmd(&["volume", "create", FILE, "--size", "4M", "--node", &n1]);
    assert_eq!(code, 0, "{err}");
    let dir = c.dir.path().to_path_buf();
    let on_n1 = format!("volume://{n1}/{FILE}");
    let on_n2 = format!("volume://{n2}/{FILE}");

    // VM A on node 1: the check passes, and A holds the write lease while it runs.
    let mut a = start_vm(&dir, "a", &on_n1, false);
    expect_verify_ok(&mut a);
    assert_eq!(
        lease_holder(&n1),
        Some(1),
        "VM A's node must hold the lease"
    );

    // A second writer through another host's node: refused by the coordinator's lease.
    let err = expect_refused(&dir, "b-other-host", &on_n2);
    assert!(
        err.contains("open for writing elsewhere") && err.contains("node 1"),
        "unclear refusal: {err}"
    );
    // A second writer through the same node: refused by the host's claim.
    let claim = tern_volume::client::claim_path(&n1, FILE);
    assert!(
        claim.exists(),
        "VM A holds no claim file {}",
        claim.display()
    );
    let err = expect_refused(&dir, "b-same-host", &on_n1);
    assert!(
        err.contains("already open for writing by another VM on this host"),
        "unclear refusal: {err}"
    );
    // A reader takes no lease: it boots, its writes fail, the lease stays with node 1.
    let mut r = start_vm(&dir, "reader", &format!("{on_n2},readonly"), true);
    let line = r.wait_line(Duration::from_secs(60), |l| l.starts_with("BLK verify"));
    assert!(
        line.contains("FAIL"),
        "a read-only disk must refuse writes: {line}"
    );
    assert_eq!(r.wait_exit(Duration::from_secs(30)), 0, "{}", r.stderr());
    assert_eq!(lease_holder(&n1), Some(1));

    // A exits: its lease is released, the file holds the guest's pattern.
    let sock = dir.join("a/api.sock").display().to_string();
    assert_eq!(tern_cmd(&["vm", "stop", "--api-sock", &sock]).0, 0);
    assert_eq!(a.wait_exit(Duration::from_secs(30)), 0, "{}", a.stderr());
    assert_eq!(
        lease_holder(&n1),
        None,
        "the lease must be released on exit"
    );
    assert!(
        !claim.exists(),
        "a clean exit must remove the claim file {}",
        claim.display()
    );
    let (direct, node, _, redirects) = path_counters(&a.stderr());
    assert!(
        direct > 0 && node > 0 && redirects == 0,
        "VM A: the thin file's first write allocates through the node, the rest go direct: {}",
        a.stderr()
    );
    let image = read_back(&n2, &dir);
    assert_eq!(image.len(), 4 << 20);
    assert_eq!(pattern_mismatch(&image), None);

    // Now the other host's VM gets in (on a zeroed file, so its pattern is its own).
    zero_file(&n1);
    assert_ne!(pattern_mismatch(&read_back(&n1, &dir)), None);
    let mut b = start_vm(&dir, "b", &on_n2, true);
    expect_verify_ok(&mut b);
    assert_eq!(b.wait_exit(Duration::from_secs(30)), 0, "{}", b.stderr());
    assert_eq!(lease_holder(&n2), None);
    assert_eq!(pattern_mismatch(&read_back(&n1, &dir)), None);
    drop(c.log(1));
}

/// Zeroes the file's first MiB through node `addr` under a lease of its own.
fn zero_file(addr: &str) {
    call(
        addr,
        Request::Lease {
            name: FILE.into(),
            action: LeaseAction::Acquire,
        },
    )
    .unwrap();
    let mut cl = tern_nbd::Client::connect(addr, FILE).unwrap();
    cl.write(0, &vec![0u8; 1 << 20], false).unwrap();
    cl.flush().unwrap();
    cl.disconnect().unwrap();
    call(
        addr,
        Request::Lease {
            name: FILE.into(),
            action: LeaseAction::Release,
        },
    )
    .unwrap();
}

#[test]
fn volume_disk_writes_survive_a_redirect_and_go_direct_again() {
    require_kvm();
    let mut c = Cluster::start();
    let n1 = c.spawn(1, &[]);
    let fault = c.dir.path().join("fault2");
    let n2 = c.spawn(2, &["--fault-file", fault.to_str().unwrap()]);
    assert_eq!(
        call(&n2, Request::Status).unwrap()["coordinator"]["node_id"],
        1,
        "node 1 (started first) must be the coordinator"
    );
    let (code, _, err) = tern_cmd(&["volume", "create", FILE, "--size", "4M", "--node", &n1]);
    assert_eq!(code, 0, "{err}");
    let dir = c.dir.path().to_path_buf();
    let on_n2 = format!("volume://{n2}/{FILE}");

    // Node 2 loses its LUN path: the VM's I/O goes over NBD to the coordinator.
    std::fs::write(&fault, b"").unwrap();
    wait_for("node 2 redirected", Duration::from_secs(10), || {
        call(&n2, Request::Status).unwrap()["path"] == "redirected"
    });
    let mut vm = start_vm(&dir, "redirected", &on_n2, true);
    expect_verify_ok(&mut vm);
    assert_eq!(vm.wait_exit(Duration::from_secs(30)), 0, "{}", vm.stderr());
    let (_, node, _, redirects) = path_counters(&vm.stderr());
    assert!(
        redirects >= 1 && node > 1,
        "the VMM must have left its direct path: {}",
        vm.stderr()
    );
    assert_eq!(call(&n2, Request::Status).unwrap()["path"], "redirected");
    assert_eq!(
        pattern_mismatch(&read_back(&n1, &dir)),
        None,
        "writes made on the redirected path must be on the LUN; node 2 log:\n{}",
        c.log(2)
    );

    // The path comes back: the node returns to direct I/O and the next VM's writes land too.
    std::fs::remove_file(&fault).unwrap();
    wait_for("node 2 direct again", Duration::from_secs(10), || {
        call(&n2, Request::Status).unwrap()["path"] == "direct"
    });
    zero_file(&n1);
    assert_ne!(pattern_mismatch(&read_back(&n1, &dir)), None);
    let mut vm = start_vm(&dir, "direct", &on_n2, true);
    expect_verify_ok(&mut vm);
    assert_eq!(vm.wait_exit(Duration::from_secs(30)), 0, "{}", vm.stderr());
    let (direct, _, _, redirects) = path_counters(&vm.stderr());
    assert!(direct > 0 && redirects == 0, "{}", vm.stderr());
    assert_eq!(call(&n2, Request::Status).unwrap()["path"], "direct");
    assert_eq!(pattern_mismatch(&read_back(&n1, &dir)), None);
}

/// The migration hooks of the volume disk backend, against real nodes: the target's incoming
/// open cannot write, the source's `release_to` names the target in one step (a third node is
/// still refused), the target's `take_over` picks the lease up and sees the source's writes; an
/// aborted hand-over gives the lease back to the source and the named successor cannot take it.
#[test]
fn volume_disk_migration_hooks_move_the_lease_and_abort_gives_it_back() {
    use tern_volume::client::{OpenError, Ownership, VolumeDisk};
    let mut c = Cluster::start();
    let n1 = c.spawn(1, &[]);
    let n2 = c.spawn(2, &[]);
    let n3 = c.spawn(3, &[]);
    let (code, _, err) = tern_cmd(&["volume", "create", FILE, "--size", "4M", "--node", &n1]);
    assert_eq!(code, 0, "{err}");
    let block = |b: u8| vec![b; 4096];

    let src = VolumeDisk::open(&format!("{n1}/{FILE}"), false).unwrap();
    src.write_at(&block(0xa1), 0).unwrap();
    let dst = VolumeDisk::open_incoming(&format!("{n2}/{FILE}")).unwrap();
    assert_eq!(dst.ownership(), Ownership::Incoming);
    assert_eq!(dst.node_id(), 2);
    assert!(
        dst.write_at(&block(0xee), 4096).is_err(),
        "an incoming disk must not write"
    );
    let third = format!("{n3}/{FILE}");
    assert!(matches!(
        VolumeDisk::open(&third, false),
        Err(OpenError::Busy { .. })
    ));

    // Switch-over: the source flushes and names node 2; it cannot write any more.
    src.release_to(dst.node_id()).unwrap();
    assert_eq!(src.ownership(), Ownership::HandedOver { to: 2 });
    assert!(src.write_at(&block(0xbb), 0).is_err());
    assert!(
        src.release_to(3).is_err(),
        "a handed-over disk has nothing to hand over"
    );
    assert_eq!(lease_holder(&n1), Some(2));
    assert!(
        matches!(VolumeDisk::open(&third, false), Err(OpenError::Busy { .. })),
        "no third party may slip in during a hand-over"
    );
    dst.take_over().unwrap();
    assert!(
        src.abort_handover().is_err(),
        "a confirmed hand-over cannot be aborted"
    );
    assert_eq!(lease_holder(&n1), Some(2));
    let mut got = block(0);
    dst.read_at(&mut got, 0).unwrap();
    assert_eq!(got, block(0xa1), "the target must see the source's writes");
    dst.write_at(&block(0xa2), 4096).unwrap();
    dst.flush().unwrap();
    assert_eq!(
        dst.counters().direct_writes.load(Ordering::Relaxed),
        1,
        "after take-over the target writes the source's extent directly"
    );

    // A hand-over back to node 1 that is aborted: the lease returns to node 2.
    dst.release_to(1).unwrap();
    assert!(dst.write_at(&block(0xcc), 4096).is_err());
    dst.abort_handover().unwrap();
    assert_eq!(dst.ownership(), Ownership::Writer);
    assert_eq!(lease_holder(&n1), Some(2));
    assert!(
        src.take_over().is_err(),
        "the successor of an aborted hand-over must not get the lease"
    );
    dst.write_at(&block(0xa3), 8192).unwrap();
    dst.close().unwrap();
    assert_eq!(lease_holder(&n1), None, "close releases the lease");
    let mut got = block(0);
    let reader = VolumeDisk::open(&format!("{n3}/{FILE}"), true).unwrap();
    for (off, b) in [(0u64, 0xa1u8), (4096, 0xa2), (8192, 0xa3)] {
        reader.read_at(&mut got, off).unwrap();
        assert_eq!(got, block(b), "offset {off}");
    }
    drop(src);
}

/// The disk's own direct path fails in the middle of unflushed writes: they are replayed through
/// the node (itself redirected to the coordinator), a later flush covers them, later writes go
/// through the node, and the disk returns to direct I/O once the path works; the data read back
/// on another node is the last written everywhere.
#[test]
fn volume_disk_path_loss_replays_unflushed_writes_and_comes_back() {
    use tern_volume::client::VolumeDisk;
    let mut c = Cluster::start();
    let n1 = c.spawn(1, &[]);
    let fault = c.dir.path().join("fault2");
    let n2 = c.spawn(2, &["--fault-file", fault.to_str().unwrap()]);
    let (code, _, err) = tern_cmd(&[
        "volume",
        "create",
        FILE,
        "--size",
        "4M",
        "--preallocate",
        "--node",
        &n1,
    ]);
    assert_eq!(code, 0, "{err}");
    let disk = VolumeDisk::open(&format!("{n2}/{FILE}"), false).unwrap();
    let block = |k: u64| vec![(k % 250) as u8 + 1; 4096];
    // Blocks 0..20: direct, not flushed. 20..40: the path is gone. 40..60: back to direct,
    // overwriting 0..20 (order matters).
    for k in 0..60u64 {
        if k == 20 {
            std::fs::write(&fault, b"").unwrap();
        }
        if k == 40 {
            assert!(!disk.is_direct(), "the disk must be on the node path");
            std::fs::remove_file(&fault).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            let mut b = vec![0u8; 512];
            disk.read_at(&mut b, 0).unwrap();
            assert!(
                disk.is_direct(),
                "the probe must bring the disk back to direct"
            );
        }
        disk.write_at(&block(k), (k % 40) * 4096).unwrap();
    }
    disk.flush().unwrap();
    let cn = disk.counters();
    assert_eq!(cn.redirects.load(Ordering::Relaxed), 1);
    assert_eq!(
        cn.replayed.load(Ordering::Relaxed),
        21,
        "20 unflushed + the failed one"
    );
    assert_eq!(cn.direct_writes.load(Ordering::Relaxed), 40);
    disk.close().unwrap();
    let mut r = tern_nbd::Client::connect(&n1, FILE).unwrap();
    for slot in 0..40u64 {
        let last = if slot < 20 { slot + 40 } else { slot };
        let mut b = vec![0u8; 4096];
        r.read(slot * 4096, &mut b).unwrap();
        assert!(b == block(last), "slot {slot}: expected block {last}");
    }
}

/// Fencing of the disk's direct path: the host's node is frozen past the lease TTL, another node
/// takes the lease and writes; the disk's next write must not reach the LUN (its local deadline
/// has passed, so it goes to the node, which is refused a renewal once resumed) and the other
/// node's data stays.
#[test]
fn volume_disk_of_a_frozen_host_is_fenced() {
    use tern_volume::client::VolumeDisk;
    let mut c = Cluster::start();
    let n1 = c.spawn(1, &[]);
    let n2 = c.spawn(2, &[]);
    let (code, _, err) = tern_cmd(&[
        "volume",
        "create",
        FILE,
        "--size",
        "4M",
        "--preallocate",
        "--node",
        &n1,
    ]);
    assert_eq!(code, 0, "{err}");
    let disk = VolumeDisk::open(&format!("{n2}/{FILE}"), false).unwrap();
    disk.write_at(&[1u8; 4096], 0).unwrap();
    disk.flush().unwrap();
    let pid2 = c.nodes[1].1.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-STOP", &pid2])
            .status()
            .unwrap()
            .success()
    );
    // Past the TTL (1.5 s) node 1 gets the lease and writes.
    let start = Instant::now();
    loop {
        let r = call(
            &n1,
            Request::Lease {
                name: FILE.into(),
                action: LeaseAction::Acquire,
            },
        );
        if r.is_ok() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "node 1 never got the lease: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut w = tern_nbd::Client::connect(&n1, FILE).unwrap();
    w.write(0, &[2u8; 4096], true).unwrap();
    let resume = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        let _ = Command::new("kill").args(["-CONT", &pid2]).status();
    });
    let direct_before = disk.counters().direct_writes.load(Ordering::Relaxed);
    assert!(
        disk.write_at(&[3u8; 4096], 0).is_err(),
        "the fenced disk's write must be refused"
    );
    resume.join().unwrap();
    assert_eq!(
        disk.counters().direct_writes.load(Ordering::Relaxed),
        direct_before,
        "no direct write after the lease lapsed"
    );
    let mut b = vec![0u8; 4096];
    w.read(0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 2), "the new holder's data must stay");
    drop(disk);
}
