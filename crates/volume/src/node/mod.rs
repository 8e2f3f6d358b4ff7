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

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tern_nbd::proto::StatusExtent;
use tern_nbd::server::ZeroFlags;
use tern_nbd::{Backend, Errno, Exports};

use crate::control::{
    self, ControlError, CoordinatorRef, Envelope, ErrorKind, Fenced, FileInfo, FileList,
    HeldLeaseInfo, LeaseAction, LeaseGrant, LeaseInfo, Member, NodeStatus, Removed, Reply, Request,
    Response, Revoked, Role,
};
use crate::format::{EXTENT_SIZE, HOLE, LeaseRecord, NodeId, Superblock};
use crate::lease::{HeldLease, LeaseError, LeaseOp, LeaseTable, LeaseTimings};
use crate::lun::{FaultyLun, FileLun, Lun};
use crate::namespace::{self, NamespaceError};
use crate::store::{Segment, Volume, segments};

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

struct Coordinator {
    generation: u64,
    volume: Volume,
    leases: LeaseTable,
    /// Files whose hand-over is being aborted: the destination is being told to stop, and may
    /// not re-acquire or renew meanwhile.
    aborting: std::collections::BTreeSet<String>,
}

/// A node of the volume cluster.
pub struct Node {
    cfg: NodeConfig,
    lun: Arc<FaultyLun<FileLun>>,
    sb: Superblock,
    epoch0: Instant,
    coord: Mutex<Option<Coordinator>>,
    coord_deadline_ms: AtomicU64,
    leader: Mutex<Option<LeaderInfo>>,
    path_ok: AtomicBool,
    redirected_files: AtomicU64,
    held: Mutex<BTreeMap<String, HeldLease>>,
    handles: Mutex<BTreeMap<String, Arc<FileHandle>>>,
    /// Injected partition: requests to other nodes fail.
    partitioned: AtomicBool,
    /// Listen addresses of nodes that forwarded requests to us.
    peers: Mutex<BTreeMap<NodeId, String>>,
    /// Extra peers' status for `status` (filled by the cluster layer).
    pub members: Mutex<BTreeMap<NodeId, serde_json::Value>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
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
        NamespaceError::NoSpace { .. } => ErrorKind::NoSpace,
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
        Ok(Arc::new(Node {
            cfg,
            lun,
            sb,
            epoch0: Instant::now(),
            coord: Mutex::new(None),
            coord_deadline_ms: AtomicU64::new(0),
            leader: Mutex::new(None),
            path_ok: AtomicBool::new(path_ok),
            redirected_files: AtomicU64::new(0),
            held: Mutex::new(BTreeMap::new()),
            handles: Mutex::new(BTreeMap::new()),
            members: Mutex::new(BTreeMap::new()),
            peers: Mutex::new(BTreeMap::new()),
            partitioned: AtomicBool::new(false),
        }))
    }

    /// Milliseconds on this node's monotonic clock.
    pub fn now_ms(&self) -> u64 {
        self.epoch0.elapsed().as_millis() as u64
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

    /// How many write leases this node holds (valid or lapsed, not yet given up).
    pub fn held_lease_count(&self) -> usize {
        lock(&self.held).len()
    }

    /// Stop writing `name` at once: wait for an in-flight write, make everything written durable,
    /// and forget the lease. Returns the lease that was dropped.
    pub fn stop_writing(&self, name: &str) -> Option<HeldLease> {
        let handle = lock(&self.handles).get(name).cloned();
        let held = lock(&self.held).get(name).copied();
        match handle {
            Some(h) => {
                let mut st = lock(&h.state);
                let _ = h.flush_locked(&mut st, held.map(|l| l.epoch).unwrap_or(0));
                lock(&self.held).remove(name)
            }
            None => lock(&self.held).remove(name),
        }
    }

    /// Record who the coordinator is.
    pub fn set_leader(&self, l: Option<LeaderInfo>) {
        *lock(&self.leader) = l;
    }

    /// Who the coordinator is.
    pub fn leader(&self) -> Option<LeaderInfo> {
        lock(&self.leader).clone()
    }

    /// Extend (or, with 0, end at once) the time this node may act as coordinator.
    pub fn set_coordinator_deadline(&self, deadline_ms: u64) {
        self.coord_deadline_ms.store(deadline_ms, Ordering::SeqCst);
        if deadline_ms == 0 {
            *lock(&self.coord) = None;
        }
    }

    /// Become coordinator with `generation`: load the metadata and lease table, then commit once
    /// under the new generation so any older coordinator is fenced on disk.
    pub fn become_coordinator(
        &self,
        generation: u64,
        deadline_ms: u64,
    ) -> Result<(), ControlError> {
        let mut volume = Volume::open(&*self.lun).map_err(failed)?;
        let now = self.now_ms();
        let records: Vec<(String, LeaseRecord)> = volume
            .meta
            .files
            .iter()
            .map(|(n, f)| (n.clone(), f.lease))
            .collect();
        let leases = LeaseTable::load(
            LeaseTimings {
                ttl_ms: self.cfg.lease_ttl_ms,
            },
            records.iter().map(|(n, r)| (n.as_str(), *r)),
            now,
        );
        let mut next = volume.meta.clone();
        next.seq += 1;
        volume
            .commit(&*self.lun, next, generation)
            .map_err(failed)?;
        self.coord_deadline_ms.store(deadline_ms, Ordering::SeqCst);
        *lock(&self.coord) = Some(Coordinator {
            generation,
            volume,
            leases,
            aborting: Default::default(),
        });
        self.set_leader(Some(LeaderInfo {
            node_id: self.cfg.node_id,
            addr: self.cfg.listen.clone(),
            generation,
        }));
        Ok(())
    }

    /// Whether this node currently acts as coordinator.
    pub fn is_coordinator(&self) -> bool {
        lock(&self.coord).is_some() && self.now_ms() < self.coord_deadline_ms.load(Ordering::SeqCst)
    }

    fn coordinator(&self) -> Result<MutexGuard<'_, Option<Coordinator>>, ControlError> {
        let g = lock(&self.coord);
        let alive = self.now_ms() < self.coord_deadline_ms.load(Ordering::SeqCst);
        if g.is_none() || !alive {
            return Err(ControlError::new(
                ErrorKind::NotCoordinator,
                format!("node {} is not the coordinator", self.cfg.node_id),
            ));
        }
        Ok(g)
    }

    // ---------------------------------------------------------------- coordinator side

    fn file_info(
        c: &Coordinator,
        name: &str,
        with_map: bool,
        now: u64,
    ) -> Result<FileInfo, ControlError> {
        let f = c
            .volume
            .meta
            .files
            .get(name)
            .ok_or_else(|| ns_err(NamespaceError::NotFound(name.into())))?;
        let live = c.leases.holder(name, now);
        let rec = c.leases.record(name);
        Ok(FileInfo {
            name: name.to_owned(),
            size: f.size,
            preallocated: f.preallocated,
            allocated_extents: f.map.iter().filter(|&&p| p != HOLE).count() as u64,
            lease: LeaseInfo {
                epoch: rec.epoch,
                holder: live.map(|(h, _, _)| h),
                remaining_ms: live.map(|(_, _, d)| d - now),
                handover_from: rec.handover_from,
            },
            map: with_map.then(|| f.map.clone()),
        })
    }

    fn commit_change(
        &self,
        c: &mut Coordinator,
        change: namespace::Change,
    ) -> Result<(), ControlError> {
        // Re-check the session right before touching the LUN.
        if self.now_ms() >= self.coord_deadline_ms.load(Ordering::SeqCst) {
            return Err(ControlError::new(
                ErrorKind::NotCoordinator,
                "coordinator session expired",
            ));
        }
        c.volume
            .zero_extents(&*self.lun, &change.zero)
            .map_err(failed)?;
        let generation = c.generation;
        c.volume
            .commit(&*self.lun, change.next, generation)
            .map_err(|e| {
                if matches!(e, crate::store::CommitError::Fenced { .. }) {
                    ControlError::new(ErrorKind::NotCoordinator, e.to_string())
                } else {
                    failed(e)
                }
            })
    }

    fn coordinate(&self, req: &Request) -> Result<Response, ControlError> {
        if let Request::CoordLease {
            name,
            node,
            action: LeaseAction::AbortHandover,
            ..
        } = req
        {
            self.set_aborting(name, true)?;
            let res = self
                .revoke_holder_for_abort(name, *node)
                .and_then(|()| self.coordinate_locked(req));
            let _ = self.set_aborting(name, false);
            return res;
        }
        self.coordinate_locked(req)
    }

    fn set_aborting(&self, name: &str, on: bool) -> Result<(), ControlError> {
        let mut g = self.coordinator()?;
        let c = g
            .as_mut()
            .ok_or_else(|| ControlError::new(ErrorKind::NotCoordinator, "not coordinator"))?;
        if on {
            c.aborting.insert(name.to_owned());
        } else {
            c.aborting.remove(name);
        }
        Ok(())
    }

    fn coordinate_locked(&self, req: &Request) -> Result<Response, ControlError> {
        let mut g = self.coordinator()?;
        let c = g
            .as_mut()
            .ok_or_else(|| ControlError::new(ErrorKind::NotCoordinator, "not coordinator"))?;
        let n = self.sb.extent_count;
        let now = self.now_ms();
        match req {
            Request::Create {
                name,
                size,
                preallocated,
            } => {
                let ch = namespace::create(&c.volume.meta, n, name, *size, *preallocated)
                    .map_err(ns_err)?;
                self.commit_change(c, ch)?;
                Node::file_info(c, name, false, now).map(Response::File)
            }
            Request::Remove { name } => {
                if let Some((h, _, _)) = c.leases.holder(name, now) {
                    return Err(ns_err(NamespaceError::Busy {
                        name: name.clone(),
                        holder: h,
                    }));
                }
                let mut meta = c.volume.meta.clone();
                if let Some(f) = meta.files.get_mut(name) {
                    f.lease.holder = None;
                }
                let ch = namespace::delete(&meta, name).map_err(ns_err)?;
                self.commit_change(c, ch)?;
                c.leases.remove(name);
                Ok(Response::Removed(Removed {
                    name: name.clone(),
                    removed: true,
                }))
            }
            Request::Resize { name, size } => {
                let ch = namespace::resize(&c.volume.meta, n, name, *size).map_err(ns_err)?;
                self.commit_change(c, ch)?;
                Node::file_info(c, name, false, now).map(Response::File)
            }
            Request::Allocate { name, logical } => {
                let ch = namespace::allocate(&c.volume.meta, n, name, *logical).map_err(ns_err)?;
                if ch.next.seq != c.volume.meta.seq {
                    self.commit_change(c, ch)?;
                }
                Node::file_info(c, name, true, now).map(Response::File)
            }
            Request::List => {
                let files: Result<Vec<_>, _> = c
                    .volume
                    .meta
                    .files
                    .keys()
                    .map(|k| Node::file_info(c, k, false, now))
                    .collect();
                Ok(Response::Files(FileList {
                    files: files?,
                    extent_size: crate::format::EXTENT_SIZE,
                    extents: n,
                    free_extents: c.volume.meta.free_extents(n),
                    generation: c.generation,
                }))
            }
            Request::Stat { name, map } => Node::file_info(c, name, *map, now).map(Response::File),
            Request::CoordLease {
                name,
                node,
                epoch,
                action,
                renew,
            } => {
                if !c.volume.meta.files.contains_key(name) {
                    return Err(ns_err(NamespaceError::NotFound(name.clone())));
                }
                if c.aborting.contains(name) && *action == LeaseAction::Acquire {
                    return Err(ControlError::new(
                        ErrorKind::Busy,
                        format!("the hand-over of {name:?} is being aborted"),
                    ));
                }
                let op = match (action, renew) {
                    (LeaseAction::Acquire, true) => LeaseOp::Renew {
                        node: *node,
                        epoch: *epoch,
                    },
                    (LeaseAction::Acquire, false) => LeaseOp::Acquire { node: *node },
                    (LeaseAction::Release, _) => LeaseOp::Release {
                        node: *node,
                        epoch: *epoch,
                    },
                    (LeaseAction::Handover { to }, _) => LeaseOp::Handover {
                        node: *node,
                        epoch: *epoch,
                        to: *to,
                    },
                    (LeaseAction::AbortHandover, _) => LeaseOp::AbortHandover { node: *node },
                    (LeaseAction::ConfirmHandover, _) => LeaseOp::ConfirmHandover {
                        node: *node,
                        epoch: *epoch,
                    },
                };
                let before = c.leases.clone();
                let grant = c.leases.apply(name, op, now).map_err(lease_err)?;
                if grant.persist {
                    let mut next = c.volume.meta.clone();
                    next.seq += 1;
                    if let Some(f) = next.files.get_mut(name) {
                        f.lease = c.leases.record(name);
                    }
                    if let Err(e) = self.commit_change(c, namespace::Change { next, zero: vec![] })
                    {
                        c.leases = before;
                        return Err(e);
                    }
                }
                Ok(Response::Lease(LeaseGrant {
                    name: name.clone(),
                    holder: grant.holder,
                    epoch: grant.epoch,
                    ttl_ms: self.cfg.lease_ttl_ms,
                    remaining_ms: grant.deadline_ms.saturating_sub(now),
                }))
            }
            Request::FenceNode { node } => {
                let before = c.leases.clone();
                let changed = c.leases.fence_node(*node, now);
                if !changed.is_empty() {
                    let mut next = c.volume.meta.clone();
                    next.seq += 1;
                    for (name, _) in &changed {
                        if let Some(f) = next.files.get_mut(name) {
                            f.lease = c.leases.record(name);
                        }
                    }
                    if let Err(e) = self.commit_change(c, namespace::Change { next, zero: vec![] })
                    {
                        c.leases = before;
                        return Err(e);
                    }
                }
                Ok(Response::Fenced(Fenced {
                    node: *node,
                    files: changed
                        .into_iter()
                        .filter(|(_, held)| *held)
                        .map(|(name, _)| name)
                        .collect(),
                }))
            }
            Request::Status | Request::Lease { .. } | Request::Revoke { .. } => Err(
                ControlError::new(ErrorKind::Invalid, "not a coordinator request"),
            ),
        }
    }

    /// Redirected write at the coordinator: fenced by the lease table, under the coordinator lock.
    fn redirected_write(
        &self,
        name: &str,
        node: NodeId,
        epoch: u64,
        data: &[u8],
        offset: u64,
        fua: bool,
    ) -> Result<(), Errno> {
        let mut g = self.coordinator().map_err(|_| Errno::Shutdown)?;
        let c = g.as_mut().ok_or(Errno::Shutdown)?;
        let now = self.now_ms();
        c.leases
            .check_write(name, node, epoch, now)
            .map_err(|_| Errno::Perm)?;
        let f = c.volume.meta.files.get(name).ok_or(Errno::Io)?;
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|e| e > f.size)
        {
            return Err(Errno::NoSpc);
        }
        let mut segs = segments(&self.sb, &f.map, offset, data.len());
        if segs.iter().any(|s| matches!(s, Segment::Hole { .. })) {
            for s in &segs {
                if let Segment::Hole { logical, .. } = s {
                    let ch =
                        namespace::allocate(&c.volume.meta, self.sb.extent_count, name, *logical)
                            .map_err(|e| {
                            if matches!(e, NamespaceError::NoSpace { .. }) {
                                Errno::NoSpc
                            } else {
                                Errno::Io
                            }
                        })?;
                    self.commit_change(c, ch).map_err(|_| Errno::Io)?;
                }
            }
            let f = c.volume.meta.files.get(name).ok_or(Errno::Io)?;
            segs = segments(&self.sb, &f.map, offset, data.len());
        }
        let mut done = 0;
        for s in segs {
            if let Segment::Mapped { lun_offset, len } = s {
                self.lun
                    .write_at(&data[done..done + len], lun_offset)
                    .map_err(|_| Errno::Io)?;
                done += len;
            } else {
                return Err(Errno::Io);
            }
        }
        if fua {
            self.lun.flush().map_err(|_| Errno::Io)?;
        }
        Ok(())
    }

    /// Zero `len` bytes at `offset` of `name` for the writer (`node`, `epoch`), fenced like a
    /// write: whole extents of a thin file go back to the volume (one metadata commit), the
    /// mapped parts of partial ones are overwritten with zeroes, holes stay holes.
    fn redirected_zero(
        &self,
        name: &str,
        node: NodeId,
        epoch: u64,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> Result<(), Errno> {
        let mut g = self.coordinator().map_err(|_| Errno::Shutdown)?;
        let c = g.as_mut().ok_or(Errno::Shutdown)?;
        let now = self.now_ms();
        c.leases
            .check_write(name, node, epoch, now)
            .map_err(|_| Errno::Perm)?;
        let f = c.volume.meta.files.get(name).ok_or(Errno::Io)?;
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= f.size)
            .ok_or(Errno::NoSpc)?;
        // Whole extents inside the range; the file's last extent counts as whole when the
        // range reaches the end of the file.
        let first = offset.div_ceil(EXTENT_SIZE);
        let last = if end == f.size {
            end.div_ceil(EXTENT_SIZE)
        } else {
            end / EXTENT_SIZE
        };
        if first < last {
            let ch = namespace::deallocate(&c.volume.meta, name, first, last - first)
                .map_err(|_| Errno::Io)?;
            if ch.next.seq != c.volume.meta.seq {
                self.commit_change(c, ch).map_err(|_| Errno::Io)?;
            }
        }
        let f = c.volume.meta.files.get(name).ok_or(Errno::Io)?;
        let zeroes = vec![0u8; EXTENT_SIZE as usize];
        let mut pos = offset;
        while pos < end {
            // At most one extent per step, so `len` fits a usize on any target.
            let step = (end - pos).min(EXTENT_SIZE - pos % EXTENT_SIZE) as usize;
            for s in segments(&self.sb, &f.map, pos, step) {
                if let Segment::Mapped { lun_offset, len } = s {
                    self.lun
                        .write_at(&zeroes[..len], lun_offset)
                        .map_err(|_| Errno::Io)?;
                }
            }
            pos += step as u64;
        }
        if fua {
            self.lun.flush().map_err(|_| Errno::Io)?;
        }
        Ok(())
    }

    fn redirected_read(&self, name: &str, buf: &mut [u8], offset: u64) -> Result<(), Errno> {
        let map = {
            let g = self.coordinator().map_err(|_| Errno::Shutdown)?;
            let c = g.as_ref().ok_or(Errno::Shutdown)?;
            c.volume.meta.files.get(name).ok_or(Errno::Io)?.map.clone()
        };
        read_segments(&*self.lun, &self.sb, &map, buf, offset).map_err(|_| Errno::Io)
    }

    // ---------------------------------------------------------------- node side

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

    /// Before an aborted hand-over returns the lease to its source, the destination must stop
    /// writing: ask it to (outside the coordinator lock, since it may need to flush through us).
    /// Only a pending hand-over, asked for by one of its two sides, is aborted: anything else is
    /// refused before the holder is told to stop (a confirmed hand-over's new writer keeps going).
    fn revoke_holder_for_abort(&self, name: &str, requester: NodeId) -> Result<(), ControlError> {
        let holder = {
            let g = self.coordinator()?;
            let c = g
                .as_ref()
                .ok_or_else(|| ControlError::new(ErrorKind::NotCoordinator, "not coordinator"))?;
            let rec = c.leases.record(name);
            match rec.handover_from {
                None => return Err(lease_err(LeaseError::NoHandover)),
                Some(from) if from != requester && rec.holder != Some(requester) => {
                    return Err(ControlError::new(
                        ErrorKind::Stale,
                        format!("node {requester} is not a side of the hand-over of {name:?}"),
                    ));
                }
                Some(_) => {}
            }
            c.leases.holder(name, self.now_ms())
        };
        let Some((holder, _, deadline)) = holder else {
            return Ok(());
        };
        if holder == self.cfg.node_id {
            self.stop_writing(name);
            return Ok(());
        }
        let known = lock(&self.peers).get(&holder).cloned();
        let addr = known.or_else(|| {
            lock(&self.members)
                .get(&holder)
                .and_then(|m| serde_json::from_value::<Member>(m.clone()).ok())
                .map(|m| m.addr)
        });
        let revoke = Request::Revoke { name: name.into() };
        let revoked = addr.is_some_and(|a| {
            (0..3).any(|_| {
                control::request(&a, &revoke, true, CALL_TIMEOUT)
                    .and_then(|r| Ok(r.into_revoked()?))
                    .is_ok()
            })
        });
        if revoked {
            Ok(())
        } else {
            Err(ControlError::new(
                ErrorKind::Busy,
                format!(
                    "node {holder} holds the lease and cannot be told to stop; retry after it expires in {} ms",
                    deadline.saturating_sub(self.now_ms())
                ),
            ))
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

    fn lease_action(&self, name: &str, action: LeaseAction) -> Result<Response, ControlError> {
        let epoch = match action {
            // Hand-over to us shows up as a live grant: acquiring returns it.
            LeaseAction::ConfirmHandover => {
                let st = self.call_coordinator(&Request::Stat {
                    name: name.into(),
                    map: false,
                })?;
                st.into_file()?.lease.epoch
            }
            // Not holding the lease, we present epoch 0, which no grant carries (epochs start
            // at 1): the coordinator refuses anything that needs the holder's epoch.
            _ => lock(&self.held).get(name).map_or(0, |h| h.epoch),
        };
        let sent = self.now_ms();
        let req = Request::CoordLease {
            name: name.into(),
            node: self.cfg.node_id,
            epoch,
            action,
            renew: false,
        };
        // Giving the lease away: stop our own direct writes (and make them durable) first, so
        // nothing of ours lands after the coordinator has moved the lease.
        let gives_away = matches!(action, LeaseAction::Release | LeaseAction::Handover { .. });
        let dropped = if gives_away {
            self.stop_writing(name)
        } else {
            None
        };
        let v = match self
            .call_coordinator(&req)
            .and_then(|r| Ok(r.into_lease()?))
        {
            Ok(v) => v,
            Err(e) => {
                if let Some(h) = dropped
                    && e.kind != ErrorKind::Stale
                {
                    lock(&self.held).insert(name.into(), h);
                }
                return Err(e);
            }
        };
        let mut held = lock(&self.held);
        if v.holder == Some(self.cfg.node_id) {
            held.insert(name.into(), HeldLease::from_grant(v.epoch, sent, v.ttl_ms));
        } else {
            held.remove(name);
        }
        drop(held);
        if v.holder == Some(self.cfg.node_id) {
            // Fresh map for the new writer.
            if let Some(h) = lock(&self.handles).get(name) {
                let _ = h.refresh_map(self);
            }
        }
        Ok(Response::Lease(v))
    }

    /// Renew every held lease (called periodically); drops those the coordinator refuses.
    pub fn renew_leases(&self) {
        let held: Vec<(String, HeldLease)> = lock(&self.held)
            .iter()
            .map(|(n, h)| (n.clone(), *h))
            .collect();
        for (name, h) in held {
            self.renew_one(&name, h);
        }
    }

    fn renew_one(&self, name: &str, h: HeldLease) {
        let sent = self.now_ms();
        let req = Request::CoordLease {
            name: name.to_owned(),
            node: self.cfg.node_id,
            epoch: h.epoch,
            action: LeaseAction::Acquire,
            renew: true,
        };
        match self
            .call_coordinator(&req)
            .and_then(|r| Ok(r.into_lease()?))
        {
            Ok(v) => {
                let confirmed = v.holder == Some(self.cfg.node_id) && v.epoch == h.epoch;
                let mut g = lock(&self.held);
                if confirmed && g.get(name).is_some_and(|x| x.epoch == h.epoch) {
                    g.insert(
                        name.to_owned(),
                        HeldLease::from_grant(h.epoch, sent, v.ttl_ms),
                    );
                }
            }
            Err(e) if matches!(e.kind, ErrorKind::Stale | ErrorKind::NotFound) => {
                let mut g = lock(&self.held);
                if g.get(name).is_some_and(|x| x.epoch == h.epoch) {
                    g.remove(name);
                }
            }
            Err(_) => {}
        }
    }

    /// The lease for a write: if it lapsed locally (e.g. while a new coordinator took office),
    /// try one renewal before refusing, so writers pause through a take-over instead of failing.
    /// A fenced holder's renewal is refused (stale epoch) and its lease dropped.
    fn ensure_lease(&self, name: &str) -> Option<HeldLease> {
        if let Some(h) = self.held_lease(name) {
            return Some(h);
        }
        let lapsed = lock(&self.held).get(name).copied()?;
        self.renew_one(name, lapsed);
        self.held_lease(name)
    }

    /// A file's details with its extent map, from the coordinator.
    fn stat_with_map(&self, name: &str) -> Result<FileInfo, ControlError> {
        let f = self
            .call_coordinator(&Request::Stat {
                name: name.into(),
                map: true,
            })?
            .into_file()?;
        if f.map.is_none() {
            return Err(control::ReplyError::Missing("map").into());
        }
        Ok(f)
    }

    fn held_lease(&self, name: &str) -> Option<HeldLease> {
        lock(&self.held)
            .get(name)
            .copied()
            .filter(|h| h.valid_at(self.now_ms()))
    }

    fn handle_for(self: &Arc<Self>, name: &str) -> Option<Arc<FileHandle>> {
        // Every new connection gets a fresh map; a handle of the same size is reused (its path
        // state and unflushed-write journal live on), a resized or re-created file gets a new one.
        let st = self.stat_with_map(name).ok()?;
        let map = st.map?;
        if let Some(h) = lock(&self.handles).get(name).cloned()
            && h.size == st.size
        {
            lock(&h.state).map = map;
            return Some(h);
        }
        let h = Arc::new(FileHandle {
            node: Arc::clone(self),
            name: name.to_owned(),
            size: st.size,
            preallocated: st.preallocated,
            state: Mutex::new(HandleState {
                map,
                mode: PathState::Direct,
                journal: Journal::default(),
                redirect: None,
                dirty_redirected: false,
                inflight: Arc::default(),
            }),
            logged_refusal: AtomicU64::new(0),
        });
        let old = lock(&self.handles).insert(name.to_owned(), Arc::clone(&h));
        if let Some(old) = old
            && lock(&old.state).mode == PathState::Redirected
        {
            self.redirected_files.fetch_sub(1, Ordering::SeqCst);
        }
        Some(h)
    }
}

fn read_segments(
    lun: &dyn Lun,
    sb: &Superblock,
    map: &[u32],
    buf: &mut [u8],
    offset: u64,
) -> std::io::Result<()> {
    let mut done = 0;
    for s in segments(sb, map, offset, buf.len()) {
        match s {
            Segment::Mapped { lun_offset, len } => {
                lun.read_at(&mut buf[done..done + len], lun_offset)?;
                done += len;
            }
            Segment::Hole { len, .. } => {
                buf[done..done + len].fill(0);
                done += len;
            }
        }
    }
    Ok(())
}

/// `base:allocation` runs of `len` bytes from `offset` under `map`: holes read as zeroes.
fn map_status(sb: &Superblock, map: &[u32], offset: u64, len: u32) -> Vec<StatusExtent> {
    segments(sb, map, offset, len as usize)
        .into_iter()
        .map(|s| match s {
            Segment::Mapped { len, .. } => StatusExtent {
                len: len as u64,
                hole: false,
                zero: false,
            },
            Segment::Hole { len, .. } => StatusExtent {
                len: len as u64,
                hole: true,
                zero: true,
            },
        })
        .collect()
}

/// Direct writes acknowledged since the last successful flush, in order, in one reusable arena.
#[derive(Default)]
struct Journal {
    entries: Vec<(u64, usize, usize)>,
    data: Vec<u8>,
}

impl Journal {
    fn push(&mut self, offset: u64, bytes: &[u8]) {
        self.entries.push((offset, self.data.len(), bytes.len()));
        self.data.extend_from_slice(bytes);
    }
    fn clear(&mut self) {
        self.entries.clear();
        self.data.clear();
    }
    fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    fn bytes(&self) -> usize {
        self.data.len()
    }
    fn iter(&self) -> impl Iterator<Item = (u64, &[u8])> + '_ {
        self.entries
            .iter()
            .map(|&(o, start, len)| (o, &self.data[start..start + len]))
    }
}

