//! One host's power as the cluster tracks it: a pure state machine with the time as an argument.
//!
//! ```text
//!            request_off              observed Off
//!   On ───────────────────▶ PoweringOff ───────────▶ Off
//!   ▲ ▲                        │ timeout / failed      │ request_on
//!   │ │ observed On            ▼                       ▼
//!   │ └──────────────── FailedToPowerOff          PoweringOn ──observed On──▶ On
//!   │     (clear)                                      │ timeout / failed
//!   │                                                  ▼
//!   └────────────── observed On ─────────────── FailedToWake (marked: not woken again
//!                                                               until `clear`)
//! ```
//!
//! The failure rule is a table, [`PowerTracker::fail`]: what a timed-out or failed transition
//! leaves. A host that failed to wake stays marked even if it shows up later; only an operator's
//! [`PowerTracker::clear`] makes it a wake candidate again (the way vSphere DPM and issue 11 ask).
//! An observation (the driver's status, or the agent registering) always wins over a belief:
//! power seen on is on.
#![deny(clippy::disallowed_methods)]

use std::fmt;

use crate::PowerStatus;

/// Where a host's power is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PowerPhase {
    /// Powered and (as far as power goes) usable.
    On,
    /// A power-off was sent; waiting to see the host off.
    PoweringOff,
    /// Off.
    Off,
    /// A power-on was sent; waiting to see the host on.
    PoweringOn,
    /// A wake failed or timed out; not chosen for a wake until cleared.
    FailedToWake,
    /// A power-off failed or timed out; the host may still run. Not chosen for a power-off until
    /// cleared.
    FailedToPowerOff,
}

impl fmt::Display for PowerPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PowerPhase::On => "on",
            PowerPhase::PoweringOff => "powering_off",
            PowerPhase::Off => "off",
            PowerPhase::PoweringOn => "powering_on",
            PowerPhase::FailedToWake => "failed_to_wake",
            PowerPhase::FailedToPowerOff => "failed_to_power_off",
        })
    }
}

/// How long each transition may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PowerTimeouts {
    /// From the power-off request until the host is seen off.
    pub power_off_ms: u64,
    /// From the power-on request until the host is seen on (booted and registered).
    pub power_on_ms: u64,
}

impl Default for PowerTimeouts {
    fn default() -> Self {
        PowerTimeouts {
            power_off_ms: 120_000,
            power_on_ms: 600_000,
        }
    }
}

/// A request that the current phase does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Cannot {request} host {host}: its power is {phase}{}", if *.marked { " and it is marked as failed to wake until an operator clears it" } else { "" })]
pub struct InvalidPowerRequest {
    /// The host.
    pub host: String,
    /// What was asked ("power off", "power on", "clear").
    pub request: &'static str,
    /// The phase it is in.
    pub phase: PowerPhase,
    /// Whether a failed wake marks it.
    pub marked: bool,
}

/// What a [`PowerTracker::tick`] or observation changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// The phase before.
    pub from: PowerPhase,
    /// The phase after.
    pub to: PowerPhase,
    /// When.
    pub at_ms: u64,
}

/// One host's power state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PowerTracker {
    host: String,
    phase: PowerPhase,
    since_ms: u64,
    deadline_ms: Option<u64>,
    wake_failed_at_ms: Option<u64>,
    timeouts: PowerTimeouts,
}

impl PowerTracker {
    /// A host in `phase` since `now_ms`.
    pub fn new(
        host: impl Into<String>,
        phase: PowerPhase,
        timeouts: PowerTimeouts,
        now_ms: u64,
    ) -> Self {
        let marked = matches!(phase, PowerPhase::FailedToWake);
        PowerTracker {
            host: host.into(),
            phase,
            since_ms: now_ms,
            deadline_ms: None,
            wake_failed_at_ms: marked.then_some(now_ms),
            timeouts,
        }
    }

    /// The host.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The current phase.
    pub fn phase(&self) -> PowerPhase {
        self.phase
    }

    /// Since when.
    pub fn since_ms(&self) -> u64 {
        self.since_ms
    }

    /// When the transition under way times out.
    pub fn deadline_ms(&self) -> Option<u64> {
        self.deadline_ms
    }

    /// When the host last failed to wake, while it is marked.
    pub fn wake_failed_at_ms(&self) -> Option<u64> {
        self.wake_failed_at_ms
    }

    /// Whether the host may be chosen to be woken: off and not marked.
    pub fn can_wake(&self) -> bool {
        self.phase == PowerPhase::Off && self.wake_failed_at_ms.is_none()
    }

    /// Whether the host may be chosen to be powered off: on (a host that failed to power off
    /// waits for an operator).
    pub fn can_power_off(&self) -> bool {
        self.phase == PowerPhase::On
    }

