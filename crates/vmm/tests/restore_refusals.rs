//! A saved state that does not fit the VM it is restored into is refused whole: a vCPU count
//! mismatch, a disk in another slot, a serial port whose FIFO overflows each fail with their typed
//! `RestoreStateError`, and the VM is left exactly as it was (no part of the state was put in).
//! The same state, once it fits, is accepted. Needs root and /dev/kvm.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tern_test_support::{require_kvm, wait_for};
use tern_vmm::config::{HostLimits, KernelSource, VmConfig, VmConfigInput};
use tern_vmm::persist::RestoreStateError;
use tern_vmm::state::VmState;
use tern_vmm::{Vm, VmExit};

fn disk(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(format!("{name}.img"));
    std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
    p
}

fn config(dir: &Path, name: &str, disk: &Path) -> VmConfig {
    VmConfigInput {
        kernel: KernelSource::Embedded {
            name: "builtin:testguest".into(),
            bytes: Arc::from(tern_guest_image::testguest_elf()),
        },
        initrd: None,
        cmdline: "tern.hb_ms=50 tern.blk=verify".into(),
        memory_mib: 64,
        vcpus: 1,
        disks: vec![disk.display().to_string()],
        serial: format!("file:{}", dir.join(format!("{name}.log")).display()),
        api_sock: None,
        name: name.into(),
        runtime_dir: dir.join("rt"),
    }
    .validate(&HostLimits::probe())
    .expect("valid config")
}

/// The parts of a VM's state that stand still while it is paused, as comparable text: every
/// register set, the MSRs but the TSC (it counts on), the interrupt controllers, the devices.
fn still_parts(s: &VmState) -> String {
    let vcpus: Vec<String> = s
        .vcpus
        .iter()
        .map(|v| {
            let msrs: Vec<(u32, u64)> = v
                .msrs
                .iter()
                .filter(|m| m.index != 0x10)
                .map(|m| (m.index, m.data))
                .collect();
            serde_json::to_string(&(
                v.regs,
                v.sregs,
                v.fpu,
                &v.xsave,
                msrs,
                v.lapic,
                v.mp_state,
                v.debugregs,
            ))
            .unwrap()
        })
        .collect();
    serde_json::to_string(&(vcpus, &s.irqchip.ioapic, &s.irqchip.pic_master, &s.devices)).unwrap()
}

#[test]
fn states_that_do_not_fit_are_refused_with_a_typed_error_and_change_nothing() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let a = Vm::create(config(dir.path(), "a", &disk(dir.path(), "a"))).expect("VM a");
    a.resume().unwrap();
    let log_a = dir.path().join("a.log");
    wait_for(
        "a's disk check and a heartbeat",
        Duration::from_secs(30),
        || {
            let t = std::fs::read_to_string(&log_a).unwrap_or_default();
            t.contains("BLK verify ok") && t.contains("HB seq=")
        },
    );
    a.pause().unwrap();
    let good = a.save_state().expect("a's state");
    assert_eq!(good.devices.blocks.len(), 1);
    assert_ne!(
        good.devices.blocks[0].1.queue.next_avail, 0,
        "a's guest used its disk"
    );

    // b: built from the same configuration, parked before its first instruction.
    let b = Vm::create(config(dir.path(), "b", &disk(dir.path(), "b"))).expect("VM b");
    let before = b.save_state().expect("b's state");
    assert_ne!(
        still_parts(&before),
        still_parts(&good),
        "a restore of any part would show"
    );

    let mut two_vcpus = good.clone();
    two_vcpus.vcpus.push(good.vcpus[0].clone());
    match b.restore_state(&two_vcpus) {
        Err(RestoreStateError::VcpuCount { state: 2, vm: 1 }) => {}
        other => panic!("a 2-vCPU state into a 1-vCPU VM: {other:?}"),
    }
    assert_eq!(still_parts(&b.save_state().unwrap()), still_parts(&before));

    let mut other_slot = good.clone();
    other_slot.devices.blocks[0].0 -= 1;
    match b.restore_state(&other_slot) {
        Err(RestoreStateError::Slots {
            kind: "virtio-blk",
            state,
            vm,
        }) => assert_eq!((state[0] + 1, vm.len()), (vm[0], 1)),
        other => panic!("a disk in another slot: {other:?}"),
    }
    assert_eq!(still_parts(&b.save_state().unwrap()), still_parts(&before));

    let mut bad_serial = good.clone();
    bad_serial.devices.serial.in_buffer = vec![b'x'; 65];
    let e = b.restore_state(&bad_serial).unwrap_err();
    assert!(
        matches!(
            &e,
            RestoreStateError::Serial(
                tern_vmm::devices::serial::persist::SerialStateError::FullFifo { len: 65, max: 64 }
            )
        ),
        "an overfull serial FIFO: {e:?}"
    );
    assert_eq!(
        e.to_string(),
        "the saved state of the serial port does not fit"
    );
    assert_eq!(still_parts(&b.save_state().unwrap()), still_parts(&before));

    // The state that fits goes in whole.
    b.restore_state(&good).expect("the fitting state");
    let after = b.save_state().unwrap();
    assert_eq!(after.vcpus[0].regs.rip, good.vcpus[0].regs.rip);
    assert_eq!(after.devices.blocks, good.devices.blocks);
    assert_eq!(after.devices.serial, good.devices.serial);

    a.request_stop();
    assert_eq!(a.wait(), VmExit::Stopped);
    b.discard_pending_output();
    b.request_stop();
    assert_eq!(b.wait(), VmExit::Stopped);
}
