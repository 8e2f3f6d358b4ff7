//! `tern vm run` against tiny hand-made PVH kernels: console output, exit statuses, reset, fault
//! reports, bad input, the control API, the default control socket and the runtime entry. Needs
//! root and /dev/kvm.

mod common;

use std::time::Duration;

use common::{RunningVm, require_kvm, scratch, tern_cmd};
use tern_vmm::testing::{TinyEnd, tiny_pvh_elf};

fn kernel(dir: &std::path::Path, name: &str, msg: &str, end: TinyEnd) -> String {
    let p = dir.join(name);
    std::fs::write(&p, tiny_pvh_elf(msg, end)).unwrap();
    p.display().to_string()
}

#[test]
fn guest_power_off_ends_the_process_with_the_guests_status() {
    require_kvm();
    let dir = scratch();
    let rt = dir.path().join("rt").display().to_string();
    let k0 = kernel(dir.path(), "k0", "tiny says hi\n", TinyEnd::PowerOff(0));
    let (code, out, err) = tern_cmd(&[
        "vm",
        "run",
        "--kernel",
        &k0,
        "--memory-mib",
        "32",
        "--runtime-dir",
        &rt,
    ]);
    assert_eq!(code, 0, "stderr: {err}");
    assert_eq!(out, "tiny says hi\n");
    let k7 = kernel(dir.path(), "k7", "x\n", TinyEnd::PowerOff(7));
    let (code, _, _) = tern_cmd(&[
        "vm",
        "run",
        "--kernel",
        &k7,
        "--memory-mib",
        "32",
        "--runtime-dir",
        &rt,
    ]);
    assert_eq!(code, 7);
}

#[test]
fn i8042_reset_stops_the_vm_with_status_zero() {
    require_kvm();
    let dir = scratch();
    let rt = dir.path().join("rt").display().to_string();
    let k = kernel(dir.path(), "k", "bye\n", TinyEnd::Reset);
    let (code, out, err) = tern_cmd(&[
        "vm",
        "run",
        "--kernel",
        &k,
        "--memory-mib",
        "32",
        "--runtime-dir",
        &rt,
    ]);
    assert_eq!(code, 0);
    assert_eq!(out, "bye\n");
    assert!(err.contains("reboot requested"), "{err}");
}

#[test]
fn a_triple_fault_stops_with_a_register_report() {
    require_kvm();
    let dir = scratch();
    let rt = dir.path().join("rt").display().to_string();
    let k = kernel(dir.path(), "k", "about to fault\n", TinyEnd::TripleFault);
    let (code, _, err) = tern_cmd(&[
        "vm",
        "run",
        "--kernel",
        &k,
        "--memory-mib",
        "32",
        "--runtime-dir",
        &rt,
    ]);
    assert_eq!(code, 70, "{err}");
    assert!(err.contains("triple fault"), "{err}");
    assert!(err.contains("rip=0x"), "{err}");
    assert!(err.contains("cr0="), "{err}");
}

#[test]
fn serial_output_can_go_to_a_file() {
    require_kvm();
    let dir = scratch();
    let rt = dir.path().join("rt").display().to_string();
    let k = kernel(dir.path(), "k", "to a file\n", TinyEnd::PowerOff(0));
    let log = dir.path().join("console.log");
    let serial = format!("file:{}", log.display());
    let (code, out, _) = tern_cmd(&[
        "vm",
        "run",
        "--kernel",
        &k,
        "--memory-mib",
        "32",
        "--serial",
        &serial,
        "--runtime-dir",
        &rt,
    ]);
    assert_eq!(code, 0);
    assert_eq!(out, "");
    assert_eq!(std::fs::read_to_string(log).unwrap(), "to a file\n");
}

