//! The VMM control protocol: the messages a VMM (`tern vm run`, `tern vm receive`) serves on its
//! unix control socket, the progress and report of a live migration, and the runtime entry by
//! which host tools find running VMs. `tern-vmm` serves these messages; `tern-vmctl` is the client
//! the CLI, the agent and the parking daemon share. docs/api.md is the user's description.
//!
//! ```text
//!  client (tern vm …, tern-vmctl)                       VMM (tern-vmm's api server)
//!    │ {"op":"status"}\n ─────────────────────────────────▶│ parse_request (≤ MAX_REQUEST_BYTES)
//!    │ ◀────────────────────── {"ok":true,"status":{…}}\n  │
//!    │ {"op":"migrate","to":"HOST:PORT",…}\n ─────────────▶│ runs the migration
//!    │ ◀──────────── {"ok":true,"progress":{…}}\n (0..n)   │
//!    │ ◀──────────── {"ok":true,"report":{…}}\n            │ then the VMM stops: the VM runs there
//!    │           or {"ok":false,"error":"…","report":{…}}\n│ the VM runs here (or, in doubt, stays paused)
//! ```
//!
//! **Framing.** Newline-delimited JSON, one request per line, one answer per request (a `migrate`
//! sends progress lines first). A request line longer than [`MAX_REQUEST_BYTES`] is refused.
//!
//! **Versioning.** The format only grows. A request with a field this VMM does not know is refused
//! (a newer client's option is never silently ignored); answers and runtime entries may carry
//! fields a reader does not know, which it ignores, and fields added later are optional.
//!
//! **Untrusted.** The server decodes every request with [`parse_request`], which bounds the line
//! before parsing and never panics.
//!
//! ```
//! use tern_api::vmm::{parse_request, Request, Response};
//! assert_eq!(parse_request(r#"{"op":"pause"}"#), Ok(Request::Pause));
//! let r: Response = serde_json::from_str(r#"{"ok":false,"error":"the VM is not paused"}"#).unwrap();
//! assert_eq!(r.error.as_deref(), Some("the VM is not paused"));
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The longest request line accepted.
pub const MAX_REQUEST_BYTES: usize = 4096;

/// The default runtime directory.
pub const DEFAULT_RUNTIME_DIR: &str = "/run/tern/vms";

/// A control request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Report the VM's status.
    Status,
    /// Park every vCPU.
    Pause,
    /// Continue every parked vCPU.
    Resume,
    /// Stop the VM; the VMM process exits with status 0.
    Shutdown,
    /// Announce the NICs on the network now (RARP / gratuitous ARP on the announce schedule),
    /// as the resume after a restore does.
    Announce,
    /// Pause, write a snapshot file, then resume (or stop the VM with `stop`).
    Snapshot {
        /// The file to write.
        #[schema(value_type = String)]
        path: PathBuf,
        /// Stop the VM after the snapshot instead of resuming it.
        #[serde(default)]
        stop: bool,
    },
    /// Live-migrate the VM to a waiting `tern vm receive`. Progress lines precede the answer.
    Migrate(MigrateRequest),
    /// Cancel the migration under way (before its commit).
    MigrateCancel,
    /// Queue bytes on the serial port's receive side (the guest reads them from COM1): at most
    /// [`CONSOLE_INPUT_MAX_BYTES`], all or none.
    ConsoleInput {
        /// The bytes, as text (e.g. `"load 70\n"`).
        data: String,
        /// Wait up to this long (ms, at most [`CONSOLE_INPUT_MAX_WAIT_MS`]) for the guest to make
        /// room in the FIFO; 0 = refuse at once when it is full.
        #[serde(default)]
        wait_ms: u64,
    },
    /// Measure the guest's dirty-page rate: dirty logging on for `window_ms`, pages counted, off.
    /// Refused while a migration runs (it owns dirty logging).
    DirtyRate {
        /// The sampling window, ms ([`DIRTY_RATE_WINDOW_MS`]).
        #[serde(default = "default_dirty_window")]
        window_ms: u64,
    },
}

/// The most bytes one `console_input` carries (the 16550's receive FIFO).
pub const CONSOLE_INPUT_MAX_BYTES: usize = 64;
/// The longest `wait_ms` of a `console_input`.
pub const CONSOLE_INPUT_MAX_WAIT_MS: u64 = 10_000;
/// The shortest and longest `dirty_rate` window, ms.
pub const DIRTY_RATE_WINDOW_MS: (u64, u64) = (10, 10_000);

fn default_dirty_window() -> u64 {
    200
}

/// What a `dirty_rate` request measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DirtyRate {
    /// Pages (4 KiB) dirtied per second over the window.
    pub pages_per_s: u64,
    /// The window as measured, ms (the request's, plus scheduling delay).
    pub window_ms: u64,
    /// Distinct pages dirtied in the window.
    pub pages: u64,
    /// Time the VMM spent turning dirty logging on, reading it and turning it off, µs (the
    /// guest's cost is extra: one write-protection fault per page it dirties in the window).
    pub cost_us: u64,
}

