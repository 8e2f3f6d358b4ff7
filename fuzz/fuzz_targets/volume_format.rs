//! Fuzz target: the shared volume's on-disk metadata (`tern_volume::format`, read through
//! `store::Volume::open` as every node does at start and on each reload): the superblock, the two
//! metadata slot headers and the namespace payload (files, extent maps, lease records).
//!
//! Input: `[mode: u8]` then, by `mode % 4`:
//! 0. a superblock sector for `Superblock::decode`;
//! 1. a slot header sector for `SlotHeader::decode`;
//! 2. `[extent_count: u16]` and a payload for `Metadata::decode_payload`;
//! 3. a whole volume for `Volume::open` on a sparse LUN: `[seq0: u8] [seq1: u8] [len0: u16]
//!    [payload0: len0] [payload1: rest]` — a valid superblock for a 64-extent volume, then each
//!    slot's header (with correct checksums unless `mode & 0x10` / `0x20` damages one) and
//!    payload. `mode & 0x40` leaves slot 1 empty.
//!
//! Properties: no panic; no allocation beyond the slot size or the volume's extent count;
//! accepted metadata re-encodes and decodes to itself, and `Volume::open` picks the valid slot
//! with the higher sequence.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_fuzz::{SparseLun, take, take_le};
use tern_volume::format::{
    DATA_OFFSET, EXTENT_SIZE, META_SLOT_OFFSETS, Metadata, SECTOR, SUPERBLOCK_OFFSET, SlotHeader,
    Superblock,
};
use tern_volume::lun::Lun;
use tern_volume::store::Volume;

fn roundtrip(m: &Metadata, extent_count: u32) {
    let again = Metadata::decode_payload(&m.encode_payload(), m.seq, m.generation, extent_count)
        .expect("accepted metadata re-encodes to a valid payload");
    assert_eq!(&again, m, "metadata changed through an encode/decode");
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 => {
            if let Ok(sb) = Superblock::decode(rest) {
                assert_eq!(Superblock::decode(&sb.encode()), Ok(sb));
            }
        }
        1 => {
            if let Some(h) = SlotHeader::decode(rest) {
                assert_eq!(SlotHeader::decode(&h.encode()), Some(h));
            }
        }
        2 => {
            let extent_count = take_le(&mut rest, 2) as u32;
            if let Ok(m) = Metadata::decode_payload(rest, 1, 1, extent_count) {
                roundtrip(&m, extent_count);
            }
        }
        _ => {
            let seqs = [take_le(&mut rest, 1), take_le(&mut rest, 1)];
            let len0 = take_le(&mut rest, 2) as usize;
            let payloads = [take(&mut rest, len0), rest];
            let extents = 64u64;
            let lun = SparseLun::new(DATA_OFFSET + extents * EXTENT_SIZE);
            let sb = Superblock::for_size(lun.len(), *b"fuzz-volume-0001").expect("geometry");
            lun.put(SUPERBLOCK_OFFSET, &sb.encode());
            for slot in 0..2 {
                if slot == 1 && mode & 0x40 != 0 {
                    break;
                }
                let payload = payloads[slot];
                let mut header = SlotHeader {
                    seq: seqs[slot],
                    generation: 1,
                    payload_len: payload.len() as u32,
                    payload_crc: crc32c::crc32c(payload),
                }
                .encode();
                if mode & (0x10 << slot) != 0 {
                    header[20] ^= 1; // damage the header (its checksum no longer matches)
                }
                lun.put(META_SLOT_OFFSETS[slot], &header);
                lun.put(META_SLOT_OFFSETS[slot] + SECTOR, payload);
            }
            if let Ok(v) = Volume::open(&lun) {
                let m = &v.meta;
                roundtrip(m, sb.extent_count);
                assert!(seqs.contains(&m.seq), "metadata from no slot");
            }
        }
    }
});
