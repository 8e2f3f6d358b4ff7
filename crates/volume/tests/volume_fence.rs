//! `fence_node`: the cluster controller takes a lost host's disk write leases away through any
//! node. Nodes served in-process (no etcd: node 1 is made coordinator directly, the others are
//! told who it is).
//!
//! * Asked at a non-coordinator node, the request reaches the coordinator; every lease the fenced
//!   node held is free at a higher epoch, the others are untouched.
//! * A write stamped with the fenced node's old epoch is refused (`EPERM`) and changes nothing.
//! * The bumped epochs are on the LUN before the reply: a coordinator that opens it afresh sees them.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tern_nbd::{ClientError, Errno, SharedClient};
use tern_volume::control::{self, LeaseAction, Request, Response};
use tern_volume::format::{EXTENT_SIZE, MIN_LUN_SIZE};
use tern_volume::lun::FileLun;
use tern_volume::node::{LeaderInfo, Node, NodeConfig, NodeExports};
use tern_volume::store::{self, FormatOptions};

const MIB: u64 = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(10);

fn format_lun(dir: &Path) -> PathBuf {
    let lun = dir.join("lun");
    std::fs::File::create(&lun)
        .unwrap()
        .set_len(MIN_LUN_SIZE + 31 * EXTENT_SIZE)
        .unwrap();
    store::format(
        &FileLun::open(&lun).unwrap(),
        FormatOptions {
            force: false,
            uuid: [9; 16],
        },
    )
    .unwrap();
    lun
}

/// Node `id` on the LUN: the coordinator (with `generation`) when `leader` is `None`.
fn node(lun: &Path, id: u32, leader: Option<&LeaderInfo>, generation: u64) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let n = Node::new(
        NodeConfig {
            node_id: id,
            listen: addr.clone(),
            no_direct: true,
            lease_ttl_ms: 600_000,
            lun: lun.to_owned(),
            fault_file: None,
        },
        lun,
    )
    .unwrap();
    match leader {
        None => n.become_coordinator(generation, u64::MAX).unwrap(),
        Some(l) => n.set_leader(Some(l.clone())),
    }
    let exports = Arc::new(NodeExports(n));
    std::thread::spawn(move || tern_nbd::run_listener(listener, exports));
    addr
}

fn ctl(addr: &str, req: Request) -> Response {
    control::request(addr, &req, false, TIMEOUT).unwrap_or_else(|e| panic!("{req:?}: {e}"))
}

fn stat(addr: &str, name: &str) -> (u64, Option<u32>) {
    let f = ctl(
        addr,
        Request::Stat {
            name: name.into(),
            map: false,
        },
    )
    .into_file()
    .unwrap();
    (f.lease.epoch, f.lease.holder)
}

fn acquire(addr: &str, name: &str) -> u64 {
    ctl(
        addr,
        Request::Create {
            name: name.into(),
            size: 4 * MIB,
            preallocated: true,
        },
    );
    ctl(
        addr,
        Request::Lease {
            name: name.into(),
            action: LeaseAction::Acquire,
        },
    )
    .into_lease()
    .unwrap()
    .epoch
}

#[test]
fn fencing_a_node_takes_its_leases_persists_the_epochs_and_refuses_its_late_writes() {
    let dir = tempfile::tempdir().unwrap();
    let lun = format_lun(dir.path());
    let a1 = node(&lun, 1, None, 1);
    let leader = LeaderInfo {
        node_id: 1,
        addr: a1.clone(),
        generation: 1,
    };
    let a2 = node(&lun, 2, Some(&leader), 0);
    let a3 = node(&lun, 3, Some(&leader), 0);

    let e_a = acquire(&a2, "a.raw");
    let e_b = acquire(&a2, "b.raw");
    let e_c = acquire(&a3, "c.raw");
    let writer = SharedClient::connect_timeout(&a2, "a.raw", TIMEOUT).unwrap();
    writer.write(0, &[0x11; 4096], true).unwrap();

    // Asked at node 3 (not the coordinator): forwarded.
    let fenced = ctl(&a3, Request::FenceNode { node: 2 })
        .into_fenced()
        .unwrap();
    assert_eq!(fenced.node, 2);
    assert_eq!(fenced.files, vec!["a.raw".to_string(), "b.raw".to_string()]);
    assert_eq!(stat(&a1, "a.raw"), (e_a + 1, None));
    assert_eq!(stat(&a1, "b.raw"), (e_b + 1, None));
    assert_eq!(stat(&a1, "c.raw"), (e_c, Some(3)), "another node's lease");

    // A late write with node 2's old epoch is refused, and nothing of it lands.
    let stale = SharedClient::connect_timeout(&a1, &format!("a.raw@2.{e_a}"), TIMEOUT)
        .expect("the stale export opens; its writes are what is refused");
    let e = stale.write(0, &[0xee; 4096], true).unwrap_err();
    assert!(matches!(e, ClientError::Remote(Errno::Perm)), "{e}");
    let reader = SharedClient::connect_timeout(&a1, "a.raw", TIMEOUT).unwrap();
    let mut buf = vec![0u8; 4096];
    reader.read(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0x11), "the refused write landed");

    // Fencing again finds nothing; the leases can be taken by another node above the old epoch.
    let again = ctl(&a1, Request::FenceNode { node: 2 })
        .into_fenced()
        .unwrap();
    assert!(again.files.is_empty());

    // The bumped epochs were committed to the LUN: a coordinator opening it afresh sees them.
    let fresh = node(&lun, 4, None, 2);
    assert_eq!(stat(&fresh, "a.raw"), (e_a + 1, None));
    assert_eq!(stat(&fresh, "b.raw"), (e_b + 1, None));
}