struct Redirect {
    /// One connection to the coordinator's export `NAME@NODE.EPOCH`, shared by every request of
    /// this file: requests from several clients (or one pipelining client) are in flight on it
    /// together.
    client: Arc<tern_nbd::SharedClient>,
    epoch: u64,
    generation: u64,
}

struct HandleState {
    map: Vec<u32>,
    mode: PathState,
    /// Direct writes since the last successful flush, for replay through the coordinator.
    journal: Journal,
    redirect: Option<Redirect>,
    dirty_redirected: bool,
    /// One clone per request in flight to the coordinator without the state lock held
    /// ([`FileHandle::with_redirect_unlocked`]); going back to direct I/O waits for them.
    inflight: Arc<()>,
}

/// A file opened on a node: the NBD backend local clients see.
///
/// Besides reads and writes it frees and zeroes ranges (NBD TRIM and WRITE_ZEROES, which is how
/// `qemu-img`, `nbdcopy` and a VM's volume disk give space back: whole 1 MiB extents of a thin file
/// return to the volume, partial ones are zeroed) and reports `base:allocation` block status.
pub struct FileHandle {
    node: Arc<Node>,
    name: String,
    size: u64,
    /// Preallocated files keep their extents: zeroing them writes every byte.
    preallocated: bool,
    state: Mutex<HandleState>,
    /// The errno of the last refused write that was logged (0: none since the last success), so
    /// a client retrying a refused write does not flood the node's log.
    logged_refusal: AtomicU64,
}

