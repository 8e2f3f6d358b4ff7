//! The cluster shared volume end to end: a real etcd on loopback, node processes of the `tern`
//! binary on one LUN file, real NBD clients. Needs `etcd` (Debian's etcd-server) on PATH; fails
//! loudly without it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tern_nbd::{Client, ClientError, Errno};
use tern_test_support::{ChildGuard, Etcd, free_port, wait_for};
use tern_volume::control::{self, ErrorKind, LeaseAction, Request};

const TERN: &str = env!("CARGO_BIN_EXE_tern");
const LEASE_TTL_MS: u64 = 1500;

struct Node {
    id: u32,
    addr: String,
    proc: Option<ChildGuard>,
}

impl Node {
    fn pid(&self) -> u32 {
        self.proc.as_ref().unwrap().0.id()
    }
    fn call(&self, req: Request) -> Result<Value, control::ControlError> {
        control::call(&self.addr, &req, false, Duration::from_secs(30))
    }
    fn lease(&self, name: &str, action: LeaseAction) -> Result<Value, control::ControlError> {
        self.call(Request::Lease {
            name: name.into(),
            action,
        })
    }
    fn status(&self) -> Value {
        self.call(Request::Status).unwrap()
    }
    fn open(&self, name: &str) -> Client {
        Client::connect(&self.addr, name).unwrap()
    }
}

struct Cluster {
    etcd: Etcd,
    dir: tempfile::TempDir,
    lun: PathBuf,
    nodes: Vec<Node>,
}

fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

impl Cluster {
    fn start(n: u32) -> Cluster {
        let etcd = Etcd::start();
        let dir = tempfile::tempdir().unwrap();
        let lun = dir.path().join("lun");
        common::tern_ok([
            "volume",
            "format",
            "--size",
            "256M",
            "--lun",
            lun.to_str().unwrap(),
        ]);
        let mut c = Cluster {
            etcd,
            dir,
            lun,
            nodes: Vec::new(),
        };
        for id in 1..=n {
            c.spawn(id, &[]);
        }
        c.wait_coordinator();
        c
    }

    fn spawn(&mut self, id: u32, extra: &[&str]) {
        let addr = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(self.dir.path().join(format!("node{id}.log"))).unwrap();
        let child = Command::new(TERN)
            .args([
                "volume",
                "serve",
                "--node-id",
                &id.to_string(),
                "--listen",
                &addr,
                "--etcd",
                &self.etcd.url,
            ])
            .args(["--lease-ttl-ms", &LEASE_TTL_MS.to_string()])
            .arg("--lun")
            .arg(&self.lun)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let node = Node {
            id,
            addr,
            proc: Some(ChildGuard(child)),
        };
        wait_for("node to listen", Duration::from_secs(20), || {
            node.call(Request::Status).is_ok()
        });
        self.nodes.retain(|n| n.id != id);
        self.nodes.push(node);
    }

    fn node(&self, id: u32) -> &Node {
        self.nodes.iter().find(|n| n.id == id).unwrap()
    }

    fn wait_coordinator(&self) -> (u32, u64) {
        let mut found = (0, 0);
        wait_for("a coordinator", Duration::from_secs(30), || {
            self.nodes.iter().filter(|n| n.proc.is_some()).all(|n| {
                let s = n.status();
                match s["coordinator"]["node_id"].as_u64() {
                    Some(id) => {
                        found = (id as u32, s["coordinator"]["generation"].as_u64().unwrap());
                        true
                    }
                    None => false,
                }
            })
        });
        found
    }

    fn log(&self, id: u32) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("node{id}.log"))).unwrap_or_default()
    }
}

fn acquire_retrying(node: &Node, name: &str, deadline: Duration) -> u64 {
    let start = Instant::now();
    loop {
        match node.lease(name, LeaseAction::Acquire) {
            Ok(v) => return v["epoch"].as_u64().unwrap(),
            Err(e) if e.kind == ErrorKind::Busy && start.elapsed() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("node {} could not acquire {name}: {e}", node.id),
        }
    }
}

