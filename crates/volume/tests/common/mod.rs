//! The volume tests' in-process cluster: a LUN file formatted in a test's directory, served by
//! nodes in this process (no etcd: the coordinator is made so directly and the others are told who
//! it is), and the control requests the tests send.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tern_volume::control::{self, LeaseAction, Request, Response};
use tern_volume::format::{EXTENT_SIZE, MIN_LUN_SIZE};
use tern_volume::lun::FileLun;
use tern_volume::node::{LeaderInfo, Node, NodeConfig, NodeExports};
use tern_volume::store::{self, FormatOptions};

pub const MIB: u64 = 1 << 20;
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Creates `dir/lun` with room for `extents` data extents and formats it.
pub fn format_lun(dir: &Path, extents: u64) -> PathBuf {
    let lun = dir.join("lun");
    std::fs::File::create(&lun)
        .unwrap()
        .set_len(MIN_LUN_SIZE + (extents - 1) * EXTENT_SIZE)
        .unwrap();
    store::format(
        &FileLun::open(&lun).unwrap(),
        FormatOptions {
            force: false,
            uuid: [7; 16],
        },
    )
    .unwrap();
    lun
}

/// How a node is started.
#[derive(Clone, Copy, Debug)]
pub struct NodeOptions {
    /// Every request goes through the coordinator (`--no-direct`).
    pub no_direct: bool,
    pub lease_ttl_ms: u64,
    /// The generation a node started as coordinator takes.
    pub generation: u64,
}

/// Direct I/O, leases of ten minutes (they never run out in a test), generation 1.
pub const DIRECT: NodeOptions = NodeOptions {
    no_direct: false,
    lease_ttl_ms: 600_000,
    generation: 1,
};

/// As [`DIRECT`], with every request through the coordinator.
pub const NO_DIRECT: NodeOptions = NodeOptions {
    no_direct: true,
    ..DIRECT
};

/// Starts node `id` on `lun`, served on a free local port: the coordinator when `leader` is
/// `None`, else a node following `leader`. The node and its address.
pub fn node(
    lun: &Path,
    id: u32,
    leader: Option<&LeaderInfo>,
    opts: NodeOptions,
) -> (Arc<Node>, String) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let n = Node::new(
        NodeConfig {
            node_id: id,
            listen: addr.clone(),
            no_direct: opts.no_direct,
            lease_ttl_ms: opts.lease_ttl_ms,
            lun: lun.to_owned(),
            fault_file: None,
        },
        lun,
    )
    .unwrap();
    match leader {
        None => n.become_coordinator(opts.generation, u64::MAX).unwrap(),
        Some(l) => n.set_leader(Some(l.clone())),
    }
    let exports = Arc::new(NodeExports(Arc::clone(&n)));
    std::thread::spawn(move || tern_nbd::run_listener(listener, exports));
    (n, addr)
}

/// A freshly formatted LUN and its coordinator, node 1; more nodes join with [`Cluster::follower`].
pub struct Cluster {
    pub lun: PathBuf,
    pub coordinator: Arc<Node>,
    /// The coordinator's address.
    pub addr: String,
    pub leader: LeaderInfo,
}

impl Cluster {
    /// Formats `dir/lun` with `extents` data extents and starts node 1 on it as coordinator.
    pub fn new(dir: &Path, extents: u64, opts: NodeOptions) -> Cluster {
        let lun = format_lun(dir, extents);
        let (coordinator, addr) = node(&lun, 1, None, opts);
        let leader = LeaderInfo {
            node_id: 1,
            addr: addr.clone(),
            generation: opts.generation,
        };
        Cluster {
            lun,
            coordinator,
            addr,
            leader,
        }
    }

    /// Starts node `id` following the coordinator.
    pub fn follower(&self, id: u32, opts: NodeOptions) -> (Arc<Node>, String) {
        node(&self.lun, id, Some(&self.leader), opts)
    }
}

/// A control request that must succeed.
pub fn ctl(addr: &str, req: Request) -> Response {
    control::request(addr, &req, false, TIMEOUT).unwrap_or_else(|e| panic!("{req:?}: {e}"))
}

pub fn create(addr: &str, name: &str, size: u64, preallocated: bool) {
    ctl(
        addr,
        Request::Create {
            name: name.into(),
            size,
            preallocated,
        },
    )
    .into_file()
    .unwrap();
}

/// Takes `action` on `name`'s lease at `addr`; the lease's epoch after it.
pub fn lease(addr: &str, name: &str, action: LeaseAction) -> u64 {
    ctl(
        addr,
        Request::Lease {
            name: name.into(),
            action,
        },
    )
    .into_lease()
    .unwrap()
    .epoch
}
