//! The coordinator role: taking office under a generation, every metadata change (create,
//! remove, resize, allocate) and the lease table (grants, hand-overs, fencing a node), each
//! committed under the coordinator lock while the etcd session lasts.

use std::sync::MutexGuard;
use std::sync::atomic::Ordering;

use crate::control::{
    self, ControlError, ErrorKind, Fenced, FileInfo, FileList, LeaseAction, LeaseGrant, LeaseInfo,
    Member, Removed, Request, Response,
};
use crate::format::{HOLE, LeaseRecord, NodeId};
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
}

impl Node {
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
            LeaseTimings::for_ttl(self.cfg.lease_ttl_ms),
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

    pub(super) fn commit_change(
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
