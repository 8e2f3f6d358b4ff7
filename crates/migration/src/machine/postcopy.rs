//! Post-copy (`tern vm migrate --post-copy-after N`): every decision of the phase after the
//! switch, with no clock, socket, thread or file.
//!
//! After `N` pre-copy rounds the source pauses, sends the VM state and the list of pages still
//! owed (dirty since they were last sent), and the target resumes the guest at once without
//! them. A guest (or device) access to an owed page faults on the target; the target asks the
//! source for a window of pages around it on the demand stream, while the source pushes the
//! rest in the background. What is decided here:
//!
//! | question | answer |
//! |---|---|
//! | when to switch | [`switch_due`]: once `N` rounds were sent and acknowledged, unless pre-copy converged first (then it ends as a normal pre-copy migration) |
//! | which pages are owed | the stop-and-copy set at the pause ([`owed_runs`] puts it on the wire) |
//! | what a target fault means | [`TargetPages::fault`]: a request for the window around it, a zero page (never owed and never written here), or wait for a request in flight |
//! | what the source sends next | [`SourcePages::request`] (demand, first) and [`SourcePages::next_push`] (background) |
//! | when it is over | [`TargetPages::complete`] (every owed page placed) → `PostCopyDone`; [`SourcePages::done`] accepts it only with every owed page counted |
//! | what a failure does | [`ending`]: after the switch the guest's memory is split across both hosts, so neither side can go on alone — the target stops the guest, the source stays paused, outcome `failed_post_copy` |

#![deny(clippy::disallowed_methods)]

use crate::config::MemoryLayout;
use crate::machine::pages::PageSet;
use crate::machine::policy::ConvergenceConfig;
use crate::report::Outcome;

/// Pages one demand fault asks for: the aligned window around the faulting page (64 KiB), so
/// a guest walking through memory needs one round trip per window, not per page.
pub const PREFETCH_PAGES: u64 = 16;

/// Pages the source pushes per frame in the background (small, so a demand request waits
/// behind little push data on the target's side).
pub const PUSH_BATCH_PAGES: usize = 32;

/// The range `--post-copy-after` accepts.
pub const AFTER_ROUNDS_RANGE: std::ops::RangeInclusive<u32> = 1..=1000;

/// An option out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PostCopyOptionError {
    /// `--post-copy-after` outside [`AFTER_ROUNDS_RANGE`].
    #[error(
        "--post-copy-after {0} is out of range: give the pre-copy rounds before the switch, 1..=1000"
    )]
    AfterRounds(u32),
}

/// Checks `--post-copy-after N`.
pub fn check_after_rounds(n: u32) -> Result<(), PostCopyOptionError> {
    if AFTER_ROUNDS_RANGE.contains(&n) {
        Ok(())
    } else {
        Err(PostCopyOptionError::AfterRounds(n))
    }
}

/// Whether the source switches to post-copy at the sync that ended pre-copy round
/// `round_ended` (0 = the full copy): once `after_rounds` rounds were sent. Asked before the
/// pre-copy decision, so a switch never applies a throttle first.
pub fn switch_due(after_rounds: u32, round_ended: u32) -> bool {
    round_ended.saturating_add(1) >= after_rounds
}

/// The convergence policy of the rounds before a post-copy switch: the same, without the
/// throttle — post-copy, not a starved guest, is how such a migration finishes, so the guest
/// keeps its full speed before the switch (and its dirty pages are owed after it).
pub fn pre_copy_convergence(
    cfg: &ConvergenceConfig,
    post_copy_after: Option<u32>,
) -> ConvergenceConfig {
    match post_copy_after {
        Some(_) => ConvergenceConfig {
            throttle_max_pct: 0.0,
            ..cfg.clone()
        },
        None => cfg.clone(),
    }
}

/// The owed set as wire runs `(first page index, pages)`, ascending.
pub fn owed_runs(owed: &PageSet) -> Vec<(u64, u32)> {
    let mut runs: Vec<(u64, u32)> = Vec::new();
    for p in owed.iter() {
        match runs.last_mut() {
            Some((first, n)) if *first + u64::from(*n) == p && *n < u32::MAX => *n += 1,
            _ => runs.push((p, 1)),
        }
    }
    runs
}

