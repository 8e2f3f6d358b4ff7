//! Core parking with real KVM guests: two VMs running the embedded test guest at a light load are
//! packed onto one core; a guest dirtying memory at maximum rate gets the second core unparked within
//! the increase time; stopping the daemon restores the vCPU threads' affinities. Needs root, /dev/kvm
//! and two CPUs; fails loudly otherwise.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tern_test_support::{cpus_allowed, require_cpus, require_kvm, require_root_for};

const TERN: &str = env!("CARGO_BIN_EXE_tern");
const LIGHT: &str = "tern.hb_ms=200 tern.dirty_mib=2 tern.dirty_rate=200";
/// When guest b switches to maximum-rate dirtying: well after the two light guests are packed (which
/// takes about a second).
const SWITCH_AFTER_MS: u64 = 6000;

fn require_host() {
    require_root_for("it sets thread affinity");
    require_kvm();
    require_cpus(2);
}

struct Vm {
    child: Child,
    entry: PathBuf,
}

impl Vm {
    fn start(dir: &Path, name: &str, cmdline: &str) -> Vm {
        let runtime = dir.join("vms");
        let child = Command::new(TERN)
            .args([
                "vm",
                "run",
                "--kernel",
                "builtin:testguest",
                "--cmdline",
                cmdline,
                "--name",
                name,
            ])
            .arg("--serial")
            .arg(format!(
                "file:{}",
                dir.join(format!("{name}.log")).display()
            ))
            .arg("--runtime-dir")
            .arg(&runtime)
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tern vm run");
        let entry = runtime.join(format!("{name}.json"));
        let vm = Vm { child, entry };
        wait_for(&format!("runtime entry of {name}"), || vm.entry.exists());
        vm
    }

    /// (pid, vCPU tids) from the runtime entry.
    fn threads(&self) -> Vec<(u32, u32)> {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&self.entry).unwrap()).unwrap();
        let pid = v["pid"].as_u64().unwrap() as u32;
        v["vcpu_tids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| (pid, t.as_u64().unwrap() as u32))
            .collect()
    }

    fn stop(mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Stops the daemon with SIGTERM if a test fails half-way, so it still restores what it changed.
struct Stopper(Option<Child>);

impl Drop for Stopper {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
            let _ = c.wait();
        }
    }
}

fn wait_for(what: &str, ok: impl FnMut() -> bool) {
    tern_test_support::wait_for(what, Duration::from_secs(30), ok);
}

fn wait_for_long(what: &str, ok: impl FnMut() -> bool) {
    tern_test_support::wait_for(what, Duration::from_secs(60), ok);
}

fn status(socket: &Path) -> serde_json::Value {
    let out = Command::new(TERN)
        .args(["park", "status", "--json", "--socket"])
        .arg(socket)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn two_light_guests_share_one_core_and_one_turning_busy_unparks_the_second() {
    require_host();
    let dir = tempfile::tempdir().unwrap();
    let a = Vm::start(dir.path(), "a", LIGHT);
    let b = Vm::start(
        dir.path(),
        "b",
        &format!("{LIGHT} tern.max_after_ms={SWITCH_AFTER_MS}"),
    );
    let a_threads = a.threads();
    let light: Vec<(u32, u32)> = a_threads.iter().chain(&b.threads()).copied().collect();
    let original: Vec<String> = light.iter().map(|&(p, t)| cpus_allowed(p, t)).collect();

    let socket = dir.path().join("ctl/park.sock");
    let log = dir.path().join("daemon.log");
    let increase_time = 2u64;
    let daemon = Command::new(TERN)
        .args([
            "park",
            "run",
            "interval_ms=100",
            "decrease_time=3",
            "min_cores=0",
        ])
        .arg(format!("increase_time={increase_time}"))
        .arg("--runtime-dir")
        .arg(dir.path().join("vms"))
        .arg("--socket")
        .arg(&socket)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut daemon = Stopper(Some(daemon));
    wait_for("the daemon's socket", || socket.exists());

    wait_for("both light guests on one core", || {
        light.iter().all(|&(p, t)| cpus_allowed(p, t) == "0")
    });
    assert_eq!(status(&socket)["unparked"], serde_json::json!([0]));

    // Guest b switches itself to dirtying memory as fast as it can (`tern.max_after_ms`), some
    // seconds after boot, once the two light guests have been packed.
    let b_log = dir.path().join("b.log");
    let mut before = None;
    wait_for_long("guest b switching to its maximum rate", || {
        let switched =
            std::fs::read_to_string(&b_log).is_ok_and(|l| l.contains("DIRTY switch rate=max"));
        if switched {
            before = Some(status(&socket)["interval"].as_u64().unwrap());
        }
        switched
    });
    let before = before.unwrap();
    assert_eq!(
        status(&socket)["unparked"],
        serde_json::json!([0]),
        "still packed when the load rises (switch later if packing takes longer)"
    );
    wait_for("the second core unparked", || {
        status(&socket)["unparked"].as_array().unwrap().len() == 2
    });
    let changed = status(&socket)["last_change_interval"].as_u64().unwrap();
    eprintln!("guest b at maximum rate after interval {before}, second core unparked at {changed}");
    // One interval for a sample to contain the new load, one for the log line to be seen, then at
    // most increase_time.
    assert!(
        changed <= before + 2 + increase_time,
        "guest b at maximum rate after interval {before}, second core unparked at {changed}"
    );
    for &(p, t) in a_threads.iter().chain(&b.threads()) {
        assert_eq!(
            cpus_allowed(p, t),
            "0-1",
            "thread {t} may use the unparked core"
        );
    }

    // The busy guest stops: parked again; then the daemon stops and restores.
    b.stop();
    wait_for("parked again", || {
        a_threads.iter().all(|&(p, t)| cpus_allowed(p, t) == "0")
    });
    let mut child = daemon.0.take().unwrap();
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    assert!(child.wait().unwrap().success());
    let after: Vec<String> = a_threads.iter().map(|&(p, t)| cpus_allowed(p, t)).collect();
    assert_eq!(
        after,
        original[..a_threads.len()],
        "log:\n{}",
        std::fs::read_to_string(&log).unwrap()
    );
    a.stop();
}
