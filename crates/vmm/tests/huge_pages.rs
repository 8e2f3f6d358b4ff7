//! `--huge-pages` reaches guest RAM's mapping: with `on` every RAM region is advised for
//! transparent huge pages (`THPeligible: 1`, `hg` in its flags), 2 MiB-aligned so that KVM can map
//! the guest with huge pages too, and memory touched there is backed by huge pages
//! (`AnonHugePages`); with `off` none of it is. Needs root, /dev/kvm and a host whose THP mode is
//! madvise or always.

use std::sync::Arc;

use tern_vmm::Vm;
use tern_vmm::config::{HostLimits, HugePages, KernelSource, VmConfig, VmConfigInput};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

fn config(dir: &std::path::Path, name: &str) -> VmConfig {
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
        serial: "null".into(),
        api_sock: None,
        name: name.into(),
        runtime_dir: dir.join("rt"),
    }
    .validate(&HostLimits::probe())
    .unwrap()
}

/// What /proc/self/smaps says of the mapping that holds `addr`.
#[derive(Debug)]
struct Mapping {
    thp_eligible: bool,
    anon_huge_kib: u64,
    flags: Vec<String>,
}

fn mapping_of(addr: u64) -> Mapping {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut found: Option<Mapping> = None;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        if let Some((a, b)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            if found.is_some() {
                break;
            }
            let (a, b) = (
                u64::from_str_radix(a, 16).unwrap(),
                u64::from_str_radix(b, 16).unwrap(),
            );
            if (a..b).contains(&addr) {
                found = Some(Mapping {
                    thp_eligible: false,
                    anon_huge_kib: 0,
                    flags: vec![],
                });
            }
            continue;
        }
        let Some(m) = found.as_mut() else { continue };
        match first {
            "THPeligible:" => m.thp_eligible = words.next() == Some("1"),
            "AnonHugePages:" => m.anon_huge_kib = words.next().unwrap().parse().unwrap(),
            "VmFlags:" => m.flags = words.map(str::to_string).collect(),
            _ => {}
        }
    }
    found.unwrap_or_else(|| panic!("no mapping holds {addr:#x}"))
}

/// Builds a VM with `huge_pages`, writes 8 MiB of its RAM from 16 MiB on, and returns its RAM
/// mapping as smaps shows it.
fn touched_ram(huge_pages: HugePages) -> (Mapping, u64) {
    let dir = tempfile::tempdir().unwrap();
    let host = HostLimits::probe();
    let cfg = config(
        dir.path(),
        &format!("hp-{huge_pages}-{}", std::process::id()),
    )
    .with_huge_pages(huge_pages, &host)
    .unwrap();
    let vm = Vm::create(cfg).unwrap();
    let mem = vm.memory();
    let region = mem.iter().next().unwrap();
    let host_addr = mem.get_host_address(region.start_addr()).unwrap() as u64;
    mem.write_slice(&vec![0x5a; 8 << 20], GuestAddress(16 << 20))
        .unwrap();
    let m = mapping_of(host_addr);
    vm.request_stop();
    vm.wait();
    (m, host_addr)
}

#[test]
fn huge_pages_on_backs_guest_ram_with_huge_pages_and_off_does_not() {
    tern_test_support::require_kvm();
    let thp = HostLimits::probe().thp;
    assert!(
        thp.allows_huge_pages(),
        "this test needs transparent huge pages in madvise or always mode (the host's is {thp})"
    );

    let (on, addr) = touched_ram(HugePages::On);
    assert!(on.thp_eligible, "on: {on:?}");
    assert!(on.flags.iter().any(|f| f == "hg"), "on: {on:?}");
    assert_eq!(
        addr % (2 << 20),
        0,
        "on: guest RAM at {addr:#x} must be 2 MiB-aligned (KVM maps a huge page only where the \
         guest-physical and host addresses agree modulo 2 MiB): {on:?}"
    );
    assert!(
        on.anon_huge_kib >= 2048,
        "on: 8 MiB written, yet no huge page backs them: {on:?}"
    );

    let (off, _) = touched_ram(HugePages::Off);
    assert!(!off.thp_eligible, "off: {off:?}");
    assert!(off.flags.iter().any(|f| f == "nh"), "off: {off:?}");
    assert_eq!(off.anon_huge_kib, 0, "off: {off:?}");
}
