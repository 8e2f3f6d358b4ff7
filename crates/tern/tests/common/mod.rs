//! Helpers shared by the `tern vm` integration tests: KVM/root checks that fail loudly, a running
//! VMM process with its console captured line by line, and API calls.

#![allow(dead_code)]

pub mod agent;
pub mod cluster;
pub mod volume;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

/// The `tern` binary under test.
pub fn tern() -> &'static str {
    env!("CARGO_BIN_EXE_tern")
}

pub use tern_test_support::{free_port, require_kvm, wait_for};

/// A scratch directory that lives as long as the test, mode 0700: a VMM refuses to put its API
/// socket in a directory others may enter.
pub fn scratch() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    tempfile::Builder::new()
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir()
        .expect("a temporary directory")
}

/// Creates `path` (and missing parents) mode 0700: a VMM's API socket may only live in such a
/// directory.
pub fn private_dir(path: &Path) {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .expect("a private directory");
}

/// A running `tern vm run` with its stdout read line by line on a thread.
pub struct RunningVm {
    pub child: Child,
    pub lines: Receiver<String>,
    pub seen: Vec<String>,
    pub stderr_path: PathBuf,
}

impl RunningVm {
    /// Starts `tern vm run ARGS…` with stdout piped and stderr to a file in `dir`.
    pub fn start(dir: &Path, args: &[&str]) -> RunningVm {
        let mut cmd = Command::new(tern());
        cmd.args(["vm", "run"]).args(args);
        Self::spawn(cmd, dir.join("stderr.txt"))
    }

    /// Waits for a console line matching `pred`, failing the test after `timeout`.
    pub fn wait_line(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!(
                    "no matching console line within {timeout:?}; console so far:\n{}\nstderr:\n{}",
                    self.seen.join("\n"),
                    self.stderr()
                ),
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "the VMM's console closed before a matching line; console:\n{}\nstderr:\n{}",
                    self.seen.join("\n"),
                    self.stderr()
                ),
            }
        }
    }

    /// Collects every console line that arrives within `d`.
    pub fn collect_for(&mut self, d: Duration) -> Vec<String> {
        let deadline = Instant::now() + d;
        let mut got = Vec::new();
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.seen.push(line.clone());
            got.push(line);
        }
        got
    }

    /// The VMM's stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Waits for the process to exit, failing the test after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> i32 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st.code().unwrap_or(-1);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "the VMM did not exit within {timeout:?}; stderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `tern vm migrate --resolve` for the VM behind `src_sock`, asking the target that listened on
/// 127.0.0.1:`port`: its exit code and stderr.
pub fn resolve_in_doubt(src_sock: &Path, port: u16) -> (i32, String) {
    let (rc, _, err) = tern_cmd(&[
        "vm",
        "migrate",
        "--api-sock",
        src_sock.to_str().unwrap(),
        "--to",
        &format!("127.0.0.1:{port}"),
        "--resolve",
    ]);
    (rc, err)
}

