//! The embedded Tern test guest: builds crates/guest and exposes its ELF image.
//!
//! `build.rs` compiles the freestanding guest kernel (crates/guest) with its own flags, refuses the
//! build if its CPL0 code contains an SSE/AVX instruction (see [`cpl0check`]), and this crate embeds
//! the result. Besides the bytes, it carries what a host needs to talk to that guest, as pure code:
//! the console line formats ([`console`]), the virtio-blk check pattern ([`blk_pattern_byte`]) and the
//! QEMU command line that boots the same ELF ([`qemu`]). The guest/VMM contract is
//! docs/guest-interface.md; the guest itself is described in docs/guest.md.

#![forbid(unsafe_code)]

pub mod console;
pub mod cpl0check;
pub mod qemu;

/// The name of the test guest (`--kernel builtin:testguest`, `tern image export testguest`).
pub const TESTGUEST: &str = "testguest";

/// The names of the images this crate embeds.
pub const NAMES: [&str; 1] = [TESTGUEST];

/// Number of CPL0 instructions the build checked (for `tern image` to report).
pub const CPL0_INSTRUCTIONS_CHECKED: &str = env!("TERN_GUEST_CPL0_INSNS");

static TESTGUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/tern-testguest.elf"));

/// The test guest: a static x86_64 ELF with a PVH entry note, loaded at 1 MiB.
pub fn testguest_elf() -> &'static [u8] {
    TESTGUEST_ELF
}

/// An embedded image by name (`testguest`), or `None`.
pub fn builtin(name: &str) -> Option<&'static [u8]> {
    match name {
        TESTGUEST => Some(TESTGUEST_ELF),
        _ => None,
    }
}

/// Sectors the guest's `tern.blk=verify` check writes (from sector 0; fewer if the disk is smaller).
pub const BLK_VERIFY_SECTORS: u64 = 2048;

/// The byte the guest's virtio-blk check writes at offset `i` (0..512) of `sector`: a 16-byte tag
/// (`TERNBLK\0`, then the sector number little-endian), then `(sector * 7 + i) % 251`.
pub fn blk_pattern_byte(sector: u64, i: usize) -> u8 {
    const TAG: &[u8; 8] = b"TERNBLK\0";
    match i {
        0..8 => TAG[i],
        8..16 => sector.to_le_bytes()[i - 8],
        _ => ((sector * 7 + i as u64) % 251) as u8,
    }
}

