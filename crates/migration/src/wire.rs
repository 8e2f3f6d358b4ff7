//! The wire format: length-prefixed, crc32c-checksummed, versioned frames, and a decoder that
//! checks every length and every guest address before it trusts it.
//!
//! A frame is a 16-byte header followed by `len` payload bytes (all integers little-endian):
//!
//! ```text
//!  0      4        5      6        8        12       16
//!  +------+--------+------+--------+--------+--------+----------------+
//!  | TRNM | format | kind | flags  |  len   | crc32c |  payload ...   |
//!  +------+--------+------+--------+--------+--------+----------------+
//!   magic    u8=1    u8     u16=0    u32      u32      len bytes
//! ```
//!
//! `crc32c` covers header bytes 0..12 and the payload, except in a `PageData` frame (protocol 5),
//! where it covers the payload's round, count and entries but not the page data that follows
//! them: that data is sent straight from a running guest's memory and received straight into the
//! target's, so each data page's entry carries the page's own crc32c, taken by the source when it
//! checked the page and compared by the target once the page is in its memory (a mismatch marks
//! the page suspect until a later copy arrives; docs/migration.md). `len` is checked against the largest payload the frame's kind can have
//! before anything is read or allocated; a page frame's addresses are checked against the agreed
//! [`MemoryLayout`].

#![deny(clippy::disallowed_methods)]
use std::io::{self, Read};

use crate::config::{
    CpuidDigest, LayoutError, MAX_DEVICE_NAME, MAX_DEVICES, MAX_REGIONS, MemoryLayout, PAGE_SIZE,
    Region, VmConfigDescription,
};

/// First four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"TRNM";
/// Version of the frame header layout (byte 4). Bumped only if the header itself changes.
pub const FRAME_FORMAT: u8 = 1;
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 16;
/// The protocol version this build speaks (negotiated in the handshake). Version 2 adds the
/// target's timings to the `Running` frame ([`TargetTimings`]); version 3 adds post-copy
/// (`PostCopy`, `PageRequest`, `PostCopyDone`, [`POST_COPY_PROTOCOL_VERSION`]); version 4 added
/// a `PageData` frame without page checksums, which this build neither sends nor reads; version
/// 5 defines `PageData` with a crc32c per data page ([`PAGE_DATA_PROTOCOL_VERSION`]) and adds
/// the count of pages sent again after a checksum mismatch to `Running`
/// ([`TargetTimings::pages_resent_after_checksum_mismatch`]); everything else is as in 1.
pub const PROTOCOL_VERSION: u16 = 5;
/// The first protocol version whose `PageData` frames this build speaks (pages sent from and
/// received into guest memory in place, each data page with its own crc32c in the frame's
/// head). A source sends them only on plain TCP at this version or newer; a target refuses a
/// `PageData` frame at an older negotiated version (protocol 4's had no page checksums).
pub const PAGE_DATA_PROTOCOL_VERSION: u16 = 5;
/// The first protocol version with post-copy: a source asked for post-copy offers no older one,
/// so an older target refuses the hello with both version ranges in the reason.
pub const POST_COPY_PROTOCOL_VERSION: u16 = 3;
/// Most runs of owed pages one `PostCopy` frame may list.
pub const MAX_OWED_RUNS: usize = 1 << 20;
/// Most pages one `PageRequest` may ask for.
pub const MAX_REQUEST_PAGES: u32 = 256;
/// The round number post-copy page frames carry (pushed and demanded pages alike).
pub const POST_COPY_ROUND: u32 = u32::MAX;
/// The first protocol version whose `Running` frame carries [`TargetTimings`].
pub const TIMINGS_PROTOCOL_VERSION: u16 = 2;
/// The oldest protocol version this build still accepts.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
/// Most pages in one page frame.
pub const MAX_PAGES_PER_FRAME: usize = 128;
/// Largest VM state blob.
pub const MAX_STATE_BYTES: usize = 16 << 20;
/// Longest reason text in refuse/failed/abort frames.
pub const MAX_REASON_BYTES: usize = 1024;
/// Most data streams one migration may open.
pub const MAX_STREAMS: u16 = 64;
/// Most chunk checksums a verify frame may carry (1 TiB of memory at 1 MiB chunks).
pub const MAX_VERIFY_CHUNKS: usize = 1 << 20;

/// Flag in the low bits of a page entry's address: the page is all zeros, no data follows.
const ZERO_FLAG: u64 = 1;
const PAGE_BYTES: usize = PAGE_SIZE as usize;

/// The kinds of frame. The number is byte 5 of the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Source → target, control stream: protocol versions, session, VM description.
    Hello = 1,
    /// Target → source: handshake accepted at a version.
    Welcome = 2,
    /// Target → source: handshake refused, with a reason.
    Refuse = 3,
    /// Source → target, first frame of each data stream.
    Join = 4,
    /// Source → target, data stream: a batch of pages.
    Pages = 5,
    /// Source → target, data stream: no more pages on this stream.
    DataEnd = 6,
    /// Source → target, control stream: the VM's saved state.
    State = 7,
    /// Source → target, control stream: checksums of all guest memory at the pause.
    Verify = 8,
    /// Source → target, control stream: restore and resume now.
    Commit = 9,
    /// Target → source: the VM runs on the target (from protocol 2 with the target's
    /// [`TargetTimings`]; empty in protocol 1).
    Running = 10,
    /// Target → source: the target could not commit and discarded the VM.
    Failed = 11,
    /// Either way, control stream: the migration is cancelled.
    Abort = 12,
    /// Source → target, data stream: every page of pre-copy round `round` on this stream was sent.
    RoundEnd = 13,
    /// Target → source, control stream: every page of round `round` was applied.
    RoundAck = 14,
    // ── post-copy (protocol 3) ──
    /// Source → target, control stream, before `Commit`: the pages still owed (runs of page
    /// indexes); the target resumes without them and fetches them on demand.
    PostCopy = 15,
    /// Target → source, control stream (the demand stream after the switch): send these pages.
    PageRequest = 16,
    /// Target → source, control stream: every owed page arrived; the source may stop.
    PostCopyDone = 17,
    // ── protocol 5 (protocol 4 had another layout, without page checksums) ──
    /// Source → target, data stream: a batch of pages as `Pages`, but the entries first and
    /// the data of the non-zero ones after them, outside the frame checksum but each data page
    /// under its own crc32c in its entry ([`PageDataFrame`]).
    PageData = 18,
}

impl FrameKind {
    fn from_u8(b: u8) -> Option<Self> {
        use FrameKind::*;
        Some(match b {
            1 => Hello,
            2 => Welcome,
            3 => Refuse,
            4 => Join,
            5 => Pages,
            6 => DataEnd,
            7 => State,
            8 => Verify,
            9 => Commit,
            10 => Running,
            11 => Failed,
            12 => Abort,
            13 => RoundEnd,
            14 => RoundAck,
            15 => PostCopy,
            16 => PageRequest,
            17 => PostCopyDone,
            18 => PageData,
            _ => return None,
        })
    }

    /// The largest payload a frame of this kind can carry.
    pub fn max_payload(self) -> usize {
        use FrameKind::*;
        match self {
            Hello => {
                2 + 2
                    + 8
                    + 2
                    + 4
                    + 2
                    + MAX_REGIONS * 16
                    + 4
                    + 8
                    + 2
                    + MAX_DEVICES * (2 + MAX_DEVICE_NAME)
            }
            Welcome => 2,
            Refuse | Failed | Abort => 2 + MAX_REASON_BYTES,
            Join => 8 + 2,
            Pages => 4 + 2 + MAX_PAGES_PER_FRAME * (8 + PAGE_BYTES),
            PageData => 4 + 2 + MAX_PAGES_PER_FRAME * (PAGE_DATA_ENTRY + PAGE_BYTES),
            DataEnd => 16,
            State => 4 + MAX_STATE_BYTES,
            Verify => 8 + 4 + 4 * MAX_VERIFY_CHUNKS,
            Commit => 0,
            Running => TargetTimings::BYTES_WITH_CHECKS,
            RoundEnd | RoundAck => 4,
            PostCopy => 4 + MAX_OWED_RUNS * 12,
            PageRequest => 12,
            PostCopyDone => 24,
        }
    }
}

/// The handshake offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Oldest protocol version the source can speak.
    pub min_version: u16,
    /// Newest protocol version the source can speak.
    pub max_version: u16,
    /// Random session number; data streams name it in their `Join`.
    pub session: u64,
    /// Number of data streams the source will open (1..=[`MAX_STREAMS`]).
    pub streams: u16,
    /// The VM the source wants to move.
    pub config: VmConfigDescription,
}

/// A batch of pages: each either full data or "this page is now zero".
///
/// A batch built for sending keeps room for the frame header in front of its entries, so
/// [`PageBatch::into_frame_bytes`] needs no copy; a decoded batch keeps the received payload.
#[derive(Debug, Clone)]
pub struct PageBatch {
    round: u32,
    count: u16,
    /// `buf[start..]` holds the entries as on the wire: `u64 addr|flags`, then 4096 bytes
    /// unless the zero flag is set.
    buf: Vec<u8>,
    start: usize,
    /// Pages of a received `PageData` frame whose data did not match the crc32c in their
    /// entry (empty for a `Pages` frame, whose checksum covers every byte).
    mismatched: Vec<u64>,
}

impl PartialEq for PageBatch {
    fn eq(&self, other: &Self) -> bool {
        self.round == other.round
            && self.count == other.count
            && self.entries() == other.entries()
            && self.mismatched == other.mismatched
    }
}

impl Eq for PageBatch {}

/// Bytes of a full page frame, header included.
const MAX_PAGE_FRAME: usize = HEADER_LEN + 6 + MAX_PAGES_PER_FRAME * (8 + PAGE_BYTES);

impl PageBatch {
    /// An empty batch for pre-copy round `round`, with room for a full frame.
    pub fn new(round: u32) -> Self {
        let mut buf = Vec::with_capacity(MAX_PAGE_FRAME);
        buf.resize(HEADER_LEN + 6, 0);
        Self {
            round,
            count: 0,
            buf,
            start: HEADER_LEN + 6,
            mismatched: Vec::new(),
        }
    }