    fn invalid(&self, request: &'static str) -> InvalidPowerRequest {
        InvalidPowerRequest {
            host: self.host.clone(),
            request,
            phase: self.phase,
            marked: self.wake_failed_at_ms.is_some(),
        }
    }

    fn enter(&mut self, phase: PowerPhase, now_ms: u64, deadline_ms: Option<u64>) -> Transition {
        let t = Transition {
            from: self.phase,
            to: phase,
            at_ms: now_ms,
        };
        self.phase = phase;
        self.since_ms = now_ms;
        self.deadline_ms = deadline_ms;
        t
    }

    /// The cluster sends a power-off now: allowed from `On` only.
    pub fn request_off(&mut self, now_ms: u64) -> Result<Transition, InvalidPowerRequest> {
        if !self.can_power_off() {
            return Err(self.invalid("power off"));
        }
        let deadline = now_ms.saturating_add(self.timeouts.power_off_ms);
        Ok(self.enter(PowerPhase::PoweringOff, now_ms, Some(deadline)))
    }

    /// The cluster sends a power-on now: allowed from `Off` only, and not for a marked host.
    pub fn request_on(&mut self, now_ms: u64) -> Result<Transition, InvalidPowerRequest> {
        if !self.can_wake() {
            return Err(self.invalid("power on"));
        }
        let deadline = now_ms.saturating_add(self.timeouts.power_on_ms);
        Ok(self.enter(PowerPhase::PoweringOn, now_ms, Some(deadline)))
    }

    /// The failure table: what a transition that failed (the driver's error) or timed out
    /// leaves. Outside a transition nothing changes.
    pub fn fail(&mut self, now_ms: u64) -> Option<Transition> {
        match self.phase {
            PowerPhase::PoweringOn => {
                self.wake_failed_at_ms = Some(now_ms);
                Some(self.enter(PowerPhase::FailedToWake, now_ms, None))
            }
            PowerPhase::PoweringOff => Some(self.enter(PowerPhase::FailedToPowerOff, now_ms, None)),
            PowerPhase::On
            | PowerPhase::Off
            | PowerPhase::FailedToWake
            | PowerPhase::FailedToPowerOff => None,
        }
    }

    /// Time passes: a transition past its deadline fails.
    pub fn tick(&mut self, now_ms: u64) -> Option<Transition> {
        match self.deadline_ms {
            Some(d) if now_ms >= d => self.fail(now_ms),
            _ => None,
        }
    }

    /// The host's power was seen (from its BMC, or its agent registering, which counts as on).
    /// `Unknown` changes nothing.
    pub fn observe(&mut self, status: PowerStatus, now_ms: u64) -> Option<Transition> {
        let to = match (self.phase, status) {
            (_, PowerStatus::Unknown) => return None,
            (PowerPhase::On, PowerStatus::On) | (PowerPhase::Off, PowerStatus::Off) => return None,
            // Still going down (a soft power-off takes time), or still booting.
            (PowerPhase::PoweringOff, PowerStatus::On)
            | (PowerPhase::PoweringOn, PowerStatus::Off) => return None,
            // A marked host stays marked and off: it did not wake.
            (PowerPhase::FailedToWake, PowerStatus::Off) => return None,
            (_, PowerStatus::On) => PowerPhase::On,
            (_, PowerStatus::Off) => PowerPhase::Off,
        };
        Some(self.enter(to, now_ms, None))
    }

