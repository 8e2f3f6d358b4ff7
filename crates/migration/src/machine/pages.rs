//! Which pages travel: the round-0 set, the dirty set of a sync, the stop-and-copy set, how a
//! set is cut into runs for the data streams, and which zero pages need not be sent. Pages are
//! numbered over all regions of the layout in order (region 0 first). Pure.

use crate::config::{MemoryLayout, PAGE_SIZE};
use crate::wire::MAX_PAGES_PER_FRAME;

/// Consecutive pages that travel on the same data stream. A page always takes the same stream,
/// so TCP's ordering keeps a later copy of a page behind an earlier one (the receiver refuses a
/// page on any other stream: [`crate::machine::receiver::Violation::OffStripe`]).
pub const STRIPE_PAGES: u64 = MAX_PAGES_PER_FRAME as u64;

/// A set of page indices (a bitmap over the layout's pages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageSet {
    words: Vec<u64>,
    total: u64,
}

impl PageSet {
    /// No page of a layout with `total` pages.
    pub fn empty(total: u64) -> Self {
        Self {
            words: vec![0; total.div_ceil(64) as usize],
            total,
        }
    }

    /// Every page of a layout with `total` pages.
    pub fn full(total: u64) -> Self {
        let mut words = vec![u64::MAX; total.div_ceil(64) as usize];
        if let Some(last) = words.last_mut()
            && !total.is_multiple_of(64)
        {
            *last = (1u64 << (total % 64)) - 1;
        }
        Self { words, total }
    }

    /// Pages the layout has (the set's universe).
    pub fn universe(&self) -> u64 {
        self.total
    }

    /// Whether page `p` is in the set.
    pub fn contains(&self, p: u64) -> bool {
        p < self.total && self.words[(p / 64) as usize] & (1 << (p % 64)) != 0
    }

    /// Adds page `p` (ignored past the universe); true if it was not in the set.
    pub fn insert(&mut self, p: u64) -> bool {
        if p >= self.total {
            return false;
        }
        let (w, bit) = ((p / 64) as usize, 1u64 << (p % 64));
        let new = self.words[w] & bit == 0;
        self.words[w] |= bit;
        new
    }

    /// Removes page `p`; true if it was in the set.
    pub fn remove(&mut self, p: u64) -> bool {
        if p >= self.total {
            return false;
        }
        let (w, bit) = ((p / 64) as usize, 1u64 << (p % 64));
        let was = self.words[w] & bit != 0;
        self.words[w] &= !bit;
        was
    }

    /// Number of pages in the set.
    pub fn len(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// Bytes the set's pages hold.
    pub fn bytes(&self) -> u64 {
        self.len() * PAGE_SIZE
    }

    /// Adds every page of `other` (same universe).
    pub fn union_with(&mut self, other: &PageSet) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }

    /// The first page at or after `from` that is in the set.
    pub fn next_from(&self, from: u64) -> Option<u64> {
        let mut idx = from;
        while idx < self.total {
            let w = (idx / 64) as usize;
            let bits = self.words[w] & (u64::MAX << (idx % 64));
            if bits != 0 {
                let p = w as u64 * 64 + u64::from(bits.trailing_zeros());
                return (p < self.total).then_some(p);
            }
            idx = (w as u64 + 1) * 64;
        }
        None
    }

    /// The pages in the set, in order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        let mut at = 0;
        std::iter::from_fn(move || {
            let p = self.next_from(at)?;
            at = p + 1;
            Some(p)
        })
    }

    /// Calls `f` with the layout-wide index of every page set in `bits`, a bitmap over region
    /// `region`'s pages (bit `i` of word `i / 64` = page `i`; bits past the region are ignored).
    fn for_region_bits(layout: &MemoryLayout, region: usize, bits: &[u64], mut f: impl FnMut(u64)) {
        let first = layout.region_first_page(region);
        let pages = layout.regions()[region].pages();
        for (wi, &word) in bits.iter().enumerate() {
            let mut word = word;
            while word != 0 {
                let i = wi as u64 * 64 + u64::from(word.trailing_zeros());
                word &= word - 1;
                if i >= pages {
                    break;
                }
                f(first + i);
            }
        }
    }

    /// The dirty set of one sync, from each region's bitmap (in region order).
    pub fn from_region_bitmaps(layout: &MemoryLayout, bitmaps: &[Vec<u64>]) -> Self {
        let mut set = Self::empty(layout.total_pages());
        for (r, bits) in bitmaps.iter().enumerate().take(layout.regions().len()) {
            Self::for_region_bits(layout, r, bits, |p| {
                set.insert(p);
            });
        }
        set
    }
}

