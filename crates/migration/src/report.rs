//! Progress figures during a migration and the final report (JSON on `--json`).
//!
//! The types belong to the VMM control protocol, so they are defined in `tern-api` (which every
//! client links, without this crate or KVM) and used here as they are: the sender machine fills
//! them in, the VMM streams them to its client, and `tern vm migrate` and the agent read them back.

#![deny(clippy::disallowed_methods)]

pub use tern_api::vmm::{
    DowntimeStep, MigrationReport, Outcome, PauseStep, PostCopyFigures, Progress, ProgressPhase,
    RoundDecision, RoundFigures,
};