impl std::fmt::Debug for FileHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileHandle")
            .field("name", &self.name)
            .field("size", &self.size)
            .finish()
    }
}

impl FileHandle {
    fn refresh_map(&self, node: &Node) -> Result<(), Errno> {
        let map = node
            .stat_with_map(&self.name)
            .ok()
            .and_then(|f| f.map)
            .ok_or(Errno::Io)?;
        lock(&self.state).map = map;
        Ok(())
    }

    fn use_direct(&self, st: &mut HandleState) -> Result<bool, Errno> {
        let node = &self.node;
        let ok = node.path_ok.load(Ordering::SeqCst);
        if st.mode == PathState::Redirected && ok {
            // Coming back: every request sent through the coordinator must have landed (none
            // may overtake a later direct write) and be durable first. Requests in flight need
            // no lock to finish, and each gives up within CALL_TIMEOUT.
            while Arc::strong_count(&st.inflight) > 1 {
                std::thread::sleep(Duration::from_millis(1));
            }
            if let Some(r) = st.redirect.as_ref() {
                r.client.flush().map_err(|_| Errno::Io)?;
            }
            st.redirect = None;
            st.dirty_redirected = false;
            st.mode = PathState::Direct;
            node.redirected_files.fetch_sub(1, Ordering::SeqCst);
        }
        Ok(st.mode == PathState::Direct && ok)
    }

