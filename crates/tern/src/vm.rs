//! `tern vm …` (placeholder until its issue lands; the owner replaces this file).

use std::process::ExitCode;

/// Subcommands of `tern vm`.
#[derive(Debug, clap::Subcommand)]
pub enum VmCommand {
    /// Not built yet.
    Unavailable,
}

pub fn run(cmd: VmCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        VmCommand::Unavailable => anyhow::bail!("`tern vm` is not built yet"),
    }
}