    /// An operator clears a failure: a host that failed to wake becomes `Off` and a wake
    /// candidate again; one that failed to power off becomes `On`. The wake mark goes in either
    /// case.
    pub fn clear(&mut self, now_ms: u64) -> Result<Option<Transition>, InvalidPowerRequest> {
        let marked = self.wake_failed_at_ms.take().is_some();
        match self.phase {
            PowerPhase::FailedToWake => Ok(Some(self.enter(PowerPhase::Off, now_ms, None))),
            PowerPhase::FailedToPowerOff => Ok(Some(self.enter(PowerPhase::On, now_ms, None))),
            _ if marked => Ok(None),
            _ => Err(self.invalid("clear")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: PowerTimeouts = PowerTimeouts {
        power_off_ms: 1_000,
        power_on_ms: 5_000,
    };

    fn on() -> PowerTracker {
        PowerTracker::new("h1", PowerPhase::On, T, 0)
    }

    #[test]
    fn a_host_goes_off_and_comes_back_on() {
        let mut h = on();
        assert!(h.can_power_off());
        let t = h.request_off(100).unwrap();
        assert_eq!((t.from, t.to), (PowerPhase::On, PowerPhase::PoweringOff));
        assert_eq!(h.deadline_ms(), Some(1_100));
        assert_eq!(h.observe(PowerStatus::On, 200), None, "still going down");
        assert_eq!(
            h.observe(PowerStatus::Off, 300).unwrap().to,
            PowerPhase::Off
        );
        assert_eq!((h.since_ms(), h.deadline_ms()), (300, None));
        assert!(h.can_wake());
        h.request_on(1_000).unwrap();
        assert_eq!(h.deadline_ms(), Some(6_000));
        assert_eq!(h.tick(5_999), None);
        assert_eq!(
            h.observe(PowerStatus::On, 5_500).unwrap().to,
            PowerPhase::On
        );
        assert_eq!(h.tick(10_000), None, "no transition under way");
    }

    #[test]
    fn a_wake_that_times_out_marks_the_host_until_cleared() {
        let mut h = PowerTracker::new("h1", PowerPhase::Off, T, 0);
        h.request_on(0).unwrap();
        let t = h.tick(5_000).unwrap();
        assert_eq!(
            (t.from, t.to, t.at_ms),
            (PowerPhase::PoweringOn, PowerPhase::FailedToWake, 5_000)
        );
        assert!(!h.can_wake());
        let e = h.request_on(6_000).unwrap_err();
        assert!(e.marked);
        assert!(e.to_string().contains("marked as failed to wake"), "{e}");
        // Seen off again: still marked, still not a candidate.
        assert_eq!(h.observe(PowerStatus::Off, 7_000), None);
        assert!(!h.can_wake());
        let t = h.clear(8_000).unwrap().unwrap();
        assert_eq!(t.to, PowerPhase::Off);
        assert!(h.can_wake());
        h.request_on(9_000).unwrap();
    }

    #[test]
    fn a_failed_wake_command_marks_at_once() {
        let mut h = PowerTracker::new("h1", PowerPhase::Off, T, 0);
        h.request_on(10).unwrap();
        assert_eq!(h.fail(20).unwrap().to, PowerPhase::FailedToWake);
        assert_eq!(h.wake_failed_at_ms(), Some(20));
    }

    #[test]
    fn a_late_waker_is_on_but_stays_marked() {
        let mut h = PowerTracker::new("h1", PowerPhase::Off, T, 0);
        h.request_on(0).unwrap();
        h.tick(5_000).unwrap();
        assert_eq!(
            h.observe(PowerStatus::On, 6_000).unwrap().to,
            PowerPhase::On
        );
        assert!(h.can_power_off());
        h.request_off(7_000).unwrap();
        h.observe(PowerStatus::Off, 7_500).unwrap();
        assert!(!h.can_wake(), "the failed wake is remembered");
        assert_eq!(h.clear(8_000), Ok(None));
        assert!(h.can_wake());
    }

    #[test]
    fn a_power_off_that_times_out_waits_for_an_operator() {
        let mut h = on();
        h.request_off(0).unwrap();
        assert_eq!(h.tick(999), None);
        assert_eq!(h.tick(1_000).unwrap().to, PowerPhase::FailedToPowerOff);
        assert!(!h.can_power_off());
        assert_eq!(
            h.request_off(2_000).unwrap_err().phase,
            PowerPhase::FailedToPowerOff
        );
        assert_eq!(h.clear(3_000).unwrap().unwrap().to, PowerPhase::On);
        assert!(h.can_power_off());
    }

    #[test]
    fn a_host_seen_off_after_its_power_off_failed_is_off() {
        let mut h = on();
        h.request_off(0).unwrap();
        h.fail(10).unwrap();
        assert_eq!(h.observe(PowerStatus::Off, 20).unwrap().to, PowerPhase::Off);
        assert!(h.can_wake());
    }

    #[test]
    fn requests_out_of_turn_are_refused_and_change_nothing() {
        let mut h = on();
        let before = h.clone();
        assert_eq!(h.request_on(5).unwrap_err().phase, PowerPhase::On);
        assert!(h.clear(5).is_err());
        assert_eq!(h, before);
        h.request_off(10).unwrap();
        assert!(h.request_off(11).is_err());
        assert!(h.request_on(11).is_err());
        assert_eq!(h.phase(), PowerPhase::PoweringOff);
    }

    #[test]
    fn unexpected_observations_win_over_beliefs_and_unknown_changes_nothing() {
        let mut h = on();
        assert_eq!(h.observe(PowerStatus::Unknown, 1), None);
        assert_eq!(
            h.observe(PowerStatus::Off, 2).unwrap().to,
            PowerPhase::Off,
            "lost power"
        );
        assert_eq!(
            h.observe(PowerStatus::On, 3).unwrap().to,
            PowerPhase::On,
            "someone powered it on"
        );
    }

    #[test]
    fn phases_print_as_snake_case() {
        assert_eq!(PowerPhase::FailedToWake.to_string(), "failed_to_wake");
        assert_eq!(PowerPhase::PoweringOff.to_string(), "powering_off");
    }
}