    fn entries(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// The round the pages belong to.
    pub fn round(&self) -> u32 {
        self.round
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        usize::from(self.count)
    }

    /// Whether the batch holds no page.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether no more page fits.
    pub fn is_full(&self) -> bool {
        self.len() >= MAX_PAGES_PER_FRAME
    }

    /// Adds a page with its data. `gpa` must be page-aligned and `data` one page long.
    pub fn push_data(&mut self, gpa: u64, data: &[u8]) {
        assert!(!self.is_full() && gpa.is_multiple_of(PAGE_SIZE) && data.len() == PAGE_BYTES);
        self.buf.extend_from_slice(&gpa.to_le_bytes());
        self.buf.extend_from_slice(data);
        self.count += 1;
    }

    /// Adds a page that is now all zeros.
    pub fn push_zero(&mut self, gpa: u64) {
        assert!(!self.is_full() && gpa.is_multiple_of(PAGE_SIZE));
        self.buf.extend_from_slice(&(gpa | ZERO_FLAG).to_le_bytes());
        self.count += 1;
    }

    /// The runs of consecutive data pages (zero pages leave them out), `(gpa, bytes)`, in
    /// the batch's order: where `iter`'s data will be written.
    pub fn data_runs(&self) -> Vec<(u64, u64)> {
        runs_of(self.iter().filter(|(_, d)| d.is_some()).map(|(gpa, _)| gpa))
    }

    /// Guest addresses of every page, data and zero, in the batch's order.
    pub fn gpas(&self) -> Vec<u64> {
        self.iter().map(|(gpa, _)| gpa).collect()
    }

    /// The pages of a received `PageData` frame whose data did not match their entry's
    /// crc32c (a page the guest rewrote while the source's kernel copied it, or damaged on
    /// the way): written all the same, and suspect until a later copy comes
    /// ([`crate::machine::receiver::Receiver`]). Always empty for a `Pages` frame.
    pub fn mismatched(&self) -> &[u64] {
        &self.mismatched
    }

    /// The buffer the batch was in, for the next frame to be read into
    /// ([`read_frame_into`]).
    pub fn into_buf(self) -> Vec<u8> {
        self.buf
    }

    /// The pages: guest address and data (`None` for a zero page).
    pub fn iter(&self) -> impl Iterator<Item = (u64, Option<&[u8]>)> + '_ {
        let body = self.entries();
        let mut pos = 0usize;
        (0..self.count).map(move |_| {
            let tagged = u64::from_le_bytes(body[pos..pos + 8].try_into().unwrap_or([0; 8]));
            pos += 8;
            if tagged & ZERO_FLAG != 0 {
                (tagged & !ZERO_FLAG, None)
            } else {
                let d = &body[pos..pos + PAGE_BYTES];
                pos += PAGE_BYTES;
                (tagged, Some(d))
            }
        })
    }

    /// Encodes this batch as a whole wire frame, in place when it was built for sending.
    pub fn into_frame_bytes(mut self) -> Vec<u8> {
        if self.start != HEADER_LEN + 6 {
            return self.to_frame_bytes();
        }
        let mut head = Vec::with_capacity(HEADER_LEN + 6);
        begin(&mut head, FrameKind::Pages);
        head.extend_from_slice(&self.round.to_le_bytes());
        head.extend_from_slice(&self.count.to_le_bytes());
        self.buf[..HEADER_LEN + 6].copy_from_slice(&head);
        finish(&mut self.buf);
        self.buf
    }

    /// Encodes this batch as a whole wire frame (a copy).
    pub fn to_frame_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + 6 + self.entries().len());
        begin(&mut out, FrameKind::Pages);
        out.extend_from_slice(&self.round.to_le_bytes());
        out.extend_from_slice(&self.count.to_le_bytes());
        out.extend_from_slice(self.entries());
        finish(&mut out);
        out
    }
}

impl PageBatch {
    /// Encodes this batch as a `PageData` frame (protocol 5): entries (each data page's with
    /// its crc32c) first, then the data of the non-zero pages in entry order, outside the frame
    /// checksum. The source builds these frames from guest memory in place ([`PageDataFrame`]);
    /// this copy is for tests and fuzzing.
    pub fn to_page_data_bytes(&self) -> Vec<u8> {
        let mut f = PageDataFrame::new(self.round);
        for (gpa, data) in self.iter() {
            match data {
                Some(d) => f.push_data(gpa, crc32c::crc32c(d)),
                None => f.push_zero(gpa),
            }
        }
        let (mut out, _) = f.seal();
        for (_, data) in self.iter() {
            if let Some(d) = data {
                out.extend_from_slice(d);
            }
        }
        out
    }
}

/// Bytes of a `PageData` frame before its entries: header, round `u32`, count `u16`.
pub const PAGE_DATA_PREFIX: usize = HEADER_LEN + 6;
/// Bytes of one `PageData` entry: `u64` guest address (low bit: zero page), then `u32` crc32c
/// of the page's 4096 bytes (0 for a zero page).
pub const PAGE_DATA_ENTRY: usize = 12;

/// A `PageData` frame as the source builds it: the head (header, round, count, entries) in one
/// buffer, and the guest addresses of its data pages, whose 4096 bytes each follow the head on
/// the wire in entry order. The data never passes through a buffer: the sender writes it from
/// guest memory with the head in one `writev`; each data page's entry carries the crc32c the
/// source took of it when it checked it for zero.
#[derive(Debug, Clone)]
pub struct PageDataFrame {
    head: Vec<u8>,
    data: Vec<u64>,
    count: u16,
}

impl PageDataFrame {
    /// An empty frame of pre-copy round `round`.
    pub fn new(round: u32) -> Self {
        let mut head = Vec::with_capacity(PAGE_DATA_PREFIX + PAGE_DATA_ENTRY * MAX_PAGES_PER_FRAME);
        begin(&mut head, FrameKind::PageData);
        head.extend_from_slice(&round.to_le_bytes());
        head.extend_from_slice(&0u16.to_le_bytes());
        Self {
            head,
            data: Vec::with_capacity(MAX_PAGES_PER_FRAME),
            count: 0,
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        usize::from(self.count)
    }

    /// Whether the frame has no entry.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether no more entry fits.
    pub fn is_full(&self) -> bool {
        self.len() >= MAX_PAGES_PER_FRAME
    }

    /// Adds a data page: its 4096 bytes at `gpa` (page-aligned) follow the head; `crc` is the
    /// crc32c of those bytes as the source read them.
    pub fn push_data(&mut self, gpa: u64, crc: u32) {
        assert!(!self.is_full() && gpa.is_multiple_of(PAGE_SIZE));
        self.head.extend_from_slice(&gpa.to_le_bytes());
        self.head.extend_from_slice(&crc.to_le_bytes());
        self.data.push(gpa);
        self.count += 1;
    }

    /// Adds a page that is now all zeros (no data follows).
    pub fn push_zero(&mut self, gpa: u64) {
        assert!(!self.is_full() && gpa.is_multiple_of(PAGE_SIZE));
        self.head
            .extend_from_slice(&(gpa | ZERO_FLAG).to_le_bytes());
        self.head.extend_from_slice(&0u32.to_le_bytes());
        self.count += 1;
    }

    /// Seals the head (count, length, checksum of header bytes 0..12, round, count and
    /// entries) and returns it with the data pages' addresses: the frame is the head's bytes
    /// followed by 4096 bytes of each data page, [`PageDataFrame::wire_len`] in all.
    pub fn seal(mut self) -> (Vec<u8>, Vec<u64>) {
        self.head[HEADER_LEN + 4..PAGE_DATA_PREFIX].copy_from_slice(&self.count.to_le_bytes());
        let len = self.head.len() - HEADER_LEN + self.data.len() * PAGE_BYTES;
        let len = u32::try_from(len).unwrap_or(u32::MAX);
        self.head[8..12].copy_from_slice(&len.to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&self.head[..12]), &self.head[HEADER_LEN..]);
        self.head[12..16].copy_from_slice(&crc.to_le_bytes());
        (self.head, self.data)
    }

    /// Bytes on the wire of a sealed frame with this head and these data pages.
    pub fn wire_len(head: &[u8], data: &[u64]) -> usize {
        head.len() + data.len() * PAGE_BYTES
    }
}

/// The checked head of a received `PageData` frame: its round and entries. The data of its
/// [`PageDataHead::data_pages`] pages (4096 bytes each, in entry order) is the rest of the frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageDataHead {
    round: u32,
    /// Entries as on the wire: guest address, low bit set for a zero page.
    entries: Vec<u64>,
    /// The crc32c of each data page, in entry order.
    crcs: Vec<u32>,
    data_pages: usize,
}

