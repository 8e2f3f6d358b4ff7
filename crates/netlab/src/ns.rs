//! Running code inside a network namespace of a topology (e.g. a client's sockets in `NAME-cl`),
//! and a client that streams TCP echo requests and measures the longest wait for an answer.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Why code could not be run inside a namespace.
#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    /// The namespace file could not be opened.
    #[error("cannot open network namespace {name} (/run/netns/{name}; does it exist?)")]
    Open {
        /// The namespace.
        name: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// setns failed.
    #[error("cannot enter network namespace {name} (needs root)")]
    Enter {
        /// The namespace.
        name: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The thread could not be started or panicked.
    #[error("the thread running in namespace {0} failed")]
    Thread(String),
}

/// Runs `f` on a new thread that first enters network namespace `ns` (`/run/netns/NS`, as made by
/// `ip netns add`); sockets created there stay in that namespace when handed back.
pub fn in_namespace<T, F>(ns: &str, f: F) -> Result<T, NamespaceError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let path = format!("/run/netns/{ns}");
    let file = std::fs::File::open(&path).map_err(|source| NamespaceError::Open {
        name: ns.to_string(),
        source,
    })?;
    let name = ns.to_string();
    let handle = std::thread::Builder::new()
        .name(format!("netns-{ns}"))
        .spawn(move || {
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&file),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .map_err(|e| NamespaceError::Enter {
                name,
                source: e.into(),
            })?;
            Ok(f())
        })
        .map_err(|_| NamespaceError::Thread(ns.to_string()))?;
    handle
        .join()
        .map_err(|_| NamespaceError::Thread(ns.to_string()))?
}