    fn go_redirected(&self, st: &mut HandleState) {
        if st.mode == PathState::Direct {
            st.mode = PathState::Redirected;
            self.node.redirected_files.fetch_add(1, Ordering::SeqCst);
        }
        self.node.path_ok.store(false, Ordering::SeqCst);
    }

    fn redirect<'a>(
        &self,
        st: &'a mut HandleState,
        epoch: u64,
    ) -> Result<&'a Arc<tern_nbd::SharedClient>, Errno> {
        let leader = self.node.leader().ok_or(Errno::Shutdown)?;
        let stale = st
            .redirect
            .as_ref()
            .is_none_or(|r| r.epoch != epoch || r.generation != leader.generation);
        if stale {
            let export = format!("{}@{}.{}", self.name, self.node.cfg.node_id, epoch);
            let client =
                tern_nbd::SharedClient::connect_timeout(&leader.addr, &export, CALL_TIMEOUT)
                    .map_err(|_| Errno::Io)?;
            st.redirect = Some(Redirect {
                client: Arc::new(client),
                epoch,
                generation: leader.generation,
            });
        }
        st.redirect.as_ref().map(|r| &r.client).ok_or(Errno::Io)
    }

    /// Run `f` against the coordinator with the state lock held (journal replay, flush, zeroing:
    /// nothing else of this file starts meanwhile), reconnecting through a coordinator change.
    /// Writes are idempotent (same bytes, same place, nothing later sent yet), so a retry never
    /// reorders.
    fn with_redirect<T>(
        &self,
        st: &mut HandleState,
        epoch: u64,
        mut f: impl FnMut(&tern_nbd::SharedClient) -> Result<T, tern_nbd::ClientError>,
    ) -> Result<T, Errno> {
        let start = Instant::now();
        loop {
            let res = match self.redirect(st, epoch) {
                Ok(c) => f(c),
                Err(e) => Err(tern_nbd::ClientError::Remote(e)),
            };
            match res {
                Ok(v) => return Ok(v),
                Err(tern_nbd::ClientError::Remote(Errno::Perm)) => return Err(Errno::Perm),
                Err(tern_nbd::ClientError::Remote(Errno::NoSpc)) => return Err(Errno::NoSpc),
                Err(_) if start.elapsed() < COORDINATOR_WAIT => {
                    st.redirect = None;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(_) => return Err(Errno::Io),
            }
        }
    }

    /// Run one read or write against the coordinator *without* the state lock: the lock is
    /// released once the connection is chosen, so requests of this file are in flight together
    /// (each NBD reply is matched by cookie). A failed request retries on a new connection
    /// within COORDINATOR_WAIT, as [`FileHandle::with_redirect`] does; it was never acknowledged,
    /// so every request that overlaps it was sent while it was in flight, and NBD gives such
    /// requests no order. Journal replay happens under the lock before the first of these.
    fn with_redirect_unlocked<'s, T>(
        &'s self,
        mut st: MutexGuard<'s, HandleState>,
        epoch: u64,
        mut f: impl FnMut(&tern_nbd::SharedClient) -> Result<T, tern_nbd::ClientError>,
    ) -> Result<T, Errno> {
        let start = Instant::now();
        loop {
            let client = self.redirect(&mut st, epoch).map(Arc::clone);
            let token = Arc::clone(&st.inflight);
            drop(st);
            let res = match &client {
                Ok(c) => f(c),
                Err(e) => Err(tern_nbd::ClientError::Remote(*e)),
            };
            drop(token);
            match res {
                Ok(v) => return Ok(v),
                Err(tern_nbd::ClientError::Remote(Errno::Perm)) => return Err(Errno::Perm),
                Err(tern_nbd::ClientError::Remote(Errno::NoSpc)) => return Err(Errno::NoSpc),
                Err(_) if start.elapsed() < COORDINATOR_WAIT => {
                    std::thread::sleep(Duration::from_millis(100));
                    st = lock(&self.state);
                    // Drop the connection that failed (another request may have replaced it).
                    if let Ok(c) = &client
                        && st
                            .redirect
                            .as_ref()
                            .is_some_and(|r| Arc::ptr_eq(c, &r.client))
                    {
                        st.redirect = None;
                    }
                }
                Err(_) => return Err(Errno::Io),
            }
        }
    }

    fn replay_journal(&self, st: &mut HandleState, epoch: u64) -> Result<(), Errno> {
        let mut journal = std::mem::take(&mut st.journal);
        for (off, data) in journal.iter() {
            self.with_redirect(st, epoch, |c| c.write(off, data, false))?;
        }
        st.dirty_redirected |= !journal.is_empty();
        // Keep the buffers (no page faults on the next run of direct writes).
        journal.clear();
        st.journal = journal;
        Ok(())
    }

    fn direct_write(
        &self,
        st: &mut HandleState,
        data: &[u8],
        offset: u64,
    ) -> Result<(), DirectFail> {
        let node = &self.node;
        let mut segs = segments(&node.sb, &st.map, offset, data.len());
        for s in segs.clone() {
            if let Segment::Hole { logical, .. } = s {
                let v = node
                    .call_coordinator(&Request::Allocate {
                        name: self.name.clone(),
                        logical,
                    })
                    .and_then(|r| Ok(r.into_file()?.into_map()?))
                    .map_err(|e| {
                        DirectFail::Refused(if e.kind == ErrorKind::NoSpace {
                            Errno::NoSpc
                        } else {
                            Errno::Io
                        })
                    })?;
                st.map = v;
                segs = segments(&node.sb, &st.map, offset, data.len());
            }
        }
        let mut done = 0;
        for s in segs {
            let Segment::Mapped { lun_offset, len } = s else {
                return Err(DirectFail::Refused(Errno::Io));
            };
            // Fencing on the direct path: the lease must still be ours right before the write.
            if node.held_lease(&self.name).is_none() {
                return Err(DirectFail::Refused(Errno::Perm));
            }
            node.lun
                .write_at(&data[done..done + len], lun_offset)
                .map_err(|_| DirectFail::Path)?;
            done += len;
        }
        Ok(())
    }
}

