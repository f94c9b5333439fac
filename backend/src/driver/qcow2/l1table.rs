//! The active L1 table in memory: its entries and where it lies in the file.
//!
//! Queue threads read entries without a lock; the table as a whole is replaced only when the
//! image grows past it (`resize`), under the metadata lock, which every change of an entry
//! holds too. A reader that loaded the old table sees entries that are still right: the new
//! table starts as a copy, and no entry changes while the copy is made.

use std::sync::atomic::{AtomicU64, Ordering};

/// An L1 table: one entry per L2 table, each the L2 table's offset and flags.
pub(super) struct L1Table {
    /// Where the table lies in the image file.
    pub offset: u64,
    /// The entries, as on disk once written back.
    pub entries: Box<[AtomicU64]>,
}

impl L1Table {
    /// A table at `offset` with `entries`.
    pub fn new(offset: u64, entries: impl IntoIterator<Item = u64>) -> Self {
        Self {
            offset,
            entries: entries.into_iter().map(AtomicU64::new).collect(),
        }
    }

    /// Entry `index`, or None past the end of the table.
    #[inline]
    pub fn get(&self, index: u64) -> Option<u64> {
        let e = self.entries.get(usize::try_from(index).ok()?)?;
        Some(e.load(Ordering::Acquire))
    }

    /// Sets entry `index` (metadata lock held; the index is in the table).
    pub fn set(&self, index: u64, value: u64) {
        if let Some(e) = usize::try_from(index)
            .ok()
            .and_then(|i| self.entries.get(i))
        {
            e.store(value, Ordering::Release);
        }
    }

    /// Number of entries.
    pub fn len(&self) -> u64 {
        self.entries.len() as u64
    }

    /// Entries `start..end` as they are stored on disk (big-endian).
    pub fn to_bytes(&self, start: u64, end: u64) -> Vec<u8> {
        (start..end)
            .flat_map(|i| self.get(i).unwrap_or(0).to_be_bytes())
            .collect()
    }
}
