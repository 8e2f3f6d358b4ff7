//! The LUN's on-disk format: superblock, two copy-on-write metadata slots, data extents (pure).
//!
//! ```text
//! 0        4 KiB                1 MiB            2 MiB            3 MiB
//! | super  | (zero)             | meta slot 0    | meta slot 1    | extent 0 | extent 1 | ...
//! ```
//!
//! Each metadata slot is one 4 KiB header (magic, sequence number, coordinator generation, payload
//! length and CRC-32C, header CRC-32C) followed by the payload. A commit writes the complete new
//! state into the slot *not* holding the newest valid state, payload first, then the header, with a
//! flush after each; readers take the valid slot with the highest generation, then sequence. A
//! crash at any write therefore leaves either the old state (the new slot fails its checksums) or
//! the new one.
//!
//! The payload is the namespace: for each virtual-disk file its size, whether it is preallocated,
//! its extent map (logical extent → physical extent, or a hole for thin files) and its lease record
//! (epoch, holder, pending hand-over). The allocation bitmap is derived from the maps, so it can
//! never disagree with them.

#![deny(clippy::disallowed_methods)]
use std::collections::BTreeMap;

use crate::codec::{Dec, Enc, Truncated};

/// Bytes per sector of metadata I/O (the unit a crash may tear).
pub const SECTOR: u64 = 4096;
/// Allocation unit of file data.
pub const EXTENT_SIZE: u64 = 1 << 20;
/// Offset of the superblock.
pub const SUPERBLOCK_OFFSET: u64 = 0;
/// Offsets of the two metadata slots.
pub const META_SLOT_OFFSETS: [u64; 2] = [1 << 20, 2 << 20];
/// Length of one metadata slot (header sector + payload).
pub const META_SLOT_LEN: u64 = 1 << 20;
/// Where extent 0 starts.
pub const DATA_OFFSET: u64 = 3 << 20;
/// Smallest LUN we format: the metadata area plus one extent.
pub const MIN_LUN_SIZE: u64 = DATA_OFFSET + EXTENT_SIZE;
/// Largest metadata payload.
pub const MAX_PAYLOAD: u64 = META_SLOT_LEN - SECTOR;
/// Format version written by this code.
pub const FORMAT_VERSION: u32 = 1;
/// Superblock magic.
pub const SUPER_MAGIC: [u8; 8] = *b"TERNVOL\0";
/// Metadata slot magic.
pub const META_MAGIC: [u8; 8] = *b"TERNMETA";
/// Map entry of a thin file's unallocated extent.
pub const HOLE: u32 = u32::MAX;
/// Largest thin file beyond the volume's own size: 1 TiB (2^20 extents). Thin files may
/// over-commit the volume (their sum, or one of them, may exceed it: space is taken at first
/// write); this cap bounds a file's extent map in memory and in control replies. See
/// [`max_file_size`].
pub const MAX_FILE_SIZE: u64 = 1 << 40;

/// The largest file a volume of `extent_count` extents accepts: [`MAX_FILE_SIZE`], or the
/// volume's own size if that is larger (what format version 1 always allowed).
pub fn max_file_size(extent_count: u32) -> u64 {
    MAX_FILE_SIZE.max(u64::from(extent_count) * EXTENT_SIZE)
}
/// Longest file name.
pub const MAX_NAME_LEN: usize = 128;

/// The most logical extents all files of a volume may map together on a small volume: 16 TiB of
/// file sizes, whose maps take 64 MiB in every node's memory. Thin files over-commit the volume
/// up to this; without a bound, a metadata slot of thin 1 TiB files would make every node that
/// reads it build ~100 GiB of maps.
pub const MAX_MAPPED_EXTENTS: u64 = 1 << 24;

/// The most logical extents all files of a volume of `extent_count` extents may map together:
/// [`MAX_MAPPED_EXTENTS`], or four times the volume's extents if that is more.
pub fn max_mapped_extents(extent_count: u32) -> u64 {
    MAX_MAPPED_EXTENTS.max(4 * u64::from(extent_count))
}

/// A node of the cluster (1-based; 0 is never a node).
pub type NodeId = u32;

