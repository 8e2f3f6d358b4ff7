//! One host's power as the loop tracks it (a minimal tracker behind a small interface; the cluster's
//! power crate can take its place without changing the loop).
//!
//! ```text
//!   On ──request_off──▶ PoweringOff ──off_done──▶ Off ──request_on──▶ PoweringOn ──on_done──▶ On
//!                          │ off_failed: On                               │ on_failed
//!                          ▼                                              ▼
//!                          On                          FailedToWake (not woken again until clear)
//! ```
//!
//! An observation wins over a belief: a host whose agent registers is on, whatever was asked. A
//! failed wake stays marked even then, until an operator clears it.

use tern_api::automation::HostPower;

/// A request the host's power state does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {request} host {host}: its power is {phase:?}{}", if *.marked { " and it is marked as failed to wake until an operator clears it" } else { "" })]
pub struct PowerRequestError {
    /// The host.
    pub host: String,
    /// What was asked (`power off`, `power on`, `clear`).
    pub request: &'static str,
    /// Where its power is.
    pub phase: HostPower,
    /// Marked as failed to wake.
    pub marked: bool,
}

/// One host's power.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PowerTracker {
    host: String,
    phase: HostPower,
    since_ms: u64,
    wake_failed: bool,
}

impl PowerTracker {
    /// A host in `phase` since `now_ms`.
    pub fn new(host: impl Into<String>, phase: HostPower, now_ms: u64) -> Self {
        PowerTracker {
            host: host.into(),
            phase,
            since_ms: now_ms,
            wake_failed: phase == HostPower::FailedToWake,
        }
    }

    /// Where its power is.
    pub fn phase(&self) -> HostPower {
        self.phase
    }

    /// Since when.
    pub fn since_ms(&self) -> u64 {
        self.since_ms
    }

    /// Whether it may be chosen for a wake: off and not marked.
    pub fn can_wake(&self) -> bool {
        self.phase == HostPower::Off && !self.wake_failed
    }

    /// Whether it counts as powered on (on, or on its way off).
    pub fn is_on(&self) -> bool {
        matches!(self.phase, HostPower::On | HostPower::PoweringOff)
    }

    fn refuse(&self, request: &'static str) -> PowerRequestError {
        PowerRequestError {
            host: self.host.clone(),
            request,
            phase: self.phase,
            marked: self.wake_failed,
        }
    }

    fn go(&mut self, phase: HostPower, now_ms: u64) {
        if self.phase != phase {
            self.phase = phase;
            self.since_ms = now_ms;
        }
    }

    /// A power-off is sent.
    pub fn request_off(&mut self, now_ms: u64) -> Result<(), PowerRequestError> {
        if self.phase != HostPower::On {
            return Err(self.refuse("power off"));
        }
        self.go(HostPower::PoweringOff, now_ms);
        Ok(())
    }

    /// A power-on is sent.
    pub fn request_on(&mut self, now_ms: u64) -> Result<(), PowerRequestError> {
        if !self.can_wake() {
            return Err(self.refuse("power on"));
        }
        self.go(HostPower::PoweringOn, now_ms);
        Ok(())
    }

    /// The power-off is done.
    pub fn off_done(&mut self, now_ms: u64) {
        if self.phase == HostPower::PoweringOff {
            self.go(HostPower::Off, now_ms);
        }
    }

    /// The power-off failed: the host still runs.
    pub fn off_failed(&mut self, now_ms: u64) {
        if self.phase == HostPower::PoweringOff {
            self.go(HostPower::On, now_ms);
        }
    }

    /// The power-on is done (the host booted).
    pub fn on_done(&mut self, now_ms: u64) {
        if self.phase == HostPower::PoweringOn {
            self.go(HostPower::On, now_ms);
        }
    }

    /// The power-on failed or timed out: marked until cleared.
    pub fn on_failed(&mut self, now_ms: u64) {
        if self.phase == HostPower::PoweringOn {
            self.wake_failed = true;
            self.go(HostPower::FailedToWake, now_ms);
        }
    }

    /// What telemetry says: a host whose agent is up is on. A host seen down while on (not on its
    /// way off) is left as it is: that is a failure for HA, not a power state.
    pub fn observe_up(&mut self, up: bool, now_ms: u64) {
        if up && !self.is_on() {
            self.go(HostPower::On, now_ms);
        }
    }

    /// An operator clears a failed wake: the host is a wake candidate again.
    pub fn clear(&mut self, now_ms: u64) -> Result<(), PowerRequestError> {
        if !self.wake_failed {
            return Err(self.refuse("clear"));
        }
        self.wake_failed = false;
        if self.phase == HostPower::FailedToWake {
            self.go(HostPower::Off, now_ms);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_wake_is_not_retried_until_cleared() {
        let mut t = PowerTracker::new("h1", HostPower::On, 0);
        t.request_off(1).unwrap();
        assert!(t.request_off(2).is_err());
        t.off_done(3);
        assert_eq!(t.phase(), HostPower::Off);
        t.request_on(4).unwrap();
        t.on_failed(5);
        assert_eq!(t.phase(), HostPower::FailedToWake);
        assert!(!t.can_wake());
        let e = t.request_on(6).unwrap_err().to_string();
        assert!(e.contains("marked as failed to wake"), "{e}");
        t.clear(7).unwrap();
        assert!(t.can_wake());
        t.request_on(8).unwrap();
        t.on_done(9);
        assert_eq!(t.phase(), HostPower::On);
        assert!(t.clear(10).is_err());
    }

    #[test]
    fn a_host_seen_up_is_on() {
        let mut t = PowerTracker::new("h1", HostPower::Off, 0);
        t.observe_up(true, 5);
        assert_eq!((t.phase(), t.since_ms()), (HostPower::On, 5));
        t.observe_up(false, 6);
        assert_eq!(t.phase(), HostPower::On);
    }
}
