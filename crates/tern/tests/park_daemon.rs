//! The parking daemon on this real host: real processes with busy/idle threads (registered in a
//! temporary runtime directory, as the VMM registers its vCPU threads), real `sched_setaffinity`,
//! affinities checked in `/proc/PID/task/TID/status`. Needs root and at least two CPUs; fails
//! loudly otherwise.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sched::{CpuSet, sched_setaffinity};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tern_test_support::{cpus_allowed, require_cpus, require_root_for, wait_for};

const TERN: &str = env!("CARGO_BIN_EXE_tern");

fn require_host() {
    require_root_for("they set thread affinity");
    require_cpus(2);
}

/// A stand-in VM: `tern park load`, killed on drop.
struct Load {
    child: Child,
    pid: u32,
    tids: Vec<u32>,
}

impl Load {
    fn start(dir: &Path, name: &str, threads: u32, busy: u32) -> Load {
        let mut child = Command::new(TERN)
            .args([
                "park",
                "load",
                "--name",
                name,
                "--threads",
                &threads.to_string(),
            ])
            .args(["--busy", &busy.to_string(), "--runtime-dir"])
            .arg(dir)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn tern park load");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        // "load NAME pid P tids [a, b]"
        let pid: u32 = line.split_whitespace().nth(3).unwrap().parse().unwrap();
        let list = &line[line.find('[').unwrap() + 1..line.find(']').unwrap()];
        let tids = list.split(',').map(|t| t.trim().parse().unwrap()).collect();
        Load { child, pid, tids }
    }

