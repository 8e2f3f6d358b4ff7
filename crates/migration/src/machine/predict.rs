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
//!   per-round cost (the round barrier and the dirty-log fetch), and the round after the
//!   throttle's release lasts at least its lead (the shell waits it out);
//! - before round 0 come the fixed set-up (the hello and the target's answer, which waits for
//!   the target to build its VM) and each connection's set-up, the control stream's and every
//!   data stream's ([`PredictInput::start_time`]);
//! - while a round runs the guest dirties `rate × (1 − throttle)` pages a second, all distinct
//!   until its working set is covered (a sweeping writer such as the test guest's; a guest
//!   writing at random re-dirties some pages, so the model errs long for it). The throttle only
//!   slows a guest whose dirtying is bound by its CPU time;
//! - at the switch-over the pause is the policy's own [`ConvergenceConfig::expected_downtime`]
//!   of the last sync's dirty bytes: transfer of those and the state estimate, plus the restore
//!   estimate, and each volume disk's lease hand-over ([`PredictInput::disk_handover`]), which
//!   the policy's estimate leaves out.
//!
//! With post-copy (`--post-copy-after N`, [`predict_with`]) the rounds before the switch run
//! under [`postcopy::pre_copy_convergence`] (no throttle) and the switch comes where the shell
//! takes it: at the sync after round `N − 1`, asked before the pre-copy decision
//! ([`postcopy::switch_due`]); a pre-copy that converges earlier ends as plain pre-copy. At the
//! switch the last sync's dirty pages are owed, the pause carries only the state and the
//! restore, and the post-copy phase is simulated window by window (16 pages, the fault
//! prefetch) on the same sweeping-writer model:
//!
//! - the owed pages are the stretch of the working set the guest swept during the last round,
//!   and the guest goes on sweeping from where it stood — the model puts it in the middle of
//!   its working set (it is anywhere in its sweep; the middle is the expectation);
//! - the source pushes the owed windows in address order, one window's wire bytes over the
//!   link per step, and a demanded window goes first — every request is answered, even for a
//!   window the push sent while the request travelled, as [`postcopy::SourcePages::request`]
//!   does, so a guest that catches up with the push costs pages sent twice;
//! - the guest runs on the target at its unthrottled rate through present pages; at an owed
//!   window not yet placed it faults and waits: the request's way out (half of
//!   [`PredictInput::fault_round_trip`]), its window's transfer, the way back;
//! - the phase ends one round trip after the last owed window is placed (the push stream's
//!   connection and the target's `PostCopyDone`).

use std::time::Duration;

use crate::config::PAGE_SIZE;
use crate::machine::policy::{ConvergenceConfig, Decision, TokenBucket};
use crate::machine::postcopy::{self, PREFETCH_PAGES, PostCopyOptionError};
use crate::machine::sender::{InvalidTransition, Sender, check_options};
use crate::wire::{Frame, HEADER_LEN, MAX_PAGES_PER_FRAME, MAX_STREAMS, PROTOCOL_VERSION};

/// Bytes a page takes on the wire: its address word and its contents.
const PAGE_WIRE_BYTES: u64 = 8 + PAGE_SIZE;
/// Bytes each frame of pages adds: the header, the round and the count.
const FRAME_WIRE_BYTES: u64 = HEADER_LEN as u64 + 6;
/// Rounds simulated before the prediction gives up (a policy that never decides).
const MAX_ROUNDS: u32 = 1_000_000;
/// Most windows the post-copy phase is simulated in; a larger working set is simulated in
/// proportionally larger windows (beyond 256 GiB).
const MAX_POST_COPY_WINDOWS: u64 = 1 << 22;

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
    /// Time before round 0 that does not depend on the streams: the hello and the target's
    /// answer, which comes once the target has built its VM (KVM VM, memory slot, irqchip,
    /// vCPU threads), and arming the dirty log.
    pub setup: Duration,
    /// Set-up of each connection before round 0 — the control stream and every data stream
    /// ([`PredictOptions::streams`]): connect, the mutual TLS handshake a cluster's migration
    /// makes, the stream's hello.
    pub connection_setup: Duration,
    /// Disks on the shared volume (`volume://`) that move with the guest: each one's write
    /// lease is handed to the target's node in the pause.
    pub volume_disks: u32,
    /// The pause one volume disk adds: the source hands its lease over (`release_storage`)
    /// and the target takes the disk over before its vCPUs run (part of `target_resume`).
    pub disk_handover: Duration,
    /// Post-copy: a demand fault's round trip beyond its window's transfer (the target's fault
    /// thread, the request, the source's page read, placing the pages and waking the vCPU).
    pub fault_round_trip: Duration,
}

