//! One host's volume service: NBD exports of the volume's files, the control protocol, the
//! coordinator role (when elected), and the data path (direct on the LUN, or redirected over NBD to
//! the coordinator).
//!
//! The coordinator alone writes metadata, serialised under one mutex, and only while its etcd
//! session is alive on its own clock (`coord_deadline_ms`); each commit is also fenced on disk by
//! generation ([`crate::store::Volume::commit`]). Nodes keep extent maps per open file and write
//! file data directly, after checking their own lease deadline; when the LUN fails they replay the
//! writes not yet flushed through the coordinator and carry on there, and come back once a probe of
//! the LUN succeeds and the coordinator has flushed what they sent.
//!
//! The node is cut by role: `coordinator.rs` (taking office, metadata changes and the lease table
//! at the coordinator), `redirected.rs` (the coordinator's end of the redirected data path),
//! `leases.rs` (the write leases this node holds), `data.rs` (an open file: direct and redirected
//! I/O with its replay journal from `journal.rs`), `relay.rs` (a client connection's redirected
//! reads and writes relayed to the coordinator, many in flight) and `exports.rs` (the NBD exports
//! and control dispatch). This file holds the node itself, its path state and the request routing.

mod coordinator;
mod data;
mod exports;
mod journal;
mod leases;
mod redirected;
mod redirected_io;
mod relay;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use tern_nbd::Backend;

use crate::control::{
    self, ControlError, CoordinatorRef, Envelope, ErrorKind, HeldLeaseInfo, LeaseAction, Member,
    NodeStatus, Request, Response, Revoked, Role,
};
use crate::format::{NodeId, Superblock};
use crate::lease::{HeldLease, LeaseError, WatchdogTimings};
use crate::lun::{FaultyLun, FileLun, Lun};
use crate::namespace::NamespaceError;

use coordinator::Coordinator;
pub use data::FileHandle;
pub use exports::NodeExports;

/// Static configuration of a node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's id (≥ 1).
    pub node_id: NodeId,
    /// Address clients and peers reach this node at.
    pub listen: String,
    /// Never use the direct path (a host without SAN access); such a node never coordinates.
    pub no_direct: bool,
    /// Write-lease TTL.
    pub lease_ttl_ms: u64,
    /// The LUN's path on this host (local clients such as the VMM's volume disk open it for
    /// their own direct I/O).
    pub lun: std::path::PathBuf,
    /// The fault-injection file (`--fault-file`): local direct-I/O clients treat the LUN path as
    /// lost while it exists, as the node does.
    pub fault_file: Option<std::path::PathBuf>,
}

pub use crate::control::PathState;

/// Who the coordinator is, as last read from etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderInfo {
    /// Node id.
    pub node_id: NodeId,
    /// Its listen address.
    pub addr: String,
    /// Its generation (etcd revision of its election key).
    pub generation: u64,
}

/// The coordinator's commit watchdog as the node sees it: a process of its own that SIGKILLs
/// this one when a metadata or zeroing write stays armed past its session deadline plus the
/// grace (`cluster.rs` runs it; [`WatchdogTimings::commit_watchdog_kills`]).
pub trait CommitWatchdog: Send + Sync {
    /// Tell the watchdog the earliest session deadline (`CLOCK_BOOTTIME` ms, [`boottime_ms`])
    /// a write that passed its check but may not be issued yet was checked against, or `None`
    /// when no write is pending. An error means the watchdog is gone: the write is refused.
    fn arm(&self, deadline_ms: Option<u64>) -> std::io::Result<()>;
}

/// The writes of the coordinator currently armed: id → session deadline (absolute ms).
#[derive(Default)]
struct Armed {
    next_id: u64,
    pending: BTreeMap<u64, u64>,
}

/// One fenced sequence of coordinator writes (a commit, an extent zeroing): [`WriteFence::
/// may_write`] before each write arms the commit watchdog with the session deadline it checks,
/// and the drop disarms it. Without a watchdog (a node built outside `cluster::serve`, as in
/// tests) only the deadline is checked.
pub(crate) struct WriteFence<'a> {
    node: &'a Node,
    id: u64,
}

