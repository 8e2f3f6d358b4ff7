//! The test guest's CPU load under `tern vm run`: a constant load and a trace make the vCPU thread
//! use that share of a host core (read from /proc/PID/task/TID/stat), and serial input sent through
//! the control API changes the load while the guest runs. Needs root and /dev/kvm.
//!
//! The machine is shared (two cores, many builds and VMs), so a spinning vCPU is often preempted:
//! the CPU time it gets (utime + stime in /proc/PID/task/TID/stat) is the load it asked for only on
//! an idle host. The tests therefore judge the load by what the thread *wanted*: time on a CPU plus
//! time runnable but waiting for one (/proc/PID/task/TID/schedstat), which is the guest's duty
//! cycle whatever the contention, with generous bounds; the CPU time it got is checked to rise and
//! fall with it. The tests of this file run one at a time, so they do not compete with each other.

mod common;

use std::time::{Duration, Instant};

use common::{RunningVm, field, require_kvm, scratch, snapshot, tern_cmd};

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

/// Nanoseconds thread `tid` ran and waited runnable (schedstat's first two fields).
fn thread_run_wait_ns(pid: u32, tid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat"))
        .unwrap_or_else(|e| panic!("reading the schedstat of thread {tid}: {e}"));
    let f: Vec<u64> = s
        .split_whitespace()
        .map(|x| x.parse().expect("schedstat holds numbers"))
        .collect();
    f[0] + f[1]
}

/// What a thread did over a window, in percent of the window.
#[derive(Debug, Clone, Copy)]
struct Usage {
    /// CPU time it got (utime + stime).
    cpu: f64,
    /// Time it wanted a CPU: ran, or waited runnable.
    demand: f64,
}

fn usage_over(pid: u32, tid: u32, d: Duration) -> Usage {
    // /proc's stat counts in USER_HZ ticks, 100 per second on x86_64 Linux.
    let hz = 100.0;
    let t0 = Instant::now();
    let (a, ra) = (thread_ticks(pid, tid), thread_run_wait_ns(pid, tid));
    std::thread::sleep(d);
    let (b, rb) = (thread_ticks(pid, tid), thread_run_wait_ns(pid, tid));
    let wall = t0.elapsed().as_secs_f64();
    Usage {
        cpu: (b - a) as f64 / hz / wall * 100.0,
        demand: (rb - ra) as f64 / 1e9 / wall * 100.0,
    }
}

/// One test at a time in this file: their spinning vCPUs would compete for the host's cores.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts the test guest with `cmdline` (1 vCPU, 64 MiB) and waits for its `up` line; returns the
/// VM, its vCPU thread ID and the API socket.
fn start(dir: &std::path::Path, cmdline: &str) -> (RunningVm, u32, std::path::PathBuf) {
    require_kvm();
    let (mut vm, sock) =
        RunningVm::start_testguest(dir, &format!("load{}", std::process::id()), 64, cmdline);
    vm.wait_line(BOOT, |l| l.starts_with("TERN-GUEST up"));
    let pid = vm.child.id();
    let tid = thread_named(pid, "vcpu0");
    (vm, tid, sock)
}

#[test]
fn a_constant_load_uses_that_share_of_a_core_and_heartbeats_show_it() {
    let _one = one_at_a_time();
    let mut measured = Vec::new();
    for pct in [0u32, 50, 100] {
        let dir = scratch();
        let (mut vm, tid, _) = start(dir.path(), &format!("tern.hb_ms=500 tern.cpu_pct={pct}"));
        let set = vm.wait_line(Duration::from_secs(5), |l| l.starts_with("LOAD "));
        assert_eq!(set, format!("LOAD const pct={pct}"));
        let hb = vm.wait_line(Duration::from_secs(5), |l| l.starts_with("HB "));
        assert_eq!(field(&hb, "load_pct"), Some(u64::from(pct)), "{hb}");
        let used = usage_over(vm.child.id(), tid, Duration::from_secs(3));
        vm.assert_no_panic();
        measured.push(used);
    }
    let [zero, half, full] = measured[..] else {
        unreachable!()
    };
    assert!(zero.demand < 15.0, "0 % load: {measured:?}");
    assert!(
        (25.0..=75.0).contains(&half.demand),
        "50 % load: {measured:?}"
    );
    assert!(full.demand > 80.0, "100 % load: {measured:?}");
    assert!(
        zero.cpu < 10.0 && half.cpu > zero.cpu + 10.0 && full.cpu > half.cpu,
        "the CPU time got follows the load: {measured:?}"
    );
}

#[test]
fn a_trace_steps_through_its_values() {
    let _one = one_at_a_time();
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
        per_step.push(usage_over(pid, tid, Duration::from_millis(1400)));
    }
    let done = vm.wait_line(Duration::from_secs(6), |l| l.starts_with("LOAD "));
    assert_eq!(done, "LOAD trace done");
    let after = usage_over(pid, tid, Duration::from_millis(1500));
    vm.assert_no_panic();
    let d: Vec<f64> = per_step.iter().map(|u| u.demand).collect();
    assert!(
        d[0] > 60.0 && d[2] > 60.0 && d[1] < 35.0,
        "90 %, 10 %, 90 % steps: {per_step:?}"
    );
    assert!(
        per_step[0].cpu > per_step[1].cpu && per_step[2].cpu > per_step[1].cpu,
        "the CPU time got follows the steps: {per_step:?}"
    );
    assert!(after.demand < 15.0, "after the idle-ended trace: {after:?}");
}

/// Sends one raw request line to the VMM at `sock` and returns the answer line.
fn raw_request(sock: &std::path::Path, line: &str) -> serde_json::Value {
    use std::io::{BufRead, BufReader, Write};
    let mut conn = std::os::unix::net::UnixStream::connect(sock).expect("connect to the VMM");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut answer = String::new();
    BufReader::new(conn).read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer:?}"))
}