/// The options of a `migrate` request; every field but `to` may be left out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The target, HOST:PORT.
    pub to: String,
    /// Parallel data streams.
    #[serde(default = "default_streams")]
    pub streams: u16,
    /// Downtime budget, ms.
    #[serde(default = "default_downtime")]
    pub downtime_ms: u64,
    /// Timeout, seconds.
    #[serde(default = "default_timeout")]
    pub timeout_s: f64,
    /// Force the switch-over at the timeout instead of aborting.
    #[serde(default)]
    pub force_on_timeout: bool,
    /// Bandwidth cap, MiB/s.
    #[serde(default)]
    pub max_bandwidth_mibps: Option<u64>,
    /// Compare a digest of all memory on the target before it resumes.
    #[serde(default)]
    pub verify_memory: bool,
    /// Offer only this protocol version (for testing version refusal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_version: Option<u16>,
    /// The target host's successor for disks with an exclusive write lease (its volume node id);
    /// required when the VM has such disks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_successor: Option<String>,
    /// Migrate over mutual TLS with this identity (absent: plain TCP). Boxed: it holds PEM text
    /// and would make every `Request` as large as itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Box<MigrateTls>>,
    /// Switch to post-copy after this many pre-copy rounds (absent: pre-copy only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_copy_after: Option<u32>,
    /// Send pages straight from guest memory on plain TCP, each data page under its own
    /// crc32c that the target checks once the page is in its memory (the default); `false`
    /// (`tern vm migrate --copy-pages`) copies every page into a frame whose crc32c covers
    /// every byte. TLS always copies. Absent: `true`.
    #[serde(default = "default_pages_in_place", skip_serializing_if = "is_true")]
    pub pages_in_place: bool,
}

/// The source's TLS identity for one migration: the contents of its `--tls-dir` (read by the
/// `tern vm migrate` client, which can read the 0600 key; a jailed VMM could not) and the name the
/// target's certificate must carry. Sent only over the VMM's 0600 API socket.
#[derive(Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateTls {
    /// Where the files came from (for messages).
    pub dir: String,
    /// `ca-cert.pem`: the cluster CA the target's certificate must chain to.
    pub ca_cert_pem: String,
    /// `server-cert.pem`: the certificate this host presents (role `host`).
    pub cert_pem: String,
    /// `server-key.pem`.
    pub key_pem: String,
    /// `ca-crl.pem`, when the directory has one: a target whose certificate it revokes is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl_pem: Option<String>,
    /// The name (DNS or IP SAN) the target's certificate must carry.
    pub target_name: String,
}

impl std::fmt::Debug for MigrateTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigrateTls")
            .field("dir", &self.dir)
            .field("target_name", &self.target_name)
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

fn default_streams() -> u16 {
    2
}
fn default_downtime() -> u64 {
    50
}
fn default_timeout() -> f64 {
    60.0
}
fn default_pages_in_place() -> bool {
    true
}
fn is_true(b: &bool) -> bool {
    *b
}

impl MigrateRequest {
    /// A migration to `to` with the defaults a request that names only `to` gets.
    pub fn new(to: impl Into<String>) -> Self {
        MigrateRequest {
            to: to.into(),
            streams: default_streams(),
            downtime_ms: default_downtime(),
            timeout_s: default_timeout(),
            force_on_timeout: false,
            max_bandwidth_mibps: None,
            verify_memory: false,
            protocol_version: None,
            disk_successor: None,
            tls: None,
            post_copy_after: None,
            pages_in_place: true,
        }
    }
}

/// An answer line: the final answer to a request, or a migration's progress line (`progress` set).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Response {
    /// Whether the request was carried out.
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The status, for `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<VmStatus>,
    /// A migration's progress (a line before the final answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// A migration's final report, on success and on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<MigrationReport>,
    /// The sample, for `dirty_rate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_rate: Option<DirtyRate>,
}

impl Response {
    /// `{"ok":true}`.
    pub fn ok() -> Self {
        Response {
            ok: true,
            error: None,
            status: None,
            progress: None,
            report: None,
            dirty_rate: None,
        }
    }

    /// `{"ok":false,"error":"…"}`.
    pub fn error(e: impl std::fmt::Display) -> Self {
        Response {
            ok: false,
            error: Some(e.to_string()),
            ..Response::ok()
        }
    }

    /// This answer as one line, newline included.
    pub fn to_line(&self) -> String {
        let mut text = serde_json::to_string(self).unwrap_or_else(|_| "{\"ok\":false}".into());
        text.push('\n');
        text
    }
}

/// Why a request line was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseRequestError {
    /// Longer than [`MAX_REQUEST_BYTES`].
    #[error("request longer than {MAX_REQUEST_BYTES} bytes")]
    TooLong,
    /// Not JSON, or not one of the requests.
    #[error(
        "bad request: {0} (send one of {{\"op\":\"status\"|\"pause\"|\"resume\"|\"shutdown\"|\"snapshot\"|\"migrate\"|\"migrate_cancel\"|\"console_input\"|\"dirty_rate\"}})"
    )]
    Bad(String),
}

/// Parses one request line.
pub fn parse_request(line: &str) -> Result<Request, ParseRequestError> {
    if line.len() > MAX_REQUEST_BYTES {
        return Err(ParseRequestError::TooLong);
    }
    serde_json::from_str(line.trim()).map_err(|e| ParseRequestError::Bad(e.to_string()))
}

/// The run state reported by `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// vCPUs run.
    Running,
    /// Every vCPU is parked.
    Paused,
    /// Pausing or resuming is under way.
    Transitioning,
    /// The VM is stopping.
    Stopping,
}

impl RunState {
    /// The state's name on the wire: `running`, `paused`, `transitioning`, `stopping`.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Transitioning => "transitioning",
            RunState::Stopping => "stopping",
        }
    }
}

