//! Live migration of a running VM over TCP: the wire format, the sender and receiver state
//! machines, the convergence policy, and thin TCP shells that drive them.
//!
//! # Layers
//!
//! | module | what | I/O |
//! |---|---|---|
//! | [`config`] | memory layout and the VM description both ends must agree on | none |
//! | [`wire`] | frames: encode, decode (never trusting a length or an address); the memory digest | none |
//! | [`machine::policy`] | bandwidth estimate, switch-over rule, throttle schedule, timeout, token bucket | none |
//! | [`machine::pages`] | which pages a round sends, on which stream, which zero pages are skipped | none |
//! | [`machine::sender`] | the source's phases, what the target's answers mean, what a failure does to the source VM, the outcome | none |
//! | [`machine::receiver`] | the target's phases: which frame it accepts on which stream when | none |
//! | [`machine::postcopy`] | post-copy (`--post-copy-after N`): when to switch, the owed pages, what a target fault asks for, demand before push, when it is over, what a failure does | none |
//! | [`report`] | progress snapshots and the final JSON report | none |
//! | [`vm`] | [`MigrationSource`] / [`MigrationTarget`]: what the VMM implements | — |
//! | [`tcp::send`], [`tcp::recv`] | TCP streams, threads, the clock, progress callbacks, cancel | TCP |
//! | [`tcp::common`] | what both shells use: [`CancelToken`], [`error_chain`] | — |
//! | [`tcp::postcopy`] | post-copy's I/O: the source's demand and push, the target's fault thread and push reader (userfaultfd through [`MissingMemory`]) | TCP |
//!
//! Everything outside [`tcp`] is pure: no clock, socket, thread or file; time is an argument
//! (time since the migration started). Every decision — which pages go in a round, what a frame
//! from the other side means in the current phase, what a failure does to the source VM, the
//! outcome — is made in [`machine`]; the shells read frames and VM calls into events for the
//! machines and carry out what they answer. The two shells do not import each other.
//!
//! # Use
//!
//! The VMM implements [`MigrationSource`] on the running VM and [`MigrationTarget`] on the
//! incoming one; the CLI calls the shells:
//!
//! ```no_run
//! use std::net::TcpListener;
//! use tern_migration::{
//!     CancelToken, MigrateOptions, MigrationSource, MigrationTarget, ReceiveOptions, migrate,
//!     receive,
//! };
//!
//! fn send(vm: &mut impl MigrationSource) {
//!     let opts = MigrateOptions { streams: 4, verify_memory: true, ..Default::default() };
//!     let mut show = |p: &tern_migration::Progress| {
//!         eprintln!("round {} remaining {} B throttle {} %", p.round, p.bytes_remaining, p.throttle_pct)
//!     };
//!     match migrate(vm, "10.0.0.2:4444", &opts, &CancelToken::new(), &mut show) {
//!         Ok(report) => println!("{}", report.to_json()), // the VM runs on the target now
//!         Err(f) => eprintln!("{} (source runs: {})", f.error, f.report.outcome.source_runs()),
//!     }
//! }
//!
//! fn take(vm: &mut impl MigrationTarget) {
//!     let listener = TcpListener::bind("0.0.0.0:4444").unwrap();
//!     match receive(&listener, vm, &ReceiveOptions::default(), &CancelToken::new()) {
//!         Ok(r) => eprintln!("running after {} ms", r.total_ms),
//!         Err(e) => eprintln!("discarded: {e}"),
//!     }
//! }
//! ```
//!
//! # Connections
//!
//! One **control** stream carries the handshake, round acknowledgements, state, verify
//! digest, commit and the answers. `N` **data** streams (`--streams N`) carry pages. Page `p` (numbered over all
//! regions) always travels on data stream `(p / 128) % N`, so two copies of one page are
//! ordered by TCP; the receiver refuses a page on any other data stream
//! ([`machine::receiver::Violation::OffStripe`]).
//!
//! # Sequence
//!
//! ```text
//!  source (running)                                              target (waiting)
//!  ───────────────────────────────────────────────────────────────────────────────────
//!  ctl  Hello{versions, session, streams, VM description} ───▶  version check,
//!                                                                prepare(config)
//!  ctl  ◀── Welcome{version}        or  ◀── Refuse{reason}  (source: outcome "refused")
//!  dataᵢ Join{session, i} ─────────────────────────────────▶  (every stream, once)
//!  start dirty log
//!  round 0: every non-zero page
//!  dataᵢ Pages{round, [addr, data | zero]…} ───────────────▶  write/zero pages
//!  dataᵢ RoundEnd{k} ──────────────────────────────────────▶  (every stream ended k?)
//!  ctl  ◀── RoundAck{k}        (round barrier: time is end to end, no backlog left)
//!  sync dirty log → decision (policy):
//!     Continue / Throttle(pct) → round k+1: pages dirtied since the last sync
//!     Abort (timeout)          → ctl Abort ─────────────────▶  discard
//!     SwitchOver               ↓
//!  pause VM; final sync
//!  dataᵢ Pages{last dirty pages} ──────────────────────────▶
//!  dataᵢ DataEnd{frames, pages} ───────────────────────────▶  per-stream count check
//!  save_state; release_storage (disks' write ownership to the target)
//!  ctl  State{version, bytes} ─────────────────────────────▶
//!  ctl  Verify{chunk crcs}   (with --verify-memory) ───────▶
//!  ctl  Commit ────────────────────────────────────────────▶  all DataEnd seen? state?
//!        ·· from here the source no longer resumes on its own ··   verify digest,
//!                                                                restore_state, resume
//!  ctl  ◀── Running                                             (VM runs here)
//!  outcome "completed": the caller tears the source down
//!
//!  any failure before Commit is written (cancel, timeout, broken stream, corrupt frame,
//!  Failed/Abort from the target):  ctl Abort ──▶ target discards;  source set_throttle(0),
//!  if paused acquire_storage then resume.  ctl ◀── Failed{reason} after Commit: the target
//!  discarded, the source acquires its storage and resumes.  No answer after Commit: outcome
//!  "in_doubt", the source stays paused, its storage released (the target may be running; two
//!  copies must never run).
//! ```
//!
//! # Receiver states
//!
//! ```text
//!                 Hello (versions overlap)            prepare ok → Welcome
//!  AwaitHello ──────────────────────────▶ Preparing ─────────────────────────▶ Receiving
//!      │ Hello (no common version)            │ prepare err → Refuse             │  Join, Pages, DataEnd,
//!      │ → Refuse                             ▼                                  │  State, Verify
//!      └──────────────────────────────▶  Discarded ◀──────────────────────────────┤  (anything else, Abort,
//!                                            ▲                                   │   stream error, idle)
//!                                            │ verify/restore/resume fails       │ Commit, once every
//!                                            │ → Failed{reason}                  ▼ stream ended + state
//!                                            └────────────────────────────── Committing
//!                                                                                │ resume ok → Running
//!                                                                                ▼
//!                                                                             Running
//! ```
//!
//! What each receiver phase accepts (everything else discards the migration):
//!
//! | phase | control stream | data stream `i` |
//! |---|---|---|
//! | AwaitHello | Hello | — (not accepted yet) |
//! | Preparing | — | — |
//! | Receiving | State (once), Verify (once), Commit, Abort | Join (first frame, once), Pages and RoundEnd (after Join, before DataEnd; each page on its stripe's stream; rounds in order), DataEnd (once, counts must match) |
//! | Committing | — | — (nothing may follow DataEnd) |
//! | Running / Discarded | terminal | terminal |
//!
//! # Sender phases
//!
//! `Handshake → PreCopy (rounds) → StopAndCopy (paused) → AwaitingAck → Completed`, and
//! `Failed` from any of them. What a failure does to the source VM depends only on the phase
//! ([`machine::sender::FailureAction`]): before the pause it keeps running (throttle removed);
//! paused, it is resumed; after Commit it is resumed only if the target answered `Failed`, else
//! it stays paused ("in doubt"). The machine also orders the storage hand-over
//! ([`machine::sender::StorageStep`]): `Release` once the paused VM's state is saved (the commit
//! is refused until it succeeded), `Acquire` before every resume, never in doubt.
//! [`machine::sender::Sender::finish`] turns that and how the shell saw the end into the
//! clean-up (tell the target, unthrottle, take the storage back, resume) and the [`Outcome`].
//!
//! # Convergence
//!
//! After every round the dirty log is fetched. With `B` the bandwidth over a sliding window of
//! sending time (bytes over the round's time, less the time spent on runs of pages that were
//! all zero and skipped), capped by `--max-bandwidth`, the switch-over happens when
//! `(dirty bytes + state estimate) / B + restore estimate ≤ downtime budget` (default 50 ms),
//! after up to 3 more rounds while each pays: the pause it is predicted to save is at least what
//! it adds to the total (its fixed cost and what the guest dirties meanwhile, sent once more),
//! so the pause carries little more than the state.
//! Otherwise, from round 1 on (the first round of dirty pages), unless the remainder halved
//! since the last sync, the vCPUs are throttled harder: 20 %, then the run share they keep
//! halves each step (60, 80, 90, 95, 97.5, … up to 99.9 %), applied in slices of at most 10 ms
//! (at 99.9 %: 10 µs of run per 10 ms), so the guest never stops for longer than one slice. A
//! step may be larger: if the measured dirty rate says the next round needs a stronger throttle
//! to fit the budget (`B × budget` dirtied during a round of `remaining / B`), that is used. At
//! the timeout the migration aborts (default) or forces the switch-over.
//!
//! # Versioning
//!
//! Byte 4 of every frame header is the header format (1). The handshake offers a range of
//! protocol versions; the target picks the newest both speak or refuses with both ranges in the
//! reason. A build keeps accepting the previous protocol version when it adds a new one.
//!
//! # Untrusted input
//!
//! A frame's length is checked against its kind's maximum before any payload is read, and the
//! payload buffer grows only with bytes that really arrive; the crc32c must match; counts are
//! bounded; every page address must be page-aligned and lie inside the agreed layout; a verify
//! digest must have exactly the layout's chunk count. The decoder returns errors, never panics
//! (a proptest over random bytes and a cargo-fuzz target check this).

#![forbid(unsafe_code)]

pub mod config;
pub mod machine;
pub mod report;
pub mod tcp;
pub mod thread_start;
pub mod vm;
pub mod wire;

pub use config::{CpuidDigest, MemoryLayout, PAGE_SIZE, Region, VmConfigDescription};
pub use machine::policy::{ConvergenceConfig, OnTimeout, ThrottleSlice};
pub use machine::receiver::StreamName;
pub use report::{MigrationReport, Outcome, Progress, ProgressPhase};
pub use tcp::common::{CancelToken, error_chain};
pub use tcp::recv::{ReceiveError, ReceiveOptions, ReceiveReport, receive, receive_guarded};
pub use tcp::send::{MigrateError, MigrateOptions, MigrationFailure, migrate, migrate_with_tls};
pub use tcp::transport::{ListenGuard, Rejected, TlsClient};
pub use vm::{GuestPages, MigrationSource, MigrationTarget, MissingMemory, PagePlacer, VmError};
