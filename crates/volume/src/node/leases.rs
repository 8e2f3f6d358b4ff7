//! The write leases this node holds: taking, giving away and handing them over through the
//! coordinator, renewing them, and the check before every write.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::client::claim_path;
use crate::control::{ControlError, ErrorKind, LeaseAction, Request, Response};
use crate::lease::HeldLease;

use super::{Node, lock};

impl Node {
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

    pub(super) fn lease_action(
        &self,
        name: &str,
        action: LeaseAction,
    ) -> Result<Response, ControlError> {
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
    ///
    /// A lease whose VM disk is gone is released instead: a writable volume disk on this host
    /// holds the claim `flock` on [`claim_path`]`(listen, FILE)` for as long as its process
    /// lives, and removes the file on a clean close. A claim file that exists but is no longer
    /// locked therefore means the VMM died (the kernel dropped its lock) without releasing; the
    /// node takes the claim, releases the lease (so another node may take it at once), and
    /// removes the file while still holding the lock, as a clean close would. Leases without a
    /// claim file (taken with `tern volume lease acquire`) are renewed as before. A lease in
    /// hand-over is not in this table on the source (the coordinator already names the
    /// successor), so a migration is never disturbed by this.
    pub fn renew_leases(&self) {
        let held: Vec<(String, HeldLease)> = lock(&self.held)
            .iter()
            .map(|(n, h)| (n.clone(), *h))
            .collect();
        for (name, h) in held {
            if let Some(claim) = orphaned_claim(&claim_path(&self.cfg.listen, &name)) {
                self.release_orphaned(&name, claim);
                continue;
            }
            self.renew_one(&name, h);
        }
    }

    /// Releases `name`, whose claim holder died; on success the claim file goes too. On failure
    /// (coordinator unreachable) the lease is simply not renewed, so it lapses within one TTL,
    /// and the next tick tries again.
    fn release_orphaned(&self, name: &str, claim: OrphanedClaim) {
        match self.lease_action(name, LeaseAction::Release) {
            Ok(_) => {
                eprintln!(
                    "tern-volume: node {}: the VM writing {name} is gone (its claim {} is free): \
                     write lease released",
                    self.cfg.node_id,
                    claim.path.display()
                );
                // Unlink first, unlock after (when `claim` is dropped): see `client::Claim`.
                let _ = std::fs::remove_file(&claim.path);
            }
            Err(e) if e.kind == ErrorKind::Stale => {
                let _ = std::fs::remove_file(&claim.path);
            }
            Err(e) => eprintln!(
                "tern-volume: node {}: the VM writing {name} is gone, but releasing its lease \
                 failed ({e}); it is no longer renewed",
                self.cfg.node_id
            ),
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
    pub(super) fn ensure_lease(&self, name: &str) -> Option<HeldLease> {
        if let Some(h) = self.held_lease(name) {
            return Some(h);
        }
        let lapsed = lock(&self.held).get(name).copied()?;
        self.renew_one(name, lapsed);
        self.held_lease(name)
    }

    pub(super) fn held_lease(&self, name: &str) -> Option<HeldLease> {
        lock(&self.held)
            .get(name)
            .copied()
            .filter(|h| h.valid_at(self.now_ms()))
    }
}

/// A dead VM disk's claim, now locked by the node (the lock goes when this is dropped).
struct OrphanedClaim {
    _file: File,
    path: PathBuf,
}

/// The claim at `path` if its file exists and nobody holds its lock: locked now by us, after
/// checking that the path still names the file we locked (a clean close unlinks it while
/// holding the lock). `None` when there is no claim file, or a live process holds it.
fn orphaned_claim(path: &Path) -> Option<OrphanedClaim> {
    // Open without creating: no file means no VM disk took (or still has) the claim.
    let file = std::fs::OpenOptions::new().write(true).open(path).ok()?;
    file.try_lock().ok()?;
    let locked = file.metadata().ok()?;
    let now = std::fs::metadata(path).ok()?;
    ((now.dev(), now.ino()) == (locked.dev(), locked.ino())).then(|| OrphanedClaim {
        _file: file,
        path: path.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_unlocked_existing_claim_file_is_orphaned() {
        let dir = std::env::temp_dir().join(format!("tern-orphan-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.lock");
        let _ = std::fs::remove_file(&path);
        assert!(orphaned_claim(&path).is_none(), "no file, no orphan");
        assert!(!path.exists(), "the check must not create the claim file");
        let live = File::create(&path).unwrap();
        live.lock().unwrap();
        assert!(
            orphaned_claim(&path).is_none(),
            "a held claim is not orphaned"
        );
        drop(live); // The holder dies: the kernel drops its lock, the file stays.
        let orphan = orphaned_claim(&path).expect("a free claim file is orphaned");
        // While we hold it, nobody else can take it.
        let other = File::open(&path).unwrap();
        assert!(other.try_lock().is_err());
        drop(orphan);
        assert!(other.try_lock().is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
