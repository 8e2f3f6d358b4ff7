//! A file's direct I/O runs in parallel (each request issues its `pread`/`pwrite` without the
//! file's lock), and still:
//!
//! * giving the lease away waits for every direct write in flight: once `release` has returned,
//!   nothing of the old holder lands, however many of its writes were in flight (the next
//!   holder's writes are never overwritten by them);
//! * many clients writing (unaligned, read-modify-write) and reading the same blocks at once
//!   leave every block whole: one write's bytes, never a mix, the same on every connection.
//!
//! Nodes are served in-process (no etcd: node 1 is made coordinator directly, node 2 is told who
//! it is), driven by pipelining clients.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{Cluster, DIRECT, MIB, TIMEOUT, ctl, lease};
use tern_nbd::{ClientError, Errno, SharedClient};
use tern_volume::control::{LeaseAction, Request};
const BLOCK: usize = 4096;
const BLOCKS: u64 = 64;
const WRITERS: u64 = 8;

fn two_nodes(dir: &Path) -> (String, String) {
    let c = Cluster::new(dir, 32, DIRECT);
    let (_n2, a2) = c.follower(2, DIRECT);
    (c.addr, a2)
}

/// Block `i` filled with `tag` (its first 8 bytes: `tag` and `i`, the rest `tag`'s low byte).
fn block(tag: u64, i: u64) -> Vec<u8> {
    let mut b = vec![tag as u8; BLOCK];
    b[..8].copy_from_slice(&(tag << 16 | i).to_le_bytes());
    b
}

#[test]
fn no_direct_write_of_the_old_holder_lands_after_release_returned() {
    let dir = tempfile::tempdir().unwrap();
    let (a1, a2) = two_nodes(dir.path());
    for (name, preallocated) in [("pre", true), ("thin", false)] {
        ctl(
            &a1,
            Request::Create {
                name: name.into(),
                size: 4 * MIB,
                preallocated,
            },
        );
        lease(&a1, name, LeaseAction::Acquire);
        let old = SharedClient::connect_timeout(&a1, name, TIMEOUT).unwrap();
        let written = AtomicU64::new(0);
        let released = AtomicBool::new(false);
        std::thread::scope(|s| {
            // Node 1's writers keep a burst of direct writes in flight until they are refused.
            for t in 0..WRITERS {
                let (old, written) = (&old, &written);
                s.spawn(move || {
                    for round in 0.. {
                        let i = (round * WRITERS + t) % BLOCKS;
                        match old.write(i * BLOCK as u64, &block(1, i), false) {
                            Ok(()) => written.fetch_add(1, Ordering::SeqCst),
                            Err(ClientError::Remote(Errno::Perm)) => return,
                            Err(e) => panic!("writer {t}: {e}"),
                        };
                    }
                });
            }
            let start = std::time::Instant::now();
            while written.load(Ordering::SeqCst) < 4 * WRITERS {
                assert!(
                    start.elapsed() < Duration::from_secs(20),
                    "node 1's writers got no write through in 20 s"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            lease(&a1, name, LeaseAction::Release);
            released.store(true, Ordering::SeqCst);
            // Node 2 takes the lease and writes every block while node 1's writers are still
            // sending (and being refused).
            lease(&a2, name, LeaseAction::Acquire);
            let new = SharedClient::connect_timeout(&a2, name, TIMEOUT).unwrap();
            for i in 0..BLOCKS {
                new.write(i * BLOCK as u64, &block(2, i), false).unwrap();
            }
            new.flush().unwrap();
        });
        assert!(released.load(Ordering::SeqCst));
        // Every writer has seen EPERM; nothing of node 1 is over node 2's blocks.
        let reader = SharedClient::connect_timeout(&a2, name, TIMEOUT).unwrap();
        for i in 0..BLOCKS {
            let mut back = vec![0u8; BLOCK];
            reader.read(i * BLOCK as u64, &mut back).unwrap();
            assert!(
                back == block(2, i),
                "{name}: block {i} holds {:#x}…, not node 2's write: a write of the old holder \
                 landed after its release returned",
                u64::from_le_bytes(back[..8].try_into().unwrap())
            );
        }
        lease(&a2, name, LeaseAction::Release);
    }
}

#[test]
fn concurrent_writes_and_reads_of_the_same_blocks_leave_each_block_whole() {
    let dir = tempfile::tempdir().unwrap();
    let (a1, _a2) = two_nodes(dir.path());
    ctl(
        &a1,
        Request::Create {
            name: "f".into(),
            size: 4 * MIB,
            preallocated: false,
        },
    );
    lease(&a1, "f", LeaseAction::Acquire);
    let clients: Vec<SharedClient> = (0..2)
        .map(|_| SharedClient::connect_timeout(&a1, "f", TIMEOUT).unwrap())
        .collect();
    std::thread::scope(|s| {
        for t in 0..WRITERS {
            let c = &clients[t as usize % 2];
            s.spawn(move || {
                // Writers share blocks: overlapping writes in flight together.
                for round in 0..40u64 {
                    let i = (round * 7 + t) % 16;
                    let tag = 100 + t * 1000 + round;
                    c.write(i * BLOCK as u64 + 512, &block(tag, i), false)
                        .unwrap_or_else(|e| panic!("writer {t}: {e}"));
                    // Reads in flight beside the writes (their bytes are not checked: NBD
                    // orders no overlapping requests in flight together).
                    let mut back = vec![0u8; BLOCK];
                    c.read(((i + 3) % 16) * BLOCK as u64 + 512, &mut back)
                        .unwrap();
                }
            });
        }
    });
    clients[0].flush().unwrap();
    // After the flush, both connections see the same whole blocks.
    for i in 0..16u64 {
        let mut a = vec![0u8; BLOCK];
        let mut b = vec![0u8; BLOCK];
        clients[0].read(i * BLOCK as u64 + 512, &mut a).unwrap();
        clients[1].read(i * BLOCK as u64 + 512, &mut b).unwrap();
        let tag = u64::from_le_bytes(a[..8].try_into().unwrap()) >> 16;
        assert!(a == block(tag, i) && a == b, "block {i} differs or is torn");
    }
}
