//! I/O accounting as QEMU's `query-blockstats` reports it: operations, bytes, time, failed and
//! invalid requests per kind, idle time, the highest offset written, and latency histograms.
//!
//! An [`IoStats`] belongs to a node or an export and is written by every thread that runs its
//! requests, each in a shard of its own ([`slot`]), so counting costs a few plain stores and
//! the queues of an export never write the same cache line. Requests are timed with the
//! thread's cached clock ([`clock`]). Readers (QMP) sum the shards.

pub mod clock;
pub mod histogram;
pub mod slot;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

pub use histogram::{BoundaryError, Histogram, HistogramSnapshot, MAX_BOUNDARIES};
use slot::{Slot, SHARDS};

/// The kinds of request QEMU accounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    /// Reads.
    Read = 0,
    /// Writes (write-zeroes too, as QEMU's virtio-blk counts them).
    Write = 1,
    /// Flushes.
    Flush = 2,
    /// Discards.
    Unmap = 3,
}

/// Number of [`IoKind`]s.
pub const KINDS: usize = 4;

impl IoKind {
    /// Every kind, in index order.
    pub const ALL: [IoKind; KINDS] = [IoKind::Read, IoKind::Write, IoKind::Flush, IoKind::Unmap];

    /// The kinds with a latency histogram (QEMU 7.2: reads, writes, flushes).
    pub const WITH_HISTOGRAM: [IoKind; 3] = [IoKind::Read, IoKind::Write, IoKind::Flush];
}

/// What one thread counted, alone on its cache lines.
#[derive(Default)]
#[repr(align(128))]
struct Shard {
    ops: [AtomicU64; KINDS],
    bytes: [AtomicU64; KINDS],
    time_ns: [AtomicU64; KINDS],
    /// [`clock`] time of the last request counted (0: none).
    last_access_ns: AtomicU64,
    /// End of the highest range written.
    wr_highest_offset: AtomicU64,
}

/// Failed and invalid requests: rare, so shared by every thread.
#[derive(Default)]
#[repr(align(128))]
struct Rare {
    failed: [AtomicU64; KINDS],
    invalid: [AtomicU64; KINDS],
}

/// The I/O counters of a node or an export.
pub struct IoStats {
    shards: Box<[Shard]>,
    rare: Rare,
    /// Read, write and flush latency histograms (off until set).
    histograms: [Histogram; 3],
}

impl Default for IoStats {
    fn default() -> Self {
        IoStats {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            rare: Rare::default(),
            histograms: Default::default(),
        }
    }
}

/// The counters of one kind of request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KindSnapshot {
    /// Requests that succeeded.
    pub ops: u64,
    /// Bytes they moved.
    pub bytes: u64,
    /// Time they took, failed ones included.
    pub total_time_ns: u64,
    /// Requests that failed with an I/O error.
    pub failed: u64,
    /// Requests refused before any I/O (out of range, misaligned, malformed).
    pub invalid: u64,
}

/// A reading of an [`IoStats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IoStatsSnapshot {
    /// Per kind, indexed by `IoKind as usize`.
    pub kinds: [KindSnapshot; KINDS],
    /// Time since the last request was counted; None before the first.
    pub idle_time_ns: Option<u64>,
    /// End of the highest range written.
    pub wr_highest_offset: u64,
    /// Read, write and flush histograms, where set.
    pub histograms: [Option<HistogramSnapshot>; 3],
}

impl IoStats {
    #[inline]
    fn shard(&self, slot: Slot) -> &Shard {
        &self.shards[slot.index()]
    }

    /// Counts a request of `kind` and `bytes` that started at `start_ns` ([`clock`] time) and
    /// ended now, successfully or with an I/O error.
    #[inline]
    pub fn done(&self, kind: IoKind, bytes: u64, start_ns: u64, ok: bool) {
        let now = clock::now();
        let latency = now.saturating_sub(start_ns);
        let slot = Slot::current();
        let shard = self.shard(slot);
        let k = kind as usize;
        if ok {
            slot.add(&shard.ops[k], 1);
            slot.add(&shard.bytes[k], bytes);
        } else {
            self.rare.failed[k].fetch_add(1, Relaxed);
        }
        slot.add(&shard.time_ns[k], latency);
        slot.set(&shard.last_access_ns, now);
        if let Some(h) = self.histograms.get(k) {
            h.record(slot, latency);
        }
    }

