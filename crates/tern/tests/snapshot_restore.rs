//! `tern vm snapshot` and `tern vm run --restore` with a real KVM guest: the restored guest's
//! heartbeat sequence continues, its clock keeps real time, and its memory writer goes on with
//! its self-check quiet.

mod common;

use std::time::Duration;

use common::{RunningVm, field, require_kvm, scratch, snapshot, tern_cmd, wait_for_path};

#[test]
fn a_restored_snapshot_continues_the_heartbeat_sequence_and_the_writer() {
    require_kvm();
    let dir = scratch();
    let sock = dir.path().join("a.sock");
    let rt = dir.path().join("rt");
    let snap = dir.path().join("vm.snap");
    let mut a = RunningVm::start_tern(
        dir.path(),
        "a",
        &[
            "vm",
            "run",
            "--kernel",
            "builtin:testguest",
            "--memory-mib",
            "96",
            "--cmdline",
            "tern.hb_ms=50 tern.dirty_mib=32 tern.dirty_rate=20000",
            "--api-sock",
            sock.to_str().unwrap(),
            "--runtime-dir",
            rt.to_str().unwrap(),
            "--snapshot-dir",
            dir.path().to_str().unwrap(),
        ],
    );
    a.wait_line(Duration::from_secs(30), |l| {
        l.starts_with("HB ") && field(l, "seq").is_some_and(|s| s >= 5)
    });
    let (rc, _, err) = snapshot(&sock, &snap, true);
    assert_eq!(rc, 0, "snapshot: {err}");
    assert_eq!(a.wait_exit(Duration::from_secs(10)), 0);
    a.collect_for(Duration::from_millis(200));
    a.assert_no_panic();
    let last = a.last_hb().unwrap();
    let last_t = a
        .seen
        .iter()
        .rfind(|l| l.starts_with("HB "))
        .and_then(|l| field(l, "t_us"))
        .unwrap();
    wait_for_path(&snap, Duration::from_secs(1));
    std::thread::sleep(Duration::from_millis(500));

    let sock_b = dir.path().join("b.sock");
    let mut b = RunningVm::restore(dir.path(), "b", &snap, &sock_b, &rt);
    let first = b.wait_line(Duration::from_secs(20), |l| l.starts_with("HB "));
    assert_eq!(
        field(&first, "seq"),
        Some(last + 1),
        "the restored guest continues the sequence (snapshot after {last}): {first}"
    );
    let t = field(&first, "t_us").unwrap();
    assert!(
        t >= last_t + 500_000,
        "guest time keeps real time across the snapshot (≥ 0.5 s passed): {last_t} → {t}"
    );
    let more = b.collect_for(Duration::from_millis(1500));
    b.assert_no_panic();
    assert!(b.last_hb().unwrap() >= last + 10, "{more:?}");
    assert!(
        more.iter().any(|l| l.starts_with("DIRTY ")),
        "the writer goes on: {more:?}"
    );
    let (rc, _, err) = tern_cmd(&["vm", "stop", "--api-sock", sock_b.to_str().unwrap()]);
    assert_eq!(rc, 0, "{err}");
    assert_eq!(b.wait_exit(Duration::from_secs(10)), 0);
}

#[test]
fn a_snapshot_without_stop_leaves_the_vm_running() {
    require_kvm();
    let dir = scratch();
    let sock = dir.path().join("a.sock");
    let snap = dir.path().join("vm.snap");
    let mut a = RunningVm::start_tern(
        dir.path(),
        "a",
        &[
            "vm",
            "run",
            "--kernel",
            "builtin:testguest",
            "--memory-mib",
            "64",
            "--cmdline",
            "tern.hb_ms=50",
            "--api-sock",
            sock.to_str().unwrap(),
            "--runtime-dir",
            dir.path().join("rt").to_str().unwrap(),
            "--snapshot-dir",
            dir.path().to_str().unwrap(),
        ],
    );
    a.wait_line(Duration::from_secs(30), |l| {
        l.starts_with("HB ") && field(l, "seq").is_some_and(|s| s >= 3)
    });
    let (rc, _, err) = snapshot(&sock, &snap, false);
    assert_eq!(rc, 0, "snapshot: {err}");
    assert!(snap.exists(), "the snapshot file is written");
    let before = a.last_hb().unwrap();
    a.collect_for(Duration::from_millis(800));
    assert!(
        a.last_hb().unwrap() >= before + 5,
        "the VM runs on after a snapshot"
    );
    let (_, out, _) = tern_cmd(&["vm", "status", "--api-sock", sock.to_str().unwrap()]);
    assert!(out.contains("\"running\""), "{out}");
    let (rc, _, _) = tern_cmd(&["vm", "stop", "--api-sock", sock.to_str().unwrap()]);
    assert_eq!(rc, 0);
    assert_eq!(a.wait_exit(Duration::from_secs(10)), 0);
}

#[test]
fn a_damaged_snapshot_is_refused_with_one_line() {
    let dir = scratch();
    let f = dir.path().join("bad.snap");
    std::fs::write(&f, b"TERNSNAP\x07\0\0\0garbage").unwrap();
    let (rc, _, err) = tern_cmd(&["vm", "run", "--restore", f.to_str().unwrap()]);
    assert_ne!(rc, 0);
    assert!(err.contains("not a Tern snapshot"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_snapshot_whose_state_has_an_older_format_is_refused_naming_both_formats() {
    require_kvm();
    let dir = scratch();
    let sock = dir.path().join("old.sock");
    let snap = dir.path().join("old.snap");
    let mut a = RunningVm::start_tern(
        dir.path(),
        "old",
        &[
            "vm",
            "run",
            "--kernel",
            "builtin:testguest",
            "--cmdline",
            "tern.hb_ms=50",
            "--api-sock",
            sock.to_str().unwrap(),
            "--runtime-dir",
            dir.path().join("rt").to_str().unwrap(),
            "--snapshot-dir",
            dir.path().to_str().unwrap(),
        ],
    );
    a.wait_line(Duration::from_secs(30), |l| l.starts_with("HB "));
    let (rc, _, err) = snapshot(&sock, &snap, true);
    assert_eq!(rc, 0, "snapshot: {err}");
    assert_eq!(a.wait_exit(Duration::from_secs(10)), 0);
    wait_for_path(&snap, Duration::from_secs(1));

    // The state inside the file starts with its own magic; its format version follows.
    let mut bytes = std::fs::read(&snap).unwrap();
    let at = bytes
        .windows(8)
        .position(|w| w == tern_vmm::state::STATE_MAGIC)
        .expect("the state's header");
    let version = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
    assert_eq!(version, tern_vmm::state::STATE_VERSION);
    bytes[at + 8..at + 12].copy_from_slice(&(version - 1).to_le_bytes());
    std::fs::write(&snap, &bytes).unwrap();

    let (rc, _, err) = tern_cmd(&["vm", "run", "--restore", snap.to_str().unwrap()]);
    assert_ne!(rc, 0);
    assert!(
        err.contains(&format!(
            "saved state format {} is not supported (this build reads format {version})",
            version - 1
        )),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}
