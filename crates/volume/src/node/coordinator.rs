//! The coordinator role: taking office under a generation, every metadata change (create,
//! remove, resize, allocate) and the lease table (grants, hand-overs, fencing a node), each
//! committed under the coordinator lock while the etcd session lasts.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::sync::MutexGuard;
use std::sync::atomic::Ordering;

use crate::control::{
    self, ControlError, ErrorKind, Fenced, FileInfo, FileList, LeaseAction, LeaseGrant, LeaseInfo,
    Member, Removed, Request, Response,
};
use crate::format::{EXTENT_SIZE, FileEntry, HOLE, LeaseRecord, Metadata, NodeId};
use crate::lease::{LeaseError, LeaseOp, LeaseTable, LeaseTimings};
use crate::namespace::{self, NamespaceError};
use crate::store::Volume;

use super::{CALL_TIMEOUT, LeaderInfo, Node, failed, lease_err, lock, ns_err};

/// The coordinator's state: the volume's metadata and the lease table, under one mutex.
pub(super) struct Coordinator {
    generation: u64,
    pub(super) volume: Volume,
    pub(super) leases: LeaseTable,
    /// Files whose hand-over is being aborted: the destination is being told to stop, and may
    /// not re-acquire or renew meanwhile.
    aborting: std::collections::BTreeSet<String>,
    /// Free extents being zeroed outside the lock for a change not yet committed
    /// ([`Node::change_zeroing_outside`]): no other change may take them meanwhile.
    pub(super) zeroing: BTreeSet<u32>,
}

/// The name of the stand-in file that holds the extents being zeroed in the metadata *views*
/// changes are computed on ([`reserved_view`]); never committed (NUL is no valid file name).
const RESERVED: &str = "\0zeroing";

/// `meta` as a change must see it: with the extents in `reserved` taken (by a stand-in file).
pub(super) fn reserved_view<'a>(meta: &'a Metadata, reserved: &BTreeSet<u32>) -> Cow<'a, Metadata> {
    if reserved.is_empty() {
        return Cow::Borrowed(meta);
    }
    let mut m = meta.clone();
    m.files.insert(
        RESERVED.to_owned(),
        FileEntry {
            size: reserved.len() as u64 * EXTENT_SIZE,
            preallocated: true,
            map: reserved.iter().copied().collect(),
            lease: LeaseRecord::default(),
        },
    );
    Cow::Owned(m)
}

/// A change computed on a [`reserved_view`], without the stand-in.
pub(super) fn without_reserved(mut ch: namespace::Change) -> namespace::Change {
    ch.next.files.remove(RESERVED);
    ch
}

impl Node {
    /// Extend (or, with 0, end at once) the time this node may act as coordinator.
    pub fn set_coordinator_deadline(&self, deadline_ms: u64) {
        self.coord_deadline_ms.store(deadline_ms, Ordering::SeqCst);
        if deadline_ms == 0 {
            let mut slot = lock(&self.coord);
            // As when the writes were made under the lock: the office ends after them.
            self.redirected_in_flight.wait_idle();
            *slot = None;
        }
    }

    /// Become coordinator with `generation`: load the metadata and lease table, then commit once
    /// under the new generation so any older coordinator is fenced on disk. The commit is fenced
    /// as every other one (`deadline_ms`, the commit watchdog), and is made under the
    /// coordinator lock, so a write of this node's previous term still in progress ends first.
    /// (`cluster.rs` calls this only the commit watchdog's margin after the election, when a
    /// predecessor stalled mid-write has been killed.)
    pub fn become_coordinator(
        &self,
        generation: u64,
        deadline_ms: u64,
    ) -> Result<(), ControlError> {
        self.become_coordinator_elected_at(generation, deadline_ms, self.now_ms())
    }