/// The superblock: fixed at format time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    /// Format version.
    pub version: u32,
    /// Random identity of this volume.
    pub uuid: [u8; 16],
    /// Bytes of the LUN the volume uses.
    pub lun_size: u64,
    /// Number of data extents.
    pub extent_count: u32,
}

/// Why a superblock could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SuperblockError {
    /// All zeroes: nobody formatted this LUN.
    #[error("The LUN is not formatted (no Tern superblock; run `tern volume format`)")]
    NotFormatted,
    /// Something else lives here.
    #[error("The LUN holds something else (magic {0:02x?}), not a Tern volume")]
    Foreign([u8; 8]),
    /// A Tern volume of another version.
    #[error(
        "Tern volume format version {found} is not supported (this build reads version {FORMAT_VERSION})"
    )]
    UnsupportedVersion {
        /// Version on disk.
        found: u32,
    },
    /// Checksum mismatch or impossible geometry.
    #[error("The Tern superblock is corrupt: {0}")]
    Corrupt(&'static str),
}

impl Superblock {
    /// Geometry for a LUN of `lun_size` bytes (the tail that does not fill an extent is unused).
    pub fn for_size(lun_size: u64, uuid: [u8; 16]) -> Option<Superblock> {
        if lun_size < MIN_LUN_SIZE {
            return None;
        }
        let extents = (lun_size - DATA_OFFSET) / EXTENT_SIZE;
        let extent_count = u32::try_from(extents).ok().filter(|&n| n < HOLE)?;
        Some(Superblock {
            version: FORMAT_VERSION,
            uuid,
            lun_size,
            extent_count,
        })
    }

    /// Encode into one sector.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.0.extend_from_slice(&SUPER_MAGIC);
        e.u32(self.version);
        e.0.extend_from_slice(&self.uuid);
        e.u64(self.lun_size);
        e.u64(EXTENT_SIZE);
        e.u64(DATA_OFFSET);
        e.u32(self.extent_count);
        let crc = crc32c::crc32c(&e.0);
        e.u32(crc);
        e.0.resize(SECTOR as usize, 0);
        e.0
    }

    /// Decode and check a superblock sector.
    pub fn decode(b: &[u8]) -> Result<Superblock, SuperblockError> {
        if b.len() < 64 {
            return Err(SuperblockError::Corrupt("short sector"));
        }
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&b[..8]);
        if magic != SUPER_MAGIC {
            if b.iter().all(|&x| x == 0) {
                return Err(SuperblockError::NotFormatted);
            }
            return Err(SuperblockError::Foreign(magic));
        }
        let mut d = Dec::new(&b[8..]);
        let bad = |_: Truncated| SuperblockError::Corrupt("short sector");
        let version = d.u32().map_err(bad)?;
        if version != FORMAT_VERSION {
            return Err(SuperblockError::UnsupportedVersion { found: version });
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(d.take(16).map_err(bad)?);
        let lun_size = d.u64().map_err(bad)?;
        let extent_size = d.u64().map_err(bad)?;
        let data_offset = d.u64().map_err(bad)?;
        let extent_count = d.u32().map_err(bad)?;
        let body_len = 8 + 4 + 16 + 8 + 8 + 8 + 4;
        let crc = d.u32().map_err(bad)?;
        if crc32c::crc32c(&b[..body_len]) != crc {
            return Err(SuperblockError::Corrupt("checksum mismatch"));
        }
        if extent_size != EXTENT_SIZE || data_offset != DATA_OFFSET {
            return Err(SuperblockError::Corrupt("unexpected geometry"));
        }
        let sb = Superblock {
            version,
            uuid,
            lun_size,
            extent_count,
        };
        if Superblock::for_size(lun_size, uuid) != Some(sb) {
            return Err(SuperblockError::Corrupt(
                "extent count does not match the LUN size",
            ));
        }
        Ok(sb)
    }

    /// Byte offset of physical extent `e`.
    pub fn extent_offset(&self, e: u32) -> u64 {
        DATA_OFFSET + u64::from(e) * EXTENT_SIZE
    }
}