impl PredictInput {
    /// Default fixed cost of a round (barrier round trip and dirty-log fetch on one host pair):
    /// 0.5–1.5 ms on loopback for the test guest, more on a loaded host (docs/migration.md,
    /// "Predicting a migration"). The dirty-log fetch grows with memory, ~25 µs a GiB: left out.
    pub const DEFAULT_ROUND_OVERHEAD: Duration = Duration::from_millis(2);
    /// Default time before round 0 besides the connections: the source's hello to the
    /// target's answer took 9–10 ms for a 64 MiB and a 512 MiB test guest on loopback (the
    /// target builds its VM in between), arming the dirty log well under 1 ms.
    pub const DEFAULT_SETUP: Duration = Duration::from_millis(10);
    /// Default set-up of one connection: mutual TLS added 2–3 ms to three connections (control
    /// and two data streams) on loopback; plain TCP takes ~0.2 ms.
    pub const DEFAULT_CONNECTION_SETUP: Duration = Duration::from_millis(1);
    /// Default pause a volume disk adds: `release_storage` 0.5–7.6 ms plus the target's
    /// take-over 0.5–12.6 ms, pauses of 1–13 ms (median 5.5) against 0–1 ms without the disk, on
    /// loopback with two volume nodes.
    pub const DEFAULT_DISK_HANDOVER: Duration = Duration::from_millis(6);
    /// Most volume disks a prediction takes.
    pub const MAX_VOLUME_DISKS: u32 = 64;
    /// Default round trip of a post-copy demand fault: fitted to loopback runs of the test
    /// guest (docs/migration.md, "Predicting a migration"); a LAN adds its own round trip.
    pub const DEFAULT_FAULT_ROUND_TRIP: Duration = Duration::from_micros(200);

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
            connection_setup: Self::DEFAULT_CONNECTION_SETUP,
            volume_disks: 0,
            disk_handover: Self::DEFAULT_DISK_HANDOVER,
            fault_round_trip: Self::DEFAULT_FAULT_ROUND_TRIP,
        }
    }

    /// Time from the start to round 0 for a migration of `streams` data streams: the set-up
    /// and each connection's (the control stream's and the data streams').
    pub fn start_time(&self, streams: u16) -> Duration {
        self.setup
            .saturating_add(self.connection_setup.saturating_mul(u32::from(streams) + 1))
    }

    /// The pause the volume disks' hand-over adds.
    pub fn storage_pause(&self) -> Duration {
        self.disk_handover.saturating_mul(self.volume_disks)
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
    /// The switch to post-copy came after the asked rounds, before pre-copy converged: the
    /// pause carries only the state, and the owed pages follow while the guest runs on the
    /// target ([`Prediction::post_copy`]).
    PostCopy,
}

/// How a migration is run, beyond its convergence policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PredictOptions {
    /// Data streams (`--streams`): checked as the migration checks them; the model's link is
    /// the path between the hosts, which the streams share, so they do not change its pace.
    pub streams: u16,
    /// `--post-copy-after N`: switch to post-copy after `N` pre-copy rounds.
    pub post_copy_after: Option<u32>,
}

impl Default for PredictOptions {
    fn default() -> Self {
        Self {
            streams: 2,
            post_copy_after: None,
        }
    }
}

/// The predicted post-copy phase of a migration that switches.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PostCopyPrediction {
    /// Pages owed at the switch.
    pub pages_owed: u64,
    /// Owed pages the guest is expected to ask for (demand faults and their windows).
    pub pages_demanded: u64,
    /// Owed pages pushed in the background.
    pub pages_pushed: u64,
    /// Demand faults: windows the guest waits for.
    pub demand_faults: u64,
    /// The target running → every owed page placed (the report's `post_copy_ms`).
    pub duration: Duration,
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
    /// The post-copy phase, when the migration switches to post-copy (it is part of `total`
    /// and `bytes_sent`).
    pub post_copy: Option<PostCopyPrediction>,
}

impl Prediction {
    /// Whether pre-copy switches over within the downtime budget.
    pub fn converges(&self) -> bool {
        self.end == PredictedEnd::Converges
    }

