//! Serialising read-modify-write against overlapping writes, without a lock on the aligned path.
//!
//! A sub-block write on an O_DIRECT node reads the surrounding blocks, patches them and writes
//! them back; a concurrent write to the same blocks would be undone. So a read-modify-write is
//! *serialising*: it waits for every overlapping write, and overlapping writes wait for it.
//!
//! Aligned writes, the common case, touch only two atomics: they count themselves in
//! `plain_in_flight` and proceed when no serialising write exists (`serialising == 0`). A
//! serialising write first raises `serialising`, then waits until the untracked plain writes
//! have drained; from then on, new writes see `serialising > 0` and register in the table,
//! where overlaps are checked under the mutex. Both counters use SeqCst, so either the plain
//! writer sees the serialising one or the serialising one sees the plain writer's count.

use std::future::poll_fn;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Mutex;
use std::task::{Poll, Waker};

/// Tracks in-flight writes of one node.
#[derive(Default)]
pub struct WriteSerialiser {
    plain_in_flight: AtomicUsize,
    serialising: AtomicUsize,
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    tracked: Vec<Tracked>,
    waiters: Vec<Waker>,
}

struct Tracked {
    id: u64,
    start: u64,
    end: u64,
    serialising: bool,
}

/// Held while a write is in flight; dropping it lets waiting writes proceed.
pub struct WriteGuard<'a> {
    owner: &'a WriteSerialiser,
    tracked: Option<u64>,
    serialising: bool,
}

impl WriteSerialiser {
    /// Begins a write of `start..end`. A serialising write (read-modify-write) excludes every
    /// overlapping write; a plain one excludes only overlapping serialising writes.
    pub async fn begin(&self, start: u64, end: u64, serialising: bool) -> WriteGuard<'_> {
        if serialising {
            self.serialising.fetch_add(1, SeqCst);
        } else {
            self.plain_in_flight.fetch_add(1, SeqCst);
            if self.serialising.load(SeqCst) == 0 {
                return WriteGuard {
                    owner: self,
                    tracked: None,
                    serialising: false,
                };
            }
            self.end_plain();
        }
        let id = poll_fn(|cx| {
            let mut table = self.lock();
            let drained = !serialising || self.plain_in_flight.load(SeqCst) == 0;
            let overlapping = table
                .tracked
                .iter()
                .any(|t| t.start < end && start < t.end && (serialising || t.serialising));
            if drained && !overlapping {
                let id = table.next_id;
                table.next_id += 1;
                table.tracked.push(Tracked {
                    id,
                    start,
                    end,
                    serialising,
                });
                Poll::Ready(id)
            } else {
                table.waiters.push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
        WriteGuard {
            owner: self,
            tracked: Some(id),
            serialising,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // A panic while holding this lock leaves the table consistent (every change is one
        // push or remove), so a poisoned lock is still usable.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn end_plain(&self) {
        if self.plain_in_flight.fetch_sub(1, SeqCst) == 1 && self.serialising.load(SeqCst) > 0 {
            self.wake_all();
        }
    }

    fn wake_all(&self) {
        let waiters = std::mem::take(&mut self.lock().waiters);
        for w in waiters {
            w.wake();
        }
    }
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        let Some(id) = self.tracked else {
            self.owner.end_plain();
            return;
        };
        {
            let mut table = self.owner.lock();
            table.tracked.retain(|t| t.id != id);
        }
        if self.serialising {
            self.owner.serialising.fetch_sub(1, SeqCst);
        }
        self.owner.wake_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::executor::now_or_never;

    #[test]
    fn plain_writes_do_not_wait_for_each_other() {
        let s = WriteSerialiser::default();
        let a = now_or_never(s.begin(0, 4096, false)).expect("first plain write");
        let b = now_or_never(s.begin(0, 4096, false)).expect("overlapping plain write");
        drop((a, b));
    }

    #[test]
    fn serialising_write_waits_for_overlaps_both_ways() {
        let s = WriteSerialiser::default();
        let plain = now_or_never(s.begin(0, 4096, false)).unwrap();
        // RMW must wait for the untracked plain write to drain.
        assert!(now_or_never(s.begin(0, 4096, true)).is_none());
        drop(plain);
        let rmw = now_or_never(s.begin(0, 4096, true)).expect("rmw after drain");
        // Overlapping plain and serialising writes wait; disjoint plain writes go on.
        assert!(now_or_never(s.begin(1024, 2048, false)).is_none());
        assert!(now_or_never(s.begin(512, 1024, true)).is_none());
        let disjoint = now_or_never(s.begin(8192, 12288, false)).expect("disjoint write");
        drop(rmw);
        drop(disjoint);
        now_or_never(s.begin(0, 4096, false)).expect("after rmw");
    }
}
