//! The write leases this node holds: taking, giving away and handing them over through the
//! coordinator, renewing them, and the check before every write.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::client::claim_path;
use crate::control::{ControlError, ErrorKind, LeaseAction, Request, Response};
use crate::lease::{HeldLease, WatchdogTimings, WatchdogVerdict};

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
    ///
    /// A lease whose claim a live process holds is not renewed here: that VM disk renews it
    /// itself through this node every TTL/4 ([`Node::lease_action`]), so the lease lapses when
    /// the VMM stops renewing (frozen, hung), and [`Node::watchdog_tick`] kills it.
    pub fn renew_leases(&self) {
        let held: Vec<(String, HeldLease)> = lock(&self.held)
            .iter()
            .map(|(n, h)| (n.clone(), *h))
            .collect();
        for (name, h) in held {
            let claim = claim_path(&self.cfg.listen, &name);
            if let Some(claim) = orphaned_claim(&claim) {
                self.release_orphaned(&name, claim);
                continue;
            }
            if claim_holder(&claim).is_some() {
                continue;
            }
            self.renew_one(&name, h);
        }
    }

    /// The host watchdog, run every [`WatchdogTimings::tick_ms`]: every VM disk on this host
    /// (a process holding the claim of a lease this node holds) whose lease lapsed more than the
    /// grace ago without a renewal is killed with SIGKILL, which also ends a frozen (SIGSTOPped)
    /// process without letting it run again, so a write it had checked but not yet issued never
    /// lands. The coordinator gives a lapsed lease to another node only after its own deadline
    /// plus the margin, by which time the kill is done (the timing argument is in
    /// `docs/volume.md`). A lapse found only after the margin (this node was itself frozen or
    /// suspended) is too late to be a fence: it is logged and the process left to the deadline
    /// checks. Acts once per lapse; returns the pids it killed.
    pub fn watchdog_tick(&self) -> Vec<u32> {
        let w = WatchdogTimings::for_ttl(self.cfg.lease_ttl_ms);
        let held = lock(&self.held);
        let now = self.now_ms();
        let mut killed = Vec::new();
        let mut done = lock(&self.watchdog_done);
        for (name, h) in held.iter() {
            let verdict = w.verdict(h, now);
            if verdict == WatchdogVerdict::Keep || done.get(name) == Some(&h.deadline_ms) {
                continue;
            }
            let claim = claim_path(&self.cfg.listen, name);
            let Some(pid) = claim_holder(&claim) else {
                continue;
            };
            done.insert(name.clone(), h.deadline_ms);
            let late = now - h.deadline_ms;
            let id = self.cfg.node_id;
            if verdict == WatchdogVerdict::TooLate {
                eprintln!(
                    "tern-volume: node {id}: watchdog: the write lease of {name} (epoch {}) \
                     lapsed {late} ms ago while this node was not running (frozen or \
                     suspended), past the {} ms margin: too late to fence pid {pid} by killing \
                     it; its writes are refused by their deadline and epoch",
                    h.epoch, w.margin_ms
                );
                continue;
            }
            if pid == std::process::id() {
                eprintln!(
                    "tern-volume: node {id}: watchdog: the write lease of {name} lapsed, but \
                     its writer is this very process ({pid}): not killed"
                );
                continue;
            }
            let sent = rustix::process::Pid::from_raw(pid as i32)
                .map(|p| rustix::process::kill_process(p, rustix::process::Signal::KILL));
            match sent {
                Some(Ok(())) => {
                    eprintln!(
                        "tern-volume: node {id}: watchdog: the write lease of {name} (epoch {}) \
                         lapsed {late} ms ago without renewal: killed its writer, pid {pid} \
                         (SIGKILL)",
                        h.epoch
                    );
                    killed.push(pid);
                }
                other => eprintln!(
                    "tern-volume: node {id}: watchdog: killing pid {pid}, the writer of {name} \
                     whose lease lapsed, failed: {other:?}"
                ),
            }
        }
        done.retain(|n, _| held.contains_key(n));
        killed
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

/// The pid of the process holding the claim `flock` on `path` (from `/proc/locks`), if any.
fn claim_holder(path: &Path) -> Option<u32> {
    let md = std::fs::metadata(path).ok()?;
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    flock_holder(&locks, md.dev(), md.ino())
}

/// In the text of `/proc/locks`, the pid holding a `FLOCK` on the file `(dev, ino)`. Lines look
/// like `3: FLOCK  ADVISORY  WRITE 4242 fe:00:1234 0 EOF` (device as hex major:minor); waiters
/// (`3: -> FLOCK ...`) are not holders.
fn flock_holder(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    let key = format!(
        "{:02x}:{:02x}:{ino}",
        rustix::fs::major(dev),
        rustix::fs::minor(dev)
    );
    locks.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&key.as_str()))
            .then(|| f.get(4)?.parse().ok())
            .flatten()
    })
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
    fn the_holder_of_a_claim_is_found_in_proc_locks() {
        let text = "1: POSIX  ADVISORY  WRITE 77 fe:00:99 0 EOF\n\
                    2: FLOCK  ADVISORY  WRITE 4242 fe:00:1234 0 EOF\n\
                    2: -> FLOCK  ADVISORY  WRITE 4343 fe:00:1234 0 EOF\n\
                    3: FLOCK  ADVISORY  WRITE 5151 00:1a:1234 0 EOF\n";
        let fe00 = rustix::fs::makedev(0xfe, 0);
        assert_eq!(flock_holder(text, fe00, 1234), Some(4242));
        assert_eq!(
            flock_holder(text, rustix::fs::makedev(0, 0x1a), 1234),
            Some(5151)
        );
        assert_eq!(
            flock_holder(text, fe00, 99),
            None,
            "a POSIX lock is not a claim"
        );
        assert_eq!(flock_holder(text, fe00, 5), None);
        // And on this host: a lock we take is found with our pid, and gone when dropped.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.lock");
        let f = File::create(&path).unwrap();
        assert_eq!(claim_holder(&path), None);
        f.lock().unwrap();
        assert_eq!(claim_holder(&path), Some(std::process::id()));
        drop(f);
        assert_eq!(claim_holder(&path), None);
    }

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
