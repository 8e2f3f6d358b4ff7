//! `cargo xtask bench sim`: simulator speed and memory against CloudSim 3.0.3 and CloudSim Plus.
//!
//! Runs the release `tern` binary as a child for each case (so each gets its own peak-RSS figure):
//! one full PlanetLab day (20110303, CloudSim file order) per reference policy, the synthetic
//! 20,000-host / 40,000-VM data centre, optionally 100,000 hosts, and the full 10-day × reference-policy
//! sweep on two threads. Peer figures are from the reference notes (CloudSim 3.0.3 measured on this kind
//! of machine; CloudSim Plus from its docs/performance.md).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// Options of `cargo xtask bench sim`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Also run a synthetic 100,000-host / 200,000-VM data centre under DVFS (about half a minute; the
    /// dynamic policies take many minutes at that size).
    #[arg(long)]
    with_100k: bool,
    /// Skip the 20k/40k synthetic case.
    #[arg(long)]
    no_synthetic: bool,
}

/// CloudSim 3.0.3 per simulated PlanetLab day on 2 cores (reference notes §1.8): median, range.
const CLOUDSIM_DAY_S: (f64, f64, f64) = (44.0, 30.0, 70.0);
/// CloudSim 3.0.3 resident memory per run (reference notes §1.8).
const CLOUDSIM_RSS_MB: f64 = 2300.0;
/// CloudSim Plus, 20k hosts / 40k VMs (its docs/performance.md): 1.3–15.7 min.
const CLOUDSIM_PLUS_20K_S: (f64, f64) = (78.0, 942.0);

#[derive(Debug)]
struct Measured {
    wall_s: f64,
    cpu_s: f64,
    rss_mb: f64,
    stdout: String,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn measure(bin: &Path, args: &[&str]) -> anyhow::Result<Measured> {
    let out = Command::new(bin)
        .args(args)
        .arg("--resources")
        .current_dir(root())
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("tern {} failed: {stderr}", args.join(" "));
    }
    let line = stderr
        .lines()
        .find(|l| l.starts_with("resources:"))
        .context("no resources line from tern")?;
    let field = |k: &str| -> anyhow::Result<f64> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {k} in `{line}`"))
    };
    Ok(Measured {
        wall_s: field("wall_s=")?,
        cpu_s: field("cpu_s=")?,
        rss_mb: field("peak_rss_kb=")? / 1024.0,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
    })
}

fn json_field(json: &str, key: &str) -> String {
    let pat = format!("\"{key}\":");
    json.split(&pat)
        .nth(1)
        .map(|r| r.split([',', '}']).next().unwrap_or("").to_string())
        .unwrap_or_default()
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "-p", "tern"])
        .current_dir(root())
        .status()?;
    anyhow::ensure!(status.success(), "cargo build --release -p tern failed");
    let bin = root().join("target/release/tern");
    // CloudSim's recorded file order (built into tern; also its default with --model cloudsim)
    let order = "cloudsim";
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("tern sim benchmark ({cores} cores; peer figures from the reference notes)\n");
    println!(
        "| case | tern wall s | tern CPU s | tern peak RSS MB | peer | speed-up (wall) | memory ratio | result |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let policies = [
        "dvfs",
        "thr-mmt-1.0",
        "thr-mmt-0.8",
        "iqr-mmt-1.5",
        "mad-mmt-2.5",
        "lrr-mmt-1.2",
        "lr-mmt-1.2",
    ];
    let mut worst_speedup = f64::INFINITY;
    let mut worst_mem = 0.0f64;
    for p in policies {
        let m = measure(
            &bin,
            &[
                "sim",
                "run",
                "--day",
                "20110303",
                "--policy",
                p,
                "--trace-order",
                order,
                "--json",
            ],
        )?;
        let speedup = CLOUDSIM_DAY_S.0 / m.wall_s;
        let mem = m.rss_mb / CLOUDSIM_RSS_MB;
        if p != "dvfs" {
            worst_speedup = worst_speedup.min(speedup);
        }
        worst_mem = worst_mem.max(mem);
        println!(
            "| day 20110303 {p} | {:.3} | {:.2} | {:.1} | CloudSim 3.0.3: {:.0} s median ({:.0}–{:.0} s), ~{:.1} GB | {speedup:.0}× | 1/{:.0} | {} kWh, {} migrations |",
            m.wall_s,
            m.cpu_s,
            m.rss_mb,
            CLOUDSIM_DAY_S.0,
            CLOUDSIM_DAY_S.1,
            CLOUDSIM_DAY_S.2,
            CLOUDSIM_RSS_MB / 1000.0,
            1.0 / mem,
            json_field(&m.stdout, "energy_kwh")
                .chars()
                .take(7)
                .collect::<String>(),
            json_field(&m.stdout, "migrations"),
        );
    }
    if !args.no_synthetic {
        let m = measure(
            &bin,
            &[
                "sim",
                "run",
                "--synthetic",
                "40000",
                "--hosts",
                "20000",
                "--policy",
                "lr-mmt-1.2",
                "--json",
            ],
        )?;
        println!(
            "| synthetic 20,000 hosts / 40,000 VMs, lr-mmt-1.2, 24 h | {:.2} | {:.2} | {:.1} | CloudSim Plus: 1.3–15.7 min | {:.0}–{:.0}× | — | {} migrations |",
            m.wall_s,
            m.cpu_s,
            m.rss_mb,
            CLOUDSIM_PLUS_20K_S.0 / m.wall_s,
            CLOUDSIM_PLUS_20K_S.1 / m.wall_s,
            json_field(&m.stdout, "migrations"),
        );
    }
    if args.with_100k {
        let m = measure(
            &bin,
            &[
                "sim",
                "run",
                "--synthetic",
                "200000",
                "--hosts",
                "100000",
                "--policy",
                "dvfs",
                "--json",
            ],
        )?;
        println!(
            "| synthetic 100,000 hosts / 200,000 VMs, dvfs, 24 h | {:.2} | {:.2} | {:.1} | — | — | — | {} kWh |",
            m.wall_s,
            m.cpu_s,
            m.rss_mb,
            json_field(&m.stdout, "energy_kwh"),
        );
    }
    let m = measure(
        &bin,
        &[
            "sim",
            "sweep",
            "--trace-order",
            "cloudsim",
            "--policies",
            "reference",
            "--threads",
            "2",
            "--csv",
            "/dev/null",
        ],
    )?;
    let cloudsim_sweep = 10.0 * 7.0 * CLOUDSIM_DAY_S.0 / 2.0;
    println!(
        "| full sweep: 10 days × 7 policies + NPA, 2 threads | {:.2} | {:.2} | {:.1} | CloudSim 3.0.3: ≈{:.0} min (70 runs × {:.0} s / 2 cores) | {:.0}× | 1/{:.0} | goal < 10 s |",
        m.wall_s,
        m.cpu_s,
        m.rss_mb,
        cloudsim_sweep / 60.0,
        CLOUDSIM_DAY_S.0,
        cloudsim_sweep / m.wall_s,
        CLOUDSIM_RSS_MB / m.rss_mb,
    );
    println!(
        "\nGoals: ≥ 100× faster than CloudSim per simulated day (worst dynamic policy here: {worst_speedup:.0}×), ≤ 1/10 of its memory (worst here: 1/{:.0}), full sweep < 10 s on 2 cores ({:.2} s).",
        1.0 / worst_mem,
        m.wall_s
    );
    println!("Wall times depend on machine load; CPU seconds are the steadier figure.");
    Ok(())
}
