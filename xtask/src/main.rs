//! `cargo xtask`: developer tasks (the tests as CI runs them, benchmarks against peers).

use clap::{Parser, Subcommand};

mod ci;

#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Run every check and test the way CI does (needs root and /dev/kvm).
    Test,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Test => ci::test(),
    }
}
