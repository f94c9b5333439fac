//! Aligned bounce buffers for O_DIRECT, from a per-thread pool, within a per-thread budget.
//!
//! A guest decides how much it asks to be bounced (misaligned buffers, sub-block writes), so
//! requests bounce in chunks of at most [`BOUNCE_CHUNK`] and a thread's requests together hold
//! at most [`THREAD_BUDGET`] bytes of bounce buffers: a request that would exceed it waits
//! until another one returns its buffer. Each request holds one buffer at a time, so waiting
//! cannot deadlock.

use std::alloc::{self, Layout};
use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::ptr::NonNull;
use std::task::{Poll, Waker};

use super::iovec::IoVec;
use crate::error::{BlockError, Result};

/// Alignment of every bounce buffer: a page satisfies any O_DIRECT memory alignment.
pub const BOUNCE_ALIGN: usize = 4096;
/// Buffers up to this size go back to the pool when dropped.
const POOLED_MAX: usize = 1 << 20;
/// Buffers kept per thread.
const POOL_DEPTH: usize = 8;
/// Most bytes one request bounces at once; longer requests bounce chunk by chunk.
pub const BOUNCE_CHUNK: usize = 1 << 20;
/// Most bytes of budgeted bounce buffers the requests of one thread hold at once.
pub const THREAD_BUDGET: usize = 8 << 20;

/// Free buffers of one thread, as (pointer, capacity); freed when the thread exits.
struct Pool(Vec<(NonNull<u8>, usize)>);

impl Drop for Pool {
    fn drop(&mut self) {
        for &(ptr, capacity) in &self.0 {
            if let Ok(layout) = BounceBuffer::layout(capacity) {
                // SAFETY: pooled buffers were allocated in `BounceBuffer::new` with this layout.
                unsafe { alloc::dealloc(ptr.as_ptr(), layout) };
            }
        }
    }
}

thread_local! {
    static POOL: RefCell<Pool> = const { RefCell::new(Pool(Vec::new())) };
    /// Bytes of budgeted buffers held on this thread.
    static BUDGET_USED: Cell<usize> = const { Cell::new(0) };
    /// Requests waiting for budget, woken in turn as buffers come back.
    static BUDGET_WAITERS: RefCell<Vec<Waker>> = const { RefCell::new(Vec::new()) };
}

/// A page-aligned heap buffer.
pub struct BounceBuffer {
    ptr: NonNull<u8>,
    capacity: usize,
    len: usize,
    /// Counted in the thread's budget (returned when dropped).
    budgeted: bool,
}

impl BounceBuffer {
    /// A buffer of `len` (at most [`BOUNCE_CHUNK`]) bytes within the thread's budget: waits
    /// while the thread's requests hold too much (one buffer alone always fits).
    pub async fn acquire(len: usize) -> Result<Self> {
        let capacity = len.max(BOUNCE_ALIGN).next_power_of_two();
        poll_fn(|cx| {
            let used = BUDGET_USED.get();
            if used == 0 || used + capacity <= THREAD_BUDGET {
                BUDGET_USED.set(used + capacity);
                return Poll::Ready(());
            }
            BUDGET_WAITERS.with(|w| w.borrow_mut().push(cx.waker().clone()));
            Poll::Pending
        })
        .await;
        match Self::new(len) {
            Ok(mut buf) => {
                buf.budgeted = true;
                Ok(buf)
            }
            Err(e) => {
                release_budget(capacity);
                Err(e)
            }
        }
    }

    /// A buffer of `len` bytes (contents unspecified), from the pool when one fits.
    pub fn new(len: usize) -> Result<Self> {
        let capacity = len.max(BOUNCE_ALIGN).next_power_of_two();
        if let Some(ptr) = POOL.with(|p| {
            let pool = &mut p.borrow_mut().0;
            let i = pool.iter().position(|&(_, cap)| cap == capacity)?;
            Some(pool.swap_remove(i).0)
        }) {
            return Ok(Self {
                ptr,
                capacity,
                len,
                budgeted: false,
            });
        }
        let layout = Self::layout(capacity)?;
        // SAFETY: the layout has a non-zero size. Zeroed, so the bytes are initialised.
        let ptr = NonNull::new(unsafe { alloc::alloc_zeroed(layout) }).ok_or_else(|| {
            BlockError::new(
                libc::ENOMEM,
                format!("cannot allocate a {len}-byte bounce buffer"),
            )
        })?;
        Ok(Self {
            ptr,
            capacity,
            len,
            budgeted: false,
        })
    }

    fn layout(capacity: usize) -> Result<Layout> {
        Layout::from_size_align(capacity, BOUNCE_ALIGN).map_err(|_| {
            BlockError::invalid(format!("bounce buffer of {capacity} bytes is too large"))
        })
    }

    /// The buffer as a byte slice.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for `capacity >= len` initialised bytes (zeroed at allocation)
        // and owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The buffer as a mutable byte slice.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The buffer as one iovec for the kernel.
    pub fn iovec(&mut self) -> IoVec<'_> {
        IoVec::new(self.as_mut_slice())
    }
}

/// Gives `capacity` bytes back to the thread's budget and wakes the waiting requests (they
/// check again; those that still do not fit wait again).
fn release_budget(capacity: usize) {
    BUDGET_USED.set(BUDGET_USED.get().saturating_sub(capacity));
    let waiters = BUDGET_WAITERS.with(|w| std::mem::take(&mut *w.borrow_mut()));
    for w in waiters {
        w.wake();
    }
}

impl Drop for BounceBuffer {
    fn drop(&mut self) {
        if self.budgeted {
            release_budget(self.capacity);
        }
        let (ptr, capacity) = (self.ptr, self.capacity);
        let pooled = capacity <= POOLED_MAX
            && POOL.with(|p| {
                let pool = &mut p.borrow_mut().0;
                if pool.len() < POOL_DEPTH {
                    pool.push((ptr, capacity));
                    true
                } else {
                    false
                }
            });
        if !pooled {
            if let Ok(layout) = Self::layout(capacity) {
                // SAFETY: allocated in `new` with exactly this layout and not freed since.
                unsafe { alloc::dealloc(ptr.as_ptr(), layout) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::executor::now_or_never;
    use std::future::Future;

    #[test]
    fn a_thread_holds_at_most_its_budget() {
        let n = THREAD_BUDGET / BOUNCE_CHUNK;
        let mut held: Vec<BounceBuffer> = (0..n)
            .map(|_| {
                now_or_never(BounceBuffer::acquire(BOUNCE_CHUNK))
                    .expect("within the budget")
                    .expect("allocation")
            })
            .collect();
        // One more must wait ...
        let mut waiting = Box::pin(BounceBuffer::acquire(BOUNCE_CHUNK));
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        assert!(waiting.as_mut().poll(&mut cx).is_pending());
        // ... until one comes back.
        held.pop();
        match waiting.as_mut().poll(&mut cx) {
            Poll::Ready(r) => held.push(r.expect("allocation")),
            Poll::Pending => panic!("budget returned, but the waiter still waits"),
        }
        drop(held);
        // A buffer larger than the whole budget still goes through alone.
        let big = now_or_never(BounceBuffer::acquire(2 * THREAD_BUDGET)).expect("alone");
        assert!(big.is_ok());
    }
}
