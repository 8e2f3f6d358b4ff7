//! The pause protocol under repetition: many quick pause/resume cycles of a 2-vCPU guest leave
//! every vCPU's heartbeat sequence intact (no lost, repeated or reordered heartbeats), and a VM
//! that is paused reports so. Needs root and /dev/kvm.

use std::sync::Arc;
use std::time::Duration;

use tern_vmm::config::{HostLimits, KernelSource, VmConfigInput};
use tern_vmm::{RunState, Vm};

#[test]
fn many_pause_resume_cycles_keep_every_vcpus_heartbeat_sequence() {
    tern_test_support::require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("console.log");
    let cfg = VmConfigInput {
        kernel: KernelSource::Embedded {
            name: "builtin:testguest".into(),
            bytes: Arc::from(tern_guest_image::testguest_elf()),
        },
        initrd: None,
        cmdline: "tern.hb_ms=20".into(),
        memory_mib: 64,
        vcpus: 2,
        disks: vec![],
        serial: format!("file:{}", log.display()),
        api_sock: None,
        name: "pause".into(),
        runtime_dir: dir.path().join("rt"),
    }
    .validate(&HostLimits::probe())
    .unwrap();
    let vm = Vm::create(cfg).unwrap();
    assert_eq!(vm.status().state, RunState::Paused, "created parked");
    vm.resume().unwrap();
    tern_test_support::wait_for("heartbeats", Duration::from_secs(20), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("HB seq=2")
    });
    for i in 0..40 {
        vm.pause().unwrap();
        assert_eq!(vm.status().state, RunState::Paused);
        std::thread::sleep(Duration::from_millis(if i % 4 == 0 { 30 } else { 2 }));
        vm.resume().unwrap();
        assert_eq!(vm.status().state, RunState::Running);
        std::thread::sleep(Duration::from_millis(15));
    }
    std::thread::sleep(Duration::from_millis(100));
    vm.request_stop();
    vm.wait();

    let text = std::fs::read_to_string(&log).unwrap();
    for cpu in ["cpu=0", "cpu=1"] {
        let seqs: Vec<u64> = text
            .lines()
            .filter(|l| l.starts_with("HB seq=") && l.ends_with(cpu))
            .filter_map(|l| l["HB seq=".len()..].split_whitespace().next()?.parse().ok())
            .collect();
        assert!(seqs.len() >= 20, "{cpu}: only {} heartbeats", seqs.len());
        for w in seqs.windows(2) {
            assert_eq!(w[1], w[0] + 1, "{cpu}: sequence broken in {seqs:?}");
        }
    }
    assert!(!text.contains("PANIC"), "{text}");
}
