//! `cargo xtask`: developer tasks (the tests as CI runs them, benchmarks against peers).

use clap::{Parser, Subcommand};

mod bench_volume;

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
    /// Benchmarks against peers, measured in the same run.
    #[command(subcommand)]
    Bench(Bench),
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Cluster shared volume: direct and redirected 4 KiB I/O vs raw file and qemu-nbd; take-over time.
    Volume(bench_volume::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Test => test(),
        Task::Bench(Bench::Volume(args)) => bench_volume::run(args),
    }
}

fn test() -> anyhow::Result<()> {
    let status = std::process::Command::new(env!("CARGO"))
        .args(["test", "--workspace", "--all-targets"])
        .status()?;
    anyhow::ensure!(status.success(), "cargo test failed");
    Ok(())
}
