//! `cargo xtask`: developer tasks (the tests as CI runs them, benchmarks against peers).

use clap::{Parser, Subcommand};

mod bench_sim;

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
    /// Benchmarks against peers.
    #[command(subcommand)]
    Bench(Bench),
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Simulator: one PlanetLab day per reference policy, 20k/40k synthetic, the full sweep.
    Sim(bench_sim::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Test => test(),
        Task::Bench(Bench::Sim(args)) => bench_sim::run(args),
    }
}

fn test() -> anyhow::Result<()> {
    let status = std::process::Command::new(env!("CARGO"))
        .args(["test", "--workspace", "--all-targets"])
        .status()?;
    anyhow::ensure!(status.success(), "cargo test failed");
    Ok(())
}
