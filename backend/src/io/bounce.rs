//! Aligned bounce buffers for O_DIRECT, from a per-thread pool.

use std::alloc::{self, Layout};
use std::cell::RefCell;
use std::ptr::NonNull;

use super::iovec::IoVec;
use crate::error::{BlockError, Result};

/// Alignment of every bounce buffer: a page satisfies any O_DIRECT memory alignment.
pub const BOUNCE_ALIGN: usize = 4096;
/// Buffers up to this size go back to the pool when dropped.
const POOLED_MAX: usize = 1 << 20;
/// Buffers kept per thread.
const POOL_DEPTH: usize = 16;

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
}

/// A page-aligned heap buffer.
pub struct BounceBuffer {
    ptr: NonNull<u8>,
    capacity: usize,
    len: usize,
}

impl BounceBuffer {
    /// A buffer of `len` bytes (contents unspecified), from the pool when one fits.
    pub fn new(len: usize) -> Result<Self> {
        let capacity = len.max(BOUNCE_ALIGN).next_power_of_two();
        if let Some(ptr) = POOL.with(|p| {
            let pool = &mut p.borrow_mut().0;
            let i = pool.iter().position(|&(_, cap)| cap == capacity)?;
            Some(pool.swap_remove(i).0)
        }) {
            return Ok(Self { ptr, capacity, len });
        }
        let layout = Self::layout(capacity)?;
        // SAFETY: the layout has a non-zero size. Zeroed, so the bytes are initialised.
        let ptr = NonNull::new(unsafe { alloc::alloc_zeroed(layout) }).ok_or_else(|| {
            BlockError::new(
                libc::ENOMEM,
                format!("cannot allocate a {len}-byte bounce buffer"),
            )
        })?;
        Ok(Self { ptr, capacity, len })
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

impl Drop for BounceBuffer {
    fn drop(&mut self) {
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