#[test]
fn console_input_changes_the_load_and_the_guest_answers() {
    let _one = one_at_a_time();
    let dir = scratch();
    let (mut vm, tid, sock) = start(dir.path(), "tern.hb_ms=500 tern.cpu_pct=5");
    let pid = vm.child.id();
    vm.wait_line(Duration::from_secs(5), |l| l == "LOAD const pct=5");
    let before = usage_over(pid, tid, Duration::from_millis(1500));

    let (rc, out, err) = tern_cmd(&[
        "vm",
        "console-input",
        "--api-sock",
        sock.to_str().unwrap(),
        "load 90",
    ]);
    assert_eq!(rc, 0, "stdout {out}\nstderr {err}");
    vm.wait_line(Duration::from_secs(5), |l| l == "LOAD const pct=90");
    let hb = vm.wait_line(Duration::from_secs(5), |l| {
        l.starts_with("HB ") && field(l, "load_pct") == Some(90)
    });
    assert!(hb.contains("load_pct=90"), "{hb}");
    let after = usage_over(pid, tid, Duration::from_millis(2000));
    assert!(
        before.demand < 25.0 && after.demand > 65.0 && after.cpu > before.cpu,
        "load 5 %: {before:?}, load 90 %: {after:?}"
    );

    // A bad command is answered, not obeyed; a long trace goes in several pieces.
    let (rc, _, err) = tern_cmd(&[
        "vm",
        "console-input",
        "--api-sock",
        sock.to_str().unwrap(),
        "load lots",
    ]);
    assert_eq!(rc, 0, "{err}");
    let e = vm.wait_line(Duration::from_secs(5), |l| l.starts_with("LOAD error"));
    assert!(e.contains("\"lots\"") && e.contains("0-100"), "{e}");
    let trace = vec!["0"; 150].join(",");
    let (rc, _, err) = tern_cmd(&[
        "vm",
        "console-input",
        "--api-sock",
        sock.to_str().unwrap(),
        &format!("trace {trace} step_ms=60000"),
    ]);
    assert_eq!(rc, 0, "{err}");
    let t = vm.wait_line(Duration::from_secs(10), |l| l.starts_with("LOAD trace"));
    assert!(
        t.starts_with("LOAD trace values=150 step_ms=60000 end=loop step=0 pct=0"),
        "{t}"
    );
    vm.assert_no_panic();
}

#[test]
fn console_input_into_a_full_fifo_is_refused_with_a_clear_error() {
    let _one = one_at_a_time();
    let dir = scratch();
    // The guest never reads its input here, so the FIFO fills.
    let (mut vm, _, sock) = start(dir.path(), "tern.hb_ms=500 tern.input_poll_ms=0");
    let fill = format!(r#"{{"op":"console_input","data":"{}"}}"#, "x".repeat(60));
    assert_eq!(raw_request(&sock, &fill)["ok"], true);
    let r = raw_request(&sock, r#"{"op":"console_input","data":"load 9\n"}"#);
    assert_eq!(r["ok"], false, "{r}");
    let msg = r["error"].as_str().unwrap();
    assert!(
        msg.contains("FIFO is full") && msg.contains("room for 4 of the 7 bytes"),
        "{msg}"
    );
    let r = raw_request(
        &sock,
        &format!(r#"{{"op":"console_input","data":"{}"}}"#, "y".repeat(65)),
    );
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("longer than the UART's 64-byte receive FIFO"),
        "{r}"
    );
    let r = raw_request(&sock, r#"{"op":"console_input","data":""}"#);
    assert!(r["error"].as_str().unwrap().contains("empty"), "{r}");
    // What fits still goes in, and the VM runs on.
    assert_eq!(
        raw_request(&sock, r#"{"op":"console_input","data":"abcd"}"#)["ok"],
        true
    );
    vm.wait_line(Duration::from_secs(5), |l| l.starts_with("HB "));
    vm.assert_no_panic();
}

#[test]
fn input_the_guest_has_not_read_survives_a_snapshot_and_restore() {
    let _one = one_at_a_time();
    let dir = scratch();
    let (mut vm, _, sock) = start(dir.path(), "tern.hb_ms=200");
    let s = sock.to_str().unwrap();
    // Paused, the guest cannot read: the command stays in the FIFO and goes into the snapshot.
    let (rc, _, err) = tern_cmd(&["vm", "pause", "--api-sock", s]);
    assert_eq!(rc, 0, "{err}");
    let (rc, _, err) = tern_cmd(&["vm", "console-input", "--api-sock", s, "load 80"]);
    assert_eq!(rc, 0, "{err}");
    let snap = dir.path().join("vm.snap");
    let (rc, _, err) = snapshot(&sock, &snap, true);
    assert_eq!(rc, 0, "snapshot: {err}");
    assert_eq!(vm.wait_exit(Duration::from_secs(10)), 0);
    vm.collect_for(Duration::from_millis(200));
    assert!(
        !vm.seen.iter().any(|l| l.starts_with("LOAD const")),
        "the paused guest read nothing: {:?}",
        vm.seen
    );

    let sock_b = dir.path().join("b.sock");
    let mut b = RunningVm::restore(dir.path(), "b", &snap, &sock_b, &dir.path().join("rt"));
    b.wait_line(Duration::from_secs(20), |l| l == "LOAD const pct=80");
    let hb = b.wait_line(Duration::from_secs(5), |l| l.starts_with("HB "));
    assert_eq!(field(&hb, "load_pct"), Some(80), "{hb}");
    b.assert_no_panic();
}
