//! Latency histograms whose interval boundaries are set at run time (QMP's
//! `block-latency-histogram-set`), counted per shard so that recording takes no atomic
//! read-modify-write.
//!
//! Bins only ever grow: setting new boundaries remembers what the bins held (the baseline),
//! and a histogram reports the growth since. A request that completes while the boundaries
//! change may be counted in neither histogram.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use super::slot::{Slot, SHARDS};

/// Most boundaries a histogram takes (bins: one more).
pub const MAX_BOUNDARIES: usize = 63;

const BINS: usize = MAX_BOUNDARIES + 1;

/// One shard's bins, on cache lines of their own.
#[repr(align(128))]
struct Bins([AtomicU64; BINS]);

struct Tables {
    boundaries: [AtomicU64; MAX_BOUNDARIES],
    bins: [Bins; SHARDS],
    /// Each bin's sum over the shards when the boundaries were last set; the lock also
    /// serialises setters.
    baseline: Mutex<[u64; BINS]>,
}

/// A latency histogram, off until boundaries are set.
#[derive(Default)]
pub struct Histogram {
    /// Boundaries in force; 0: off.
    len: AtomicUsize,
    /// Allocated when boundaries are first set.
    tables: OnceLock<Box<Tables>>,
}

/// What a histogram counted: `bins[i]` requests took `[boundaries[i-1], boundaries[i])` ns
/// (from 0 for the first bin, without end for the last).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// Interval boundaries, in nanoseconds, increasing.
    pub boundaries: Vec<u64>,
    /// Requests per interval (one more than boundaries).
    pub bins: Vec<u64>,
}

/// Why boundaries were refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BoundaryError {
    /// None given: a single bin says nothing.
    Empty,
    /// Not strictly increasing from above 0.
    NotIncreasing,
    /// More than [`MAX_BOUNDARIES`].
    TooMany,
}

/// Checks boundaries as QEMU does: at least one, each above the one before, the first above 0.
pub fn check_boundaries(boundaries: &[u64]) -> Result<(), BoundaryError> {
    if boundaries.is_empty() {
        return Err(BoundaryError::Empty);
    }
    if boundaries.len() > MAX_BOUNDARIES {
        return Err(BoundaryError::TooMany);
    }
    let mut prev = 0;
    for &b in boundaries {
        if b <= prev {
            return Err(BoundaryError::NotIncreasing);
        }
        prev = b;
    }
    Ok(())
}

impl Histogram {
    /// Counts a request that took `latency_ns` in the shard of `slot`.
    #[inline]
    pub fn record(&self, slot: Slot, latency_ns: u64) {
        let n = self.len.load(Ordering::Acquire);
        if n == 0 {
            return;
        }
        let Some(t) = self.tables.get() else {
            return;
        };
        // The number of boundaries at or below the latency is its bin.
        let (mut lo, mut hi) = (0, n.min(MAX_BOUNDARIES));
        while lo < hi {
            let mid = (lo + hi) / 2;
            if t.boundaries[mid].load(Ordering::Relaxed) <= latency_ns {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        slot.add(&t.bins[slot.index()].0[lo], 1);
    }

    /// Sets new boundaries (checked with [`check_boundaries`]) with empty bins, or turns the
    /// histogram off (None).
    pub fn set(&self, boundaries: Option<&[u64]>) -> Result<(), BoundaryError> {
        if let Some(b) = boundaries {
            check_boundaries(b)?;
        }
        let t = self.tables.get_or_init(|| {
            Box::new(Tables {
                boundaries: std::array::from_fn(|_| AtomicU64::new(0)),
                bins: std::array::from_fn(|_| Bins(std::array::from_fn(|_| AtomicU64::new(0)))),
                baseline: Mutex::new([0; BINS]),
            })
        });
        let mut baseline = t.baseline.lock().unwrap_or_else(|p| p.into_inner());
        // Off while the boundaries change: recorders skip it.
        self.len.store(0, Ordering::Release);
        let Some(b) = boundaries else {
            return Ok(());
        };
        for (to, &from) in t.boundaries.iter().zip(b) {
            to.store(from, Ordering::Relaxed);
        }
        *baseline = sum_bins(t);
        self.len.store(b.len(), Ordering::Release);
        Ok(())
    }

    /// The boundaries and what each bin counted since they were set; None when off.
    pub fn snapshot(&self) -> Option<HistogramSnapshot> {
        let t = self.tables.get()?;
        let baseline = t.baseline.lock().unwrap_or_else(|p| p.into_inner());
        let n = self.len.load(Ordering::Acquire);
        if n == 0 {
            return None;
        }
        let sums = sum_bins(t);
        Some(HistogramSnapshot {
            boundaries: t.boundaries[..n]
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            bins: (0..=n).map(|i| sums[i].wrapping_sub(baseline[i])).collect(),
        })
    }
}

fn sum_bins(t: &Tables) -> [u64; BINS] {
    let mut sums = [0u64; BINS];
    for shard in &t.bins {
        for (sum, bin) in sums.iter_mut().zip(&shard.0) {
            *sum = sum.wrapping_add(bin.load(Ordering::Relaxed));
        }
    }
    sums
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundaries_are_checked_as_qemu_does() {
        assert_eq!(check_boundaries(&[]), Err(BoundaryError::Empty));
        assert_eq!(check_boundaries(&[0, 5]), Err(BoundaryError::NotIncreasing));
        assert_eq!(
            check_boundaries(&[10, 5]),
            Err(BoundaryError::NotIncreasing)
        );
        assert_eq!(
            check_boundaries(&[10, 10]),
            Err(BoundaryError::NotIncreasing)
        );
        assert_eq!(check_boundaries(&[1, 10, 100]), Ok(()));
        let many: Vec<u64> = (1..=MAX_BOUNDARIES as u64 + 1).collect();
        assert_eq!(check_boundaries(&many), Err(BoundaryError::TooMany));
        assert_eq!(check_boundaries(&many[..MAX_BOUNDARIES]), Ok(()));
    }

    #[test]
    fn latencies_land_in_their_intervals_and_reset_with_new_boundaries() {
        let h = Histogram::default();
        let slot = Slot::current();
        h.record(slot, 5);
        assert_eq!(h.snapshot(), None, "off until set");
        h.set(Some(&[10, 50, 100])).unwrap();
        for latency in [0, 9, 10, 49, 50, 99, 100, 1_000_000] {
            h.record(slot, latency);
        }
        let s = h.snapshot().unwrap();
        assert_eq!(s.boundaries, [10, 50, 100]);
        assert_eq!(s.bins, [2, 2, 2, 2]);
        h.set(Some(&[7])).unwrap();
        h.record(slot, 7);
        let s = h.snapshot().unwrap();
        assert_eq!((s.boundaries, s.bins), (vec![7], vec![0, 1]));
        h.set(None).unwrap();
        assert_eq!(h.snapshot(), None);
        assert_eq!(h.set(Some(&[3, 2])), Err(BoundaryError::NotIncreasing));
    }

    #[test]
    fn threads_count_into_one_histogram() {
        let h = Histogram::default();
        h.set(Some(&[1000])).unwrap();
        std::thread::scope(|s| {
            for t in 0..(SHARDS as u64 + 4) {
                let h = &h;
                s.spawn(move || {
                    let slot = Slot::current();
                    for i in 0..1000 {
                        h.record(slot, (t + i) % 2000);
                    }
                });
            }
        });
        let s = h.snapshot().unwrap();
        assert_eq!(s.bins.iter().sum::<u64>(), 1000 * (SHARDS as u64 + 4));
    }
}
