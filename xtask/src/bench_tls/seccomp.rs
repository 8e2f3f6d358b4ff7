//! The seccomp section of `cargo xtask bench tls`: what the VMM's per-thread seccomp filters cost
//! the guest. The test guest's TCP echo over virtio-net (a tap on a tern-netlab host bridge, the
//! client in the client namespace: `bench_net`'s workload) under `--seccomp kill` and under
//! `--seccomp off`, one fresh VM per measurement, the two modes interleaved so that both see the
//! same host noise; medians. Every guest exit, virtio-net frame and disk request passes through
//! the filters, so the echo is where they would show.
//!
//! The echo's throughput on this shared machine varies far more than 3 % from run to run, so the
//! section also measures the filters' own price directly: the time of a 1-byte `pread` (a syscall
//! the vCPU threads make for virtio-blk) on a thread under the vCPU filter against an unfiltered
//! thread, both in this process.

use std::os::unix::fs::FileExt;
use std::time::Instant;

use anyhow::{Context, ensure};
use tern_netlab::{Topology, TopologySpec};
use tern_vmm::seccomp::{self, FilterOptions, SeccompMode, ThreadKind};

use crate::bench_common::{build_release_tern, load_average, scratch_dir};
use crate::bench_net::{median, tern_throughput};

/// Bytes echoed per measurement.
const BYTES: usize = 16 << 20;

pub fn run(runs: usize) -> anyhow::Result<()> {
    ensure!(runs > 0, "--runs must be at least 1");
    let tern = build_release_tern()?;
    let dir = scratch_dir("tls-seccomp")?;
    let mut spec = TopologySpec::new("bsc", 1);
    spec.replace_stale = true;
    let topo = Topology::build(spec)?;
    let load_before = load_average();
    let (mut kill, mut off) = (Vec::new(), Vec::new());
    for i in 0..runs {
        // Alternate which mode goes first, so neither always follows the other.
        let order: [(&str, &mut Vec<f64>); 2] = if i % 2 == 0 {
            [("kill", &mut kill), ("off", &mut off)]
        } else {
            [("off", &mut off), ("kill", &mut kill)]
        };
        for (mode, out) in order {
            let mbps = tern_throughput(&topo, &tern, &dir, BYTES, &["--seccomp", mode])?;
            println!("run {i}: --seccomp {mode:<4} {mbps:.2} MB/s");
            out.push(mbps);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let (plain_ns, filtered_ns) = syscall_cost_ns()?;
    let (k, o) = (median(kill.clone()), median(off.clone()));
    let range = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(0.0, f64::max);
        format!("{lo:.2}-{hi:.2}")
    };
    println!(
        "\nseccomp's cost on the guest's TCP echo over virtio-net ({} MiB per run, {runs} runs per mode, one VM each; load {load_before} -> {})",
        BYTES >> 20,
        load_average()
    );
    println!("  {:<16} {:>12} {:>14}", "", "median MB/s", "range MB/s");
    println!("  {:<16} {:>12.2} {:>14}", "--seccomp off", o, range(&off));
    println!(
        "  {:<16} {:>12.2} {:>14}",
        "--seccomp kill",
        k,
        range(&kill)
    );
    println!("  cost: {:.1} % (goal < 3 %)", (o - k) / o * 100.0);
    println!(
        "  one syscall (pread of 1 byte): {plain_ns:.0} ns unfiltered, {filtered_ns:.0} ns under the vCPU filter (+{:.0} ns)",
        filtered_ns - plain_ns
    );
    Ok(())
}

/// Nanoseconds per 1-byte `pread` of /dev/zero: on an unfiltered thread, and on a thread that has
/// entered the vCPU filter (`--seccomp kill` as the VMM configures it); the best of 5 rounds each.
fn syscall_cost_ns() -> anyhow::Result<(f64, f64)> {
    const CALLS: u32 = 200_000;
    seccomp::configure(SeccompMode::Kill, FilterOptions::default())
        .context("cannot compile the filters")?;
    let round = |filtered: bool| -> anyhow::Result<f64> {
        let zero = std::fs::File::open("/dev/zero")?;
        std::thread::spawn(move || -> anyhow::Result<f64> {
            if filtered {
                seccomp::enter(ThreadKind::Vcpu)?;
            }
            let mut b = [0u8; 1];
            let t = Instant::now();
            for _ in 0..CALLS {
                zero.read_at(&mut b, 0)?;
            }
            Ok(t.elapsed().as_nanos() as f64 / f64::from(CALLS))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the timing thread panicked"))?
    };
    let (mut plain, mut filtered) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..5 {
        plain = plain.min(round(false)?);
        filtered = filtered.min(round(true)?);
    }
    Ok((plain, filtered))
}
