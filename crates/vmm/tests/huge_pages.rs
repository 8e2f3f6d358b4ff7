//! `--huge-pages` reaches guest RAM's mapping: with `on` every RAM region is advised for
//! transparent huge pages (`THPeligible: 1`, `hg` in its flags) and memory touched there is
//! backed by huge pages (`AnonHugePages`); with `off` none of it is. Either way every RAM region
//! sits at a 2 MiB-aligned host address, whatever the kernel and `--memory-mib` (odd ones
//! included), so that KVM can map the guest with huge pages too. Needs root, /dev/kvm and a host
//! whose THP mode is madvise or always.

use std::sync::Arc;

use tern_vmm::Vm;
use tern_vmm::config::{HostLimits, HugePages, KernelSource, VmConfig, VmConfigInput};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

fn config(dir: &std::path::Path, name: &str, memory_mib: u64) -> VmConfig {
    VmConfigInput {
        kernel: KernelSource::Embedded {
            name: "builtin:testguest".into(),
            bytes: Arc::from(tern_guest_image::testguest_elf()),
        },
        initrd: None,
        cmdline: "tern.hb_ms=50".into(),
        memory_mib,
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

/// `(host address, length)` of every RAM region.
fn region_hosts(mem: &tern_vmm::layout::GuestMemory) -> Vec<(u64, u64)> {
    mem.iter()
        .map(|r| {
            let host = mem.get_host_address(r.start_addr()).unwrap() as u64;
            (host, r.len())
        })
        .collect()
}

/// Builds a VM with `huge_pages`, writes 8 MiB of its RAM from 16 MiB on, and returns its RAM
/// mapping as smaps shows it.
fn touched_ram(huge_pages: HugePages) -> (Mapping, u64) {
    let dir = tempfile::tempdir().unwrap();
    let host = HostLimits::probe();
    let cfg = config(
        dir.path(),
        &format!("hp-{huge_pages}-{}", std::process::id()),
        64,
    )
    .with_huge_pages(huge_pages, &host)
    .unwrap();
    let vm = Vm::create(cfg).unwrap();
    let mem = vm.memory();
    let host_addr = region_hosts(mem)[0].0;
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
    assert_eq!(addr % (2 << 20), 0, "on: guest RAM at {addr:#x}: {on:?}");
    assert!(
        on.anon_huge_kib >= 2048,
        "on: 8 MiB written, yet no huge page backs them: {on:?}"
    );

    let (off, addr) = touched_ram(HugePages::Off);
    assert_eq!(addr % (2 << 20), 0, "off: guest RAM at {addr:#x}: {off:?}");
    assert!(!off.thp_eligible, "off: {off:?}");
    assert!(off.flags.iter().any(|f| f == "nh"), "off: {off:?}");
    assert_eq!(off.anon_huge_kib, 0, "off: {off:?}");
}

/// With an odd `--memory-mib` every RAM region still starts 2 MiB-aligned on the host (KVM maps a
/// huge page only where the guest-physical and host addresses agree modulo 2 MiB, and the regions
/// start at 0 and 4 GiB): 65 MiB (one region) and 3,137 MiB (the second region, from 4 GiB, is
/// 65 MiB). The kernel alone does not give this for such lengths (before Linux 6.7 for none,
/// since 6.13 only for multiples of 2 MiB).
#[test]
fn every_ram_region_is_2_mib_aligned_with_an_odd_memory_size() {
    tern_test_support::require_kvm();
    let host = HostLimits::probe();
    assert!(
        host.thp.allows_huge_pages(),
        "this test needs transparent huge pages in madvise or always mode (the host's is {})",
        host.thp
    );
    for (mib, regions) in [(65u64, 1usize), (3072 + 65, 2)] {
        for huge_pages in [HugePages::On, HugePages::Off] {
            let dir = tempfile::tempdir().unwrap();
            let cfg = config(
                dir.path(),
                &format!("hp-odd-{mib}-{huge_pages}-{}", std::process::id()),
                mib,
            )
            .with_huge_pages(huge_pages, &host)
            .unwrap();
            let vm = Vm::create(cfg).unwrap();
            let hosts = region_hosts(vm.memory());
            assert_eq!(hosts.len(), regions, "{mib} MiB: {hosts:x?}");
            assert_eq!(
                hosts.iter().map(|h| h.1).sum::<u64>(),
                mib << 20,
                "{mib} MiB: {hosts:x?}"
            );
            for (addr, len) in &hosts {
                assert_eq!(
                    addr % (2 << 20),
                    0,
                    "{mib} MiB, huge pages {huge_pages}: the region of {len:#x} bytes at \
                     {addr:#x} is not 2 MiB-aligned: {hosts:x?}"
                );
            }
            vm.request_stop();
            vm.wait();
        }
    }
}
