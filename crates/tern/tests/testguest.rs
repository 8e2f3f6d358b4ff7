//! The embedded test guest under `tern vm run`: heartbeats, SMP, pause/resume, virtio-blk, power-off.
//! Needs root and /dev/kvm.

mod common;

use std::time::{Duration, Instant};

use common::{RunningVm, field, require_kvm, scratch, tern_cmd};

const BOOT: Duration = Duration::from_secs(20);

fn is_hb(l: &str) -> bool {
    l.starts_with("HB seq=")
}

#[test]
fn heartbeats_arrive_in_sequence_with_the_tsc_frequency_from_cpuid() {
    require_kvm();
    let dir = scratch();
    let rt = dir.path().join("rt").display().to_string();
    let mut vm = RunningVm::start(
        dir.path(),
        &[
            "--kernel",
            "builtin:testguest",
            "--memory-mib",
            "128",
            "--cmdline",
            "tern.hb_ms=50",
            "--runtime-dir",
            &rt,
        ],
    );
    let up = vm.wait_line(BOOT, |l| l.starts_with("TERN-GUEST up"));
    assert_eq!(field(&up, "cpus"), Some(1), "{up}");
    assert_eq!(field(&up, "mem_mib"), Some(128), "{up}");
    let khz = field(&up, "tsc_khz").expect("tsc_khz");
    assert!(
        khz > 100_000,
        "the guest got a real TSC frequency from CPUID 0x40000010: {up}"
    );
    let mut seqs = Vec::new();
    let mut times = Vec::new();
    while seqs.len() < 6 {
        let hb = vm.wait_line(Duration::from_secs(5), is_hb);
        seqs.push(field(&hb, "seq").unwrap());
        times.push(field(&hb, "t_us").unwrap());
    }
    for w in seqs.windows(2) {
        assert_eq!(w[1], w[0] + 1, "heartbeat sequence {seqs:?}");
    }
    // 50 ms apart in guest time (the guest's TSC-based clock), within a generous margin.
    let span = times[5] - times[0];
    assert!(
        (200_000..=400_000).contains(&span),
        "5 periods took {span} µs of guest time"
    );
}

#[test]
fn two_vcpus_both_run_the_workload() {
    require_kvm();
    let dir = scratch();
    let rt = dir.path().join("rt").display().to_string();
    let mut vm = RunningVm::start(
        dir.path(),
        &[
            "--kernel",
            "builtin:testguest",
            "--memory-mib",
            "128",
            "--vcpus",
            "2",
            "--cmdline",
            "tern.hb_ms=50",
            "--runtime-dir",
            &rt,
        ],
    );
    let up = vm.wait_line(BOOT, |l| l.starts_with("TERN-GUEST up"));
    assert_eq!(field(&up, "cpus"), Some(2), "{up}");
    let mut per_cpu = [0u32; 2];
    let deadline = Instant::now() + Duration::from_secs(10);
    while per_cpu.iter().any(|n| *n < 3) {
        assert!(
            Instant::now() < deadline,
            "heartbeats per vCPU: {per_cpu:?}"
        );
        let hb = vm.wait_line(Duration::from_secs(5), is_hb);
        let cpu = field(&hb, "cpu").unwrap_or_else(|| panic!("no cpu= in {hb}"));
        per_cpu[cpu as usize] += 1;
    }
}

