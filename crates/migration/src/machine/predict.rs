//! What a live migration will cost before it starts: total time, bytes on the wire, pre-copy
//! rounds, the pause, and whether it converges within the downtime budget. Pure.
//!
//! The prediction is not a closed formula beside the policy: it runs the real [`Sender`]
//! machine — the same [`ConvergenceConfig::decide`] switch-over rule, throttle schedule,
//! saturated-working-set jump, timeout and bandwidth estimator the TCP shell follows — against
//! a modelled guest and link instead of a real VM and socket. A change to the policy changes
//! the prediction with it.
//!
//! The model of the guest and the link, round by round:
//!
//! - round 0 sends every resident page (the shell skips pages the VM side knows to be zero, so
//!   a guest's untouched memory costs nothing); later rounds send the pages the last sync found
//!   dirty;
//! - a round lasts its wire bytes (4,104 bytes a page, 22 a frame of 128) over the link's
//!   bandwidth — or the bandwidth cap, paced by the policy's own [`TokenBucket`] — plus a fixed
//!   per-round cost (the round barrier and the dirty-log fetch);
//! - while a round runs the guest dirties `rate × (1 − throttle)` pages a second, all distinct
//!   until its working set is covered (a sweeping writer such as the test guest's; a guest
//!   writing at random re-dirties some pages, so the model errs long for it). The throttle only
//!   slows a guest whose dirtying is bound by its CPU time;
//! - at the switch-over the pause is the policy's own [`ConvergenceConfig::expected_downtime`]
//!   of the last sync's dirty bytes: transfer of those and the state estimate, plus the restore
//!   estimate.

use std::time::Duration;

use crate::config::PAGE_SIZE;
use crate::machine::policy::{ConvergenceConfig, Decision, TokenBucket};
use crate::machine::sender::{InvalidTransition, Sender, check_options};
use crate::wire::{Frame, HEADER_LEN, MAX_PAGES_PER_FRAME, PROTOCOL_VERSION};

/// Bytes a page takes on the wire: its address word and its contents.
const PAGE_WIRE_BYTES: u64 = 8 + PAGE_SIZE;
/// Bytes each frame of pages adds: the header, the round and the count.
const FRAME_WIRE_BYTES: u64 = HEADER_LEN as u64 + 6;
/// Rounds simulated before the prediction gives up (a policy that never decides).
const MAX_ROUNDS: u32 = 1_000_000;

/// The guest and the link a migration would run over.
#[derive(Debug, Clone, PartialEq)]
pub struct PredictInput {
    /// Guest memory size.
    pub memory_bytes: u64,
    /// Memory the guest has touched (backed pages): what round 0 sends. `None`: all of it.
    pub resident_bytes: Option<u64>,
    /// Pages the guest dirties per second when not throttled.
    pub dirty_pages_per_sec: f64,
    /// Memory the guest's writes fall in, if known. `None`: all resident memory.
    pub working_set_bytes: Option<u64>,
    /// The link's bandwidth between source and target, bytes/s (the migration's own cap, if
    /// lower, comes from its [`ConvergenceConfig::max_bandwidth`]).
    pub link_bytes_per_sec: f64,
    /// Fixed cost of each pre-copy round: the round barrier's round trip and the dirty-log fetch.
    pub round_overhead: Duration,
    /// Time before round 0: the handshake and arming the dirty log.
    pub setup: Duration,
}

impl PredictInput {
    /// Default fixed cost of a round (barrier round trip and dirty-log fetch on one host pair).
    pub const DEFAULT_ROUND_OVERHEAD: Duration = Duration::from_millis(2);
    /// Default time before round 0.
    pub const DEFAULT_SETUP: Duration = Duration::from_millis(5);

    /// A guest of `memory_bytes`, all resident and all in its working set, dirtying
    /// `dirty_pages_per_sec`, over a link of `link_bytes_per_sec`, with the default fixed costs.
    pub fn new(memory_bytes: u64, dirty_pages_per_sec: f64, link_bytes_per_sec: f64) -> Self {
        Self {
            memory_bytes,
            resident_bytes: None,
            dirty_pages_per_sec,
            working_set_bytes: None,
            link_bytes_per_sec,
            round_overhead: Self::DEFAULT_ROUND_OVERHEAD,
            setup: Self::DEFAULT_SETUP,
        }
    }

    fn resident(&self) -> u64 {
        self.resident_bytes.unwrap_or(self.memory_bytes)
    }

