//! VM state and dirty tracking for live migration. The typed VM state is complete: a paused VM's memory and `VmState`, moved into a second,
//! freshly built VM, let the guest continue there exactly where it stopped (its heartbeat sequence
//! goes on). This is the in-process core of a live migration. Needs root and /dev/kvm.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tern_test_support::{require_kvm, wait_for};
use tern_vmm::Vm;
use tern_vmm::config::{HostLimits, KernelSource, VmConfig, VmConfigInput};
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

fn config(dir: &Path, name: &str) -> VmConfig {
    VmConfigInput {
        kernel: KernelSource::Embedded {
            name: "builtin:testguest".into(),
            bytes: Arc::from(tern_guest_image::testguest_elf()),
        },
        initrd: None,
        cmdline: "tern.hb_ms=50".into(),
        memory_mib: 64,
        vcpus: 1,
        disks: vec![],
        serial: format!("file:{}", dir.join(format!("{name}.log")).display()),
        api_sock: None,
        name: name.into(),
        runtime_dir: dir.join("rt"),
    }
    .validate(&HostLimits::probe())
    .expect("valid config")
}

fn heartbeats(path: &Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("HB seq="))
        .filter_map(|r| r.split_whitespace().next()?.parse().ok())
        .collect()
}

#[test]
fn a_guest_moved_with_its_memory_and_state_continues_in_a_new_vm() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let a = Vm::create(config(dir.path(), "a")).expect("VM a");
    a.resume().unwrap();
    let log_a = dir.path().join("a.log");
    wait_for("3 heartbeats on a", Duration::from_secs(20), || {
        heartbeats(&log_a).len() >= 3
    });

    a.pause().unwrap();
    let state = a.save_state().expect("state of a paused VM");
    let last = *heartbeats(&log_a).last().unwrap();
    assert_eq!(state.vcpus.len(), 1);
    let v = &state.vcpus[0];
    assert_ne!(v.regs.rip, 0);
    assert!(
        v.msrs.iter().any(|m| m.index == 0x10 && m.data != 0),
        "IA32_TSC saved"
    );
    assert!(v.lapic.regs.iter().any(|b| *b != 0), "LAPIC saved");
    assert!(!v.cpuid.is_empty());
    assert_eq!(
        a.save_state().unwrap().vcpus[0].regs.rip,
        v.regs.rip,
        "a paused VM stands still"
    );

    let b = Vm::create(config(dir.path(), "b")).expect("VM b");
    for region in a.memory().iter() {
        let mut buf = vec![0u8; region.len() as usize];
        a.memory()
            .read_slice(&mut buf, region.start_addr())
            .unwrap();
        b.memory().write_slice(&buf, region.start_addr()).unwrap();
    }
    // Through its serialized form, as a migration stream would carry it.
    let text = serde_json::to_string(&state).expect("serialize the state");
    let state: tern_vmm::state::VmState = serde_json::from_str(&text).expect("deserialize");
    b.restore_state(&state).expect("restore into b");
    a.request_stop();
    a.wait();
    b.resume().unwrap();

    let log_b = dir.path().join("b.log");
    wait_for(
        &format!(
            "2 heartbeats on b (b's console: {:?})",
            std::fs::read_to_string(&log_b)
        ),
        Duration::from_secs(10),
        || heartbeats(&log_b).len() >= 2,
    );
    let seqs = heartbeats(&log_b);
    assert_eq!(
        seqs[0],
        last + 1,
        "the sequence continues on b: a ended at {last}, b has {seqs:?}"
    );
    assert_eq!(seqs[1], last + 2);
    assert!(
        !std::fs::read_to_string(&log_b)
            .unwrap()
            .contains("TERN-GUEST up"),
        "b did not boot the guest afresh"
    );
    b.request_stop();
    b.wait();
}

#[test]
fn state_cannot_be_taken_while_running() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let vm = Vm::create(config(dir.path(), "c")).expect("VM c");
    vm.resume().unwrap();
    assert_eq!(
        vm.save_state().unwrap_err(),
        tern_vmm::ControlError::MustBePaused
    );
    vm.request_stop();
    assert_eq!(vm.wait(), tern_vmm::VmExit::Stopped);
}

