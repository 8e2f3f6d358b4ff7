//! The write leases this node holds: taking, giving away and handing them over through the
//! coordinator, renewing them, and the check before every write.

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