impl FileHandle {
    /// Log a refused write or zeroing once per cause (until a write succeeds again).
    fn refused(&self, what: &str, offset: u64, e: Errno) -> Errno {
        let code = u64::from(e.code());
        if self.logged_refusal.swap(code, Ordering::Relaxed) != code {
            let why = match e {
                Errno::Perm => format!(
                    "node {} holds no valid write lease (take it with `tern volume lease acquire {} --node {}`), or it was fenced",
                    self.node.cfg.node_id, self.name, self.node.cfg.listen
                ),
                Errno::NoSpc => "no free extent left on the volume (thin files over-commit it; \
                                 free space with TRIM or `tern volume rm`)"
                    .to_owned(),
                e => e.to_string(),
            };
            eprintln!(
                "tern volume: node {}: {what} of {} at offset {offset} refused ({e}): {why}",
                self.node.cfg.node_id, self.name
            );
        }
        e
    }

    fn accepted(&self) {
        if self.logged_refusal.load(Ordering::Relaxed) != 0 {
            self.logged_refusal.store(0, Ordering::Relaxed);
        }
    }

    /// Zero `len` bytes at `offset`, freeing whole extents of a thin file (the work behind NBD
    /// TRIM and WRITE_ZEROES). Needs the write lease, like a write. Earlier writes are flushed
    /// first (so a journal replay can never bring them back over the zeroes), the coordinator
    /// frees and zeroes under its lease check, and this node's map is refreshed before the reply.
    ///
    /// A local direct-I/O client (a VM's volume disk) does the same by sending NBD TRIM or
    /// WRITE_ZEROES on its connection to this node, and must refresh its own extent map before
    /// its next direct write: the freed extents may already belong to another file.
    pub fn zero_range(&self, offset: u64, len: u32, fua: bool) -> Result<(), Errno> {
        let node = &self.node;
        let held = node
            .ensure_lease(&self.name)
            .ok_or_else(|| self.refused("zeroing", offset, Errno::Perm))?;
        let mut st = lock(&self.state);
        self.flush_locked(&mut st, held.epoch)?;
        let res = if node.is_coordinator() {
            node.redirected_zero(
                &self.name,
                node.cfg.node_id,
                held.epoch,
                offset,
                u64::from(len),
                fua,
            )
        } else {
            self.with_redirect(&mut st, held.epoch, |c| c.write_zeroes(offset, len, fua))
        };
        // Whatever happened, the coordinator's map is the truth from here on.
        st.map = node
            .stat_with_map(&self.name)
            .ok()
            .and_then(|f| f.map)
            .ok_or(Errno::Io)?;
        res.map_err(|e| self.refused("zeroing", offset, e))?;
        self.accepted();
        Ok(())
    }