/// What `status` answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmStatus {
    /// The VM's name.
    pub name: String,
    /// The VMM's process ID.
    pub pid: u32,
    /// Run state.
    pub state: RunState,
    /// vCPU count.
    pub vcpus: u8,
    /// Thread IDs of the vCPU threads, by index.
    pub vcpu_tids: Vec<i32>,
    /// Guest memory.
    pub memory_mib: u64,
    /// "pvh" or "linux64".
    pub boot: String,
    /// TSC frequency given to the guest.
    pub tsc_khz: u32,
    /// Milliseconds since the VM started.
    pub uptime_ms: u64,
    /// Per-disk request counters.
    pub disks: Vec<DiskStatus>,
}

/// One disk's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DiskStatus {
    /// The image.
    pub path: String,
    /// Read-only.
    pub readonly: bool,
    /// Read requests.
    pub reads: u64,
    /// Write requests.
    pub writes: u64,
    /// Flush requests.
    pub flushes: u64,
    /// Discard requests.
    #[serde(default)]
    pub discards: u64,
    /// Write-zeroes requests.
    #[serde(default)]
    pub write_zeroes: u64,
    /// Failed requests.
    pub errors: u64,
}

/// How a migration ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The VM runs on the target; the source may be torn down.
    Completed,
    /// The target refused the handshake (version or configuration).
    Refused,
    /// Cancelled by the operator; the source runs.
    Cancelled,
    /// The timeout passed with `--on-timeout abort`; the source runs.
    TimedOut,
    /// A connection, target or protocol failure; the source runs.
    Failed,
    /// Commit was sent but no answer came: the source stays paused, the target may run.
    InDoubt,
    /// Post-copy (`--post-copy-after`) failed after the switch: the guest's memory was split
    /// across both hosts, so the target stopped the guest and the source stays paused without
    /// resuming (its copy is stale): the VM is lost, as in QEMU's post-copy.
    FailedPostCopy,
}

impl Outcome {
    /// Whether the source VM is running after this outcome.
    pub fn source_runs(self) -> bool {
        !matches!(
            self,
            Outcome::Completed | Outcome::InDoubt | Outcome::FailedPostCopy
        )
    }

    /// The exit status of `tern vm migrate`: 0 completed (the VM runs on the target), 3 in
    /// doubt (the source stays paused, an operator decides), 4 failed in post-copy (the VM is
    /// lost: stopped on the target, paused for good on the source), 1 for every outcome where
    /// the source runs.
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Completed => 0,
            Outcome::InDoubt => 3,
            Outcome::FailedPostCopy => 4,
            Outcome::Refused | Outcome::Cancelled | Outcome::TimedOut | Outcome::Failed => 1,
        }
    }

    /// The outcome in words: `completed`, `refused`, `cancelled`, `timed out`, `failed`,
    /// `in doubt`, `failed in post-copy (the VM is lost)`.
    pub fn words(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Refused => "refused",
            Outcome::Cancelled => "cancelled",
            Outcome::TimedOut => "timed out",
            Outcome::Failed => "failed",
            Outcome::InDoubt => "in doubt",
            Outcome::FailedPostCopy => "failed in post-copy (the VM is lost)",
        }
    }
}

/// Phase shown in progress reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProgressPhase {
    /// Handshake.
    Setup,
    /// Pre-copy rounds.
    PreCopy,
    /// VM paused, last pages and state.
    StopAndCopy,
    /// Waiting for the target's "running".
    Commit,
}

impl ProgressPhase {
    /// The phase's name on the wire (`setup`, `pre_copy`, `stop_and_copy`, `commit`).
    pub fn as_str(self) -> &'static str {
        match self {
            ProgressPhase::Setup => "setup",
            ProgressPhase::PreCopy => "pre_copy",
            ProgressPhase::StopAndCopy => "stop_and_copy",
            ProgressPhase::Commit => "commit",
        }
    }
}

/// A progress snapshot, given to the progress callback after every round and about every
/// 100 ms within a round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Progress {
    /// Phase.
    pub phase: ProgressPhase,
    /// Round (0 = the full copy).
    pub round: u32,
    /// Bytes written to the streams so far.
    pub bytes_sent: u64,
    /// Bytes still to send in this round plus dirty bytes known.
    pub bytes_remaining: u64,
    /// Dirty rate at the last sync, bytes/s.
    pub dirty_bytes_per_sec: f64,
    /// Bandwidth estimate, bytes/s (0 before the first measurement).
    pub bandwidth_bytes_per_sec: f64,
    /// Expected pause if switching over now, ms (`None` while unknown).
    pub expected_downtime_ms: Option<f64>,
    /// Current throttle, percent.
    pub throttle_pct: f64,
    /// Time since the start, ms.
    pub elapsed_ms: u64,
}

