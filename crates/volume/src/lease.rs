//! The write-lease state machine (pure: time is an argument, no clocks, no I/O).
//!
//! One exclusive write lease per file, carrying a fencing **epoch**. Every grant bumps the epoch, so
//! a write stamped with an older epoch can always be told apart and refused.
//!
//! ```text
//!            acquire(n)                       handover(n, e, m)            abort_handover(n or m)
//!   Free ───────────────▶ Held{n, e+1} ──────────────────────────▶ Held{m, e+2, from n} ─────────▶ Held{n, e+3}
//!    ▲   release(n, e) /        │  renew(n, e) extends                 │ confirm_handover(m)
//!    └── expiry (now ≥ deadline)┘                                      ▼
//!                                                                  Held{m, e+2}
//! ```
//!
//! Hand-over is a single compare-and-swap: it succeeds only if `n` holds epoch `e`, and it installs
//! `m` in the same step, so nobody can take the lease between the source's release and the
//! destination's acquire. While the hand-over is unconfirmed the source may take it back
//! (`abort_handover`), which again bumps the epoch so the destination's writes are refused.
//!
//! Only holder, epoch and pending hand-over are persisted ([`LeaseRecord`]); deadlines live in
//! memory. A coordinator that loads the table after a take-over gives every holder one full TTL
//! from that moment to renew with it.

#![deny(clippy::disallowed_methods)]
use std::collections::BTreeMap;

use crate::format::{LeaseRecord, NodeId};

/// Lease timings in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTimings {
    /// How long a grant or renewal lasts at the coordinator.
    pub ttl_ms: u64,
    /// How long after a lease lapsed (not released) the coordinator still refuses to give it to
    /// anyone else: the holder's host watchdog kills a writer whose lease lapsed within this
    /// margin ([`WatchdogTimings`]), so a re-grant never meets a live old writer.
    pub regrant_margin_ms: u64,
}

impl LeaseTimings {
    /// The timings for a TTL, with the watchdog's margin ([`WatchdogTimings::for_ttl`]).
    pub fn for_ttl(ttl_ms: u64) -> LeaseTimings {
        LeaseTimings {
            ttl_ms,
            regrant_margin_ms: WatchdogTimings::for_ttl(ttl_ms).margin_ms,
        }
    }
}

impl Default for LeaseTimings {
    fn default() -> Self {
        LeaseTimings::for_ttl(4000)
    }
}

/// The host watchdog's timings (as sanlock's: kill the lease's users when it cannot be renewed,
/// and let the others wait long enough for the kill to have happened).
///
/// With `D` the holder node's local deadline (`request sent + TTL`, never later than the
/// coordinator's `D_c`): the watchdog looks every `tick_ms` and SIGKILLs the writer once
/// `now ≥ D + grace_ms`; the coordinator re-grants to another node only at `D_c + margin_ms`.
/// The kill is therefore done by `D + grace + tick ≤ D_c + grace + tick`, which leaves
/// `margin − grace − tick` for the kill to take effect before the earliest re-grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchdogTimings {
    /// How long after the local deadline the watchdog waits for a late renewal (a coordinator
    /// take-over, a slow reply) before it kills.
    pub grace_ms: u64,
    /// How often the watchdog looks.
    pub tick_ms: u64,
    /// How long after the coordinator's deadline a lapsed lease stays unavailable to others.
    pub margin_ms: u64,
}

impl WatchdogTimings {
    /// Grace TTL/4, tick TTL/20 (10–100 ms), margin TTL/2: at the default TTL of 4 s, the kill
    /// comes 1–1.1 s after the local deadline and the re-grant 2 s after the coordinator's.
    pub fn for_ttl(ttl_ms: u64) -> WatchdogTimings {
        WatchdogTimings {
            grace_ms: ttl_ms / 4,
            tick_ms: (ttl_ms / 20).clamp(10, 100),
            margin_ms: ttl_ms / 2,
        }
    }

    /// What the watchdog does about a writer whose lease (as its node holds it) is `held` at
    /// `now_ms`.
    pub fn verdict(&self, held: &HeldLease, now_ms: u64) -> WatchdogVerdict {
        if now_ms < held.deadline_ms.saturating_add(self.grace_ms) {
            WatchdogVerdict::Keep
        } else if now_ms < held.deadline_ms.saturating_add(self.margin_ms) {
            WatchdogVerdict::Kill
        } else {
            WatchdogVerdict::TooLate
        }
    }
}

