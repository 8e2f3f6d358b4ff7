//! `fence_node`: the cluster controller takes a lost host's disk write leases away through any
//! node. Nodes served in-process (no etcd: node 1 is made coordinator directly, the others are
//! told who it is).
//!
//! * Asked at a non-coordinator node, the request reaches the coordinator; every lease the fenced
//!   node held is free at a higher epoch, the others are untouched.
//! * A write stamped with the fenced node's old epoch is refused (`EPERM`) and changes nothing.
//! * The bumped epochs are on the LUN before the reply: a coordinator that opens it afresh sees them.

mod common;

use common::{Cluster, MIB, NO_DIRECT, NodeOptions, TIMEOUT, create, ctl, lease, node};
use tern_nbd::{ClientError, Errno, SharedClient};
use tern_volume::control::{LeaseAction, Request};

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
    create(addr, name, 4 * MIB, true);
    lease(addr, name, LeaseAction::Acquire)
}

#[test]
fn fencing_a_node_takes_its_leases_persists_the_epochs_and_refuses_its_late_writes() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::new(dir.path(), 32, NO_DIRECT);
    let a1 = c.addr.clone();
    let (_n2, a2) = c.follower(2, NO_DIRECT);
    let (_n3, a3) = c.follower(3, NO_DIRECT);

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
    let (_n4, fresh) = node(
        &c.lun,
        4,
        None,
        NodeOptions {
            generation: 2,
            ..NO_DIRECT
        },
    );
    assert_eq!(stat(&fresh, "a.raw"), (e_a + 1, None));
    assert_eq!(stat(&fresh, "b.raw"), (e_b + 1, None));
}
