//! `cargo xtask`: developer tasks (the tests as CI runs them, benchmarks against peers).

use clap::{Parser, Subcommand};

mod bench_automation;
mod bench_boot;
mod bench_cluster;
mod bench_common;
mod bench_faults;
mod bench_migrate;
mod bench_net;
mod bench_park;
mod bench_sim;
mod bench_soak;
mod bench_tls;
mod bench_volume;
mod ci;
mod fuzz;
mod fuzz_seeds;
mod tidy;

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
    /// Check the rules of ARCHITECTURE.md that a machine can check (pure modules, anyhow, unsafe,
    /// silently defaulted protocol fields); prints `path:line: rule: what` for every breach.
    Tidy,
    /// Benchmarks against peers (figures printed, compared in the same run).
    #[command(subcommand)]
    Bench(Bench),
    /// Build every fuzz target in fuzz/ and run each for a bounded time on its seed corpus
    /// (needs cargo-fuzz); `--seed-corpus` adds the generated seeds that are missing from the corpora.
    Fuzz(fuzz::Args),
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Time from process start to the test guest's first heartbeat, and VMM memory overhead:
    /// `tern vm run` vs QEMU microvm on the same ELF.
    Boot(bench_boot::BootArgs),
    /// Live migration of the test guest, Tern vs QEMU microvm (tuned to Tern's settings, and its
    /// defaults), on loopback.
    Migrate(bench_migrate::MigrateArgs),
    /// The longest stall a client streaming requests sees during a live migration between two
    /// network-namespace hosts, and the guest's echo throughput: Tern vs QEMU.
    NetMigrate(bench_net::NetMigrateArgs),
    /// Core parking: energy and capacity shortfall vs no parking and a naive rule; daemon CPU cost.
    Park(bench_park::BenchParkArgs),
    /// Cluster shared volume: direct and redirected 4 KiB I/O vs raw file and qemu-nbd; take-over time.
    Volume(bench_volume::Args),
    /// Cluster shared volume under random faults: acknowledged writes lost and stale writes
    /// landed (goal 0), the longest unavailability per kind of fault.
    Faults(bench_faults::Args),
    /// Simulator: one PlanetLab day per reference policy, 20k/40k synthetic, the full sweep.
    Sim(bench_sim::Args),
    /// Cluster control plane: creating 20 VMs, HA restart and controller fail-over times on a
    /// `tern cluster up` lab; the controller core's decision times at 100 to 10,000 hosts.
    Cluster(bench_cluster::Args),
    /// The automation loop live (`tern demo cluster`) against tern-sim on the same scenario:
    /// agreement, energy saved, predicted migration times; its cycle time live and at 10,000 hosts.
    Automation(bench_automation::Args),
    /// What trust costs: migration over mutual TLS vs plain and vs QEMU's TLS migration, NBD over
    /// TLS vs `qemu-nbd --tls-creds`, seccomp's cost on the guest's echo throughput.
    Tls(bench_tls::Args),
    /// Migration soak: N consecutive live migrations between two netns hosts of a guest writing
    /// memory, with a shared-volume disk and a TCP client; failures, broken connections, pauses,
    /// VMM and volume-node RSS and file descriptors per hop (goal: flat).
    Soak(bench_soak::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Test => ci::test(),
        Task::Tidy => tidy::run(),
        Task::Fuzz(args) => fuzz::run(args),
        Task::Bench(Bench::Boot(args)) => bench_boot::run(args),
        Task::Bench(Bench::Migrate(args)) => bench_migrate::run(args),
        Task::Bench(Bench::NetMigrate(args)) => bench_net::run(args),
        Task::Bench(Bench::Park(args)) => bench_park::run(args),
        Task::Bench(Bench::Volume(args)) => bench_volume::run(args),
        Task::Bench(Bench::Faults(args)) => bench_faults::run(args),
        Task::Bench(Bench::Sim(args)) => bench_sim::run(args),
        Task::Bench(Bench::Cluster(args)) => bench_cluster::run(args),
        Task::Bench(Bench::Automation(args)) => bench_automation::run(args),
        Task::Bench(Bench::Tls(args)) => bench_tls::run(args),
        Task::Bench(Bench::Soak(args)) => bench_soak::run(args),
    }
}
