//! `tern sim …` (placeholder until its issue lands; the owner replaces this file).

use std::process::ExitCode;

/// Subcommands of `tern sim`.
#[derive(Debug, clap::Subcommand)]
pub enum SimCommand {
    /// Not built yet.
    Unavailable,
}

pub fn run(cmd: SimCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        SimCommand::Unavailable => anyhow::bail!("`tern sim` is not built yet"),
    }
}