    fn signal(&self, s: Signal) {
        kill(Pid::from_raw(self.pid as i32), s).unwrap();
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// `tern park run` on a private runtime dir and socket; SIGKILLed on drop if still running.
struct Daemon {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
}

impl Daemon {
    fn start(dir: &Path, runtime: &Path, knobs: &[&str]) -> Daemon {
        let socket = dir.join("ctl/park.sock");
        let log = dir.join("daemon.log");
        let child = Command::new(TERN)
            .args(["park", "run", "--runtime-dir"])
            .arg(runtime)
            .arg("--socket")
            .arg(&socket)
            .args(knobs)
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn tern park run");
        let d = Daemon {
            child: Some(child),
            socket,
            log,
        };
        wait_for("the control socket", Duration::from_secs(10), || {
            d.socket.exists()
        });
        d
    }

    fn status(&self) -> serde_json::Value {
        let out = tern(&[
            "park",
            "status",
            "--json",
            "--socket",
            self.socket.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Sends `sig` and waits for a clean exit; returns the daemon's log.
    fn stop(&mut self, sig: Signal) -> String {
        let mut child = self.child.take().unwrap();
        kill(Pid::from_raw(child.id() as i32), sig).unwrap();
        let status = child.wait().unwrap();
        let log = std::fs::read_to_string(&self.log).unwrap();
        assert!(status.success(), "daemon exited with {status}; log:\n{log}");
        assert!(!self.socket.exists(), "socket left behind");
        log
    }
}

impl Drop for Daemon {
    /// On a failing test: SIGTERM first, so the daemon still restores what it changed.
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn tern(args: &[&str]) -> Output {
    Command::new(TERN).args(args).output().unwrap()
}

fn all_threads(loads: &[&Load]) -> Vec<(u32, u32)> {
    loads
        .iter()
        .flat_map(|l| l.tids.iter().map(|&t| (l.pid, t)))
        .collect()
}

fn unparked(status: &serde_json::Value) -> Vec<u64> {
    status["unparked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect()
}

#[test]
fn light_load_is_packed_then_unparked_on_demand_and_restored_on_stop() {
    require_host();
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().join("vms");
    let a = Load::start(&runtime, "a", 1, 5);
    let b = Load::start(&runtime, "b", 2, 5);
    // A thread someone pinned to CPU 1 on purpose: the daemon must leave it there.
    let c = Load::start(&runtime, "c", 1, 2);
    let mut one = CpuSet::new();
    one.set(1).unwrap();
    sched_setaffinity(Pid::from_raw(c.tids[0] as i32), &one).unwrap();
    let threads = all_threads(&[&a, &b]);
    let original: Vec<String> = threads.iter().map(|&(p, t)| cpus_allowed(p, t)).collect();
    assert!(
        original.iter().all(|o| o != "0"),
        "threads start unconfined: {original:?}"
    );

    let increase_time = 2;
    let inc = format!("increase_time={increase_time}");
    let mut d = Daemon::start(
        dir.path(),
        &runtime,
        &["interval_ms=50", &inc, "decrease_time=3", "min_cores=0"],
    );

    // Light load: after a few intervals every vCPU thread is confined to one core.
    wait_for(
        "all threads confined to CPU 0",
        Duration::from_secs(20),
        || threads.iter().all(|&(p, t)| cpus_allowed(p, t) == "0"),
    );
    let s = d.status();
    assert_eq!(unparked(&s), vec![0]);
    assert_eq!(
        cpus_allowed(c.pid, c.tids[0]),
        "1",
        "a user's pin is respected"
    );
    assert_eq!(s["vms"].as_array().unwrap().len(), 3);

    // One guest goes flat out: the second core is unparked within the increase time.
    let before = d.status()["interval"].as_u64().unwrap();
    a.signal(Signal::SIGUSR1);
    wait_for("the second core unparked", Duration::from_secs(20), || {
        unparked(&d.status()).len() == 2
    });
    let s = d.status();
    let changed = s["last_change_interval"].as_u64().unwrap();
    // One interval for the rise to show in a sample, then at most increase_time, +1 for the
    // status/signal race.
    assert!(
        changed <= before + 1 + increase_time + 1,
        "unparked at interval {changed}, load rose after interval {before}"
    );
    assert!(threads.iter().all(|&(p, t)| cpus_allowed(p, t) == "0-1"));

    // Back to light load: parked again (slowly), then stopped while parked.
    a.signal(Signal::SIGUSR2);
    wait_for("threads parked again", Duration::from_secs(20), || {
        threads.iter().all(|&(p, t)| cpus_allowed(p, t) == "0")
    });
    let log = d.stop(Signal::SIGINT);
    let after: Vec<String> = threads.iter().map(|&(p, t)| cpus_allowed(p, t)).collect();
    assert_eq!(after, original, "affinities restored on stop; log:\n{log}");
    assert_eq!(cpus_allowed(c.pid, c.tids[0]), "1");
    assert!(log.contains("affinities restored"), "{log}");
}

#[test]
fn vanished_processes_threads_and_bad_entries_are_skipped_not_fatal() {
    require_host();
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().join("vms");
    std::fs::create_dir_all(&runtime).unwrap();
    std::fs::write(
        runtime.join("gone.json"),
        r#"{"name":"gone","pid":999999999,"api_sock":"","vcpu_tids":[1]}"#,
    )
    .unwrap();
    std::fs::write(runtime.join("junk.json"), "{ not json").unwrap();
    let live = Load::start(&runtime, "live", 1, 5);
    // An entry naming a thread that does not exist in its process.
    let ghost = format!(
        r#"{{"name":"ghost","pid":{},"api_sock":"","vcpu_tids":[999999998]}}"#,
        live.pid
    );
    std::fs::write(runtime.join("ghost.json"), ghost).unwrap();
    let dying = Load::start(&runtime, "dying", 2, 5);
    let original = cpus_allowed(live.pid, live.tids[0]);
    let mut d = Daemon::start(
        dir.path(),
        &runtime,
        &["interval_ms=50", "min_cores=0", "decrease_time=2"],
    );
    wait_for("live thread confined", Duration::from_secs(20), || {
        cpus_allowed(live.pid, live.tids[0]) == "0"
    });
    // Kill a registered process without letting it clean up its entry.
    drop(dying);
    std::thread::sleep(Duration::from_millis(300));
    let s = d.status();
    assert_eq!(s["vms"].as_array().unwrap().len(), 2, "{s}");
    let log = d.stop(Signal::SIGTERM);
    for want in [
        "process 999999999 is gone",
        "bad entry",
        "thread 999999998: thread is gone",
        "is gone",
    ] {
        assert!(log.contains(want), "log lacks `{want}`:\n{log}");
    }
    assert_eq!(
        cpus_allowed(live.pid, live.tids[0]),
        original,
        "restored on stop"
    );
}

#[test]
fn bad_input_gives_one_line_errors() {
    require_host();
    let cases: &[(&[&str], &str)] = &[
        (
            &["park", "run", "min_cores=60", "max_cores=50"],
            "tern: error: min_cores (60 %) is above max_cores (50 %)",
        ),
        (
            &["park", "run", "--interval-ms", "0"],
            "tern: error: Knob `interval_ms` = 0 is outside 1..=600000",
        ),
        (
            &["park", "run", "headroom=101"],
            "tern: error: Knob `headroom` = 101 is outside 1..=100",
        ),
        (
            &["park", "run", "--cpus", "7-3"],
            "tern: error: bad CPU list `7-3`",
        ),
        (
            &["park", "status", "--socket", "/nonexistent/park.sock"],
            "tern: error: No parking daemon at /nonexistent/park.sock",
        ),
        (
            &["park", "replay", "--trace", "/nonexistent/trace"],
            "tern: error: cannot read trace /nonexistent/trace",
        ),
        (
            &["park", "run", "--power-model", "specpower:Nope"],
            "tern: error: Unknown SPECpower model `Nope`",
        ),
        (
            &["park", "run", "--shallow-share", "2"],
            "tern: error: The shallow-state share 2 is outside 0..=1",
        ),
        (
            &["park", "run", "--core-deep-w", "9"],
            "tern: error: A parked core (9 W) must not draw more than an idle unparked one",
        ),
    ];
    for (args, want) in cases {
        let out = tern(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            err.starts_with(want),
            "{args:?}: got `{err}`, want `{want}`"
        );
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{args:?}: not one line: {err}"
        );
    }

    // `set` on a running daemon: refused values leave the knobs untouched; good ones apply.
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().join("vms");
    let mut d = Daemon::start(dir.path(), &runtime, &["interval_ms=50"]);
    let sock = d.socket.to_str().unwrap().to_string();
    let out = tern(&[
        "park",
        "set",
        "--socket",
        &sock,
        "min_cores=80",
        "max_cores=20",
    ]);
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "tern: error: min_cores (80 %) is above max_cores (20 %)"
    );
    assert_eq!(d.status()["knobs"]["min_cores"], 4);
    let out = tern(&[
        "park",
        "set",
        "--socket",
        &sock,
        "CPHEADROOM=30",
        "min_cores=100",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = d.status();
    assert_eq!(
        (
            s["knobs"]["headroom"].clone(),
            s["knobs"]["min_cores"].clone()
        ),
        (30.into(), 100.into())
    );
    assert_eq!(
        unparked(&s).len(),
        std::thread::available_parallelism().unwrap().get()
    );
    // A second daemon on the same socket is refused.
    let out = tern(&[
        "park",
        "run",
        "--socket",
        &sock,
        "--runtime-dir",
        runtime.to_str().unwrap(),
    ]);
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .starts_with("tern: error: Another parking daemon is already listening")
    );
    d.stop(Signal::SIGTERM);
}

#[test]
fn replay_prints_timeline_energy_and_delay() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace.txt");
    // Two VMs: light, a burst, light again.
    let mut text = String::from("# vm1 vm2 (% of a core)\n");
    for i in 0..200 {
        let (a, b) = if (80..100).contains(&i) {
            (100, 90)
        } else {
            (10, 5)
        };
        text.push_str(&format!("{a} {b}\n"));
    }
    std::fs::write(&trace, text).unwrap();
    let out = tern(&[
        "park",
        "replay",
        "--trace",
        trace.to_str().unwrap(),
        "--cores",
        "4",
        "min_cores=0",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let p = &v["policy"];
    assert_eq!(p["intervals"], 200);
    assert!(p["energy_j"].as_f64().unwrap() < p["energy_no_parking_j"].as_f64().unwrap());
    assert!(
        v["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["unparked"] == 1)
    );
    let out = tern(&[
        "park",
        "replay",
        "--trace",
        trace.to_str().unwrap(),
        "--cores",
        "4",
        "min_cores=0",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    // Regression: every host was modelled as the 12-core X5670 server; the curve now follows the
    // core count and the output says which one is used.
    assert!(
        text.lines().next().unwrap_or("").starts_with(
            "power model specpower:IbmX3250XeonX3470 (4-core server), picked for 4 CPUs by core count"
        ),
        "{text}"
    );
    assert!(
        text.contains("policy: energy")
            && text.contains("added delay")
            && text.contains("naive <50% rule"),
        "{text}"
    );
}

#[test]
fn cpuset_irq_affinity_and_halt_polling_are_applied_and_restored() {
    require_host();
    let root = Path::new("/sys/fs/cgroup/cpuset");
    assert!(
        root.join("cpuset.cpus").exists(),
        "this test needs the cgroup v1 cpuset hierarchy at {}",
        root.display()
    );
    let halt = Path::new("/sys/module/kvm/parameters/halt_poll_ns");
    assert!(
        halt.exists(),
        "this test needs the kvm module's halt_poll_ns"
    );
    let cg = root.join(format!("tern-park-test-{}", std::process::id()));
    std::fs::create_dir(&cg).unwrap();
    struct RemoveCgroup(PathBuf);
    impl Drop for RemoveCgroup {
        fn drop(&mut self) {
            for _ in 0..250 {
                if std::fs::remove_dir(&self.0).is_ok() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    let _cleanup = RemoveCgroup(cg.clone());
    let read = |p: &Path| std::fs::read_to_string(p).unwrap().trim().to_string();
    std::fs::write(cg.join("cpuset.mems"), read(&root.join("cpuset.mems"))).unwrap();
    std::fs::write(cg.join("cpuset.cpus"), read(&root.join("cpuset.cpus"))).unwrap();
    let cg_before = read(&cg.join("cpuset.cpus"));

    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().join("vms");
    let load = Load::start(&runtime, "boxed", 2, 5);
    std::fs::write(cg.join("cgroup.procs"), load.pid.to_string()).unwrap();
    let irqs = || -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = std::fs::read_dir("/proc/irq")
            .unwrap()
            .flatten()
            .filter_map(|e| {
                let f = e.path().join("smp_affinity_list");
                std::fs::read_to_string(&f)
                    .ok()
                    .map(|a| (f.display().to_string(), a.trim().to_string()))
            })
            .collect();
        v.sort();
        v
    };
    let irq_before = irqs();
    let halt_before = read(halt);

    let mut d = Daemon::start(
        dir.path(),
        &runtime,
        &[
            "interval_ms=50",
            "min_cores=0",
            "decrease_time=2",
            "--irq",
            "--halt-poll-ns",
            "0",
            "--cpuset",
            cg.to_str().unwrap(),
        ],
    );
    let started = Instant::now();
    while read(&cg.join("cpuset.cpus")) != "0" {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "cpuset never narrowed to CPU 0 (now {}); log:\n{}",
            read(&cg.join("cpuset.cpus")),
            std::fs::read_to_string(&d.log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Where the kernel allows it (this host's kvm_pvm exposes the parameter read-only) halt polling
    // is lowered; otherwise the daemon says why it could not.
    use std::os::unix::fs::PermissionsExt;
    if std::fs::metadata(halt).unwrap().permissions().mode() & 0o200 != 0 {
        assert_eq!(read(halt), "0", "halt polling lowered while running");
    } else {
        let log = std::fs::read_to_string(&d.log).unwrap();
        assert!(
            log.contains("skipped /sys/module/kvm/parameters/halt_poll_ns: Permission denied"),
            "{log}"
        );
        assert_eq!(read(halt), halt_before);
    }
    let movable = irqs().iter().filter(|(_, a)| a == "0").count();
    let was = irq_before.iter().filter(|(_, a)| a == "0").count();
    assert!(movable > was, "no IRQ was moved onto the unparked CPU");
    for &tid in &load.tids {
        assert_eq!(cpus_allowed(load.pid, tid), "0");
    }
    let log = d.stop(Signal::SIGTERM);
    assert_eq!(
        read(&cg.join("cpuset.cpus")),
        cg_before,
        "cpuset restored; log:\n{log}"
    );
    assert_eq!(read(halt), halt_before, "halt_poll_ns restored");
    assert_eq!(irqs(), irq_before, "IRQ affinities restored");
    for &tid in &load.tids {
        assert_eq!(
            cpus_allowed(load.pid, tid),
            cg_before,
            "thread affinity restored"
        );
    }
    drop(load);
    // The cgroup can go once its process has exited.
    wait_for("the test cgroup to empty", Duration::from_secs(10), || {
        std::fs::remove_dir(&cg).is_ok()
    });
}

#[test]
fn no_permission_is_a_logged_skip_and_nothing_stays_pinned() {
    require_host();
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    // A copy of tern that the unprivileged user can surely execute, wherever the checkout lives.
    let tern = dir.path().join("tern");
    std::fs::copy(TERN, &tern).unwrap();
    std::fs::set_permissions(&tern, std::fs::Permissions::from_mode(0o755)).unwrap();
    let runtime = dir.path().join("vms");
    let load = Load::start(&runtime, "root-owned", 1, 5);
    std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o777)).unwrap();
    let before = cpus_allowed(load.pid, load.tids[0]);
    let log = dir.path().join("daemon.log");
    let socket = dir.path().join("ctl/park.sock");
    // The daemon runs as nobody: it may read the root-owned threads but not move them.
    let mut child = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&tern)
        .args([
            "park",
            "run",
            "interval_ms=50",
            "min_cores=0",
            "decrease_time=2",
            "--runtime-dir",
        ])
        .arg(&runtime)
        .arg("--socket")
        .arg(&socket)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("setpriv (util-linux) runs the daemon as nobody");
    wait_for("the daemon to park a core", Duration::from_secs(20), || {
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("unparked cpu0 (")
    });
    assert_eq!(
        cpus_allowed(load.pid, load.tids[0]),
        before,
        "nothing pinned without permission"
    );
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    assert!(
        child.wait().unwrap().success(),
        "the daemon survives refused calls"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    let want = format!(
        "skipped thread {}: no permission to change its affinity",
        load.tids[0]
    );
    assert_eq!(
        text.matches(&want).count(),
        1,
        "one logged skip per cause:\n{text}"
    );
    assert!(
        !text.contains("restore thread"),
        "nothing to restore:\n{text}"
    );
    assert_eq!(cpus_allowed(load.pid, load.tids[0]), before);
}

/// The control socket cannot freeze the tick: a client that connects and says nothing, one that
/// sends half a line and one that sends an endless line are each answered with an error at their
/// deadline or the size limit, while intervals keep counting and `status` answers at once. The
/// socket is 0600 in a 0700 directory, and another uid cannot reach it.
#[test]
fn silent_half_line_and_oversized_clients_do_not_stop_the_ticks() {
    use std::io::{Read, Write};
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixStream;
    require_host();
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().join("vms");
    let mut d = Daemon::start(dir.path(), &runtime, &["interval_ms=50"]);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&d.socket), 0o600);
    assert_eq!(mode(d.socket.parent().unwrap()), 0o700);

    let silent = UnixStream::connect(&d.socket).unwrap();
    let mut half = UnixStream::connect(&d.socket).unwrap();
    half.write_all(b"{\"op\":\"sta").unwrap();
    let mut endless = UnixStream::connect(&d.socket).unwrap();
    let flood = std::thread::spawn(move || {
        let chunk = vec![b' '; 4096];
        // The daemon stops reading past its limit and answers; the write then fails.
        for _ in 0..64 {
            if endless.write_all(&chunk).is_err() {
                break;
            }
        }
        let mut answer = String::new();
        let _ = endless.read_to_string(&mut answer);
        answer
    });

    let first = d.status()["interval"].as_u64().unwrap();
    let mut slowest = Duration::ZERO;
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(200));
        let t = Instant::now();
        d.status();
        slowest = slowest.max(t.elapsed());
    }
    let last = d.status()["interval"].as_u64().unwrap();
    assert!(
        last >= first + 5,
        "ticks go on with stuck clients connected: interval {first} → {last} in 1 s"
    );
    assert!(
        slowest < Duration::from_millis(500),
        "status answers at once: slowest {slowest:?}"
    );

    let answer = |mut s: UnixStream| {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut a = String::new();
        s.read_to_string(&mut a).unwrap();
        a
    };
    let t = Instant::now();
    let a = answer(silent);
    assert!(a.contains("No complete request within 2000 ms"), "{a}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let a = answer(half);
    assert!(a.contains("No complete request"), "{a}");
    let a = flood.join().unwrap();
    assert!(a.contains("Request longer than 65536 bytes"), "{a}");

    // Another uid cannot reach the socket (its directory is 0700).
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", TERN])
        .args(["park", "status", "--socket"])
        .arg(&d.socket)
        .output()
        .expect("run setpriv (util-linux)");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("No parking daemon at"), "{err}");
    let log = d.stop(Signal::SIGTERM);
    assert!(!log.contains("panicked"), "{log}");
}

/// A daemon run as `nobody` that allows only its own uid: root, who can reach every file, is
/// refused by its peer credentials (`SO_PEERCRED`) with a one-line answer and a log line, and
/// `nobody` is served.
#[test]
fn a_peer_whose_uid_is_not_allowed_is_refused_by_its_credentials() {
    use std::os::unix::fs::PermissionsExt;
    require_host();
    let dir = std::env::temp_dir().join(format!("tern-park-peer-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).unwrap();
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(dir.clone());
    std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let socket = dir.join("ctl/park.sock");
    let scratch = tempfile::tempdir().unwrap();
    let log = scratch.path().join("daemon.log");
    let child = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", TERN])
        .args(["park", "run", "interval_ms=50", "--allow-uid", "65534"])
        .arg("--runtime-dir")
        .arg(dir.join("vms"))
        .arg("--socket")
        .arg(&socket)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("run setpriv (util-linux)");
    let mut d = Daemon {
        child: Some(child),
        socket: socket.clone(),
        log,
    };
    wait_for("the control socket", Duration::from_secs(10), || {
        socket.exists()
    });
    let sock = socket.to_str().unwrap();
    let out = tern(&["park", "status", "--socket", sock]);
    assert!(!out.status.success(), "root is not on the daemon's list");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Refused: uid 0 (pid ") && err.contains("allowed uids: 65534"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", TERN])
        .args(["park", "status", "--json", "--socket", sock])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nobody is served: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(s["interval"].as_u64().is_some(), "{s}");
    let log = d.stop(Signal::SIGTERM);
    assert!(log.contains("control connection refused: uid 0"), "{log}");
}
