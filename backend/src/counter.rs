//! Event counters that many threads bump and few read.
//!
//! A plain atomic counter bumped per request by the workers of several queues moves its cache
//! line between their CPUs on every request. A [`Counter`] has one line per shard, and a
//! thread always bumps the same shard, so workers on different CPUs do not share lines (up to
//! [`SHARDS`] threads; beyond that, threads share shards, still correctly).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

/// Shards per counter.
pub const SHARDS: usize = 16;

/// One shard, alone on its cache lines (128 bytes: adjacent-line prefetch pairs lines).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard(AtomicU64);

/// A counter that threads add to without sharing a cache line.
#[derive(Debug, Default)]
pub struct Counter {
    shards: [Shard; SHARDS],
}

impl Counter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.shards[shard_of_this_thread()].0.fetch_add(n, Relaxed);
    }

    /// The sum of what every thread added (exact once the adding threads are done).
    pub fn get(&self) -> u64 {
        self.shards.iter().map(|s| s.0.load(Relaxed)).sum()
    }
}

/// The shard this thread adds to: threads take shards in the order they first count.
fn shard_of_this_thread() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Relaxed) % SHARDS;
    }
    SHARD.with(|s| *s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_add_up() {
        let c = Counter::default();
        std::thread::scope(|s| {
            for t in 0..(SHARDS as u64 + 3) {
                let c = &c;
                s.spawn(move || {
                    for _ in 0..1000 {
                        c.add(t);
                    }
                });
            }
        });
        let n = SHARDS as u64 + 3;
        assert_eq!(c.get(), 1000 * n * (n - 1) / 2);
    }
}