#[test]
fn pause_stops_heartbeats_and_resume_continues_the_sequence() {
    require_kvm();
    let dir = scratch();
    let rt = dir.path().join("rt").display().to_string();
    let sock = dir.path().join("api.sock").display().to_string();
    let mut vm = RunningVm::start(
        dir.path(),
        &[
            "--kernel",
            "builtin:testguest",
            "--memory-mib",
            "128",
            "--cmdline",
            "tern.hb_ms=50",
            "--api-sock",
            &sock,
            "--runtime-dir",
            &rt,
        ],
    );
    vm.wait_line(BOOT, |l| l.starts_with("TERN-GUEST up"));
    vm.wait_line(Duration::from_secs(5), |l| {
        field(l, "seq").is_some_and(|s| s >= 3)
    });

    let (code, _, err) = tern_cmd(&["vm", "pause", "--api-sock", &sock]);
    assert_eq!(code, 0, "{err}");
    let paused_at = Instant::now();
    // Lines already written before the pause may still be in the pipe.
    let in_flight = vm.collect_for(Duration::from_millis(200));
    let last_seq = vm
        .seen
        .iter()
        .rev()
        .find(|l| is_hb(l))
        .and_then(|l| field(l, "seq"))
        .unwrap();
    let during = vm.collect_for(Duration::from_millis(1000));
    assert!(
        during.iter().all(|l| !is_hb(l)),
        "heartbeats while paused: {during:?} (in flight before: {in_flight:?})"
    );

    let (code, _, err) = tern_cmd(&["vm", "resume", "--api-sock", &sock]);
    assert_eq!(code, 0, "{err}");
    let pause_us = paused_at.elapsed().as_micros() as u64;
    let next = vm.wait_line(Duration::from_secs(5), is_hb);
    assert_eq!(
        field(&next, "seq"),
        Some(last_seq + 1),
        "sequence continues: {next}"
    );
    // The guest's own clock (the TSC) saw the pause as one long gap in its loop.
    let gap = field(&next, "maxgap_us").unwrap();
    assert!(
        gap + 100_000 >= pause_us,
        "maxgap {gap} µs vs a pause of {pause_us} µs"
    );
    let after = vm.wait_line(Duration::from_secs(5), is_hb);
    assert_eq!(field(&after, "seq"), Some(last_seq + 2));
    assert_eq!(tern_cmd(&["vm", "stop", "--api-sock", &sock]).0, 0);
    assert_eq!(vm.wait_exit(Duration::from_secs(10)), 0);
}

#[test]
fn virtio_blk_verify_passes_and_the_image_holds_the_pattern() {
    require_kvm();
    let dir = scratch();
    let rt = dir.path().join("rt").display().to_string();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 4 << 20]).unwrap();
    let disk = img.display().to_string();
    let mut vm = RunningVm::start(
        dir.path(),
        &[
            "--kernel",
            "builtin:testguest",
            "--memory-mib",
            "128",
            "--disk",
            &disk,
            "--cmdline",
            "tern.hb_ms=0 tern.blk=verify tern.poweroff_ms=100",
            "--runtime-dir",
            &rt,
        ],
    );
    let line = vm.wait_line(Duration::from_secs(30), |l| l.starts_with("BLK verify"));
    assert!(line.starts_with("BLK verify ok"), "{line}");
    assert_eq!(vm.wait_exit(Duration::from_secs(10)), 0);
    let image = std::fs::read(&img).unwrap();
    let sectors = tern_guest_image::BLK_VERIFY_SECTORS;
    assert_eq!(field(&line, "sectors"), Some(sectors), "{line}");
    assert_eq!(
        tern_guest_image::blk_pattern_mismatch(&image, sectors),
        None
    );
}

#[test]
fn a_readonly_disk_is_left_untouched() {
    require_kvm();
    let dir = scratch();
    let rt = dir.path().join("rt").display().to_string();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0x5au8; 1 << 20]).unwrap();
    let disk = format!("{},readonly", img.display());
    let mut vm = RunningVm::start(
        dir.path(),
        &[
            "--kernel",
            "builtin:testguest",
            "--memory-mib",
            "128",
            "--disk",
            &disk,
            "--cmdline",
            "tern.hb_ms=0 tern.blk=verify tern.poweroff_ms=100",
            "--runtime-dir",
            &rt,
        ],
    );
    let line = vm.wait_line(Duration::from_secs(30), |l| l.starts_with("BLK verify"));
    assert!(line.contains("FAIL"), "{line}");
    assert_eq!(vm.wait_exit(Duration::from_secs(10)), 0);
    assert!(std::fs::read(&img).unwrap().iter().all(|b| *b == 0x5a));
}

#[test]
fn guest_power_off_exits_the_vmm_with_status_zero() {
    require_kvm();
    let dir = scratch();
    let rt = dir.path().join("rt");
    let rts = rt.display().to_string();
    let mut vm = RunningVm::start(
        dir.path(),
        &[
            "--kernel",
            "builtin:testguest",
            "--memory-mib",
            "64",
            "--cmdline",
            "tern.hb_ms=50 tern.poweroff_ms=300",
            "--name",
            "offtest",
            "--runtime-dir",
            &rts,
        ],
    );
    vm.wait_line(BOOT, |l| l.starts_with("TERN-GUEST up"));
    assert!(rt.join("offtest.json").exists());
    assert_eq!(vm.wait_exit(Duration::from_secs(15)), 0, "{}", vm.stderr());
    assert!(vm.stderr().contains("powered off with status 0"));
    assert!(!rt.join("offtest.json").exists());
}
