//! Boots the embedded test guest under QEMU (`-accel kvm -M microvm`), a real VMM, and checks each
//! workload from the outside: heartbeats, SMP, the paced and unpaced memory writer, the virtio-blk
//! check on both virtio-mmio transports, power-off, idleness, and bad command lines.
//!
//! These tests need root, /dev/kvm and qemu-system-x86_64; without them they fail with a message
//! saying what is missing (they never skip).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use tern_guest_image::console::{self, GuestLine};
use tern_guest_image::qemu::{self, QemuConfig};

const QEMU: &str = "qemu-system-x86_64";
const TIMEOUT: Duration = Duration::from_secs(60);

fn require_environment() {
    // Root and a usable /dev/kvm.
    tern_test_support::require_kvm();
    match Command::new(QEMU).arg("--version").output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "{QEMU} --version failed: {}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!("{QEMU} is needed for these tests (apt-get install qemu-system-x86): {e}"),
    }
}

/// The host TSC frequency for `-cpu …,tsc-frequency=`: the kernel's calibration from the kernel log
/// (exact to the kHz), else /proc/cpuinfo's `cpu MHz`. QEMU refuses a frequency KVM cannot give the
/// guest, and without TSC scaling that is any value other than the host's.
fn host_tsc_hz() -> u64 {
    let log = Command::new("dmesg")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    if let Some(hz) = log.ok().as_deref().and_then(qemu::tsc_hz_from_kernel_log) {
        return hz;
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").expect("read /proc/cpuinfo");
    qemu::tsc_hz_from_cpuinfo(&cpuinfo)
        .expect("no TSC frequency in the kernel log or /proc/cpuinfo")
}

fn guest_elf(dir: &Path) -> PathBuf {
    let path = dir.join("testguest.elf");
    std::fs::write(&path, tern_guest_image::testguest_elf()).expect("write the guest ELF");
    path
}

/// A running QEMU with the guest's console lines arriving on a channel; killed when dropped.
struct Guest {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
    _dir: tempfile::TempDir,
}

struct Boot {
    cmdline: &'static str,
    memory_mib: u64,
    vcpus: u32,
    disk: Option<PathBuf>,
    virtio_modern: bool,
}

impl Default for Boot {
    fn default() -> Self {
        Boot {
            cmdline: "",
            memory_mib: 256,
            vcpus: 1,
            disk: None,
            virtio_modern: false,
        }
    }
}

impl Guest {
    fn boot(b: Boot) -> Guest {
        require_environment();
        let dir = tempfile::tempdir().expect("tempdir");
        let config = QemuConfig {
            kernel: guest_elf(dir.path()),
            cmdline: b.cmdline.to_string(),
            memory_mib: b.memory_mib,
            vcpus: b.vcpus,
            tsc_hz: host_tsc_hz(),
            disk: b.disk,
            virtio_modern: b.virtio_modern,
            net: None,
        };
        let mut child = Command::new(QEMU)
            .args(config.args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {QEMU}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Guest {
            child,
            lines,
            seen: Vec::new(),
            _dir: dir,
        }
    }

    /// Reads console lines until `done` says so (given every parsed line so far); panics on a guest
    /// PANIC line, on QEMU ending, or after `TIMEOUT`, showing what the console said.
    fn until(&mut self, mut done: impl FnMut(&[GuestLine]) -> bool) -> Vec<GuestLine> {
        let start = Instant::now();
        let mut parsed = Vec::new();
        loop {
            let left = TIMEOUT.saturating_sub(start.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if let Some(p) = console::parse(&line) {
                        if let GuestLine::Panic { message } = &p {
                            panic!(
                                "guest panicked: {message}\nconsole:\n{}",
                                self.seen.join("\n")
                            );
                        }
                        parsed.push(p);
                        if done(&parsed) {
                            return parsed;
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "timed out after {TIMEOUT:?}; console:\n{}",
                        self.seen.join("\n")
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "QEMU ended early ({:?}); console:\n{}",
                        self.child.wait(),
                        self.seen.join("\n")
                    )
                }
            }
        }
    }

    /// Waits for QEMU to exit; returns its exit code and the remaining console lines.
    fn wait_exit(&mut self) -> (i32, Vec<String>) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for QEMU") {
                let rest: Vec<String> = self.lines.iter().collect();
                self.seen.extend(rest.iter().cloned());
                let code = status
                    .code()
                    .unwrap_or_else(|| panic!("QEMU killed by a signal: {status}"));
                return (code, self.seen.clone());
            }
            assert!(
                start.elapsed() < TIMEOUT,
                "QEMU did not exit; console:\n{}",
                self.seen.join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// CPU time (user + system) QEMU has used so far.
    fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .expect("read /proc/PID/stat");
        let after_comm = &stat[stat.rfind(')').expect("comm in stat") + 2..];
        let fields: Vec<&str> = after_comm.split_whitespace().collect();
        // Fields 14 and 15 of stat (utime, stime) are 12 and 13 after the command name and state.
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        let hz: u64 = String::from_utf8(
            Command::new("getconf")
                .arg("CLK_TCK")
                .output()
                .expect("getconf")
                .stdout,
        )
        .unwrap()
        .trim()
        .parse()
        .unwrap();
        Duration::from_millis(ticks * 1000 / hz)
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn heartbeats(lines: &[GuestLine], cpu: Option<u32>) -> Vec<(u64, u64)> {
    lines
        .iter()
        .filter_map(|l| match *l {
            GuestLine::Heartbeat {
                seq, t_us, cpu: c, ..
            } if c == cpu => Some((seq, t_us)),
            _ => None,
        })
        .collect()
}

fn dirty_rates(lines: &[GuestLine]) -> Vec<(u64, u64, Option<u32>)> {
    lines
        .iter()
        .filter_map(|l| match *l {
            GuestLine::Dirty { pages, rate, cpu } => Some((pages, rate, cpu)),
            _ => None,
        })
        .collect()
}

#[test]
fn heartbeats_arrive_with_increasing_seq() {
    let mut g = Guest::boot(Boot {
        cmdline: "console=ttyS0 tern.hb_ms=50",
        ..Boot::default()
    });
    let lines = g.until(|l| heartbeats(l, None).len() >= 10);
    let GuestLine::Up {
        cpus,
        tsc_khz,
        mem_mib,
    } = lines[0]
    else {
        panic!("first line is not the up line: {lines:?}")
    };
    assert_eq!((cpus, mem_mib), (1, 256));
    assert_eq!(
        tsc_khz,
        host_tsc_hz() / 1000,
        "the guest reads the TSC frequency QEMU was given"
    );
    let hb = heartbeats(&lines, None);
    let seqs: Vec<u64> = hb.iter().map(|h| h.0).collect();
    assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
    for w in hb.windows(2) {
        let gap_ms = (w[1].1 - w[0].1) / 1000;
        assert!(
            (25..=500).contains(&gap_ms),
            "heartbeats {gap_ms} ms apart for a 50 ms period: {hb:?}"
        );
    }
    let mean_ms = (hb[9].1 - hb[0].1) / 9 / 1000;
    assert!(
        (45..=70).contains(&mean_ms),
        "mean heartbeat period {mean_ms} ms for 50 ms: {hb:?}"
    );
}

#[test]
fn two_vcpus_both_print_heartbeats() {
    let mut g = Guest::boot(Boot {
        cmdline: "tern.hb_ms=100",
        vcpus: 2,
        ..Boot::default()
    });
    let lines = g.until(|l| heartbeats(l, Some(0)).len() >= 4 && heartbeats(l, Some(1)).len() >= 4);
    assert!(
        matches!(lines[0], GuestLine::Up { cpus: 2, .. }),
        "up line: {:?}",
        lines[0]
    );
    assert!(
        heartbeats(&lines, None).is_empty(),
        "with 2 vCPUs every heartbeat names its vCPU"
    );
    for cpu in [0, 1] {
        let seqs: Vec<u64> = heartbeats(&lines, Some(cpu)).iter().map(|h| h.0).collect();
        assert_eq!(seqs[..4], [1, 2, 3, 4], "vCPU {cpu}");
    }
}

#[test]
fn paced_writer_holds_20000_pages_per_second() {
    let mut g = Guest::boot(Boot {
        cmdline: "tern.hb_ms=500 tern.dirty_mib=256 tern.dirty_rate=20000",
        memory_mib: 512,
        ..Boot::default()
    });
    let lines = g.until(|l| dirty_rates(l).len() >= 6);
    let d = dirty_rates(&lines);
    assert!(
        d.iter().all(|x| x.2.is_none()),
        "one vCPU: no cpu suffix: {d:?}"
    );
    // The guest paces by its own clock; a host this busy (7 engineers, 2 cores) can still starve its
    // vCPU for a period, so each period's rate is checked loosely and the median and the total tightly.
    for &(_, rate, _) in &d {
        assert!(
            (10_000..=30_000).contains(&rate),
            "rate {rate} pages/s for 20000: {d:?}"
        );
    }
    assert!(
        (19_000..=21_000).contains(&median(d.iter().map(|x| x.1))),
        "median rate off: {d:?}"
    );
    let hb = heartbeats(&lines, None);
    let elapsed_s = (hb[5].1 - hb[0].1) as f64 / 1e6;
    let pages = (d[5].0 - d[0].0) as f64;
    let rate = pages / elapsed_s;
    assert!(
        (18_000.0..=22_000.0).contains(&rate),
        "{pages} pages in {elapsed_s} s = {rate}/s"
    );
}

fn median(values: impl Iterator<Item = u64>) -> u64 {
    let mut v: Vec<u64> = values.collect();
    v.sort_unstable();
    v[v.len() / 2]
}

#[test]
fn unpaced_writer_runs_far_above_the_paced_rate() {
    let mut g = Guest::boot(Boot {
        cmdline: "tern.hb_ms=300 tern.dirty_mib=64",
        ..Boot::default()
    });
    g.until(|l| !dirty_rates(l).is_empty());
    let (cpu0, t0) = (g.cpu_time(), Instant::now());
    let lines = g.until(|l| dirty_rates(l).len() >= 4);
    let best = dirty_rates(&lines).iter().map(|d| d.1).max().unwrap();
    assert!(
        best > 1_000_000,
        "maximum-rate writer reached only {best} pages/s: {lines:?}"
    );
    // The same CPU-time measurement that shows an idle guest idle shows this one busy.
    let share = (g.cpu_time() - cpu0).as_secs_f64() / t0.elapsed().as_secs_f64();
    assert!(
        share > 0.10,
        "a maximum-rate writer should keep its vCPU busy; QEMU used {:.1} %",
        share * 100.0
    );
}

fn blk_verify(virtio_modern: bool) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let size = 4 << 20;
    std::fs::write(&image, vec![0xa5u8; size]).unwrap();
    let mut g = Guest::boot(Boot {
        cmdline: "tern.hb_ms=200 tern.blk=verify tern.poweroff_ms=300",
        disk: Some(image.clone()),
        virtio_modern,
        ..Boot::default()
    });
    let lines = g.until(|l| {
        l.iter()
            .any(|x| matches!(x, GuestLine::BlkOk { .. } | GuestLine::BlkFail { .. }))
    });
    let verdict = lines.last().unwrap();
    assert_eq!(
        *verdict,
        GuestLine::BlkOk {
            sectors: tern_guest_image::BLK_VERIFY_SECTORS
        },
        "{:?}",
        g.seen
    );
    let version = if virtio_modern {
        "version=2"
    } else {
        "version=1"
    };
    assert!(
        g.seen
            .iter()
            .any(|l| l.starts_with("BLK device") && l.contains(version)),
        "{:?}",
        g.seen
    );
    let (code, console) = g.wait_exit();
    assert_eq!(
        qemu::debug_exit_value(code),
        Some(0),
        "exit {code}; console: {console:?}"
    );
    let data = std::fs::read(&image).unwrap();
    assert_eq!(data.len(), size);
    assert_eq!(
        tern_guest_image::blk_pattern_mismatch(&data, tern_guest_image::BLK_VERIFY_SECTORS),
        None
    );
    let beyond = tern_guest_image::BLK_VERIFY_SECTORS as usize * 512;
    assert!(
        data[beyond..].iter().all(|&b| b == 0xa5),
        "the check wrote past its sectors"
    );
}

#[test]
fn blk_verify_passes_on_legacy_virtio_mmio_and_image_holds_pattern() {
    blk_verify(false);
}

#[test]
fn blk_verify_passes_on_modern_virtio_mmio_and_image_holds_pattern() {
    blk_verify(true);
}

#[test]
fn blk_verify_without_a_disk_reports_failure() {
    let mut g = Guest::boot(Boot {
        cmdline: "tern.blk=verify tern.hb_ms=0",
        ..Boot::default()
    });
    let lines = g.until(|l| {
        l.iter()
            .any(|x| matches!(x, GuestLine::BlkOk { .. } | GuestLine::BlkFail { .. }))
    });
    assert_eq!(
        *lines.last().unwrap(),
        GuestLine::BlkFail {
            reason: "no virtio-blk device".into()
        }
    );
}

#[test]
fn poweroff_ends_qemu_with_exit_value_zero() {
    let mut g = Guest::boot(Boot {
        cmdline: "tern.hb_ms=100 tern.poweroff_ms=500",
        vcpus: 2,
        ..Boot::default()
    });
    let started = Instant::now();
    let (code, console) = g.wait_exit();
    assert_eq!(
        qemu::debug_exit_value(code),
        Some(0),
        "QEMU exit status {code}; console: {console:?}"
    );
    assert!(
        console
            .iter()
            .any(|l| l == "TERN-GUEST poweroff after_ms=500"),
        "{console:?}"
    );
    let beats = console
        .iter()
        .filter(|l| l.starts_with("HB ") && l.ends_with(" cpu=0"))
        .count();
    assert!(
        (3..=6).contains(&beats),
        "{beats} heartbeats of vCPU 0 in 500 ms at 100 ms: {console:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn idle_guest_costs_little_host_cpu() {
    let mut g = Guest::boot(Boot {
        cmdline: "tern.hb_ms=1000",
        ..Boot::default()
    });
    g.until(|l| !heartbeats(l, None).is_empty());
    let (cpu0, t0) = (g.cpu_time(), Instant::now());
    g.until(|l| heartbeats(l, None).len() >= 3);
    let used = g.cpu_time() - cpu0;
    let wall = t0.elapsed();
    let share = used.as_secs_f64() / wall.as_secs_f64();
    eprintln!(
        "idle guest: QEMU used {used:?} of CPU in {wall:?} ({:.1} %)",
        share * 100.0
    );
    assert!(
        share < 0.10,
        "idle guest: QEMU used {used:?} of CPU in {wall:?} ({:.1} %)",
        share * 100.0
    );
}

#[test]
fn bad_command_line_value_stops_the_guest_with_a_panic_line() {
    let mut g = Guest::boot(Boot {
        cmdline: "tern.hb_ms=fast",
        ..Boot::default()
    });
    let (code, console) = g.wait_exit();
    assert!(
        console
            .iter()
            .any(|l| l.starts_with("PANIC bad value for tern.hb_ms: \"fast\"")),
        "console: {console:?}"
    );
    assert_eq!(qemu::debug_exit_value(code), Some(1), "exit status {code}");
}

#[test]
fn combined_workloads_run_on_every_vcpu() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![0u8; 2 << 20]).unwrap();
    let mut g = Guest::boot(Boot {
        cmdline: "tern.hb_ms=250 tern.dirty_mib=64 tern.dirty_rate=10000 tern.blk=verify",
        memory_mib: 256,
        vcpus: 2,
        disk: Some(image),
        ..Boot::default()
    });
    let lines = g.until(|l| {
        let d = dirty_rates(l);
        d.iter().filter(|x| x.2 == Some(0)).count() >= 4
            && d.iter().filter(|x| x.2 == Some(1)).count() >= 4
    });
    assert!(
        lines
            .iter()
            .any(|l| matches!(l, GuestLine::BlkOk { sectors: 2048 })),
        "{:?}",
        g.seen
    );
    for cpu in [0, 1] {
        let rates: Vec<u64> = dirty_rates(&lines)
            .iter()
            .filter(|d| d.2 == Some(cpu))
            .map(|d| d.1)
            .skip(1)
            .collect();
        let m = median(rates.iter().copied());
        assert!(
            (4_500..=5_500).contains(&m),
            "vCPU {cpu} dirties {m} pages/s (median), expected half of 10000: {rates:?}"
        );
        assert!(!heartbeats(&lines, Some(cpu)).is_empty());
    }
}

#[test]
fn cpu_discovery_falls_back_to_the_mp_table_without_acpi() {
    // microvm has no MP table; the PC machine's SeaBIOS writes one (and spends a few seconds of
    // emulated CPL0 code doing so). With ACPI off, the guest must find its CPU there.
    require_environment();
    let dir = tempfile::tempdir().unwrap();
    let config = QemuConfig {
        kernel: guest_elf(dir.path()),
        cmdline: "tern.hb_ms=100 tern.poweroff_ms=250".into(),
        memory_mib: 128,
        vcpus: 1,
        tsc_hz: host_tsc_hz(),
        disk: None,
        virtio_modern: false,
        net: None,
    };
    let mut args = config.args();
    let m = args
        .iter()
        .position(|a| a == "microvm")
        .expect("microvm in the QEMU arguments");
    args[m] = "pc,acpi=off".into();
    // The PC machine with its own firmware, SeaBIOS (the launcher gives microvm qboot, which
    // writes no MP table).
    let b = args
        .iter()
        .position(|a| a == "-bios")
        .expect("-bios in the QEMU arguments");
    args.drain(b..b + 2);
    let out = Command::new(QEMU)
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .expect("run QEMU");
    let console = String::from_utf8_lossy(&out.stdout);
    assert!(
        console.contains("TERN-GUEST cpus source=mptable apic_ids=0 timer=tsc-deadline\n"),
        "console:\n{console}"
    );
    assert!(
        console.contains("TERN-GUEST up cpus=1 "),
        "console:\n{console}"
    );
    assert_eq!(
        qemu::debug_exit_value(out.status.code().unwrap_or(-1)),
        Some(0),
        "console:\n{console}"
    );
}

#[test]
fn guest_fault_is_reported_and_powers_off_with_value_one() {
    let mut g = Guest::boot(Boot {
        cmdline: "tern.selftest=pagefault tern.hb_ms=50",
        vcpus: 2,
        ..Boot::default()
    });
    let (code, console) = g.wait_exit();
    let panic = console
        .iter()
        .find(|l| l.starts_with("PANIC "))
        .unwrap_or_else(|| panic!("no PANIC line: {console:?}"));
    assert!(panic.starts_with("PANIC exception vector=14 "), "{panic}");
    assert!(panic.contains(" cr2=0x400000000 "), "{panic}");
    assert_eq!(qemu::debug_exit_value(code), Some(1), "exit status {code}");
}

#[test]
fn heartbeats_keep_time_with_the_one_shot_lapic_timer() {
    // Without the TSC-deadline timer in CPUID the guest falls back to one-shot mode, counting at the
    // APIC bus frequency from CPUID 0x40000010 EBX.
    require_environment();
    let dir = tempfile::tempdir().unwrap();
    let config = QemuConfig {
        kernel: guest_elf(dir.path()),
        cmdline: "tern.hb_ms=100 tern.poweroff_ms=1050".into(),
        memory_mib: 128,
        vcpus: 1,
        tsc_hz: host_tsc_hz(),
        disk: None,
        virtio_modern: false,
        net: None,
    };
    let mut args = config.args();
    let cpu = args
        .iter()
        .position(|a| a.to_string_lossy().contains("+tsc-deadline"))
        .expect("-cpu argument");
    args[cpu] = format!("qemu64,tsc-frequency={}", config.tsc_hz).into();
    let out = Command::new(QEMU)
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .expect("run QEMU");
    let console = String::from_utf8_lossy(&out.stdout);
    assert!(console.contains(" timer=oneshot\n"), "{console}");
    let lines: Vec<GuestLine> = console.lines().filter_map(console::parse).collect();
    let hb = heartbeats(&lines, None);
    assert!(hb.len() >= 8, "{lines:?}");
    let mean_ms = (hb[hb.len() - 1].1 - hb[0].1) / (hb.len() as u64 - 1) / 1000;
    assert!(
        (95..=130).contains(&mean_ms),
        "mean period {mean_ms} ms for 100 ms: {hb:?}"
    );
    assert_eq!(
        qemu::debug_exit_value(out.status.code().unwrap_or(-1)),
        Some(0)
    );
}

#[test]
fn writer_detects_a_page_that_lost_its_contents() {
    // 4 MiB over 2 vCPUs: each pass over a vCPU's 512 pages takes ~0.1 s at 10000 pages/s. With
    // tern.selftest=corruptpage the guest damages its first page after the first pass, as a VMM that
    // lost a page would; the second pass must notice.
    let mut g = Guest::boot(Boot {
        cmdline: "tern.hb_ms=100 tern.dirty_mib=4 tern.dirty_rate=10000 tern.selftest=corruptpage",
        vcpus: 2,
        ..Boot::default()
    });
    let (code, console) = g.wait_exit();
    assert!(
        console
            .iter()
            .any(|l| l.starts_with("PANIC memory check failed: page ")
                && l.contains(" holds 0xbad0bad0, ")),
        "{console:?}"
    );
    assert_eq!(qemu::debug_exit_value(code), Some(1), "exit status {code}");
}

#[test]
fn writer_buffer_larger_than_memory_is_refused() {
    let mut g = Guest::boot(Boot {
        cmdline: "tern.dirty_mib=300",
        memory_mib: 256,
        ..Boot::default()
    });
    let (code, console) = g.wait_exit();
    assert!(
        console
            .iter()
            .any(|l| l.starts_with("PANIC tern.dirty_mib=300 does not fit")),
        "console: {console:?}"
    );
    assert_eq!(qemu::debug_exit_value(code), Some(1), "exit status {code}");
}
