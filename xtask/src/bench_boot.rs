//! `cargo xtask bench boot`: time from process start to the test guest's first heartbeat, and the
//! VMM's memory overhead, for `tern vm run` and for QEMU (microvm) booting the very same ELF with
//! the same memory size, several runs each, in one run of the bench. QEMU boots with qboot
//! (`-bios qboot.rom`), its fast microvm firmware; its default, SeaBIOS, costs seconds here.
//!
//! Memory overhead = the process's RSS minus the resident part of the guest-RAM mapping (found in
//! /proc/PID/smaps as the anonymous mapping of the guest's size), sampled once the guest runs.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use crate::bench_common::{
    build_release_tern, export_testguest, load_average, peer_version, scratch_dir,
};
use anyhow::{Context, bail, ensure};
use tern_guest_image::qemu::{QEMU_FIRMWARE, QemuConfig};

/// Options of `cargo xtask bench boot`.
#[derive(Debug, clap::Args)]
pub struct BootArgs {
    /// Runs per VMM.
    #[arg(long, default_value_t = 7)]
    pub runs: usize,
    /// Guest memory in MiB (both VMMs).
    #[arg(long, default_value_t = 256)]
    pub memory_mib: u64,
    /// The QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu: String,
}

struct Sample {
    first_hb_ms: f64,
    rss_kib: u64,
    overhead_kib: u64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// RSS of the whole process and of its guest-RAM mapping, in KiB.
fn memory_kib(pid: u32, guest_kib: u64) -> anyhow::Result<(u64, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .with_context(|| format!("cannot read /proc/{pid}/smaps"))?;
    let mut total = 0u64;
    let mut guest = 0u64;
    let mut size = 0u64;
    for line in smaps.lines() {
        let mut it = line.split_whitespace();
        match it.next() {
            Some("Size:") => size = it.next().and_then(|v| v.parse().ok()).unwrap_or(0),
            Some("Rss:") => {
                let rss: u64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                total += rss;
                // The guest RAM mapping: the guest's size, give or take alignment padding.
                if size >= guest_kib && size <= guest_kib + 4096 {
                    guest = guest.max(rss);
                }
            }
            _ => {}
        }
    }
    Ok((total, guest))
}

/// Starts `cmd`, waits for a stdout line starting with `HB seq=`, samples memory, kills it.
fn measure(
    mut cmd: Command,
    guest_kib: u64,
    tsc_line: &mut Option<String>,
) -> anyhow::Result<Sample> {
    let start = Instant::now();
    let mut child: Child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .context("cannot start the VMM")?;
    // Read stderr on a thread too (QEMU warns about CPUID features), kept for the error message.
    let err = child.stderr.take().context("no stderr")?;
    let err_text = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(err), &mut s);
        s
    });
    let out = child.stdout.take().context("no stdout")?;
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    let deadline = start + Duration::from_secs(30);
    let first = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((at, line)) => {
                if line.starts_with("TERN-GUEST up") {
                    *tsc_line = Some(line.clone());
                }
                if line.starts_with("HB seq=") {
                    break at;
                }
            }
            Err(_) => {
                let _ = child.kill();
                let status = child.wait();
                let stderr = err_text.join().unwrap_or_default();
                bail!(
                    "no heartbeat within 30 s from {:?} (exit: {status:?}); its stderr:\n{stderr}",
                    cmd.get_program()
                );
            }
        }
    };
    let first_hb_ms = first.duration_since(start).as_secs_f64() * 1000.0;
    // Let it run a little so both VMMs are sampled in the same steady state.
    std::thread::sleep(Duration::from_millis(300));
    let (rss_kib, guest) = memory_kib(child.id(), guest_kib)?;
    let _ = child.kill();
    let _ = child.wait();
    Ok(Sample {
        first_hb_ms,
        rss_kib,
        overhead_kib: rss_kib.saturating_sub(guest),
    })
}

fn report(name: &str, samples: &[Sample]) -> (f64, f64, f64) {
    let t = median(samples.iter().map(|s| s.first_hb_ms).collect());
    let rss = median(samples.iter().map(|s| s.rss_kib as f64).collect());
    let ovh = median(samples.iter().map(|s| s.overhead_kib as f64).collect());
    let all: Vec<String> = samples
        .iter()
        .map(|s| format!("{:.1}", s.first_hb_ms))
        .collect();
    println!(
        "{name:<6} first heartbeat median {t:>7.1} ms  (runs: {})   RSS {:.1} MiB, overhead {:.1} MiB",
        all.join(" "),
        rss / 1024.0,
        ovh / 1024.0
    );
    (t, rss, ovh)
}

pub fn run(args: BootArgs) -> anyhow::Result<()> {
    ensure!(args.runs > 0, "--runs must be at least 1");
    let tern = build_release_tern()?;
    let dir = scratch_dir("boot")?;
    let elf = export_testguest(&tern, &dir)?;
    let qemu_version = peer_version(&args.qemu)?;
    let load_before = load_average();

    let cmdline = "tern.hb_ms=50";
    let guest_kib = args.memory_mib * 1024;
    let mem = args.memory_mib.to_string();
    let mut up_line = None;
    // Interleave the two VMMs so host noise hits both alike.
    let mut tern_samples = Vec::new();
    let mut qemu_samples = Vec::new();
    // The first tern run also tells the TSC frequency the guest sees, which QEMU must be given.
    let tern_cmd = || {
        let mut c = Command::new(&tern);
        c.args(["vm", "run", "--kernel"])
            .arg(&elf)
            .args(["--memory-mib", &mem, "--cmdline", cmdline, "--runtime-dir"])
            .arg(dir.join("rt"));
        c
    };
    tern_samples.push(measure(tern_cmd(), guest_kib, &mut up_line)?);
    let khz: u64 = up_line
        .as_deref()
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("tsc_khz="))
        })
        .and_then(|v| v.parse().ok())
        .context("the guest did not report tsc_khz")?;
    // The peer's launcher (microvm with qboot, the fast firmware: QEMU's default SeaBIOS spends
    // seconds in emulated CPL0 code on KVM-PVM hosts, which would measure the firmware, not the VMM).
    let qemu_cfg = QemuConfig {
        kernel: elf.clone(),
        cmdline: cmdline.to_string(),
        memory_mib: args.memory_mib,
        vcpus: 1,
        tsc_hz: khz * 1000,
        disk: None,
        virtio_modern: false,
        net: None,
    };
    let qemu_cmd = || {
        let mut c = Command::new(&args.qemu);
        c.args(qemu_cfg.args());
        c
    };
    let mut ignored = None;
    for i in 0..args.runs {
        qemu_samples.push(measure(qemu_cmd(), guest_kib, &mut ignored)?);
        if i + 1 < args.runs {
            tern_samples.push(measure(tern_cmd(), guest_kib, &mut ignored)?);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "\nboot to first heartbeat, {} runs each, {} MiB guest, same ELF (tern.hb_ms=50); peer: {qemu_version} -M microvm -bios {QEMU_FIRMWARE}",
        args.runs, args.memory_mib
    );
    println!(
        "load average: before {load_before}, after {}",
        load_average()
    );
    let (tt, trss, tovh) = report("tern", &tern_samples);
    let (qt, qrss, qovh) = report("qemu", &qemu_samples);
    println!(
        "ratio tern/qemu: time {:.2}x (goal <= 0.5x), RSS {:.2}x, overhead {:.2}x (goal < 1x)",
        tt / qt,
        trss / qrss,
        tovh / qovh
    );
    Ok(())
}