/// The persisted part of a file's write lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LeaseRecord {
    /// Fencing epoch: bumped on every grant; writes must carry the current one.
    pub epoch: u64,
    /// The node holding the write lease, if any.
    pub holder: Option<NodeId>,
    /// A hand-over in progress: the previous holder, who gets the lease back if it is aborted.
    pub handover_from: Option<NodeId>,
}

/// One virtual-disk file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    /// Size in bytes.
    pub size: u64,
    /// All extents allocated (and zeroed) at creation and on growth.
    pub preallocated: bool,
    /// Logical extent i lives at physical extent `map[i]` (or is a hole).
    pub map: Vec<u32>,
    /// Write lease.
    pub lease: LeaseRecord,
}

/// The whole metadata state.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Metadata {
    /// Commit sequence number (strictly increasing).
    pub seq: u64,
    /// Generation of the coordinator that wrote it (its etcd election revision).
    pub generation: u64,
    /// Files by name.
    pub files: BTreeMap<String, FileEntry>,
}

/// Why a metadata payload is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetadataError {
    /// The bytes do not parse.
    #[error("Metadata is truncated or malformed")]
    Malformed,
    /// The bytes parse but break an invariant.
    #[error("Metadata is inconsistent: {0}")]
    Inconsistent(String),
    /// The encoding does not fit a slot.
    #[error("Metadata does not fit its slot ({0} bytes, at most {MAX_PAYLOAD})")]
    TooLarge(usize),
}

impl From<Truncated> for MetadataError {
    fn from(_: Truncated) -> Self {
        MetadataError::Malformed
    }
}

/// Whether `name` is acceptable as a file name (and NBD export name).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Number of extents a file of `size` bytes spans.
pub fn extents_for(size: u64) -> u64 {
    size.div_ceil(EXTENT_SIZE)
}

fn node_opt(v: u32) -> Option<NodeId> {
    (v != 0).then_some(v)
}

impl Metadata {
    /// Encode the payload (runs of the maps keep it small).
    pub fn encode_payload(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.u32(self.files.len() as u32);
        for (name, f) in &self.files {
            e.bytes16(name.as_bytes());
            e.u64(f.size);
            e.u8(u8::from(f.preallocated));
            e.u64(f.lease.epoch);
            e.u32(f.lease.holder.unwrap_or(0));
            e.u32(f.lease.handover_from.unwrap_or(0));
            let runs = runs_of(&f.map);
            e.u32(runs.len() as u32);
            for (start, len) in runs {
                e.u32(start);
                e.u32(len);
            }
        }
        e.0
    }

