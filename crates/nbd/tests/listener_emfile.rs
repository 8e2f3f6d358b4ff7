//! Running out of file descriptors does not end the NBD listener (it used to: an `accept` error
//! returned from `run_listener`, and with it the volume node process). Its own test binary: it
//! lowers this process's open-file limit.

use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tern_nbd::{Client, FileBackend, ListenerOptions, ListenerStats, StaticExports};

/// This process's hard open-file limit (from /proc/self/limits).
fn hard_nofile() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(4).unwrap().parse().unwrap()
}

/// Set the soft open-file limit to `n` (the hard one stays: raising it back may need
/// CAP_SYS_RESOURCE).
fn set_nofile(n: u64) {
    tern_test_support::require_tools(&["prlimit"]);
    let pid = std::process::id().to_string();
    let hard = hard_nofile();
    let st = std::process::Command::new("prlimit")
        .args(["--pid", &pid, &format!("--nofile={}:{hard}", n.min(hard))])
        .status()
        .unwrap();
    assert!(st.success(), "prlimit --nofile={n} failed");
}

#[test]
fn emfile_on_accept_is_waited_out_and_the_listener_serves_again() {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(1 << 20).unwrap();
    let mut ex = StaticExports::new();
    ex.insert(
        "disk",
        Arc::new(FileBackend::open(f.path(), false).unwrap()),
    );
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let stats = Arc::new(ListenerStats::default());
    let st = Arc::clone(&stats);
    let listener = std::thread::spawn(move || {
        tern_nbd::run_listener_with(l, Arc::new(ex), ListenerOptions::default(), st)
    });
    // Another process holds 100 idle connections (it has descriptors of its own), so only the
    // server runs out: each connection it serves costs it three.
    let port = addr.rsplit_once(':').unwrap().1;
    let script = format!(
        "for i in $(seq 100); do exec {{fd}}<>/dev/tcp/127.0.0.1/{port} || break; done; \
         echo ready; sleep 60"
    );
    // The server's limit drops before the first connection (lowered after, the accept loop
    // could take all 100 while the limit was still high and never meet EMFILE); the holder
    // inherits the low soft limit and raises its own back to the hard one.
    set_nofile(64);
    let hard = hard_nofile().to_string();
    let mut holder = std::process::Command::new("prlimit")
        .arg(format!("--nofile={hard}:{hard}"))
        .args(["--", "bash", "-c", &script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "ready");
    // Out of descriptors shows either in `accept` itself (EMFILE) or, when `accept` got the
    // last one, in the copy the listener makes for its handshake watchdog: both are counted.
    tern_test_support::wait_for(
        "the listener to run out of descriptors",
        Duration::from_secs(10),
        || stats.accept_errors.load(Ordering::SeqCst) > 0,
    );
    assert!(!listener.is_finished(), "the listener ended on EMFILE");
    let _ = holder.kill();
    let _ = holder.wait();
    set_nofile(4096);
    // The backlog drains, and a real client is served.
    let mut client = None;
    tern_test_support::wait_for("a real client served", Duration::from_secs(10), || {
        client = Client::connect_timeout(&addr, "disk", Duration::from_secs(5)).ok();
        client.is_some()
    });
    let mut c = client.unwrap();
    let mut b = [0u8; 4096];
    c.read(0, &mut b).unwrap();
    c.write(0, &[1u8; 4096], true).unwrap();
    assert!(!listener.is_finished());
}