/// Checks that `image` holds the verify pattern in its first `sectors` sectors; returns the first
/// sector that differs.
pub fn blk_pattern_mismatch(image: &[u8], sectors: u64) -> Option<u64> {
    (0..sectors).find(|&s| {
        let off = s as usize * 512;
        image.get(off..off + 512).is_none_or(|sec| {
            sec.iter()
                .enumerate()
                .any(|(i, &b)| b != blk_pattern_byte(s, i))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], o: usize) -> u16 {
        u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    /// (p_type, p_offset, p_paddr, p_filesz, p_memsz, p_align) of each program header.
    fn phdrs(elf: &[u8]) -> Vec<(u32, u64, u64, u64, u64, u64)> {
        let (off, size, n) = (
            u64_at(elf, 0x20) as usize,
            u16_at(elf, 0x36) as usize,
            u16_at(elf, 0x38) as usize,
        );
        (0..n)
            .map(|i| {
                let p = off + i * size;
                (
                    u32_at(elf, p),
                    u64_at(elf, p + 8),
                    u64_at(elf, p + 24),
                    u64_at(elf, p + 32),
                    u64_at(elf, p + 40),
                    u64_at(elf, p + 48),
                )
            })
            .collect()
    }

    #[test]
    fn testguest_is_a_static_x86_64_elf_with_flags_zero() {
        let elf = testguest_elf();
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!(elf[4], 2, "ELF64");
        assert_eq!(u16_at(elf, 0x10), 2, "ET_EXEC");
        assert_eq!(u16_at(elf, 0x12), 62, "EM_X86_64");
        assert_eq!(u32_at(elf, 0x30), 0, "e_flags");
    }

    #[test]
    fn load_segments_sit_at_or_above_one_mib() {
        let loads: Vec<_> = phdrs(testguest_elf())
            .into_iter()
            .filter(|p| p.0 == 1)
            .collect();
        assert!(!loads.is_empty());
        for (_, _, paddr, filesz, memsz, _) in loads {
            assert!(paddr >= 1 << 20, "PT_LOAD at {paddr:#x}");
            assert!(memsz >= filesz);
            assert!(paddr + memsz < 64 << 20, "image ends below 64 MiB");
        }
    }

    #[test]
    fn pvh_note_is_in_its_own_pt_note_with_an_8_byte_entry() {
        let elf = testguest_elf();
        let notes: Vec<_> = phdrs(elf).into_iter().filter(|p| p.0 == 4).collect();
        assert_eq!(notes.len(), 1, "one PT_NOTE");
        let (_, off, _, filesz, _, align) = notes[0];
        assert_eq!(align, 4);
        let n = &elf[off as usize..(off + filesz) as usize];
        assert_eq!(
            (u32_at(n, 0), u32_at(n, 4), u32_at(n, 8)),
            (4, 8, 18),
            "namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY"
        );
        assert_eq!(&n[12..16], b"Xen\0");
        // QEMU reads 8 bytes at 12 + align_up(namesz, 4); the entry is the kernel's first byte.
        assert_eq!(u64_at(n, 16), 0x100000);
    }

    #[test]
    fn build_checked_some_cpl0_instructions() {
        let n: usize = CPL0_INSTRUCTIONS_CHECKED.parse().unwrap();
        assert!(n > 100, "only {n} CPL0 instructions checked");
    }

    #[test]
    fn builtin_knows_testguest_only() {
        assert_eq!(
            builtin("testguest").map(<[u8]>::len),
            Some(testguest_elf().len())
        );
        assert!(builtin("nonesuch").is_none());
    }

    #[test]
    fn pattern_tags_each_sector_with_its_number() {
        let sector: Vec<u8> = (0..512).map(|i| blk_pattern_byte(0x0102, i)).collect();
        assert_eq!(&sector[..8], b"TERNBLK\0");
        assert_eq!(&sector[8..16], &[2, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(sector[16], ((0x0102 * 7 + 16) % 251) as u8);
        let mut image: Vec<u8> = (0..3u64)
            .flat_map(|s| (0..512).map(move |i| blk_pattern_byte(s, i)))
            .collect();
        assert_eq!(blk_pattern_mismatch(&image, 3), None);
        image[512 + 100] ^= 1;
        assert_eq!(blk_pattern_mismatch(&image, 3), Some(1));
        assert_eq!(blk_pattern_mismatch(&image, 4), Some(1));
    }
}

/// The guest's command-line parser, compiled for the host so that its cases run under `cargo test`.
#[cfg(test)]
#[path = "../../guest/src/cmdline.rs"]
mod guest_cmdline;

#[cfg(test)]
mod cmdline_tests {
    use super::guest_cmdline::parse;

    #[test]
    fn defaults_apply_without_tern_keys() {
        let c = parse("console=ttyS0 quiet").unwrap();
        assert_eq!(
            (
                c.hb_ms,
                c.dirty_mib,
                c.dirty_rate,
                c.blk_verify,
                c.poweroff_ms
            ),
            (1000, 0, 0, false, None)
        );
    }

    #[test]
    fn every_key_is_read_and_unknown_ones_ignored() {
        let c = parse("tern.hb_ms=50 tern.dirty_mib=256 tern.dirty_rate=20000 tern.blk=verify tern.poweroff_ms=0 tern.other=1 noequals")
            .unwrap();
        assert_eq!(
            (
                c.hb_ms,
                c.dirty_mib,
                c.dirty_rate,
                c.blk_verify,
                c.poweroff_ms
            ),
            (50, 256, 20000, true, Some(0))
        );
        assert!(!c.selftest_fault);
        assert_eq!(c.max_after_ms, None);
        assert_eq!(
            parse("tern.max_after_ms=4000").unwrap().max_after_ms,
            Some(4000)
        );
        assert!(parse("tern.selftest=pagefault").unwrap().selftest_fault);
        assert!(parse("tern.selftest=corruptpage").unwrap().selftest_corrupt);
        assert!(!c.dirty_fill);
        assert!(parse("tern.dirty_fill=data").unwrap().dirty_fill);
        assert!(
            !parse("tern.dirty_fill=data tern.dirty_fill=zero")
                .unwrap()
                .dirty_fill
        );
    }

    #[test]
    fn bad_values_name_the_key() {
        for (line, key) in [
            ("tern.hb_ms=fast", "tern.hb_ms"),
            ("tern.dirty_mib=-1", "tern.dirty_mib"),
            ("tern.dirty_rate=", "tern.dirty_rate"),
            ("tern.blk=check", "tern.blk"),
            ("tern.poweroff_ms=99999999999999999999", "tern.poweroff_ms"),
            ("tern.selftest=gp", "tern.selftest"),
            ("tern.max_after_ms=soon", "tern.max_after_ms"),
            ("tern.dirty_fill=random", "tern.dirty_fill"),
        ] {
            let err = parse(line).unwrap_err();
            assert_eq!(err.key, key, "{line}");
            assert_eq!(err.value, line.split_once('=').unwrap().1, "{line}");
        }
    }

    #[test]
    fn last_occurrence_wins() {
        assert_eq!(parse("tern.hb_ms=10 tern.hb_ms=20").unwrap().hb_ms, 20);
    }
}