    fn working_set(&self) -> u64 {
        self.working_set_bytes.unwrap_or_else(|| self.resident())
    }
}

/// How the predicted migration ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictedEnd {
    /// The switch-over rule fired: the pause fits the downtime budget.
    Converges,
    /// The timeout passed and the policy forces the switch-over (the pause may exceed the budget).
    Forced,
    /// The timeout passed and the policy gives up: the VM stays on the source.
    TimesOut,
}

/// What a migration is predicted to cost.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prediction {
    /// How it ends.
    pub end: PredictedEnd,
    /// From the start to the target running (or to the abort).
    pub total: Duration,
    /// Bytes written to the streams: pages and the state estimate.
    pub bytes_sent: u64,
    /// Pre-copy rounds, counted as the report counts them (round 0 included).
    pub rounds: u32,
    /// The pause (zero when the migration times out: the source never stops).
    pub downtime: Duration,
    /// The highest throttle the policy applies, percent.
    pub throttle_max_pct: f64,
}

impl Prediction {
    /// Whether the migration switches over within the downtime budget.
    pub fn converges(&self) -> bool {
        self.end == PredictedEnd::Converges
    }
}

/// Inputs a prediction cannot be made from.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PredictError {
    /// A field outside its valid range.
    #[error("{field} is {value}; valid: {valid}")]
    OutOfRange {
        /// The input field.
        field: &'static str,
        /// Its value.
        value: String,
        /// The valid range.
        valid: &'static str,
    },
    /// The convergence configuration would be refused by the migration itself.
    #[error("the convergence configuration is invalid")]
    Options(#[source] crate::machine::sender::InvalidOptions),
    /// The policy neither switched over nor gave up within the simulated rounds.
    #[error("no switch-over, abort or timeout decision after {0} simulated rounds")]
    NoDecision(u32),
    /// The sender machine refused the simulated sequence of events.
    #[error("the sender machine refused the simulated sequence")]
    Machine(#[source] InvalidTransition),
}

impl From<InvalidTransition> for PredictError {
    fn from(e: InvalidTransition) -> Self {
        Self::Machine(e)
    }
}

fn check(input: &PredictInput, cfg: &ConvergenceConfig) -> Result<(), PredictError> {
    let out = |field, value: String, valid| {
        Err(PredictError::OutOfRange {
            field,
            value,
            valid,
        })
    };
    if input.memory_bytes < PAGE_SIZE {
        return out(
            "memory_bytes",
            input.memory_bytes.to_string(),
            "at least one page (4096)",
        );
    }
    if let Some(r) = input.resident_bytes
        && r > input.memory_bytes
    {
        return out("resident_bytes", r.to_string(), "0..=memory_bytes");
    }
    if let Some(w) = input.working_set_bytes
        && w > input.memory_bytes
    {
        return out("working_set_bytes", w.to_string(), "0..=memory_bytes");
    }
    if !(input.dirty_pages_per_sec.is_finite() && input.dirty_pages_per_sec >= 0.0) {
        return out(
            "dirty_pages_per_sec",
            input.dirty_pages_per_sec.to_string(),
            "a finite number >= 0",
        );
    }
    if !(input.link_bytes_per_sec.is_finite() && input.link_bytes_per_sec >= 1.0) {
        return out(
            "link_bytes_per_sec",
            input.link_bytes_per_sec.to_string(),
            "a finite number >= 1",
        );
    }
    check_options(1, cfg).map_err(PredictError::Options)
}

/// Wire bytes of `bytes` worth of pages.
fn wire_bytes(bytes: u64) -> u64 {
    let pages = bytes.div_ceil(PAGE_SIZE);
    pages * PAGE_WIRE_BYTES + pages.div_ceil(MAX_PAGES_PER_FRAME as u64) * FRAME_WIRE_BYTES
}

/// Predicts a migration of the guest in `input` under `cfg`, by running the sender machine
/// round by round against the modelled guest and link.
pub fn predict(cfg: &ConvergenceConfig, input: &PredictInput) -> Result<Prediction, PredictError> {
    check(input, cfg)?;
    // The cap's token bucket, as the shell builds it (burst 1/20 s, at least 1 MiB).
    let mut bucket = cfg
        .max_bandwidth
        .map(|r| TokenBucket::new(r, (r / 20).max(1 << 20), Duration::ZERO));
    let working_set = input.working_set() / PAGE_SIZE * PAGE_SIZE;

    let mut sender = Sender::new(cfg.clone());
    let mut now = input.setup;
    // The target welcomes the newest version the sender offers.
    let _ = sender.heard(
        now,
        Frame::Welcome {
            version: PROTOCOL_VERSION,
        },
    );
    sender.accepted(now)?;
    sender.dirty_log_armed()?;

    let mut to_send = input.resident() / PAGE_SIZE * PAGE_SIZE;
    let mut bytes_sent = 0u64;
    let mut throttle = 0.0f64;
    let mut throttle_max = 0.0f64;
    for _ in 0..MAX_ROUNDS {
        let wire = wire_bytes(to_send);
        let mut transfer = Duration::from_secs_f64(wire as f64 / input.link_bytes_per_sec);
        if let Some(b) = bucket.as_mut() {
            transfer = transfer.max(b.take(wire, now));
        }
        let round = transfer + input.round_overhead;
        sender.sent(wire, round)?;
        bytes_sent += wire;
        let r = sender.round_end_sent()?;
        now += round;
        sender
            .heard(now, Frame::RoundAck { round: r })
            .map_err(|_| InvalidTransition {
                phase: sender.phase(),
                event: "hear a round acknowledgement",
            })?;
        let run_share = (100.0 - throttle).clamp(0.0, 100.0) / 100.0;
        let dirtied_pages = input.dirty_pages_per_sec * run_share * round.as_secs_f64();
        let dirty =
            ((dirtied_pages * PAGE_SIZE as f64) as u64 / PAGE_SIZE * PAGE_SIZE).min(working_set);
        match sender.synced(now, dirty)? {
            Decision::Continue => {}
            Decision::Throttle(p) => {
                throttle = p;
                throttle_max = throttle_max.max(p);
            }
            Decision::SwitchOver { forced } => {
                // The pause the policy itself expects, from its own (capped) estimate.
                let downtime = sender.figures().expected_downtime.unwrap_or_default();
                return Ok(Prediction {
                    end: if forced {
                        PredictedEnd::Forced
                    } else {
                        PredictedEnd::Converges
                    },
                    total: now + downtime,
                    bytes_sent: bytes_sent + wire_bytes(dirty) + cfg.state_bytes_estimate,
                    rounds: sender.round() + 1,
                    downtime,
                    throttle_max_pct: throttle_max,
                });
            }
            Decision::Abort => {
                return Ok(Prediction {
                    end: PredictedEnd::TimesOut,
                    total: now,
                    bytes_sent,
                    rounds: sender.round() + 1,
                    downtime: Duration::ZERO,
                    throttle_max_pct: throttle_max,
                });
            }
        }
        to_send = dirty;
    }
    Err(PredictError::NoDecision(MAX_ROUNDS))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::policy::OnTimeout;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn secs(d: Duration) -> f64 {
        d.as_secs_f64()
    }

    #[test]
    fn an_idle_guest_takes_its_memory_over_the_bandwidth() {
        let cfg = ConvergenceConfig::default();
        let bw = 1e9;
        let p = predict(&cfg, &PredictInput::new(GIB, 0.0, bw)).unwrap();
        assert_eq!(p.end, PredictedEnd::Converges);
        assert_eq!(p.rounds, 1, "nothing dirty after the full copy");
        assert_eq!(p.throttle_max_pct, 0.0);
        let ideal = GIB as f64 / bw;
        assert!(
            (secs(p.total) - ideal).abs() / ideal < 0.02,
            "{p:?} against {ideal} s"
        );
        // The pause carries only the state estimate and the restore.
        let state = cfg.state_bytes_estimate as f64 / bw;
        assert!((secs(p.downtime) - state - 0.005).abs() < 1e-6, "{p:?}");
        assert!(
            p.bytes_sent > GIB && p.bytes_sent < GIB + GIB / 100,
            "{p:?}"
        );
    }

    #[test]
    fn only_resident_memory_is_sent_and_the_cap_sets_the_pace() {
        let cfg = ConvergenceConfig {
            max_bandwidth: Some(100 * MIB),
            ..Default::default()
        };
        let input = PredictInput {
            resident_bytes: Some(200 * MIB),
            ..PredictInput::new(4 * GIB, 0.0, 10e9)
        };
        let p = predict(&cfg, &input).unwrap();
        assert!(p.converges());
        // 200 MiB at 100 MiB/s, less the bucket's 5 MiB burst that goes out at once.
        assert!((secs(p.total) - 1.96).abs() < 0.03, "{p:?}");
    }

    #[test]
    fn dirtying_faster_than_the_link_without_throttle_does_not_converge() {
        // 1 GB/s link, the guest re-dirties its 256 MiB working set at 2 GB/s; the throttle
        // schedule is switched off (its maximum is 0 %).
        let cfg = ConvergenceConfig {
            throttle_max_pct: 0.0,
            throttle_saturated_pct: 0.0,
            timeout: Duration::from_secs(20),
            ..Default::default()
        };
        let input = PredictInput {
            working_set_bytes: Some(256 * MIB),
            ..PredictInput::new(GIB, 2e9 / PAGE_SIZE as f64, 1e9)
        };
        let p = predict(&cfg, &input).unwrap();
        assert_eq!(p.end, PredictedEnd::TimesOut);
        assert!(!p.converges());
        assert_eq!(p.downtime, Duration::ZERO);
        assert!(secs(p.total) >= 20.0, "runs until the timeout: {p:?}");
        // Every round re-sends the whole working set.
        assert!(p.rounds > 20, "{p:?}");
        // Forced at the timeout: completes, with a pause far above the budget.
        let forced = predict(
            &ConvergenceConfig {
                on_timeout: OnTimeout::Force,
                ..cfg.clone()
            },
            &input,
        )
        .unwrap();
        assert_eq!(forced.end, PredictedEnd::Forced);
        assert!(!forced.converges());
        // 256 MiB at 1 GB/s ≈ 0.27 s.
        assert!((secs(forced.downtime) - 0.274).abs() < 0.01, "{forced:?}");
    }

    #[test]
    fn auto_throttle_converges_at_the_cost_its_schedule_implies() {
        let cfg = ConvergenceConfig::default();
        let bw = 1e9;
        let ws = 256 * MIB;
        let input = PredictInput {
            working_set_bytes: Some(ws),
            resident_bytes: Some(ws + 4 * MIB),
            ..PredictInput::new(GIB, 2e9 / PAGE_SIZE as f64, bw)
        };
        let p = predict(&cfg, &input).unwrap();
        assert!(p.converges(), "{p:?}");
        // Round 0 carries the resident memory and leaves the working set saturated: the
        // saturated jump throttles to 90 %; round 1 re-sends the working set once, during
        // which the guest dirties 10 % of 2 GB/s × 0.27 s ≈ 54 MB; round 2 sends those
        // (≈ 11 MB dirtied meanwhile, which fits the budget) and more rounds shrink the pause.
        assert_eq!(p.throttle_max_pct, cfg.throttle_saturated_pct);
        assert_eq!(p.rounds, 5);
        // The working set once more after the full copy, plus the shrinking rounds (~54 MB,
        // ~11 MB, …): at most 80 MiB more.
        let ideal_bytes = (ws + 4 * MIB) + ws;
        assert!(
            p.bytes_sent > ideal_bytes && p.bytes_sent < ideal_bytes + 80 * MIB,
            "{p:?}"
        );
        // Time is the bytes over the link: the model adds no idle time.
        let ideal_time = p.bytes_sent as f64 / bw;
        assert!(
            (secs(p.total) - ideal_time).abs() < 0.05,
            "{p:?} against {ideal_time}"
        );
        assert!(p.downtime <= cfg.downtime_budget);

        // Without the saturated jump the gentle schedule climbs step by step (20, 60, 80 …),
        // re-sending the working set at each step: more rounds, more bytes, more time.
        let gentle = ConvergenceConfig {
            throttle_saturated_pct: 0.0,
            ..cfg.clone()
        };
        let g = predict(&gentle, &input).unwrap();
        assert!(g.converges(), "{g:?}");
        assert!(g.rounds > p.rounds, "{g:?} against {p:?}");
        assert!(
            g.bytes_sent > p.bytes_sent + 128 * MIB,
            "{g:?} against {p:?}"
        );
        assert!(g.total > p.total);
    }

    #[test]
    fn a_moderate_writer_converges_without_throttle_in_more_rounds_on_a_slower_link() {
        // The loopback test's moderate guest: 20,000 pages/s over 256 MiB.
        let cfg = ConvergenceConfig::default();
        let input = |bw| PredictInput {
            working_set_bytes: Some(256 * MIB),
            resident_bytes: Some(260 * MIB),
            ..PredictInput::new(300 * MIB, 20_000.0, bw)
        };
        // At 1 GB/s the full copy takes 0.27 s, the guest dirties ~22 MB meanwhile, and that
        // fits the 50 ms budget at once; but the guest dirties far below half the bandwidth, so
        // a round re-sending those (~1.8 MB dirtied meanwhile) and another (~0.15 MB) shrink
        // the pause to the state and the restore estimate.
        let fast = predict(&cfg, &input(1e9)).unwrap();
        assert!(fast.converges(), "{fast:?}");
        assert_eq!(fast.rounds, 3, "{fast:?}");
        assert!(fast.downtime < cfg.restore_estimate * 2, "{fast:?}");
        let first_fit = ConvergenceConfig {
            shrink_rounds_max: 0,
            ..cfg.clone()
        };
        let once = predict(&first_fit, &input(1e9)).unwrap();
        assert_eq!(once.rounds, 1, "{once:?}");
        assert!(
            once.downtime > fast.downtime * 4,
            "{once:?} against {fast:?}"
        );
        // At 200 MB/s each round leaves less than half the previous one (falling fast, so no
        // throttle) until the rest fits.
        let slow = predict(&cfg, &input(2e8)).unwrap();
        assert!(slow.converges(), "{slow:?}");
        assert_eq!(slow.throttle_max_pct, 0.0);
        assert!(slow.rounds >= 3, "{slow:?}");
        assert!(slow.downtime <= cfg.downtime_budget);
        assert!(slow.total > fast.total * 5);
    }

    #[test]
    fn the_prediction_follows_the_policy_knobs() {
        // A budget too small for even the state estimate never converges; a larger one does
        // at once.
        let input = PredictInput {
            working_set_bytes: Some(64 * MIB),
            ..PredictInput::new(GIB, 10_000.0, 1e9)
        };
        let tight = ConvergenceConfig {
            downtime_budget: Duration::from_millis(1),
            timeout: Duration::from_secs(5),
            ..Default::default()
        };
        assert_eq!(predict(&tight, &input).unwrap().end, PredictedEnd::TimesOut);
        let loose = ConvergenceConfig {
            downtime_budget: Duration::from_millis(500),
            shrink_rounds_max: 0,
            ..Default::default()
        };
        let p = predict(&loose, &input).unwrap();
        assert!(p.converges() && p.rounds == 1, "{p:?}");
        // Rounds to shrink the pause follow their knob.
        let shrink = ConvergenceConfig {
            shrink_rounds_max: 1,
            ..loose
        };
        assert_eq!(predict(&shrink, &input).unwrap().rounds, 2);
    }

    #[test]
    fn bad_inputs_name_the_field_and_the_range() {
        let cfg = ConvergenceConfig::default();
        let ok = PredictInput::new(GIB, 100.0, 1e9);
        let cases = [
            (
                PredictInput {
                    memory_bytes: 0,
                    ..ok.clone()
                },
                "memory_bytes",
            ),
            (
                PredictInput {
                    resident_bytes: Some(2 * GIB),
                    ..ok.clone()
                },
                "resident_bytes",
            ),
            (
                PredictInput {
                    working_set_bytes: Some(2 * GIB),
                    ..ok.clone()
                },
                "working_set_bytes",
            ),
            (
                PredictInput {
                    dirty_pages_per_sec: f64::NAN,
                    ..ok.clone()
                },
                "dirty_pages_per_sec",
            ),
            (
                PredictInput {
                    dirty_pages_per_sec: -1.0,
                    ..ok.clone()
                },
                "dirty_pages_per_sec",
            ),
            (
                PredictInput {
                    link_bytes_per_sec: 0.0,
                    ..ok.clone()
                },
                "link_bytes_per_sec",
            ),
            (
                PredictInput {
                    link_bytes_per_sec: f64::INFINITY,
                    ..ok.clone()
                },
                "link_bytes_per_sec",
            ),
        ];
        for (input, field) in cases {
            let e = predict(&cfg, &input).unwrap_err();
            assert!(
                matches!(&e, PredictError::OutOfRange { field: f, .. } if *f == field),
                "{field}: {e:?}"
            );
            assert!(e.to_string().starts_with(field), "{e}");
            assert!(e.to_string().contains("valid"), "{e}");
        }
        let zero_cap = ConvergenceConfig {
            max_bandwidth: Some(0),
            ..cfg
        };
        assert!(matches!(
            predict(&zero_cap, &ok),
            Err(PredictError::Options(_))
        ));
    }
}