    /// Whether the VM ends up running on the target: pre-copy converged or was forced, or
    /// post-copy finished it.
    pub fn completes(&self) -> bool {
        self.end != PredictedEnd::TimesOut
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
    /// `post_copy_after` out of range.
    #[error("the post-copy option is invalid")]
    PostCopy(#[source] PostCopyOptionError),
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

fn check(
    input: &PredictInput,
    cfg: &ConvergenceConfig,
    opts: &PredictOptions,
) -> Result<(), PredictError> {
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
    if input.volume_disks > PredictInput::MAX_VOLUME_DISKS {
        return out("volume_disks", input.volume_disks.to_string(), "0..=64");
    }
    check_options(opts.streams, cfg).map_err(PredictError::Options)?;
    if let Some(n) = opts.post_copy_after {
        postcopy::check_after_rounds(n).map_err(PredictError::PostCopy)?;
        if opts.streams >= MAX_STREAMS {
            return out(
                "streams",
                opts.streams.to_string(),
                "1..=63 with post-copy (the push stream takes the next index)",
            );
        }
    }
    Ok(())
}

/// Wire bytes of `bytes` worth of pages.
fn wire_bytes(bytes: u64) -> u64 {
    let pages = bytes.div_ceil(PAGE_SIZE);
    pages * PAGE_WIRE_BYTES + pages.div_ceil(MAX_PAGES_PER_FRAME as u64) * FRAME_WIRE_BYTES
}

/// Predicts a pre-copy migration of the guest in `input` under `cfg`, by running the sender
/// machine round by round against the modelled guest and link.
pub fn predict(cfg: &ConvergenceConfig, input: &PredictInput) -> Result<Prediction, PredictError> {
    predict_with(cfg, input, &PredictOptions::default())
}

/// Predicts a migration run with `opts` (streams, post-copy) of the guest in `input` under
/// `cfg` (module docs).
pub fn predict_with(
    cfg: &ConvergenceConfig,
    input: &PredictInput,
    opts: &PredictOptions,
) -> Result<Prediction, PredictError> {
    check(input, cfg, opts)?;
    // The policy of the rounds before a post-copy switch, as the shell builds its machine.
    let cfg = &postcopy::pre_copy_convergence(cfg, opts.post_copy_after);
    // The cap's token bucket, as the shell builds it (burst 1/20 s, at least 1 MiB).
    let mut bucket = cfg
        .max_bandwidth
        .map(|r| TokenBucket::new(r, (r / 20).max(1 << 20), Duration::ZERO));
    let working_set = input.working_set() / PAGE_SIZE * PAGE_SIZE;

    let mut sender = Sender::new(cfg.clone());
    let mut now = input.start_time(opts.streams);
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
        let mut round = transfer + input.round_overhead;
        sender.sent(wire, round)?;
        bytes_sent += wire;
        let r = sender.round_end_sent()?;
        sender
            .heard(now + round, Frame::RoundAck { round: r })
            .map_err(|_| InvalidTransition {
                phase: sender.phase(),
                event: "hear a round acknowledgement",
            })?;
        // As the shell: after the throttle's release the sync waits out the lead.
        if let Some(at) = sender.sync_not_before() {
            round = round.max(at.saturating_sub(now));
        }
        now += round;
        let run_share = (100.0 - throttle).clamp(0.0, 100.0) / 100.0;
        let dirtied_pages = input.dirty_pages_per_sec * run_share * round.as_secs_f64();
        let dirty =
            ((dirtied_pages * PAGE_SIZE as f64) as u64 / PAGE_SIZE * PAGE_SIZE).min(working_set);
        // The shell asks the post-copy hook first, before the pre-copy decision.
        if let Some(n) = opts.post_copy_after
            && postcopy::switch_due(n, sender.round())
        {
            return switch_to_post_copy(cfg, input, sender, now, bytes_sent, dirty);
        }
        match sender.synced(now, dirty)? {
            Decision::Continue => {}
            Decision::Throttle(p) => {
                throttle = p;
                throttle_max = throttle_max.max(p);
            }
            Decision::SwitchOver { forced } => {
                // The pause the policy itself expects, from its own (capped) estimate, and the
                // volume disks' hand-over, which the policy does not count.
                let downtime = sender
                    .figures()
                    .expected_downtime
                    .unwrap_or_default()
                    .saturating_add(input.storage_pause());
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
                    post_copy: None,
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
                    post_copy: None,
                });
            }
        }
        to_send = dirty;
    }
    Err(PredictError::NoDecision(MAX_ROUNDS))
}

