//! The migration section of `cargo xtask bench tls`: what mutual TLS costs a live migration.
//!
//! The same test guest ELF and workloads as `cargo xtask bench migrate` (its runners, figures and
//! medians are reused: `crate::bench_migrate`), four configurations interleaved run by run so that
//! host noise hits all alike: Tern over plain TCP, Tern over mutual TLS (`--tls-dir` on both ends,
//! certificates from `tern pki`), QEMU tuned as in `bench migrate` (downtime limit = Tern's budget,
//! auto-converge, multifd with Tern's stream count, no cap) over plain TCP, and the same QEMU over
//! TLS (`tls-creds-x509` objects with client-certificate verification on, from the very same
//! certificate directories, and `migrate-set-parameters tls-creds`). Goals: Tern's TLS pause within
//! +10 % of its plain pause and its total time within +25 %; Tern's TLS pause ≤ 0.5× QEMU's TLS
//! pause.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, ensure};
use tern_guest_image::qemu::QEMU_FIRMWARE;

use crate::bench_common::{
    build_release_tern, export_testguest, load_average, peer_version, scratch_dir,
};
use crate::bench_migrate::{
    HB_MS, Medians, MigrateArgs, Proc, QemuSetup, Qmp, TERN_BUDGET_MS, TERN_STREAMS, WORKLOADS,
    field, fmt, medians, or_error, qemu_run, ratio, tern_run,
};

/// The workloads of `bench migrate` this section runs.
const WORKLOAD_NAMES: [&str; 2] = ["idle", "moderate"];
const QEMU: &str = "qemu-system-x86_64";
/// The target's certificate name, which the source checks.
const TARGET_NAME: &str = "node-dst";