/// The pages of round 0 (the full copy): every page except those the VM side knows to be zero
/// without reading them (`known_zero[r]`: region `r`'s bitmap, `None` when unknown). A page
/// written after the dirty log was armed shows up in a later round, so skipping is safe.
/// Returns the set and how many pages were skipped.
pub fn round_zero(layout: &MemoryLayout, known_zero: &[Option<Vec<u64>>]) -> (PageSet, u64) {
    let mut set = PageSet::full(layout.total_pages());
    let mut skipped = 0;
    for (r, bits) in known_zero.iter().enumerate().take(layout.regions().len()) {
        if let Some(bits) = bits {
            PageSet::for_region_bits(layout, r, bits, |p| {
                if set.remove(p) {
                    skipped += 1;
                }
            });
        }
    }
    (set, skipped)
}

/// The pages of the stop-and-copy round: the last sync's dirty set (not sent yet) and what was
/// dirtied between that sync and the pause.
pub fn stop_and_copy(last_sync: PageSet, since: &PageSet) -> PageSet {
    let mut set = last_sync;
    set.union_with(since);
    set
}

/// The data stream that carries page `p` when there are `streams` of them.
pub fn stream_of(p: u64, streams: usize) -> usize {
    ((p / STRIPE_PAGES) % streams.max(1) as u64) as usize
}

/// Pages read and sent together: consecutive, in one region, in one stripe, at most one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Index of the first page.
    pub first: u64,
    /// Number of pages.
    pub pages: u64,
    /// Guest address of the first page.
    pub gpa: u64,
    /// The data stream that carries them.
    pub stream: usize,
}

/// The runs that cover `set`, in page order, for `streams` data streams.
pub fn runs<'a>(
    layout: &'a MemoryLayout,
    set: &'a PageSet,
    streams: usize,
) -> impl Iterator<Item = Run> + 'a {
    let total = layout.total_pages().min(set.universe());
    let regions = layout.regions().len();
    let mut at = 0;
    std::iter::from_fn(move || {
        let start = set.next_from(at).filter(|&p| p < total)?;
        let region = (0..regions)
            .rev()
            .find(|&r| layout.region_first_page(r) <= start)
            .unwrap_or(0);
        let region_end = layout.region_first_page(region) + layout.regions()[region].pages();
        let stripe_end = (start / STRIPE_PAGES + 1) * STRIPE_PAGES;
        let limit = region_end.min(stripe_end).min(total);
        let mut end = start + 1;
        while end < limit && set.contains(end) {
            end += 1;
        }
        at = end;
        Some(Run {
            first: start,
            pages: end - start,
            gpa: layout.page_addr(start)?,
            stream: stream_of(start, streams),
        })
    })
}

/// What to send for a page just read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageAction {
    /// Its bytes.
    Data,
    /// A zero marker: it held data on the target and is zero now.
    Zero,
    /// Nothing: it is zero and the target's copy is zero already (counted as skipped).
    Skip,
}

/// Remembers which pages the target holds data for, so that a zero page is sent only when the
/// target's copy is not zero already (the target's memory starts zeroed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZeroTracker {
    sent_data: PageSet,
}

impl ZeroTracker {
    /// Nothing sent yet to a layout of `total` pages.
    pub fn new(total: u64) -> Self {
        Self {
            sent_data: PageSet::empty(total),
        }
    }