impl WatchdogTimings {
    /// The coordinator's commit watchdog (a process of its own next to every node that may
    /// coordinate, `cluster.rs`), with these timings taken for the etcd session's TTL: before
    /// each metadata or zeroing write the coordinator checks its session deadline `D` and arms
    /// the watchdog with it; whenever a write is armed and `now ≥ D + grace`, the coordinator
    /// process is SIGKILLed. A successor writes its first metadata only `margin` after it won
    /// the election, which is after the old session's expiry `E ≥ D`: the old coordinator, if
    /// it stalled between a check and its write, is dead by `D + grace + tick < E + margin`.
    pub fn commit_watchdog_kills(&self, armed_deadline_ms: Option<u64>, now_ms: u64) -> bool {
        armed_deadline_ms.is_some_and(|d| now_ms >= d.saturating_add(self.grace_ms))
    }
}

/// The watchdog's decision for one writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchdogVerdict {
    /// The lease is valid, or lapsed less than the grace ago: leave the writer alone.
    Keep,
    /// Lapsed beyond the grace, before the earliest re-grant: SIGKILL the writer now.
    Kill,
    /// Lapsed beyond the margin: the watchdog itself was not running (its node frozen or
    /// suspended), so another node may already write; killing now is no fence any more, the
    /// writer's own deadline and the coordinator's refusal are what is left.
    TooLate,
}

/// A request to the lease table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseOp {
    /// Take the write lease (or renew it if already held by the same node).
    Acquire {
        /// Requesting node.
        node: NodeId,
    },
    /// Extend a held lease.
    Renew {
        /// Holder.
        node: NodeId,
        /// Its epoch.
        epoch: u64,
    },
    /// Give the lease up.
    Release {
        /// Holder.
        node: NodeId,
        /// Its epoch.
        epoch: u64,
    },
    /// Compare-and-swap the lease from `node` at `epoch` to `to`.
    Handover {
        /// Current holder.
        node: NodeId,
        /// Its epoch.
        epoch: u64,
        /// Successor.
        to: NodeId,
    },
    /// Give a pending hand-over back to its source (called by the source or the destination).
    AbortHandover {
        /// Caller.
        node: NodeId,
    },
    /// The destination confirms a hand-over (the source can no longer take it back).
    ConfirmHandover {
        /// The destination.
        node: NodeId,
        /// Its epoch.
        epoch: u64,
    },
}

/// Why a lease request or a write was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// Someone else holds it.
    #[error(
        "The write lease is held by node {holder} (epoch {epoch}) for another {remaining_ms} ms"
    )]
    Busy {
        /// Holder.
        holder: NodeId,
        /// Epoch.
        epoch: u64,
        /// Time left.
        remaining_ms: u64,
    },
    /// The caller's epoch is not the current one, or it is not the holder.
    #[error("Stale lease: node {node} epoch {epoch}, current holder {holder:?} epoch {current}")]
    Stale {
        /// Caller.
        node: NodeId,
        /// Caller's epoch.
        epoch: u64,
        /// Current holder.
        holder: Option<NodeId>,
        /// Current epoch.
        current: u64,
    },
    /// The lease ran out.
    #[error("The lease of node {node} (epoch {epoch}) has expired")]
    Expired {
        /// Holder.
        node: NodeId,
        /// Epoch.
        epoch: u64,
    },
    /// No hand-over is pending.
    #[error("No hand-over is pending")]
    NoHandover,
    /// Hand-over to oneself or to node 0.
    #[error("Invalid hand-over target {0}")]
    BadTarget(NodeId),
}

/// The outcome of a lease request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Holder after the request (None after a release).
    pub holder: Option<NodeId>,
    /// Epoch after the request.
    pub epoch: u64,
    /// When the lease ends at the coordinator (ms on its clock).
    pub deadline_ms: u64,
    /// Whether the persisted record changed (it must be committed before answering).
    pub persist: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Live {
    record: LeaseRecord,
    deadline_ms: u64,
    /// Before this, only `last_holder` may be granted the lease (see
    /// [`LeaseTimings::regrant_margin_ms`]); a release sets it to the release's time.
    regrant_at_ms: u64,
    /// The node that held the lease last, if it may take it again at once (not after a fence).
    last_holder: Option<NodeId>,
}

