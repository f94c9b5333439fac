//! Small synchronisation pieces shared by the queue threads of one qcow2 image.
//!
//! None of these hold a lock across an `.await`: waiting is done by registering the task's
//! waker under a short std mutex and re-checking the condition there, so a wake from another
//! thread (through the executor's eventfd waker) is never lost.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Mutex, MutexGuard};
use std::task::{Poll, Waker};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section below is a push, a take or a retain: a panic cannot leave the
    // data half-changed, so a poisoned lock is still consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Tasks waiting for a condition that other tasks (on any thread) make true.
#[derive(Default)]
pub struct WaitList {
    waiters: Mutex<Vec<Waker>>,
}

impl WaitList {
    /// Waits until `ready()` holds. The condition is checked under the list's lock, and
    /// whoever makes it true calls [`wake_all`](Self::wake_all) afterwards.
    pub async fn wait_until(&self, mut ready: impl FnMut() -> bool) {
        poll_fn(|cx| {
            let mut waiters = lock(&self.waiters);
            if ready() {
                return Poll::Ready(());
            }
            if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
                waiters.push(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }

    /// Wakes every waiting task (they re-check their condition).
    pub fn wake_all(&self) {
        let waiters = std::mem::take(&mut *lock(&self.waiters));
        for w in waiters {
            w.wake();
        }
    }
}

/// Lets the metadata code wait until no request still uses a host cluster mapping it has
/// just removed, without making requests wait for anything (an epoch-based grace period).
///
/// Reads and in-place writes hold an [`EpochGuard`] from their L2 lookup until their data
/// I/O finished. [`synchronize`](Self::synchronize) flips the epoch and waits until every
/// guard taken in the old epoch is gone; guards taken afterwards saw the new mappings.
#[derive(Default)]
pub struct ReadEpoch {
    epoch: AtomicUsize,
    counts: [AtomicUsize; 2],
    waiting: AtomicBool,
    drained: WaitList,
}

/// A request's membership in an epoch.
pub struct EpochGuard<'a> {
    owner: &'a ReadEpoch,
    slot: usize,
}

impl ReadEpoch {
    /// Enters the current epoch.
    pub fn enter(&self) -> EpochGuard<'_> {
        loop {
            let e = self.epoch.load(SeqCst);
            let slot = e & 1;
            self.counts[slot].fetch_add(1, SeqCst);
            if self.epoch.load(SeqCst) == e {
                return EpochGuard { owner: self, slot };
            }
            // The epoch flipped in between: leave and count in the new one.
            self.leave(slot);
        }
    }

    fn leave(&self, slot: usize) {
        if self.counts[slot].fetch_sub(1, SeqCst) == 1 && self.waiting.load(SeqCst) {
            self.drained.wake_all();
        }
    }

    /// Waits until every guard taken before this call has been dropped. Callers must be
    /// serialised (the metadata lock does that) and must not hold a guard themselves.
    pub async fn synchronize(&self) {
        let old = self.epoch.fetch_add(1, SeqCst) & 1;
        self.waiting.store(true, SeqCst);
        self.drained
            .wait_until(|| self.counts[old].load(SeqCst) == 0)
            .await;
        self.waiting.store(false, SeqCst);
    }
}

impl Drop for EpochGuard<'_> {
    fn drop(&mut self) {
        self.owner.leave(self.slot);
    }
}

/// Guest cluster ranges whose L2 entries an allocating write is about to change (its data is
/// being written to newly allocated clusters). Other changes to those entries wait.
#[derive(Default)]
pub struct InFlight {
    ranges: Mutex<Vec<(u64, u64, u64)>>,
    next_id: AtomicUsize,
    done: WaitList,
}

/// Removes its range from the in-flight set when dropped (also when the request is
/// cancelled), waking the requests that waited for it.
pub struct InFlightGuard<'a> {
    owner: &'a InFlight,
    id: u64,
}

impl InFlight {
    /// Whether a range of guest clusters overlaps an in-flight allocation.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        lock(&self.ranges)
            .iter()
            .any(|&(s, e, _)| s < end && start < e)
    }

    /// Registers a range. The caller checked [`overlaps`](Self::overlaps) under the
    /// metadata lock, which every registration holds.
    pub fn register(&self, start: u64, end: u64) -> InFlightGuard<'_> {
        let id = self.next_id.fetch_add(1, SeqCst) as u64;
        lock(&self.ranges).push((start, end, id));
        InFlightGuard { owner: self, id }
    }

    /// Waits until no in-flight allocation overlaps the range (the caller must not hold the
    /// metadata lock, which the allocation needs to finish).
    pub async fn wait_clear(&self, start: u64, end: u64) {
        self.done.wait_until(|| !self.overlaps(start, end)).await
    }
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        lock(&self.owner.ranges).retain(|&(_, _, id)| id != self.id);
        self.owner.done.wake_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::executor::now_or_never;
    use std::future::Future;
    use std::pin::pin;
    use std::task::Context;

    #[test]
    fn synchronize_waits_for_old_guards_only() {
        let e = ReadEpoch::default();
        let old = e.enter();
        let mut sync = pin!(e.synchronize());
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(sync.as_mut().poll(&mut cx).is_pending());
        // A guard taken after the flip does not hold the grace period up.
        let new = e.enter();
        drop(old);
        assert!(sync.as_mut().poll(&mut cx).is_ready());
        drop(new);
        assert!(now_or_never(e.synchronize()).is_some());
    }

    #[test]
    fn in_flight_ranges() {
        let f = InFlight::default();
        let g = f.register(4, 8);
        assert!(f.overlaps(7, 9));
        assert!(!f.overlaps(8, 9));
        assert!(now_or_never(f.wait_clear(0, 5)).is_none());
        drop(g);
        assert!(now_or_never(f.wait_clear(0, 5)).is_some());
    }
}
