//! `cargo xtask bench tls`: what trust costs. Migration with and without mutual TLS (and QEMU's TLS
//! migration), NBD 4 KiB IOPS over TLS against `qemu-nbd --tls-creds`, and seccomp's cost on the guest's
//! echo throughput. Each section lives in its own module and prints its own table.

mod migration;
mod nbd;
mod seccomp;

use clap::{Args as ClapArgs, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Section {
    Migration,
    Nbd,
    Seccomp,
}

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Run only these sections (default: all three).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Section>,
    /// Runs per configuration; the tables show medians.
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let wanted = |s: Section| args.only.is_empty() || args.only.contains(&s);
    if wanted(Section::Migration) {
        migration::run(args.runs)?;
    }
    if wanted(Section::Nbd) {
        nbd::run(args.runs)?;
    }
    if wanted(Section::Seccomp) {
        seccomp::run(args.runs)?;
    }
    Ok(())
}