/// The switch at `now`, after a round that left `owed_bytes` dirty: the sender machine goes
/// through the pause as the shell drives it (no pages sent in it), the pause is the policy's
/// estimate of the state and the restore, and the post-copy phase follows.
fn switch_to_post_copy(
    cfg: &ConvergenceConfig,
    input: &PredictInput,
    mut sender: Sender,
    now: Duration,
    bytes_sent: u64,
    owed_bytes: u64,
) -> Result<Prediction, PredictError> {
    let bandwidth = cfg
        .effective_bandwidth(Some(input.link_bytes_per_sec))
        .unwrap_or(input.link_bytes_per_sec);
    sender.paused(now)?;
    sender.state_saved()?;
    sender.storage_released()?;
    sender.post_copy_switched()?;
    sender.commit_sent()?;
    let downtime = cfg
        .expected_downtime(0, Some(bandwidth))
        .unwrap_or(cfg.restore_estimate)
        .saturating_add(input.storage_pause());
    sender.running_acked(now + downtime)?;
    let phase = post_copy_phase(input, cfg.max_bandwidth, owed_bytes / PAGE_SIZE);
    Ok(Prediction {
        end: PredictedEnd::PostCopy,
        total: now + downtime + phase.duration,
        // Owed pages go once, and again when a request asked for a window the push had sent.
        bytes_sent: bytes_sent
            + cfg.state_bytes_estimate
            + wire_bytes((phase.pages_demanded + phase.pages_pushed) * PAGE_SIZE),
        rounds: sender.round() + 1,
        downtime,
        throttle_max_pct: 0.0,
        post_copy: Some(phase),
    })
}