    /// Page `p` was read and is (or is not) all zero: what to send.
    pub fn page(&mut self, p: u64, is_zero: bool) -> PageAction {
        if !is_zero {
            self.sent_data.insert(p);
            PageAction::Data
        } else if self.sent_data.remove(p) {
            PageAction::Zero
        } else {
            PageAction::Skip
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Region;

    /// Two regions with a hole between them: 300 pages and 70 pages.
    fn layout() -> MemoryLayout {
        MemoryLayout::new(vec![
            Region {
                guest_addr: 0,
                size: 300 * PAGE_SIZE,
            },
            Region {
                guest_addr: 1 << 30,
                size: 70 * PAGE_SIZE,
            },
        ])
        .unwrap()
    }

    fn show_runs(set: &PageSet, streams: usize) -> String {
        let l = layout();
        runs(&l, set, streams)
            .map(|r| format!("{}+{}@{:#x}→s{}", r.first, r.pages, r.gpa, r.stream))
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn full_and_empty_sets_respect_the_universe() {
        for total in [0, 1, 63, 64, 65, 370] {
            assert_eq!(PageSet::full(total).len(), total);
            assert_eq!(PageSet::full(total).iter().count() as u64, total);
            assert!(PageSet::empty(total).is_empty());
        }
        let mut s = PageSet::empty(70);
        assert!(!s.insert(70), "past the universe");
        assert!(s.insert(69));
        assert!(!s.insert(69), "already in");
        assert_eq!(s.next_from(0), Some(69));
        assert!(s.remove(69));
        assert_eq!(s.next_from(0), None);
    }

    #[test]
    fn round_zero_is_every_page_but_the_known_zero_ones() {
        let l = layout();
        let (set, skipped) = round_zero(&l, &[None, None]);
        assert_eq!((set.len(), skipped), (370, 0));
        // Region 0: pages 0..64 known zero; region 1: page 5 and bits past its 70 pages.
        let (set, skipped) = round_zero(
            &l,
            &[Some(vec![u64::MAX]), Some(vec![1 << 5, u64::MAX << 6])],
        );
        assert_eq!(skipped, 65);
        assert_eq!(set.len(), 370 - 65);
        assert!(!set.contains(0) && !set.contains(63) && set.contains(64));
        assert!(!set.contains(300 + 5) && set.contains(300 + 6) && set.contains(369));
        // Fewer bitmaps than regions: the rest is read.
        let (set, skipped) = round_zero(&l, &[]);
        assert_eq!((set.len(), skipped), (370, 0));
    }

    #[test]
    fn dirty_bitmaps_map_to_layout_wide_indices() {
        let l = layout();
        let set = PageSet::from_region_bitmaps(&l, &[vec![0b101, 0, 0, 0, 0], vec![0b10]]);
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![0, 2, 301]);
        // Bits past a region's end are not pages.
        let set = PageSet::from_region_bitmaps(&l, &[vec![0; 5], vec![0, (1 << 5) | (1 << 6), 1]]);
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![369]);
    }

    #[test]
    fn stop_and_copy_sends_the_last_sync_and_what_came_since() {
        let mut last = PageSet::empty(370);
        last.insert(3);
        let mut since = PageSet::empty(370);
        since.insert(3);
        since.insert(310);
        let set = stop_and_copy(last, &since);
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![3, 310]);
        assert_eq!(set.bytes(), 2 * PAGE_SIZE);
    }

    #[test]
    fn runs_break_at_stripes_regions_and_gaps() {
        expect_test::expect![[
            r#"0+128@0x0→s0 128+128@0x80000→s1 256+44@0x100000→s0 300+70@0x40000000→s0"#
        ]]
        .assert_eq(&show_runs(&PageSet::full(370), 2));
        let mut set = PageSet::empty(370);
        for p in [5, 6, 7, 9, 127, 128, 299, 300] {
            set.insert(p);
        }
        expect_test::expect![[r#"5+3@0x5000→s0 9+1@0x9000→s0 127+1@0x7f000→s0 128+1@0x80000→s1 299+1@0x12b000→s2 300+1@0x40000000→s2"#]]
            .assert_eq(&show_runs(&set, 3));
        assert_eq!(show_runs(&PageSet::empty(370), 2), "");
    }

    #[test]
    fn a_page_keeps_its_stream() {
        for streams in 1..=5 {
            for p in [0, 1, 127, 128, 255, 256, 10_000] {
                let s = stream_of(p, streams);
                assert!(s < streams);
                assert_eq!(
                    s,
                    stream_of(p - p % STRIPE_PAGES, streams),
                    "one stripe, one stream"
                );
            }
        }
    }

    #[test]
    fn zero_pages_travel_only_over_data() {
        let mut z = ZeroTracker::new(8);
        let steps = [
            (1, true, PageAction::Skip),  // never sent: the target's copy is zero
            (1, false, PageAction::Data), // data now
            (1, false, PageAction::Data),
            (1, true, PageAction::Zero), // became zero: the target must zero it
            (1, true, PageAction::Skip), // and stays zero
            (2, false, PageAction::Data),
        ];
        for (i, (p, zero, want)) in steps.into_iter().enumerate() {
            assert_eq!(z.page(p, zero), want, "step {i}");
        }
    }
}
