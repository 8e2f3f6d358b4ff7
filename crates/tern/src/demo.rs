//! `tern demo` (placeholder until the VMM lands; replaced by its owner).

use std::process::ExitCode;

/// Options of `tern demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {}

pub fn run(_args: DemoArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`tern demo` is not built yet")
}