impl PageDataHead {
    /// The round the pages belong to.
    pub fn round(&self) -> u32 {
        self.round
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the frame has no entry (never true of a checked head).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Number of data pages (entries without the zero flag).
    pub fn data_pages(&self) -> usize {
        self.data_pages
    }

    /// Guest addresses of the data pages, in entry order: where the data goes.
    pub fn data_gpas(&self) -> Vec<u64> {
        self.entries
            .iter()
            .filter(|e| *e & ZERO_FLAG == 0)
            .copied()
            .collect()
    }

    /// The crc32c the source took of each data page, in the order of
    /// [`PageDataHead::data_gpas`].
    pub fn data_crcs(&self) -> &[u32] {
        &self.crcs
    }

    /// Guest addresses of every entry, data and zero, in entry order.
    pub fn gpas(&self) -> Vec<u64> {
        self.entries.iter().map(|e| e & !ZERO_FLAG).collect()
    }

    /// Guest addresses of the pages that are now zero.
    pub fn zero_gpas(&self) -> Vec<u64> {
        self.entries
            .iter()
            .filter(|e| *e & ZERO_FLAG != 0)
            .map(|e| e & !ZERO_FLAG)
            .collect()
    }

    /// The runs of consecutive data pages, `(gpa, bytes)`, as [`PageBatch::data_runs`].
    pub fn data_runs(&self) -> Vec<(u64, u64)> {
        runs_of(self.data_gpas().into_iter())
    }
}

/// Runs of consecutive pages among `gpas`, in order, `(gpa, bytes)`.
fn runs_of(gpas: impl Iterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for gpa in gpas {
        match runs.last_mut() {
            Some((start, len)) if *start + *len == gpa => *len += PAGE_SIZE,
            _ => runs.push((gpa, PAGE_SIZE)),
        }
    }
    runs
}

/// Bytes of a `PageData` frame's entries, from its header and the payload's first 6 bytes
/// (round, count): checks the count and that the length can hold the entries.
pub fn page_data_entries_len(header: Header, prefix: &[u8; 6]) -> Result<usize, DecodeError> {
    let count = usize::from(u16::from_le_bytes([prefix[4], prefix[5]]));
    let bad = |what| DecodeError::Malformed {
        kind: FrameKind::PageData,
        what,
    };
    if count == 0 || count > MAX_PAGES_PER_FRAME {
        return Err(bad("page count out of range"));
    }
    if header.len < 6 + PAGE_DATA_ENTRY * count {
        return Err(bad("payload ends early"));
    }
    Ok(PAGE_DATA_ENTRY * count)
}

/// Checks a `PageData` frame's head: `prefix` (round, count) and `entries` are the payload's
/// first bytes ([`page_data_entries_len`] of entries). Checks the checksum (header bytes 0..12,
/// prefix, entries), every address against `layout`, and that the length is exactly the head
/// and the data of the non-zero entries.
pub fn check_page_data_head(
    raw_header: &[u8; HEADER_LEN],
    header: Header,
    prefix: &[u8; 6],
    entries: &[u8],
    layout: &MemoryLayout,
) -> Result<PageDataHead, DecodeError> {
    let want = page_data_entries_len(header, prefix)?;
    if entries.len() != want {
        return Err(DecodeError::Truncated {
            needed: want.saturating_sub(entries.len()),
        });
    }
    let crc = crc32c::crc32c_append(
        crc32c::crc32c_append(crc32c::crc32c(&raw_header[..12]), prefix),
        entries,
    );
    if crc != header.crc {
        return Err(DecodeError::Checksum {
            expected: header.crc,
            actual: crc,
        });
    }
    let (chunks, _) = entries.as_chunks::<PAGE_DATA_ENTRY>();
    let mut list = Vec::with_capacity(chunks.len());
    let mut crcs = Vec::with_capacity(chunks.len());
    let mut data_pages = 0;
    for c in chunks {
        let (addr, crc) = c.split_at(8);
        let tagged = u64::from_le_bytes(addr.try_into().unwrap_or([0; 8]));
        let crc = u32::from_le_bytes(crc.try_into().unwrap_or([0; 4]));
        let gpa = tagged & !ZERO_FLAG;
        if tagged & (PAGE_SIZE - 1) & !ZERO_FLAG != 0 || layout.page_index(gpa).is_none() {
            return Err(DecodeError::PageOutsideLayout(tagged));
        }
        if tagged & ZERO_FLAG == 0 {
            data_pages += 1;
            crcs.push(crc);
        } else if crc != 0 {
            return Err(DecodeError::Malformed {
                kind: FrameKind::PageData,
                what: "a zero page's entry with a checksum",
            });
        }
        list.push(tagged);
    }
    if header.len != 6 + want + data_pages * PAGE_BYTES {
        return Err(DecodeError::Malformed {
            kind: FrameKind::PageData,
            what: "length is not the entries and their pages' data",
        });
    }
    Ok(PageDataHead {
        round: u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]),
        entries: list,
        crcs,
        data_pages,
    })
}

/// A `PageData` frame's checked head and its data (`data`, 4096 bytes per data page in entry
/// order) as a [`PageBatch`] (a copy), laid out in `buf`'s capacity.
fn page_data_batch(head: &PageDataHead, data: &[u8], buf: Vec<u8>) -> PageBatch {
    let mut pages = data.chunks_exact(PAGE_BYTES);
    let filled: Result<PageBatch, std::convert::Infallible> = batch_of(head, buf, |out| {
        out.extend_from_slice(pages.next().unwrap_or(&[]));
        Ok(())
    });
    match filled {
        Ok(b) => b,
    }
}

/// A [`PageBatch`] laid out in `buf` from a `PageData` frame's head, each data page's bytes
/// appended by `page` in entry order and compared with the crc32c in its entry (the pages that
/// differ are the batch's [`PageBatch::mismatched`]).
fn batch_of<E>(
    head: &PageDataHead,
    mut buf: Vec<u8>,
    mut page: impl FnMut(&mut Vec<u8>) -> Result<(), E>,
) -> Result<PageBatch, E> {
    buf.clear();
    buf.reserve(6 + 8 * head.len() + head.data_pages * PAGE_BYTES);
    buf.extend_from_slice(&head.round.to_le_bytes());
    buf.extend_from_slice(&(head.len() as u16).to_le_bytes());
    let mut crcs = head.crcs.iter();
    let mut mismatched = Vec::new();
    for e in &head.entries {
        buf.extend_from_slice(&e.to_le_bytes());
        if e & ZERO_FLAG == 0 {
            let at = buf.len();
            page(&mut buf)?;
            let want = crcs.next().copied().unwrap_or(0);
            if buf.get(at..).map(crc32c::crc32c) != Some(want) {
                mismatched.push(*e);
            }
        }
    }
    Ok(PageBatch {
        round: head.round,
        count: head.len() as u16,
        buf,
        start: 6,
        mismatched,
    })
}

/// Chunk size of the memory verification digest the source sends.
pub const VERIFY_CHUNK_BYTES: u64 = 1 << 20;

/// Checksums of guest memory in fixed-size chunks, in page-index order (region 0 first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryDigest {
    /// Bytes per chunk (a multiple of the page size); the last chunk may be shorter.
    pub chunk_bytes: u64,
    /// crc32c of each chunk.
    pub crcs: Vec<u32>,
}

impl MemoryDigest {
    /// Number of chunks a layout has at `chunk_bytes` per chunk.
    pub fn chunks_for(layout: &MemoryLayout, chunk_bytes: u64) -> u64 {
        layout.total_bytes().div_ceil(chunk_bytes)
    }

    /// The digest of guest memory in `layout`, read through `read(gpa, buf)` (never more than
    /// 1 MiB at a time, never across a region's end) in `chunk_bytes` chunks.
    pub fn of_memory<E>(
        layout: &MemoryLayout,
        chunk_bytes: u64,
        mut read: impl FnMut(u64, &mut [u8]) -> Result<(), E>,
    ) -> Result<Self, E> {
        let mut crcs = Vec::with_capacity(Self::chunks_for(layout, chunk_bytes) as usize);
        let mut buf = vec![0u8; (chunk_bytes.min(1 << 20)) as usize];
        let (mut crc, mut in_chunk) = (0u32, 0u64);
        for r in layout.regions() {
            let mut at = r.guest_addr;
            while at < r.end() {
                let n = (r.end() - at)
                    .min(chunk_bytes - in_chunk)
                    .min(buf.len() as u64);
                read(at, &mut buf[..n as usize])?;
                crc = crc32c::crc32c_append(crc, &buf[..n as usize]);
                in_chunk += n;
                at += n;
                if in_chunk == chunk_bytes {
                    crcs.push(crc);
                    (crc, in_chunk) = (0, 0);
                }
            }
        }
        if in_chunk > 0 {
            crcs.push(crc);
        }
        Ok(Self { chunk_bytes, crcs })
    }

    /// Index of the first chunk that differs, if any.
    pub fn first_difference(&self, other: &MemoryDigest) -> Option<usize> {
        if self.chunk_bytes != other.chunk_bytes || self.crcs.len() != other.crcs.len() {
            return Some(0);
        }
        self.crcs.iter().zip(&other.crcs).position(|(a, b)| a != b)
    }
}

/// What the target timed from reading `Commit` to writing `Running`, each step in µs of its own
/// clock (the source adds them to its breakdown of the pause; docs/migration.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TargetTimings {
    /// `Commit` read from its socket → every data stream ended and all its pages written.
    pub data_us: u64,
    /// → the memory digest compared (0 without `--verify-memory`).
    pub verify_us: u64,
    /// → the VM state restored.
    pub restore_us: u64,
    /// → the vCPUs running (the disks taken over first).
    pub resume_us: u64,
    /// Pages of `PageData` frames whose data did not match their checksum in a pre-copy round
    /// and that came again before the commit (protocol 5 on; `None` encodes the shorter frame
    /// of protocols 2 to 4). Not a time: it rides along since `Running` is the one answer.
    pub pages_resent_after_checksum_mismatch: Option<u64>,
}