    /// Counts a request of `kind` refused before any I/O.
    pub fn invalid(&self, kind: IoKind) {
        self.rare.invalid[kind as usize].fetch_add(1, Relaxed);
        let slot = Slot::current();
        slot.set(&self.shard(slot).last_access_ns, clock::now());
    }

    /// Notes a successful write that ended at byte `end`.
    #[inline]
    pub fn wrote_up_to(&self, end: u64) {
        let slot = Slot::current();
        slot.max(&self.shard(slot).wr_highest_offset, end);
    }

    /// The latency histogram of `kind` (None for discards, which have none).
    pub fn histogram(&self, kind: IoKind) -> Option<&Histogram> {
        self.histograms.get(kind as usize)
    }

    /// Sums the shards.
    pub fn snapshot(&self) -> IoStatsSnapshot {
        let mut s = IoStatsSnapshot::default();
        let mut last = 0;
        for shard in self.shards.iter() {
            for (k, kind) in s.kinds.iter_mut().enumerate() {
                kind.ops = kind.ops.wrapping_add(shard.ops[k].load(Relaxed));
                kind.bytes = kind.bytes.wrapping_add(shard.bytes[k].load(Relaxed));
                kind.total_time_ns = kind
                    .total_time_ns
                    .wrapping_add(shard.time_ns[k].load(Relaxed));
            }
            last = last.max(shard.last_access_ns.load(Relaxed));
            s.wr_highest_offset = s
                .wr_highest_offset
                .max(shard.wr_highest_offset.load(Relaxed));
        }
        for (k, kind) in s.kinds.iter_mut().enumerate() {
            kind.failed = self.rare.failed[k].load(Relaxed);
            kind.invalid = self.rare.invalid[k].load(Relaxed);
        }
        if last != 0 {
            s.idle_time_ns = Some(clock::read().saturating_sub(last));
        }
        for (to, h) in s.histograms.iter_mut().zip(&self.histograms) {
            *to = h.snapshot();
        }
        s
    }
}

impl std::fmt::Debug for IoStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoStats").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_sum_over_threads() {
        let stats = IoStats::default();
        stats
            .histogram(IoKind::Read)
            .unwrap()
            .set(Some(&[1_000_000_000]))
            .unwrap();
        std::thread::scope(|s| {
            for _ in 0..(SHARDS + 3) {
                let stats = &stats;
                s.spawn(move || {
                    for _ in 0..100 {
                        let start = clock::now();
                        stats.done(IoKind::Read, 4096, start, true);
                        stats.done(IoKind::Write, 512, start, false);
                        stats.wrote_up_to(8192);
                    }
                    stats.invalid(IoKind::Unmap);
                });
            }
        });
        let n = (SHARDS + 3) as u64;
        let s = stats.snapshot();
        let read = s.kinds[IoKind::Read as usize];
        assert_eq!(
            (read.ops, read.bytes, read.failed),
            (100 * n, 409_600 * n, 0)
        );
        let write = s.kinds[IoKind::Write as usize];
        assert_eq!((write.ops, write.bytes, write.failed), (0, 0, 100 * n));
        assert_eq!(s.kinds[IoKind::Unmap as usize].invalid, n);
        assert_eq!(s.wr_highest_offset, 8192);
        assert!(s.idle_time_ns.is_some());
        let h = s.histograms[0].as_ref().unwrap();
        assert_eq!(h.bins.iter().sum::<u64>(), 100 * n);
        assert!(s.histograms[1].is_none());
    }

    #[test]
    fn idle_time_only_after_a_request() {
        let stats = IoStats::default();
        assert_eq!(stats.snapshot().idle_time_ns, None);
        stats.invalid(IoKind::Read);
        assert!(stats.snapshot().idle_time_ns.is_some());
    }
}
