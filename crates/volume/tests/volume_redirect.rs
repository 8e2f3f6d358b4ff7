//! The redirected path with many requests in flight: nodes served in-process (no etcd: node 1
//! is made coordinator directly, the others are told who it is), driven by a pipelining client.
//!
//! * Concurrent writes through a `--no-direct` node (two hops, both pipelined) to a preallocated
//!   and a thin file land where they should; each writer's read-back and a read through the
//!   coordinator see them after the flush.
//! * Fencing holds for every request in flight: once the lease moved on, all of a burst of
//!   writes under the old epoch get `EPERM` and change nothing.
//! * A node whose LUN path flaps while writers keep requests in flight loses no acknowledged
//!   write (journal replay, redirected writes, the switch back to direct after they landed).

mod common;

use std::time::Duration;

use common::{Cluster, DIRECT, MIB, NO_DIRECT, TIMEOUT, create, lease};
use tern_nbd::{ClientError, Errno, SharedClient};
use tern_volume::control::LeaseAction;
use tern_volume::node::PathState;

/// The block `i` as writer `t` writes it in round `round`.
fn pattern(t: u64, i: u64, round: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|k| (t * 31 + i * 7 + round * 13 + k as u64 % 251) as u8)
        .collect()
}

const WRITERS: u64 = 8;
const BLOCKS: u64 = 24;
const BLOCK: usize = 4096;

fn block_offset(t: u64, i: u64) -> u64 {
    // Writers interleave inside every extent, so concurrent requests hit the same extents.
    (i * WRITERS + t) * 3 * BLOCK as u64 + 512
}

/// `WRITERS` threads on one pipelining connection, each writing its own blocks `rounds` times
/// and reading each back; the connection is flushed at the end.
fn write_concurrently(c: &SharedClient, rounds: u64) {
    std::thread::scope(|s| {
        for t in 0..WRITERS {
            s.spawn(move || {
                for round in 0..rounds {
                    for i in 0..BLOCKS {
                        let data = pattern(t, i, round, BLOCK);
                        c.write(block_offset(t, i), &data, false)
                            .unwrap_or_else(|e| panic!("writer {t} block {i}: {e}"));
                        let mut back = vec![0u8; BLOCK];
                        c.read(block_offset(t, i), &mut back).unwrap();
                        assert!(back == data, "writer {t} block {i} round {round} read back");
                    }
                }
            });
        }
    });
    c.flush().unwrap();
}

fn check_final(c: &SharedClient, round: u64, what: &str) {
    for t in 0..WRITERS {
        for i in 0..BLOCKS {
            let mut back = vec![0u8; BLOCK];
            c.read(block_offset(t, i), &mut back).unwrap();
            assert!(
                back == pattern(t, i, round, BLOCK),
                "{what}: writer {t} block {i} lost its last write"
            );
        }
    }
}

#[test]
fn pipelined_writes_through_two_hops_land_and_stale_epochs_are_fenced_for_every_request() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::new(dir.path(), 64, DIRECT);
    let a1 = c.addr.clone();
    let (_n2, a2) = c.follower(2, NO_DIRECT);
    for (name, preallocated) in [("pre", true), ("thin", false)] {
        create(&a1, name, 8 * MIB, preallocated);
        let epoch = lease(&a2, name, LeaseAction::Acquire);
        let c = SharedClient::connect_timeout(&a2, name, TIMEOUT).unwrap();
        write_concurrently(&c, 2);
        check_final(&c, 1, name);
        // The coordinator reads the LUN itself: the data is there, not only in node 2.
        let direct = SharedClient::connect_timeout(&a1, name, TIMEOUT).unwrap();
        check_final(&direct, 1, &format!("{name} via the coordinator"));

        // The lease moves to node 1; a burst under node 2's old epoch is refused request by
        // request, and nothing of it lands.
        lease(&a2, name, LeaseAction::Release);
        let new_epoch = lease(&a1, name, LeaseAction::Acquire);
        assert!(new_epoch > epoch);
        let stale = SharedClient::connect_timeout(&a1, &format!("{name}@2.{epoch}"), TIMEOUT)
            .expect("the stale export opens; its writes are what is refused");
        std::thread::scope(|s| {
            for t in 0..WRITERS {
                let stale = &stale;
                s.spawn(move || {
                    for i in 0..BLOCKS {
                        let e = stale
                            .write(block_offset(t, i), &[0xee; BLOCK], false)
                            .unwrap_err();
                        assert!(matches!(e, ClientError::Remote(Errno::Perm)), "{e}");
                    }
                });
            }
        });
        check_final(&direct, 1, &format!("{name} after the stale burst"));
        lease(&a1, name, LeaseAction::Release);
    }
}

#[test]
fn a_flapping_path_with_requests_in_flight_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::new(dir.path(), 64, DIRECT);
    let a1 = c.addr.clone();
    let (n3, a3) = c.follower(3, DIRECT);
    create(&a1, "f", 8 * MIB, false);
    lease(&a3, "f", LeaseAction::Acquire);
    let c = SharedClient::connect_timeout(&a3, "f", TIMEOUT).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (mut flaps, mut redirected) = (0, 0);
    std::thread::scope(|s| {
        let w = s.spawn(|| {
            write_concurrently(&c, 6);
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        // Lose and regain node 3's LUN path while the writers run; the probe brings it back.
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            n3.set_path_lost(true);
            std::thread::sleep(Duration::from_millis(15));
            if n3.path_state() == PathState::Redirected {
                redirected += 1;
            }
            n3.set_path_lost(false);
            while !n3.probe_path() {}
            std::thread::sleep(Duration::from_millis(15));
            flaps += 1;
        }
        w.join().unwrap();
    });
    assert!(flaps >= 2, "the path flapped only {flaps} times");
    assert!(
        redirected >= 1,
        "the writers never went through the coordinator"
    );
    check_final(&c, 5, "node 3");
    let coordinator = SharedClient::connect_timeout(&a1, "f", TIMEOUT).unwrap();
    check_final(&coordinator, 5, "via the coordinator");
}