    fn flush_locked(&self, st: &mut HandleState, epoch: u64) -> Result<(), Errno> {
        let node = &self.node;
        if self.use_direct(st)? {
            if node.lun.flush().is_ok() {
                st.journal.clear();
                return Ok(());
            }
            self.go_redirected(st);
        }
        if !st.journal.is_empty() {
            self.replay_journal(st, epoch)?;
        }
        self.with_redirect(st, epoch, |c| c.flush())?;
        st.dirty_redirected = false;
        Ok(())
    }
}

enum DirectFail {
    Path,
    Refused(Errno),
}

impl Backend for FileHandle {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Errno> {
        let node = &self.node;
        let mut st = lock(&self.state);
        if self.use_direct(&mut st)? {
            if segments(&node.sb, &st.map, offset, buf.len())
                .iter()
                .any(|s| matches!(s, Segment::Hole { .. }))
            {
                // Another node may have allocated since we cached the map.
                drop(st);
                let _ = self.refresh_map(node);
                st = lock(&self.state);
            }
            match read_segments(&*node.lun, &node.sb, &st.map, buf, offset) {
                Ok(()) => return Ok(()),
                Err(_) => self.go_redirected(&mut st),
            }
        }
        let epoch = node.held_lease(&self.name).map_or(0, |h| h.epoch);
        self.with_redirect_unlocked(st, epoch, |c| c.read(offset, buf))
    }

    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), Errno> {
        let res = self.write_inner(data, offset, fua);
        match res {
            Ok(()) => self.accepted(),
            Err(e @ (Errno::Perm | Errno::NoSpc)) => return Err(self.refused("write", offset, e)),
            Err(_) => {}
        }
        res
    }

    fn flush(&self) -> Result<(), Errno> {
        let epoch = self
            .node
            .held_lease(&self.name)
            .map(|h| h.epoch)
            .unwrap_or(0);
        let mut st = lock(&self.state);
        self.flush_locked(&mut st, epoch)
    }

    fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> Result<(), Errno> {
        if flags.no_hole || self.preallocated {
            // Every byte is written (the range stays allocated): not faster than a write.
            if flags.fast {
                return Err(Errno::NotSup);
            }
            return write_zero_buffers(self, offset, len, flags.fua);
        }
        self.zero_range(offset, len, flags.fua)
    }

    fn trim(&self, offset: u64, len: u32) -> Result<(), Errno> {
        self.zero_range(offset, len, false)
    }

    fn block_status(&self, offset: u64, len: u32) -> Result<Vec<StatusExtent>, Errno> {
        let node = &self.node;
        let has_hole = {
            let st = lock(&self.state);
            segments(&node.sb, &st.map, offset, len as usize)
                .iter()
                .any(|s| matches!(s, Segment::Hole { .. }))
        };
        if has_hole {
            // Another node may have allocated since we cached the map.
            let _ = self.refresh_map(node);
        }
        let st = lock(&self.state);
        Ok(map_status(&node.sb, &st.map, offset, len))
    }
}

