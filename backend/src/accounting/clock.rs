//! The clock I/O accounting reads: monotonic nanoseconds, cached per thread between the
//! points where time can have passed for the requests the thread runs.
//!
//! Reading the clock costs more than the rest of a request's accounting, so a thread's
//! requests share readings. A vhost worker takes one when it takes a batch of requests from a
//! ring ([`refresh`]); the cache is dropped when completions arrive (the reactor's reap), when
//! the thread waits or a task on it is woken from another thread, and when a worker's event
//! ends ([`invalidate`]); the next request to look then reads the clock again. So a request
//! that completes without waiting for anything (null-co without `latency-ns`) takes no time.

use std::cell::Cell;

thread_local! {
    /// The last reading, in nanoseconds; 0: none since the cache was dropped.
    static CACHED: Cell<u64> = const { Cell::new(0) };
}

/// Reads CLOCK_MONOTONIC, in nanoseconds (never 0); not cached.
pub fn read() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a live timespec the call writes; CLOCK_MONOTONIC always exists, so
    // the call cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
        .max(1)
}

/// The thread's cached reading, or a new one when the cache was dropped.
#[inline]
pub fn now() -> u64 {
    CACHED.with(|c| match c.get() {
        0 => {
            let t = read();
            c.set(t);
            t
        }
        t => t,
    })
}

/// Reads the clock and caches the reading for the thread's next requests.
#[inline]
pub fn refresh() -> u64 {
    let t = read();
    CACHED.with(|c| c.set(t));
    t
}

/// Drops the thread's cached reading: time may have passed since.
#[inline]
pub fn invalidate() {
    CACHED.with(|c| c.set(0));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_until_invalidated() {
        let a = refresh();
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert_eq!(now(), a, "cached reading");
        invalidate();
        let b = now();
        assert!(
            b >= a + 2_000_000,
            "a new reading after invalidate: {a} {b}"
        );
        assert_eq!(now(), b);
    }
}
