//! The redirected path's relay: a node with no direct path forwards each client connection's
//! reads and writes to the coordinator with many in flight (`node/relay.rs`). Nodes are served
//! in-process (no etcd: node 1 is made coordinator directly, node 2 is told who it is).
//!
//! * Real NBD clients at queue depth 32 (`nbdcopy` with 32 requests on one connection,
//!   `qemu-img bench -d 32`) through the `--no-direct` node read back exactly what they wrote,
//!   through the node and through the coordinator.
//! * A write the coordinator refuses (`ENOSPC`: it needs an extent and the volume has none)
//!   fails alone: every other request in flight with it succeeds and lands, the connection
//!   stays usable, and nothing was allocated for it.
//! * The coordinator changes under a burst of writes in flight: the old one answers them
//!   `ESHUTDOWN`, each is executed again through the file on the new coordinator, and every
//!   acknowledged write is there.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{Cluster, DIRECT, MIB, NO_DIRECT, TIMEOUT, create, ctl, lease};
use tern_nbd::{ClientError, Errno, SharedClient};
use tern_volume::control::{LeaseAction, Request};
use tern_volume::format::EXTENT_SIZE;
use tern_volume::node::{LeaderInfo, Node, PathState};

/// A coordinator (node 1) and a `--no-direct` node 2 on a LUN of `extents` extents.
fn two_nodes(dir: &Path, extents: u64) -> (String, Arc<Node>, String, Arc<Node>) {
    let c = Cluster::new(dir, extents, DIRECT);
    let (n2, a2) = c.follower(2, NO_DIRECT);
    (c.addr, c.coordinator, a2, n2)
}

fn acquire(addr: &str, name: &str) {
    lease(addr, name, LeaseAction::Acquire);
}

fn allocated(addr: &str, name: &str) -> u64 {
    ctl(
        addr,
        Request::Stat {
            name: name.into(),
            map: false,
        },
    )
    .into_file()
    .unwrap()
    .allocated_extents
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} is needed for this test (qemu-utils, libnbd-bin): {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `len` bytes no two 4 KiB blocks of which are alike.
fn noise(len: usize) -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[test]
fn real_clients_at_depth_32_through_a_no_direct_node_read_back_what_they_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let (a1, _n1, a2, n2) = two_nodes(dir.path(), 64);
    create(&a1, "f", 16 * MIB, false);
    acquire(&a2, "f");
    let url = format!("nbd://{a2}/f");

    // nbdcopy: 32 requests of 16 KiB in flight on one connection, each way.
    let src = dir.path().join("src.img");
    let data = noise(16 * MIB as usize);
    std::fs::write(&src, &data).unwrap();
    let src = src.to_str().unwrap();
    let nbdcopy = |from: &str, to: &str| {
        run(
            "nbdcopy",
            &["-C", "1", "-R", "32", "--request-size=16384", from, to],
        )
    };
    nbdcopy(src, &url);
    assert_eq!(
        n2.path_state(),
        PathState::Redirected,
        "node 2 has no direct path: everything went through the coordinator"
    );
    let out = dir.path().join("out.img");
    std::fs::File::create(&out).unwrap();
    nbdcopy(&url, out.to_str().unwrap());
    assert!(
        std::fs::read(&out).unwrap() == data,
        "what nbdcopy read back through node 2 differs from what it wrote"
    );
    // The coordinator reads the LUN itself: the data is there, not only in node 2.
    let c1 = SharedClient::connect_timeout(&a1, "f", TIMEOUT).unwrap();
    let mut back = vec![0u8; 4 * MIB as usize];
    for part in 0..4u64 {
        c1.read(part * 4 * MIB, &mut back).unwrap();
        let at = (part * 4 * MIB) as usize;
        assert!(
            back == data[at..at + back.len()],
            "the coordinator reads other bytes in MiB {}..{}",
            part * 4,
            part * 4 + 4
        );
    }

    // qemu-img bench: 4 KiB writes of a pattern, 32 in flight, then reads at the same depth;
    // qemu-io checks the pattern.
    run(
        "qemu-img",
        &[
            "bench",
            "-f",
            "raw",
            "-w",
            "-s",
            "4096",
            "-c",
            "2048",
            "-d",
            "32",
            "--pattern=171",
            &url,
        ],
    );
    run(
        "qemu-img",
        &[
            "bench", "-f", "raw", "-s", "4096", "-c", "4096", "-d", "32", &url,
        ],
    );
    let check = run("qemu-io", &["-f", "raw", "-c", "read -P 171 0 8M", &url]);
    assert!(
        check.contains("read 8388608/8388608 bytes"),
        "qemu-io found other bytes than qemu-img bench wrote: {check}"
    );
    let check = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -v 8388608 16",
            &format!("nbd://{a1}/f"),
        ],
    );
    let expect = format!(
        "{:02x} {:02x}",
        data[8 * MIB as usize],
        data[8 * MIB as usize + 1]
    );
    assert!(
        check.contains(&expect),
        "the bytes after the pattern are nbdcopy's ({expect}): {check}"
    );
}

