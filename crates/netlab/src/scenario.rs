//! A live migration under network load, as the tests, the demo and the benchmark run it: the test
//! guest runs under `tern vm run` on host h0 with its tap on h0's bridge, `tern vm receive` waits
//! on h1 with the same MAC, a client in the client namespace streams TCP echo requests to the
//! guest, and `tern vm migrate` moves the VM; the client reports the longest stall. Optionally the
//! guest also runs its memory writer (`tern.dirty_mib`, `tern.dirty_rate`), so the migration has
//! pages to chase while the client talks to the guest.
//!
//! The `tern` binary is given by path (the caller's own executable or the test's build).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use crate::Topology;
use crate::ns::{EchoReport, connect_from, stream_echo, stream_echo_from};

/// The MAC of the scenario's guest NIC.
pub const GUEST_MAC: &str = "52:54:00:4e:4d:01";
/// The TCP port the target listens on for the migration.
pub const MIGRATION_PORT: u16 = 7711;

/// What to run.
#[derive(Debug, Clone)]
pub struct MigrationScenario {
    /// The `tern` binary.
    pub tern: PathBuf,
    /// A scratch directory (sockets, logs).
    pub dir: PathBuf,
    /// The target's `--announce` value (`0,50,200,450,800`, `off`, …).
    pub announce: String,
    /// Time between client requests.
    pub interval: Duration,
    /// How long the client streams before the migration starts.
    pub before: Duration,
    /// How long the client streams after the migration command returned.
    pub after: Duration,
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// Keep the connection idle during the migration (the client stops before it and sends again
    /// right after it): then nothing but the announce tells the switch where the guest went.
    pub quiet: bool,
    /// The guest's memory writer, if any.
    pub writer: Option<GuestWriter>,
    /// The guest's heartbeat period, ms (`tern.hb_ms`; its `DIRTY` lines come with it).
    pub hb_ms: u64,
    /// How often the guest polls its NIC while idle, µs (`tern.net_tick_us`; `None`: the guest's
    /// default).
    pub net_tick_us: Option<u64>,
    /// Run the client's thread in the SCHED_FIFO class at this priority
    /// ([`crate::ns::realtime_this_thread`]), so that its waits are the VM's and not its own turn
    /// for a core on the host it shares with both VMMs; `None`: a normal thread.
    pub client_realtime: Option<u8>,
}

/// The test guest's memory writer: `mib` MiB rewritten at `pages_per_s` pages per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestWriter {
    /// The buffer, MiB (`tern.dirty_mib`).
    pub mib: u64,
    /// Pages per second (`tern.dirty_rate`; 0 = as fast as it can).
    pub pages_per_s: u64,
}

/// RAM the test guest needs besides its writer's buffer (its image, stacks, network buffers).
pub const GUEST_OVERHEAD_MIB: u64 = 64;

/// The kernel command line of the scenario's guest at `ip`/24 (echo server on port 7).
pub fn guest_cmdline(
    ip: std::net::Ipv4Addr,
    hb_ms: u64,
    writer: Option<GuestWriter>,
    net_tick_us: Option<u64>,
) -> String {
    let mut c = format!("tern.hb_ms={hb_ms} tern.ip={ip}/24 tern.echo_port=7");
    if let Some(w) = writer {
        c += &format!(
            " tern.dirty_mib={} tern.dirty_rate={}",
            w.mib, w.pages_per_s
        );
    }
    if let Some(t) = net_tick_us {
        c += &format!(" tern.net_tick_us={t}");
    }
    c
}

/// The guest memory a scenario needs: `asked`, or the writer's buffer plus
/// [`GUEST_OVERHEAD_MIB`] if that is more.
pub fn guest_memory_mib(asked: u64, writer: Option<GuestWriter>) -> u64 {
    writer.map_or(asked, |w| asked.max(w.mib + GUEST_OVERHEAD_MIB))
}

impl MigrationScenario {
    /// Defaults: QEMU's announce schedule, a request every 2 ms, 1 s before and 1.5 s after.
    pub fn new(tern: impl Into<PathBuf>, dir: impl Into<PathBuf>) -> Self {
        MigrationScenario {
            tern: tern.into(),
            dir: dir.into(),
            announce: "0,50,200,450,800".into(),
            interval: Duration::from_millis(2),
            before: Duration::from_secs(1),
            after: Duration::from_millis(1500),
            memory_mib: 256,
            quiet: false,
            writer: None,
            hb_ms: 500,
            net_tick_us: None,
            client_realtime: None,
        }
    }
}