impl WriteFence<'_> {
    /// Whether the next write may be issued: the watchdog is armed with the current session
    /// deadline *first*, then the deadline is checked, so a process that stalls after a
    /// positive answer is killed once the deadline plus the grace passes.
    pub(crate) fn may_write(&self) -> bool {
        let n = self.node;
        let deadline = n.coord_deadline_ms.load(Ordering::SeqCst);
        if let Some(w) = n.commit_watchdog.get() {
            let abs = deadline.saturating_add(n.epoch0_ms);
            let mut a = lock(&n.armed);
            a.pending.insert(self.id, abs);
            let earliest = a.pending.values().min().copied();
            if let Err(e) = w.arm(earliest) {
                eprintln!(
                    "tern volume: node {}: the commit watchdog is gone ({e}): metadata writes refused",
                    n.cfg.node_id
                );
                return false;
            }
        }
        n.now_ms() < deadline
    }
}

impl Drop for WriteFence<'_> {
    fn drop(&mut self) {
        let n = self.node;
        if let Some(w) = n.commit_watchdog.get() {
            let mut a = lock(&n.armed);
            if a.pending.remove(&self.id).is_some() {
                let _ = w.arm(a.pending.values().min().copied());
            }
        }
    }
}

/// A node of the volume cluster.
pub struct Node {
    cfg: NodeConfig,
    lun: Arc<FaultyLun<FileLun>>,
    sb: Superblock,
    /// [`boottime_ms`] when the node was made; `now_ms` counts from here.
    epoch0_ms: u64,
    coord: Mutex<Option<Coordinator>>,
    coord_deadline_ms: AtomicU64,
    /// The commit watchdog, when the node runs under `cluster::serve`.
    commit_watchdog: OnceLock<Box<dyn CommitWatchdog>>,
    /// Coordinator writes armed with the watchdog.
    armed: Mutex<Armed>,
    leader: Mutex<Option<LeaderInfo>>,
    path_ok: AtomicBool,
    redirected_files: AtomicU64,
    held: Mutex<BTreeMap<String, HeldLease>>,
    /// Per file, the lapsed deadline the watchdog already acted on.
    watchdog_done: Mutex<BTreeMap<String, u64>>,
    handles: Mutex<BTreeMap<String, Arc<FileHandle>>>,
    /// Injected partition: requests to other nodes fail.
    partitioned: AtomicBool,
    /// Listen addresses of nodes that forwarded requests to us.
    peers: Mutex<BTreeMap<NodeId, String>>,
    /// Extra peers' status for `status` (filled by the cluster layer).
    pub members: Mutex<BTreeMap<NodeId, serde_json::Value>>,
    /// Redirected writes past their check still writing to the LUN (outside the coordinator
    /// lock); see [`redirected::InFlight`].
    redirected_in_flight: redirected::InFlight,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// Milliseconds of `CLOCK_BOOTTIME`: monotonic, and unlike `CLOCK_MONOTONIC` (`Instant`) it
/// also counts the time the host was suspended. Every lease deadline of the volume (the node's,
/// the coordinator's, a VM disk's) is taken on it.
pub fn boottime_ms() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    (t.tv_sec as u64) * 1000 + (t.tv_nsec as u64) / 1_000_000
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn ns_err(e: NamespaceError) -> ControlError {
    let kind = match e {
        NamespaceError::InvalidName(_)
        | NamespaceError::InvalidSize { .. }
        | NamespaceError::OutOfRange(_) => ErrorKind::Invalid,
        NamespaceError::Exists(_) => ErrorKind::Exists,
        NamespaceError::NotFound(_) => ErrorKind::NotFound,
        NamespaceError::NoSpace { .. } | NamespaceError::OverCommitted { .. } => ErrorKind::NoSpace,
        NamespaceError::Busy { .. } => ErrorKind::Busy,
    };
    ControlError::new(kind, e.to_string())
}

fn lease_err(e: LeaseError) -> ControlError {
    let kind = match e {
        LeaseError::Busy { .. } => ErrorKind::Busy,
        LeaseError::Stale { .. } | LeaseError::Expired { .. } => ErrorKind::Stale,
        LeaseError::NoHandover | LeaseError::BadTarget(_) => ErrorKind::Invalid,
    };
    ControlError::new(kind, e.to_string())
}

fn failed(e: impl std::fmt::Display) -> ControlError {
    ControlError::new(ErrorKind::Failed, e.to_string())
}

const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a node keeps retrying to reach a coordinator (covers a take-over).
const COORDINATOR_WAIT: Duration = Duration::from_secs(15);
/// Unflushed direct writes kept for replay on a path switch; beyond this the node flushes first.
const JOURNAL_MAX_BYTES: usize = 64 << 20;

impl Node {
    /// Open the LUN and build the node (not yet part of any election).
    pub fn new(
        cfg: NodeConfig,
        lun_path: &std::path::Path,
    ) -> Result<Arc<Node>, crate::store::OpenError> {
        let lun = Arc::new(FaultyLun::new(FileLun::open(lun_path)?, Default::default()));
        let sb = crate::store::read_superblock(&*lun)?;
        let path_ok = !cfg.no_direct;
        let tick = Duration::from_millis(WatchdogTimings::for_ttl(cfg.lease_ttl_ms).tick_ms);
        let node = Arc::new(Node {
            cfg,
            lun,
            sb,
            epoch0_ms: boottime_ms(),
            coord: Mutex::new(None),
            coord_deadline_ms: AtomicU64::new(0),
            commit_watchdog: OnceLock::new(),
            armed: Mutex::new(Armed::default()),
            leader: Mutex::new(None),
            path_ok: AtomicBool::new(path_ok),
            redirected_files: AtomicU64::new(0),
            held: Mutex::new(BTreeMap::new()),
            watchdog_done: Mutex::new(BTreeMap::new()),
            handles: Mutex::new(BTreeMap::new()),
            members: Mutex::new(BTreeMap::new()),
            peers: Mutex::new(BTreeMap::new()),
            partitioned: AtomicBool::new(false),
            redirected_in_flight: Default::default(),
        });
        // The host watchdog lives as long as the node.
        let weak = Arc::downgrade(&node);
        std::thread::Builder::new()
            .name("volume-watchdog".into())
            .spawn(move || {
                while let Some(node) = weak.upgrade() {
                    node.watchdog_tick();
                    drop(node);
                    std::thread::sleep(tick);
                }
            })?;
        Ok(node)
    }