#[test]
fn dirty_bitmaps_report_guest_and_vmm_writes_and_nothing_while_paused() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), "d");
    cfg.cmdline = "tern.hb_ms=50 tern.dirty_mib=8 tern.dirty_rate=20000".into();
    let vm = Vm::create(cfg).expect("VM d");
    assert_eq!(
        vm.take_dirty_bitmaps().unwrap_err(),
        tern_vmm::ControlError::DirtyLoggingOff
    );
    vm.resume().unwrap();
    let log = dir.path().join("d.log");
    wait_for("the writer", Duration::from_secs(20), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("DIRTY pages=")
    });
    vm.set_dirty_logging(true).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let dirty: u64 = vm
        .take_dirty_bitmaps()
        .unwrap()
        .iter()
        .map(|b| b.count())
        .sum();
    // 20,000 pages/s for 0.3 s, with a wide margin for start-up and host noise.
    assert!(dirty >= 1000, "only {dirty} dirty pages");

    vm.pause().unwrap();
    vm.take_dirty_bitmaps().unwrap();
    let while_paused: u64 = vm
        .take_dirty_bitmaps()
        .unwrap()
        .iter()
        .map(|b| b.count())
        .sum();
    assert_eq!(while_paused, 0, "a paused guest writes nothing");

    // A write by the VMM itself (as a device filling a guest buffer does) is reported too.
    vm.memory()
        .write_slice(&[1u8; 16], vm_memory::GuestAddress(0x30_0000))
        .unwrap();
    let maps = vm.take_dirty_bitmaps().unwrap();
    let pages: Vec<u64> = maps
        .iter()
        .flat_map(|b| b.pages().collect::<Vec<_>>())
        .collect();
    assert_eq!(pages, vec![0x30_0000]);
    vm.request_stop();
    vm.wait();
}

#[test]
fn both_vcpus_of_a_moved_smp_guest_continue() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let smp = |name: &str| {
        let mut c = config(dir.path(), name);
        c.vcpus = 2;
        c
    };
    let a = Vm::create(smp("sa")).expect("VM sa");
    a.resume().unwrap();
    let log_a = dir.path().join("sa.log");
    wait_for("heartbeats on sa", Duration::from_secs(20), || {
        heartbeats(&log_a).len() >= 4
    });
    a.pause().unwrap();
    let state = a.save_state().unwrap();
    assert_eq!(state.vcpus.len(), 2);
    let b = Vm::create(smp("sb")).expect("VM sb");
    for region in a.memory().iter() {
        let mut buf = vec![0u8; region.len() as usize];
        a.memory()
            .read_slice(&mut buf, region.start_addr())
            .unwrap();
        b.memory().write_slice(&buf, region.start_addr()).unwrap();
    }
    b.restore_state(&state).unwrap();
    a.request_stop();
    a.wait();
    b.resume().unwrap();
    let log_b = dir.path().join("sb.log");
    let cpus_seen = |cpu: &str| {
        std::fs::read_to_string(&log_b)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("HB seq=") && l.ends_with(cpu))
            .count()
    };
    wait_for(
        &format!(
            "heartbeats of both vCPUs on sb: {:?}",
            std::fs::read_to_string(&log_b)
        ),
        Duration::from_secs(10),
        || cpus_seen(" cpu=0") >= 2 && cpus_seen(" cpu=1") >= 2,
    );
    b.request_stop();
    b.wait();
}

#[test]
fn a_dirty_rate_sample_ends_early_when_dirty_logging_is_wanted() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), "e");
    cfg.cmdline = "tern.hb_ms=50 tern.dirty_mib=8 tern.dirty_rate=20000".into();
    let vm = Arc::new(Vm::create(cfg).expect("VM e"));
    vm.resume().unwrap();
    let log = dir.path().join("e.log");
    wait_for("the writer", Duration::from_secs(20), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("DIRTY pages=")
    });
    // A long sample; a migration arming logging 100 ms into it must not wait for its end.
    let sampler = {
        let vm = Arc::clone(&vm);
        std::thread::spawn(move || vm.sample_dirty_rate(Duration::from_secs(8)))
    };
    std::thread::sleep(Duration::from_millis(100));
    vm.set_dirty_logging(true).unwrap();
    let sample = sampler.join().unwrap().expect("the cut-short sample");
    assert!(
        sample.window_ms < 4_000,
        "the 8 s window was cut short when logging was wanted: {sample:?}"
    );
    assert!(
        sample.pages > 0,
        "the writer's pages were counted: {sample:?}"
    );
    // Logging is the migration's now: it stays on, and a new sample is refused.
    assert!(vm.take_dirty_bitmaps().is_ok(), "logging left on");
    assert!(vm.sample_dirty_rate(Duration::from_millis(10)).is_err());
    vm.set_dirty_logging(false).unwrap();
    vm.request_stop();
    vm.wait();
}