#[test]
fn a_write_the_coordinator_refuses_fails_alone_among_requests_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let (a1, _n1, a2, _n2) = two_nodes(dir.path(), 8);
    create(&a1, "t", 4 * MIB, false);
    acquire(&a2, "t");
    let c = SharedClient::connect_timeout(&a2, "t", TIMEOUT).unwrap();
    c.write(0, &[1u8; 4096], false).unwrap();
    assert_eq!(allocated(&a1, "t"), 1);
    // Fill the rest of the volume: the next extent "t" needs cannot be had.
    let free = ctl(&a1, Request::List).into_files().unwrap().free_extents;
    create(&a1, "fill", free * EXTENT_SIZE, true);
    assert_eq!(
        ctl(&a1, Request::List).into_files().unwrap().free_extents,
        0
    );

    const THREADS: u64 = 32;
    const ROUNDS: u64 = 20;
    // Thread 0 writes into the unmapped second extent; the others into the first one.
    let block = |t: u64, round: u64| -> Vec<u8> {
        (0..4096u64)
            .map(|k| (t * 37 + round * 11 + k % 253) as u8)
            .collect()
    };
    let offset = |t: u64| {
        if t == 0 {
            EXTENT_SIZE + 8192
        } else {
            t * 8192 + 512
        }
    };
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let c = &c;
            s.spawn(move || {
                for round in 0..ROUNDS {
                    let res = c.write(offset(t), &block(t, round), false);
                    if t == 0 {
                        assert!(
                            matches!(res, Err(ClientError::Remote(Errno::NoSpc))),
                            "round {round}: the write needing an extent got {res:?}"
                        );
                    } else {
                        res.unwrap_or_else(|e| {
                            panic!("round {round}: writer {t} failed beside the refused one: {e}")
                        });
                        let mut back = vec![0u8; 4096];
                        c.read(offset(t), &mut back).unwrap();
                        assert!(
                            back == block(t, round),
                            "writer {t} round {round} read back"
                        );
                    }
                }
            });
        }
    });
    c.flush().unwrap();
    assert!(c.is_alive(), "the refusals did not break the connection");
    assert_eq!(
        allocated(&a1, "t"),
        1,
        "nothing was allocated for the refused write"
    );
    let c1 = SharedClient::connect_timeout(&a1, "t", TIMEOUT).unwrap();
    for t in 1..THREADS {
        let mut back = vec![0u8; 4096];
        c1.read(offset(t), &mut back).unwrap();
        assert!(
            back == block(t, ROUNDS - 1),
            "writer {t} via the coordinator"
        );
    }
    let mut hole = vec![1u8; 4096];
    c1.read(offset(0), &mut hole).unwrap();
    assert!(hole.iter().all(|&b| b == 0), "the refused write left bytes");
}

#[test]
fn writes_in_flight_when_the_coordinator_changes_are_retried_on_the_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::new(dir.path(), 64, DIRECT);
    let (n1, a1) = (Arc::clone(&c.coordinator), c.addr.clone());
    let (n2, a2) = c.follower(2, NO_DIRECT);
    let (n3, a3) = c.follower(3, DIRECT);
    create(&a1, "f", 8 * MIB, true);
    acquire(&a2, "f");
    let c = SharedClient::connect_timeout(&a2, "f", TIMEOUT).unwrap();

    const THREADS: u64 = 16;
    const BLOCKS: u64 = 64;
    let block = |t: u64, i: u64| -> Vec<u8> {
        (0..4096u64)
            .map(|k| (t * 29 + i * 5 + k % 241) as u8)
            .collect()
    };
    let offset = |t: u64, i: u64| (i * THREADS + t) * 4096 * 2;
    let written = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (c, written) = (&c, &written);
            s.spawn(move || {
                for i in 0..BLOCKS {
                    c.write(offset(t, i), &block(t, i), false)
                        .unwrap_or_else(|e| {
                            panic!("writer {t} block {i} failed across the take-over: {e}")
                        });
                    written.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            });
        }
        // A quarter in: node 1 steps down, node 3 takes office (generation 2), and the others
        // learn it a moment later, as they would from etcd.
        while written.load(std::sync::atomic::Ordering::SeqCst) < THREADS * BLOCKS / 4 {
            std::thread::yield_now();
        }
        n1.set_coordinator_deadline(0);
        n3.become_coordinator(2, u64::MAX).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let second = LeaderInfo {
            node_id: 3,
            addr: a3.clone(),
            generation: 2,
        };
        n2.set_leader(Some(second.clone()));
        n1.set_leader(Some(second));
    });
    assert!(
        written.load(std::sync::atomic::Ordering::SeqCst) == THREADS * BLOCKS,
        "every write was acknowledged"
    );
    c.flush().unwrap();
    let c3 = SharedClient::connect_timeout(&a3, "f", TIMEOUT).unwrap();
    for t in 0..THREADS {
        for i in 0..BLOCKS {
            let mut back = vec![0u8; 4096];
            c3.read(offset(t, i), &mut back).unwrap();
            assert!(
                back == block(t, i),
                "writer {t} block {i} via the new coordinator"
            );
        }
    }
}