/// sanlock devcount, `lock` mode: three nodes race to increment one shared counter, each
/// increment under the write lease: read, pause, re-read and compare (a concurrent writer would
/// show as a mismatch), write +1 with FUA, release. No increment may be lost.
#[test]
fn devcount_concurrent_increments_lose_nothing() {
    let c = Cluster::start(3);
    c.node(1)
        .call(Request::Create {
            name: "counter".into(),
            size: 1 << 20,
            preallocated: true,
        })
        .unwrap();
    const ROUNDS: u64 = 12;
    let mismatches = Arc::new(AtomicU64::new(0));
    std::thread::scope(|s| {
        for n in &c.nodes {
            let mismatches = Arc::clone(&mismatches);
            s.spawn(move || {
                let mut disk = n.open("counter");
                for _ in 0..ROUNDS {
                    acquire_retrying(n, "counter", Duration::from_secs(60));
                    let mut a = [0u8; 8];
                    disk.read(0, &mut a).unwrap();
                    std::thread::sleep(Duration::from_millis(3));
                    let mut b = [0u8; 8];
                    disk.read(0, &mut b).unwrap();
                    if a != b {
                        mismatches.fetch_add(1, Ordering::SeqCst);
                    }
                    let v = u64::from_le_bytes(b) + 1;
                    disk.write(0, &v.to_le_bytes(), true).unwrap();
                    // Per-node tally in its own sector, to tell who lost what.
                    let mut t = [0u8; 8];
                    disk.read(4096 * u64::from(n.id), &mut t).unwrap();
                    let t = u64::from_le_bytes(t) + 1;
                    disk.write(4096 * u64::from(n.id), &t.to_le_bytes(), true)
                        .unwrap();
                    n.lease("counter", LeaseAction::Release).unwrap();
                }
            });
        }
    });
    let mut disk = c.node(2).open("counter");
    let mut b = [0u8; 8];
    disk.read(0, &mut b).unwrap();
    assert_eq!(
        mismatches.load(Ordering::SeqCst),
        0,
        "a concurrent writer was observed"
    );
    assert_eq!(u64::from_le_bytes(b), 3 * ROUNDS, "increments were lost");
    for id in 1..=3u64 {
        disk.read(4096 * id, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), ROUNDS, "node {id}'s tally");
    }
}

/// A holder frozen past its lease (SIGSTOP), a peer takes the lease, the holder resumes: the
/// write it had queued is refused and the peer's data stands.
#[test]
fn frozen_holder_queued_writes_are_refused_after_resume() {
    let c = Cluster::start(3);
    let (coord, _) = c.wait_coordinator();
    let holder = c.nodes.iter().find(|n| n.id != coord).unwrap();
    let peer = c
        .nodes
        .iter()
        .find(|n| n.id != coord && n.id != holder.id)
        .unwrap();
    holder
        .call(Request::Create {
            name: "f".into(),
            size: 4 << 20,
            preallocated: false,
        })
        .unwrap();
    let e1 = acquire_retrying(holder, "f", Duration::from_secs(5));
    let mut hdisk = holder.open("f");
    hdisk.write(0, &[1u8; 4096], true).unwrap();

    signal(holder.pid(), "STOP");
    // Queue a write to the frozen node: it sits in its socket until SIGCONT.
    let queued = std::thread::spawn(move || {
        let r = hdisk.write(0, &[0xEEu8; 4096], false);
        (r, hdisk)
    });
    std::thread::sleep(Duration::from_millis(LEASE_TTL_MS + 700));
    let e2 = acquire_retrying(peer, "f", Duration::from_secs(10));
    assert!(e2 > e1, "re-grant must bump the epoch ({e1} -> {e2})");
    let mut pdisk = peer.open("f");
    pdisk.write(0, &[2u8; 4096], true).unwrap();

    signal(holder.pid(), "CONT");
    let (r, mut hdisk) = queued.join().unwrap();
    assert!(
        matches!(r, Err(ClientError::Remote(Errno::Perm))),
        "queued write of the fenced holder: {r:?}"
    );
    assert!(matches!(
        hdisk.write(0, &[0xEF; 512], true),
        Err(ClientError::Remote(Errno::Perm))
    ));
    // The refusal is in the holder's log (once, not once per retry).
    let log = std::fs::read_to_string(c.dir.path().join(format!("node{}.log", holder.id))).unwrap();
    let refusals = log
        .lines()
        .filter(|l| l.contains("write of f at offset 0 refused (EPERM)"))
        .count();
    assert_eq!(refusals, 1, "node {} log:\n{log}", holder.id);
    let mut b = vec![0u8; 4096];
    pdisk.read(0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 2), "peer's data must stand");
    // The redirected path refuses the stale epoch too: the coordinator checks every write.
    let (coord, _) = c.wait_coordinator();
    let mut stale =
        Client::connect(&c.node(coord).addr, &format!("f@{}.{}", holder.id, e1)).unwrap();
    assert!(matches!(
        stale.write(0, &[0xEE; 512], true),
        Err(ClientError::Remote(Errno::Perm))
    ));
    let mut current =
        Client::connect(&c.node(coord).addr, &format!("f@{}.{}", peer.id, e2)).unwrap();
    current.write(8192, &[3; 512], true).unwrap();
    // And the old holder cannot renew its way back in.
    let st = peer
        .call(Request::Stat {
            name: "f".into(),
            map: false,
        })
        .unwrap();
    assert_eq!(st["lease"]["holder"], peer.id);
}

