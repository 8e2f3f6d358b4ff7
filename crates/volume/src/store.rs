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
    let payload = m.encode_payload();
    let base = META_SLOT_OFFSETS[slot];
    // Payload first, sector by sector (the unit a crash may tear), then the header that makes it valid.
    for (i, chunk) in payload.chunks(SECTOR as usize).enumerate() {
        lun.write_at(chunk, base + SECTOR * (1 + i as u64))?;
    }
    lun.flush()?;
    let h = SlotHeader {
        seq: m.seq,
        generation: m.generation,
        payload_len: payload.len() as u32,
        payload_crc: crc32c::crc32c(&payload),
    };
    lun.write_at(&h.encode(), base)?;
    lun.flush()
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
                    if best.as_ref().is_none_or(|(_, b)| m.seq > b.seq) {
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
        mut next: Metadata,
        generation: u64,
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
        write_slot(lun, slot, &next)?;
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