    /// [`Node::become_coordinator`] for a node that won the election at `elected_ms` (this
    /// node's clock) and waited since. The leases held at the take-over are counted from the
    /// election, not from now: the predecessor renewed none after its own session deadline,
    /// which passed before the election, so each ends by `elected_ms` + TTL at the latest, and
    /// the wait for the commit watchdog's margin need not be added to the lease's re-grant.
    pub fn become_coordinator_elected_at(
        &self,
        generation: u64,
        deadline_ms: u64,
        elected_ms: u64,
    ) -> Result<(), ControlError> {
        let mut slot = lock(&self.coord);
        // A redirected write of this node's previous term still in flight ends first.
        self.redirected_in_flight.wait_idle();
        *slot = None;
        self.coord_deadline_ms.store(deadline_ms, Ordering::SeqCst);
        let mut volume = Volume::open(&*self.lun).map_err(failed)?;
        let now = elected_ms.min(self.now_ms());
        let records: Vec<(String, LeaseRecord)> = volume
            .meta
            .files
            .iter()
            .map(|(n, f)| (n.clone(), f.lease))
            .collect();
        let leases = LeaseTable::load(
            LeaseTimings::for_ttl(self.cfg.lease_ttl_ms),
            records.iter().map(|(n, r)| (n.as_str(), *r)),
            now,
        );
        let mut next = volume.meta.clone();
        next.seq += 1;
        {
            let fence = self.write_fence();
            volume
                .commit_fenced(&*self.lun, next, generation, &|| fence.may_write())
                .map_err(commit_err)?;
        }
        *slot = Some(Coordinator {
            generation,
            volume,
            leases,
            aborting: Default::default(),
            zeroing: BTreeSet::new(),
        });
        drop(slot);
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

    pub(super) fn coordinator(&self) -> Result<MutexGuard<'_, Option<Coordinator>>, ControlError> {
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

    /// Whether this node's coordinator session still lasts (the deadline every write of the
    /// coordinator is checked against).
    fn session_alive(&self) -> bool {
        self.now_ms() < self.coord_deadline_ms.load(Ordering::SeqCst)
    }

    pub(super) fn commit_change(
        &self,
        c: &mut Coordinator,
        change: namespace::Change,
    ) -> Result<(), ControlError> {
        // Re-check the session right before touching the LUN.
        if !self.session_alive() {
            return Err(ControlError::new(
                ErrorKind::NotCoordinator,
                "coordinator session expired",
            ));
        }
        // A change that frees or moves an extent, removes a file or changes a lease waits for
        // the redirected writes in flight (none can register while we hold the lock), so none
        // lands in an extent given to another file or after its writer's right ended. A
        // change that only maps holes (an allocation, maybe by a redirected write itself,
        // which registers only after it) does not wait.
        if !only_maps_holes(&c.volume.meta, &change.next) {
            self.redirected_in_flight.wait_idle();
        }
        let generation = c.generation;
        let fence = self.write_fence();
        let alive = || fence.may_write();
        crate::store::zero_extents_fenced(&*self.lun, &self.sb, &change.zero, generation, &alive)
            .map_err(commit_err)?;
        c.volume
            .commit_fenced(&*self.lun, change.next, generation, &alive)
            .map_err(commit_err)
    }

    /// Computes a change with `compute` and commits it, zeroing the extents it maps *outside*
    /// the coordinator lock (a preallocated file of many GiB takes seconds to zero; lease
    /// renewals and other requests go on meanwhile). Under the lock, the extents to zero are
    /// reserved (other changes are computed on a view where they are taken); outside it they
    /// are zeroed, fenced per extent; back under the lock the change is computed again on the
    /// current state, and committed if everything it maps is zeroed (else the new ones are
    /// reserved and zeroed, and so on). The reservation ends with the commit or the error.
    pub(super) fn change_zeroing_outside(
        &self,
        compute: impl Fn(&Metadata) -> Result<namespace::Change, ControlError>,
    ) -> Result<(), ControlError> {
        let mut ours: BTreeSet<u32> = BTreeSet::new();
        let release = |ours: &BTreeSet<u32>| {
            if let Some(c) = lock(&self.coord).as_mut() {
                c.zeroing.retain(|e| !ours.contains(e));
            }
        };
        loop {
            let step = (|| {
                let mut g = self.coordinator()?;
                let c = g.as_mut().ok_or_else(|| {
                    ControlError::new(ErrorKind::NotCoordinator, "not coordinator")
                })?;
                let others: BTreeSet<u32> = c.zeroing.difference(&ours).copied().collect();
                let mut ch = without_reserved(compute(&reserved_view(&c.volume.meta, &others))?);
                let todo: Vec<u32> = ch
                    .zero
                    .iter()
                    .copied()
                    .filter(|e| !ours.contains(e))
                    .collect();
                if todo.is_empty() {
                    ch.zero.clear();
                    if ch.next.seq != c.volume.meta.seq {
                        self.commit_change(c, ch)?;
                    }
                    return Ok(None);
                }
                c.zeroing.extend(&todo);
                Ok(Some((todo, c.generation)))
            })();
            let (todo, generation) = match step {
                Ok(None) => {
                    release(&ours);
                    return Ok(());
                }
                Ok(Some(t)) => t,
                Err(e) => {
                    release(&ours);
                    return Err(e);
                }
            };
            ours.extend(&todo);
            let fence = self.write_fence();
            let alive = || fence.may_write();
            if let Err(e) =
                crate::store::zero_extents_fenced(&*self.lun, &self.sb, &todo, generation, &alive)
            {
                release(&ours);
                return Err(commit_err(e));
            }
        }
    }

    pub(super) fn coordinate(&self, req: &Request) -> Result<Response, ControlError> {
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
        let n = self.sb.extent_count;
        let name = match req {
            Request::Create {
                name,
                size,
                preallocated,
            } => {
                self.change_zeroing_outside(|m| {
                    namespace::create(m, n, name, *size, *preallocated).map_err(ns_err)
                })?;
                name
            }
            Request::Resize { name, size } => {
                self.change_zeroing_outside(|m| {
                    namespace::resize(m, n, name, *size).map_err(ns_err)
                })?;
                name
            }
            _ => return self.coordinate_under_lock(req),
        };
        let g = self.coordinator()?;
        let c = g
            .as_ref()
            .ok_or_else(|| ControlError::new(ErrorKind::NotCoordinator, "not coordinator"))?;
        Node::file_info(c, name, false, self.now_ms()).map(Response::File)
    }

    fn coordinate_under_lock(&self, req: &Request) -> Result<Response, ControlError> {
        let mut g = self.coordinator()?;
        let c = g
            .as_mut()
            .ok_or_else(|| ControlError::new(ErrorKind::NotCoordinator, "not coordinator"))?;
        let n = self.sb.extent_count;
        let now = self.now_ms();
        match req {
            // Committed by `change_zeroing_outside` (`coordinate_locked`), not here.
            Request::Create { .. } | Request::Resize { .. } => Err(ControlError::new(
                ErrorKind::Invalid,
                "create and resize are committed with their zeroing outside the lock",
            )),
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
            Request::Allocate { name, logical } => {
                let view = reserved_view(&c.volume.meta, &c.zeroing);
                let ch = without_reserved(
                    namespace::allocate(&view, n, name, *logical).map_err(ns_err)?,
                );
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
                // Anything but a renewal may end a writer's right (a release, a hand-over, its
                // abort or confirmation, a re-grant to another node): the redirected writes in
                // flight, checked against the lease as it was, end first.
                if !matches!(op, LeaseOp::Renew { .. }) {
                    self.redirected_in_flight.wait_idle();
                }
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
                // The fenced node's redirected writes in flight end before the fence is
                // committed and confirmed.
                self.redirected_in_flight.wait_idle();
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

    /// Before an aborted hand-over returns the lease to its source, the destination must stop
    /// writing: ask it to (outside the coordinator lock, since it may need to flush through us).
    /// Only a pending hand-over, asked for by one of its two sides, is aborted: anything else is
    /// refused before the holder is told to stop (a confirmed hand-over's new writer keeps going).
    pub(super) fn revoke_holder_for_abort(
        &self,
        name: &str,
        requester: NodeId,
    ) -> Result<(), ControlError> {
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
}

/// Whether `next` differs from `prev` only by extents mapped where `prev` had holes (and the
/// sequence number): no file removed, no lease changed, no mapped extent freed or moved.
fn only_maps_holes(prev: &Metadata, next: &Metadata) -> bool {
    prev.files.iter().all(|(name, p)| {
        next.files.get(name).is_some_and(|n| {
            n.lease == p.lease
                && p.map
                    .iter()
                    .enumerate()
                    .all(|(i, &e)| e == HOLE || n.map.get(i) == Some(&e))
        })
    })
}

/// A failed commit as a control error: a deposed or expired coordinator is `NotCoordinator`
/// (the caller retries at the new one).
fn commit_err(e: crate::store::CommitError) -> ControlError {
    use crate::store::CommitError;
    if matches!(e, CommitError::Fenced { .. } | CommitError::Expired) {
        ControlError::new(ErrorKind::NotCoordinator, e.to_string())
    } else {
        failed(e)
    }
}