/// The coordinator's lease table.
#[derive(Debug, Clone, Default)]
pub struct LeaseTable {
    timings: LeaseTimings,
    files: BTreeMap<String, Live>,
}

impl LeaseTable {
    /// Load persisted records at time `now_ms`: every holder gets one TTL from now to renew.
    pub fn load<'a>(
        timings: LeaseTimings,
        records: impl IntoIterator<Item = (&'a str, LeaseRecord)>,
        now_ms: u64,
    ) -> Self {
        let files = records
            .into_iter()
            .map(|(n, record)| {
                (
                    n.to_owned(),
                    Live {
                        record,
                        deadline_ms: now_ms + timings.ttl_ms,
                        regrant_at_ms: match record.holder {
                            Some(_) => now_ms + timings.ttl_ms + timings.regrant_margin_ms,
                            None => 0,
                        },
                        last_holder: record.holder,
                    },
                )
            })
            .collect();
        LeaseTable { timings, files }
    }

    /// The persisted record of a file (default if unknown).
    pub fn record(&self, name: &str) -> LeaseRecord {
        self.files.get(name).map(|l| l.record).unwrap_or_default()
    }

    /// Holder and deadline, if the lease is live at `now_ms`.
    pub fn holder(&self, name: &str, now_ms: u64) -> Option<(NodeId, u64, u64)> {
        let l = self.files.get(name)?;
        let h = l.record.holder?;
        (now_ms < l.deadline_ms).then_some((h, l.record.epoch, l.deadline_ms))
    }

    /// Forget a deleted file.
    pub fn remove(&mut self, name: &str) {
        self.files.remove(name);
    }

    /// Apply `op` to `name` at `now_ms`. On error nothing changes.
    pub fn apply(&mut self, name: &str, op: LeaseOp, now_ms: u64) -> Result<Grant, LeaseError> {
        let ttl = self.timings.ttl_ms;
        let l = self.files.get(name).copied().unwrap_or_default();
        let live_holder = l.record.holder.filter(|_| now_ms < l.deadline_ms);
        let cur = l.record.epoch;
        let stale = |node, epoch| LeaseError::Stale {
            node,
            epoch,
            holder: l.record.holder,
            current: cur,
        };
        let check_holder = |node: NodeId, epoch: u64| -> Result<(), LeaseError> {
            if l.record.holder != Some(node) || epoch != cur {
                return Err(stale(node, epoch));
            }
            if live_holder.is_none() {
                return Err(LeaseError::Expired { node, epoch });
            }
            Ok(())
        };
        let (record, deadline, persist) = match op {
            LeaseOp::Acquire { node } => match live_holder {
                Some(h) if h == node => (l.record, now_ms + ttl, false),
                Some(h) => {
                    return Err(LeaseError::Busy {
                        holder: h,
                        epoch: cur,
                        remaining_ms: l.regrant_at_ms.max(l.deadline_ms) - now_ms,
                    });
                }
                // Lapsed, not released: its writer may be alive until its watchdog killed it.
                None if now_ms < l.regrant_at_ms && l.last_holder != Some(node) => {
                    return Err(LeaseError::Busy {
                        holder: l.record.holder.or(l.last_holder).unwrap_or(0),
                        epoch: cur,
                        remaining_ms: l.regrant_at_ms - now_ms,
                    });
                }
                None => (
                    LeaseRecord {
                        epoch: cur + 1,
                        holder: Some(node),
                        handover_from: None,
                    },
                    now_ms + ttl,
                    true,
                ),
            },
            LeaseOp::Renew { node, epoch } => {
                check_holder(node, epoch)?;
                (l.record, now_ms + ttl, false)
            }
            LeaseOp::Release { node, epoch } => {
                check_holder(node, epoch)?;
                (
                    LeaseRecord {
                        epoch: cur,
                        holder: None,
                        handover_from: None,
                    },
                    now_ms,
                    true,
                )
            }
            LeaseOp::Handover { node, epoch, to } => {
                if to == 0 || to == node {
                    return Err(LeaseError::BadTarget(to));
                }
                check_holder(node, epoch)?;
                (
                    LeaseRecord {
                        epoch: cur + 1,
                        holder: Some(to),
                        handover_from: Some(node),
                    },
                    now_ms + ttl,
                    true,
                )
            }
            LeaseOp::AbortHandover { node } => {
                let from = l.record.handover_from.ok_or(LeaseError::NoHandover)?;
                if node != from && Some(node) != l.record.holder {
                    return Err(stale(node, cur));
                }
                (
                    LeaseRecord {
                        epoch: cur + 1,
                        holder: Some(from),
                        handover_from: None,
                    },
                    now_ms + ttl,
                    true,
                )
            }
            LeaseOp::ConfirmHandover { node, epoch } => {
                check_holder(node, epoch)?;
                if l.record.handover_from.is_none() {
                    return Err(LeaseError::NoHandover);
                }
                (
                    LeaseRecord {
                        handover_from: None,
                        ..l.record
                    },
                    l.deadline_ms,
                    true,
                )
            }
        };
        let released = matches!(op, LeaseOp::Release { .. });
        self.files.insert(
            name.to_owned(),
            Live {
                record,
                deadline_ms: deadline,
                regrant_at_ms: if released {
                    now_ms
                } else {
                    deadline + self.timings.regrant_margin_ms
                },
                last_holder: record.holder.or(l.last_holder),
            },
        );
        Ok(Grant {
            holder: record.holder,
            epoch: record.epoch,
            deadline_ms: deadline,
            persist,
        })
    }

