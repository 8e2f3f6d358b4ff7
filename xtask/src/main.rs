//! `cargo xtask`: developer tasks (the tests as CI runs them, benchmarks against peers).

use clap::{Parser, Subcommand};

mod bench_boot;
mod bench_net;
mod bench_migrate;
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
    /// Benchmarks against peers (figures printed, compared in the same run).
    #[command(subcommand)]
    Bench(Bench),
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Time from process start to the test guest's first heartbeat, and VMM memory overhead:
    /// `tern vm run` vs QEMU microvm on the same ELF.
    Boot(bench_boot::BootArgs),
    /// The longest stall a client streaming TCP echo requests sees while the guest is live-migrated
    /// between two network-namespace hosts, and the guest's echo throughput: Tern vs QEMU.
    NetMigrate(bench_net::NetMigrateArgs),
    /// Live migration of the test guest (idle, 20,000 pages/s, max rate): Tern vs QEMU microvm
    /// (defaults and 10 GB/s) on loopback; guest-visible pause, total time, bytes, rounds.
    Migrate(bench_migrate::MigrateArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Test => ci::test(),
        Task::Bench(Bench::Boot(args)) => bench_boot::run(args),
        Task::Bench(Bench::NetMigrate(args)) => bench_net::run(args),
        Task::Bench(Bench::Migrate(args)) => bench_migrate::run(args),
    }
}