/// What happened.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MigrationOutcome {
    /// The client's view.
    pub echo: EchoReport,
    /// The migration report `tern vm migrate --json` printed.
    pub migration: Option<serde_json::Value>,
    /// Wall time of the migrate command, ms.
    pub migrate_wall_ms: f64,
    /// The switch port of the guest's MAC after the run (`h1` when the network followed the VM).
    pub switch_port_after: Option<String>,
    /// The guest's console lines on the target (its heartbeats continue there).
    pub target_console: Vec<String>,
    /// The guest's console lines on the source, each with when it arrived.
    #[serde(skip)]
    pub source_console: Vec<(Instant, String)>,
    /// When `tern vm migrate` was started.
    #[serde(skip)]
    pub migrate_started: Option<Instant>,
    /// When `tern vm migrate` returned.
    #[serde(skip)]
    pub migrate_finished: Option<Instant>,
    /// When the client sent its slowest request, ms after `tern vm migrate` started (negative:
    /// before it).
    pub max_stall_at_ms: Option<f64>,
}

/// A scenario failure: one line for the operator.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ScenarioError(pub String);

fn err(s: impl Into<String>) -> ScenarioError {
    ScenarioError(s.into())
}

struct Proc {
    child: Child,
    lines: Receiver<(Instant, String)>,
    stderr: PathBuf,
}

impl Proc {
    fn spawn(mut cmd: Command, stderr: PathBuf) -> Result<Proc, ScenarioError> {
        let f = std::fs::File::create(&stderr).map_err(|e| err(format!("log file: {e}")))?;
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(f)
            .spawn()
            .map_err(|e| err(format!("cannot start {cmd:?}: {e}")))?;
        let out = child.stdout.take().ok_or_else(|| err("no stdout"))?;
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        Ok(Proc {
            child,
            lines,
            stderr,
        })
    }

