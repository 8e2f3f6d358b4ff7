//! Fuzz target: the migration frame decoder on arbitrary bytes, with and without an agreed
//! memory layout, from a slice and from a stream. It must never panic, and whatever it accepts
//! must encode back to the same bytes (a `PageData` frame, which decodes to a page batch, as a
//! `PageData` frame again, whose per-page crc32c the encoder takes from the data: the same
//! bytes when every page matched its checksum, else the same length, and the re-encoded frame
//! decodes to the same pages with none mismatched). With the first byte's top bit set, the
//! rest is wrapped in
//! a valid header and checksum (kind from the low bits) so the payload parsers see random input.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_migration::wire::{Frame, FrameKind, decode, read_frame, seal};
use tern_migration::{MemoryLayout, PAGE_SIZE, Region};

fuzz_target!(|data: &[u8]| {
    let layout = MemoryLayout::new(vec![
        Region {
            guest_addr: 0,
            size: 64 * PAGE_SIZE,
        },
        Region {
            guest_addr: 1 << 32,
            size: 16 * PAGE_SIZE,
        },
    ])
    .expect("valid layout");
    let sealed;
    let bytes = match data.first() {
        Some(&b) if b & 0x80 != 0 => {
            sealed = seal(b & 0x1f, &data[1..]);
            &sealed[..]
        }
        _ => data,
    };
    for l in [None, Some(&layout)] {
        let mut rest = bytes;
        // Decode frames back to back, as a stream would deliver them.
        while let Ok((frame, used)) = decode(rest, l) {
            let again = match &frame {
                Frame::Pages(b) if rest[5] == FrameKind::PageData as u8 => {
                    let again = b.to_page_data_bytes();
                    if !b.mismatched().is_empty() {
                        assert_eq!(again.len(), used, "re-encoded length differs");
                        let (Frame::Pages(clean), _) =
                            decode(&again, l).expect("re-encoded decodes")
                        else {
                            panic!("a PageData frame decodes to pages");
                        };
                        assert!(clean.mismatched().is_empty(), "re-encoded crcs match");
                        assert!(clean.iter().eq(b.iter()), "same pages");
                        rest = &rest[used..];
                        continue;
                    }
                    again
                }
                f => f.encode(),
            };
            assert_eq!(again, rest[..used].to_vec(), "re-encoding differs");
            rest = &rest[used..];
        }
        let mut cursor = std::io::Cursor::new(bytes);
        while read_frame(&mut cursor, l).is_ok() {}
    }
});
