//! Dev-only helpers shared by Tern's tests and benchmarks, so each need is met once.
//!
//! Tests that need root, `/dev/kvm` or a tool such as etcd call the `require_*` functions first: they
//! panic with a message that says what is missing and how to get it, so a machine that cannot run a
//! test fails it loudly rather than skipping it. Nothing here is linked into a shipped binary; only
//! `[dev-dependencies]` (and `xtask`) name this crate.

#![forbid(unsafe_code)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Whether this process runs with effective uid 0, read from `/proc/self/status`.
pub fn is_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .is_some_and(|euid| euid == "0")
}

/// Panics unless this process is root: the test needs namespaces, taps or `/run/tern`.
pub fn require_root() {
    require_root_for("network namespaces, taps, /run/tern");
}

/// Panics unless this process is root, saying `why` the test needs it (e.g. "it sets thread
/// affinity").
pub fn require_root_for(why: &str) {
    assert!(
        is_root(),
        "this test needs root ({why}): run the tests as root"
    );
}

/// Panics unless this host has at least `n` CPUs (as `std::thread::available_parallelism` sees
/// them), naming how many it has.
pub fn require_cpus(n: usize) {
    let have = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(
        have >= n,
        "this test needs at least {n} CPUs, this host has {have}"
    );
}

/// The CPUs thread `tid` of process `pid` may run on, as the kernel lists them
/// (`Cpus_allowed_list` in `/proc/PID/task/TID/status`, e.g. `0-3` or `0,2`). Panics if the thread
/// does not exist.
pub fn cpus_allowed(pid: u32, tid: u32) -> String {
    let path = format!("/proc/{pid}/task/{tid}/status");
    let status = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap_or_else(|| panic!("{path} has no Cpus_allowed_list line"))
        .trim()
        .to_string()
}

/// Panics unless this process is root and can open `/dev/kvm` read-write: the test boots guests.
pub fn require_kvm() {
    require_root();
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: this test boots KVM guests (load kvm_intel, kvm_amd or kvm_pvm)"
    );
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("cannot open /dev/kvm ({e}): this test boots KVM guests");
    }
}

/// Panics unless every program in `tools` is on `PATH`, naming the missing ones and the Debian
/// packages that `scripts/install-deps.sh` installs.
pub fn require_tools(tools: &[&str]) {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| which(t).is_none())
        .collect();
    assert!(
        missing.is_empty(),
        "this test needs {} on PATH: run `bash scripts/install-deps.sh` as root",
        missing.join(", ")
    );
}

/// The first executable called `name` on `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// A loopback TCP port that nobody listened on a moment ago. Another process may take it before the
/// caller binds it; callers that start servers retry or wait for the server to answer.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free loopback port: {e}"))
}

/// Polls `ok` every 20 ms until it returns true; panics after `timeout`, naming `what`.
pub fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process killed and reaped when dropped, so a failing test leaves nothing running.
#[derive(Debug)]
pub struct ChildGuard(pub Child);

impl ChildGuard {
    /// The child's process id.
    pub fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A single-member etcd on loopback ports, its data in a directory of its own; stopped on drop.
#[derive(Debug)]
pub struct Etcd {
    /// The client URL, `http://127.0.0.1:PORT`.
    pub url: String,
    /// The client port.
    pub port: u16,
    _child: ChildGuard,
    _dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts etcd and waits (up to 20 s) until its client port accepts connections.
    pub fn start() -> Etcd {
        require_tools(&["etcd"]);
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("a scratch directory: {e}"));
        let (port, peer_port) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let log = std::fs::File::create(dir.path().join("etcd.log"))
            .unwrap_or_else(|e| panic!("etcd log file: {e}"));
        let child = Command::new("etcd")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &url])
            .args(["--advertise-client-urls", &url])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("default={peer}")])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting etcd: {e}"));
        let child = ChildGuard(child);
        wait_for("etcd's client port", Duration::from_secs(20), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Etcd {
            url,
            port,
            _child: child,
            _dir: dir,
        }
    }

    /// What etcd has logged so far (for a failing test's message).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("etcd.log")).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_port_can_be_bound_right_away() {
        let port = free_port();
        assert_ne!(port, 0);
        TcpListener::bind(("127.0.0.1", port)).expect("the port is free");
    }

    #[test]
    fn wait_for_returns_once_the_condition_holds() {
        let mut calls = 0;
        wait_for("three calls", Duration::from_secs(5), || {
            calls += 1;
            calls == 3
        });
        assert_eq!(calls, 3);
    }

    #[test]
    #[should_panic(expected = "timed out after")]
    fn wait_for_panics_naming_what_it_waited_for() {
        wait_for("never", Duration::from_millis(50), || false);
    }

    #[test]
    fn is_root_agrees_with_id_u() {
        let out = Command::new("id").arg("-u").output().expect("run id -u");
        let uid = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert_eq!(is_root(), uid == "0", "id -u says {uid}");
    }

    #[test]
    fn require_root_for_names_the_reason_unless_root() {
        let got = std::panic::catch_unwind(|| require_root_for("a test reason"));
        match got {
            Ok(()) => assert!(is_root()),
            Err(e) => {
                assert!(!is_root());
                let msg = e.downcast_ref::<String>().cloned().unwrap_or_default();
                assert!(msg.contains("(a test reason)"), "{msg}");
            }
        }
    }

    #[test]
    fn require_cpus_passes_for_one_and_names_both_counts_when_short() {
        require_cpus(1);
        let e = std::panic::catch_unwind(|| require_cpus(usize::MAX)).expect_err("too many CPUs");
        let msg = e.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(
            msg.contains(&format!("at least {} CPUs", usize::MAX)) && msg.contains("this host has"),
            "{msg}"
        );
    }

    #[test]
    fn cpus_allowed_matches_taskset() {
        require_tools(&["taskset"]);
        let pid = std::process::id();
        let out = Command::new("taskset")
            .args(["-cp", &pid.to_string()])
            .output()
            .expect("run taskset");
        // "pid N's current affinity list: 0,1"
        let text = String::from_utf8_lossy(&out.stdout);
        let want = text.rsplit(": ").next().unwrap_or_default().trim();
        let got = cpus_allowed(pid, pid);
        assert_eq!(
            cpu_set(&got),
            cpu_set(want),
            "{got:?}; taskset said {text:?}"
        );
    }

    /// The CPUs of a list such as `0-2,5` (the kernel writes ranges, taskset may not).
    fn cpu_set(list: &str) -> Vec<u32> {
        let mut cpus = Vec::new();
        for part in list.split(',') {
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            let (a, b): (u32, u32) = (a.parse().expect("a CPU"), b.parse().expect("a CPU"));
            cpus.extend(a..=b);
        }
        cpus
    }

    #[test]
    #[should_panic(expected = "reading /proc/")]
    fn cpus_allowed_of_a_missing_thread_panics_naming_the_file() {
        cpus_allowed(std::process::id(), u32::MAX);
    }

    #[test]
    fn which_finds_sh_and_not_a_made_up_name() {
        assert!(which("sh").is_some());
        assert!(which("tern-no-such-program-here").is_none());
    }

    #[test]
    fn etcd_starts_and_answers_on_its_port() {
        let etcd = Etcd::start();
        assert!(TcpStream::connect(("127.0.0.1", etcd.port)).is_ok());
        assert!(etcd.url.ends_with(&etcd.port.to_string()));
    }
}