    fn wait_line(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String, ScenarioError> {
        let deadline = Instant::now() + timeout;
        loop {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok((_, l)) if pred(&l) => return Ok(l),
                Ok(_) => {}
                Err(_) => {
                    return Err(err(format!(
                        "no {what} within {timeout:?}; stderr: {}",
                        std::fs::read_to_string(&self.stderr)
                            .unwrap_or_default()
                            .trim()
                    )));
                }
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the scenario in `topo` (two hosts and a client at least).
pub fn run_migration(
    topo: &Topology,
    s: &MigrationScenario,
) -> Result<MigrationOutcome, ScenarioError> {
    let client = topo
        .client_ns()
        .ok_or_else(|| err("the topology has no client"))?;
    let ip = Topology::guest_addr(0);
    let src_sock = s.dir.join("src.sock");
    let dst_sock = s.dir.join("dst.sock");
    let _ = std::fs::remove_file(&src_sock);
    let _ = std::fs::remove_file(&dst_sock);
    let tern = s.tern.to_string_lossy().into_owned();

    let mut cmd = Command::new("ip");
    let memory_mib = guest_memory_mib(s.memory_mib, s.writer);
    cmd.args(["netns", "exec", &topo.host_ns(0), &tern, "vm", "run"])
        .args(["--kernel", "builtin:testguest", "--name", "netmig-src"])
        .args(["--memory-mib", &memory_mib.to_string()])
        .args([
            "--cmdline",
            &guest_cmdline(ip, s.hb_ms, s.writer, s.net_tick_us),
        ])
        .args(["--net", &format!("tap=nmsrc,mac={GUEST_MAC},bridge=br0")])
        .arg("--api-sock")
        .arg(&src_sock)
        .arg("--runtime-dir")
        .arg(&s.dir);
    let src = Proc::spawn(cmd, s.dir.join("src.stderr"))?;
    src.wait_line("NET up line from the guest", Duration::from_secs(30), |l| {
        l.starts_with("NET up")
    })?;

    // A fresh VM whose MAC the switch saw elsewhere (an earlier run) announces itself once.
    let _ = Command::new(&s.tern)
        .args(["vm", "announce", "--api-sock"])
        .arg(&src_sock)
        .output();
    let listen = format!("{}:{MIGRATION_PORT}", topo.host_addr(1));
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &topo.host_ns(1), &tern, "vm", "receive"])
        .args(["--listen", &listen, "--name", "netmig-dst"])
        .args(["--net", &format!("tap=nmdst,mac={GUEST_MAC},bridge=br0")])
        .args(["--announce", &s.announce])
        .arg("--api-sock")
        .arg(&dst_sock)
        .arg("--runtime-dir")
        .arg(&s.dir);
    let dst = Proc::spawn(cmd, s.dir.join("dst.stderr"))?;
    // The target listens once its stderr says so.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&dst.stderr)
        .unwrap_or_default()
        .contains("waiting for a migration")
    {
        if Instant::now() > deadline {
            return Err(err("tern vm receive did not start listening"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }

    let mut stream = connect_from(&client, SocketAddr::from((ip, 7)), Duration::from_secs(5))
        .map_err(|e| err(format!("the client cannot connect to the guest: {e}")))?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let interval = s.interval;
    let (quiet, before) = (s.quiet, s.before);
    // In quiet mode the client streams `before`, pauses until `go` is set, then streams again.
    let go = Arc::new(AtomicBool::new(false));
    let go2 = go.clone();
    let realtime = s.client_realtime;
    let client_thread = std::thread::spawn(move || {
        let give_up = Duration::from_secs(5);
        if let Some(priority) = realtime
            && let Err(e) = crate::ns::realtime_this_thread(priority)
        {
            return EchoReport {
                connection_broken: true,
                error: Some(format!("the client: {e}")),
                ..EchoReport::default()
            };
        }
        if !quiet {
            return stream_echo(&mut stream, interval, give_up, || {
                stop2.load(Ordering::Relaxed)
            });
        }
        let t = Instant::now();
        let mut first = stream_echo(&mut stream, interval, give_up, || t.elapsed() >= before);
        while !go2.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(1));
        }
        if first.connection_broken {
            return first;
        }
        let second = stream_echo_from(&mut stream, first.requests, interval, give_up, || {
            stop2.load(Ordering::Relaxed)
        });
        first.requests += second.requests;
        first.samples.extend(second.samples);
        if second.max_stall_ms > first.max_stall_ms {
            first.max_stall_ms = second.max_stall_ms;
            first.max_stall_sent = second.max_stall_sent;
        }
        first.connection_broken = second.connection_broken;
        first.mismatched |= second.mismatched;
        first.error = second.error;
        first
    });
    std::thread::sleep(s.before);
    if s.quiet {
        // Let the last exchange settle (delayed ACKs) so the guest has nothing left to send.
        std::thread::sleep(Duration::from_millis(300));
    }

    let t = Instant::now();
    let migrate_started = Some(t);
    let out = Command::new(&s.tern)
        .args(["vm", "migrate", "--api-sock"])
        .arg(&src_sock)
        .args(["--to", &listen, "--json"])
        .output()
        .map_err(|e| err(format!("cannot run tern vm migrate: {e}")))?;
    let migrate_wall_ms = t.elapsed().as_secs_f64() * 1000.0;
    let migrate_finished = Some(Instant::now());
    go.store(true, Ordering::Relaxed);
    if !out.status.success() {
        stop.store(true, Ordering::Relaxed);
        let _ = client_thread.join();
        return Err(err(format!(
            "tern vm migrate failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let migration = String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok());
    std::thread::sleep(s.after);
    stop.store(true, Ordering::Relaxed);
    let echo = client_thread
        .join()
        .map_err(|_| err("the client thread panicked"))?;
    let switch_port_after = topo
        .switch_port_of_mac(GUEST_MAC)
        .map_err(|e| err(e.to_string()))?;
    let target_console: Vec<String> = dst.lines.try_iter().map(|(_, l)| l).collect();
    let source_console: Vec<(Instant, String)> = src.lines.try_iter().collect();
    let max_stall_at_ms = echo.max_stall_sent.map(|at| signed_ms(at, t));
    // Stop the target VM (the source VMM exited after the migration).
    let _ = Command::new(&s.tern)
        .args(["vm", "stop", "--api-sock"])
        .arg(&dst_sock)
        .output();
    drop(src);
    drop(dst);
    Ok(MigrationOutcome {
        echo,
        migration,
        migrate_wall_ms,
        switch_port_after,
        target_console,
        source_console,
        migrate_started,
        migrate_finished,
        max_stall_at_ms,
    })
}

/// `at - origin` in ms, negative when `at` is earlier.
pub fn signed_ms(at: Instant, origin: Instant) -> f64 {
    match at.checked_duration_since(origin) {
        Some(d) => d.as_secs_f64() * 1000.0,
        None => -(origin.duration_since(at).as_secs_f64() * 1000.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cmdline_carries_the_writer_and_the_tick_only_when_asked() {
        let ip = std::net::Ipv4Addr::new(10, 77, 0, 2);
        assert_eq!(
            guest_cmdline(ip, 500, None, None),
            "tern.hb_ms=500 tern.ip=10.77.0.2/24 tern.echo_port=7"
        );
        let w = GuestWriter {
            mib: 256,
            pages_per_s: 20_000,
        };
        assert_eq!(
            guest_cmdline(ip, 50, Some(w), Some(250)),
            "tern.hb_ms=50 tern.ip=10.77.0.2/24 tern.echo_port=7 \
             tern.dirty_mib=256 tern.dirty_rate=20000 tern.net_tick_us=250"
        );
    }

    #[test]
    fn the_guest_gets_room_for_its_writer() {
        let w = |mib| {
            Some(GuestWriter {
                mib,
                pages_per_s: 1,
            })
        };
        assert_eq!(guest_memory_mib(256, None), 256);
        assert_eq!(guest_memory_mib(256, w(256)), 256 + GUEST_OVERHEAD_MIB);
        assert_eq!(guest_memory_mib(1024, w(256)), 1024);
    }

    #[test]
    fn signed_ms_is_negative_before_the_origin() {
        let o = Instant::now();
        let later = o + std::time::Duration::from_millis(5);
        assert!((signed_ms(later, o) - 5.0).abs() < 1e-9);
        assert!((signed_ms(o, later) + 5.0).abs() < 1e-9);
    }
}
