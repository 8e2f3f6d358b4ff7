//! The embedded guest as Tern's VMM loads it: linux-loader (the rust-vmm ELF loader tern-vmm uses)
//! must find the PVH entry and place the image at 1 MiB.

use linux_loader::loader::KernelLoader;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

#[test]
fn linux_loader_finds_the_pvh_entry_and_loads_at_one_mib() {
    let elf = tern_guest_image::testguest_elf();
    let mut file = tempfile::tempfile().expect("temp file");
    std::io::Write::write_all(&mut file, elf).expect("write ELF");
    let mem: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).expect("guest memory");
    let loaded =
        Elf::load(&mem, None, &mut file, None).expect("linux-loader accepts the guest ELF");
    assert_eq!(loaded.kernel_load, GuestAddress(0x100000));
    assert_eq!(
        loaded.pvh_boot_cap,
        PvhBootCapability::PvhEntryPresent(GuestAddress(0x100000))
    );
    assert!(
        loaded.kernel_end > 0x100000 && loaded.kernel_end < 8 << 20,
        "end {:#x}",
        loaded.kernel_end
    );
    // The first bytes at the entry are the guest's PVH entry code: cli; cld.
    let mut head = [0u8; 2];
    mem.read_slice(&mut head, GuestAddress(0x100000)).unwrap();
    assert_eq!(head, [0xfa, 0xfc]);
}
