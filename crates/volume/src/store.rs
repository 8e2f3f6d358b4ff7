//! The metadata store on a LUN: format, open (recovery picks the newest valid slot), copy-on-write
//! commit fenced by coordinator generation, and file data I/O through extent maps.

use std::io;

use crate::format::*;
use crate::lun::Lun;

/// Options of `format`.
#[derive(Debug, Clone, Copy)]
pub struct FormatOptions {
    /// Overwrite whatever the LUN holds (a Tern volume or anything else).
    pub force: bool,
    /// Identity of the new volume.
    pub uuid: [u8; 16],
}

/// Why formatting failed (nothing was written unless the error says so).
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// LUN below the minimum.
    #[error("The LUN is too small: {size} bytes, a volume needs at least {MIN_LUN_SIZE}")]
    TooSmall {
        /// LUN size.
        size: u64,
    },
    /// The LUN already holds a volume or other data.
    #[error("The LUN already holds {0}; pass --force to overwrite it")]
    NotEmpty(&'static str),
    /// I/O failed.
    #[error("Writing the LUN failed")]
    Io(#[from] io::Error),
}

/// Why a volume could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Superblock problem.
    #[error(transparent)]
    Superblock(#[from] SuperblockError),
    /// LUN shorter than the superblock says.
    #[error("The LUN is {actual} bytes but the volume was formatted for {expected}")]
    Truncated {
        /// Current size.
        actual: u64,
        /// Formatted size.
        expected: u64,
    },
    /// No metadata slot is valid.
    #[error("No valid metadata slot on the LUN: {0}")]
    NoMetadata(String),
    /// I/O failed.
    #[error("Opening or reading the LUN failed")]
    Io(#[from] io::Error),
}

/// Why a commit failed. After any error the on-disk state is the old one or the new one.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// A coordinator with a higher generation has written: we are deposed.
    #[error("Fenced: metadata was written by coordinator generation {on_disk}, ours is {ours}")]
    Fenced {
        /// Generation found on disk.
        on_disk: u64,
        /// Ours.
        ours: u64,
    },
    /// Does not fit.
    #[error(transparent)]
    TooLarge(#[from] MetadataError),
    /// The coordinator's session ended (its deadline passed) during the commit: nothing more is
    /// written, and the header never is.
    #[error("The coordinator's session ended during the commit; nothing was committed")]
    Expired,
    /// I/O failed.
    #[error("Writing metadata failed")]
    Io(#[from] io::Error),
}

/// An opened volume: superblock plus the newest committed metadata.
#[derive(Debug, Clone)]
pub struct Volume {
    /// Superblock.
    pub sb: Superblock,
    /// Newest committed metadata.
    pub meta: Metadata,
    /// Slot the newest metadata lives in.
    active_slot: usize,
}

/// Format `lun`: zero both metadata slots' headers, write an empty metadata state, then the
/// superblock last (a crash before that leaves an unformatted LUN).
pub fn format(lun: &dyn Lun, opts: FormatOptions) -> Result<Superblock, FormatError> {
    let size = lun.len();
    let sb = Superblock::for_size(size, opts.uuid).ok_or(FormatError::TooSmall { size })?;
    if !opts.force {
        let mut cur = vec![0u8; SECTOR as usize];
        lun.read_at(&mut cur, SUPERBLOCK_OFFSET)?;
        match Superblock::decode(&cur) {
            Err(SuperblockError::NotFormatted) => {}
            Ok(_)
            | Err(SuperblockError::UnsupportedVersion { .. })
            | Err(SuperblockError::Corrupt(_)) => {
                return Err(FormatError::NotEmpty("a Tern volume"));
            }
            Err(SuperblockError::Foreign(_)) => return Err(FormatError::NotEmpty("foreign data")),
        }
    }
    lun.write_at(&vec![0u8; SECTOR as usize], SUPERBLOCK_OFFSET)?;
    lun.flush()?;
    for off in META_SLOT_OFFSETS {
        lun.write_at(&vec![0u8; SECTOR as usize], off)?;
    }
    let empty = Metadata::default();
    write_slot(lun, 0, &empty)?;
    lun.write_at(&sb.encode(), SUPERBLOCK_OFFSET)?;
    lun.flush()?;
    Ok(sb)
}

fn write_slot(lun: &dyn Lun, slot: usize, m: &Metadata) -> Result<(), io::Error> {
    match write_slot_fenced(lun, slot, m, &|| true) {
        Ok(()) => Ok(()),
        Err(CommitError::Io(e)) => Err(e),
        Err(e) => Err(io::Error::other(e.to_string())),
    }
}

/// Writes slot `slot`: the payload sector by sector, flush, then the header, flush. Fencing:
/// `still_ours` (the coordinator's deadline) is asked before every payload sector, and right
/// before the header both it and the generations of the slot headers on the LUN are checked
/// again (`m.generation` must still be the newest), so a coordinator frozen anywhere in the
/// commit and deposed meanwhile never makes its payload valid.
fn write_slot_fenced(
    lun: &dyn Lun,
    slot: usize,
    m: &Metadata,
    still_ours: &dyn Fn() -> bool,
) -> Result<(), CommitError> {
    let payload = m.encode_payload();
    let base = META_SLOT_OFFSETS[slot];
    // Payload first, sector by sector (the unit a crash may tear), then the header that makes it valid.
    for (i, chunk) in payload.chunks(SECTOR as usize).enumerate() {
        if !still_ours() {
            return Err(CommitError::Expired);
        }
        lun.write_at(chunk, base + SECTOR * (1 + i as u64))?;
    }
    lun.flush()?;
    crate::lun::stop_point("commit-header");
    if !still_ours() {
        return Err(CommitError::Expired);
    }
    let on_disk = newest_generation(lun)?;
    if on_disk > m.generation {
        return Err(CommitError::Fenced {
            on_disk,
            ours: m.generation,
        });
    }
    let h = SlotHeader {
        seq: m.seq,
        generation: m.generation,
        payload_len: payload.len() as u32,
        payload_crc: crc32c::crc32c(&payload),
    };
    lun.write_at(&h.encode(), base)?;
    lun.flush()?;
    Ok(())
}

/// The highest coordinator generation among the valid slot *headers* on the LUN (a header is
/// written last and alone, so a successor's commit shows here as soon as it is made; a payload
/// being rewritten does not hide it). 0 on a LUN with no valid header.
pub fn newest_generation(lun: &dyn Lun) -> io::Result<u64> {
    let mut newest = 0;
    for base in META_SLOT_OFFSETS {
        let mut hb = vec![0u8; SECTOR as usize];
        lun.read_at(&mut hb, base)?;
        if let Some(h) = SlotHeader::decode(&hb) {
            newest = newest.max(h.generation);
        }
    }
    Ok(newest)
}

/// Zeroes physical extents for coordinator `generation` (before a commit maps them into a
/// file), fenced per extent: before each extent's write, `still_ours` (the coordinator's
/// deadline) and the newest generation on the LUN are checked, so a coordinator deposed
/// mid-way (frozen, partitioned) stops at the next extent. It needs no lock: the extents are
/// free in the committed metadata and reserved by the caller.
pub fn zero_extents_fenced(
    lun: &dyn Lun,
    sb: &Superblock,
    extents: &[u32],
    generation: u64,
    still_ours: &dyn Fn() -> bool,
) -> Result<(), CommitError> {
    if extents.is_empty() {
        return Ok(());
    }
    let z = vec![0u8; EXTENT_SIZE as usize];
    for &e in extents {
        if !still_ours() {
            return Err(CommitError::Expired);
        }
        let on_disk = newest_generation(lun)?;
        if on_disk > generation {
            return Err(CommitError::Fenced {
                on_disk,
                ours: generation,
            });
        }
        crate::lun::stop_point("zero-extent");
        lun.write_at(&z, sb.extent_offset(e))?;
    }
    lun.flush()?;
    Ok(())
}

/// Read slot `slot`: `Ok(None)` when the header is absent or invalid or the payload fails its checksum.
fn read_slot(
    lun: &dyn Lun,
    sb: &Superblock,
    slot: usize,
) -> Result<Result<Metadata, String>, io::Error> {
    let base = META_SLOT_OFFSETS[slot];
    let mut hb = vec![0u8; SECTOR as usize];
    lun.read_at(&mut hb, base)?;
    let Some(h) = SlotHeader::decode(&hb) else {
        return Ok(Err(format!("slot {slot}: no valid header")));
    };
    let mut payload = vec![0u8; h.payload_len as usize];
    lun.read_at(&mut payload, base + SECTOR)?;
    if crc32c::crc32c(&payload) != h.payload_crc {
        return Ok(Err(format!("slot {slot}: payload checksum mismatch")));
    }
    Ok(
        Metadata::decode_payload(&payload, h.seq, h.generation, sb.extent_count)
            .map_err(|e| format!("slot {slot}: {e}")),
    )
}

/// Read the superblock of a LUN.
pub fn read_superblock(lun: &dyn Lun) -> Result<Superblock, OpenError> {
    if lun.len() < SECTOR {
        return Err(SuperblockError::NotFormatted.into());
    }
    let mut b = vec![0u8; SECTOR as usize];
    lun.read_at(&mut b, SUPERBLOCK_OFFSET)?;
    let sb = Superblock::decode(&b)?;
    if lun.len() < sb.lun_size {
        return Err(OpenError::Truncated {
            actual: lun.len(),
            expected: sb.lun_size,
        });
    }
    Ok(sb)
}

impl Volume {
    /// Open a formatted LUN and recover the newest valid metadata.
    pub fn open(lun: &dyn Lun) -> Result<Volume, OpenError> {
        let sb = read_superblock(lun)?;
        let mut best: Option<(usize, Metadata)> = None;
        let mut why = Vec::new();
        for slot in 0..2 {
            match read_slot(lun, &sb, slot)? {
                Ok(m) => {
                    // The newest coordinator's state wins, then the newest commit: a slot a
                    // deposed coordinator made valid late (an older generation under a higher
                    // sequence) never outranks its successor's.
                    if best
                        .as_ref()
                        .is_none_or(|(_, b)| (m.generation, m.seq) > (b.generation, b.seq))
                    {
                        best = Some((slot, m));
                    }
                }
                Err(e) => why.push(e),
            }
        }
        let (active_slot, meta) = best.ok_or_else(|| OpenError::NoMetadata(why.join("; ")))?;
        Ok(Volume {
            sb,
            meta,
            active_slot,
        })
    }

    /// Re-read the newest metadata (a node refreshing its cache).
    pub fn reload(&mut self, lun: &dyn Lun) -> Result<(), OpenError> {
        *self = Volume::open(lun)?;
        Ok(())
    }

    /// Commit `next` (whose `seq` must exceed the current one) as coordinator `generation`.
    ///
    /// Before writing, the newest generation on disk is checked: a coordinator that has been
    /// replaced by one with a higher generation is refused (`Fenced`) and writes nothing.
    pub fn commit(
        &mut self,
        lun: &dyn Lun,
        next: Metadata,
        generation: u64,
    ) -> Result<(), CommitError> {
        self.commit_fenced(lun, next, generation, &|| true)
    }

    /// [`Volume::commit`] for a coordinator whose right to write ends: `still_ours` (its
    /// session deadline) is asked before every payload sector and, with the generations on the
    /// LUN, right before the header write ([`CommitError::Expired`], [`CommitError::Fenced`]).
    pub fn commit_fenced(
        &mut self,
        lun: &dyn Lun,
        mut next: Metadata,
        generation: u64,
        still_ours: &dyn Fn() -> bool,
    ) -> Result<(), CommitError> {
        let on_disk = Volume::open(lun).map_err(|e| match e {
            OpenError::Io(io) => CommitError::Io(io),
            other => CommitError::Io(io::Error::other(other.to_string())),
        })?;
        if on_disk.meta.generation > generation {
            return Err(CommitError::Fenced {
                on_disk: on_disk.meta.generation,
                ours: generation,
            });
        }
        next.seq = next.seq.max(on_disk.meta.seq + 1);
        next.generation = generation;
        let len = next.encode_payload().len();
        if len as u64 > MAX_PAYLOAD {
            return Err(MetadataError::TooLarge(len).into());
        }
        let slot = 1 - on_disk.active_slot;
        write_slot_fenced(lun, slot, &next, still_ours)?;
        self.meta = next;
        self.active_slot = slot;
        Ok(())
    }

    /// Zero physical extents (before a commit maps them into a file).
    pub fn zero_extents(&self, lun: &dyn Lun, extents: &[u32]) -> io::Result<()> {
        if extents.is_empty() {
            return Ok(());
        }
        let z = vec![0u8; EXTENT_SIZE as usize];
        for &e in extents {
            lun.write_at(&z, self.sb.extent_offset(e))?;
        }
        lun.flush()
    }
}

/// One contiguous piece of a file range on the LUN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    /// Bytes at this LUN offset.
    Mapped {
        /// LUN offset.
        lun_offset: u64,
        /// Length.
        len: usize,
    },
    /// An unallocated extent of a thin file (reads as zeroes; writes need an allocation first).
    Hole {
        /// Logical extent index.
        logical: u64,
        /// Length.
        len: usize,
    },
}

/// Split a file range into LUN segments (pure). The caller has checked the range against the size.
pub fn segments(sb: &Superblock, map: &[u32], offset: u64, len: usize) -> Vec<Segment> {
    let mut out = Vec::new();
    let mut pos = offset;
    let end = offset + len as u64;
    while pos < end {
        let logical = pos / EXTENT_SIZE;
        let within = pos % EXTENT_SIZE;
        let n = (EXTENT_SIZE - within).min(end - pos) as usize;
        match map.get(logical as usize).copied() {
            Some(p) if p != HOLE => out.push(Segment::Mapped {
                lun_offset: sb.extent_offset(p) + within,
                len: n,
            }),
            _ => out.push(Segment::Hole { logical, len: n }),
        }
        pos += n as u64;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{EXTENT_SIZE, FileEntry, MIN_LUN_SIZE};
    use crate::lun::FileLun;
    use std::cell::Cell;

    fn formatted() -> (tempfile::TempDir, FileLun) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lun");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(MIN_LUN_SIZE + 8 * EXTENT_SIZE)
            .unwrap();
        let lun = FileLun::open(&path).unwrap();
        format(
            &lun,
            FormatOptions {
                force: false,
                uuid: [1; 16],
            },
        )
        .unwrap();
        (dir, lun)
    }

    fn with_file(m: &Metadata, name: &str) -> Metadata {
        let mut next = m.clone();
        next.seq += 1;
        next.files.insert(
            name.into(),
            FileEntry {
                size: 4096,
                preallocated: false,
                map: vec![HOLE],
                lease: Default::default(),
            },
        );
        next
    }

    #[test]
    fn a_successor_committing_before_our_header_fences_it() {
        let (_d, lun) = formatted();
        let mut old = Volume::open(&lun).unwrap();
        old.commit(&lun, with_file(&old.meta, "a"), 5).unwrap();
        let next = with_file(&old.meta, "late");
        let sectors = next.encode_payload().len().div_ceil(SECTOR as usize);
        // The successor opens the LUN now and commits right before our header (our payload
        // is written by then; its commit goes to the same slot, since our header is not).
        let calls = Cell::new(0);
        let still_ours = || {
            calls.set(calls.get() + 1);
            if calls.get() == sectors + 1 {
                let mut succ = Volume::open(&lun).unwrap();
                succ.commit(&lun, with_file(&succ.meta, "b"), 6).unwrap();
            }
            true
        };
        let e = old.commit_fenced(&lun, next, 5, &still_ours).unwrap_err();
        assert!(
            matches!(
                e,
                CommitError::Fenced {
                    on_disk: 6,
                    ours: 5
                }
            ),
            "{e:?}"
        );
        let now = Volume::open(&lun).unwrap();
        assert_eq!(now.meta.generation, 6);
        assert!(now.meta.files.contains_key("b") && !now.meta.files.contains_key("late"));
    }

    #[test]
    fn readers_never_prefer_an_older_generation() {
        // Slot 0: the successor's state (generation 6); slot 1: a deposed coordinator's
        // commit (generation 5) made valid late, under a higher sequence.
        let (_d, lun) = formatted();
        let base = Volume::open(&lun).unwrap().meta;
        let mut succ = with_file(&base, "b");
        succ.seq = 3;
        succ.generation = 6;
        let mut late = with_file(&base, "late");
        late.seq = 4;
        late.generation = 5;
        write_slot(&lun, 1, &late).unwrap();
        write_slot(&lun, 0, &succ).unwrap();
        let v = Volume::open(&lun).unwrap();
        assert_eq!((v.meta.generation, v.meta.seq), (6, 3));
        assert!(v.meta.files.contains_key("b") && !v.meta.files.contains_key("late"));
        // The next commit goes to the other slot, over the stale one.
        let mut v = v;
        v.commit(&lun, with_file(&v.meta, "c"), 6).unwrap();
        let now = Volume::open(&lun).unwrap();
        assert_eq!((now.meta.generation, now.meta.seq), (6, 4));
        assert!(now.meta.files.contains_key("b") && now.meta.files.contains_key("c"));
        // The deposed generation is refused.
        let e = now
            .clone()
            .commit(&lun, with_file(&now.meta, "x"), 5)
            .unwrap_err();
        assert!(
            matches!(
                e,
                CommitError::Fenced {
                    on_disk: 6,
                    ours: 5
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn a_session_ending_mid_commit_writes_no_header() {
        let (_d, lun) = formatted();
        let mut v = Volume::open(&lun).unwrap();
        let before = v.meta.clone();
        for stop_at in [1, 2] {
            let calls = Cell::new(0);
            let still_ours = || {
                calls.set(calls.get() + 1);
                calls.get() < stop_at
            };
            let e = v
                .commit_fenced(&lun, with_file(&before, "x"), 3, &still_ours)
                .unwrap_err();
            assert!(matches!(e, CommitError::Expired), "{e:?}");
            assert_eq!(Volume::open(&lun).unwrap().meta, before);
        }
    }

    #[test]
    fn zeroing_is_fenced_per_extent() {
        let (_d, lun) = formatted();
        let sb = read_superblock(&lun).unwrap();
        let junk = vec![0xee; EXTENT_SIZE as usize];
        for e in 0..3 {
            lun.write_at(&junk, sb.extent_offset(e)).unwrap();
        }
        let first_byte = |e: u32| {
            let mut b = [0u8; 512];
            lun.read_at(&mut b, sb.extent_offset(e)).unwrap();
            b[0]
        };
        // The session ends after the first extent: the second and third keep their data.
        let calls = Cell::new(0);
        let still_ours = || {
            calls.set(calls.get() + 1);
            calls.get() < 2
        };
        let e = zero_extents_fenced(&lun, &sb, &[0, 1, 2], 1, &still_ours).unwrap_err();
        assert!(matches!(e, CommitError::Expired), "{e:?}");
        assert_eq!(
            (first_byte(0), first_byte(1), first_byte(2)),
            (0, 0xee, 0xee)
        );
        // A higher generation on the LUN: nothing is zeroed.
        let mut v = Volume::open(&lun).unwrap();
        v.commit(&lun, with_file(&v.meta, "g"), 9).unwrap();
        let e = zero_extents_fenced(&lun, &sb, &[1, 2], 8, &|| true).unwrap_err();
        assert!(
            matches!(
                e,
                CommitError::Fenced {
                    on_disk: 9,
                    ours: 8
                }
            ),
            "{e:?}"
        );
        assert_eq!((first_byte(1), first_byte(2)), (0xee, 0xee));
        zero_extents_fenced(&lun, &sb, &[1, 2], 9, &|| true).unwrap();
        assert_eq!((first_byte(1), first_byte(2)), (0, 0));
    }
}
