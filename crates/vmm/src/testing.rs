//! Tiny hand-assembled PVH kernels for tests of the VMM itself (boot, serial, exit port, faults),
//! independent of the test guest.

/// Where the tiny kernels load and start.
pub const TINY_LOAD_ADDR: u64 = 0x10_0000;

/// What the tiny kernel does after printing its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TinyEnd {
    /// Writes this status to the exit port (0x501).
    PowerOff(u8),
    /// Writes 0xfe to the i8042 command port (a reset request).
    Reset,
    /// Loads an empty IDT and executes `ud2`: a triple fault.
    TripleFault,
    /// Halts forever with interrupts off (a hung guest, for pause and stop tests).
    Halt,
}

/// A PVH ELF whose 32-bit entry writes `message` to COM1 byte by byte, then does `end`.
pub fn tiny_pvh_elf(message: &str, end: TinyEnd) -> Vec<u8> {
    let mut code: Vec<u8> = Vec::new();
    let msg_off = 64u32; // the message sits 64 bytes into the segment
    let msg_addr = TINY_LOAD_ADDR as u32 + msg_off;
    code.push(0xbe); // mov esi, imm32
    code.extend_from_slice(&msg_addr.to_le_bytes());
    code.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    // loop (9): lodsb; test al,al; jz done; out dx,al; jmp loop
    code.extend_from_slice(&[0xac, 0x84, 0xc0, 0x74, 0x03, 0xee, 0xeb, 0xf8]);
    // done (17):
    match end {
        TinyEnd::PowerOff(status) => {
            code.extend_from_slice(&[0x66, 0xba, 0x01, 0x05, 0xb0, status, 0xee]);
        }
        TinyEnd::Reset => {
            code.extend_from_slice(&[0x66, 0xba, 0x64, 0x00, 0xb0, 0xfe, 0xee]);
        }
        TinyEnd::TripleFault => {
            // lidt [msg_addr - 8] (8 zero bytes there: limit 0), then ud2
            code.extend_from_slice(&[0x0f, 0x01, 0x1d]);
            code.extend_from_slice(&(msg_addr - 8).to_le_bytes());
            code.extend_from_slice(&[0x0f, 0x0b]);
        }
        TinyEnd::Halt => {
            code.push(0xfa); // cli
        }
    }
    code.extend_from_slice(&[0xf4, 0xeb, 0xfd]); // hlt; jmp hlt
    assert!(
        code.len() <= msg_off as usize - 8,
        "tiny kernel code too long"
    );
    let mut segment = code;
    segment.resize(msg_off as usize, 0);
    segment.extend_from_slice(message.as_bytes());
    segment.push(0);

    // ELF layout: header (64) | 2 program headers (2 × 56) | note (at 176) | segment (at 0x100).
    let note_off = 64 + 2 * 56;
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes()); // namesz
    note.extend_from_slice(&8u32.to_le_bytes()); // descsz
    note.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&TINY_LOAD_ADDR.to_le_bytes());
    let seg_off = 0x100u64;

    let mut elf = vec![0u8; 64];
    elf[0..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2; // 64-bit
    elf[5] = 1; // little-endian
    elf[6] = 1; // version
    elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    elf[20..24].copy_from_slice(&1u32.to_le_bytes());
    elf[24..32].copy_from_slice(&TINY_LOAD_ADDR.to_le_bytes()); // e_entry
    elf[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    elf[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    elf[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    elf[56..58].copy_from_slice(&2u16.to_le_bytes()); // e_phnum
    let phdr = |p_type: u32, flags: u32, off: u64, addr: u64, size: u64, align: u64| {
        let mut p = Vec::with_capacity(56);
        p.extend_from_slice(&p_type.to_le_bytes());
        p.extend_from_slice(&flags.to_le_bytes());
        p.extend_from_slice(&off.to_le_bytes());
        p.extend_from_slice(&addr.to_le_bytes());
        p.extend_from_slice(&addr.to_le_bytes());
        p.extend_from_slice(&size.to_le_bytes());
        p.extend_from_slice(&size.to_le_bytes());
        p.extend_from_slice(&align.to_le_bytes());
        p
    };
    elf.extend(phdr(
        1,
        7,
        seg_off,
        TINY_LOAD_ADDR,
        segment.len() as u64,
        0x1000,
    ));
    elf.extend(phdr(4, 4, note_off as u64, 0, note.len() as u64, 4));
    elf.extend(&note);
    elf.resize(seg_off as usize, 0);
    elf.extend(&segment);
    elf
}

#[cfg(test)]
mod tests {
    use super::*;
    use linux_loader::loader::{Elf, KernelLoader, PvhBootCapability};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    #[test]
    fn the_tiny_kernel_loads_with_its_pvh_entry_and_message() {
        let elf = tiny_pvh_elf("hello\n", TinyEnd::PowerOff(0));
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let r = Elf::load(
            &mem,
            None,
            &mut std::io::Cursor::new(&elf),
            Some(GuestAddress(0x10_0000)),
        )
        .unwrap();
        assert_eq!(
            r.pvh_boot_cap,
            PvhBootCapability::PvhEntryPresent(GuestAddress(TINY_LOAD_ADDR))
        );
        let mut msg = [0u8; 6];
        mem.read_slice(&mut msg, GuestAddress(TINY_LOAD_ADDR + 64))
            .unwrap();
        assert_eq!(&msg, b"hello\n");
    }
}
