//! `tern park …` (placeholder until its issue lands; the owner replaces this file).

use std::process::ExitCode;

/// Subcommands of `tern park`.
#[derive(Debug, clap::Subcommand)]
pub enum ParkCommand {
    /// Not built yet.
    Unavailable,
}

pub fn run(cmd: ParkCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ParkCommand::Unavailable => anyhow::bail!("`tern park` is not built yet"),
    }
}