/// Runs `tern ARGS…` to completion and returns (exit code, stdout, stderr).
pub fn tern_cmd(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(tern()).args(args).output().expect("run tern");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `tern ARGS…` to completion, failing the test with its stderr unless it succeeds; its
/// stdout.
pub fn tern_ok(args: impl IntoIterator<Item = impl AsRef<std::ffi::OsStr>>) -> String {
    let out = Command::new(tern()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Parses `key=value` out of a console line.
pub fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// Waits until `path` exists, failing the test after `timeout`.
pub fn wait_for_path(path: &Path, timeout: Duration) {
    wait_for(&format!("{} to appear", path.display()), timeout, || {
        path.exists()
    });
}

impl RunningVm {
    /// Starts `tern ARGS…` (any subcommand) with stdout piped and stderr to `dir/<tag>.stderr`.
    pub fn start_tern(dir: &Path, tag: &str, args: &[&str]) -> RunningVm {
        Self::start_command(dir, tag, {
            let mut c = Command::new(tern());
            c.args(args);
            c
        })
    }

    /// Starts `cmd` with stdout piped and stderr to `dir/<tag>.stderr`.
    pub fn start_command(dir: &Path, tag: &str, cmd: Command) -> RunningVm {
        Self::spawn(cmd, dir.join(format!("{tag}.stderr")))
    }

    /// Starts `cmd` with stdout read line by line on a thread and stderr to `stderr_path`.
    fn spawn(mut cmd: Command, stderr_path: PathBuf) -> RunningVm {
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn tern");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        RunningVm {
            child,
            lines: rx,
            seen: Vec::new(),
            stderr_path,
        }
    }

    /// The highest heartbeat sequence number seen so far (vCPU 0's lines or the only vCPU's).
    pub fn last_hb(&self) -> Option<u64> {
        self.seen
            .iter()
            .filter(|l| l.starts_with("HB ") && !l.contains(" cpu=1"))
            .filter_map(|l| field(l, "seq"))
            .max()
    }

    /// Fails the test if the console showed a guest panic.
    pub fn assert_no_panic(&self) {
        if let Some(l) = self.seen.iter().find(|l| l.contains("PANIC")) {
            panic!(
                "the guest panicked: {l}\nconsole:\n{}",
                self.seen.join("\n")
            );
        }
    }
}

impl RunningVm {
    /// Starts `tern vm run` with the built-in test guest (`memory_mib` MiB, kernel command line
    /// `cmdline`) named `name`, its API socket `dir/api.sock`, its runtime directory `dir/rt` and
    /// its snapshot directory `dir`; the VM and its API socket. Waits for nothing.
    pub fn start_testguest(
        dir: &Path,
        name: &str,
        memory_mib: u64,
        cmdline: &str,
    ) -> (RunningVm, PathBuf) {
        let sock = dir.join("api.sock");
        let rt = dir.join("rt");
        let vm = RunningVm::start(
            dir,
            &[
                "--kernel",
                "builtin:testguest",
                "--memory-mib",
                &memory_mib.to_string(),
                "--cmdline",
                cmdline,
                "--name",
                name,
                "--api-sock",
                sock.to_str().unwrap(),
                "--runtime-dir",
                rt.to_str().unwrap(),
                "--snapshot-dir",
                dir.to_str().unwrap(),
            ],
        );
        (vm, sock)
    }
}

impl RunningVm {
    /// Starts `tern vm run --restore SNAP` with its API socket `sock` and runtime directory `rt`,
    /// stdout piped and stderr to `dir/<tag>.stderr`.
    pub fn restore(dir: &Path, tag: &str, snap: &Path, sock: &Path, rt: &Path) -> RunningVm {
        Self::start_tern(
            dir,
            tag,
            &[
                "vm",
                "run",
                "--restore",
                snap.to_str().unwrap(),
                "--api-sock",
                sock.to_str().unwrap(),
                "--runtime-dir",
                rt.to_str().unwrap(),
            ],
        )
    }
}

/// `tern vm snapshot --api-sock SOCK --out SNAP` (with `--stop` if `stop`) to completion:
/// (exit code, stdout, stderr).
pub fn snapshot(sock: &Path, snap: &Path, stop: bool) -> (i32, String, String) {
    let mut args = vec![
        "vm",
        "snapshot",
        "--api-sock",
        sock.to_str().unwrap(),
        "--out",
        snap.to_str().unwrap(),
    ];
    if stop {
        args.push("--stop");
    }
    tern_cmd(&args)
}

/// Waits until `path` contains `needle`, failing the test after `timeout`.
pub fn wait_for_text(path: &Path, needle: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} did not show {needle:?} within {timeout:?}; it holds:\n{text}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A source VM and a waiting target, both `tern` processes with their consoles captured.
pub struct MigrationPair {
    pub dir: tempfile::TempDir,
    pub src: RunningVm,
    pub dst: RunningVm,
    pub src_sock: PathBuf,
    pub dst_sock: PathBuf,
    pub runtime: PathBuf,
    pub port: u16,
    pub to_host: String,
}

impl MigrationPair {
    /// Starts `tern vm receive` on a free loopback port (with `receive_extra` options), then the
    /// source `tern vm run` with the test guest, and waits for the source's third heartbeat.
    pub fn start(memory_mib: u64, vcpus: u32, cmdline: &str, receive_extra: &[&str]) -> Self {
        Self::start_on(None, None, memory_mib, vcpus, cmdline, receive_extra)
    }

    /// Like [`MigrationPair::start`], the source VMM inside network namespace `src_ns` and the
    /// target inside `dst` = (namespace, address to listen on).
    pub fn start_on(
        src_ns: Option<&str>,
        dst: Option<(&str, std::net::Ipv4Addr)>,
        memory_mib: u64,
        vcpus: u32,
        cmdline: &str,
        receive_extra: &[&str],
    ) -> Self {
        require_kvm();
        let dir = scratch();
        let port = free_port();
        let in_ns = |ns: Option<&str>, args: &[&str]| {
            let mut c = match ns {
                Some(ns) => tern_netlab::Topology::command_in(ns, tern()),
                None => Command::new(tern()),
            };
            c.args(args);
            c
        };
        let runtime = dir.path().join("rt");
        let src_sock = dir.path().join("src.sock");
        let dst_sock = dir.path().join("dst.sock");
        let listen = match dst {
            Some((_, ip)) => format!("{ip}:{port}"),
            None => format!("127.0.0.1:{port}"),
        };
        let mut rargs = vec![
            "vm",
            "receive",
            "--listen",
            &listen,
            "--name",
            "dst",
            "--api-sock",
            dst_sock.to_str().unwrap(),
            "--runtime-dir",
            runtime.to_str().unwrap(),
        ];
        rargs.extend_from_slice(receive_extra);
        let dst_vm = RunningVm::start_command(dir.path(), "dst", in_ns(dst.map(|d| d.0), &rargs));
        wait_for_text(
            &dir.path().join("dst.stderr"),
            "waiting for a migration",
            Duration::from_secs(10),
        );
        let mem = memory_mib.to_string();
        let cpus = vcpus.to_string();
        let mut src = RunningVm::start_command(
            dir.path(),
            "src",
            in_ns(
                src_ns,
                &[
                    "vm",
                    "run",
                    "--kernel",
                    "builtin:testguest",
                    "--memory-mib",
                    &mem,
                    "--vcpus",
                    &cpus,
                    "--cmdline",
                    cmdline,
                    "--name",
                    "src",
                    "--api-sock",
                    src_sock.to_str().unwrap(),
                    "--runtime-dir",
                    runtime.to_str().unwrap(),
                ],
            ),
        );
        src.wait_line(Duration::from_secs(30), |l| {
            l.starts_with("HB ") && field(l, "seq").is_some_and(|s| s >= 3)
        });
        MigrationPair {
            dir,
            src,
            dst: dst_vm,
            to_host: listen
                .rsplit_once(':')
                .map(|h| h.0.to_string())
                .unwrap_or_default(),
            src_sock,
            dst_sock,
            runtime,
            port,
        }
    }

    /// `tern vm migrate --api-sock SRC --to 127.0.0.1:PORT --json EXTRA…` to completion: exit
    /// code, the JSON report, stderr.
    pub fn migrate(&self, extra: &[&str]) -> (i32, serde_json::Value, String) {
        self.migrate_to(self.port, extra)
    }

    /// The `--to` address for `port`: the receiver's own, or a loopback proxy's.
    fn target(&self, port: u16) -> String {
        if port == self.port {
            format!("{}:{port}", self.to_host)
        } else {
            format!("127.0.0.1:{port}")
        }
    }

    /// Starts `tern vm migrate --api-sock SRC --to …:PORT --json EXTRA…` in the background (for
    /// a test that acts while it runs); [`migrate_output`] waits for it.
    pub fn spawn_migrate(&self, port: u16, extra: &[&str]) -> std::process::Child {
        std::process::Command::new(tern())
            .args(["vm", "migrate", "--api-sock"])
            .arg(&self.src_sock)
            .args(["--to", &self.target(port), "--json"])
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn tern vm migrate")
    }

    /// Like [`MigrationPair::migrate`] with another target port (a proxy).
    pub fn migrate_to(&self, port: u16, extra: &[&str]) -> (i32, serde_json::Value, String) {
        let to = self.target(port);
        let mut args = vec![
            "vm",
            "migrate",
            "--api-sock",
            self.src_sock.to_str().unwrap(),
            "--to",
            &to,
            "--json",
        ];
        args.extend_from_slice(extra);
        let (rc, out, err) = tern_cmd(&args);
        let report = serde_json::from_str(out.trim()).unwrap_or(serde_json::Value::Null);
        (rc, report, err)
    }

    /// Asserts the whole success story: the source exited, the target's heartbeats continue the
    /// source's sequence, the guest's memory self-check stays quiet, the runtime entries moved.
    pub fn assert_moved(&mut self) {
        let rc = self.src.wait_exit(Duration::from_secs(15));
        assert_eq!(
            rc,
            0,
            "source VMM exit status; stderr:\n{}",
            self.src.stderr()
        );
        self.src.collect_for(Duration::from_millis(300));
        self.src.assert_no_panic();
        let last = self.src.last_hb().expect("source heartbeats");
        let first = self.dst.wait_line(Duration::from_secs(10), |l| {
            l.starts_with("HB ") && !l.contains(" cpu=1")
        });
        assert_eq!(
            field(&first, "seq"),
            Some(last + 1),
            "the target's first heartbeat must continue the source's sequence (source ended at {last}): {first}"
        );
        self.dst.collect_for(Duration::from_millis(2000));
        self.dst.assert_no_panic();
        let later = self.dst.last_hb().unwrap();
        assert!(
            later >= last + 10,
            "the target's heartbeats went on only to {later} (source ended at {last})"
        );
        assert!(
            !self.runtime.join("src.json").exists(),
            "the source's runtime entry must be gone"
        );
        assert!(
            self.runtime.join("dst.json").exists(),
            "the target must have a runtime entry"
        );
        let (rc, _, err) = tern_cmd(&["vm", "stop", "--api-sock", self.dst_sock.to_str().unwrap()]);
        assert_eq!(rc, 0, "stop the target: {err}");
        assert_eq!(self.dst.wait_exit(Duration::from_secs(10)), 0);
    }

    /// Asserts the failure story: the source guest keeps running (heartbeats go on, status says
    /// running), the target exits non-zero and leaves no runtime entry.
    pub fn assert_source_kept(&mut self) {
        let before = {
            self.src.collect_for(Duration::from_millis(200));
            self.src.last_hb().expect("source heartbeats")
        };
        self.src.collect_for(Duration::from_millis(1500));
        self.src.assert_no_panic();
        let after = self.src.last_hb().unwrap();
        assert!(
            after >= before + 5,
            "the source guest must keep running: heartbeat {before} → {after}\nstderr:\n{}",
            self.src.stderr()
        );
        let (rc, out, err) = tern_cmd(&[
            "vm",
            "status",
            "--api-sock",
            self.src_sock.to_str().unwrap(),
        ]);
        assert_eq!(rc, 0, "status: {err}");
        assert!(out.contains("\"running\""), "source status: {out}");
        let rc = self.dst.wait_exit(Duration::from_secs(40));
        assert_ne!(rc, 0, "a failed incoming migration exits non-zero");
        self.dst.collect_for(Duration::from_millis(100));
        assert!(
            !self.dst.seen.iter().any(|l| l.starts_with("HB ")),
            "no second copy may run: the target printed {:?}",
            self.dst.seen
        );
        assert!(
            !self.runtime.join("dst.json").exists(),
            "a failed target leaves no runtime entry"
        );
        assert!(self.runtime.join("src.json").exists());
        let _ = tern_cmd(&["vm", "stop", "--api-sock", self.src_sock.to_str().unwrap()]);
        self.src.wait_exit(Duration::from_secs(10));
    }
}

/// Waits for a `tern vm migrate` started by [`MigrationPair::spawn_migrate`]: its exit code (-1
/// when killed by a signal), the JSON report (null if none) and stderr.
pub fn migrate_output(child: std::process::Child) -> (i32, serde_json::Value, String) {
    let out = child.wait_with_output().expect("migrate output");
    (
        out.status.code().unwrap_or(-1),
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A cluster PKI in `dir/ca`: `tern pki init`, then `tern pki issue` for each (name, role);
/// returns the CA directory (each certificate in `ca/NAME`, usable as `--tls-dir`).
pub fn pki(dir: &Path, certs: &[(&str, &str)]) -> PathBuf {
    let ca = dir.join("ca");
    let (rc, _, err) = tern_cmd(&["pki", "init", "--dir", ca.to_str().unwrap()]);
    assert_eq!(rc, 0, "pki init: {err}");
    for (name, role) in certs {
        let args = [
            "pki",
            "issue",
            "--dir",
            ca.to_str().unwrap(),
            "--name",
            name,
        ];
        let (rc, _, err) = tern_cmd(&[&args[..], &["--role", role]].concat());
        assert_eq!(rc, 0, "pki issue {name}: {err}");
    }
    ca
}