/// The post-copy phase of `owed_pages` over the link, window by window (module docs). Under a
/// bandwidth cap the push is paced by a token bucket of its own, as the shell's (starting full:
/// a burst of 1/20 s, at least 1 MiB); demand is never held back.
fn post_copy_phase(input: &PredictInput, cap: Option<u64>, owed_pages: u64) -> PostCopyPrediction {
    let working_pages = (input.working_set() / PAGE_SIZE).max(owed_pages).max(1);
    let window = PREFETCH_PAGES.max(working_pages.div_ceil(MAX_POST_COPY_WINDOWS));
    let windows = working_pages.div_ceil(window);
    let owed_windows = owed_pages.div_ceil(window);
    // Pages of window `w` (the last one may be short).
    let pages_of = |w: u64| window.min(working_pages - w * window);
    let window_wire = wire_bytes(window * PAGE_SIZE);
    let step = Duration::from_secs_f64(window_wire as f64 / input.link_bytes_per_sec);
    let mut bucket = cap.map(|r| TokenBucket::new(r, (r / 20).max(1 << 20), Duration::ZERO));
    let half_trip = input.fault_round_trip / 2;
    // The guest stands in the middle; the owed windows are the ones it swept just before.
    let guest_start = windows / 2;
    let first_owed = (guest_start + windows - owed_windows) % windows;
    let is_owed = |w: u64| (w + windows - first_owed) % windows < owed_windows;
    let mut placed = vec![false; windows as usize];
    let mut missing = owed_windows;
    // The push goes in address order over the owed windows not yet sent.
    let mut push_order = (0..windows).filter(|&w| is_owed(w));
    // Requests on their way to the source or queued there: (window, arrival). The source
    // serves each, even a window the push placed since (the target asked while it was missing).
    let mut requests: std::collections::VecDeque<(u64, Duration)> = Default::default();
    // The guest: its window and its progress into it (pages), or the window it waits for and
    // when it may go on.
    let rate = input.dirty_pages_per_sec;
    let mut at = guest_start;
    let mut progress = 0.0f64;
    let mut waiting: Option<(u64, Duration)> = None;
    let (mut demanded, mut pushed) = (0u64, 0u64);
    let mut t = Duration::ZERO;
    let mut last_placed = Duration::ZERO;
    while missing > 0 {
        // The link carries one window this step: a request that reached the source first.
        let (sent, took) = match requests.front() {
            Some(&(w, arrives)) if arrives <= t => {
                requests.pop_front();
                demanded += 1;
                if let Some((waits_for, _)) = waiting
                    && waits_for == w
                {
                    waiting = Some((w, t + step + half_trip));
                }
                (Some(w), step)
            }
            _ => match push_order.find(|&w| !placed[w as usize]) {
                Some(w) => {
                    pushed += 1;
                    let paced = bucket.as_mut().map(|b| b.take(window_wire, t));
                    (Some(w), step.max(paced.unwrap_or_default()))
                }
                None => (None, step),
            },
        };
        t += took;
        if let Some(w) = sent
            && !placed[w as usize]
        {
            placed[w as usize] = true;
            missing -= 1;
            last_placed = t;
        }
        // The guest: waits for its window, or runs through present pages.
        if let Some((w, resume)) = waiting {
            if placed[w as usize] && resume <= t {
                waiting = None;
            } else {
                continue;
            }
        }
        if rate <= 0.0 {
            continue;
        }
        progress += rate * took.as_secs_f64();
        let mut walked = 0u64;
        while progress >= 1.0 && walked <= windows {
            if is_owed(at) && !placed[at as usize] {
                requests.push_back((at, t + half_trip));
                waiting = Some((at, t));
                progress = 0.0;
                break;
            }
            let pages = pages_of(at) as f64;
            if progress < pages {
                break;
            }
            progress -= pages;
            at = (at + 1) % windows;
            walked += 1;
        }
        if walked > windows {
            // A full sweep found nothing missing: the rest of this step is idle.
            progress = 0.0;
        }
    }
    // Every request the guest made is a demand fault, answered or not when the last page went.
    let faults = demanded + requests.len() as u64;
    // Windows to pages: the owed pages spread over the owed windows.
    let pages = |n: u64| {
        if owed_windows == 0 {
            0
        } else {
            (u128::from(owed_pages) * u128::from(n) / u128::from(owed_windows)) as u64
        }
    };
    PostCopyPrediction {
        pages_owed: owed_pages,
        pages_demanded: pages(demanded),
        pages_pushed: pages(pushed),
        demand_faults: faults,
        duration: last_placed + input.fault_round_trip,
    }
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
        let input = PredictInput::new(GIB, 0.0, bw);
        let p = predict(&cfg, &input).unwrap();
        assert_eq!(p.end, PredictedEnd::Converges);
        assert_eq!(p.rounds, 1, "nothing dirty after the full copy");
        assert_eq!(p.throttle_max_pct, 0.0);
        let ideal = GIB as f64 / bw;
        assert!(
            (secs(p.total) - ideal).abs() / ideal < 0.03,
            "{p:?} against {ideal} s"
        );
        // The pause carries only the state estimate and the restore.
        let state = cfg.state_bytes_estimate as f64 / bw;
        assert!((secs(p.downtime) - state - 0.005).abs() < 1e-6, "{p:?}");
        // The rest is the set-up of three connections (control and two streams), the copy's
        // wire bytes and one round's fixed cost.
        let start = secs(input.start_time(2));
        assert!((start - 0.013).abs() < 1e-9, "{start}");
        let rest = start + wire_bytes(GIB) as f64 / bw + secs(input.round_overhead);
        assert!(
            (secs(p.total) - secs(p.downtime) - rest).abs() < 1e-6,
            "{p:?} against {rest} s before the pause"
        );
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
        // (≈ 11 MB dirtied meanwhile, which fits the budget, but sending it takes longer than
        // the lead): round 3 shrinks it under the throttle to ~2.4 MB. The throttle is then
        // lifted: free for round 4 (the 10 ms lead), the guest dirties ~20 MB, still within
        // the budget, and the pause carries them.
        assert_eq!(p.throttle_max_pct, cfg.throttle_saturated_pct);
        assert_eq!(p.rounds, 5, "{p:?}");
        assert!(
            p.downtime > Duration::from_millis(20) && p.downtime <= cfg.downtime_budget,
            "{p:?}"
        );
        // The working set once more after the full copy, plus the rounds after it (~54 MB,
        // ~11 MB, ~2.4 MB) and the final ~20 MB: at most 96 MiB more.
        let ideal_bytes = (ws + 4 * MIB) + ws;
        assert!(
            p.bytes_sent > ideal_bytes && p.bytes_sent < ideal_bytes + 96 * MIB,
            "{p:?}"
        );
        // Time is the bytes over the link, and the lead's wait (~7 ms) beyond them.
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
        // fits the 50 ms budget at once; but the guest dirties far below the bandwidth, so a
        // round re-sending those (~1.8 MB dirtied meanwhile) and another (~0.15 MB) pay for
        // themselves and shrink the pause to the state and the restore estimate.
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

    /// The max-rate test guest of `migrate_postcopy`: 128 MiB, 64 MiB written as fast as it
    /// can (far above the link), over a 1 GB/s link.
    fn max_rate_guest() -> PredictInput {
        PredictInput {
            working_set_bytes: Some(64 * MIB),
            resident_bytes: Some(68 * MIB),
            ..PredictInput::new(128 * MIB, 2e6, 1e9)
        }
    }

    fn post_copy(n: u32) -> PredictOptions {
        PredictOptions {
            post_copy_after: Some(n),
            ..Default::default()
        }
    }

    #[test]
    fn post_copy_switches_after_the_asked_rounds_with_only_the_state_in_the_pause() {
        let cfg = ConvergenceConfig::default();
        let input = max_rate_guest();
        let p = predict_with(&cfg, &input, &post_copy(2)).unwrap();
        assert_eq!(p.end, PredictedEnd::PostCopy, "{p:?}");
        assert!(p.completes() && !p.converges());
        // Two pre-copy rounds and the pause, as the report counts them; never throttled.
        assert_eq!(p.rounds, 3, "{p:?}");
        assert_eq!(p.throttle_max_pct, 0.0);
        // The pause: the state estimate over the link and the restore.
        let pause = cfg.state_bytes_estimate as f64 / 1e9 + cfg.restore_estimate.as_secs_f64();
        assert!((secs(p.downtime) - pause).abs() < 1e-6, "{p:?}");
        // The writer re-dirtied its whole working set during round 1: all of it is owed, and
        // the guest, running on the target at once, faults on it.
        let pc = p.post_copy.unwrap();
        assert_eq!(pc.pages_owed, 64 * MIB / PAGE_SIZE, "{pc:?}");
        assert!(pc.demand_faults > 0 && pc.pages_demanded > 0, "{pc:?}");
        // Every owed page goes one way or the other; a request for a window the push had sent
        // meanwhile sends it again (the guest, faster than the push, catches up with it).
        let sent = pc.pages_demanded + pc.pages_pushed;
        assert!(
            sent >= pc.pages_owed && sent < pc.pages_owed * 3 / 2,
            "{pc:?}"
        );
        // The link stays busy (push or demand) until the last page: what it sent and one round
        // trip.
        let link = wire_bytes(sent * PAGE_SIZE) as f64 / 1e9;
        let trip = secs(PredictInput::DEFAULT_FAULT_ROUND_TRIP);
        assert!(
            (secs(pc.duration) - link - trip).abs() < 0.002,
            "{pc:?} against {link} s"
        );
        // Total: the set-up, the full copy, round 1 (the working set), the pause and the phase.
        let rounds = wire_bytes(68 * MIB) as f64 / 1e9
            + wire_bytes(64 * MIB) as f64 / 1e9
            + 2.0 * secs(input.round_overhead)
            + secs(input.start_time(2));
        assert!(
            (secs(p.total) - (rounds + pause + secs(pc.duration))).abs() < 0.002,
            "{p:?}"
        );
        // Bytes: the full copy, the working set once in pre-copy, what post-copy sent, the state.
        let bytes = wire_bytes(68 * MIB)
            + wire_bytes(64 * MIB)
            + wire_bytes(sent * PAGE_SIZE)
            + cfg.state_bytes_estimate;
        assert_eq!(p.bytes_sent, bytes, "{p:?}");

        // The same guest pre-copy only, with the throttle off (as before a switch), never
        // converges; with post-copy after 1 round it switches after the full copy.
        let no_throttle = ConvergenceConfig {
            throttle_max_pct: 0.0,
            timeout: Duration::from_secs(5),
            ..cfg.clone()
        };
        assert_eq!(
            predict(&no_throttle, &input).unwrap().end,
            PredictedEnd::TimesOut
        );
        let one = predict_with(&cfg, &input, &post_copy(1)).unwrap();
        assert_eq!(
            (one.end, one.rounds),
            (PredictedEnd::PostCopy, 2),
            "{one:?}"
        );
        assert!(one.total < p.total && one.bytes_sent < p.bytes_sent);
    }

    #[test]
    fn a_pre_copy_that_converges_before_the_switch_ends_as_pre_copy() {
        // An idle guest: round 0 leaves nothing dirty and the switch-over rule fires at its
        // sync, before round 1 would switch.
        let cfg = ConvergenceConfig::default();
        let input = PredictInput::new(256 * MIB, 0.0, 1e9);
        let p = predict_with(&cfg, &input, &post_copy(2)).unwrap();
        assert_eq!(p, predict(&cfg, &input).unwrap());
        assert_eq!(p.end, PredictedEnd::Converges);
        assert!(p.post_copy.is_none());
        // After 1 round the hook comes first: the switch, with nothing owed.
        let p = predict_with(&cfg, &input, &post_copy(1)).unwrap();
        assert_eq!(p.end, PredictedEnd::PostCopy);
        let pc = p.post_copy.unwrap();
        assert_eq!((pc.pages_owed, pc.demand_faults), (0, 0), "{pc:?}");
    }

    #[test]
    fn a_guest_slower_than_the_push_is_never_caught_by_a_missing_page() {
        // 2,000 pages/s over 64 MiB: after round 0 (0.27 s) ~540 pages are owed, the stretch
        // just behind the guest; the guest sweeps the other 16,000 pages first, and by then the
        // push (250,000 pages/s) is long done.
        let cfg = ConvergenceConfig::default();
        let input = PredictInput {
            working_set_bytes: Some(64 * MIB),
            ..PredictInput::new(256 * MIB, 2_000.0, 1e9)
        };
        let p = predict_with(&cfg, &input, &post_copy(1)).unwrap();
        let pc = p.post_copy.unwrap();
        assert!(pc.pages_owed > 500, "{pc:?}");
        assert_eq!(
            (pc.pages_demanded, pc.demand_faults, pc.pages_pushed),
            (0, 0, pc.pages_owed),
            "{pc:?}"
        );
    }

    /// The post-copy phase run with the real machines — `machine::postcopy`'s `TargetPages`
    /// (fault windows, arrivals) and `SourcePages` (demand first, the push in batches of
    /// `PUSH_BATCH_PAGES`) — on the guest and link of the model, page by page: the owed
    /// stretch behind a guest in the middle of its working set, sweeping on at `rate`; the link
    /// carries a demanded window or a push batch at a time. Returns (pages demanded, faults,
    /// the time the last owed page is placed).
    fn machine_phase(
        working_pages: u64,
        owed_pages: u64,
        rate: f64,
        bandwidth: f64,
        trip: Duration,
    ) -> (u64, u64, Duration) {
        use crate::machine::pages::PageSet;
        use crate::machine::postcopy::{
            FaultAnswer, PUSH_BATCH_PAGES, SourcePages, TargetPages, owed_runs,
        };
        let start = working_pages / PREFETCH_PAGES / 2 * PREFETCH_PAGES;
        let mut owed = PageSet::empty(working_pages);
        for i in 0..owed_pages {
            owed.insert((start + working_pages - owed_pages + i) % working_pages);
        }
        let mut target = TargetPages::new(working_pages, &owed_runs(&owed));
        let mut source = SourcePages::new(owed);
        let (mut at, mut progress, mut t, mut last) =
            (start, 0.0f64, Duration::ZERO, Duration::ZERO);
        let mut requests: std::collections::VecDeque<(u64, u32, Duration)> = Default::default();
        let mut waiting: Option<(u64, Duration)> = None; // (page, resumes no earlier than)
        let mut demanded_pages = 0;
        while !target.complete() {
            let demand = requests
                .front()
                .copied()
                .filter(|&(_, _, arrives)| arrives <= t);
            let sent = match demand {
                Some((first, n, _)) => {
                    requests.pop_front();
                    let pages = source.request(first, n).unwrap();
                    demanded_pages += pages.len() as u64;
                    pages
                }
                None => source.next_push(PUSH_BATCH_PAGES),
            };
            let step = wire_bytes(sent.len().max(1) as u64 * PAGE_SIZE) as f64 / bandwidth;
            let step = Duration::from_secs_f64(step);
            t += step;
            for &p in &sent {
                target.arrived(p).unwrap();
                last = t;
            }
            if let Some((first, n, _)) = demand
                && let Some((page, _)) = waiting
                && (first..first + u64::from(n)).contains(&page)
            {
                waiting = Some((page, t + trip / 2));
            }
            if let Some((page, resume)) = waiting {
                if !target.is_missing(page) && resume <= t {
                    waiting = None;
                } else {
                    continue;
                }
            }
            progress += rate * step.as_secs_f64();
            let mut walked = 0;
            while progress >= 1.0 && walked <= working_pages {
                match target.fault(at) {
                    FaultAnswer::Request { first, pages } => {
                        requests.push_back((first, pages, t + trip / 2));
                        waiting = Some((at, t));
                        break;
                    }
                    FaultAnswer::Wait => {
                        waiting = Some((at, t));
                        break;
                    }
                    FaultAnswer::Zero | FaultAnswer::Present => {}
                }
                progress -= 1.0;
                at = (at + 1) % working_pages;
                walked += 1;
            }
            if waiting.is_some() {
                progress = 0.0;
            }
        }
        let (_, faults, _) = target.done_figures();
        (demanded_pages, faults, last + trip)
    }

    #[test]
    fn the_post_copy_model_agrees_with_the_real_post_copy_machines() {
        // A round trip well above a push step, so the window granularity of the model (16
        // pages) against the machines' push batches (32) does not decide who wins a race.
        let trip = Duration::from_millis(1);
        let ws = 64 * MIB / PAGE_SIZE;
        for (owed, rate, bw) in [
            // the max-rate writer: everything owed, the guest faults at once
            (ws, 2e6, 1e9),
            // everything owed, a slower guest that the push overtakes partly
            (ws, 50_000.0, 2e8),
            // a quarter owed behind a fast guest: it sweeps the rest of its working set and
            // catches up with the push from behind
            (ws / 4, 2e6, 1e9),
            // a quarter owed, a slow guest: the push is done before the guest gets there
            (ws / 4, 20_000.0, 1e9),
        ] {
            let input = PredictInput {
                working_set_bytes: Some(ws * PAGE_SIZE),
                fault_round_trip: trip,
                ..PredictInput::new(128 * MIB, rate, bw)
            };
            let model = post_copy_phase(&input, None, owed);
            let (demanded, faults, took) = machine_phase(ws, owed, rate, bw, trip);
            let case = format!(
                "owed {owed} rate {rate} bw {bw}: {model:?} against machines {demanded} pages, {faults} faults, {took:?}"
            );
            // Pages within 10 % of the owed set, faults within 10 % (+2), time within 5 %.
            assert!(
                model.pages_demanded.abs_diff(demanded) <= owed / 10,
                "{case}"
            );
            assert!(
                model.demand_faults.abs_diff(faults) <= faults / 10 + 2,
                "{case}"
            );
            assert!(
                (secs(model.duration) - secs(took)).abs() <= secs(took) * 0.05,
                "{case}"
            );
            assert!(model.pages_demanded + model.pages_pushed >= owed, "{case}");
        }
    }

    /// The idle 64 MiB test guest as `tern vm migrate` moved it on loopback: ~250 KB of
    /// non-zero pages, a few pages dirtied a second (its heartbeat).
    fn small_idle_guest() -> PredictInput {
        PredictInput {
            resident_bytes: Some(254 << 10),
            ..PredictInput::new(64 * MIB, 20.0, 1e9)
        }
    }

    #[test]
    fn the_fixed_costs_follow_the_streams_and_the_volume_disks() {
        let cfg = ConvergenceConfig::default();
        let guest = small_idle_guest();
        let streams = |n| PredictOptions {
            streams: n,
            post_copy_after: None,
        };
        let two = predict_with(&cfg, &guest, &streams(2)).unwrap();
        assert!(two.converges(), "{two:?}");
        // Each more data stream is one more connection to set up before round 0; the rounds
        // and the pause stay as they were (the streams share the link).
        let eight = predict_with(&cfg, &guest, &streams(8)).unwrap();
        assert_eq!((eight.rounds, eight.downtime), (two.rounds, two.downtime));
        let d = secs(eight.total) - secs(two.total);
        assert!(
            (d - 6.0 * secs(guest.connection_setup)).abs() < 1e-9,
            "{d} s more for six streams"
        );
        // A volume disk's lease hand-over lengthens the pause, and the move, by its cost; the
        // policy's switch-over decision is unchanged (it does not count the disk).
        let on_disk = PredictInput {
            volume_disks: 1,
            ..guest.clone()
        };
        let vol = predict_with(&cfg, &on_disk, &streams(2)).unwrap();
        assert_eq!(
            (vol.end, vol.rounds, vol.bytes_sent),
            (two.end, two.rounds, two.bytes_sent)
        );
        assert_eq!(vol.downtime, two.downtime + guest.disk_handover, "{vol:?}");
        assert_eq!(vol.total, two.total + guest.disk_handover, "{vol:?}");
        let three = predict_with(
            &cfg,
            &PredictInput {
                volume_disks: 3,
                ..guest.clone()
            },
            &streams(2),
        )
        .unwrap();
        assert_eq!(three.downtime, two.downtime + guest.disk_handover * 3);
        // With post-copy the disks are handed over in its pause too.
        let pc = |input: &PredictInput| {
            predict_with(
                &cfg,
                &PredictInput {
                    working_set_bytes: Some(16 * MIB),
                    dirty_pages_per_sec: 1e6,
                    ..input.clone()
                },
                &PredictOptions {
                    streams: 2,
                    post_copy_after: Some(1),
                },
            )
            .unwrap()
        };
        let (bare, disk) = (pc(&guest), pc(&on_disk));
        assert_eq!(disk.end, PredictedEnd::PostCopy, "{disk:?}");
        assert_eq!(disk.downtime, bare.downtime + guest.disk_handover);
        // The defaults put the small guest's move where `tern vm migrate` measured it on
        // loopback (docs/migration.md): 16–27 ms without a disk (plain or TLS), 20–38 ms on a
        // volume disk.
        assert!((0.016..=0.027).contains(&secs(two.total)), "{two:?}");
        assert!((0.020..=0.038).contains(&secs(vol.total)), "{vol:?}");
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
                    volume_disks: 65,
                    ..ok.clone()
                },
                "volume_disks",
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
        assert!(matches!(
            predict_with(&cfg, &ok, &post_copy(0)),
            Err(PredictError::PostCopy(_))
        ));
        let e = predict_with(
            &cfg,
            &ok,
            &PredictOptions {
                streams: 64,
                post_copy_after: Some(2),
            },
        )
        .unwrap_err();
        assert!(
            e.to_string().starts_with("streams is 64; valid: 1..=63"),
            "{e}"
        );
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
