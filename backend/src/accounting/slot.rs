//! Which shard of the accounting counters a thread writes.
//!
//! A thread owns a shard while one is free: it is then the shard's only writer, so its
//! counters take a plain load and store, no atomic read-modify-write, and no cache line is
//! written by two threads (two queue workers, say). A thread that finds none free, or that
//! counts while it exits, adds atomically to the last shard, which threads share. A shard is
//! given back when its thread exits; the lock it passes through orders the counts its old
//! owner made before those of the next.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

/// Shards per set of counters: the last one is shared.
pub const SHARDS: usize = 32;

/// The shared shard.
const SHARED: usize = SHARDS - 1;

/// Free owned shards, one bit each.
static FREE: Mutex<u32> = Mutex::new(u32::MAX >> (32 - SHARED));

/// A thread's shard, given back when the thread exits.
struct Owned(usize);

impl Drop for Owned {
    fn drop(&mut self) {
        if self.0 < SHARED {
            *FREE.lock().unwrap_or_else(|p| p.into_inner()) |= 1 << self.0;
        }
    }
}

thread_local! {
    static SLOT: Owned = Owned(take());
}

fn take() -> usize {
    let mut free = FREE.lock().unwrap_or_else(|p| p.into_inner());
    if *free == 0 {
        return SHARED;
    }
    let i = free.trailing_zeros() as usize;
    *free &= !(1 << i);
    i
}

/// The shard this thread writes.
#[derive(Debug, Clone, Copy)]
pub struct Slot(usize);

impl Slot {
    /// The calling thread's shard.
    #[inline]
    pub fn current() -> Slot {
        Slot(SLOT.try_with(|s| s.0).unwrap_or(SHARED))
    }

    /// Index of the shard.
    #[inline]
    pub fn index(self) -> usize {
        self.0
    }

    /// Adds `n` to a counter of this shard.
    #[inline]
    pub fn add(self, counter: &AtomicU64, n: u64) {
        if self.0 == SHARED {
            counter.fetch_add(n, Relaxed);
        } else {
            counter.store(counter.load(Relaxed).wrapping_add(n), Relaxed);
        }
    }

    /// Raises a counter of this shard to `v` if it is lower.
    #[inline]
    pub fn max(self, counter: &AtomicU64, v: u64) {
        if self.0 == SHARED {
            counter.fetch_max(v, Relaxed);
        } else if counter.load(Relaxed) < v {
            counter.store(v, Relaxed);
        }
    }

    /// Sets a counter of this shard to `v` (a time stamp).
    #[inline]
    pub fn set(self, counter: &AtomicU64, v: u64) {
        if self.0 == SHARED {
            counter.fetch_max(v, Relaxed);
        } else {
            counter.store(v, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_threads_own_distinct_shards_and_give_them_back() {
        let barrier = std::sync::Barrier::new(8);
        let slots: Vec<usize> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let barrier = &barrier;
                    s.spawn(move || {
                        let slot = Slot::current().index();
                        // Every thread holds its shard at the same time.
                        barrier.wait();
                        slot
                    })
                })
                .collect();
            handles.into_iter().filter_map(|h| h.join().ok()).collect()
        });
        let mut owned: Vec<usize> = slots.into_iter().filter(|&s| s != SHARED).collect();
        let n = owned.len();
        owned.sort_unstable();
        owned.dedup();
        assert_eq!(owned.len(), n, "two live threads own the same shard");
        // More threads one after the other than there are shards: each gets one back.
        for _ in 0..SHARDS * 2 {
            let slot = std::thread::spawn(|| Slot::current().index()).join();
            assert!(slot.is_ok_and(|s| s != SHARED), "shards are given back");
        }
    }
}