/// Why the calling thread could not be given a real-time priority.
#[derive(Debug, thiserror::Error)]
pub enum RealtimeError {
    /// The priority is outside SCHED_FIFO's range.
    #[error("real-time priority {0} is out of range (give 1 to 99)")]
    Priority(u8),
    /// `chrt` could not be run.
    #[error("cannot run chrt to give thread {tid} a real-time priority (util-linux)")]
    Spawn {
        /// The thread.
        tid: i32,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `chrt` refused.
    #[error("chrt --fifo --pid {priority} {tid} failed (needs root): {stderr}")]
    Refused {
        /// The thread.
        tid: i32,
        /// The priority asked for.
        priority: u8,
        /// What chrt said.
        stderr: String,
    },
}

/// Puts the calling thread in the SCHED_FIFO class at `priority` (1..=99), with `chrt`. A client
/// that shares the host with the VMMs it measures then gets a core as soon as it has something to
/// do, as a client on a machine of its own would: its wait is the VM's answer, not its own turn
/// behind the VMMs' threads and whatever else runs on the host. The thread must block between
/// requests (a real-time thread that never sleeps would starve the host's normal threads).
pub fn realtime_this_thread(priority: u8) -> Result<(), RealtimeError> {
    if !(1..=99).contains(&priority) {
        return Err(RealtimeError::Priority(priority));
    }
    let tid = rustix::thread::gettid().as_raw_nonzero().get();
    let out = std::process::Command::new("chrt")
        .args(["--fifo", "--pid", &priority.to_string(), &tid.to_string()])
        .output()
        .map_err(|source| RealtimeError::Spawn { tid, source })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(RealtimeError::Refused {
            tid,
            priority,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Connects to `addr` from inside namespace `ns`.
pub fn connect_from(ns: &str, addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    in_namespace(ns, move || TcpStream::connect_timeout(&addr, timeout))
        .map_err(std::io::Error::other)?
}

/// What an echo stream saw.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct EchoReport {
    /// Requests sent and fully answered.
    pub requests: u64,
    /// The longest time between sending a request and its complete answer.
    pub max_stall_ms: f64,
    /// Whether the connection broke (reset, closed, timed out or answered wrongly).
    pub connection_broken: bool,
    /// Bytes echoed back that did not match what was sent (lost, duplicated or reordered bytes).
    pub mismatched: bool,
    /// What broke the connection, if it broke.
    pub error: Option<String>,
    /// When the slowest request was sent.
    #[serde(skip)]
    pub max_stall_sent: Option<Instant>,
    /// Every answered request: when it was sent and how long its echo took.
    #[serde(skip)]
    pub samples: Vec<(Instant, Duration)>,
}

/// The longest wait among `samples` (send time, wait) whose wait overlaps `from..=to`: a request
/// sent before `from` but answered after it counts, as does one sent at `to`. Its send time and
/// wait in ms; `None` if no request overlaps.
pub fn longest_overlapping(
    samples: &[(Instant, Duration)],
    from: Instant,
    to: Instant,
) -> Option<(Instant, f64)> {
    samples
        .iter()
        .filter(|(sent, took)| *sent <= to && *sent + *took >= from)
        .max_by_key(|(_, took)| *took)
        .map(|(sent, took)| (*sent, took.as_secs_f64() * 1000.0))
}

/// The request with sequence number `seq`: 16 bytes `REQ` + 12 digits + newline, so any lost,
/// duplicated or reordered byte in the echo changes what comes back.
pub fn request_bytes(seq: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    let s = format!("REQ{:012}\n", seq % 1_000_000_000_000);
    b.copy_from_slice(s.as_bytes());
    b
}

/// Sends one request every `interval` over `stream` until `stop()` says so, waiting for each echo
/// (at most `give_up` for one), and reports the longest wait.
pub fn stream_echo(
    stream: &mut TcpStream,
    interval: Duration,
    give_up: Duration,
    mut stop: impl FnMut() -> bool,
) -> EchoReport {
    stream_echo_from(stream, 0, interval, give_up, &mut stop)
}

/// As [`stream_echo`], numbering requests from `first_seq` (to continue an earlier stream on the
/// same connection).
pub fn stream_echo_from(
    stream: &mut TcpStream,
    first_seq: u64,
    interval: Duration,
    give_up: Duration,
    mut stop: impl FnMut() -> bool,
) -> EchoReport {
    let mut report = EchoReport::default();
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(give_up));
    let mut max = Duration::ZERO;
    let mut seq = first_seq;
    let mut next = Instant::now();
    while !stop() {
        let req = request_bytes(seq);
        let sent = Instant::now();
        let fail = |report: &mut EchoReport, e: String| {
            report.connection_broken = true;
            report.error = Some(e);
        };
        if let Err(e) = stream.write_all(&req) {
            fail(&mut report, format!("send: {e}"));
            break;
        }
        let mut got = [0u8; 16];
        if let Err(e) = stream.read_exact(&mut got) {
            fail(&mut report, format!("receive: {e}"));
            break;
        }
        let took = sent.elapsed();
        if took > max {
            max = took;
            report.max_stall_sent = Some(sent);
        }
        if got != req {
            report.mismatched = true;
            fail(
                &mut report,
                format!(
                    "echo of request {seq} came back as {:?}",
                    String::from_utf8_lossy(&got)
                ),
            );
            break;
        }
        report.requests += 1;
        report.samples.push((sent, took));
        seq += 1;
        next += interval;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
    report.max_stall_ms = max.as_secs_f64() * 1000.0;
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scheduling policy of the calling thread (field 41 of its `stat`: 0 normal, 1 FIFO).
    fn this_threads_policy() -> u32 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        // The fields after the command name (in parentheses, which may hold spaces) start at 3.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        rest.split_whitespace()
            .nth(41 - 3)
            .unwrap()
            .parse()
            .unwrap()
    }

    #[test]
    fn a_thread_made_real_time_runs_in_the_fifo_class() {
        tern_test_support::require_root_for("giving a thread a real-time priority");
        let policy = std::thread::spawn(|| {
            let before = this_threads_policy();
            realtime_this_thread(1).unwrap();
            (before, this_threads_policy())
        })
        .join()
        .unwrap();
        assert_eq!(policy, (0, 1), "SCHED_OTHER, then SCHED_FIFO");
        // The caller's other threads keep their class.
        assert_eq!(this_threads_policy(), 0);
        for bad in [0, 100] {
            let e = realtime_this_thread(bad).unwrap_err();
            assert!(e.to_string().contains("give 1 to 99"), "{e}");
        }
    }

    #[test]
    fn requests_are_distinct_fixed_size_lines() {
        assert_eq!(&request_bytes(7), b"REQ000000000007\n");
        assert_ne!(request_bytes(1), request_bytes(2));
    }

    #[test]
    fn a_missing_namespace_is_a_clear_error() {
        let e = in_namespace("tern-no-such-ns", || ()).unwrap_err();
        assert!(e.to_string().contains("tern-no-such-ns"), "{e}");
    }

    #[test]
    fn the_stream_measures_a_loopback_echo_and_notices_a_broken_one() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut b = [0u8; 16];
            for _ in 0..5 {
                s.read_exact(&mut b).unwrap();
                s.write_all(&b).unwrap();
            }
            // Then a corrupted echo.
            s.read_exact(&mut b).unwrap();
            b[5] ^= 1;
            s.write_all(&b).unwrap();
        });
        let mut c = TcpStream::connect(addr).unwrap();
        let r = stream_echo(
            &mut c,
            Duration::from_millis(1),
            Duration::from_secs(5),
            || false,
        );
        server.join().unwrap();
        assert_eq!(r.requests, 5);
        assert!(r.connection_broken && r.mismatched, "{r:?}");
        assert!(r.max_stall_ms > 0.0);
        assert!(r.max_stall_sent.is_some(), "{r:?}");
        assert_eq!(r.samples.len(), 5, "the corrupted echo is no sample");
    }

    #[test]
    fn the_longest_overlapping_wait_counts_requests_straddling_the_window() {
        let o = Instant::now();
        let ms = Duration::from_millis;
        let samples = [
            (o, ms(50)),           // 0-50: ends before the window
            (o + ms(90), ms(30)),  // 90-120: straddles its start
            (o + ms(130), ms(5)),  // inside
            (o + ms(200), ms(40)), // sent at its end
            (o + ms(201), ms(90)), // after it
        ];
        let (sent, took) = longest_overlapping(&samples, o + ms(100), o + ms(200)).unwrap();
        assert_eq!((sent, took), (o + ms(200), 40.0));
        let (sent, took) = longest_overlapping(&samples, o + ms(100), o + ms(199)).unwrap();
        assert_eq!((sent, took), (o + ms(90), 30.0));
        assert!(longest_overlapping(&samples, o + ms(60), o + ms(80)).is_none());
    }
}
