//! The host watchdog makes the fence real (in-process nodes, a real writer process):
//!
//! A VM disk (`VolumeDisk`, in a child process, as in a VMM) writes a preallocated file directly
//! on the LUN through node 2 and renews its lease there. It freezes itself (SIGSTOP, the
//! debug-only fault point `disk-pwrite`) right after its lease check and before its `pwrite`:
//! a queued write. Node 2's watchdog must SIGKILL it once its lease lapsed, and the coordinator
//! must give the lease to node 3 only after that (TTL plus the watchdog's margin). Node 3 then
//! writes every block; the frozen writer, continued, lands nothing: node 3's data stays.
//! Without the watchdog the continued writer's queued `pwrite` would overwrite node 3's block.
//! Before it freezes, the writer runs (and renews) for more than two TTLs without being killed.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Cluster, DIRECT, NodeOptions, TIMEOUT};
use tern_nbd::SharedClient;
use tern_volume::client::VolumeDisk;
use tern_volume::control::{self, LeaseAction, Request, Response};
use tern_volume::lease::WatchdogTimings;

const FILE: &str = "vm.raw";
const TTL_MS: u64 = 1000;
const BLOCKS: u64 = 16;
/// The writer freezes before its 31st direct write (30 skipped): about 3 TTLs after it starts.
const STOP_SKIP: u64 = 30;
const CHILD_ENV: &str = "TERN_WATCHDOG_TEST_WRITER";

fn ctl(addr: &str, req: Request) -> Result<Response, control::ControlError> {
    control::request(addr, &req, false, TIMEOUT)
}

fn block(tag: u8, k: u64) -> Vec<u8> {
    let mut b = vec![tag; 4096];
    b[..8].copy_from_slice(&k.to_le_bytes());
    b
}

/// The writer process: opens the disk through the node at `addr`, writes block after block
/// (every 100 ms, flushed, acknowledged on stdout) until it is stopped or killed.
fn writer(addr: &str) -> ! {
    let disk = VolumeDisk::open(&format!("{addr}/{FILE}"), false).unwrap();
    println!("OPEN");
    for k in 0.. {
        disk.write_at(&block(0xaa, k), (k % BLOCKS) * 4096).unwrap();
        disk.flush().unwrap();
        println!("ACK {k}");
        std::thread::sleep(Duration::from_millis(100));
    }
    unreachable!()
}

fn proc_state(pid: u32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit(')').next()?.trim().chars().next()
}

#[test]
fn a_frozen_writer_is_killed_before_its_lease_is_given_away() {
    if let Ok(addr) = std::env::var(CHILD_ENV) {
        writer(&addr);
    }
    #[cfg(not(debug_assertions))]
    panic!("the fault point this test freezes the writer at exists in debug builds only");
    let dir = tempfile::tempdir().unwrap();
    let opts = NodeOptions {
        lease_ttl_ms: TTL_MS,
        ..DIRECT
    };
    let c = Cluster::new(dir.path(), 16, opts);
    let a1 = c.addr.clone();
    let (_n2, a2) = c.follower(2, opts);
    let (_n3, a3) = c.follower(3, opts);
    ctl(
        &a1,
        Request::Create {
            name: FILE.into(),
            size: BLOCKS * 4096,
            preallocated: true,
        },
    )
    .unwrap();

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "a_frozen_writer_is_killed_before_its_lease_is_given_away",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &a2)
        .env("TERN_TEST_STOP_AT", "disk-pwrite")
        .env("TERN_TEST_STOP_SKIP", STOP_SKIP.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.stdout.take().unwrap();
    let acks = std::thread::spawn(move || {
        BufReader::new(out)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| l.strip_prefix("ACK ").and_then(|k| k.parse::<u64>().ok()))
            .last()
    });

    // The writer runs for about 3 TTLs, renewing through node 2, then freezes itself.
    let started = Instant::now();
    while proc_state(pid) != Some('T') {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the writer never reached its stop point (state {:?}); a live writer was killed?",
            proc_state(pid)
        );
        assert!(proc_state(pid).is_some(), "the writer died before it froze");
        std::thread::sleep(Duration::from_millis(10));
    }
    let frozen = Instant::now();
    assert!(
        frozen - started > Duration::from_millis(2 * TTL_MS),
        "the writer froze too early to show a live writer is left alone"
    );

    // Its death, timed by a thread that waits for it.
    let (tx, death) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let status = child.wait().unwrap();
        let _ = tx.send((Instant::now(), status));
    });

    // Node 3 asks for the lease until it gets it; each attempt's send time is kept.
    let (granted_sent, epoch) = loop {
        let sent = Instant::now();
        match ctl(
            &a3,
            Request::Lease {
                name: FILE.into(),
                action: LeaseAction::Acquire,
            },
        ) {
            Ok(r) => break (sent, r.into_lease().unwrap().epoch),
            Err(e) => assert!(
                frozen.elapsed() < Duration::from_secs(15),
                "node 3 never got the lease: {e}"
            ),
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let Ok((died, status)) = death.recv_timeout(Duration::from_secs(3)) else {
        // Show what the fence is for: the continued writer's queued write lands now.
        let _ = Command::new("kill")
            .args(["-CONT", &pid.to_string()])
            .status();
        std::thread::sleep(Duration::from_millis(500));
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
        panic!("the frozen writer was not killed, and node 3 got the lease (epoch {epoch})");
    };
    assert_eq!(
        status.signal(),
        Some(9),
        "the frozen writer must be SIGKILLed by the watchdog: {status:?}"
    );
    let w = WatchdogTimings::for_ttl(TTL_MS);
    eprintln!(
        "frozen -> killed: {} ms; frozen -> lease granted to node 3 (request sent): {} ms; \
         TTL {TTL_MS} ms, grace {} ms, margin {} ms",
        (died - frozen).as_millis(),
        (granted_sent - frozen).as_millis(),
        w.grace_ms,
        w.margin_ms
    );
    assert!(
        died < granted_sent,
        "the lease was given away ({} ms after the freeze) before the frozen writer died ({} ms)",
        (granted_sent - frozen).as_millis(),
        (died - frozen).as_millis()
    );
    let last_ack = acks
        .join()
        .unwrap()
        .expect("the writer acknowledged writes");
    assert!(last_ack + 1 >= STOP_SKIP, "acknowledged up to {last_ack}");

    // The new holder writes every block.
    let w3 = SharedClient::connect_timeout(&a3, FILE, TIMEOUT).unwrap();
    for k in 0..BLOCKS {
        w3.write(k * 4096, &block(0xbb, k), true).unwrap();
    }
    w3.flush().unwrap();
    // Whatever is left of the old writer is continued: nothing (it is dead).
    let _ = Command::new("kill")
        .args(["-CONT", &pid.to_string()])
        .stderr(Stdio::null())
        .status();
    std::thread::sleep(Duration::from_millis(2 * TTL_MS));
    let r = SharedClient::connect_timeout(&a1, FILE, TIMEOUT).unwrap();
    for k in 0..BLOCKS {
        let mut b = vec![0u8; 4096];
        r.read(k * 4096, &mut b).unwrap();
        assert!(
            b == block(0xbb, k),
            "block {k} is not node 3's (epoch {epoch}): a fenced write landed: {:02x?}",
            &b[..9]
        );
    }
}