/// The owed set from wire runs (already checked by the decoder to lie inside the layout; a run
/// that reaches past `total_pages` anyway is cut there, never a panic).
pub fn owed_from_runs(total_pages: u64, runs: &[(u64, u32)]) -> PageSet {
    let mut set = PageSet::empty(total_pages);
    for &(first, n) in runs {
        for p in first..first.saturating_add(u64::from(n)).min(total_pages) {
            set.insert(p);
        }
    }
    set
}

/// The owed runs as guest-physical byte ranges `(gpa, len)`, split at region ends: what the
/// target's memory drops (so a stale copy from an earlier round is never read) and then serves
/// through faults.
pub fn owed_ranges(layout: &MemoryLayout, owed: &PageSet) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for p in owed.iter() {
        let Some(gpa) = layout.page_addr(p) else {
            continue;
        };
        match out.last_mut() {
            Some((start, len)) if *start + *len == gpa => *len += crate::PAGE_SIZE,
            _ => out.push((gpa, crate::PAGE_SIZE)),
        }
    }
    out
}

/// What the target does about a fault on a missing page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAnswer {
    /// Ask the source for pages `first..first + pages` (it sends the owed ones among them).
    Request {
        /// First page index.
        first: u64,
        /// Pages.
        pages: u32,
    },
    /// Never owed and never written here: the page is zero; place a zero page.
    Zero,
    /// A request covering it is in flight: the fault waits for the page.
    Wait,
    /// It arrived after the fault was queued: already placed (wake the waiter, if any).
    Present,
}

/// What a page that arrived on the target means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// An owed page arrived the first time: place it.
    Place,
    /// An owed page that is already placed (pushed and demanded both): nothing to do.
    Duplicate,
}

/// A post-copy frame the protocol does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PostCopyViolation {
    /// A page that was never owed.
    #[error("the source sent page {0} during post-copy, which was not owed")]
    NotOwed(u64),
    /// A page index outside the layout.
    #[error("page index {0} is outside the memory layout")]
    OutsideLayout(u64),
    /// The target said it is done while pages are still owed, or with another count.
    #[error("the target reported {reported} pages placed, {owed} were owed")]
    DoneCount {
        /// What the target said.
        reported: u64,
        /// What the source owed.
        owed: u64,
    },
}

/// The target's view of the owed pages: which arrived, which are asked for.
#[derive(Debug, Clone)]
pub struct TargetPages {
    owed: PageSet,
    missing: PageSet,
    requested: PageSet,
    placed: u64,
    demand_faults: u64,
    max_fault_us: u64,
}

impl TargetPages {
    /// The owed pages of a migration with `total_pages` pages, as the `PostCopy` frame listed.
    pub fn new(total_pages: u64, runs: &[(u64, u32)]) -> Self {
        let owed = owed_from_runs(total_pages, runs);
        Self {
            missing: owed.clone(),
            requested: PageSet::empty(total_pages),
            owed,
            placed: 0,
            demand_faults: 0,
            max_fault_us: 0,
        }
    }

    /// Pages owed in all.
    pub fn owed(&self) -> u64 {
        self.owed.len()
    }

    /// Owed pages still missing.
    pub fn missing(&self) -> u64 {
        self.missing.len()
    }

    /// A fault on page `page` (a guest or device access to a missing page).
    pub fn fault(&mut self, page: u64) -> FaultAnswer {
        if page >= self.owed.universe() || !self.owed.contains(page) {
            return FaultAnswer::Zero;
        }
        if !self.missing.contains(page) {
            return FaultAnswer::Present;
        }
        if self.requested.contains(page) {
            return FaultAnswer::Wait;
        }
        self.demand_faults += 1;
        let first = page - page % PREFETCH_PAGES;
        let end = (first + PREFETCH_PAGES).min(self.owed.universe());
        for p in first..end {
            if self.missing.contains(p) {
                self.requested.insert(p);
            }
        }
        FaultAnswer::Request {
            first,
            pages: (end - first) as u32,
        }
    }

