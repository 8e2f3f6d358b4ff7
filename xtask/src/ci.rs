//! `cargo xtask test`: every check and test, the way CI runs them.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail, ensure};

/// Runs formatting, the tidy rules and lint checks, then the whole workspace's tests, then its
/// doctests.
///
/// The KVM, network-namespace and etcd tests need root and `/dev/kvm`; rather than let them be skipped,
/// this refuses to start without them so a run that could not test everything never looks green.
pub fn test() -> anyhow::Result<()> {
    preflight()?;
    cargo(&["fmt", "--all", "--", "--check"])
        .context("formatting differs: run `cargo fmt --all`")?;
    // ARCHITECTURE.md's checkable rules first: a breach names its file and line.
    crate::tidy::run().context("`cargo xtask tidy` found breaches")?;
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])
    .context("clippy found problems")?;
    cargo(&["test", "--workspace", "--all-targets", "--no-fail-fast"]).context("tests failed")?;
    // `--all-targets` leaves out doctests: the examples in the docs run here.
    cargo(&["test", "--workspace", "--doc", "--no-fail-fast"]).context("doctests failed")?;
    Ok(())
}

fn preflight() -> anyhow::Result<()> {
    // The effective user id is the second field of the Uid line.
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .context("no Uid line in /proc/self/status")?;
    if euid != "0" {
        bail!("the tests need root (KVM guests, network namespaces, /run/tern): run as root");
    }
    if !Path::new("/dev/kvm").exists() {
        bail!("/dev/kvm is missing: the VMM tests need KVM (load kvm_intel, kvm_amd or kvm_pvm)");
    }
    let free = free_disk_gib(Path::new("."))?;
    eprintln!("xtask: {free:.1} GiB free on the build disk");
    // A fresh test build with its test images takes about 5 GiB; below this a run would die
    // half-way with ENOSPC inside some compiler, far from the cause.
    ensure!(
        free >= MIN_FREE_GIB,
        "only {free:.1} GiB free on the disk holding the build; the tests need at least \
         {MIN_FREE_GIB} GiB (target/ and /tmp): free some space first"
    );
    Ok(())
}

const MIN_FREE_GIB: f64 = 8.0;

/// Free space, in GiB, on the file system holding `dir` (from POSIX `df -Pk`).
fn free_disk_gib(dir: &Path) -> anyhow::Result<f64> {
    let out = Command::new("df")
        .arg("-Pk")
        .arg(dir)
        .output()
        .context("running df")?;
    ensure!(out.status.success(), "df -Pk {} failed", dir.display());
    let text = String::from_utf8_lossy(&out.stdout);
    // The second line's fourth field is the space available to unprivileged users, in KiB.
    let kib: f64 = text
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|f| f.parse().ok())
        .with_context(|| format!("unexpected df output: {text:?}"))?;
    Ok(kib / (1024.0 * 1024.0))
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    eprintln!("xtask: cargo {}", args.join(" "));
    let status = Command::new(env!("CARGO"))
        .args(args)
        .status()
        .with_context(|| format!("starting cargo {}", args.join(" ")))?;
    ensure!(
        status.success(),
        "cargo {} exited with {status}",
        args.join(" ")
    );
    Ok(())
}