    /// Takes every write lease `node` holds away from it now (live or lapsed): the epoch is bumped
    /// and the lease left free, so any write or renewal stamped with the old epoch is refused. A
    /// pending hand-over from `node` is settled for its destination (the source cannot take it
    /// back). Returns the files whose record changed, in name order, with whether `node` held
    /// the lease (`true`) or was only a hand-over's source; each changed record must be persisted
    /// before the caller answers.
    pub fn fence_node(&mut self, node: NodeId, now_ms: u64) -> Vec<(String, bool)> {
        let mut changed = Vec::new();
        for (name, l) in &mut self.files {
            if l.record.holder == Some(node) {
                l.record = LeaseRecord {
                    epoch: l.record.epoch + 1,
                    holder: None,
                    handover_from: None,
                };
                // Free at once for writes (refused from now), but not re-granted before the
                // fenced holder's watchdog has had its margin.
                l.regrant_at_ms = l
                    .regrant_at_ms
                    .max(l.deadline_ms + self.timings.regrant_margin_ms);
                l.deadline_ms = now_ms;
                l.last_holder = None;
                changed.push((name.clone(), true));
            } else if l.record.handover_from == Some(node) {
                l.record.handover_from = None;
                changed.push((name.clone(), false));
            }
        }
        changed
    }

    /// May `node` write with `epoch` at `now_ms`? (The redirected path asks this for every write.)
    pub fn check_write(
        &self,
        name: &str,
        node: NodeId,
        epoch: u64,
        now_ms: u64,
    ) -> Result<(), LeaseError> {
        let l = self.files.get(name).copied().unwrap_or_default();
        if l.record.holder != Some(node) || l.record.epoch != epoch {
            return Err(LeaseError::Stale {
                node,
                epoch,
                holder: l.record.holder,
                current: l.record.epoch,
            });
        }
        if now_ms >= l.deadline_ms {
            return Err(LeaseError::Expired { node, epoch });
        }
        Ok(())
    }
}

/// A node's own view of a lease it holds: it stops writing at `deadline_ms` on *its* clock, which
/// it started before sending the request, so it always stops before the coordinator re-grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldLease {
    /// Epoch to stamp on writes.
    pub epoch: u64,
    /// Local deadline (ms on the node's clock).
    pub deadline_ms: u64,
}