    /// Page `page` arrived (pushed or demanded).
    pub fn arrived(&mut self, page: u64) -> Result<Arrival, PostCopyViolation> {
        if page >= self.owed.universe() {
            return Err(PostCopyViolation::OutsideLayout(page));
        }
        if !self.owed.contains(page) {
            return Err(PostCopyViolation::NotOwed(page));
        }
        if self.missing.remove(page) {
            self.placed += 1;
            Ok(Arrival::Place)
        } else {
            Ok(Arrival::Duplicate)
        }
    }

    /// A demand fault was resolved after `us` µs (fault read → its page placed).
    pub fn fault_served(&mut self, us: u64) {
        self.max_fault_us = self.max_fault_us.max(us);
    }

    /// Whether a page is still missing (a fault on it waits).
    pub fn is_missing(&self, page: u64) -> bool {
        page < self.missing.universe() && self.missing.contains(page)
    }

    /// Every owed page was placed: the target sends `PostCopyDone` and the migration is over.
    pub fn complete(&self) -> bool {
        self.missing.is_empty()
    }

    /// The `PostCopyDone` frame's figures: pages placed, demand faults, longest wait (µs).
    pub fn done_figures(&self) -> (u64, u64, u64) {
        (self.placed, self.demand_faults, self.max_fault_us)
    }
}

/// The source's view: what is still to send, demand first.
#[derive(Debug, Clone)]
pub struct SourcePages {
    owed: PageSet,
    unsent: PageSet,
    cursor: u64,
    demanded: u64,
    pushed: u64,
    done: Option<(u64, u64)>,
}

impl SourcePages {
    /// The owed set at the pause.
    pub fn new(owed: PageSet) -> Self {
        Self {
            unsent: owed.clone(),
            owed,
            cursor: 0,
            demanded: 0,
            pushed: 0,
            done: None,
        }
    }

    /// A request for pages `first..first + pages`: the owed pages among them, to send now on
    /// the demand stream (even if the push already sent one: it may still be queued behind
    /// other pushed pages, and the guest waits for it). They leave the push queue.
    pub fn request(&mut self, first: u64, pages: u32) -> Result<Vec<u64>, PostCopyViolation> {
        let end = first.saturating_add(u64::from(pages));
        if end > self.owed.universe() {
            return Err(PostCopyViolation::OutsideLayout(end.saturating_sub(1)));
        }
        let out: Vec<u64> = (first..end).filter(|&p| self.owed.contains(p)).collect();
        for &p in &out {
            self.unsent.remove(p);
        }
        self.demanded += out.len() as u64;
        Ok(out)
    }

    /// The next pages to push in the background (at most `max`), ascending from where the
    /// push left off; empty once every owed page went out one way or the other.
    pub fn next_push(&mut self, max: usize) -> Vec<u64> {
        let mut out = Vec::with_capacity(max);
        while out.len() < max {
            let Some(p) = self.unsent.next_from(self.cursor) else {
                break;
            };
            self.unsent.remove(p);
            self.cursor = p + 1;
            out.push(p);
        }
        self.pushed += out.len() as u64;
        out
    }

    /// Whether every owed page was sent (pushed or demanded).
    pub fn all_sent(&self) -> bool {
        self.unsent.is_empty()
    }

    /// The target's `PostCopyDone`: accepted only with every owed page placed.
    pub fn done(
        &mut self,
        pages: u64,
        demand_faults: u64,
        max_fault_us: u64,
    ) -> Result<(), PostCopyViolation> {
        if pages != self.owed.len() {
            return Err(PostCopyViolation::DoneCount {
                reported: pages,
                owed: self.owed.len(),
            });
        }
        self.done = Some((demand_faults, max_fault_us));
        Ok(())
    }

    /// The migration is complete: the target placed every owed page and said so.
    pub fn complete(&self) -> bool {
        self.done.is_some()
    }

    /// Pages owed at the switch.
    pub fn owed(&self) -> u64 {
        self.owed.len()
    }