    /// Decode and validate a payload against the volume geometry.
    pub fn decode_payload(
        b: &[u8],
        seq: u64,
        generation: u64,
        extent_count: u32,
    ) -> Result<Metadata, MetadataError> {
        let mut d = Dec::new(b);
        let n = d.u32()?;
        let mut files = BTreeMap::new();
        let mut used = vec![false; extent_count as usize];
        let mut mapped = 0u64;
        for _ in 0..n {
            let name = std::str::from_utf8(d.bytes16()?)
                .map_err(|_| MetadataError::Malformed)?
                .to_owned();
            if !valid_name(&name) {
                return Err(MetadataError::Inconsistent(format!(
                    "invalid file name {name:?}"
                )));
            }
            let size = d.u64()?;
            let preallocated = match d.u8()? {
                0 => false,
                1 => true,
                _ => return Err(MetadataError::Malformed),
            };
            let lease = LeaseRecord {
                epoch: d.u64()?,
                holder: node_opt(d.u32()?),
                handover_from: node_opt(d.u32()?),
            };
            let want = extents_for(size);
            if size > max_file_size(extent_count) {
                return Err(MetadataError::Inconsistent(format!(
                    "{name}: {size} bytes, larger than the {}-byte maximum",
                    max_file_size(extent_count)
                )));
            }
            if want > u64::from(extent_count) && preallocated {
                return Err(MetadataError::Inconsistent(format!(
                    "{name}: larger than the volume"
                )));
            }
            mapped += want;
            if mapped > max_mapped_extents(extent_count) {
                return Err(MetadataError::Inconsistent(format!(
                    "the files map more than {} extents in total (at {name})",
                    max_mapped_extents(extent_count)
                )));
            }
            let nruns = d.u32()? as usize;
            // Each run takes 8 bytes: refuse counts the remaining bytes cannot hold before allocating.
            if nruns > d.remaining() / 8 {
                return Err(MetadataError::Malformed);
            }
            let mut map: Vec<u32> = Vec::new();
            for _ in 0..nruns {
                let start = d.u32()?;
                let len = d.u32()?;
                if len == 0 || map.len() as u64 + u64::from(len) > want {
                    return Err(MetadataError::Inconsistent(format!(
                        "{name}: map longer than the file"
                    )));
                }
                if start == HOLE {
                    map.extend(std::iter::repeat_n(HOLE, len as usize));
                } else {
                    let end = u64::from(start) + u64::from(len);
                    if end > u64::from(extent_count) {
                        return Err(MetadataError::Inconsistent(format!(
                            "{name}: extent beyond the volume"
                        )));
                    }
                    for p in start..start + len {
                        if std::mem::replace(&mut used[p as usize], true) {
                            return Err(MetadataError::Inconsistent(format!(
                                "extent {p} used twice"
                            )));
                        }
                        map.push(p);
                    }
                }
            }
            if map.len() as u64 != want {
                return Err(MetadataError::Inconsistent(format!(
                    "{name}: map shorter than the file"
                )));
            }
            if preallocated && map.contains(&HOLE) {
                return Err(MetadataError::Inconsistent(format!(
                    "{name}: hole in a preallocated file"
                )));
            }
            if files
                .insert(
                    name.clone(),
                    FileEntry {
                        size,
                        preallocated,
                        map,
                        lease,
                    },
                )
                .is_some()
            {
                return Err(MetadataError::Inconsistent(format!(
                    "duplicate file {name}"
                )));
            }
        }
        if d.remaining() != 0 {
            return Err(MetadataError::Malformed);
        }
        Ok(Metadata {
            seq,
            generation,
            files,
        })
    }

    /// Physical extents in use.
    pub fn used_extents(&self, extent_count: u32) -> Vec<bool> {
        let mut used = vec![false; extent_count as usize];
        for f in self.files.values() {
            for &p in &f.map {
                if let Some(u) = used.get_mut(p as usize) {
                    *u = true;
                }
            }
        }
        used
    }

    /// Number of free extents.
    pub fn free_extents(&self, extent_count: u32) -> u64 {
        self.used_extents(extent_count)
            .iter()
            .filter(|&&u| !u)
            .count() as u64
    }
}

/// Run-length encode a map: consecutive physical extents, or consecutive holes.
fn runs_of(map: &[u32]) -> Vec<(u32, u32)> {
    let mut runs: Vec<(u32, u32)> = Vec::new();
    for &p in map {
        if let Some((start, len)) = runs.last_mut() {
            let contiguous = if *start == HOLE {
                p == HOLE
            } else {
                p != HOLE && p == *start + *len
            };
            if contiguous {
                *len += 1;
                continue;
            }
        }
        runs.push((p, 1));
    }
    runs
}

/// A metadata slot header, as read from disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotHeader {
    /// Commit sequence.
    pub seq: u64,
    /// Coordinator generation.
    pub generation: u64,
    /// Payload bytes.
    pub payload_len: u32,
    /// CRC-32C of the payload.
    pub payload_crc: u32,
}

