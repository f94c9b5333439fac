//! Where an image's metadata lies: a class (none, L2 table, refcount block, other metadata)
//! per host cluster, two bits each, read without any lock.
//!
//! A three-level radix tree of atomics: leaves of 2^15 clusters (8 KiB) exist only where
//! metadata was put, so the memory follows the metadata, not the file size; a cap on it
//! turns an image that scatters metadata over a huge sparse file into an error. Changes
//! (rare: new L2 tables or refcount blocks, a moved refcount table) are made by one writer
//! at a time (the image's metadata lock, or the open); lookups may run concurrently.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;

use crate::error::{BlockError, Result};

/// No metadata.
pub const NONE: u64 = 0;
/// An active L2 table.
pub const L2: u64 = 1;
/// A refcount block.
pub const REFBLOCK: u64 = 2;
/// Other metadata (header, L1 table, refcount table): resolved exactly by the caller.
pub const OTHER: u64 = 3;

const LEAF_BITS: u32 = 15;
const MID_BITS: u32 = 11;
const ROOT_BITS: u32 = 11;
/// 64-bit words per leaf (two bits per cluster).
const LEAF_WORDS: usize = (1 << LEAF_BITS) / 32;
const LEAF_BYTES: usize = LEAF_WORDS * 8;
const MID_BYTES: usize = (1 << MID_BITS) * std::mem::size_of::<OnceLock<Box<Leaf>>>();
/// Host clusters from this index on are not covered: no metadata may be put there.
pub const COVERED: u64 = 1 << (LEAF_BITS + MID_BITS + ROOT_BITS);
/// Most memory the map may take (leaves and middle nodes): 2^28 clusters full of metadata.
const MAX_BYTES: usize = 128 << 20;

type Leaf = [AtomicU64; LEAF_WORDS];
type Mid = [OnceLock<Box<Leaf>>];

/// The map.
pub struct ClusterMap {
    root: Box<[OnceLock<Box<Mid>>]>,
    bytes: AtomicUsize,
}

impl Default for ClusterMap {
    fn default() -> Self {
        Self {
            root: (0..1 << ROOT_BITS).map(|_| OnceLock::new()).collect(),
            bytes: AtomicUsize::new(0),
        }
    }
}

/// Bits `lo..=hi` of a word.
fn span_mask(lo: u64, hi: u64) -> u64 {
    (u64::MAX << lo) & (u64::MAX >> (63 - hi))
}

impl ClusterMap {
    fn leaf(&self, cluster: u64) -> Option<&Leaf> {
        let mid = self
            .root
            .get((cluster >> (LEAF_BITS + MID_BITS)) as usize)?
            .get()?;
        let leaf = mid[((cluster >> LEAF_BITS) & ((1 << MID_BITS) - 1)) as usize].get()?;
        Some(leaf)
    }

    fn reserve(&self, bytes: usize) -> Result<()> {
        let now = self.bytes.load(Ordering::Relaxed);
        if now + bytes > MAX_BYTES {
            return Err(BlockError::new(
                libc::EFBIG,
                format!(
                    "qcow2: the metadata is scattered over too large a file (the map of where it \
                     lies would exceed {} MiB)",
                    MAX_BYTES >> 20
                ),
            ));
        }
        self.bytes.store(now + bytes, Ordering::Relaxed);
        Ok(())
    }

    fn leaf_or_insert(&self, cluster: u64) -> Result<&Leaf> {
        if cluster >= COVERED {
            return Err(BlockError::new(
                libc::EFBIG,
                format!(
                    "qcow2: metadata at host cluster {cluster:#x} lies past the {COVERED:#x} \
                     clusters whose overlaps strata can check"
                ),
            ));
        }
        let slot = &self.root[(cluster >> (LEAF_BITS + MID_BITS)) as usize];
        if slot.get().is_none() {
            self.reserve(MID_BYTES)?;
        }
        let mid = slot.get_or_init(|| (0..1 << MID_BITS).map(|_| OnceLock::new()).collect());
        let slot = &mid[((cluster >> LEAF_BITS) & ((1 << MID_BITS) - 1)) as usize];
        if slot.get().is_none() {
            self.reserve(LEAF_BYTES)?;
        }
        Ok(slot.get_or_init(|| Box::new(std::array::from_fn(|_| AtomicU64::new(0)))))
    }

    /// The class of a cluster.
    pub fn class(&self, cluster: u64) -> u64 {
        self.first_hit(cluster, cluster + 1)
            .map_or(NONE, |(_, c)| c)
    }

    /// The first cluster of `start..end` holding metadata, and its class.
    #[inline]
    pub fn first_hit(&self, start: u64, end: u64) -> Option<(u64, u64)> {
        let end = end.min(COVERED);
        let mut c = start;
        while c < end {
            let leaf_start = c & !((1 << LEAF_BITS) - 1);
            let stop = end.min(leaf_start + (1 << LEAF_BITS));
            if let Some(leaf) = self.leaf(c) {
                let (a, b) = (c - leaf_start, stop - 1 - leaf_start);
                for w in a / 32..=b / 32 {
                    let lo = if w == a / 32 { 2 * (a % 32) } else { 0 };
                    let hi = if w == b / 32 { 2 * (b % 32) + 1 } else { 63 };
                    let bits = leaf[w as usize].load(Ordering::Acquire) & span_mask(lo, hi);
                    if bits != 0 {
                        let tz = u64::from(bits.trailing_zeros()) & !1;
                        return Some((leaf_start + w * 32 + tz / 2, (bits >> tz) & 3));
                    }
                }
            }
            c = stop;
        }
        None
    }

    /// Sets the class of clusters `start..end` (one writer at a time).
    pub fn set(&self, start: u64, end: u64, class: u64) -> Result<()> {
        for c in start..end {
            let leaf = if class == NONE {
                match self.leaf(c) {
                    Some(l) => l,
                    None => continue,
                }
            } else {
                self.leaf_or_insert(c)?
            };
            let i = c & ((1 << LEAF_BITS) - 1);
            let shift = 2 * (i % 32);
            let word = &leaf[(i / 32) as usize];
            let old = word.load(Ordering::Acquire);
            word.store((old & !(3 << shift)) | (class << shift), Ordering::Release);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_and_hits() {
        let m = ClusterMap::default();
        assert_eq!(m.first_hit(0, COVERED), None);
        m.set(5, 7, L2).unwrap();
        m.set(40_000, 40_001, REFBLOCK).unwrap();
        m.set(1 << 30, (1 << 30) + 70, OTHER).unwrap();
        assert_eq!(m.class(4), NONE);
        assert_eq!(m.class(6), L2);
        assert_eq!(m.first_hit(0, 100), Some((5, L2)));
        assert_eq!(m.first_hit(7, 40_000), None);
        assert_eq!(m.first_hit(7, 40_001), Some((40_000, REFBLOCK)));
        assert_eq!(m.first_hit(40_001, u64::MAX), Some((1 << 30, OTHER)));
        assert_eq!(m.class((1 << 30) + 69), OTHER);
        m.set(5, 6, NONE).unwrap();
        assert_eq!(m.first_hit(0, 100), Some((6, L2)));
        assert!(m.set(COVERED, COVERED + 1, L2).is_err());
        assert_eq!(m.first_hit(COVERED, u64::MAX), None);
    }
}