    /// Milliseconds on this node's clock: `CLOCK_BOOTTIME`, which keeps counting while the host
    /// is suspended, so every deadline (write leases, the coordinator's session) has passed when
    /// a suspended host resumes, as it has for the other hosts.
    pub fn now_ms(&self) -> u64 {
        boottime_ms().saturating_sub(self.epoch0_ms)
    }

    /// Install the commit watchdog (once; later calls are ignored): from here on every
    /// coordinator write is armed with it ([`WriteFence`]).
    pub fn set_commit_watchdog(&self, w: Box<dyn CommitWatchdog>) {
        let _ = self.commit_watchdog.set(w);
    }

    /// A fence for one sequence of coordinator writes.
    pub(crate) fn write_fence(&self) -> WriteFence<'_> {
        let mut a = lock(&self.armed);
        a.next_id += 1;
        WriteFence {
            node: self,
            id: a.next_id,
        }
    }

    /// Node id.
    pub fn id(&self) -> NodeId {
        self.cfg.node_id
    }

    /// Config.
    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    /// Superblock of the volume.
    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    /// Arm fault injection: a volatile write cache that the next path loss throws away.
    pub fn set_volatile_cache(&self, on: bool) {
        self.lun.set_volatile_cache(on);
    }

    /// Simulate a network partition from the other nodes (or its end).
    pub fn set_partitioned(&self, on: bool) {
        self.partitioned.store(on, Ordering::SeqCst);
    }

    /// Simulate losing or regaining the storage path.
    pub fn set_path_lost(&self, lost: bool) {
        self.lun.set_path_lost(lost);
    }

    /// Current path state (redirected if the path is down or any open file is redirected).
    pub fn path_state(&self) -> PathState {
        if self.path_ok.load(Ordering::SeqCst) && self.redirected_files.load(Ordering::SeqCst) == 0
        {
            PathState::Direct
        } else {
            PathState::Redirected
        }
    }

    /// Probe the LUN (called periodically); returns whether the direct path works.
    pub fn probe_path(&self) -> bool {
        if self.cfg.no_direct {
            return false;
        }
        let mut b = vec![0u8; 4096];
        let ok = self.lun.read_at(&mut b, 0).is_ok();
        self.path_ok.store(ok, Ordering::SeqCst);
        if ok && self.redirected_files.load(Ordering::SeqCst) > 0 {
            let handles: Vec<Arc<FileHandle>> = lock(&self.handles).values().cloned().collect();
            for h in handles {
                let mut st = lock(&h.state);
                // Failure just leaves the file redirected until the next probe.
                let _ = h.use_direct(&mut st);
            }
        }
        ok
    }

    /// Flush every open file (a clean stop); returns how many were open. Leases are kept.
    pub fn flush_all(&self) -> usize {
        let handles: Vec<Arc<FileHandle>> = lock(&self.handles).values().cloned().collect();
        for h in &handles {
            // A failure is left to the client's own FLUSH; nothing more can be done here.
            let _ = Backend::flush(&**h);
        }
        handles.len()
    }

