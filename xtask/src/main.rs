//! `cargo xtask`: developer tasks (the tests as CI runs them, benchmarks against peers).

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Run every test the way CI does.
    Test,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Test => test(),
    }
}

fn test() -> anyhow::Result<()> {
    let status = std::process::Command::new(env!("CARGO"))
        .args(["test", "--workspace", "--all-targets"])
        .status()?;
    anyhow::ensure!(status.success(), "cargo test failed");
    Ok(())
}
