//! The test guest's CPU load under `tern vm run`: a constant load and a trace make the vCPU thread
//! use that share of a host core (read from /proc/PID/task/TID/stat), and serial input sent through
//! the control API changes the load while the guest runs. Needs root and /dev/kvm.
//!
//! The machine is shared, so the bounds are generous; what they must show is that 0 %, 50 % and
//! 100 % are told apart and that the load follows the trace and the commands.

mod common;

use std::time::{Duration, Instant};

use common::{RunningVm, field, require_kvm, scratch};

const BOOT: Duration = Duration::from_secs(30);

/// User + system CPU ticks of thread `tid` of process `pid`.
fn thread_ticks(pid: u32, tid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat"))
        .unwrap_or_else(|e| panic!("reading the stat of thread {tid}: {e}"));
    // The command name is in parentheses and may hold spaces: count fields after the last ')'.
    let rest = &stat[stat.rfind(')').expect("comm in stat") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) of the whole line are 11 and 12 after the state field.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// The thread ID of the VMM's thread named `name`.
fn thread_named(pid: u32, name: &str) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for e in std::fs::read_dir(format!("/proc/{pid}/task")).expect("task dir") {
            let tid = e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .parse::<u32>()
                .unwrap();
            let comm =
                std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).unwrap_or_default();
            if comm.trim() == name {
                return tid;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no thread {name} in process {pid}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The share of one core (percent) thread `tid` used over `d`.
fn cpu_pct_over(pid: u32, tid: u32, d: Duration) -> f64 {
    // /proc's stat counts in USER_HZ ticks, 100 per second on x86_64 Linux.
    let hz = 100.0;
    let t0 = Instant::now();
    let a = thread_ticks(pid, tid);
    std::thread::sleep(d);
    let b = thread_ticks(pid, tid);
    (b - a) as f64 / hz / t0.elapsed().as_secs_f64() * 100.0
}

/// Starts the test guest with `cmdline` (1 vCPU, 64 MiB) and waits for its `up` line; returns the
/// VM, its vCPU thread ID and the API socket.
fn start(dir: &std::path::Path, cmdline: &str) -> (RunningVm, u32, std::path::PathBuf) {
    require_kvm();
    let sock = dir.join("api.sock");
    let rt = dir.join("rt");
    let mut vm = RunningVm::start(
        dir,
        &[
            "--kernel",
            "builtin:testguest",
            "--memory-mib",
            "64",
            "--cmdline",
            cmdline,
            "--name",
            &format!("load{}", std::process::id()),
            "--api-sock",
            sock.to_str().unwrap(),
            "--runtime-dir",
            rt.to_str().unwrap(),
        ],
    );
    vm.wait_line(BOOT, |l| l.starts_with("TERN-GUEST up"));
    let pid = vm.child.id();
    let tid = thread_named(pid, "vcpu0");
    (vm, tid, sock)
}

#[test]
fn a_constant_load_uses_that_share_of_a_core_and_heartbeats_show_it() {
    let mut measured = Vec::new();
    for pct in [0u32, 50, 100] {
        let dir = scratch();
        let (mut vm, tid, _) = start(dir.path(), &format!("tern.hb_ms=500 tern.cpu_pct={pct}"));
        let set = vm.wait_line(Duration::from_secs(5), |l| l.starts_with("LOAD "));
        assert_eq!(set, format!("LOAD const pct={pct}"));
        let hb = vm.wait_line(Duration::from_secs(5), |l| l.starts_with("HB "));
        assert_eq!(field(&hb, "load_pct"), Some(u64::from(pct)), "{hb}");
        let used = cpu_pct_over(vm.child.id(), tid, Duration::from_secs(3));
        vm.assert_no_panic();
        measured.push((pct, used));
    }
    let [(_, zero), (_, half), (_, full)] = measured[..] else {
        unreachable!()
    };
    assert!(
        zero < 15.0,
        "0 % load used {zero:.1} % of a core ({measured:?})"
    );
    assert!(
        (25.0..=75.0).contains(&half),
        "50 % load used {half:.1} % of a core ({measured:?})"
    );
    assert!(
        full > 70.0,
        "100 % load used {full:.1} % of a core ({measured:?})"
    );
}

#[test]
fn a_trace_steps_through_its_values() {
    let dir = scratch();
    let (mut vm, tid, _) = start(
        dir.path(),
        "tern.hb_ms=1000 tern.cpu_trace=90,10,90*1 tern.trace_step_ms=2000 tern.trace_end=idle",
    );
    let pid = vm.child.id();
    let set = vm.wait_line(Duration::from_secs(5), |l| l.starts_with("LOAD trace"));
    assert!(
        set.starts_with("LOAD trace values=3 step_ms=2000 end=idle"),
        "{set}"
    );
    let mut per_step = Vec::new();
    for step in 0..3 {
        let line = vm.wait_line(Duration::from_secs(6), |l| {
            l.starts_with("LOAD step=") || l == "LOAD trace done"
        });
        assert_eq!(field(&line, "step"), Some(step), "{line}");
        // Skip the step's first 0.3 s (the boundary), measure 1.4 s of it.
        std::thread::sleep(Duration::from_millis(300));
        per_step.push(cpu_pct_over(pid, tid, Duration::from_millis(1400)));
    }
    let done = vm.wait_line(Duration::from_secs(6), |l| l.starts_with("LOAD "));
    assert_eq!(done, "LOAD trace done");
    let after = cpu_pct_over(pid, tid, Duration::from_millis(1500));
    vm.assert_no_panic();
    assert!(
        per_step[0] > per_step[1] + 30.0 && per_step[2] > per_step[1] + 30.0,
        "90 %, 10 %, 90 % steps used {per_step:?} % of a core"
    );
    assert!(per_step[1] < 35.0, "the 10 % step used {per_step:?}");
    assert!(
        after < 15.0,
        "after the idle-ended trace the vCPU used {after:.1} %"
    );
}