    /// Record who the coordinator is.
    /// When it changed, the idle control connections to the previous one are closed: requests
    /// to the new one start on new connections (the receiver judges each request on its own
    /// state either way: `crate::control_conn`).
    pub fn set_leader(&self, l: Option<LeaderInfo>) {
        let old = std::mem::replace(&mut *lock(&self.leader), l.clone());
        if let Some(old) = old
            && old.node_id != self.cfg.node_id
            && l.as_ref()
                .is_none_or(|n| n.addr != old.addr || n.generation != old.generation)
        {
            crate::control_conn::forget(&old.addr);
        }
    }

    /// Who the coordinator is.
    pub fn leader(&self) -> Option<LeaderInfo> {
        lock(&self.leader).clone()
    }

    /// The coordinator's generation (no copy of its address).
    fn leader_generation(&self) -> Option<u64> {
        lock(&self.leader).as_ref().map(|l| l.generation)
    }

    /// Send a request to the coordinator (ourselves if we are it), retrying through a take-over.
    pub fn call_coordinator(&self, req: &Request) -> Result<Response, ControlError> {
        let start = Instant::now();
        let mut last = ControlError::new(ErrorKind::NoCoordinator, "no coordinator elected yet");
        while start.elapsed() < COORDINATOR_WAIT {
            if self.partitioned.load(Ordering::SeqCst) && !self.is_coordinator() {
                return Err(ControlError::new(
                    ErrorKind::NoCoordinator,
                    "injected partition: peers unreachable",
                ));
            }
            if self.is_coordinator() {
                match self.coordinate(req) {
                    Err(e) if e.kind == ErrorKind::NotCoordinator => last = e,
                    other => return other,
                }
            } else if let Some(l) = self.leader().filter(|l| l.node_id != self.cfg.node_id) {
                let env = Envelope {
                    forwarded: true,
                    request: req.clone(),
                    from: Some((self.cfg.node_id, self.cfg.listen.clone())),
                };
                match control::send(&l.addr, env, CALL_TIMEOUT) {
                    Err(e)
                        if matches!(
                            e.kind,
                            ErrorKind::NotCoordinator | ErrorKind::NoCoordinator
                        ) =>
                    {
                        last = e
                    }
                    other => return other,
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(ControlError::new(
            ErrorKind::NoCoordinator,
            format!(
                "no coordinator answered within {COORDINATOR_WAIT:?}: {}",
                last.message
            ),
        ))
    }

    /// Handle one control request that arrived at this node.
    pub fn handle(&self, env: Envelope) -> Result<Response, ControlError> {
        if let Some((id, addr)) = &env.from {
            lock(&self.peers).insert(*id, addr.clone());
        }
        match &env.request {
            Request::Status => Ok(Response::Status(self.status())),
            Request::Lease { name, action } => self.lease_action(name, *action),
            Request::Revoke { name } => {
                let dropped = self.stop_writing(name);
                Ok(Response::Revoked(Revoked {
                    name: name.clone(),
                    dropped_epoch: dropped.map(|h| h.epoch),
                }))
            }
            Request::CoordLease {
                name,
                node,
                action: LeaseAction::AbortHandover,
                ..
            } if env.forwarded || self.is_coordinator() => {
                self.revoke_holder_for_abort(name, *node)?;
                self.coordinate(&env.request)
            }
            r if env.forwarded => self.coordinate(r),
            r => self.call_coordinator(r),
        }
    }

    fn status(&self) -> NodeStatus {
        let now = self.now_ms();
        let held_leases = lock(&self.held)
            .iter()
            .map(|(n, h)| HeldLeaseInfo {
                name: n.clone(),
                epoch: h.epoch,
                valid: h.valid_at(now),
            })
            .collect();
        // Membership entries come from etcd; one that does not parse is left out.
        let mut nodes: Vec<Member> = lock(&self.members)
            .values()
            .filter_map(|v| serde_json::from_value(v.clone()).ok())
            .collect();
        if nodes.is_empty() {
            nodes.push(self.member());
        }
        NodeStatus {
            node_id: self.cfg.node_id,
            listen: self.cfg.listen.clone(),
            role: if self.is_coordinator() {
                Role::Coordinator
            } else {
                Role::Node
            },
            path: self.path_state(),
            no_direct: self.cfg.no_direct,
            lun: self.cfg.lun.clone(),
            fault_file: self.cfg.fault_file.clone(),
            coordinator: self.leader().map(|l| CoordinatorRef {
                node_id: l.node_id,
                addr: l.addr,
                generation: l.generation,
            }),
            nodes,
            held_leases,
        }
    }

    /// This node's entry in the membership list.
    pub fn member(&self) -> Member {
        Member {
            node_id: self.cfg.node_id,
            addr: self.cfg.listen.clone(),
            path: self.path_state(),
        }
    }

    /// This node's entry in the membership list, as published in etcd.
    pub fn member_json(&self) -> serde_json::Value {
        serde_json::to_value(self.member()).unwrap_or(serde_json::Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{EXTENT_SIZE, MIN_LUN_SIZE};

    /// A commit watchdog that records what it is told.
    struct Recorder {
        log: Arc<Mutex<Vec<Option<u64>>>>,
    }

    impl CommitWatchdog for Recorder {
        fn arm(&self, deadline_ms: Option<u64>) -> std::io::Result<()> {
            lock(&self.log).push(deadline_ms);
            Ok(())
        }
    }

    fn node(dir: &std::path::Path) -> Arc<Node> {
        let path = dir.join("lun");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(MIN_LUN_SIZE + 8 * EXTENT_SIZE)
            .unwrap();
        let lun = FileLun::open(&path).unwrap();
        crate::store::format(
            &lun,
            crate::store::FormatOptions {
                force: false,
                uuid: [7; 16],
            },
        )
        .unwrap();
        Node::new(
            NodeConfig {
                node_id: 1,
                listen: "127.0.0.1:1".into(),
                no_direct: false,
                lease_ttl_ms: 4000,
                lun: path.clone(),
                fault_file: None,
            },
            &path,
        )
        .unwrap()
    }

    #[test]
    fn every_coordinator_write_is_armed_with_the_session_deadline_and_disarmed_after() {
        let dir = tempfile::tempdir().unwrap();
        let n = node(dir.path());
        let log = Arc::new(Mutex::new(Vec::new()));
        n.set_commit_watchdog(Box::new(Recorder {
            log: Arc::clone(&log),
        }));
        let deadline = n.now_ms() + 60_000;
        n.become_coordinator(3, deadline).unwrap();
        let abs = deadline + n.epoch0_ms;
        {
            let l = lock(&log);
            // Armed with the deadline before the first write (the take-over commit writes a
            // payload sector and the header, each checked), disarmed at the end.
            assert!(l.len() >= 3, "{l:?}");
            assert!(l[..l.len() - 1].iter().all(|a| *a == Some(abs)), "{l:?}");
            assert_eq!(l.last(), Some(&None), "{l:?}");
        }
        // A coordinator whose session has passed arms first, then finds the deadline passed
        // and writes nothing: the metadata on the LUN stays the take-over commit's.
        lock(&log).clear();
        let seq = crate::store::Volume::open(&*n.lun).unwrap().meta.seq;
        n.set_coordinator_deadline(n.now_ms());
        *lock(&n.coord) = None;
        let e = n.become_coordinator(4, n.now_ms()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotCoordinator, "{e:?}");
        let after = crate::store::Volume::open(&*n.lun).unwrap().meta;
        assert_eq!((after.generation, after.seq), (3, seq));
        let l = lock(&log);
        assert_eq!(l.first().map(|a| a.is_some()), Some(true), "{l:?}");
        assert_eq!(l.last(), Some(&None), "{l:?}");
    }

    #[test]
    fn leases_held_at_a_take_over_are_counted_from_the_election() {
        let dir = tempfile::tempdir().unwrap();
        let n = node(dir.path());
        // A file whose write lease node 2 held under the predecessor.
        let mut v = crate::store::Volume::open(&*n.lun).unwrap();
        let mut next = v.meta.clone();
        next.seq += 1;
        next.files.insert(
            "f".into(),
            crate::format::FileEntry {
                size: 0,
                preallocated: false,
                map: Vec::new(),
                lease: crate::format::LeaseRecord {
                    epoch: 5,
                    holder: Some(2),
                    handover_from: None,
                },
            },
        );
        v.commit(&*n.lun, next, 2).unwrap();
        let elected = n.now_ms().saturating_sub(1500);
        n.become_coordinator_elected_at(3, n.now_ms() + 60_000, elected)
            .unwrap();
        let now = n.now_ms();
        let g = lock(&n.coord);
        let (holder, epoch, deadline) = g.as_ref().unwrap().leases.holder("f", now).unwrap();
        assert_eq!((holder, epoch), (2, 5));
        // Live until the election + TTL, not the take-over + TTL.
        assert_eq!(deadline, elected + 4000);
    }

    /// A redirected write blocked in its LUN I/O (outside the coordinator lock) holds back the
    /// fence of its writer, and so do the take-over and a change that frees its extents; a
    /// write that comes after the fence is refused.
    #[test]
    fn a_fence_waits_for_the_redirected_writes_in_flight() {
        use std::sync::mpsc::{RecvTimeoutError, channel};
        use std::time::Duration;
        use tern_nbd::Errno;

        let dir = tempfile::tempdir().unwrap();
        let n = node(dir.path());
        n.become_coordinator(3, n.now_ms() + 600_000).unwrap();
        let create = Request::Create {
            name: "f".into(),
            size: 2 * EXTENT_SIZE,
            preallocated: false,
        };
        n.coordinate(&create).unwrap();
        let acquire = Request::CoordLease {
            name: "f".into(),
            node: 2,
            epoch: 0,
            action: LeaseAction::Acquire,
            renew: false,
        };
        let Response::Lease(grant) = n.coordinate(&acquire).unwrap() else {
            panic!("not a lease grant");
        };
        let epoch = grant.epoch;

        // The writer stops right before its LUN write until released.
        let (entered_tx, entered) = channel::<()>();
        let (release, release_rx) = channel::<()>();
        let writer = {
            let n = Arc::clone(&n);
            std::thread::spawn(move || {
                redirected::BEFORE_LUN_WRITE.with(|h| {
                    *h.borrow_mut() = Some(Box::new(move || {
                        entered_tx.send(()).unwrap();
                        release_rx.recv().unwrap();
                    }));
                });
                // A hole: allocated under the lock before the write registers.
                n.redirected_write("f", 2, epoch, &[0xab; 4096], EXTENT_SIZE, false)
            })
        };
        entered.recv_timeout(Duration::from_secs(10)).unwrap();
        // The coordinator lock is free meanwhile: a read and a renewal go through.
        let mut buf = [1u8; 512];
        n.redirected_read("f", &mut buf, 0).unwrap();
        assert_eq!(buf, [0u8; 512]);
        let renew = Request::CoordLease {
            name: "f".into(),
            node: 2,
            epoch,
            action: LeaseAction::Acquire,
            renew: true,
        };
        n.coordinate(&renew).unwrap();

        let (done_tx, done) = channel();
        let fencer = {
            let n = Arc::clone(&n);
            std::thread::spawn(move || {
                let r = n.coordinate(&Request::FenceNode { node: 2 });
                done_tx.send(()).unwrap();
                r
            })
        };
        assert_eq!(
            done.recv_timeout(Duration::from_millis(500)),
            Err(RecvTimeoutError::Timeout),
            "the fence completed while a write of the fenced node was in flight"
        );
        release.send(()).unwrap();
        done.recv_timeout(Duration::from_secs(10))
            .expect("the fence did not complete once the write ended");
        assert_eq!(writer.join().unwrap(), Ok(()));
        let Response::Fenced(fenced) = fencer.join().unwrap().unwrap() else {
            panic!("not a fence answer");
        };
        assert_eq!(fenced.files, vec!["f".to_owned()]);

        // The write landed before the fence; one after it is refused.
        let mut buf = [0u8; 4096];
        n.redirected_read("f", &mut buf, EXTENT_SIZE).unwrap();
        assert_eq!(buf, [0xab; 4096]);
        assert_eq!(
            n.redirected_write("f", 2, epoch, &[0xcd; 4096], EXTENT_SIZE, false),
            Err(Errno::Perm)
        );
        assert_eq!(*lock(&n.redirected_in_flight.count), 0);
    }

    /// A commit watchdog that is gone.
    struct Gone;

    impl CommitWatchdog for Gone {
        fn arm(&self, _: Option<u64>) -> std::io::Result<()> {
            Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
        }
    }

    #[test]
    fn without_its_commit_watchdog_a_coordinator_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let n = node(dir.path());
        n.set_commit_watchdog(Box::new(Gone));
        let before = crate::store::Volume::open(&*n.lun).unwrap().meta;
        let e = n.become_coordinator(3, u64::MAX / 2).unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotCoordinator, "{e:?}");
        assert_eq!(crate::store::Volume::open(&*n.lun).unwrap().meta, before);
        assert!(!n.is_coordinator());
    }
}
