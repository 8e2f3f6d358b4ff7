//! The journal of a file's direct writes not yet known durable, replayed through the coordinator
//! when the direct path fails.

/// Direct writes acknowledged since the last successful flush, in order, in one reusable arena.
#[derive(Default)]
pub(super) struct Journal {
    entries: Vec<(u64, usize, usize)>,
    data: Vec<u8>,
}

impl Journal {
    pub(super) fn push(&mut self, offset: u64, bytes: &[u8]) {
        self.entries.push((offset, self.data.len(), bytes.len()));
        self.data.extend_from_slice(bytes);
    }
    pub(super) fn clear(&mut self) {
        self.entries.clear();
        self.data.clear();
    }
    pub(super) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    pub(super) fn bytes(&self) -> usize {
        self.data.len()
    }
    pub(super) fn iter(&self) -> impl Iterator<Item = (u64, &[u8])> + '_ {
        self.entries
            .iter()
            .map(|&(o, start, len)| (o, &self.data[start..start + len]))
    }
}
