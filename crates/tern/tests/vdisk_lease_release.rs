//! A VMM's death releases its volume disk's write lease without an operator (real etcd, real
//! node processes, real KVM): while the VM runs, its node keeps the lease for well over two TTLs;
//! after a SIGKILL of the VMM the node finds the disk's claim lock free on its next renewal tick
//! and releases the lease within one TTL, removing the stale claim file; another host's VM then
//! writes the file at once, and its clean exit releases the lease immediately, as before.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::volume::{Cluster, call};
use common::{RunningVm, require_kvm, tern_cmd};
use tern_volume::control::Request;

const FILE: &str = "vm1.raw";
/// The TTL `Cluster::spawn` gives its nodes (`--lease-ttl-ms`).
const TTL: Duration = Duration::from_millis(1500);

/// (holder, epoch) of FILE's write lease.
fn lease(addr: &str) -> (Option<u64>, u64) {
    let v = call(
        addr,
        Request::Stat {
            name: FILE.into(),
            map: false,
        },
    )
    .unwrap();
    (
        v["lease"]["holder"].as_u64(),
        v["lease"]["epoch"].as_u64().unwrap(),
    )
}

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
}

#[test]
fn sigkill_of_a_vmm_frees_its_lease_within_one_ttl() {
    require_kvm();
    let mut c = Cluster::start();
    let n1 = c.spawn(1, &[]);
    let n2 = c.spawn(2, &[]);
    let (code, _, err) = tern_cmd(&["volume", "create", FILE, "--size", "4M", "--node", &n1]);
    assert_eq!(code, 0, "{err}");
    let dir = c.dir.path().to_path_buf();

    // A live VM keeps its lease: node 1 holds it at the same epoch for 2.5 TTLs.
    let mut a = start_vm(&dir, "a", &format!("volume://{n1}/{FILE}"), false);
    expect_verify_ok(&mut a);
    let claim = tern_volume::client::claim_path(&n1, FILE);
    assert!(claim.exists(), "VM A holds no claim {}", claim.display());
    let (holder, epoch) = lease(&n1);
    assert_eq!(holder, Some(1), "VM A's node must hold the lease");
    let until = Instant::now() + TTL * 5 / 2;
    while Instant::now() < until {
        assert_eq!(
            lease(&n1),
            (Some(1), epoch),
            "a live VM's lease must stay with its node; node 1 log:\n{}",
            c.log(1)
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // SIGKILL: nothing runs the VMM's exit path. The lease is free within one TTL.
    a.child.kill().unwrap();
    let killed = Instant::now();
    a.child.wait().unwrap();
    let freed = loop {
        let (holder, _) = lease(&n1);
        if holder.is_none() {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < TTL + Duration::from_millis(1000),
            "the lease of a killed VMM is still held by node {holder:?} after {:?}; node 1 log:\n{}",
            killed.elapsed(),
            c.log(1)
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!("SIGKILL of the VMM -> lease free: {} ms", freed.as_millis());
    assert!(
        c.log(1).contains("write lease released"),
        "the node must say why it released: {}",
        c.log(1)
    );
    assert!(
        !claim.exists(),
        "the dead VM's claim file {} must be removed with its lease",
        claim.display()
    );

    // Another host's VM takes the file at once, and a clean exit releases at once as before.
    let mut b = start_vm(&dir, "b", &format!("volume://{n2}/{FILE}"), true);
    expect_verify_ok(&mut b);
    assert_eq!(b.wait_exit(Duration::from_secs(60)), 0, "{}", b.stderr());
    let (holder, after) = lease(&n2);
    assert_eq!(holder, None, "a clean exit must release the lease at once");
    assert!(
        after > epoch,
        "VM B wrote under a new epoch ({after} vs {epoch})"
    );
}