/// `tern pki init` and `tern pki issue` for the source and the target, under `dir/pki`.
fn issue_certificates(tern: &Path, dir: &Path) -> anyhow::Result<(String, String)> {
    let ca = dir.join("pki");
    let _ = std::fs::remove_dir_all(&ca);
    let run = |args: &[&str]| -> anyhow::Result<()> {
        let out = Command::new(tern).args(args).output()?;
        ensure!(
            out.status.success(),
            "tern {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    let ca_s = ca.to_str().context("scratch path is not UTF-8")?;
    run(&["pki", "init", "--dir", ca_s])?;
    for name in ["node-src", TARGET_NAME] {
        run(&[
            "pki", "issue", "--dir", ca_s, "--name", name, "--role", "host",
        ])?;
    }
    Ok((
        ca.join("node-src").display().to_string(),
        ca.join(TARGET_NAME).display().to_string(),
    ))
}

/// The TSC frequency the guest sees under Tern (QEMU is given the same).
fn guest_tsc_hz(tern: &Path, elf: &Path, dir: &Path) -> anyhow::Result<u64> {
    let mut p = Proc::spawn({
        let mut c = Command::new(tern);
        c.args(["vm", "run", "--kernel"])
            .arg(elf)
            .args(["--memory-mib", "64", "--cmdline", "tern.hb_ms=50"])
            .arg("--runtime-dir")
            .arg(dir.join("rt"));
        c
    })?;
    p.wait_line(Duration::from_secs(20), |l| l.contains("tsc_khz="))?;
    p.stop();
    Ok(p.seen
        .iter()
        .find_map(|(_, l)| field(l, "tsc_khz"))
        .context("the guest did not report tsc_khz")?
        * 1000)
}

/// QEMU's TLS: a `tls-creds-x509` object on each side (the target verifies the source's client
/// certificate; the source checks the target's against `TARGET_NAME`), then `tls-creds`.
fn qemu_tls(src_dir: &str, dst_dir: &str) -> impl Fn(&mut Qmp, bool) -> anyhow::Result<()> {
    let (src_dir, dst_dir) = (src_dir.to_owned(), dst_dir.to_owned());
    move |q: &mut Qmp, source: bool| {
        let (dir, endpoint) = if source {
            (&src_dir, "client")
        } else {
            (&dst_dir, "server")
        };
        q.cmd(
            "object-add",
            serde_json::json!({
                "qom-type": "tls-creds-x509", "id": "tls0", "dir": dir,
                "endpoint": endpoint, "verify-peer": true,
            }),
        )?;
        let mut params = serde_json::json!({ "tls-creds": "tls0" });
        if source {
            params["tls-hostname"] = TARGET_NAME.into();
        }
        q.cmd("migrate-set-parameters", params)?;
        Ok(())
    }
}

pub fn run(runs: usize) -> anyhow::Result<()> {
    ensure!(runs > 0, "--runs must be at least 1");
    // TERN_BENCH_BIN=PATH runs that tern binary instead of building the workspace's (as bench
    // migrate's --tern: an earlier build, or a tree that is mid-edit).
    let tern = match std::env::var_os("TERN_BENCH_BIN") {
        Some(p) => std::path::PathBuf::from(p),
        None => build_release_tern()?,
    };
    let dir = scratch_dir("tls-migration")?;
    let elf = export_testguest(&tern, &dir)?;
    let qemu_version = peer_version(QEMU)?;
    let (src_dir, dst_dir) = issue_certificates(&tern, &dir)?;
    let tsc_hz = guest_tsc_hz(&tern, &elf, &dir)?;
    let load_before = load_average();
    // bench migrate's options at their defaults (whatever fields it grows), with our run count.
    #[derive(clap::Parser)]
    struct Defaults {
        #[command(flatten)]
        args: MigrateArgs,
    }
    let args = <Defaults as clap::Parser>::try_parse_from([
        "bench-migrate",
        "--runs",
        &runs.to_string(),
        "--qemu",
        QEMU,
    ])?
    .args;
    let tern_tls_receive = ["--tls-dir", dst_dir.as_str()];
    let tern_tls_migrate = ["--tls-dir", src_dir.as_str(), "--tls-name", TARGET_NAME];
    // The VMMs' API sockets go in a 0700 directory (a VMM refuses one others may enter).
    let socks = dir.join("run");
    std::fs::create_dir_all(&socks)?;
    std::fs::set_permissions(&socks, std::fs::Permissions::from_mode(0o700))?;
    let tls = qemu_tls(&src_dir, &dst_dir);
    let plain = |_: &mut Qmp, _: bool| Ok(());

    let mut rows = Vec::new();
    for w in WORKLOADS
        .iter()
        .filter(|w| WORKLOAD_NAMES.contains(&w.name))
    {
        let (mut t, mut tt, mut q, mut qt) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for i in 0..runs {
            eprintln!("{}: run {}/{runs}", w.label, i + 1);
            t.push(or_error("tern", tern_run(&tern, &elf, &socks, w, &[], &[])));
            tt.push(or_error(
                "tern tls",
                tern_run(&tern, &elf, &socks, w, &tern_tls_receive, &tern_tls_migrate),
            ));
            q.push(or_error(
                "qemu tuned",
                qemu_run(&args, &elf, &dir, w, tsc_hz, QemuSetup::Tuned, &plain),
            ));
            qt.push(or_error(
                "qemu tuned tls",
                qemu_run(&args, &elf, &dir, w, tsc_hz, QemuSetup::Tuned, &tls),
            ));
        }
        rows.push((
            w.label,
            medians(&t),
            medians(&tt),
            medians(&q),
            medians(&qt),
        ));
    }
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "\nlive migration with and without mutual TLS on loopback, medians of {runs} runs each, same ELF (tern.hb_ms={HB_MS}), 1 GiB guests; peer: {qemu_version} -M microvm -bios {QEMU_FIRMWARE}, KVM"
    );
    println!(
        "tern: {TERN_STREAMS} streams, {TERN_BUDGET_MS} ms budget; tls = --tls-dir on both ends (rustls, ECDSA P-256 certificates from tern pki, client certificates required); qemu tuned: downtime-limit {TERN_BUDGET_MS} ms, auto-converge, multifd {TERN_STREAMS} channels, no cap; tls = tls-creds-x509 (same directories, verify-peer on) + tls-creds"
    );
    println!(
        "pause = max(host gap between heartbeat lines - {HB_MS} ms, guest maxgap, guest clock shift), as in bench migrate"
    );
    println!(
        "load average: before {load_before}, after {}",
        load_average()
    );
    println!(
        "{:<26} {:<16} {:>5} {:>8} {:>8} {:>9} {:>8}",
        "workload", "vmm", "ok", "pause ms", "vmm dt", "total ms", "MiB sent"
    );
    let line = |label: &str, name: &str, m: &Medians| {
        println!(
            "{:<26} {:<16} {:>5} {:>8} {:>8} {:>9} {:>8}",
            label,
            name,
            format!("{}/{}", m.ok, m.runs),
            fmt(m.pause, 1.0, 1),
            fmt(m.downtime, 1.0, 0),
            fmt(m.total, 1.0, 0),
            fmt(m.bytes, 1048576.0, 1),
        );
    };
    for (label, t, tt, q, qt) in &rows {
        line(label, "tern", t);
        line(label, "tern tls", tt);
        line(label, "qemu tuned", q);
        line(label, "qemu tuned tls", qt);
        println!(
            "{:<26} tern tls/tern: pause {}, total {} (goals <= 1.10x, <= 1.25x); tern tls/qemu tls: pause {}, total {} (goal pause <= 0.5x); qemu tls/qemu: pause {}, total {}",
            "",
            ratio(tt.pause, t.pause),
            ratio(tt.total, t.total),
            ratio(tt.pause, qt.pause),
            ratio(tt.total, qt.total),
            ratio(qt.pause, q.pause),
            ratio(qt.total, q.total),
        );
    }
    Ok(())
}
