//! `tern image …` (placeholder until its issue lands; the owner replaces this file).

use std::process::ExitCode;

/// Subcommands of `tern image`.
#[derive(Debug, clap::Subcommand)]
pub enum ImageCommand {
    /// Not built yet.
    Unavailable,
}

pub fn run(cmd: ImageCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ImageCommand::Unavailable => anyhow::bail!("`tern image` is not built yet"),
    }
}
