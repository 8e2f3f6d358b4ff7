//! `tern volume …` (placeholder until its issue lands; the owner replaces this file).

use std::process::ExitCode;

/// Subcommands of `tern volume`.
#[derive(Debug, clap::Subcommand)]
pub enum VolumeCommand {
    /// Not built yet.
    Unavailable,
}

pub fn run(cmd: VolumeCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        VolumeCommand::Unavailable => anyhow::bail!("`tern volume` is not built yet"),
    }
}