impl SlotHeader {
    /// Encode into one sector.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.0.extend_from_slice(&META_MAGIC);
        e.u64(self.seq);
        e.u64(self.generation);
        e.u32(self.payload_len);
        e.u32(self.payload_crc);
        let crc = crc32c::crc32c(&e.0);
        e.u32(crc);
        e.0.resize(SECTOR as usize, 0);
        e.0
    }

    /// Decode; `None` if the sector is not a valid header.
    pub fn decode(b: &[u8]) -> Option<SlotHeader> {
        if b.len() < 36 || b[..8] != META_MAGIC {
            return None;
        }
        let mut d = Dec::new(&b[8..]);
        let h = SlotHeader {
            seq: d.u64().ok()?,
            generation: d.u64().ok()?,
            payload_len: d.u32().ok()?,
            payload_crc: d.u32().ok()?,
        };
        let crc = d.u32().ok()?;
        (crc32c::crc32c(&b[..32]) == crc && u64::from(h.payload_len) <= MAX_PAYLOAD).then_some(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EXTENTS: u32 = 64;

    fn arb_metadata() -> impl Strategy<Value = Metadata> {
        // Draw files, then assign physical extents from a shuffled pool so they never overlap.
        let file = (
            "[a-z][a-z0-9._-]{0,20}",
            0u64..8 * EXTENT_SIZE,
            any::<bool>(),
            any::<u64>(),
            0u32..5,
            0u32..5,
            proptest::collection::vec(any::<bool>(), 8),
        );
        (
            proptest::collection::vec(file, 0..6),
            any::<u64>(),
            any::<u64>(),
            Just(()).prop_perturb(|_, mut rng| {
                let mut pool: Vec<u32> = (0..EXTENTS).collect();
                for i in (1..pool.len()).rev() {
                    let j = (rng.next_u32() as usize) % (i + 1);
                    pool.swap(i, j);
                }
                pool
            }),
        )
            .prop_map(|(files, seq, generation, mut pool)| {
                let mut m = Metadata {
                    seq,
                    generation,
                    files: BTreeMap::new(),
                };
                for (name, size, prealloc, epoch, holder, to, holes) in files {
                    let n = extents_for(size) as usize;
                    let map = (0..n)
                        .map(|i| {
                            if !prealloc && holes[i % holes.len()] {
                                HOLE
                            } else {
                                pool.pop().unwrap_or(HOLE)
                            }
                        })
                        .collect::<Vec<_>>();
                    let preallocated = prealloc && !map.contains(&HOLE);
                    let lease = LeaseRecord {
                        epoch,
                        holder: node_opt(holder),
                        handover_from: node_opt(to),
                    };
                    m.files.insert(
                        name,
                        FileEntry {
                            size,
                            preallocated,
                            map,
                            lease,
                        },
                    );
                }
                m
            })
    }

    proptest! {
        #[test]
        fn metadata_payload_round_trips(m in arb_metadata()) {
            let b = m.encode_payload();
            prop_assert_eq!(Metadata::decode_payload(&b, m.seq, m.generation, EXTENTS), Ok(m));
        }

        #[test]
        fn payload_decoder_never_panics(b in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Metadata::decode_payload(&b, 0, 0, EXTENTS);
        }

        #[test]
        fn corrupted_payload_is_rejected_or_decodes_consistently(m in arb_metadata(), at: usize, bit in 0u8..8) {
            let mut b = m.encode_payload();
            if !b.is_empty() {
                let i = at % b.len();
                b[i] ^= 1 << bit;
                if let Ok(d) = Metadata::decode_payload(&b, 0, 0, EXTENTS) {
                    // Whatever decodes still obeys the invariants: no shared extents.
                    let mut seen = std::collections::HashSet::new();
                    for f in d.files.values() {
                        prop_assert_eq!(f.map.len() as u64, extents_for(f.size));
                        for &p in f.map.iter().filter(|&&p| p != HOLE) {
                            prop_assert!(seen.insert(p));
                        }
                    }
                }
            }
        }

        #[test]
        fn slot_header_round_trips(seq: u64, generation: u64, payload_len in 0u32..(MAX_PAYLOAD as u32), payload_crc: u32) {
            let h = SlotHeader { seq, generation, payload_len, payload_crc };
            prop_assert_eq!(SlotHeader::decode(&h.encode()), Some(h));
        }

        #[test]
        fn any_bit_flip_in_a_slot_header_is_detected(seq: u64, at in 0usize..36, bit in 0u8..8) {
            let mut b = SlotHeader { seq, generation: 3, payload_len: 10, payload_crc: 7 }.encode();
            b[at] ^= 1 << bit;
            prop_assert_eq!(SlotHeader::decode(&b), None);
        }

        #[test]
        fn superblock_round_trips(size in MIN_LUN_SIZE..(1u64 << 44), uuid: [u8; 16]) {
            let sb = Superblock::for_size(size, uuid).unwrap();
            prop_assert_eq!(Superblock::decode(&sb.encode()), Ok(sb));
        }
    }

    #[test]
    fn superblock_errors_are_specific() {
        assert_eq!(
            Superblock::decode(&[0u8; 4096]),
            Err(SuperblockError::NotFormatted)
        );
        let mut qcow = vec![0u8; 4096];
        qcow[..4].copy_from_slice(b"QFI\xfb");
        assert!(matches!(
            Superblock::decode(&qcow),
            Err(SuperblockError::Foreign(_))
        ));
        let mut sb = Superblock::for_size(64 << 20, [1; 16]).unwrap().encode();
        sb[8] = 9;
        assert_eq!(
            Superblock::decode(&sb),
            Err(SuperblockError::UnsupportedVersion { found: 9 })
        );
        let mut sb = Superblock::for_size(64 << 20, [1; 16]).unwrap().encode();
        sb[30] ^= 1;
        assert_eq!(
            Superblock::decode(&sb),
            Err(SuperblockError::Corrupt("checksum mismatch"))
        );
        assert_eq!(Superblock::for_size(MIN_LUN_SIZE - 1, [0; 16]), None);
    }

    /// A payload that claims a file or a map far larger than the volume allows is refused before
    /// anything of that size is allocated.
    #[test]
    fn claimed_sizes_and_map_lengths_are_bounded_before_allocation() {
        let payload = |size: u64, runs: &[(u32, u32)], nruns: u32| {
            let mut e = Enc::default();
            e.u32(1);
            e.bytes16(b"a");
            e.u64(size);
            e.u8(0);
            e.u64(1);
            e.u32(0);
            e.u32(0);
            e.u32(nruns);
            for &(start, len) in runs {
                e.u32(start);
                e.u32(len);
            }
            e.0
        };
        let e = Metadata::decode_payload(&payload(u64::MAX, &[], 0), 1, 1, EXTENTS).unwrap_err();
        assert!(e.to_string().contains("larger than the"), "{e}");
        // A hole run of 2^32 - 2 extents in a one-extent file: refused, not expanded.
        let e =
            Metadata::decode_payload(&payload(EXTENT_SIZE, &[(HOLE, HOLE - 1)], 1), 1, 1, EXTENTS)
                .unwrap_err();
        assert!(e.to_string().contains("map longer than the file"), "{e}");
        // A run count the bytes cannot hold.
        assert!(matches!(
            Metadata::decode_payload(&payload(EXTENT_SIZE, &[], u32::MAX), 1, 1, EXTENTS),
            Err(MetadataError::Malformed)
        ));
    }

    /// Thin 1 TiB files, each one hole run (41 bytes of payload for 4 MiB of map): past the
    /// volume-wide bound the payload is refused at the file that crosses it, before its map is
    /// built, so a slot full of them cannot exhaust a node's memory.
    #[test]
    fn thin_files_map_at_most_the_volume_wide_bound_together() {
        let tib = MAX_FILE_SIZE;
        let per_file = extents_for(tib);
        let files = (MAX_MAPPED_EXTENTS / per_file) as u32 + 1;
        let mut e = Enc::default();
        e.u32(files);
        for i in 0..files {
            e.bytes16(format!("thin{i}").as_bytes());
            e.u64(tib);
            e.u8(0);
            e.u64(1);
            e.u32(0);
            e.u32(0);
            e.u32(1);
            e.u32(HOLE);
            e.u32(per_file as u32);
        }
        let e = Metadata::decode_payload(&e.0, 1, 1, EXTENTS).unwrap_err();
        assert!(
            e.to_string().contains(&format!(
                "more than {MAX_MAPPED_EXTENTS} extents in total (at thin{})",
                files - 1
            )),
            "{e}"
        );
        // a large volume allows four times its extents
        assert_eq!(max_mapped_extents(1 << 23), 4 << 23);
        assert_eq!(max_mapped_extents(EXTENTS), MAX_MAPPED_EXTENTS);
    }

    #[test]
    fn names_are_restricted_to_safe_characters() {
        assert!(valid_name("vm-01.raw"));
        for bad in ["", ".hidden", "-x", "a/b", "a b", &"x".repeat(129)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }
}