/// The final report of a migration, successful or not.
///
/// Serialises to JSON with exactly the fields `total_ms`, `downtime_ms`, `rounds`,
/// `bytes_sent`, `pages_zero_skipped`, `throttle_max_pct`, `converged`, `outcome`,
/// `downtime_steps` when the migration completed, `post_copy` after a switch to post-copy,
/// `rounds_detail` once a round ran and `pages_resent_after_checksum_mismatch` when the target
/// counted them (each absent otherwise).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MigrationReport {
    /// Start of the handshake → end (ack, or source resumed), ms.
    pub total_ms: u64,
    /// Source pause → target "running" ack (or → source resumed on failure), ms; 0 if the
    /// source never paused.
    pub downtime_ms: u64,
    /// Pre-copy rounds plus the stop-and-copy round.
    pub rounds: u32,
    /// Bytes written to all streams, frame headers included.
    pub bytes_sent: u64,
    /// Zero pages not sent at all.
    pub pages_zero_skipped: u64,
    /// Highest throttle applied, percent (e.g. 99.9).
    pub throttle_max_pct: f64,
    /// Whether the switch-over came from the downtime budget (not forced by the timeout).
    pub converged: bool,
    /// How it ended.
    pub outcome: Outcome,
    /// A completed migration's pause step by step, in order; the steps' `us` add up to the
    /// downtime. Empty (and absent from the JSON) otherwise.
    /// (A boxed slice, like `rounds_detail` boxed: a failed migration's error carries the
    /// report, which stays small.)
    #[serde(default, skip_serializing_if = "<[DowntimeStep]>::is_empty")]
    pub downtime_steps: Box<[DowntimeStep]>,
    /// The post-copy phase of a migration that switched to post-copy (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_copy: Option<Box<PostCopyFigures>>,
    /// Round by round, in order (absent from an older VMM's report and when no round ran): one
    /// entry per round counted in `rounds`, the stop-and-copy round last; past 1,024 rounds,
    /// the first 512 and the latest ones (their `round` numbers show the gap). One pointer wide.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[allow(clippy::box_collection)]
    pub rounds_detail: Option<Box<Vec<RoundFigures>>>,
    /// Copies of pages sent in place whose data did not match their own checksum on the target
    /// (the guest rewrote them while the source's kernel copied them), each of which came again
    /// before the commit (a page torn in two rounds counts twice), as the target counted them (migration protocol 5 on; absent when the target
    /// did not say: an older target, or a migration that did not complete). A `u32` (at most
    /// 16 TiB of pages; more reads as `u32::MAX`), so a failure carrying the report stays small.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages_resent_after_checksum_mismatch: Option<u32>,
}

/// What one round of a migration did (docs/migration.md, "The report").
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RoundFigures {
    /// The round (0 = the full copy).
    pub round: u32,
    /// The round's start → its end (the dirty-log sync; the final pages written for the
    /// stop-and-copy round), µs.
    pub us: u64,
    /// Pages sent with their data.
    pub pages_data: u64,
    /// Zero pages: sent as a marker, or skipped.
    pub pages_zero: u64,
    /// Bytes the round wrote to the data streams (frame headers and its end included).
    pub bytes: u64,
    /// Pages found dirty at the round's end: the next round's work (0 after stop-and-copy).
    pub dirty_pages: u64,
    /// The throttle in force during the round, percent.
    pub throttle_pct: f64,
    /// What the convergence policy decided at the round's end.
    pub decision: RoundDecision,
}

/// The convergence policy's decision at the end of a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RoundDecision {
    /// Another round: the remainder is above the budget.
    Continue,
    /// Another round under a stronger throttle.
    Throttle,
    /// Another round with the throttle lifted (or a sync that came inside that lead): the
    /// remainder fits the budget, and the guest runs free for a while before the pause so that
    /// the pause does not land in work the throttle stretched. Should the remainder stop
    /// fitting, the throttle goes back on (`throttle`).
    Release,
    /// Another round although the remainder fits the budget: predicted to shrink the pause.
    Shrink,
    /// Switch over: the remainder fits the budget.
    SwitchOver,
    /// Switch over at the timeout, the budget not met.
    ForcedSwitchOver,
    /// Give up at the timeout.
    Abort,
    /// Switch to post-copy (`--post-copy-after`): the remainder is owed.
    PostCopy,
    /// The stop-and-copy round (the VM paused).
    StopAndCopy,
    /// The round did not end (the migration failed or was cancelled in it).
    Unfinished,
}

impl RoundDecision {
    /// The decision's name on the wire (`continue`, `shrink`, `switch_over`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            RoundDecision::Continue => "continue",
            RoundDecision::Throttle => "throttle",
            RoundDecision::Release => "release",
            RoundDecision::Shrink => "shrink",
            RoundDecision::SwitchOver => "switch_over",
            RoundDecision::ForcedSwitchOver => "forced_switch_over",
            RoundDecision::Abort => "abort",
            RoundDecision::PostCopy => "post_copy",
            RoundDecision::StopAndCopy => "stop_and_copy",
            RoundDecision::Unfinished => "unfinished",
        }
    }
}

/// What the post-copy phase of a migration (`--post-copy-after`) did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PostCopyFigures {
    /// Pages still owed when the guest resumed on the target.
    pub pages_owed: u64,
    /// Pages the source sent because the target asked for them (a fault and its window).
    pub pages_demanded: u64,
    /// Pages the source pushed in the background.
    pub pages_pushed: u64,
    /// Guest faults on owed pages that waited for a request (as the target counted them).
    pub demand_faults: u64,
    /// The target's "running" → its report that every owed page was placed, ms.
    pub post_copy_ms: u64,
    /// The longest demand fault: the target read the fault → the page placed, µs.
    pub max_fault_latency_us: u64,
}