impl TargetTimings {
    /// Payload bytes of a `Running` frame that carries timings (protocols 2 to 4).
    pub const BYTES: usize = 4 * 8;
    /// Payload bytes of a `Running` frame that carries timings and the count of pages sent
    /// again after a checksum mismatch (protocol 5 on).
    pub const BYTES_WITH_CHECKS: usize = 5 * 8;
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// See [`FrameKind::Hello`].
    Hello(Hello),
    /// See [`FrameKind::Welcome`].
    Welcome {
        /// The version both sides will speak.
        version: u16,
    },
    /// See [`FrameKind::Refuse`].
    Refuse {
        /// Why.
        reason: String,
    },
    /// See [`FrameKind::Join`].
    Join {
        /// Session number from the `Hello`.
        session: u64,
        /// Index of this data stream, `0..streams`.
        stream: u16,
    },
    /// See [`FrameKind::Pages`].
    Pages(PageBatch),
    /// See [`FrameKind::DataEnd`].
    DataEnd {
        /// Page frames sent on this stream.
        frames: u64,
        /// Page entries sent on this stream.
        pages: u64,
    },
    /// See [`FrameKind::State`].
    State {
        /// The VMM's own version of its state format.
        version: u32,
        /// Opaque state bytes.
        bytes: Vec<u8>,
    },
    /// See [`FrameKind::Verify`].
    Verify(MemoryDigest),
    /// See [`FrameKind::Commit`].
    Commit,
    /// See [`FrameKind::Running`].
    Running {
        /// What the target timed (protocol 2 on); `None` encodes the protocol 1 frame.
        timings: Option<TargetTimings>,
    },
    /// See [`FrameKind::Failed`].
    Failed {
        /// Why.
        reason: String,
    },
    /// See [`FrameKind::Abort`].
    Abort {
        /// Why.
        reason: String,
    },
    /// See [`FrameKind::RoundEnd`].
    RoundEnd {
        /// The pre-copy round that ended.
        round: u32,
    },
    /// See [`FrameKind::RoundAck`].
    RoundAck {
        /// The pre-copy round fully applied.
        round: u32,
    },
    /// See [`FrameKind::PostCopy`].
    PostCopy {
        /// Owed pages as runs `(first page index, pages)`, ascending, not overlapping, inside
        /// the agreed layout.
        owed: Vec<(u64, u32)>,
    },
    /// See [`FrameKind::PageRequest`].
    PageRequest {
        /// First page index asked for.
        first: u64,
        /// Pages from there (1..=[`MAX_REQUEST_PAGES`]).
        pages: u32,
    },
    /// See [`FrameKind::PostCopyDone`].
    PostCopyDone {
        /// Owed pages the target placed.
        pages: u64,
        /// Guest faults on owed pages that had to wait for a request.
        demand_faults: u64,
        /// The longest of those waits (fault read → page placed), µs.
        max_fault_us: u64,
    },
}

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The buffer ends before the frame does (slice decoding only).
    #[error("Frame truncated: {needed} more bytes needed")]
    Truncated {
        /// Bytes missing.
        needed: usize,
    },
    /// Not a Tern migration stream.
    #[error("Bad frame magic {0:02x?}")]
    BadMagic([u8; 4]),
    /// A frame header format this build does not know.
    #[error("Unsupported frame format {0}")]
    UnsupportedFormat(u8),
    /// Unknown frame kind.
    #[error("Unknown frame kind {0}")]
    UnknownKind(u8),
    /// Reserved flag bits set.
    #[error("Reserved frame flags set: {0:#x}")]
    ReservedFlags(u16),
    /// Length beyond what the kind allows.
    #[error("{kind:?} frame length {len} exceeds the maximum {max}")]
    TooLong {
        /// Frame kind.
        kind: FrameKind,
        /// Claimed length.
        len: usize,
        /// Largest allowed.
        max: usize,
    },
    /// Checksum mismatch: the frame was corrupted.
    #[error("Frame checksum mismatch: header says {expected:#010x}, content gives {actual:#010x}")]
    Checksum {
        /// From the header.
        expected: u32,
        /// Computed.
        actual: u32,
    },
    /// The payload does not parse.
    #[error("Malformed {kind:?} frame: {what}")]
    Malformed {
        /// Frame kind.
        kind: FrameKind,
        /// What is wrong.
        what: &'static str,
    },
    /// A page address outside the agreed layout.
    #[error("Page address {0:#x} is outside the agreed memory layout or unaligned")]
    PageOutsideLayout(u64),
    /// A frame that needs the agreed layout arrived before the handshake set one.
    #[error("{0:?} frame before the memory layout was agreed")]
    NoLayout(FrameKind),
    /// A frame kind the negotiated protocol version does not define (a `PageData` frame below
    /// [`PAGE_DATA_PROTOCOL_VERSION`]).
    #[error(
        "{0:?} frame at a protocol version that does not define it (PageData needs protocol 5, \
         whose pages carry their own checksums; a source of an older build sends it at protocol 4 \
         only when run with --pages-in-place: migrate without that option)"
    )]
    NotNegotiated(FrameKind),
    /// The memory layout in a hello is invalid.
    #[error("Invalid memory layout in hello")]
    Layout(#[source] LayoutError),
}

/// Why reading a frame from a stream failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadFrameError {
    /// The peer closed the stream cleanly between frames.
    #[error("Connection closed by peer")]
    Closed,
    /// I/O error (including a close in the middle of a frame).
    #[error("I/O error reading a frame")]
    Io(#[source] io::Error),
    /// The bytes are not a valid frame.
    #[error("Invalid frame")]
    Decode(#[source] DecodeError),
}

fn begin(out: &mut Vec<u8>, kind: FrameKind) {
    out.extend_from_slice(&MAGIC);
    out.push(FRAME_FORMAT);
    out.push(kind as u8);
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&[0; 8]); // len and crc, filled by `finish`
}

fn finish(out: &mut [u8]) {
    let len = u32::try_from(out.len() - HEADER_LEN).unwrap_or(u32::MAX);
    out[8..12].copy_from_slice(&len.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out[..12]), &out[HEADER_LEN..]);
    out[12..16].copy_from_slice(&crc.to_le_bytes());
}

/// Wraps arbitrary payload bytes in a frame header with kind byte `kind` and a valid checksum,
/// so tests and fuzzers can reach the payload parsers with random content. For a `PageData`
/// frame the checksum covers what its decoder checks: round, count and the entries the count
/// announces (as far as the payload goes), not the page data after them.
pub fn seal(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.push(FRAME_FORMAT);
    out.push(kind);
    out.extend_from_slice(&[0; 10]);
    out.extend_from_slice(payload);
    finish(&mut out);
    if kind == FrameKind::PageData as u8 {
        let count = match payload {
            [_, _, _, _, a, b, ..] => usize::from(u16::from_le_bytes([*a, *b])),
            _ => 0,
        };
        let head = (6 + PAGE_DATA_ENTRY * count).min(payload.len());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&out[..12]), &payload[..head]);
        out[12..16].copy_from_slice(&crc.to_le_bytes());
    }
    out
}

fn put_str(out: &mut Vec<u8>, s: &str, max: usize) {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&(end as u16).to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..end]);
}

impl Frame {
    /// The frame's kind.
    pub fn kind(&self) -> FrameKind {
        match self {
            Frame::Hello(_) => FrameKind::Hello,
            Frame::Welcome { .. } => FrameKind::Welcome,
            Frame::Refuse { .. } => FrameKind::Refuse,
            Frame::Join { .. } => FrameKind::Join,
            // A decoded `PageData` frame is a `Pages` frame too; it is encoded as one.
            Frame::Pages(_) => FrameKind::Pages,
            Frame::DataEnd { .. } => FrameKind::DataEnd,
            Frame::State { .. } => FrameKind::State,
            Frame::Verify(_) => FrameKind::Verify,
            Frame::Commit => FrameKind::Commit,
            Frame::Running { .. } => FrameKind::Running,
            Frame::Failed { .. } => FrameKind::Failed,
            Frame::Abort { .. } => FrameKind::Abort,
            Frame::RoundEnd { .. } => FrameKind::RoundEnd,
            Frame::RoundAck { .. } => FrameKind::RoundAck,
            Frame::PostCopy { .. } => FrameKind::PostCopy,
            Frame::PageRequest { .. } => FrameKind::PageRequest,
            Frame::PostCopyDone { .. } => FrameKind::PostCopyDone,
        }
    }

    /// Encodes the frame, header included. Reason texts longer than [`MAX_REASON_BYTES`] are
    /// cut; other over-limit contents (which the sender never builds) make frames the peer
    /// refuses.
    pub fn encode(&self) -> Vec<u8> {
        if let Frame::Pages(b) = self {
            return b.to_frame_bytes();
        }
        let mut out = Vec::with_capacity(64);
        begin(&mut out, self.kind());
        match self {
            Frame::Hello(h) => {
                out.extend_from_slice(&h.min_version.to_le_bytes());
                out.extend_from_slice(&h.max_version.to_le_bytes());
                out.extend_from_slice(&h.session.to_le_bytes());
                out.extend_from_slice(&h.streams.to_le_bytes());
                let c = &h.config;
                out.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
                out.extend_from_slice(&(c.layout.regions().len() as u16).to_le_bytes());
                for r in c.layout.regions() {
                    out.extend_from_slice(&r.guest_addr.to_le_bytes());
                    out.extend_from_slice(&r.size.to_le_bytes());
                }
                out.extend_from_slice(&c.vcpus.to_le_bytes());
                out.extend_from_slice(&c.cpuid.0.to_le_bytes());
                out.extend_from_slice(&(c.devices.len().min(u16::MAX.into()) as u16).to_le_bytes());
                for d in &c.devices {
                    out.extend_from_slice(&(d.len().min(u16::MAX.into()) as u16).to_le_bytes());
                    out.extend_from_slice(d.as_bytes());
                }
            }
            Frame::Welcome { version } => out.extend_from_slice(&version.to_le_bytes()),
            Frame::Refuse { reason } | Frame::Failed { reason } | Frame::Abort { reason } => {
                put_str(&mut out, reason, MAX_REASON_BYTES)
            }
            Frame::Join { session, stream } => {
                out.extend_from_slice(&session.to_le_bytes());
                out.extend_from_slice(&stream.to_le_bytes());
            }
            Frame::DataEnd { frames, pages } => {
                out.extend_from_slice(&frames.to_le_bytes());
                out.extend_from_slice(&pages.to_le_bytes());
            }
            Frame::State { version, bytes } => {
                out.extend_from_slice(&version.to_le_bytes());
                out.extend_from_slice(bytes);
            }
            Frame::Verify(d) => {
                out.extend_from_slice(&d.chunk_bytes.to_le_bytes());
                out.extend_from_slice(&(d.crcs.len() as u32).to_le_bytes());
                for c in &d.crcs {
                    out.extend_from_slice(&c.to_le_bytes());
                }
            }
            Frame::RoundEnd { round } | Frame::RoundAck { round } => {
                out.extend_from_slice(&round.to_le_bytes())
            }
            Frame::Running { timings } => {
                if let Some(t) = timings {
                    for v in [t.data_us, t.verify_us, t.restore_us, t.resume_us] {
                        out.extend_from_slice(&v.to_le_bytes());
                    }
                    if let Some(n) = t.pages_resent_after_checksum_mismatch {
                        out.extend_from_slice(&n.to_le_bytes());
                    }
                }
            }
            Frame::PostCopy { owed } => {
                out.extend_from_slice(&(owed.len() as u32).to_le_bytes());
                for (first, pages) in owed {
                    out.extend_from_slice(&first.to_le_bytes());
                    out.extend_from_slice(&pages.to_le_bytes());
                }
            }
            Frame::PageRequest { first, pages } => {
                out.extend_from_slice(&first.to_le_bytes());
                out.extend_from_slice(&pages.to_le_bytes());
            }
            Frame::PostCopyDone {
                pages,
                demand_faults,
                max_fault_us,
            } => {
                for v in [pages, demand_faults, max_fault_us] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            Frame::Commit | Frame::Pages(_) => {}
        }
        finish(&mut out);
        out
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Frame kind.
    pub kind: FrameKind,
    /// Payload length (already checked against the kind's maximum).
    pub len: usize,
    /// Checksum from the header.
    pub crc: u32,
}

/// Parses and checks a frame header.
pub fn parse_header(h: &[u8; HEADER_LEN]) -> Result<Header, DecodeError> {
    let magic = [h[0], h[1], h[2], h[3]];
    if magic != MAGIC {
        return Err(DecodeError::BadMagic(magic));
    }
    if h[4] != FRAME_FORMAT {
        return Err(DecodeError::UnsupportedFormat(h[4]));
    }
    let kind = FrameKind::from_u8(h[5]).ok_or(DecodeError::UnknownKind(h[5]))?;
    let flags = u16::from_le_bytes([h[6], h[7]]);
    if flags != 0 {
        return Err(DecodeError::ReservedFlags(flags));
    }
    let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]) as usize;
    let max = kind.max_payload();
    if len > max {
        return Err(DecodeError::TooLong { kind, len, max });
    }
    let crc = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
    Ok(Header { kind, len, crc })
}

