//! Storage for one executor task at a time that the next task reuses.
//!
//! Boxing each spawned future costs an allocation and a free per task, and the box is as big
//! as the future's largest state, all of it copied in. A [`TaskCell`] keeps its memory when
//! its task finishes, so the executor's slot takes the next task (of the same type, on a
//! worker) without touching the allocator.

use std::future::Future;
use std::mem::{align_of, size_of, MaybeUninit};
use std::pin::Pin;
use std::ptr::NonNull;
use std::task::{Context, Poll};

/// The unit of a cell's memory; its alignment is the most a future stored in place may need
/// (a future that needs more is boxed first).
#[repr(C, align(16))]
struct Block([u8; 16]);

/// Memory for one `Future<Output = ()>` at a time, kept between tasks.
pub(crate) struct TaskCell<'a> {
    /// Room for the task; uninitialised except for the bytes of `task`.
    mem: Box<[MaybeUninit<Block>]>,
    /// The task in `mem`, if any.
    task: Option<NonNull<dyn Future<Output = ()> + 'a>>,
}

impl<'a> TaskCell<'a> {
    /// An empty cell with no memory yet.
    pub(crate) fn new() -> Self {
        TaskCell {
            mem: Box::new([]),
            task: None,
        }
    }

    /// Whether a task is in the cell.
    pub(crate) fn is_occupied(&self) -> bool {
        self.task.is_some()
    }

    /// Puts the task `make` returns in the cell, dropping the one there, and growing the
    /// memory if it is too small. `make` runs once the memory is ready, so the task can be
    /// built where it stays rather than built elsewhere and copied in.
    #[inline]
    pub(crate) fn put<F: Future<Output = ()> + 'a>(&mut self, make: impl FnOnce() -> F) {
        if align_of::<F>() > align_of::<Block>() {
            self.put_in_place(|| -> Pin<Box<dyn Future<Output = ()> + 'a>> { Box::pin(make()) });
        } else {
            self.put_in_place(make);
        }
    }

    /// [`put`](Self::put) of a task aligned no more than a [`Block`].
    #[inline]
    fn put_in_place<F: Future<Output = ()> + 'a>(&mut self, make: impl FnOnce() -> F) {
        self.clear();
        let blocks = size_of::<F>().div_ceil(size_of::<Block>());
        if self.mem.len() < blocks {
            self.mem = Box::new_uninit_slice(blocks);
        }
        let at = self.mem.as_mut_ptr().cast::<F>();
        // SAFETY: `mem` holds at least size_of::<F>() bytes aligned for F (checked by `put`; for
        // a zero-sized F the empty slice's pointer is aligned and enough), and no task is in
        // it (cleared above). The task stays at this address until `clear` drops it: `mem` is
        // replaced only when the cell is empty.
        unsafe { at.write(make()) };
        let task: *mut (dyn Future<Output = ()> + 'a) = at;
        self.task = NonNull::new(task);
    }

    /// Polls the task; Pending when the cell is empty.
    #[inline]
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self.task {
            // SAFETY: `task` points at the live future `put` wrote into `mem`, which no one
            // else references (the cell is borrowed mutably) and which stays pinned there
            // until `clear` drops it.
            Some(mut task) => unsafe { Pin::new_unchecked(task.as_mut()) }.poll(cx),
            None => Poll::Pending,
        }
    }

    /// Drops the task, keeping the memory for the next.
    #[inline]
    pub(crate) fn clear(&mut self) {
        if let Some(task) = self.task.take() {
            // SAFETY: `task` is the live future `put` wrote, taken out of the cell first, so it
            // is dropped once, in place (it is pinned), and never used again.
            unsafe { std::ptr::drop_in_place(task.as_ptr()) };
        }
    }
}

impl Drop for TaskCell<'_> {
    fn drop(&mut self) {
        self.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;
    use std::task::Waker;

    /// Counts its drops; ready on the first poll, with `N` bytes of state.
    struct Probe<const N: usize> {
        dropped: Rc<Cell<u32>>,
        polled: Rc<Cell<u32>>,
        _state: [u8; N],
    }

    impl<const N: usize> Future for Probe<N> {
        type Output = ();
        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
            self.polled.set(self.polled.get() + 1);
            Poll::Ready(())
        }
    }

    impl<const N: usize> Drop for Probe<N> {
        fn drop(&mut self) {
            self.dropped.set(self.dropped.get() + 1);
        }
    }

    #[repr(align(64))]
    struct Aligned64(#[allow(dead_code)] u8);

    #[test]
    fn tasks_of_any_size_and_alignment_run_and_drop_once() {
        let dropped = Rc::new(Cell::new(0));
        let polled = Rc::new(Cell::new(0));
        let mut cx = Context::from_waker(Waker::noop());
        let mut cell = TaskCell::new();
        assert!(cell.poll(&mut cx).is_pending(), "an empty cell");
        let probe = |_: ()| Probe::<0> {
            dropped: dropped.clone(),
            polled: polled.clone(),
            _state: [],
        };
        cell.put(|| probe(()));
        let first = cell.mem.as_ptr();
        assert!(cell.poll(&mut cx).is_ready());
        cell.clear();
        assert_eq!((polled.get(), dropped.get()), (1, 1));
        assert!(!cell.is_occupied());
        // The same size again: the same memory.
        cell.put(|| probe(()));
        assert_eq!(cell.mem.as_ptr(), first, "memory reused");
        // Put over a live task: the old one is dropped.
        cell.put(|| Probe::<1000> {
            dropped: dropped.clone(),
            polled: polled.clone(),
            _state: [7; 1000],
        });
        assert_eq!(dropped.get(), 2);
        assert!(cell.mem.len() * size_of::<Block>() >= 1000);
        assert!(cell.poll(&mut cx).is_ready());
        // A zero-sized task and one aligned more than a block.
        cell.put(|| async {});
        assert_eq!(dropped.get(), 3);
        assert!(cell.poll(&mut cx).is_ready());
        let aligned = Aligned64(0);
        let d = dropped.clone();
        cell.put(|| async move {
            let _keep = &aligned;
            assert_eq!((&aligned as *const Aligned64 as usize) % 64, 0);
            d.set(d.get() + 100);
        });
        assert!(cell.poll(&mut cx).is_ready());
        assert_eq!(dropped.get(), 103);
        // Dropping the cell drops its task.
        cell.put(|| probe(()));
        drop(cell);
        assert_eq!(dropped.get(), 104);
    }
}