/// A step of a migration's pause (docs/migration.md, "Where the pause goes"). Each ends at the
/// event it is named after and starts where the one before ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PauseStep {
    /// Source: the vCPUs stopped → the last dirty-log read.
    DirtyLog,
    /// Source: → the final pages and every data stream's end written to the sockets.
    FinalPages,
    /// Source: → the VM state saved (vCPUs, irqchips, clocks, devices).
    SaveState,
    /// Source: → the disks' write ownership handed to the target.
    ReleaseStorage,
    /// Source: → the state and the memory digest (`--verify-memory`) written, the commit about
    /// to go out.
    StateSent,
    /// Target: commit read → every data stream ended and all its pages written.
    TargetData,
    /// Target: → the memory digest compared (`--verify-memory`).
    TargetVerify,
    /// Target: → the VM state restored.
    TargetRestore,
    /// Target: → the vCPUs running (the disks taken over first).
    TargetResume,
    /// Source: the rest of the time until the target's "running" is read: the commit's write and
    /// way and the answer's through the network and both ends' threads (all of the target's
    /// time too, if its protocol version does not report its timings).
    Ack,
}

impl PauseStep {
    /// The step's name on the wire (`dirty_log`, `final_pages`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            PauseStep::DirtyLog => "dirty_log",
            PauseStep::FinalPages => "final_pages",
            PauseStep::SaveState => "save_state",
            PauseStep::ReleaseStorage => "release_storage",
            PauseStep::StateSent => "state_sent",
            PauseStep::TargetData => "target_data",
            PauseStep::TargetVerify => "target_verify",
            PauseStep::TargetRestore => "target_restore",
            PauseStep::TargetResume => "target_resume",
            PauseStep::Ack => "ack",
        }
    }

    /// Whether the target timed it (on its own clock).
    pub fn on_target(self) -> bool {
        matches!(
            self,
            PauseStep::TargetData
                | PauseStep::TargetVerify
                | PauseStep::TargetRestore
                | PauseStep::TargetResume
        )
    }
}

/// One step of the pause and what it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DowntimeStep {
    /// Which step.
    pub step: PauseStep,
    /// How long, µs.
    pub us: u64,
    /// Bytes the step wrote to the streams (frame headers included), 0 if none.
    pub bytes: u64,
}

impl MigrationReport {
    /// The report as one line of JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

/// The runtime entry `<runtime-dir>/<name>.json` a VMM writes once its vCPU threads exist and
/// removes when it stops.
///
/// The format only grows: `name`, `pid`, `api_sock` (a path or `null`) and `vcpu_tids` are there
/// since the first version (all the parking daemon needs); `vcpus`, `memory_mib`,
/// `started_unix_ms` and `pid_start_ticks` were added later and are `None` in entries an older
/// VMM wrote. Readers ignore fields they do not know.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RuntimeEntry {
    /// The VM's name.
    pub name: String,
    /// The VMM's process ID.
    pub pid: u32,
    /// The control socket, if any.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub api_sock: Option<PathBuf>,
    /// Thread IDs of the vCPU threads, in vCPU order.
    pub vcpu_tids: Vec<u32>,
    /// The vCPU count.
    #[serde(default)]
    pub vcpus: Option<u8>,
    /// Guest memory, MiB.
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// When the VM started here, ms since the Unix epoch.
    #[serde(default)]
    pub started_unix_ms: Option<u64>,
    /// The VMM process's start time, clock ticks after boot (`/proc/PID/stat` field 22): tells the
    /// VMM apart from a later process that got the same PID.
    #[serde(default)]
    pub pid_start_ticks: Option<u64>,
}

impl RuntimeEntry {
    /// An entry with only the first version's fields.
    pub fn new(name: impl Into<String>, pid: u32, vcpu_tids: Vec<u32>) -> Self {
        RuntimeEntry {
            name: name.into(),
            pid,
            api_sock: None,
            vcpu_tids,
            vcpus: None,
            memory_mib: None,
            started_unix_ms: None,
            pid_start_ticks: None,
        }
    }

    /// Whether a process with this entry's PID, started at `start_ticks` (`None`: no such
    /// process), is the one that wrote it. An older entry without a start time trusts the PID.
    pub fn is_written_by(&self, start_ticks: Option<u64>) -> bool {
        match start_ticks {
            None => false,
            Some(ticks) => self.pid_start_ticks.is_none_or(|t| t == ticks),
        }
    }
}

/// The entry file of VM `name` in `dir`.
pub fn entry_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.json"))
}

/// The control socket a VM named `name` gets when none is given: `<dir>/<name>.sock`.
pub fn default_api_sock(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.sock"))
}