/// Checks the checksum and parses the payload of a frame whose header is `header`.
///
/// `layout` is the agreed memory layout; page and verify frames are refused without one.
pub fn parse_payload(
    raw_header: &[u8; HEADER_LEN],
    header: Header,
    payload: &[u8],
    layout: Option<&MemoryLayout>,
) -> Result<Frame, DecodeError> {
    Ok(match parse_checked(raw_header, header, payload, layout)? {
        Parsed::Frame(f) => f,
        Parsed::Pages { round, count } => Frame::Pages(PageBatch {
            round,
            count,
            buf: payload.to_vec(),
            start: 6,
            mismatched: Vec::new(),
        }),
    })
}

enum Parsed {
    Frame(Frame),
    /// A valid page frame: the batch is built from the payload by the caller.
    Pages {
        round: u32,
        count: u16,
    },
}

fn parse_checked(
    raw_header: &[u8; HEADER_LEN],
    header: Header,
    payload: &[u8],
    layout: Option<&MemoryLayout>,
) -> Result<Parsed, DecodeError> {
    if payload.len() != header.len {
        return Err(DecodeError::Truncated {
            needed: header.len.saturating_sub(payload.len()),
        });
    }
    if header.kind == FrameKind::PageData {
        let layout = layout.ok_or(DecodeError::NoLayout(header.kind))?;
        let Some(prefix) = payload.first_chunk::<6>() else {
            return Err(DecodeError::Malformed {
                kind: header.kind,
                what: "payload ends early",
            });
        };
        let n = page_data_entries_len(header, prefix)?;
        let head = check_page_data_head(raw_header, header, prefix, &payload[6..6 + n], layout)?;
        let batch = page_data_batch(&head, &payload[6 + n..], Vec::new());
        return Ok(Parsed::Frame(Frame::Pages(batch)));
    }
    let actual = crc32c::crc32c_append(crc32c::crc32c(&raw_header[..12]), payload);
    if actual != header.crc {
        return Err(DecodeError::Checksum {
            expected: header.crc,
            actual,
        });
    }
    let kind = header.kind;
    let mut r = Rd {
        buf: payload,
        pos: 0,
        kind,
    };
    let frame = match kind {
        FrameKind::Hello => Frame::Hello(parse_hello(&mut r)?),
        FrameKind::Welcome => Frame::Welcome { version: r.u16()? },
        FrameKind::Refuse => Frame::Refuse {
            reason: r.string(MAX_REASON_BYTES)?,
        },
        FrameKind::Failed => Frame::Failed {
            reason: r.string(MAX_REASON_BYTES)?,
        },
        FrameKind::Abort => Frame::Abort {
            reason: r.string(MAX_REASON_BYTES)?,
        },
        FrameKind::Join => {
            let session = r.u64()?;
            let stream = r.u16()?;
            if stream >= MAX_STREAMS {
                return Err(r.bad("stream index out of range"));
            }
            Frame::Join { session, stream }
        }
        FrameKind::Pages => {
            let layout = layout.ok_or(DecodeError::NoLayout(kind))?;
            let (round, count) = parse_pages(&mut r, layout)?;
            if r.remaining() != 0 {
                return Err(r.bad("trailing bytes"));
            }
            return Ok(Parsed::Pages { round, count });
        }
        FrameKind::DataEnd => Frame::DataEnd {
            frames: r.u64()?,
            pages: r.u64()?,
        },
        FrameKind::State => {
            let version = r.u32()?;
            let bytes = r.rest().to_vec();
            Frame::State { version, bytes }
        }
        FrameKind::Verify => {
            let layout = layout.ok_or(DecodeError::NoLayout(kind))?;
            let chunk_bytes = r.u64()?;
            if chunk_bytes == 0 || chunk_bytes % PAGE_SIZE != 0 || chunk_bytes > 1 << 40 {
                return Err(r.bad("chunk size not a page multiple"));
            }
            let n = r.u32()? as usize;
            if n as u64 != MemoryDigest::chunks_for(layout, chunk_bytes) || n > MAX_VERIFY_CHUNKS {
                return Err(r.bad("chunk count does not match the memory layout"));
            }
            let mut crcs = Vec::with_capacity(n.min(r.remaining() / 4));
            for _ in 0..n {
                crcs.push(r.u32()?);
            }
            Frame::Verify(MemoryDigest { chunk_bytes, crcs })
        }
        FrameKind::Commit => Frame::Commit,
        FrameKind::RoundEnd => Frame::RoundEnd { round: r.u32()? },
        FrameKind::RoundAck => Frame::RoundAck { round: r.u32()? },
        FrameKind::PostCopy => {
            let layout = layout.ok_or(DecodeError::NoLayout(kind))?;
            let n = r.u32()? as usize;
            if n > MAX_OWED_RUNS {
                return Err(r.bad("too many owed runs"));
            }
            let mut owed = Vec::with_capacity(n.min(r.remaining() / 12));
            let mut next_free = 0u64;
            for _ in 0..n {
                let (first, pages) = (r.u64()?, r.u32()?);
                let end = first.checked_add(u64::from(pages));
                if pages == 0 || first < next_free || end.is_none_or(|e| e > layout.total_pages()) {
                    return Err(r.bad("owed run empty, out of order or outside the layout"));
                }
                next_free = end.unwrap_or(u64::MAX);
                owed.push((first, pages));
            }
            Frame::PostCopy { owed }
        }
        FrameKind::PageRequest => {
            // The source's reader has no layout: the post-copy machine checks the range.
            let (first, pages) = (r.u64()?, r.u32()?);
            if pages == 0 || pages > MAX_REQUEST_PAGES || first.checked_add(pages.into()).is_none()
            {
                return Err(r.bad("page request empty, too long or overflowing"));
            }
            Frame::PageRequest { first, pages }
        }
        // Parsed above, before the whole payload's checksum.
        FrameKind::PageData => return Err(r.bad("page data parsed out of place")),
        FrameKind::PostCopyDone => Frame::PostCopyDone {
            pages: r.u64()?,
            demand_faults: r.u64()?,
            max_fault_us: r.u64()?,
        },
        FrameKind::Running => Frame::Running {
            timings: match r.remaining() {
                0 => None,
                _ => Some(TargetTimings {
                    data_us: r.u64()?,
                    verify_us: r.u64()?,
                    restore_us: r.u64()?,
                    resume_us: r.u64()?,
                    pages_resent_after_checksum_mismatch: match r.remaining() {
                        0 => None,
                        _ => Some(r.u64()?),
                    },
                }),
            },
        },
    };
    if r.remaining() != 0 {
        return Err(r.bad("trailing bytes"));
    }
    Ok(Parsed::Frame(frame))
}

fn parse_hello(r: &mut Rd<'_>) -> Result<Hello, DecodeError> {
    let min_version = r.u16()?;
    let max_version = r.u16()?;
    let session = r.u64()?;
    let streams = r.u16()?;
    if streams == 0 || streams > MAX_STREAMS {
        return Err(r.bad("stream count out of range"));
    }
    if u64::from(r.u32()?) != PAGE_SIZE {
        return Err(r.bad("page size is not 4096"));
    }
    let n = usize::from(r.u16()?);
    if n > MAX_REGIONS {
        return Err(r.bad("too many memory regions"));
    }
    let mut regions = Vec::with_capacity(n);
    for _ in 0..n {
        regions.push(Region {
            guest_addr: r.u64()?,
            size: r.u64()?,
        });
    }
    let layout = MemoryLayout::new(regions).map_err(DecodeError::Layout)?;
    let vcpus = r.u32()?;
    let cpuid = CpuidDigest(r.u64()?);
    let n = usize::from(r.u16()?);
    if n > MAX_DEVICES {
        return Err(r.bad("too many devices"));
    }
    let mut devices = Vec::with_capacity(n);
    for _ in 0..n {
        devices.push(r.string(MAX_DEVICE_NAME)?);
    }
    Ok(Hello {
        min_version,
        max_version,
        session,
        streams,
        config: VmConfigDescription {
            layout,
            vcpus,
            cpuid,
            devices,
        },
    })
}

/// Checks a page frame's payload; the entries are `payload[6..]`.
fn parse_pages(r: &mut Rd<'_>, layout: &MemoryLayout) -> Result<(u32, u16), DecodeError> {
    let round = r.u32()?;
    let count = r.u16()?;
    if count == 0 || usize::from(count) > MAX_PAGES_PER_FRAME {
        return Err(r.bad("page count out of range"));
    }
    for _ in 0..count {
        let tagged = r.u64()?;
        let gpa = tagged & !ZERO_FLAG;
        if tagged & (PAGE_SIZE - 1) & !ZERO_FLAG != 0 || layout.page_index(gpa).is_none() {
            return Err(DecodeError::PageOutsideLayout(tagged));
        }
        if tagged & ZERO_FLAG == 0 {
            r.bytes(PAGE_BYTES)?;
        }
    }
    Ok((round, count))
}

struct Rd<'a> {
    buf: &'a [u8],
    pos: usize,
    kind: FrameKind,
}

