//! The sandboxed VMM: every thread runs under its seccomp filter, a thread that makes a syscall
//! outside it stops the VMM with a report naming the thread kind and the syscall (through the
//! debug-build trigger `TERN_SECCOMP_TEST_TRIGGER`), and `--jail` runs the test guest as an
//! unprivileged user in its own mount namespace. Needs root and /dev/kvm.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{RunningVm, free_port, require_kvm, scratch, tern, tern_cmd, wait_for_path};

const EXIT_VIOLATION: i32 = 159;

fn testguest(dir: &Path, extra: &[&str], trigger: Option<&str>) -> (RunningVm, std::path::PathBuf) {
    // The socket in a private directory of its own, so that a jail binds only that directory and
    // the runtime directory beside it stays reachable for the jail user (the scratch directory
    // itself is root's, 0700).
    let api_dir = dir.join("api");
    std::fs::create_dir_all(&api_dir).unwrap();
    std::fs::set_permissions(
        &api_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let sock = api_dir.join("api.sock");
    let mut cmd = Command::new(tern());
    cmd.args([
        "vm",
        "run",
        "--kernel",
        "builtin:testguest",
        "--memory-mib",
        "64",
    ])
    .args(["--cmdline", "tern.hb_ms=50", "--name"])
    .arg(format!("sbx-{}", std::process::id()))
    .arg("--api-sock")
    .arg(&sock)
    .arg("--runtime-dir")
    .arg(dir.join("rt"))
    .args(extra);
    match trigger {
        Some(kind) => cmd.env("TERN_SECCOMP_TEST_TRIGGER", kind),
        None => cmd.env_remove("TERN_SECCOMP_TEST_TRIGGER"),
    };
    (RunningVm::start_command(dir, "vmm", cmd), sock)
}

fn status_field(pid: u32, tid: Option<&str>, key: &str) -> String {
    let path = match tid {
        Some(t) => format!("/proc/{pid}/task/{t}/status"),
        None => format!("/proc/{pid}/status"),
    };
    let s = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in {path}"))
        .trim()
        .to_string()
}

#[test]
fn a_thread_outside_its_filter_stops_the_vmm_with_a_report_naming_it() {
    require_kvm();
    // The device thread needs a NIC: a tap of our own (not persistent: it goes with the VMM).
    let tap = format!("sbx{}", std::process::id() % 100_000);
    let net = format!("tap={tap},mac=52:54:00:5b:00:01");
    for (kind, thread, extra) in [
        ("vcpu", "vcpu0", vec![]),
        ("api", "main", vec![]),
        ("main", "main", vec![]),
        ("device", "virtio-net-rx", vec!["--net", net.as_str()]),
    ] {
        let dir = scratch();
        let (mut vm, _) = testguest(dir.path(), &extra, Some(kind));
        let code = vm.wait_exit(Duration::from_secs(30));
        let err = vm.stderr();
        assert_eq!(code, EXIT_VIOLATION, "trigger {kind}: stderr:\n{err}");
        let want = format!(
            "tern: seccomp: thread {thread} (filter {kind}) made syscall {} (getppid) outside its allow-list",
            nix::libc::SYS_getppid
        );
        assert!(
            err.contains(&want),
            "trigger {kind}: want {want:?} in:\n{err}"
        );
    }
}

#[test]
fn with_seccomp_off_or_log_the_same_trigger_does_not_stop_the_guest() {
    require_kvm();
    for mode in ["off", "log"] {
        let dir = scratch();
        let (mut vm, sock) = testguest(dir.path(), &["--seccomp", mode], Some("vcpu"));
        vm.wait_line(Duration::from_secs(20), |l| {
            l.starts_with("HB ") && l.contains("seq=3")
        });
        let (code, _, err) = tern_cmd(&["vm", "stop", "--api-sock", sock.to_str().unwrap()]);
        assert_eq!(code, 0, "{mode}: {err}");
        assert_eq!(
            vm.wait_exit(Duration::from_secs(10)),
            0,
            "{mode}: {}",
            vm.stderr()
        );
    }
}

#[test]
fn every_vmm_thread_runs_under_a_filter_and_the_vm_is_controllable() {
    require_kvm();
    let dir = scratch();
    let (mut vm, sock) = testguest(dir.path(), &["--vcpus", "2"], None);
    vm.wait_line(Duration::from_secs(20), |l| {
        l.starts_with("HB ") && l.contains("seq=2")
    });
    let s = sock.to_str().unwrap();
    // Pause, resume and status go through the filtered API thread and the vCPUs' pause protocol.
    for op in ["pause", "resume", "status"] {
        let (code, _, err) = tern_cmd(&["vm", op, "--api-sock", s]);
        assert_eq!(code, 0, "{op}: {err}\n{}", vm.stderr());
    }
    let pid = vm.child.id();
    let mut seen = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let tid = t.unwrap().file_name().into_string().unwrap();
        let name = status_field(pid, Some(&tid), "Name");
        // 2 = SECCOMP_MODE_FILTER.
        assert_eq!(
            status_field(pid, Some(&tid), "Seccomp"),
            "2",
            "thread {name} is not filtered"
        );
        seen.push(name);
    }
    for want in ["vcpu0", "vcpu1", "api", "signals"] {
        assert!(
            seen.iter().any(|n| n == want),
            "no thread {want} among {seen:?}"
        );
    }
    vm.wait_line(Duration::from_secs(10), |l| {
        l.starts_with("HB ") && l.contains("seq=6")
    });
    let (code, _, err) = tern_cmd(&["vm", "stop", "--api-sock", s]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(vm.wait_exit(Duration::from_secs(10)), 0, "{}", vm.stderr());
}

#[test]
fn jail_runs_the_guest_as_an_unprivileged_user_in_its_own_mount_namespace() {
    require_kvm();
    let dir = scratch();
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let jail_dir = dir.path().join("jail");
    let (mut vm, sock) = testguest(
        dir.path(),
        &[
            "--jail",
            "--jail-uid",
            "65534",
            "--jail-gid",
            "65534",
            "--jail-dir",
            jail_dir.to_str().unwrap(),
            "--disk",
            disk.to_str().unwrap(),
        ],
        None,
    );
    vm.wait_line(Duration::from_secs(20), |l| {
        l.starts_with("HB ") && l.contains("seq=2")
    });
    wait_for_path(&sock, Duration::from_secs(5));
    let pid = vm.child.id();
    assert_eq!(status_field(pid, None, "Uid"), "65534\t65534\t65534\t65534");
    assert_eq!(status_field(pid, None, "Gid"), "65534\t65534\t65534\t65534");
    assert_eq!(status_field(pid, None, "Groups"), "");
    assert_eq!(status_field(pid, None, "NoNewPrivs"), "1");
    assert_eq!(status_field(pid, None, "CapEff"), "0000000000000000");
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/mnt")).unwrap();
    assert_ne!(
        ns(&pid.to_string()),
        ns("self"),
        "the VMM shares our mount namespace"
    );
    // Only what the VM needs is in its root: no /etc, no /usr; /dev has kvm and nothing else.
    let root = format!("/proc/{pid}/root");
    assert!(
        !Path::new(&format!("{root}/etc")).exists(),
        "the jail shows /etc"
    );
    assert!(
        !Path::new(&format!("{root}/usr")).exists(),
        "the jail shows /usr"
    );
    let dev: Vec<_> = std::fs::read_dir(format!("{root}/dev"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(dev, ["kvm"]);
    assert!(Path::new(&format!("{root}{}", disk.display())).exists());
    // The API socket still serves the owner; the guest keeps running after a pause and a
    // snapshot, which the unprivileged VMM writes into the snapshot directory the jail made for it.
    let s = sock.to_str().unwrap();
    for op in ["pause", "resume", "status"] {
        let (code, _, err) = tern_cmd(&["vm", op, "--api-sock", s]);
        assert_eq!(code, 0, "{op}: {err}\n{}", vm.stderr());
    }
    let (code, _, err) = tern_cmd(&["vm", "snapshot", "--api-sock", s, "--out", "jailed.snap"]);
    assert_eq!(code, 0, "snapshot: {err}\n{}", vm.stderr());
    let snap = dir.path().join("rt/snapshots/jailed.snap");
    let md = std::fs::metadata(&snap).unwrap();
    assert!(md.len() > 4096, "{} is {} bytes", snap.display(), md.len());
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&md), 65534);
    vm.wait_line(Duration::from_secs(10), |l| {
        l.starts_with("HB ") && l.contains("seq=6")
    });
    let (code, _, err) = tern_cmd(&["vm", "stop", "--api-sock", s]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(vm.wait_exit(Duration::from_secs(10)), 0, "{}", vm.stderr());
}

#[test]
fn a_migration_thread_outside_its_filter_stops_the_target_and_the_source_keeps_the_vm() {
    require_kvm();
    let dir = scratch();
    let (mut src, sock) = testguest(dir.path(), &[], None);
    src.wait_line(Duration::from_secs(20), |l| {
        l.starts_with("HB ") && l.contains("seq=2")
    });
    let port = free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let mut cmd = Command::new(tern());
    cmd.args(["vm", "receive", "--listen", &listen, "--serial", "null"])
        .arg("--api-sock")
        .arg(dir.path().join("target.sock"))
        .arg("--runtime-dir")
        .arg(dir.path().join("rt"))
        .env("TERN_SECCOMP_TEST_TRIGGER", "migration");
    let mut target = RunningVm::start_command(dir.path(), "target", cmd);
    std::thread::sleep(Duration::from_millis(300));
    let s = sock.to_str().unwrap();
    let (code, _, err) = tern_cmd(&["vm", "migrate", "--api-sock", s, "--to", &listen]);
    assert_ne!(code, 0, "the migration succeeded: {err}");
    assert_eq!(
        target.wait_exit(Duration::from_secs(20)),
        EXIT_VIOLATION,
        "{}",
        target.stderr()
    );
    let err = target.stderr();
    assert!(
        err.contains("(filter migration) made syscall") && err.contains("thread migrate-"),
        "{err}"
    );
    // The source still runs the guest.
    let (code, out, err) = tern_cmd(&["vm", "status", "--api-sock", s]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"running\""), "{out}");
    let seq = src.last_hb().unwrap_or(0);
    src.wait_line(Duration::from_secs(10), |l| {
        l.starts_with("HB ") && common::field(l, "seq").is_some_and(|n| n > seq + 2)
    });
    let (code, _, err) = tern_cmd(&["vm", "stop", "--api-sock", s]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        src.wait_exit(Duration::from_secs(10)),
        0,
        "{}",
        src.stderr()
    );
}

#[test]
fn a_jailed_receive_runs_the_migrated_guest_as_an_unprivileged_user() {
    require_kvm();
    let dir = scratch();
    let (mut src, sock) = testguest(dir.path(), &[], None);
    src.wait_line(Duration::from_secs(20), |l| {
        l.starts_with("HB ") && l.contains("seq=2")
    });
    let listen = format!("127.0.0.1:{}", free_port());
    let target_sock = dir.path().join("target.sock");
    let mut cmd = Command::new(tern());
    cmd.args(["vm", "receive", "--listen", &listen, "--jail"])
        .args(["--jail-uid", "65534", "--jail-gid", "65534"])
        .arg("--jail-dir")
        .arg(dir.path().join("jail"))
        .arg("--api-sock")
        .arg(&target_sock)
        .arg("--runtime-dir")
        .arg(dir.path().join("rt"))
        .env_remove("TERN_SECCOMP_TEST_TRIGGER");
    let mut target = RunningVm::start_command(dir.path(), "target", cmd);
    std::thread::sleep(Duration::from_millis(300));
    let (code, _, err) = tern_cmd(&[
        "vm",
        "migrate",
        "--api-sock",
        sock.to_str().unwrap(),
        "--to",
        &listen,
    ]);
    assert_eq!(code, 0, "{err}\ntarget:\n{}", target.stderr());
    assert_eq!(
        src.wait_exit(Duration::from_secs(10)),
        0,
        "{}",
        src.stderr()
    );
    // The guest's heartbeats go on on the target's console.
    let seq = src.last_hb().unwrap_or(0);
    target.wait_line(Duration::from_secs(10), |l| {
        l.starts_with("HB ") && common::field(l, "seq").is_some_and(|n| n > seq + 3)
    });
    let pid = target.child.id();
    assert_eq!(status_field(pid, None, "Uid"), "65534\t65534\t65534\t65534");
    assert_eq!(status_field(pid, None, "NoNewPrivs"), "1");
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/mnt")).unwrap();
    assert_ne!(ns(&pid.to_string()), ns("self"));
    let t = target_sock.to_str().unwrap();
    let (code, _, err) = tern_cmd(&["vm", "stop", "--api-sock", t]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        target.wait_exit(Duration::from_secs(10)),
        0,
        "{}",
        target.stderr()
    );
}