/// WRITE_ZEROES with `NO_HOLE` (or on a preallocated file): real zero writes, 1 MiB at a time.
fn write_zero_buffers(b: &dyn Backend, offset: u64, len: u32, fua: bool) -> Result<(), Errno> {
    let zeroes = vec![0u8; (len as usize).min(EXTENT_SIZE as usize)];
    let mut done = 0u64;
    while done < u64::from(len) {
        let n = (u64::from(len) - done).min(zeroes.len() as u64) as usize;
        b.write_at(&zeroes[..n], offset + done, false)?;
        done += n as u64;
    }
    if fua { b.flush() } else { Ok(()) }
}

impl FileHandle {
    fn write_inner(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), Errno> {
        let node = &self.node;
        let held = node.ensure_lease(&self.name).ok_or(Errno::Perm)?;
        let mut st = lock(&self.state);
        if self.use_direct(&mut st)? {
            match self.direct_write(&mut st, data, offset) {
                Ok(()) => {
                    if fua {
                        match node.lun.flush() {
                            Ok(()) => {
                                st.journal.clear();
                                return Ok(());
                            }
                            Err(_) => {
                                st.journal.push(offset, data);
                                self.go_redirected(&mut st);
                            }
                        }
                    } else {
                        st.journal.push(offset, data);
                        if st.journal.bytes() > JOURNAL_MAX_BYTES {
                            if node.lun.flush().is_ok() {
                                st.journal.clear();
                            } else {
                                self.go_redirected(&mut st);
                                self.replay_journal(&mut st, held.epoch)?;
                            }
                        }
                        return Ok(());
                    }
                }
                Err(DirectFail::Refused(e)) => return Err(e),
                Err(DirectFail::Path) => {
                    st.journal.push(offset, data);
                    self.go_redirected(&mut st);
                }
            }
            // The path failed: replay everything not yet known durable, this write included.
            self.replay_journal(&mut st, held.epoch)?;
            if fua {
                self.with_redirect(&mut st, held.epoch, |c| c.flush())?;
                st.dirty_redirected = false;
            }
            return Ok(());
        }
        if !st.journal.is_empty() {
            self.replay_journal(&mut st, held.epoch)?;
        }
        st.dirty_redirected = true;
        self.with_redirect_unlocked(st, held.epoch, |c| c.write(offset, data, fua))
    }
}