#[test]
fn bad_input_gives_one_line_errors_and_no_runtime_entry() {
    require_kvm();
    let dir = scratch();
    let rt = dir.path().join("rt");
    let rts = rt.display().to_string();
    let k = kernel(dir.path(), "k", "x\n", TinyEnd::PowerOff(0));
    let notk = dir.path().join("notk");
    std::fs::write(&notk, b"just some text").unwrap();
    let notk = notk.display().to_string();
    let busy = dir.path().join("busy.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&busy).unwrap();
    let busy = busy.display().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--kernel", "/nonexistent/vmlinux"],
            "/nonexistent/vmlinux",
        ),
        (vec!["--kernel", &notk], "not a kernel"),
        (vec!["--kernel", "builtin:nosuch"], "unknown built-in"),
        (vec!["--kernel", &k, "--memory-mib", "0"], "too small"),
        (
            vec!["--kernel", &k, "--memory-mib", "100000000"],
            "more than this host",
        ),
        (vec!["--kernel", &k, "--vcpus", "0"], "--vcpus 0"),
        (vec!["--kernel", &k, "--vcpus", "300"], "--vcpus 300"),
        (
            vec!["--kernel", &k, "--cmdline", "a\u{1}b"],
            "bad --cmdline",
        ),
        (
            vec!["--kernel", &k, "--disk", "/nonexistent/disk.img"],
            "disk.img",
        ),
        (
            vec!["--kernel", &k, "--initrd", "/nonexistent/initrd"],
            "initrd",
        ),
        (vec!["--kernel", &k, "--serial", "tty"], "bad --serial"),
        (vec!["--kernel", &k, "--api-sock", &busy], "in use"),
    ];
    for (args, needle) in cases {
        let mut full = vec!["vm", "run", "--runtime-dir", &rts, "--name", "badinput"];
        full.extend(args.iter());
        let (code, out, err) = tern_cmd(&full);
        assert_ne!(code, 0, "{args:?} should fail");
        assert!(out.is_empty(), "{args:?}: no guest output expected: {out}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{args:?}: one line: {err}"
        );
        assert!(
            err.contains(needle),
            "{args:?}: {err:?} should mention {needle:?}"
        );
        assert!(!err.contains("panicked"), "{err}");
        assert!(
            !rt.join("badinput.json").exists(),
            "{args:?} left a runtime entry"
        );
    }
    let (code, _, err) = tern_cmd(&[
        "vm",
        "run",
        "--runtime-dir",
        &rts,
        "--kernel",
        &k,
        "--name",
        "a/b",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("bad --name"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

#[test]
fn api_pause_resume_status_stop_and_the_runtime_entry() {
    require_kvm();
    let dir = scratch();
    let rt = dir.path().join("rt");
    let k = kernel(dir.path(), "k", "idle now\n", TinyEnd::Halt);
    let sock = dir.path().join("api.sock");
    let socks = sock.display().to_string();
    let rts = rt.display().to_string();
    let mut vm = RunningVm::start(
        dir.path(),
        &[
            "--kernel",
            &k,
            "--memory-mib",
            "32",
            "--vcpus",
            "2",
            "--api-sock",
            &socks,
            "--name",
            "apitest",
            "--runtime-dir",
            &rts,
        ],
    );
    vm.wait_line(Duration::from_secs(20), |l| l == "idle now");

    let entry: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(rt.join("apitest.json")).unwrap()).unwrap();
    assert_eq!(entry["name"], "apitest");
    assert_eq!(entry["pid"], vm.child.id());
    assert_eq!(entry["api_sock"], socks.as_str());
    let tids = entry["vcpu_tids"].as_array().unwrap();
    assert_eq!(tids.len(), 2);
    for (i, tid) in tids.iter().enumerate() {
        let comm =
            std::fs::read_to_string(format!("/proc/{}/task/{}/comm", vm.child.id(), tid)).unwrap();
        assert_eq!(comm.trim(), format!("vcpu{i}"));
    }

    let (code, out, _) = tern_cmd(&["vm", "status", "--api-sock", &socks]);
    assert_eq!(code, 0);
    let st: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(st["state"], "running");
    assert_eq!(st["vcpus"], 2);

    assert_eq!(tern_cmd(&["vm", "pause", "--api-sock", &socks]).0, 0);
    let (_, out, _) = tern_cmd(&["vm", "status", "--api-sock", &socks]);
    assert!(out.contains("\"paused\""), "{out}");
    assert_eq!(tern_cmd(&["vm", "resume", "--api-sock", &socks]).0, 0);
    let (code, _, err) = tern_cmd(&["vm", "resume", "--api-sock", &socks]);
    assert_ne!(code, 0);
    assert!(err.contains("not paused"), "{err}");

    assert_eq!(tern_cmd(&["vm", "stop", "--api-sock", &socks]).0, 0);
    assert_eq!(vm.wait_exit(Duration::from_secs(10)), 0);
    assert!(
        !rt.join("apitest.json").exists(),
        "runtime entry removed at exit"
    );
    assert!(!sock.exists(), "API socket removed at exit");
}

#[test]
fn sigterm_stops_the_vm_and_removes_its_entry() {
    require_kvm();
    let dir = scratch();
    let rt = dir.path().join("rt");
    let rts = rt.display().to_string();
    let k = kernel(dir.path(), "k", "waiting\n", TinyEnd::Halt);
    let mut vm = RunningVm::start(
        dir.path(),
        &[
            "--kernel",
            &k,
            "--memory-mib",
            "32",
            "--name",
            "termtest",
            "--runtime-dir",
            &rts,
        ],
    );
    vm.wait_line(Duration::from_secs(20), |l| l == "waiting");
    assert!(rt.join("termtest.json").exists());
    assert!(
        std::os::unix::net::UnixStream::connect(rt.join("api/termtest.sock")).is_ok(),
        "without --api-sock the VM serves RUNTIME_DIR/api/NAME.sock"
    );
    let st = std::process::Command::new("kill")
        .args(["-TERM", &vm.child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(vm.wait_exit(Duration::from_secs(10)), 0);
    assert!(!rt.join("termtest.json").exists());
    assert!(!rt.join("api/termtest.sock").exists());
}

#[test]
fn control_commands_name_a_missing_socket() {
    let (code, _, err) = tern_cmd(&["vm", "status", "--api-sock", "/nonexistent/x.sock"]);
    assert_ne!(code, 0);
    assert!(err.contains("/nonexistent/x.sock"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1);
}