/// Field 22 (`starttime`) of a `/proc/PID/stat` line. The command name (field 2) may hold spaces
/// and parentheses, so fields are counted after its last `)`.
pub fn parse_stat_start_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // `rest` starts at field 3 (state); starttime is field 22.
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T>(v: &T) -> T
    where
        T: Serialize + for<'de> Deserialize<'de>,
    {
        serde_json::from_str(&serde_json::to_string(v).unwrap()).unwrap()
    }

    fn status() -> VmStatus {
        VmStatus {
            name: "vm1".into(),
            pid: 4242,
            state: RunState::Paused,
            vcpus: 2,
            vcpu_tids: vec![4244, 4245],
            memory_mib: 256,
            boot: "pvh".into(),
            tsc_khz: 2_596_132,
            uptime_ms: 10_234,
            disks: vec![DiskStatus {
                path: "/var/lib/tern/a.img".into(),
                readonly: false,
                reads: 10,
                writes: 2048,
                flushes: 1,
                discards: 3,
                write_zeroes: 0,
                errors: 0,
            }],
        }
    }

    fn progress() -> Progress {
        Progress {
            phase: ProgressPhase::StopAndCopy,
            round: 3,
            bytes_sent: 70_254_592,
            bytes_remaining: 4096,
            dirty_bytes_per_sec: 1.5e6,
            bandwidth_bytes_per_sec: 2.5e9,
            expected_downtime_ms: Some(4.5),
            throttle_pct: 20.0,
            elapsed_ms: 812,
        }
    }

    fn report(outcome: Outcome) -> MigrationReport {
        MigrationReport {
            total_ms: 812,
            downtime_ms: 9,
            rounds: 3,
            bytes_sent: 70_254_592,
            pages_zero_skipped: 15_000,
            throttle_max_pct: 97.5,
            converged: true,
            outcome,
            downtime_steps: Box::default(),
            post_copy: None,
            rounds_detail: None,
            pages_resent_after_checksum_mismatch: None,
        }
    }

    fn entry() -> RuntimeEntry {
        RuntimeEntry {
            api_sock: Some("/run/tern/vms/vm1.sock".into()),
            vcpus: Some(2),
            memory_mib: Some(256),
            started_unix_ms: Some(1_765_051_200_000),
            pid_start_ticks: Some(812_345),
            ..RuntimeEntry::new("vm1", 4242, vec![4244, 4245])
        }
    }

    #[test]
    fn the_four_requests_parse() {
        assert_eq!(parse_request(r#"{"op":"status"}"#), Ok(Request::Status));
        assert_eq!(parse_request(" {\"op\":\"pause\"}\n"), Ok(Request::Pause));
        assert_eq!(parse_request(r#"{"op":"resume"}"#), Ok(Request::Resume));
        assert_eq!(parse_request(r#"{"op":"shutdown"}"#), Ok(Request::Shutdown));
    }

    #[test]
    fn unknown_and_malformed_requests_are_refused() {
        for bad in [
            r#"{"op":"explode"}"#,
            "status",
            "",
            r#"{"nop":1}"#,
            r#"{"op":"snapshot"}"#,
            r#"{"op":"migrate"}"#,
            r#"{"op":"migrate","to":"h:1","streams":-1}"#,
            r#"{"op":"snapshot","path":"/x","stop":"yes"}"#,
        ] {
            assert!(
                matches!(parse_request(bad), Err(ParseRequestError::Bad(_))),
                "{bad:?} parsed"
            );
        }
    }

    #[test]
    fn a_request_with_a_field_the_vmm_does_not_know_is_refused() {
        for bad in [
            r#"{"op":"migrate","to":"h:1","disk_succesor":"2"}"#,
            r#"{"op":"snapshot","path":"/x","sotp":true}"#,
        ] {
            let e = parse_request(bad).unwrap_err();
            assert!(e.to_string().contains("unknown field"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn overlong_requests_are_refused_before_parsing() {
        let long = format!(
            r#"{{"op":"status","pad":"{}"}}"#,
            "x".repeat(MAX_REQUEST_BYTES)
        );
        assert_eq!(parse_request(&long), Err(ParseRequestError::TooLong));
    }

    #[test]
    fn every_request_serializes_to_what_the_server_parses() {
        let mut full = MigrateRequest::new("10.0.0.2:7000");
        full.streams = 4;
        full.downtime_ms = 20;
        full.timeout_s = 2.5;
        full.force_on_timeout = true;
        full.max_bandwidth_mibps = Some(100);
        full.verify_memory = true;
        full.protocol_version = Some(1);
        full.disk_successor = Some("2".into());
        for r in [
            Request::Status,
            Request::Pause,
            Request::Resume,
            Request::Shutdown,
            Request::Announce,
            Request::Snapshot {
                path: "/tmp/a.snap".into(),
                stop: true,
            },
            Request::Migrate(MigrateRequest::new("h:1")),
            Request::Migrate(full),
            Request::MigrateCancel,
            Request::ConsoleInput {
                data: "load 70\n".into(),
                wait_ms: 500,
            },
            Request::DirtyRate { window_ms: 250 },
        ] {
            let line = serde_json::to_string(&r).unwrap();
            assert!(!line.contains('\n'), "{line}");
            assert_eq!(parse_request(&line), Ok(r));
        }
    }

    #[test]
    fn requests_in_the_documented_format_still_parse_with_their_defaults() {
        // docs/api.md's lines, as every released client wrote them.
        assert_eq!(
            parse_request(r#"{"op":"snapshot","path":"/abs/file"}"#),
            Ok(Request::Snapshot {
                path: "/abs/file".into(),
                stop: false
            })
        );
        assert_eq!(
            parse_request(r#"{"op":"migrate","to":"HOST:PORT"}"#),
            Ok(Request::Migrate(MigrateRequest::new("HOST:PORT")))
        );
        let doc = r#"{"op":"migrate","to":"HOST:PORT","streams":2,"downtime_ms":50,"timeout_s":60,"force_on_timeout":false,"max_bandwidth_mibps":null,"verify_memory":false}"#;
        assert_eq!(
            parse_request(doc),
            Ok(Request::Migrate(MigrateRequest::new("HOST:PORT")))
        );
        assert_eq!(
            parse_request(r#"{"op":"migrate_cancel"}"#),
            Ok(Request::MigrateCancel)
        );
        assert_eq!(
            parse_request(r#"{"op":"console_input","data":"load 70\n"}"#),
            Ok(Request::ConsoleInput {
                data: "load 70\n".into(),
                wait_ms: 0
            })
        );
        assert_eq!(
            parse_request(r#"{"op":"dirty_rate"}"#),
            Ok(Request::DirtyRate { window_ms: 200 })
        );
        // The serialized form leaves the optional testing and lease fields out.
        assert_eq!(
            serde_json::to_string(&Request::Migrate(MigrateRequest::new("h:1"))).unwrap(),
            r#"{"op":"migrate","to":"h:1","streams":2,"downtime_ms":50,"timeout_s":60.0,"force_on_timeout":false,"max_bandwidth_mibps":null,"verify_memory":false}"#
        );
    }

    #[test]
    fn answers_keep_their_wire_form() {
        assert_eq!(
            serde_json::to_string(&Response::error("nope")).unwrap(),
            r#"{"ok":false,"error":"nope"}"#
        );
        assert_eq!(Response::ok().to_line(), "{\"ok\":true}\n");
        let st = Response {
            status: Some(status()),
            ..Response::ok()
        };
        let v: serde_json::Value = serde_json::to_value(&st).unwrap();
        assert_eq!(v["status"]["state"], "paused");
        assert_eq!(v["status"]["vcpu_tids"], serde_json::json!([4244, 4245]));
        let p = Response {
            progress: Some(progress()),
            ..Response::ok()
        };
        let v: serde_json::Value = serde_json::to_value(&p).unwrap();
        assert_eq!(v["progress"]["phase"], "stop_and_copy");
        assert_eq!(v["progress"]["expected_downtime_ms"], 4.5);
        assert!(v.get("report").is_none() && v.get("error").is_none());
    }

    #[test]
    fn every_answer_round_trips() {
        for r in [
            Response::ok(),
            Response::error("the VM is not paused"),
            Response {
                status: Some(status()),
                ..Response::ok()
            },
            Response {
                progress: Some(progress()),
                ..Response::ok()
            },
            Response {
                report: Some(report(Outcome::Completed)),
                ..Response::ok()
            },
            Response {
                report: Some(report(Outcome::InDoubt)),
                ..Response::error("no answer to the commit")
            },
        ] {
            assert_eq!(round_trip(&r), r);
        }
        assert_eq!(round_trip(&status()), status());
        assert_eq!(round_trip(&progress()), progress());
        assert_eq!(round_trip(&entry()), entry());
        let mut p = progress();
        p.expected_downtime_ms = None;
        assert_eq!(round_trip(&p), p);
    }

    #[test]
    fn answers_of_the_documented_form_decode_into_the_typed_fields() {
        let status_line = r#"{"ok":true,"status":{
            "name": "vm1", "pid": 4242, "state": "running",
            "vcpus": 2, "vcpu_tids": [4244, 4245],
            "memory_mib": 256, "boot": "pvh", "tsc_khz": 2596132, "uptime_ms": 10234,
            "disks": [{"path": "/var/lib/tern/a.img", "readonly": false,
                       "reads": 10, "writes": 2048, "flushes": 1, "discards": 3,
                       "write_zeroes": 0, "errors": 0}]}}"#;
        let r: Response = serde_json::from_str(status_line).unwrap();
        let st = r.status.unwrap();
        assert_eq!(
            (st.state, st.vcpus, st.disks[0].writes),
            (RunState::Running, 2, 2048)
        );
        // A disk counter an older VMM did not send reads as 0; a newer field is ignored.
        let old_disk = r#"{"path":"a","readonly":true,"reads":1,"writes":0,"flushes":0,"errors":0,"future":1}"#;
        let d: DiskStatus = serde_json::from_str(old_disk).unwrap();
        assert_eq!((d.discards, d.write_zeroes), (0, 0));
        let failed = r#"{"ok":false,"error":"connection refused","report":{"total_ms":3,"downtime_ms":0,
            "rounds":0,"bytes_sent":0,"pages_zero_skipped":0,"throttle_max_pct":0.0,
            "converged":false,"outcome":"failed"}}"#;
        let r: Response = serde_json::from_str(failed).unwrap();
        assert_eq!(r.report.unwrap().outcome, Outcome::Failed);
        let progress_line = r#"{"ok":true,"progress":{"phase":"pre_copy","round":0,"bytes_sent":1,
            "bytes_remaining":2,"dirty_bytes_per_sec":0.0,"bandwidth_bytes_per_sec":0.0,
            "expected_downtime_ms":null,"throttle_pct":0.0,"elapsed_ms":5}}"#;
        let r: Response = serde_json::from_str(progress_line).unwrap();
        assert_eq!(r.progress.unwrap().phase, ProgressPhase::PreCopy);
    }

    #[test]
    fn exit_code_follows_where_the_vm_runs() {
        let all = [
            Outcome::Completed,
            Outcome::Refused,
            Outcome::Cancelled,
            Outcome::TimedOut,
            Outcome::Failed,
            Outcome::InDoubt,
            Outcome::FailedPostCopy,
        ];
        let got: Vec<String> = all
            .iter()
            .map(|o| {
                format!(
                    "{} {} exit {} source runs {}",
                    serde_json::to_string(o).unwrap(),
                    o.words(),
                    o.exit_code(),
                    o.source_runs()
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                "\"completed\" completed exit 0 source runs false",
                "\"refused\" refused exit 1 source runs true",
                "\"cancelled\" cancelled exit 1 source runs true",
                "\"timed_out\" timed out exit 1 source runs true",
                "\"failed\" failed exit 1 source runs true",
                "\"in_doubt\" in doubt exit 3 source runs false",
                "\"failed_post_copy\" failed in post-copy (the VM is lost) exit 4 source runs false",
            ]
        );
    }

    #[test]
    fn report_json_has_exactly_the_documented_fields() {
        let v: serde_json::Value =
            serde_json::from_str(&report(Outcome::TimedOut).to_json()).unwrap();
        let mut keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "bytes_sent",
                "converged",
                "downtime_ms",
                "outcome",
                "pages_zero_skipped",
                "rounds",
                "throttle_max_pct",
                "total_ms"
            ]
        );
        assert_eq!(v["outcome"], "timed_out");
        assert_eq!(v["downtime_ms"], 9);
        assert_eq!(v["throttle_max_pct"], 97.5);
    }

    #[test]
    fn rounds_detail_round_trips_and_a_report_without_it_still_reads() {
        let mut r = report(Outcome::Completed);
        r.rounds_detail = Some(Box::new(vec![
            RoundFigures {
                round: 0,
                us: 260_000,
                pages_data: 16_000,
                pages_zero: 500,
                bytes: 66_000_000,
                dirty_pages: 1_200,
                throttle_pct: 0.0,
                decision: RoundDecision::Shrink,
            },
            RoundFigures {
                round: 1,
                us: 3_000,
                pages_data: 1_200,
                pages_zero: 0,
                bytes: 4_254_592,
                dirty_pages: 0,
                throttle_pct: 0.0,
                decision: RoundDecision::StopAndCopy,
            },
        ]));
        let text = r.to_json();
        assert!(text.contains(r#""decision":"shrink""#), "{text}");
        assert!(text.contains(r#""decision":"stop_and_copy""#), "{text}");
        let back: MigrationReport = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
        // A reader that knows no rounds_detail (an older agent) ignores it, and this one reads
        // an older VMM's report as having none.
        #[derive(Deserialize)]
        struct Older {
            rounds: u32,
        }
        assert_eq!(serde_json::from_str::<Older>(&text).unwrap().rounds, 3);
        let older = report(Outcome::Completed).to_json();
        assert!(!older.contains("rounds_detail"), "{older}");
        let read: MigrationReport = serde_json::from_str(&older).unwrap();
        assert_eq!(read.rounds_detail, None);
        for d in [
            RoundDecision::Continue,
            RoundDecision::Throttle,
            RoundDecision::Release,
            RoundDecision::Shrink,
            RoundDecision::SwitchOver,
            RoundDecision::ForcedSwitchOver,
            RoundDecision::Abort,
            RoundDecision::PostCopy,
            RoundDecision::StopAndCopy,
            RoundDecision::Unfinished,
        ] {
            assert_eq!(
                serde_json::to_value(d).unwrap(),
                serde_json::Value::from(d.as_str())
            );
        }
    }

    #[test]
    fn phase_and_state_names_match_their_serde_names() {
        for p in [
            ProgressPhase::Setup,
            ProgressPhase::PreCopy,
            ProgressPhase::StopAndCopy,
            ProgressPhase::Commit,
        ] {
            assert_eq!(serde_json::to_value(p).unwrap(), p.as_str());
        }
        for s in [
            RunState::Running,
            RunState::Paused,
            RunState::Transitioning,
            RunState::Stopping,
        ] {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
    }

    #[test]
    fn the_runtime_entry_keeps_its_documented_form() {
        let v = serde_json::to_value(entry()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"name": "vm1", "pid": 4242, "api_sock": "/run/tern/vms/vm1.sock",
                "vcpu_tids": [4244, 4245], "vcpus": 2, "memory_mib": 256,
                "started_unix_ms": 1765051200000u64, "pid_start_ticks": 812345})
        );
    }

    #[test]
    fn an_entry_of_an_older_vmm_without_the_later_fields_still_reads() {
        let old = r#"{"name":"old","pid":7,"api_sock":null,"vcpu_tids":[8],"future":true}"#;
        let e: RuntimeEntry = serde_json::from_str(old).unwrap();
        assert_eq!(e, RuntimeEntry::new("old", 7, vec![8]));
        // A negative thread id is no thread.
        let bad = r#"{"name":"x","pid":7,"api_sock":null,"vcpu_tids":[-1]}"#;
        assert!(serde_json::from_str::<RuntimeEntry>(bad).is_err());
    }

    #[test]
    fn an_entry_belongs_to_the_process_with_its_pid_and_start_time() {
        let mut e = entry();
        assert!(e.is_written_by(Some(812_345)));
        assert!(!e.is_written_by(Some(812_346)), "same PID, another process");
        assert!(!e.is_written_by(None), "no such process");
        e.pid_start_ticks = None;
        assert!(e.is_written_by(Some(1)), "an older entry: the PID decides");
    }

    #[test]
    fn start_ticks_are_field_22_even_when_the_command_name_has_spaces_and_parens() {
        let stat = "4242 (a b) c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 5 6 0 0 20 0 3 0 987654 \
                    1000 200 18446744073709551615";
        assert_eq!(parse_stat_start_ticks(stat), Some(987654));
        assert_eq!(parse_stat_start_ticks("4242 (x) S 1 2"), None);
        assert_eq!(parse_stat_start_ticks("garbage"), None);
    }

    #[test]
    fn entry_and_socket_paths_follow_the_name() {
        let d = Path::new(DEFAULT_RUNTIME_DIR);
        assert_eq!(entry_path(d, "web"), Path::new("/run/tern/vms/web.json"));
        assert_eq!(
            default_api_sock(d, "web"),
            Path::new("/run/tern/vms/web.sock")
        );
    }
}