/// The coordinator's side of a redirected export `NAME@NODE.EPOCH`.
struct RedirectTarget {
    node: Arc<Node>,
    name: String,
    writer: NodeId,
    epoch: u64,
    size: u64,
}

impl Backend for RedirectTarget {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Errno> {
        self.node.redirected_read(&self.name, buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), Errno> {
        self.node
            .redirected_write(&self.name, self.writer, self.epoch, data, offset, fua)
    }
    fn flush(&self) -> Result<(), Errno> {
        drop(self.node.coordinator().map_err(|_| Errno::Shutdown)?);
        self.node.lun.flush().map_err(|_| Errno::Io)
    }
    fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> Result<(), Errno> {
        if flags.no_hole {
            if flags.fast {
                return Err(Errno::NotSup);
            }
            return write_zero_buffers(self, offset, len, flags.fua);
        }
        let len = u64::from(len);
        let n = &self.node;
        n.redirected_zero(&self.name, self.writer, self.epoch, offset, len, flags.fua)
    }
    fn trim(&self, offset: u64, len: u32) -> Result<(), Errno> {
        let len = u64::from(len);
        let n = &self.node;
        n.redirected_zero(&self.name, self.writer, self.epoch, offset, len, false)
    }
    fn block_status(&self, offset: u64, len: u32) -> Result<Vec<StatusExtent>, Errno> {
        let g = self.node.coordinator().map_err(|_| Errno::Shutdown)?;
        let c = g.as_ref().ok_or(Errno::Shutdown)?;
        let f = c.volume.meta.files.get(&self.name).ok_or(Errno::Io)?;
        Ok(map_status(&self.node.sb, &f.map, offset, len))
    }
}

/// The node as a set of NBD exports plus the control protocol.
#[derive(Debug, Clone)]
pub struct NodeExports(pub Arc<Node>);

impl Exports for NodeExports {
    fn list(&self) -> Vec<String> {
        // NBD_OPT_LIST has no error path of its own: an unreachable coordinator lists nothing.
        match self
            .0
            .call_coordinator(&Request::List)
            .map(Response::into_files)
        {
            Ok(Ok(l)) => l.files.into_iter().map(|f| f.name).collect(),
            _ => Vec::new(),
        }
    }

    fn open(&self, name: &str) -> Option<Arc<dyn Backend>> {
        let node = &self.0;
        if let Some((file, who)) = name.split_once('@') {
            let (writer, epoch) = who.split_once('.')?;
            let writer: NodeId = writer.parse().ok()?;
            let epoch: u64 = epoch.parse().ok()?;
            let g = node.coordinator().ok()?;
            let size = g.as_ref()?.volume.meta.files.get(file)?.size;
            drop(g);
            return Some(Arc::new(RedirectTarget {
                node: Arc::clone(node),
                name: file.to_owned(),
                writer,
                epoch,
                size,
            }));
        }
        node.handle_for(name).map(|h| h as Arc<dyn Backend>)
    }

    fn control(&self, request: &[u8]) -> Option<Vec<u8>> {
        let res = serde_json::from_slice::<Envelope>(request)
            .map_err(|e| {
                ControlError::new(
                    ErrorKind::Invalid,
                    format!("malformed control request: {e}"),
                )
            })
            .and_then(|env| self.0.handle(env));
        serde_json::to_vec(&Reply::from_result(res)).ok()
    }
}
