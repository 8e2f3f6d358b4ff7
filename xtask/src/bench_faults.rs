//! `cargo xtask bench faults`: the volume's randomized fault test (`crates/tern/tests/
//! volume_faults.rs`) at scale — many acknowledged writes under many random faults — with its
//! figures: operations, faults of each kind, acknowledged writes lost and stale writes landed
//! (goal 0 for both), and the longest wait for an acknowledgement after each kind of fault,
//! beside sanlock's and Ceph's documented timings.
//!
//! It runs the test as the test suite does (a debug build: its writers are the test binary),
//! with `TERN_FAULT_OPS`, `TERN_FAULT_FAULTS` and, if given, `TERN_FAULT_SEED`, and reads the
//! test's summary line.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

use crate::bench_common::workspace_root;

/// Options of the fault benchmark.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Acknowledged writes to reach.
    #[arg(long, default_value_t = 100_000)]
    ops: u64,
    /// Faults to inject.
    #[arg(long, default_value_t = 1_000)]
    faults: u64,
    /// Replay a fault schedule.
    #[arg(long)]
    seed: Option<u64>,
    /// One fault at a time: inject the next this many ms after the previous one healed (0:
    /// a fault every 0.1-0.6 s, overlapping). Isolated faults give each kind's own wait.
    #[arg(long, default_value_t = 0)]
    spacing_ms: u64,
}

/// Peers' documented timings: how long until another host may write after a holder is lost.
const PEERS: &[(&str, &str)] = &[
    (
        "sanlock (io_timeout 10 s)",
        "host_dead_seconds 140 s: pids killed from id_renewal_fail 80 s, watchdog reset by 120-139 s, \
         others take the lease at 140 s after the last good renewal (src/timeouts.h)",
    ),
    (
        "Ceph RBD exclusive-lock",
        "osd_client_watch_timeout 30 s before a dead holder's watch expires and its lock is \
         broken (after blocklisting it at the OSDs)",
    ),
];

/// Runs the randomized fault test with the given scale and prints its figures.
pub fn run(args: Args) -> anyhow::Result<()> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root())
        .args([
            "test",
            "-p",
            "tern",
            "--test",
            "volume_faults",
            "--",
            "--nocapture",
        ])
        .env("TERN_FAULT_OPS", args.ops.to_string())
        .env("TERN_FAULT_FAULTS", args.faults.to_string())
        .env("TERN_FAULT_SPACING_MS", args.spacing_ms.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(s) = args.seed {
        cmd.env("TERN_FAULT_SEED", s.to_string());
    }
    eprintln!(
        "bench faults: {} acknowledged writes, {} faults, spacing {} ms (cargo test -p tern --test \
         volume_faults)",
        args.ops, args.faults, args.spacing_ms
    );
    let out = cmd.output().context("running cargo test")?;
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let Some(line) = text
        .lines()
        .find(|l| l.starts_with("volume_faults: seed=") && l.contains(" acknowledged="))
    else {
        bail!("the fault test printed no summary:\n{text}");
    };
    let fields = parse_summary(line);
    println!("## Randomized volume faults (cargo xtask bench faults)\n");
    println!("| figure | value |");
    println!("|---|---|");
    for key in [
        "seed",
        "spacing_ms",
        "acknowledged",
        "faults",
        "lost",
        "stale",
        "violations",
        "epochs",
        "nodes_killed_by_commit_watchdog",
        "elapsed_ms",
    ] {
        if let Some(v) = fields.get(key) {
            println!("| {key} | {v} |");
        }
    }
    if let Some(gaps) = fields.get("longest_ack_gap_ms") {
        println!("| longest wait for an acknowledgement after a fault, ms | {gaps} |");
    }
    // What happened around the longest wait after each kind of fault (the test's timelines).
    let mut in_timeline = false;
    for l in text.lines() {
        if l.starts_with("volume_faults: longest wait after ") {
            if !in_timeline {
                println!("\nThe longest wait after each kind of fault, and what happened then:\n");
                println!("```");
            }
            in_timeline = true;
            println!("{l}");
        } else if in_timeline && l.starts_with("  ") {
            println!("{l}");
        } else if in_timeline {
            in_timeline = false;
            println!("```");
        }
    }
    if in_timeline {
        println!("```");
    }
    println!("\nPeers (documented, not measured here):\n");
    for (peer, timing) in PEERS {
        println!("* {peer}: {timing}");
    }
    if !out.status.success() {
        bail!("the fault test failed: {line}\n{}", tail(&text, 40));
    }
    Ok(())
}

/// `key=value` fields of the summary line; values in braces (`{...}`) are kept whole.
fn parse_summary(line: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = line.trim_start_matches("volume_faults:").trim();
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].trim().to_owned();
        let after = &rest[eq + 1..];
        let (value, next) = if after.starts_with('{') {
            let end = after.find('}').map_or(after.len(), |i| i + 1);
            (&after[..end], &after[end..])
        } else {
            let end = after.find(' ').unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        out.insert(key, value.to_owned());
        rest = next.trim();
    }
    out
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_line_is_read_field_by_field() {
        let f = parse_summary(
            "volume_faults: seed=7 acknowledged=2011 blocks_checked=128 epochs=6 \
             faults={\"partition\": 6, \"writer_kill\": 9} violations=0 lost=0 stale=0 \
             elapsed_ms=21698 longest_ack_gap_ms={\"partition\": 17}",
        );
        assert_eq!(f["seed"], "7");
        assert_eq!(f["acknowledged"], "2011");
        assert_eq!(f["faults"], "{\"partition\": 6, \"writer_kill\": 9}");
        assert_eq!(f["stale"], "0");
        assert_eq!(f["longest_ack_gap_ms"], "{\"partition\": 17}");
    }
}
