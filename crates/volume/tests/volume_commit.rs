//! A preallocation is zeroed outside the coordinator's lock (in-process coordinator): while a
//! large preallocated file's extents are being zeroed, other requests (stat, lease renewals,
//! thin allocations of another file) are answered, the thin file never gets one of the extents
//! being zeroed (its data survives the zeroing), and the new file reads as zeroes although its
//! extents held old data.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tern_nbd::SharedClient;
use tern_volume::control::{self, LeaseAction, Request, Response};
use tern_volume::format::{EXTENT_SIZE, MIN_LUN_SIZE, Superblock};
use tern_volume::lun::{FileLun, Lun};
use tern_volume::node::{Node, NodeConfig, NodeExports};
use tern_volume::store::{self, FormatOptions};

const MIB: u64 = 1 << 20;
const EXTENTS: u64 = 160;
const TIMEOUT: Duration = Duration::from_secs(30);

fn format_lun(dir: &Path) -> (PathBuf, Superblock) {
    let lun = dir.join("lun");
    std::fs::File::create(&lun)
        .unwrap()
        .set_len(MIN_LUN_SIZE + EXTENTS * EXTENT_SIZE)
        .unwrap();
    let l = FileLun::open(&lun).unwrap();
    let sb = store::format(
        &l,
        FormatOptions {
            force: false,
            uuid: [5; 16],
        },
    )
    .unwrap();
    // Old data everywhere in the data area (as a deleted file's would be).
    let junk = vec![0xeeu8; EXTENT_SIZE as usize];
    for e in 0..sb.extent_count {
        l.write_at(&junk, sb.extent_offset(e)).unwrap();
    }
    l.flush().unwrap();
    (lun, sb)
}

fn ctl(addr: &str, req: Request) -> Response {
    control::request(addr, &req, false, TIMEOUT).unwrap_or_else(|e| panic!("{req:?}: {e}"))
}

#[test]
fn a_preallocation_is_zeroed_outside_the_lock_and_its_extents_are_reserved() {
    let dir = tempfile::tempdir().unwrap();
    let (lun, sb) = format_lun(dir.path());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let node = Node::new(
        NodeConfig {
            node_id: 1,
            listen: addr.clone(),
            no_direct: false,
            lease_ttl_ms: 60_000,
            lun: lun.clone(),
            fault_file: None,
        },
        &lun,
    )
    .unwrap();
    node.become_coordinator(1, u64::MAX).unwrap();
    let exports = Arc::new(NodeExports(node));
    std::thread::spawn(move || tern_nbd::run_listener(listener, exports));

    // A thin file with a writer, before the big preallocation starts.
    ctl(
        &addr,
        Request::Create {
            name: "thin.raw".into(),
            size: 16 * MIB,
            preallocated: false,
        },
    );
    ctl(
        &addr,
        Request::Lease {
            name: "thin.raw".into(),
            action: LeaseAction::Acquire,
        },
    );
    let thin = SharedClient::connect_timeout(&addr, "thin.raw", TIMEOUT).unwrap();

    let big_extents = sb.extent_count as u64 - 12;
    let done = Arc::new(AtomicBool::new(false));
    let big = {
        let (addr, done) = (addr.clone(), done.clone());
        std::thread::spawn(move || {
            let t = Instant::now();
            ctl(
                &addr,
                Request::Create {
                    name: "big.raw".into(),
                    size: big_extents * EXTENT_SIZE,
                    preallocated: true,
                },
            );
            done.store(true, Ordering::SeqCst);
            t.elapsed()
        })
    };
    // While it zeroes: stats answered, and thin allocations (one extent each) made.
    let mut answered_during = 0;
    let mut thin_writes = 0u64;
    while !done.load(Ordering::SeqCst) {
        ctl(
            &addr,
            Request::Stat {
                name: "thin.raw".into(),
                map: false,
            },
        );
        if thin_writes < 8 {
            let block = vec![0x40 + thin_writes as u8; 4096];
            thin.write(thin_writes * MIB, &block, true).unwrap();
            thin_writes += 1;
        }
        if !done.load(Ordering::SeqCst) {
            answered_during += 1;
        }
    }
    let took = big.join().unwrap();
    eprintln!(
        "preallocating {big_extents} MiB took {} ms; {answered_during} requests answered meanwhile, \
         {thin_writes} thin allocations",
        took.as_millis()
    );
    assert!(
        answered_during >= 2,
        "requests waited for the whole zeroing ({} ms): it ran under the lock",
        took.as_millis()
    );
    assert!(thin_writes >= 1);

    // The thin file's data survived; the big file reads as zeroes everywhere.
    for k in 0..thin_writes {
        let mut b = vec![0u8; 4096];
        thin.read(k * MIB, &mut b).unwrap();
        assert!(
            b.iter().all(|&x| x == 0x40 + k as u8),
            "the thin file's block {k} was zeroed by the preallocation"
        );
    }
    let r = SharedClient::connect_timeout(&addr, "big.raw", TIMEOUT).unwrap();
    let mut b = vec![0u8; MIB as usize];
    for e in 0..big_extents {
        r.read(e * EXTENT_SIZE, &mut b).unwrap();
        assert!(
            b.iter().all(|&x| x == 0),
            "extent {e} of the new file holds old data"
        );
    }
}