impl<'a> Rd<'a> {
    fn bad(&self, what: &'static str) -> DecodeError {
        DecodeError::Malformed {
            kind: self.kind,
            what,
        }
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(self.bad("payload ends early"));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.bytes(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn string(&mut self, max: usize) -> Result<String, DecodeError> {
        let n = usize::from(self.u16()?);
        if n > max {
            return Err(self.bad("text too long"));
        }
        let b = self.bytes(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.bad("text is not UTF-8"))
    }
}

/// Decodes one frame from the start of `buf`, returning it and the bytes it used.
///
/// Never panics and never allocates more than the frame's bytes, whatever `buf` holds.
pub fn decode(buf: &[u8], layout: Option<&MemoryLayout>) -> Result<(Frame, usize), DecodeError> {
    let Some(raw) = buf.get(..HEADER_LEN) else {
        return Err(DecodeError::Truncated {
            needed: HEADER_LEN - buf.len(),
        });
    };
    let mut h = [0u8; HEADER_LEN];
    h.copy_from_slice(raw);
    let header = parse_header(&h)?;
    let total = HEADER_LEN + header.len;
    let Some(payload) = buf.get(HEADER_LEN..total) else {
        return Err(DecodeError::Truncated {
            needed: total - buf.len(),
        });
    };
    Ok((parse_payload(&h, header, payload, layout)?, total))
}

/// Reads one frame from a stream.
///
/// The payload buffer grows only as bytes arrive, so a lying length costs at most the kind's
/// maximum and only if the peer really sends that much.
pub fn read_frame<R: Read>(
    r: &mut R,
    layout: Option<&MemoryLayout>,
) -> Result<Frame, ReadFrameError> {
    read_frame_into(r, layout, Vec::new())
}

/// [`read_frame`] into `buf` (its contents are dropped, its capacity used): a receiver hands
/// back a page batch's buffer ([`PageBatch::into_buf`]) once its pages are written, so that
/// a frame does not cost a fresh allocation (and its page faults) each.
pub fn read_frame_into<R: Read>(
    r: &mut R,
    layout: Option<&MemoryLayout>,
    buf: Vec<u8>,
) -> Result<Frame, ReadFrameError> {
    let (h, header) = read_header(r)?;
    read_frame_after_header(r, &h, header, layout, buf)
}

/// Reads and checks a frame header from a stream: [`ReadFrameError::Closed`] if the stream ends
/// before its first byte.
pub fn read_header<R: Read>(r: &mut R) -> Result<([u8; HEADER_LEN], Header), ReadFrameError> {
    let mut h = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut h[got..]) {
            Ok(0) if got == 0 => return Err(ReadFrameError::Closed),
            Ok(0) => {
                return Err(ReadFrameError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed inside a frame header",
                )));
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ReadFrameError::Io(e)),
        }
    }
    let header = parse_header(&h).map_err(ReadFrameError::Decode)?;
    Ok((h, header))
}

/// Reads exactly `n` bytes from `r` onto the end of `buf` (no zeroing first).
fn read_onto<R: Read>(r: &mut R, n: usize, buf: &mut Vec<u8>) -> Result<(), ReadFrameError> {
    let want = buf.len() + n;
    buf.reserve(n);
    r.take(n as u64)
        .read_to_end(buf)
        .map_err(ReadFrameError::Io)?;
    if buf.len() != want {
        return Err(ReadFrameError::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed inside a frame",
        )));
    }
    Ok(())
}

/// Reads the rest of a `PageData` frame whose header was read: its round, count and entries,
/// checked ([`check_page_data_head`]) before anything else is read. Its data, 4096 bytes per
/// [`PageDataHead::data_pages`], is left on the stream ([`read_page_data`], or straight into
/// guest memory).
pub fn read_page_data_head<R: Read>(
    r: &mut R,
    raw_header: &[u8; HEADER_LEN],
    header: Header,
    layout: &MemoryLayout,
) -> Result<PageDataHead, ReadFrameError> {
    // Round, count and one entry at least: a shorter frame is refused before a byte of it is
    // read (reading on would take the next frame's bytes as this one's).
    if header.len < 6 + PAGE_DATA_ENTRY {
        return Err(ReadFrameError::Decode(DecodeError::Malformed {
            kind: FrameKind::PageData,
            what: "payload ends early",
        }));
    }
    let mut prefix = [0u8; 6];
    r.read_exact(&mut prefix).map_err(ReadFrameError::Io)?;
    let n = page_data_entries_len(header, &prefix).map_err(ReadFrameError::Decode)?;
    let mut entries = Vec::with_capacity(n);
    read_onto(r, n, &mut entries)?;
    check_page_data_head(raw_header, header, &prefix, &entries, layout)
        .map_err(ReadFrameError::Decode)
}

/// Reads the data of a `PageData` frame whose head was read, into a [`PageBatch`] laid out in
/// `buf`'s capacity.
pub fn read_page_data<R: Read>(
    r: &mut R,
    head: &PageDataHead,
    buf: Vec<u8>,
) -> Result<PageBatch, ReadFrameError> {
    batch_of(head, buf, |out| read_onto(r, PAGE_BYTES, out))
}