    /// Figures for the report: pages sent on demand, pages pushed, the target's demand
    /// faults and its longest wait (µs; 0 until it reported).
    pub fn figures(&self) -> (u64, u64, u64, u64) {
        let (faults, max_us) = self.done.unwrap_or((0, 0));
        (self.demanded, self.pushed, faults, max_us)
    }
}

/// How the post-copy phase ended, as either shell saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostCopyEnd {
    /// Every owed page placed and `PostCopyDone` delivered.
    Completed,
    /// A stream broke, timed out or carried garbage; or the other side said it failed.
    LinkLost,
    /// An owed page did not match the memory digest (`--verify-memory`).
    VerifyMismatch,
    /// The target's VM side failed (placing a page, reading a fault).
    TargetError,
    /// The source could not read a page it owes.
    SourceError,
}

/// What each side does once post-copy ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PostCopyCleanup {
    /// The target stops the guest (it cannot run without the missing pages).
    pub target_stops_guest: bool,
    /// The source resumes its copy: never after the switch (the target ran the guest, so the
    /// source's memory and devices are stale; its disks and network moved on).
    pub source_resumes: bool,
    /// The source's outcome.
    pub outcome: Outcome,
}

/// The failure rule of post-copy: after the switch only a complete transfer ends well; any
/// failure loses the VM on both sides (as in QEMU's post-copy), reported as its own outcome,
/// never as "in doubt" and never with two running copies.
pub fn ending(end: PostCopyEnd) -> PostCopyCleanup {
    match end {
        PostCopyEnd::Completed => PostCopyCleanup {
            target_stops_guest: false,
            source_resumes: false,
            outcome: Outcome::Completed,
        },
        PostCopyEnd::LinkLost
        | PostCopyEnd::VerifyMismatch
        | PostCopyEnd::TargetError
        | PostCopyEnd::SourceError => PostCopyCleanup {
            target_stops_guest: true,
            source_resumes: false,
            outcome: Outcome::FailedPostCopy,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{PAGE_SIZE, Region};

    fn set(total: u64, pages: &[u64]) -> PageSet {
        let mut s = PageSet::empty(total);
        for &p in pages {
            s.insert(p);
        }
        s
    }

    #[test]
    fn the_switch_comes_after_n_rounds() {
        // --post-copy-after 2: round 0 (the full copy) then round 1, then the switch.
        assert!(!switch_due(2, 0));
        assert!(switch_due(2, 1));
        assert!(switch_due(1, 0));
        assert!(switch_due(3, 7));
        assert!(check_after_rounds(0).is_err());
        assert!(check_after_rounds(1001).is_err());
        let e = check_after_rounds(0).unwrap_err().to_string();
        assert!(e.contains("1..=1000") && e.contains(" 0 "), "{e}");
        assert!(check_after_rounds(2).is_ok());
    }

    #[test]
    fn the_rounds_before_a_post_copy_switch_are_never_throttled() {
        use crate::machine::policy::{Decision, SyncInput};
        use std::time::Duration;
        let cfg = ConvergenceConfig::default();
        // A saturated working set: pre-copy alone throttles at once; before post-copy, not.
        let sync = SyncInput {
            elapsed: Duration::from_millis(500),
            remaining_bytes: 64 << 20,
            previous_remaining_bytes: None,
            round: 0,
            throttle_pct: 0.0,
            bandwidth: Some(500e6),
            dirty_bytes_per_sec: 600e6,
            round_sent_bytes: 64 << 20,
            fitted_before: 0,
            release: crate::machine::policy::ThrottleRelease::Ready,
        };
        assert!(matches!(cfg.decide(&sync), Decision::Throttle(p) if p >= 90.0));
        let pc = pre_copy_convergence(&cfg, Some(2));
        assert!(
            !matches!(pc.decide(&sync), Decision::Throttle(p) if p > 0.0),
            "{:?}",
            pc.decide(&sync)
        );
        assert_eq!(pre_copy_convergence(&cfg, None), cfg);
    }

    #[test]
    fn owed_runs_past_the_layout_are_cut_at_its_end_without_a_panic() {
        let back = owed_from_runs(40, &[(38, 5), (u64::MAX - 1, u32::MAX)]);
        assert_eq!(back.iter().collect::<Vec<_>>(), vec![38, 39]);
    }

    #[test]
    fn owed_runs_round_trip_and_split_at_region_ends() {
        let owed = set(40, &[0, 1, 2, 7, 9, 10, 15, 16, 39]);
        let runs = owed_runs(&owed);
        assert_eq!(runs, vec![(0, 3), (7, 1), (9, 2), (15, 2), (39, 1)]);
        let back = owed_from_runs(40, &runs);
        assert_eq!(
            back.iter().collect::<Vec<_>>(),
            owed.iter().collect::<Vec<_>>()
        );
        let layout = MemoryLayout::new(vec![
            Region {
                guest_addr: 0,
                size: 16 * PAGE_SIZE,
            },
            Region {
                guest_addr: 0x10_0000,
                size: 24 * PAGE_SIZE,
            },
        ])
        .unwrap();
        // Pages 15 and 16 are adjacent indexes but lie in two regions.
        assert_eq!(
            owed_ranges(&layout, &owed),
            vec![
                (0, 3 * PAGE_SIZE),
                (7 * PAGE_SIZE, PAGE_SIZE),
                (9 * PAGE_SIZE, 2 * PAGE_SIZE),
                (15 * PAGE_SIZE, PAGE_SIZE),
                (0x10_0000, PAGE_SIZE),
                (0x10_0000 + 23 * PAGE_SIZE, PAGE_SIZE),
            ]
        );
    }

    #[test]
    fn a_fault_asks_once_for_its_window_and_zero_fills_what_was_never_owed() {
        let mut t = TargetPages::new(64, &[(3, 2), (20, 1), (40, 10)]);
        assert_eq!(t.owed(), 13);
        // Never owed and absent: zero (pre-copy skipped it as zero, nothing wrote it).
        assert_eq!(t.fault(0), FaultAnswer::Zero);
        assert_eq!(t.fault(63), FaultAnswer::Zero);
        assert_eq!(t.fault(1000), FaultAnswer::Zero);
        // An owed page: the aligned 16-page window around it.
        assert_eq!(
            t.fault(4),
            FaultAnswer::Request {
                first: 0,
                pages: 16
            }
        );
        // The same window again (another vCPU, or page 3 of it): wait for the answer.
        assert_eq!(t.fault(3), FaultAnswer::Wait);
        assert_eq!(t.fault(4), FaultAnswer::Wait);
        // A window at the end is cut at the last page.
        let mut u = TargetPages::new(20, &[(18, 2)]);
        assert_eq!(
            u.fault(19),
            FaultAnswer::Request {
                first: 16,
                pages: 4
            }
        );
        // Arrivals: once placed, a late fault event finds it present.
        assert_eq!(t.arrived(3), Ok(Arrival::Place));
        assert_eq!(t.arrived(3), Ok(Arrival::Duplicate));
        assert_eq!(t.fault(3), FaultAnswer::Present);
        assert_eq!(t.arrived(5), Err(PostCopyViolation::NotOwed(5)));
        assert_eq!(t.arrived(64), Err(PostCopyViolation::OutsideLayout(64)));
        assert!(!t.complete());
        for p in [4, 20, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49] {
            assert_eq!(t.arrived(p), Ok(Arrival::Place), "page {p}");
        }
        assert!(t.complete());
        t.fault_served(120);
        t.fault_served(80);
        assert_eq!(t.done_figures(), (13, 1, 120));
    }

    #[test]
    fn the_source_serves_demand_first_and_pushes_each_page_once() {
        let mut s = SourcePages::new(set(64, &[1, 2, 3, 17, 30, 31, 32, 60]));
        assert_eq!(s.next_push(2), vec![1, 2]);
        // A request: the owed pages of the window, even one the push already sent.
        assert_eq!(s.request(0, 16).unwrap(), vec![1, 2, 3]);
        assert_eq!(s.request(16, 16).unwrap(), vec![17, 30, 31]);
        assert!(s.request(60, 16).is_err(), "past the last page");
        // The push skips what demand already sent.
        assert_eq!(s.next_push(3), vec![32, 60]);
        assert!(s.next_push(3).is_empty());
        assert!(s.all_sent());
        assert!(!s.complete());
        assert_eq!(
            s.done(7, 2, 300),
            Err(PostCopyViolation::DoneCount {
                reported: 7,
                owed: 8
            })
        );
        assert!(!s.complete());
        s.done(8, 2, 300).unwrap();
        assert!(s.complete());
        assert_eq!(s.figures(), (6, 4, 2, 300));
    }

    /// The sender machine with its post-copy hook: how a migration that switched ends.
    #[test]
    fn the_sender_reports_a_switched_migration_by_the_post_copy_rule() {
        use crate::machine::sender::{Ending, FailureAction, Sender};
        use crate::wire::Frame;
        use std::time::Duration;
        let ms = Duration::from_millis;
        let switched = || {
            let mut s = Sender::new(ConvergenceConfig::default());
            s.accepted(ms(1)).unwrap();
            s.sent(100 << 20, ms(100)).unwrap();
            s.paused(ms(102)).unwrap();
            s.state_saved().unwrap();
            s.storage_released().unwrap();
            s.post_copy_switched().unwrap();
            s.commit_sent().unwrap();
            s
        };
        let figures = crate::report::PostCopyFigures {
            pages_owed: 10,
            ..Default::default()
        };
        // Completed only with every owed page placed.
        let mut s = switched();
        s.running_acked(ms(110)).unwrap();
        s.post_copy_ended(true, figures);
        let c = s.finish(Ending::Completed);
        assert_eq!(c.outcome, Outcome::Completed);
        assert!(!c.resume);
        let r = s.report(ms(900), ms(900), 1, 0);
        assert_eq!(r.post_copy.as_deref(), Some(&figures));
        // Running, then the link lost during post-copy: the VM is lost, the source stays paused.
        let mut s = switched();
        s.running_acked(ms(110)).unwrap();
        s.post_copy_ended(false, figures);
        let c = s.finish(Ending::LinkLost);
        assert_eq!(c.outcome, Outcome::FailedPostCopy);
        assert_eq!(c.action, Some(FailureAction::InDoubt));
        assert!(!c.resume && c.storage.is_none() && !c.tell_target);
        // No answer to the commit at all: the target may have resumed without the owed pages
        // and cannot finish without the source: also lost, never in doubt.
        let mut s = switched();
        let c = s.finish(Ending::NoAnswer);
        assert_eq!(c.outcome, Outcome::FailedPostCopy);
        assert!(!c.resume);
        // The target answered Failed (it discarded before the guest ran): the source resumes.
        let mut s = switched();
        assert!(
            s.heard(
                ms(110),
                Frame::Failed {
                    reason: "restore".into()
                }
            )
            .is_err()
        );
        let c = s.finish(Ending::Failed);
        assert_eq!(c.outcome, Outcome::Failed);
        assert!(c.resume);
        // A migration that never switched is not touched by the hook.
        let mut s = Sender::new(ConvergenceConfig::default());
        s.accepted(ms(1)).unwrap();
        s.paused(ms(2)).unwrap();
        s.state_saved().unwrap();
        s.storage_released().unwrap();
        s.commit_sent().unwrap();
        assert_eq!(s.finish(Ending::NoAnswer).outcome, Outcome::InDoubt);
    }

    #[test]
    fn after_the_switch_every_failure_loses_the_vm_on_both_sides() {
        let ok = ending(PostCopyEnd::Completed);
        assert_eq!(ok.outcome, Outcome::Completed);
        assert!(!ok.target_stops_guest && !ok.source_resumes);
        for end in [
            PostCopyEnd::LinkLost,
            PostCopyEnd::VerifyMismatch,
            PostCopyEnd::TargetError,
            PostCopyEnd::SourceError,
        ] {
            let c = ending(end);
            assert_eq!(c.outcome, Outcome::FailedPostCopy, "{end:?}");
            assert!(
                c.target_stops_guest,
                "{end:?}: the target must stop the guest"
            );
            assert!(!c.source_resumes, "{end:?}: the source must never resume");
            assert!(!c.outcome.source_runs());
            assert_ne!(c.outcome, Outcome::InDoubt);
        }
    }
}