impl HeldLease {
    /// From a grant, where `sent_ms` is when the node sent the request (its clock).
    pub fn from_grant(epoch: u64, sent_ms: u64, ttl_ms: u64) -> HeldLease {
        HeldLease {
            epoch,
            deadline_ms: sent_ms + ttl_ms,
        }
    }
    /// Whether the node may still write at `now_ms`.
    pub fn valid_at(&self, now_ms: u64) -> bool {
        now_ms < self.deadline_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TTL: u64 = 1000;

    fn table() -> LeaseTable {
        LeaseTable {
            timings: LeaseTimings {
                ttl_ms: TTL,
                regrant_margin_ms: 0,
            },
            files: BTreeMap::new(),
        }
    }

    #[test]
    fn acquire_is_exclusive_until_expiry_then_regrant_bumps_epoch() {
        let mut t = table();
        let g = t.apply("f", LeaseOp::Acquire { node: 1 }, 0).unwrap();
        assert_eq!((g.holder, g.epoch, g.persist), (Some(1), 1, true));
        assert!(matches!(
            t.apply("f", LeaseOp::Acquire { node: 2 }, 999),
            Err(LeaseError::Busy { holder: 1, .. })
        ));
        let g = t.apply("f", LeaseOp::Acquire { node: 2 }, 1000).unwrap();
        assert_eq!((g.holder, g.epoch), (Some(2), 2));
        assert!(matches!(
            t.check_write("f", 1, 1, 1001),
            Err(LeaseError::Stale { .. })
        ));
        assert!(matches!(
            t.apply("f", LeaseOp::Renew { node: 1, epoch: 1 }, 1001),
            Err(LeaseError::Stale { .. })
        ));
    }

    fn table_with_margin(margin: u64) -> LeaseTable {
        LeaseTable {
            timings: LeaseTimings {
                ttl_ms: TTL,
                regrant_margin_ms: margin,
            },
            files: BTreeMap::new(),
        }
    }

    #[test]
    fn a_lapsed_lease_goes_to_another_node_only_after_the_watchdog_margin() {
        let mut t = table_with_margin(500);
        t.apply("f", LeaseOp::Acquire { node: 1 }, 0).unwrap();
        t.apply("f", LeaseOp::Renew { node: 1, epoch: 1 }, 200)
            .unwrap();
        // Lapsed at 1200 (no writes, no renewals), but not given away before 1700.
        assert_eq!(t.holder("f", 1200), None);
        assert!(t.check_write("f", 1, 1, 1200).is_err());
        match t.apply("f", LeaseOp::Acquire { node: 2 }, 1699) {
            Err(LeaseError::Busy {
                holder: 1,
                remaining_ms: 1,
                ..
            }) => {}
            other => panic!("re-granted inside the watchdog margin: {other:?}"),
        }
        let g = t.apply("f", LeaseOp::Acquire { node: 2 }, 1700).unwrap();
        assert_eq!((g.holder, g.epoch), (Some(2), 2));
        // Its own last holder may take a lapsed lease back at once (its old writer is the one
        // it replaces on the same host), above the old epoch.
        let g = t.apply("f", LeaseOp::Acquire { node: 2 }, 2700).unwrap();
        assert_eq!((g.holder, g.epoch), (Some(2), 3));
        // A release frees it for everybody at once.
        t.apply("f", LeaseOp::Release { node: 2, epoch: 3 }, 2800)
            .unwrap();
        let g = t.apply("f", LeaseOp::Acquire { node: 3 }, 2800).unwrap();
        assert_eq!((g.holder, g.epoch), (Some(3), 4));
    }

    #[test]
    fn a_fenced_lease_waits_for_the_fenced_holders_deadline_and_margin() {
        let mut t = table_with_margin(500);
        t.apply("f", LeaseOp::Acquire { node: 1 }, 0).unwrap();
        assert_eq!(t.fence_node(1, 100), vec![("f".to_string(), true)]);
        // Writes and renewals of node 1 are refused at once...
        assert!(t.check_write("f", 1, 1, 100).is_err());
        assert!(
            t.apply("f", LeaseOp::Renew { node: 1, epoch: 1 }, 100)
                .is_err()
        );
        // ...but its lease ran to 1000 on the coordinator's clock: nobody (node 1 included)
        // gets it before 1500.
        for n in [1, 2] {
            assert!(matches!(
                t.apply("f", LeaseOp::Acquire { node: n }, 1499),
                Err(LeaseError::Busy { .. })
            ));
        }
        let g = t.apply("f", LeaseOp::Acquire { node: 2 }, 1500).unwrap();
        assert_eq!((g.holder, g.epoch), (Some(2), 3));
    }

    #[test]
    fn a_new_coordinator_waits_a_ttl_and_the_margin_before_giving_a_held_lease_away() {
        let rec = LeaseRecord {
            epoch: 7,
            holder: Some(1),
            handover_from: None,
        };
        let mut t = LeaseTable::load(
            LeaseTimings {
                ttl_ms: TTL,
                regrant_margin_ms: 500,
            },
            [("f", rec)],
            10_000,
        );
        assert!(t.apply("f", LeaseOp::Acquire { node: 2 }, 11_499).is_err());
        assert_eq!(
            t.apply("f", LeaseOp::Acquire { node: 2 }, 11_500)
                .unwrap()
                .epoch,
            8
        );
    }

    #[test]
    fn the_watchdog_kills_between_grace_and_margin_only() {
        let w = WatchdogTimings::for_ttl(4000);
        assert_eq!((w.grace_ms, w.tick_ms, w.margin_ms), (1000, 100, 2000));
        let h = HeldLease::from_grant(3, 500, 4000);
        assert_eq!(w.verdict(&h, 4499), WatchdogVerdict::Keep);
        assert_eq!(w.verdict(&h, 5499), WatchdogVerdict::Keep);
        assert_eq!(w.verdict(&h, 5500), WatchdogVerdict::Kill);
        assert_eq!(w.verdict(&h, 6499), WatchdogVerdict::Kill);
        assert_eq!(w.verdict(&h, 6500), WatchdogVerdict::TooLate);
        let small = WatchdogTimings::for_ttl(100);
        assert_eq!(small.tick_ms, 10);
        assert!(small.grace_ms + small.tick_ms < small.margin_ms);
    }

    #[test]
    fn fencing_a_node_bumps_its_epochs_and_refuses_its_late_writes() {
        let mut t = table();
        t.apply("a", LeaseOp::Acquire { node: 2 }, 0).unwrap();
        t.apply("b", LeaseOp::Acquire { node: 3 }, 0).unwrap();
        t.apply("c", LeaseOp::Acquire { node: 2 }, 0).unwrap();
        // c moves from 2 to 3, unconfirmed: 2 could take it back until fenced.
        t.apply(
            "c",
            LeaseOp::Handover {
                node: 2,
                epoch: 1,
                to: 3,
            },
            10,
        )
        .unwrap();
        let fenced = t.fence_node(2, 20);
        assert_eq!(
            fenced,
            vec![("a".to_string(), true), ("c".to_string(), false)]
        );
        // a: free at a higher epoch; the old epoch can neither write nor renew.
        assert_eq!(t.record("a").epoch, 2);
        assert_eq!(t.holder("a", 20), None);
        assert!(matches!(
            t.check_write("a", 2, 1, 21),
            Err(LeaseError::Stale { .. })
        ));
        assert!(
            t.apply("a", LeaseOp::Renew { node: 2, epoch: 1 }, 21)
                .is_err()
        );
        // Someone else takes it once the fenced holder's own deadline (1000) and the margin
        // (0 here) are over, above the fenced epoch.
        assert!(t.apply("a", LeaseOp::Acquire { node: 3 }, 999).is_err());
        let g = t.apply("a", LeaseOp::Acquire { node: 3 }, 1000).unwrap();
        assert_eq!((g.holder, g.epoch), (Some(3), 3));
        // b is untouched; c stays with its destination, and the source cannot abort any more.
        assert_eq!(t.holder("b", 20).map(|h| h.0), Some(3));
        assert_eq!(t.record("c").holder, Some(3));
        assert_eq!(
            t.apply("c", LeaseOp::AbortHandover { node: 2 }, 23),
            Err(LeaseError::NoHandover)
        );
        assert!(t.fence_node(2, 30).is_empty());
    }

    #[test]
    fn handover_is_one_step_and_abort_returns_the_lease_to_the_source() {
        let mut t = table();
        t.apply("f", LeaseOp::Acquire { node: 1 }, 0).unwrap();
        let g = t
            .apply(
                "f",
                LeaseOp::Handover {
                    node: 1,
                    epoch: 1,
                    to: 2,
                },
                10,
            )
            .unwrap();
        assert_eq!((g.holder, g.epoch), (Some(2), 2));
        // A third node cannot slip in, and the source's old epoch is dead.
        assert!(matches!(
            t.apply("f", LeaseOp::Acquire { node: 3 }, 11),
            Err(LeaseError::Busy { holder: 2, .. })
        ));
        assert!(t.check_write("f", 1, 1, 12).is_err());
        t.check_write("f", 2, 2, 12).unwrap();
        let g = t
            .apply("f", LeaseOp::AbortHandover { node: 1 }, 20)
            .unwrap();
        assert_eq!((g.holder, g.epoch), (Some(1), 3));
        assert!(t.check_write("f", 2, 2, 21).is_err());
        assert_eq!(
            t.apply("f", LeaseOp::AbortHandover { node: 1 }, 22),
            Err(LeaseError::NoHandover)
        );
        // Hand-over with a stale epoch fails and changes nothing.
        assert!(
            t.apply(
                "f",
                LeaseOp::Handover {
                    node: 1,
                    epoch: 1,
                    to: 3
                },
                23
            )
            .is_err()
        );
        assert_eq!(t.record("f").holder, Some(1));
    }

    #[test]
    fn loaded_table_gives_holders_one_ttl_and_regrants_above_persisted_epoch() {
        let rec = LeaseRecord {
            epoch: 41,
            holder: Some(3),
            handover_from: None,
        };
        let mut t = LeaseTable::load(LeaseTimings::for_ttl(TTL), [("f", rec)], 5000);
        t.apply("f", LeaseOp::Renew { node: 3, epoch: 41 }, 5500)
            .unwrap();
        // Lapsed at 6500; another node gets it after the watchdog margin (TTL/2).
        assert!(t.apply("f", LeaseOp::Acquire { node: 1 }, 6500).is_err());
        let g = t.apply("f", LeaseOp::Acquire { node: 1 }, 7000).unwrap();
        assert_eq!(g.epoch, 42);
    }

    #[derive(Debug, Clone)]
    enum Step {
        Advance(u64),
        Op(LeaseOp),
        /// A node tries to write with the epoch it last got.
        Write(NodeId),
    }

    fn step() -> impl Strategy<Value = Step> {
        let node = 1u32..5;
        prop_oneof![
            (0u64..700).prop_map(Step::Advance),
            node.clone()
                .prop_map(|node| Step::Op(LeaseOp::Acquire { node })),
            (node.clone(), 0u64..12)
                .prop_map(|(node, epoch)| Step::Op(LeaseOp::Renew { node, epoch })),
            (node.clone(), 0u64..12)
                .prop_map(|(node, epoch)| Step::Op(LeaseOp::Release { node, epoch })),
            (node.clone(), 0u64..12, node.clone())
                .prop_map(|(node, epoch, to)| Step::Op(LeaseOp::Handover { node, epoch, to })),
            node.clone()
                .prop_map(|node| Step::Op(LeaseOp::AbortHandover { node })),
            (node.clone(), 0u64..12)
                .prop_map(|(node, epoch)| Step::Op(LeaseOp::ConfirmHandover { node, epoch })),
            node.prop_map(Step::Write),
        ]
    }

    proptest! {
        /// Under a fake clock and any interleaving: at most one (node, epoch) may write at any
        /// instant; epochs only grow; once a newer epoch was granted, no older one writes again;
        /// refused requests change nothing.
        #[test]
        fn at_most_one_writer_and_stale_epochs_never_write(steps in proptest::collection::vec(step(), 1..80)) {
            let mut t = table();
            let mut now = 0u64;
            let mut max_granted = 0u64;
            let mut last_epoch: BTreeMap<NodeId, u64> = BTreeMap::new();
            for s in steps {
                match s {
                    Step::Advance(d) => now += d,
                    Step::Op(op) => {
                        let before = t.clone();
                        match t.apply("f", op, now) {
                            Ok(g) => {
                                prop_assert!(g.epoch >= max_granted, "epoch went backwards");
                                if g.epoch > max_granted {
                                    prop_assert!(g.persist, "a new epoch must be persisted");
                                }
                                max_granted = g.epoch;
                                if let Some(h) = g.holder {
                                    last_epoch.insert(h, g.epoch);
                                }
                            }
                            Err(_) => prop_assert_eq!(before.files, t.files.clone()),
                        }
                    }
                    Step::Write(n) => {
                        let e = last_epoch.get(&n).copied().unwrap_or(0);
                        if t.check_write("f", n, e, now).is_ok() {
                            prop_assert_eq!(e, max_granted, "only the newest epoch writes");
                        }
                    }
                }
                let writers: Vec<_> = (1u32..5)
                    .filter(|&n| (0..=max_granted).any(|e| t.check_write("f", n, e, now).is_ok()))
                    .collect();
                prop_assert!(writers.len() <= 1, "two writers at t={}: {:?}", now, writers);
            }
        }

        /// A node that respects its own deadline (started when it sent the request) never writes
        /// after the coordinator could have re-granted the lease.
        #[test]
        fn holder_deadline_precedes_coordinator_deadline(sent in 0u64..10_000, delay in 0u64..500) {
            let mut t = table();
            let g = t.apply("f", LeaseOp::Acquire { node: 1 }, sent + delay).unwrap();
            let held = HeldLease::from_grant(g.epoch, sent, TTL);
            prop_assert!(held.deadline_ms <= g.deadline_ms);
            let last_local_write = held.deadline_ms.saturating_sub(1).max(sent + delay);
            let other = t.apply("f", LeaseOp::Acquire { node: 2 }, last_local_write);
            prop_assert!(other.is_err(), "re-granted while the holder may still write");
        }
    }

    proptest! {
        /// The timing argument of the watchdog: for any TTL and any delays of the renewal on
        /// its way to the coordinator, a watchdog that ticks on time kills the lapsed writer
        /// (at its first tick at or after `D + grace`) strictly before the coordinator gives
        /// the lease to another node, with room left for the kill to take effect.
        #[test]
        fn the_watchdog_kills_before_any_regrant(
            ttl in 200u64..60_000,
            sent in 0u64..100_000,
            delay in 0u64..5_000,
            phase in 0u64..100,
        ) {
            let w = WatchdogTimings::for_ttl(ttl);
            let mut t = LeaseTable {
                timings: LeaseTimings::for_ttl(ttl),
                files: BTreeMap::new(),
            };
            let g = t.apply("f", LeaseOp::Acquire { node: 1 }, sent + delay).unwrap();
            let held = HeldLease::from_grant(g.epoch, sent, ttl);
            // The first tick at or after D + grace (ticks at phase + k * tick).
            let due = held.deadline_ms + w.grace_ms;
            let phase = phase % w.tick_ms;
            let k = due.saturating_sub(phase).div_ceil(w.tick_ms);
            let kill_at = phase + k * w.tick_ms;
            prop_assert_eq!(w.verdict(&held, kill_at), WatchdogVerdict::Kill);
            // The earliest re-grant to another node.
            let regrant = g.deadline_ms + w.margin_ms;
            let other = LeaseOp::Acquire { node: 2 };
            prop_assert!(t.clone().apply("f", other, regrant - 1).is_err());
            prop_assert!(t.apply("f", other, regrant).is_ok());
            prop_assert!(regrant >= kill_at + (w.margin_ms - w.grace_ms - w.tick_ms));
        }
    }

    proptest! {
        /// The timing argument of the commit watchdog: a coordinator that checked its session
        /// deadline `D` (never later than etcd's expiry `E` of the session) and stalled before
        /// its write is killed, by a watchdog ticking on time, before its successor (elected
        /// at `W ≥ E`, writing from `W + margin`) writes anything; a write not yet past
        /// `D + grace`, or not armed, is left alone.
        #[test]
        fn the_commit_watchdog_kills_before_the_successor_writes(
            ttl in 1_000u64..60_000,
            d in 0u64..100_000,
            expiry_after_d in 0u64..5_000,
            elected_after_expiry in 0u64..5_000,
            phase in 0u64..100,
        ) {
            let w = WatchdogTimings::for_ttl(ttl);
            let due = d + w.grace_ms;
            let phase = phase % w.tick_ms;
            let k = due.saturating_sub(phase).div_ceil(w.tick_ms);
            let kill_at = phase + k * w.tick_ms;
            prop_assert!(w.commit_watchdog_kills(Some(d), kill_at));
            prop_assert!(!w.commit_watchdog_kills(Some(d), due - 1));
            prop_assert!(!w.commit_watchdog_kills(None, kill_at + ttl));
            let successor_writes = d + expiry_after_d + elected_after_expiry + w.margin_ms;
            prop_assert!(successor_writes >= kill_at + (w.margin_ms - w.grace_ms - w.tick_ms));
            prop_assert!(w.margin_ms > w.grace_ms + w.tick_ms);
        }
    }
}