/// Reads the payload of a frame whose header was read ([`read_header`]) and decodes it, into
/// `buf` as [`read_frame_into`]. A `PageData` frame comes out as [`Frame::Pages`].
pub fn read_frame_after_header<R: Read>(
    r: &mut R,
    h: &[u8; HEADER_LEN],
    header: Header,
    layout: Option<&MemoryLayout>,
    mut buf: Vec<u8>,
) -> Result<Frame, ReadFrameError> {
    if header.kind == FrameKind::PageData {
        let layout = layout
            .ok_or(DecodeError::NoLayout(header.kind))
            .map_err(ReadFrameError::Decode)?;
        let head = read_page_data_head(r, h, header, layout)?;
        return read_page_data(r, &head, buf).map(Frame::Pages);
    }
    buf.clear();
    buf.reserve(header.len.min(1 << 20));
    let mut payload = buf;
    r.take(header.len as u64)
        .read_to_end(&mut payload)
        .map_err(ReadFrameError::Io)?;
    if payload.len() != header.len {
        return Err(ReadFrameError::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed inside a frame",
        )));
    }
    match parse_checked(h, header, &payload, layout).map_err(ReadFrameError::Decode)? {
        Parsed::Frame(f) => Ok(f),
        Parsed::Pages { round, count } => Ok(Frame::Pages(PageBatch {
            round,
            count,
            buf: payload,
            start: 6,
            mismatched: Vec::new(),
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn data_runs_join_consecutive_data_pages_and_skip_zero_pages() {
        let page = [7u8; PAGE_BYTES];
        let mut b = PageBatch::new(0);
        for gpa in [0, PAGE_SIZE, 2 * PAGE_SIZE] {
            b.push_data(gpa, &page);
        }
        b.push_zero(3 * PAGE_SIZE);
        b.push_data(4 * PAGE_SIZE, &page);
        b.push_data(9 * PAGE_SIZE, &page);
        b.push_data(10 * PAGE_SIZE, &page);
        b.push_data(5 * PAGE_SIZE, &page);
        assert_eq!(
            b.data_runs(),
            vec![
                (0, 3 * PAGE_SIZE),
                (4 * PAGE_SIZE, PAGE_SIZE),
                (9 * PAGE_SIZE, 2 * PAGE_SIZE),
                (5 * PAGE_SIZE, PAGE_SIZE),
            ]
        );
        assert!(PageBatch::new(0).data_runs().is_empty());
    }

    #[test]
    fn a_page_batch_buffer_is_read_into_again_without_reallocating() {
        let l = layout();
        let mut sent = Vec::new();
        for (round, byte) in [(0u32, 1u8), (1, 2)] {
            let mut b = PageBatch::new(round);
            b.push_data(PAGE_SIZE, &[byte; PAGE_BYTES]);
            b.push_data(2 * PAGE_SIZE, &[byte; PAGE_BYTES]);
            sent.push(Frame::Pages(b));
        }
        let mut bytes = Vec::new();
        for f in &sent {
            bytes.extend_from_slice(&f.encode());
        }
        let mut cursor = io::Cursor::new(&bytes);
        let Frame::Pages(first) = read_frame(&mut cursor, Some(&l)).unwrap() else {
            panic!("not a page frame");
        };
        assert_eq!(Frame::Pages(first.clone()), sent[0]);
        let buf = first.into_buf();
        let at = buf.as_ptr();
        let Frame::Pages(second) = read_frame_into(&mut cursor, Some(&l), buf).unwrap() else {
            panic!("not a page frame");
        };
        assert_eq!(Frame::Pages(second.clone()), sent[1]);
        let again = second.into_buf();
        assert_eq!(again.as_ptr(), at, "the buffer was allocated again");
    }

    fn layout() -> MemoryLayout {
        MemoryLayout::new(vec![
            Region {
                guest_addr: 0,
                size: 64 * PAGE_SIZE,
            },
            Region {
                guest_addr: 0x1_0000_0000,
                size: 16 * PAGE_SIZE,
            },
        ])
        .unwrap()
    }

    fn valid_gpa() -> impl Strategy<Value = u64> {
        prop_oneof![
            (0u64..64).prop_map(|i| i * PAGE_SIZE),
            (0u64..16).prop_map(|i| 0x1_0000_0000 + i * PAGE_SIZE),
        ]
    }

    fn text() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9 :é-]{0,80}"
    }

    fn config() -> impl Strategy<Value = VmConfigDescription> {
        (
            prop::collection::vec((1u64..1000, 1u64..1000), 1..8),
            any::<u32>(),
            any::<u64>(),
            prop::collection::vec("[a-z-]{1,10}:[0-9]{1,3}", 0..6),
        )
            .prop_map(|(gaps, vcpus, cpuid, devices)| {
                let mut at = 0;
                let regions = gaps
                    .into_iter()
                    .map(|(gap, pages)| {
                        let r = Region {
                            guest_addr: at + gap * PAGE_SIZE,
                            size: pages * PAGE_SIZE,
                        };
                        at = r.end();
                        r
                    })
                    .collect();
                VmConfigDescription {
                    layout: MemoryLayout::new(regions).unwrap(),
                    vcpus,
                    cpuid: CpuidDigest(cpuid),
                    devices,
                }
            })
    }

    fn pages() -> impl Strategy<Value = PageBatch> {
        (
            any::<u32>(),
            prop::collection::vec((valid_gpa(), prop::option::of(any::<u8>())), 1..6),
        )
            .prop_map(|(round, entries)| {
                let mut b = PageBatch::new(round);
                for (gpa, fill) in entries {
                    match fill {
                        Some(v) => b.push_data(gpa, &[v; PAGE_BYTES]),
                        None => b.push_zero(gpa),
                    }
                }
                b
            })
    }

    fn frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            (
                any::<u16>(),
                any::<u16>(),
                any::<u64>(),
                1..=MAX_STREAMS,
                config()
            )
                .prop_map(|(min_version, max_version, session, streams, config)| {
                    Frame::Hello(Hello {
                        min_version,
                        max_version,
                        session,
                        streams,
                        config,
                    })
                }),
            any::<u16>().prop_map(|version| Frame::Welcome { version }),
            text().prop_map(|reason| Frame::Refuse { reason }),
            (any::<u64>(), 0..MAX_STREAMS)
                .prop_map(|(session, stream)| Frame::Join { session, stream }),
            pages().prop_map(Frame::Pages),
            (any::<u64>(), any::<u64>())
                .prop_map(|(frames, pages)| Frame::DataEnd { frames, pages }),
            (any::<u32>(), prop::collection::vec(any::<u8>(), 0..3000))
                .prop_map(|(version, bytes)| Frame::State { version, bytes }),
            (1u64..8).prop_flat_map(|k| {
                let chunk_bytes = k * PAGE_SIZE;
                let n = MemoryDigest::chunks_for(&layout(), chunk_bytes) as usize;
                prop::collection::vec(any::<u32>(), n)
                    .prop_map(move |crcs| Frame::Verify(MemoryDigest { chunk_bytes, crcs }))
            }),
            Just(Frame::Commit),
            any::<u32>().prop_map(|round| Frame::RoundEnd { round }),
            any::<u32>().prop_map(|round| Frame::RoundAck { round }),
            prop::collection::vec((0u64..4, 1u32..4), 0..6).prop_map(|gaps| {
                let mut at = 0;
                let owed = gaps
                    .into_iter()
                    .map(|(gap, pages)| {
                        let run = (at + gap, pages);
                        at = run.0 + u64::from(pages);
                        run
                    })
                    .collect();
                Frame::PostCopy { owed }
            }),
            (0u64..64, 1u32..=16).prop_map(|(first, pages)| Frame::PageRequest { first, pages }),
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
                |(pages, demand_faults, max_fault_us)| Frame::PostCopyDone {
                    pages,
                    demand_faults,
                    max_fault_us
                }
            ),
            Just(Frame::Running { timings: None }),
            (
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                any::<Option<u64>>()
            )
                .prop_map(|(data_us, verify_us, restore_us, resume_us, resent)| {
                    Frame::Running {
                        timings: Some(TargetTimings {
                            data_us,
                            verify_us,
                            restore_us,
                            resume_us,
                            pages_resent_after_checksum_mismatch: resent,
                        }),
                    }
                }),
            text().prop_map(|reason| Frame::Failed { reason }),
            text().prop_map(|reason| Frame::Abort { reason }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn every_frame_round_trips(f in frame()) {
            let bytes = f.encode();
            let l = layout();
            let (back, used) = decode(&bytes, Some(&l)).unwrap();
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(&back, &f);
            let mut cursor = io::Cursor::new(&bytes);
            prop_assert_eq!(read_frame(&mut cursor, Some(&l)).unwrap(), f.clone());
            // Into a used buffer, longer than the frame and full of other bytes: the same.
            let mut cursor = io::Cursor::new(&bytes);
            let used = vec![0x5a; MAX_PAGE_FRAME + 100];
            prop_assert_eq!(read_frame_into(&mut cursor, Some(&l), used).unwrap(), f);
        }

        #[test]
        fn decoder_never_panics_on_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            let l = layout();
            let _ = decode(&bytes, Some(&l));
            let _ = decode(&bytes, None);
            let _ = read_frame(&mut io::Cursor::new(&bytes), Some(&l));
        }

        #[test]
        fn decoder_never_panics_on_random_payload_with_valid_header(
            kind in 0u8..16, payload in prop::collection::vec(any::<u8>(), 0..9000)
        ) {
            // A correct header and checksum around random bytes reaches the payload parsers.
            let out = seal(kind, &payload);
            let l = layout();
            // Whatever is accepted is canonical: it encodes back to the same bytes.
            if let Ok((f, used)) = decode(&out, Some(&l)) {
                prop_assert_eq!(f.encode(), out[..used].to_vec());
            }
            let _ = read_frame(&mut io::Cursor::new(&out), Some(&l));
        }

        #[test]
        fn any_single_byte_flip_is_detected(f in frame(), at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut bytes = f.encode();
            let i = at.index(bytes.len());
            bytes[i] ^= 1 << bit;
            let l = layout();
            prop_assert!(decode(&bytes, Some(&l)).is_err(), "flip at byte {i} undetected");
        }
    }

    proptest! {
        #[test]
        fn a_page_data_frame_decodes_to_the_same_batch_from_a_slice_and_a_stream(b in pages()) {
            let l = layout();
            let bytes = b.to_page_data_bytes();
            prop_assert_eq!(bytes[5], FrameKind::PageData as u8);
            let (f, used) = decode(&bytes, Some(&l)).unwrap();
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(&f, &Frame::Pages(b.clone()));
            // Two frames back to back on a stream: the first leaves the second intact.
            let mut two = bytes.clone();
            two.extend_from_slice(&bytes);
            let mut cursor = io::Cursor::new(&two);
            for _ in 0..2 {
                prop_assert_eq!(read_frame(&mut cursor, Some(&l)).unwrap(), Frame::Pages(b.clone()));
            }
            prop_assert!(matches!(read_frame(&mut cursor, Some(&l)), Err(ReadFrameError::Closed)));
        }

        #[test]
        fn a_flip_in_a_page_data_head_is_detected(b in pages(), at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut bytes = b.to_page_data_bytes();
            let head = PAGE_DATA_PREFIX + PAGE_DATA_ENTRY * b.len();
            let i = at.index(head);
            bytes[i] ^= 1 << bit;
            let l = layout();
            prop_assert!(decode(&bytes, Some(&l)).is_err(), "flip at byte {i} undetected");
            let mut cursor = io::Cursor::new(&bytes);
            prop_assert!(read_frame(&mut cursor, Some(&l)).is_err(), "flip at byte {i} undetected");
        }
    }

    proptest! {
        #[test]
        fn a_flip_in_page_data_marks_exactly_its_page(
            b in pages(), at in any::<prop::sample::Index>(), bit in 0u8..8
        ) {
            let data: Vec<u64> = b.iter().filter(|(_, d)| d.is_some()).map(|(g, _)| g).collect();
            prop_assume!(!data.is_empty());
            let mut bytes = b.to_page_data_bytes();
            let head = PAGE_DATA_PREFIX + PAGE_DATA_ENTRY * b.len();
            let i = at.index(bytes.len() - head);
            bytes[head + i] ^= 1 << bit;
            let l = layout();
            let (f, _) = decode(&bytes, Some(&l)).unwrap();
            let Frame::Pages(got) = f else {
                panic!("not a page frame");
            };
            prop_assert_eq!(got.mismatched(), &[data[i / PAGE_BYTES]]);
            let mut cursor = io::Cursor::new(&bytes);
            prop_assert_eq!(read_frame(&mut cursor, Some(&l)).unwrap(), Frame::Pages(got));
        }
    }

    /// A batch of one data page at `PAGE_SIZE` (bytes 0x5a) and one zero page at 0.
    fn one_data_one_zero() -> PageBatch {
        let mut b = PageBatch::new(3);
        b.push_data(PAGE_SIZE, &[0x5a; PAGE_BYTES]);
        b.push_zero(0);
        b
    }

    #[test]
    fn a_flipped_head_byte_fails_the_checksum_and_a_flipped_data_byte_marks_its_page() {
        let l = layout();
        let b = one_data_one_zero();
        let good = b.to_page_data_bytes();
        // Each data page's entry carries its crc32c, and the head's checksum covers it.
        let entry = &good[PAGE_DATA_PREFIX..PAGE_DATA_PREFIX + PAGE_DATA_ENTRY];
        assert_eq!(entry[..8], PAGE_SIZE.to_le_bytes());
        assert_eq!(
            entry[8..],
            crc32c::crc32c(&[0x5a; PAGE_BYTES]).to_le_bytes()
        );
        let (f, _) = decode(&good, Some(&l)).unwrap();
        assert_eq!(f, Frame::Pages(b.clone()));
        let Frame::Pages(clean) = f else {
            panic!("not a page frame");
        };
        assert!(clean.mismatched().is_empty());
        // Byte 1 of the first entry's address (0x1000 becomes 0x1100), or a byte of its page
        // checksum: the head's checksum fails before the address is looked at.
        for at in [PAGE_DATA_PREFIX + 1, PAGE_DATA_PREFIX + 9] {
            let mut bad = good.clone();
            bad[at] ^= 0x01;
            assert!(
                matches!(decode(&bad, Some(&l)), Err(DecodeError::Checksum { .. })),
                "byte {at}: {:?}",
                decode(&bad, Some(&l))
            );
        }
        // The page data is outside the head's checksum (docs/migration.md, "PageData"): a
        // flipped data byte decodes, with the flipped byte, and its page is named as not
        // matching its own checksum, from a slice and from a stream alike.
        let mut flipped = good.clone();
        let data_at = PAGE_DATA_PREFIX + 2 * PAGE_DATA_ENTRY + 100;
        flipped[data_at] ^= 0xff;
        let (f, _) = decode(&flipped, Some(&l)).unwrap();
        let mut cursor = io::Cursor::new(&flipped);
        assert_eq!(read_frame(&mut cursor, Some(&l)).unwrap(), f);
        let Frame::Pages(got) = f else {
            panic!("not a page frame");
        };
        let pages: Vec<_> = got.iter().map(|(g, d)| (g, d.map(|d| d[100]))).collect();
        assert_eq!(pages, vec![(PAGE_SIZE, Some(0x5a ^ 0xff)), (0, None)]);
        assert_eq!(got.mismatched(), &[PAGE_SIZE]);
    }

    #[test]
    fn sealing_a_page_data_payload_checksums_its_head_only() {
        let b = one_data_one_zero();
        let bytes = b.to_page_data_bytes();
        assert_eq!(seal(FrameKind::PageData as u8, &bytes[HEADER_LEN..]), bytes);
    }

    #[test]
    fn a_zero_page_entry_with_a_checksum_is_refused() {
        let l = layout();
        let mut f = PageDataFrame::new(1);
        f.push_zero(0);
        let (mut head, _) = f.seal();
        head[PAGE_DATA_PREFIX + 8] = 1;
        // Re-seal so the head's own checksum is right: the entry itself is what is wrong.
        let crc = crc32c::crc32c_append(crc32c::crc32c(&head[..12]), &head[HEADER_LEN..]);
        head[12..16].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            decode(&head, Some(&l)),
            Err(DecodeError::Malformed {
                kind: FrameKind::PageData,
                ..
            })
        ));
    }

    /// A `PageData` frame with a valid checksum over whatever head and length it is given.
    fn page_data_raw(count: u16, entries: &[u64], extra_data: usize) -> Vec<u8> {
        let mut out = Vec::new();
        begin(&mut out, FrameKind::PageData);
        out.extend_from_slice(&7u32.to_le_bytes());
        out.extend_from_slice(&count.to_le_bytes());
        for e in entries {
            out.extend_from_slice(&e.to_le_bytes());
            let crc = match e & ZERO_FLAG {
                0 => crc32c::crc32c(&[0x33; PAGE_BYTES]),
                _ => 0,
            };
            out.extend_from_slice(&crc.to_le_bytes());
        }
        let head_end = out.len();
        out.resize(head_end + extra_data, 0x33);
        let len = (out.len() - HEADER_LEN) as u32;
        out[8..12].copy_from_slice(&len.to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&out[..12]), &out[HEADER_LEN..head_end]);
        out[12..16].copy_from_slice(&crc.to_le_bytes());
        out
    }

    #[test]
    fn page_data_with_a_bad_count_length_or_address_is_refused() {
        let l = layout();
        let data = PAGE_SIZE;
        let zero = (2 * PAGE_SIZE) | ZERO_FLAG;
        // The well-formed one first, so the failures below are the defect's alone.
        assert!(decode(&page_data_raw(2, &[data, zero], PAGE_BYTES), Some(&l)).is_ok());
        let malformed = |bytes: Vec<u8>, what: &str| {
            let err = decode(&bytes, Some(&l)).unwrap_err();
            assert!(
                matches!(
                    err,
                    DecodeError::Malformed {
                        kind: FrameKind::PageData,
                        ..
                    }
                ),
                "{what}: {err}"
            );
            let err = read_frame(&mut io::Cursor::new(&bytes), Some(&l)).unwrap_err();
            assert!(
                matches!(err, ReadFrameError::Decode(DecodeError::Malformed { .. })),
                "{what} (stream): {err}"
            );
        };
        malformed(page_data_raw(0, &[], 0), "count 0");
        let many: Vec<u64> = (0..129)
            .map(|i| ((i % 64) * PAGE_SIZE) | ZERO_FLAG)
            .collect();
        malformed(page_data_raw(129, &many, 0), "count 129");
        malformed(
            page_data_raw(2, &[data], 0),
            "entries cut short by the length",
        );
        malformed(page_data_raw(2, &[data, zero], 0), "data missing");
        malformed(
            page_data_raw(2, &[data, zero], PAGE_BYTES - 1),
            "data short",
        );
        malformed(page_data_raw(2, &[data, zero], PAGE_BYTES + 1), "data long");
        malformed(
            page_data_raw(2, &[data, zero], 2 * PAGE_BYTES),
            "a page too many",
        );
        let outside = page_data_raw(2, &[data, (64 * PAGE_SIZE) | ZERO_FLAG], PAGE_BYTES);
        assert_eq!(
            decode(&outside, Some(&l)).unwrap_err(),
            DecodeError::PageOutsideLayout((64 * PAGE_SIZE) | ZERO_FLAG)
        );
        let unaligned = page_data_raw(1, &[PAGE_SIZE + 8], PAGE_BYTES);
        assert_eq!(
            decode(&unaligned, Some(&l)).unwrap_err(),
            DecodeError::PageOutsideLayout(PAGE_SIZE + 8)
        );
        assert_eq!(
            decode(&page_data_raw(2, &[data, zero], PAGE_BYTES), None).unwrap_err(),
            DecodeError::NoLayout(FrameKind::PageData)
        );
        // Longer than a full frame can be: refused from the header alone.
        let mut huge = page_data_raw(1, &[zero], 0);
        let max = FrameKind::PageData.max_payload() as u32 + 1;
        huge[8..12].copy_from_slice(&max.to_le_bytes());
        assert!(matches!(
            read_frame(&mut io::Cursor::new(&huge), Some(&l)),
            Err(ReadFrameError::Decode(DecodeError::TooLong { .. }))
        ));
    }

    #[test]
    fn a_page_data_head_read_from_a_stream_leaves_exactly_its_data() {
        let l = layout();
        let mut b = PageBatch::new(9);
        b.push_data(5 * PAGE_SIZE, &[1; PAGE_BYTES]);
        b.push_zero(6 * PAGE_SIZE);
        b.push_data(7 * PAGE_SIZE, &[2; PAGE_BYTES]);
        let mut bytes = b.to_page_data_bytes();
        bytes.extend_from_slice(&Frame::RoundEnd { round: 9 }.encode());
        let mut cursor = io::Cursor::new(&bytes);
        let (h, header) = read_header(&mut cursor).unwrap();
        assert_eq!(header.kind, FrameKind::PageData);
        let head = read_page_data_head(&mut cursor, &h, header, &l).unwrap();
        assert_eq!(head.round(), 9);
        assert_eq!(head.len(), 3);
        assert_eq!(head.data_pages(), 2);
        assert_eq!(head.data_gpas(), vec![5 * PAGE_SIZE, 7 * PAGE_SIZE]);
        assert_eq!(head.zero_gpas(), vec![6 * PAGE_SIZE]);
        assert_eq!(
            head.data_runs(),
            vec![(5 * PAGE_SIZE, PAGE_SIZE), (7 * PAGE_SIZE, PAGE_SIZE)]
        );
        let mut data = vec![0u8; 2 * PAGE_BYTES];
        cursor.read_exact(&mut data).unwrap();
        assert!(data[..PAGE_BYTES].iter().all(|&x| x == 1));
        assert!(data[PAGE_BYTES..].iter().all(|&x| x == 2));
        assert_eq!(
            read_frame(&mut cursor, Some(&l)).unwrap(),
            Frame::RoundEnd { round: 9 }
        );
    }

    fn pages_frame_with_addr(tagged: u64) -> Vec<u8> {
        let mut out = Vec::new();
        begin(&mut out, FrameKind::Pages);
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&1u16.to_le_bytes());
        out.extend_from_slice(&(tagged | ZERO_FLAG).to_le_bytes());
        finish(&mut out);
        out
    }

    #[test]
    fn page_outside_layout_or_unaligned_is_refused() {
        let l = layout();
        assert!(decode(&pages_frame_with_addr(63 * PAGE_SIZE), Some(&l)).is_ok());
        for bad in [
            64 * PAGE_SIZE,
            0x1_0000_0000 + 16 * PAGE_SIZE,
            0x1_0000_0000 - PAGE_SIZE,
            2 * PAGE_SIZE + 16,
            !1,
        ] {
            let err = decode(&pages_frame_with_addr(bad), Some(&l)).unwrap_err();
            assert!(
                matches!(err, DecodeError::PageOutsideLayout(_)),
                "{bad:#x}: {err}"
            );
        }
        assert_eq!(
            decode(&pages_frame_with_addr(0), None).unwrap_err(),
            DecodeError::NoLayout(FrameKind::Pages)
        );
    }

    #[test]
    fn oversized_length_is_refused_from_the_header_alone() {
        let mut out = Frame::Commit.encode();
        out[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        // Only the header is given: the length is refused before any payload is wanted.
        let err = decode(&out[..HEADER_LEN], None).unwrap_err();
        assert!(
            matches!(
                err,
                DecodeError::TooLong {
                    kind: FrameKind::Commit,
                    ..
                }
            ),
            "{err}"
        );
        let mut out = Frame::State {
            version: 1,
            bytes: vec![],
        }
        .encode();
        out[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode(&out, None).unwrap_err(),
            DecodeError::TooLong { .. }
        ));
    }

    #[test]
    fn a_lying_length_on_a_stream_allocates_only_what_arrives() {
        // Header claims a 16 MiB state frame but only 10 bytes follow, then EOF.
        let mut out = Vec::new();
        begin(&mut out, FrameKind::State);
        out[8..12].copy_from_slice(&(MAX_STATE_BYTES as u32).to_le_bytes());
        out.extend_from_slice(&[0; 10]);
        match read_frame(&mut io::Cursor::new(&out), None) {
            Err(ReadFrameError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof),
            other => panic!("expected EOF error, got {other:?}"),
        }
    }

    #[test]
    fn running_is_empty_in_protocol_1_and_carries_exactly_the_timings_from_protocol_2() {
        // Protocol 1 peers read a header-only frame (their maximum payload is 0).
        let v1 = Frame::Running { timings: None }.encode();
        assert_eq!(v1.len(), HEADER_LEN);
        assert_eq!(&v1[8..12], &0u32.to_le_bytes());
        let t = TargetTimings {
            data_us: 1,
            verify_us: 2,
            restore_us: 300,
            resume_us: 4_000,
            pages_resent_after_checksum_mismatch: None,
        };
        let v2 = Frame::Running { timings: Some(t) }.encode();
        assert_eq!(v2.len(), HEADER_LEN + TargetTimings::BYTES);
        assert_eq!(
            decode(&v2, None).unwrap().0,
            Frame::Running { timings: Some(t) }
        );
        // Protocol 5: the timings and the pages sent again after a checksum mismatch.
        let t5 = TargetTimings {
            pages_resent_after_checksum_mismatch: Some(3),
            ..t
        };
        let v5 = Frame::Running { timings: Some(t5) }.encode();
        assert_eq!(v5.len(), HEADER_LEN + TargetTimings::BYTES_WITH_CHECKS);
        assert_eq!(
            decode(&v5, None).unwrap().0,
            Frame::Running { timings: Some(t5) }
        );
        // Anything but 0, all the timings, or the timings and the count is refused.
        let cut = seal(FrameKind::Running as u8, &v2[HEADER_LEN..HEADER_LEN + 8]);
        assert!(decode(&cut, None).is_err());
        let cut = seal(FrameKind::Running as u8, &v5[HEADER_LEN..HEADER_LEN + 36]);
        assert!(decode(&cut, None).is_err());
        let long = seal(
            FrameKind::Running as u8,
            &[0u8; TargetTimings::BYTES_WITH_CHECKS + 8],
        );
        assert!(matches!(
            decode(&long, None),
            Err(DecodeError::TooLong { .. })
        ));
    }

    #[test]
    fn clean_close_between_frames_is_reported_as_closed() {
        assert!(matches!(
            read_frame(&mut io::Cursor::new(&[][..]), None),
            Err(ReadFrameError::Closed)
        ));
    }

    #[test]
    fn verify_frame_must_match_the_layout_chunk_count() {
        let l = layout();
        let f = Frame::Verify(MemoryDigest {
            chunk_bytes: PAGE_SIZE,
            crcs: vec![0; 3],
        });
        assert!(matches!(
            decode(&f.encode(), Some(&l)),
            Err(DecodeError::Malformed { .. })
        ));
    }
}