/// The coordinator is killed: another node takes over with a higher generation, metadata
/// operations continue, and the persisted lease table keeps fencing (re-grants use higher epochs).
#[test]
fn coordinator_killed_another_takes_over_and_metadata_continues() {
    let mut c = Cluster::start(3);
    let (coord, gen1) = c.wait_coordinator();
    let other = c.nodes.iter().find(|n| n.id != coord).unwrap().id;
    c.node(other)
        .call(Request::Create {
            name: "before".into(),
            size: 8 << 20,
            preallocated: true,
        })
        .unwrap();
    let e1 = acquire_retrying(c.node(other), "before", Duration::from_secs(5));
    c.node(other).lease("before", LeaseAction::Release).unwrap();

    let victim = c.nodes.iter_mut().find(|n| n.id == coord).unwrap();
    let killed_at = Instant::now();
    drop(victim.proc.take());
    c.nodes.retain(|n| n.proc.is_some());

    // The CLI against a surviving node: waits through the take-over.
    let out = Command::new(TERN)
        .args([
            "volume",
            "create",
            "after",
            "--size",
            "16M",
            "--json",
            "--node",
            &c.node(other).addr,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "create after take-over: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let took = killed_at.elapsed();
    eprintln!("metadata operation completed {took:?} after the coordinator was killed");
    let mut seen = (0, 0);
    wait_for(
        "every node to see the new coordinator",
        Duration::from_secs(10),
        || {
            seen = c.wait_coordinator();
            seen.0 != coord
        },
    );
    let (coord2, gen2) = seen;
    assert_ne!(coord2, coord);
    assert!(gen2 > gen1, "generation must grow ({gen1} -> {gen2})");
    let ls = c.node(other).call(Request::List).unwrap();
    let names: Vec<&str> = ls["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["after", "before"]);
    let e2 = acquire_retrying(c.node(other), "before", Duration::from_secs(5));
    assert!(
        e2 > e1,
        "the new coordinator must re-grant above the persisted epoch ({e1} -> {e2})"
    );
    let out = Command::new(TERN)
        .args(["volume", "status", "--json", "--node", &c.node(other).addr])
        .output()
        .unwrap();
    let st: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["coordinator"]["node_id"], coord2);
    assert!(
        took < Duration::from_secs(15),
        "take-over too slow: {took:?}"
    );
}

/// A holder cut off from the coordinator but still running (the Ceph "duplicate lock owners"
/// case): it stops writing on its own once its lease runs out, a peer gets the lease only after
/// that, and when the partition heals the old holder stays fenced. Never two writers.
#[test]
fn partitioned_holder_fences_itself_and_stays_fenced_after_heal() {
    let mut c = Cluster::start(2);
    let part = c.dir.path().join("partition3");
    c.spawn(3, &["--partition-file", part.to_str().unwrap()]);
    let (holder, peer) = (c.node(3), c.node(2));
    holder
        .call(Request::Create {
            name: "p".into(),
            size: 1 << 20,
            preallocated: true,
        })
        .unwrap();
    let e1 = acquire_retrying(holder, "p", Duration::from_secs(5));
    let mut hdisk = holder.open("p");
    hdisk.write(0, &[1; 4096], true).unwrap();
    std::fs::write(&part, b"").unwrap();
    let cut = Instant::now();
    // The peer tries to take the lease from the moment of the cut, while the holder keeps writing
    // until it refuses: the grant must come after the holder's last accepted write.
    let (e2, granted, last_ok) = std::thread::scope(|s| {
        let taker = s.spawn(|| {
            let e = acquire_retrying(peer, "p", Duration::from_secs(15));
            (e, Instant::now())
        });
        let mut last_ok = Instant::now();
        loop {
            match hdisk.write(0, &[1; 4096], true) {
                Ok(()) => last_ok = Instant::now(),
                Err(ClientError::Remote(Errno::Perm)) => break,
                Err(e) => panic!("unexpected error from the partitioned holder: {e}"),
            }
            assert!(
                cut.elapsed() < Duration::from_secs(10),
                "the partitioned holder never stopped writing"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let (e2, granted) = taker.join().unwrap();
        (e2, granted, last_ok)
    });
    assert!(
        last_ok.duration_since(cut) <= Duration::from_millis(LEASE_TTL_MS + 200),
        "wrote too long after the cut"
    );
    assert!(e2 > e1);
    assert!(
        granted > last_ok,
        "the peer got the lease while the old holder could still write"
    );
    let mut pdisk = peer.open("p");
    pdisk.write(0, &[2; 4096], true).unwrap();
    // Heal: the old holder's renewal is refused (stale epoch), its writes stay refused.
    std::fs::remove_file(&part).unwrap();
    std::thread::sleep(Duration::from_millis(LEASE_TTL_MS / 2));
    assert!(matches!(
        hdisk.write(0, &[3; 4096], true),
        Err(ClientError::Remote(Errno::Perm))
    ));
    let mut b = vec![0u8; 4096];
    pdisk.read(0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 2));
    let st = peer
        .call(Request::Stat {
            name: "p".into(),
            map: false,
        })
        .unwrap();
    assert_eq!(st["lease"]["holder"], peer.id);
}

/// A coordinator frozen past its etcd session is replaced; when it resumes it refuses to act as
/// coordinator (its own deadline has passed) and the metadata on disk carries the new generation.
#[test]
fn frozen_coordinator_is_deposed_and_writes_no_metadata_after_resume() {
    let c = Cluster::start(3);
    let (old, gen1) = c.wait_coordinator();
    let old_node = c.node(old);
    signal(old_node.pid(), "STOP");
    let other = c.nodes.iter().find(|n| n.id != old).unwrap();
    let mut seen = (0, 0);
    wait_for("a new coordinator", Duration::from_secs(20), || {
        let s = other.status();
        seen = (
            s["coordinator"]["node_id"].as_u64().unwrap_or(0) as u32,
            s["coordinator"]["generation"].as_u64().unwrap_or(0),
        );
        seen.0 != 0 && seen.0 != old
    });
    other
        .call(Request::Create {
            name: "during".into(),
            size: 1 << 20,
            preallocated: false,
        })
        .unwrap();
    signal(old_node.pid(), "CONT");
    // Straight to the old coordinator, as a peer would forward it: refused, nothing written.
    let err = control::call(
        &old_node.addr,
        &Request::Create {
            name: "stale".into(),
            size: 1 << 20,
            preallocated: false,
        },
        true,
        Duration::from_secs(10),
    )
    .unwrap_err();
    assert_eq!(err.kind, ErrorKind::NotCoordinator, "{err}");
    let lun = tern_volume::lun::FileLun::open(&c.lun).unwrap();
    let v = tern_volume::store::Volume::open(&lun).unwrap();
    assert!(
        v.meta.generation > gen1 && v.meta.generation == seen.1,
        "on-disk generation {} (new {})",
        v.meta.generation,
        seen.1
    );
    assert!(v.meta.files.contains_key("during") && !v.meta.files.contains_key("stale"));
    // Through the old node as a client entry point, the request is forwarded and succeeds.
    old_node
        .call(Request::Create {
            name: "later".into(),
            size: 1 << 20,
            preallocated: false,
        })
        .unwrap();
}

/// Standard NBD tools against a node: `nbdinfo --list` shows the files, `qemu-img convert` writes a
/// file under the node's lease, and another node reads the same bytes.
#[test]
fn standard_nbd_tools_against_a_node() {
    let c = Cluster::start(2);
    let n1 = c.node(1);
    n1.call(Request::Create {
        name: "img".into(),
        size: 4 << 20,
        preallocated: false,
    })
    .unwrap();
    acquire_retrying(n1, "img", Duration::from_secs(5));
    let src = c.dir.path().join("src.raw");
    let data: Vec<u8> = (0..(4u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    std::fs::write(&src, &data).unwrap();
    let uri = format!("nbd://{}/img", n1.addr);
    let out = Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(&uri)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img convert: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("nbdinfo")
        .args(["--list", &format!("nbd://{}", c.node(2).addr)])
        .output()
        .unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("img"));
    let mut back = vec![0u8; data.len()];
    c.node(2).open("img").read(0, &mut back).unwrap();
    assert!(
        back == data,
        "node 2 reads what qemu-img wrote through node 1"
    );
    // Without the lease, writes through another node are refused.
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write 0 4096",
            &format!("nbd://{}/img", c.node(2).addr),
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Operation not permitted"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Hand-over is one compare-and-swap naming the successor: a third node hammering `acquire` the
/// whole time never gets in; an aborted hand-over returns the lease to the source and fences the
/// destination.
#[test]
fn handover_under_concurrent_third_party_and_abort() {
    let c = Cluster::start(3);
    let (src, dst, third) = (c.node(1), c.node(2), c.node(3));
    src.call(Request::Create {
        name: "vm".into(),
        size: 4 << 20,
        preallocated: true,
    })
    .unwrap();
    let e1 = acquire_retrying(src, "vm", Duration::from_secs(5));
    let stop = AtomicBool::new(false);
    let third_wins = AtomicU64::new(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                if third.lease("vm", LeaseAction::Acquire).is_ok() {
                    third_wins.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        let mut sdisk = src.open("vm");
        for round in 0..5u8 {
            sdisk.write(0, &[round; 512], true).unwrap();
            let v = src
                .lease("vm", LeaseAction::Handover { to: dst.id })
                .unwrap();
            assert_eq!(v["holder"], dst.id);
            let e = acquire_retrying(dst, "vm", Duration::from_secs(2));
            assert!(matches!(
                sdisk.write(0, &[0xAA; 512], false),
                Err(ClientError::Remote(Errno::Perm))
            ));
            let mut ddisk = dst.open("vm");
            let mut b = [0u8; 512];
            ddisk.read(0, &mut b).unwrap();
            assert_eq!(b, [round; 512], "destination sees the source's last write");
            ddisk.write(0, &[round + 100; 512], true).unwrap();
            // Give it back by the same CAS.
            dst.lease("vm", LeaseAction::Handover { to: src.id })
                .unwrap();
            let e_back = acquire_retrying(src, "vm", Duration::from_secs(2));
            assert!(e_back > e);
        }
        stop.store(true, Ordering::SeqCst);
    });
    assert_eq!(
        third_wins.load(Ordering::SeqCst),
        0,
        "a third node slipped in during hand-over"
    );

    // Aborted hand-over: the source gets the lease back with a new epoch; the destination is fenced.
    let before = src
        .call(Request::Stat {
            name: "vm".into(),
            map: false,
        })
        .unwrap()["lease"]["epoch"]
        .as_u64()
        .unwrap();
    assert!(before > e1);
    src.lease("vm", LeaseAction::Handover { to: dst.id })
        .unwrap();
    acquire_retrying(dst, "vm", Duration::from_secs(2));
    let mut ddisk = dst.open("vm");
    ddisk.write(512, &[7; 512], false).unwrap();
    let back = src.lease("vm", LeaseAction::AbortHandover).unwrap();
    assert_eq!(back["holder"], src.id);
    assert!(back["epoch"].as_u64().unwrap() > before + 1);
    assert!(matches!(
        ddisk.write(512, &[8; 512], false),
        Err(ClientError::Remote(Errno::Perm))
    ));
    let mut sdisk = src.open("vm");
    sdisk.write(512, &[9; 512], true).unwrap();
    // A stale hand-over by the fenced destination is refused.
    let err = dst
        .lease("vm", LeaseAction::Handover { to: third.id })
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Stale, "{err}");
}

fn block(i: u64) -> Vec<u8> {
    (0..4096u64).map(|j| ((i * 31 + j) % 251) as u8).collect()
}

/// Injected I/O errors on a node's LUN path: its writes go to the coordinator over NBD, nothing
/// is lost, duplicated or reordered, a flush covers writes made before the switch, and the node
/// returns to direct I/O when the path recovers. A `--no-direct` node works through the
/// coordinator from the start.
#[test]
fn redirect_on_injected_errors_and_back() {
    let mut c = Cluster::start(2);
    let fault = c.dir.path().join("fault3");
    c.spawn(3, &["--fault-file", fault.to_str().unwrap()]);
    c.spawn(4, &["--no-direct"]);
    let n3 = c.node(3);
    n3.call(Request::Create {
        name: "d".into(),
        size: 8 << 20,
        preallocated: false,
    })
    .unwrap();
    acquire_retrying(n3, "d", Duration::from_secs(5));
    let mut disk = n3.open("d");
    // Blocks 0..40 go direct to slots 0..40 and are not flushed when the path fails (the node's
    // volatile cache loses them): only the replay through the coordinator can save them. Blocks
    // 40..120 overwrite slots 40..80 across both switches, so order matters there.
    let slot = |k: u64| if k < 40 { k } else { 40 + k % 40 };
    let total = 120u64;
    for k in 0..total {
        if k == 40 {
            std::fs::write(&fault, b"").unwrap();
            wait_for(
                "node 3 to notice its path is down",
                Duration::from_secs(5),
                || n3.status()["path"] == "redirected",
            );
        }
        if k == 80 {
            assert_eq!(
                n3.status()["path"],
                "redirected",
                "node 3 must stay redirected while its path is down"
            );
            std::fs::remove_file(&fault).unwrap();
            wait_for(
                "node 3 back on the direct path",
                Duration::from_secs(5),
                || n3.status()["path"] == "direct",
            );
        }
        disk.write(slot(k) * 4096, &block(k), false).unwrap();
        if k == 60 {
            disk.flush().unwrap();
        }
    }
    disk.flush().unwrap();
    assert_eq!(
        n3.status()["path"],
        "direct",
        "node 3 must come back to direct I/O"
    );
    let check = |client: &mut Client| {
        for s in 0..80u64 {
            let last = if s < 40 { s } else { 80 + (s - 40) };
            let mut b = vec![0u8; 4096];
            client.read(s * 4096, &mut b).unwrap();
            assert!(
                b == block(last),
                "slot {s}: wrong or stale data (expected block {last})"
            );
        }
    };
    check(&mut disk);
    check(&mut c.node(1).open("d"));
    // The LUN itself, read through the format, has the same bytes (the flush made them durable).
    let lun = tern_volume::lun::FileLun::open(&c.lun).unwrap();
    let v = tern_volume::store::Volume::open(&lun).unwrap();
    let map = &v.meta.files["d"].map;
    let mut b = vec![0u8; 4096];
    use tern_volume::lun::Lun;
    lun.read_at(&mut b, v.sb.extent_offset(map[0]) + 39 * 4096)
        .unwrap();
    assert!(
        b == block(39),
        "a write made before the path failed is durable after the flush"
    );
    lun.read_at(&mut b, v.sb.extent_offset(map[0]) + 79 * 4096)
        .unwrap();
    assert!(b == block(119), "the last write to slot 79 is on the LUN");

    // The --no-direct node: everything redirected, still correct.
    let n4 = c.node(4);
    n3.lease("d", LeaseAction::Release).unwrap();
    acquire_retrying(n4, "d", Duration::from_secs(5));
    let mut d4 = n4.open("d");
    d4.write(5 << 20, &block(999), true).unwrap();
    assert_eq!(n4.status()["path"], "redirected");
    let mut b = vec![0u8; 4096];
    c.node(1).open("d").read(5 << 20, &mut b).unwrap();
    assert!(b == block(999));
    let _ = c.log(3);
}

/// Bad input through the CLI: clear one-line errors, non-zero exit, nothing changed.
#[test]
fn cli_reports_clashes_enospc_and_missing_files_clearly() {
    let c = Cluster::start(1);
    let addr = &c.node(1).addr;
    let run = |args: &[&str]| {
        Command::new(TERN)
            .args(args)
            .args(["--node", addr])
            .output()
            .unwrap()
    };
    assert!(
        run(&["volume", "create", "a", "--size", "64M"])
            .status
            .success()
    );
    let clash = run(&["volume", "create", "a", "--size", "1M"]);
    assert!(!clash.status.success());
    assert!(String::from_utf8_lossy(&clash.stderr).contains("already exists"));
    let full = run(&["volume", "create", "b", "--size", "1G", "--preallocate"]);
    assert!(
        String::from_utf8_lossy(&full.stderr).contains("ENOSPC"),
        "{}",
        String::from_utf8_lossy(&full.stderr)
    );
    let missing = run(&["volume", "stat", "nope"]);
    assert!(String::from_utf8_lossy(&missing.stderr).contains("No file named"));
    let bad = run(&["volume", "create", "../etc", "--size", "1M"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("Invalid file name"));
    // A file held for writing cannot be deleted; after release it can be resized and deleted.
    assert!(run(&["volume", "lease", "acquire", "a"]).status.success());
    let busy = run(&["volume", "rm", "a"]);
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("held for writing by node 1"),
        "{}",
        String::from_utf8_lossy(&busy.stderr)
    );
    let shrink = run(&["volume", "resize", "a", "--size", "1M"]);
    assert!(String::from_utf8_lossy(&shrink.stderr).contains("shrinking a file is not supported"));
    assert!(
        run(&["volume", "resize", "a", "--size", "96M"])
            .status
            .success()
    );
    assert!(run(&["volume", "lease", "release", "a"]).status.success());
    let st: Value =
        serde_json::from_slice(&run(&["volume", "stat", "a", "--json"]).stdout).unwrap();
    assert_eq!(st["size"], 96u64 << 20);
    assert!(st["lease"]["holder"].is_null());
    let ls = run(&["volume", "ls", "--json"]);
    let v: Value = serde_json::from_slice(&ls.stdout).unwrap();
    assert_eq!(v["files"].as_array().unwrap().len(), 1);
    let unformatted = c.dir.path().join("blank");
    std::fs::File::create(&unformatted)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let out = Command::new(TERN)
        .args([
            "volume",
            "serve",
            "--node-id",
            "9",
            "--listen",
            "127.0.0.1:0",
            "--etcd",
            &c.etcd.url,
            "--lun",
        ])
        .arg(&unformatted)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not formatted"));
    assert!(Path::new(&c.lun).exists());
}
