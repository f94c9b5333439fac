//! What the request tasks of one worker thread share with it: the lists of finished requests
//! the worker publishes, recycled buffer vectors, the failure log, and the memory table the
//! tasks hold. Single-threaded (`Cell`/`RefCell`): a worker and its tasks run on one thread.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use strata_backend::IoVec;
use vm_memory::GuestMemoryMmap;

use crate::device::DevState;
use crate::device_config::DeviceConfig;

/// Logged request failures per worker before they are only counted.
const LOGGED_FAILURES: u64 = 20;

/// A finished request waiting for its used-ring entry.
#[derive(Clone, Copy)]
pub(crate) struct Done {
    pub head: u16,
    pub len: u32,
    /// The queue's epoch when the request was taken ([`DevState::epoch`]).
    pub epoch: u32,
}

/// A memory table held by the requests of one worker, each through an `Rc` (a plain
/// increment) instead of its own clone of the `Arc` (two atomic operations per request, each
/// waiting for the used-ring stores before it).
pub(crate) struct HeldMem(pub Arc<GuestMemoryMmap>);

/// What request tasks share on one worker thread.
pub(crate) struct TaskCtx {
    pub cfg: Arc<DeviceConfig>,
    state: Arc<DevState>,
    /// Finished requests, per slot (the thread's virtqueue number).
    done: RefCell<Vec<Vec<Done>>>,
    /// Some list in `done` is not empty (saves looking at every slot).
    any_done: Cell<bool>,
    /// Empty buffer vectors of finished requests, reused by new ones (one allocation less
    /// per request).
    iov_pool: RefCell<Vec<Vec<IoVec<'static>>>>,
    /// The memory tables of finished requests whose used entries are not published yet: a
    /// memory table change must not be answered before they are (the used ring is the
    /// driver's proof that the device is done with the old table).
    unpublished_mem: RefCell<Vec<Rc<HeldMem>>>,
    failures: Cell<u64>,
}

impl TaskCtx {
    /// The context of a worker that runs `slots` virtqueues.
    pub(crate) fn new(cfg: Arc<DeviceConfig>, state: Arc<DevState>, slots: usize) -> Self {
        TaskCtx {
            cfg,
            state,
            done: RefCell::new(vec![Vec::new(); slots]),
            any_done: Cell::new(false),
            iov_pool: RefCell::new(Vec::new()),
            unpublished_mem: RefCell::new(Vec::new()),
            failures: Cell::new(0),
        }
    }

    /// Whether the guest turned its write cache off: every write is flushed before it
    /// completes.
    #[inline]
    pub(crate) fn writethrough(&self) -> bool {
        !self.state.writeback.load(Ordering::Relaxed)
    }

    /// An empty buffer vector, recycled from a finished request when there is one.
    #[inline]
    pub(crate) fn take_iov(&self) -> Vec<IoVec<'static>> {
        self.iov_pool.borrow_mut().pop().unwrap_or_default()
    }

    /// Keeps an emptied buffer vector for the next request (a bounded number of them).
    #[inline]
    pub(crate) fn recycle_iov(&self, mut iov: Vec<IoVec<'static>>) {
        if iov.capacity() == 0 {
            return;
        }
        iov.clear();
        let mut pool = self.iov_pool.borrow_mut();
        if pool.len() < usize::from(self.cfg.queue_size) {
            pool.push(iov);
        }
    }

    /// Queues the used-ring entry of a finished request of the virtqueue in `slot`, whose
    /// buffers lie in `mem`; `mem` stays held until the entry is published.
    #[inline]
    pub(crate) fn finish(&self, slot: usize, done: Done, mem: &Rc<HeldMem>) {
        if let Some(list) = self.done.borrow_mut().get_mut(slot) {
            list.push(done);
            self.any_done.set(true);
            let mut held = self.unpublished_mem.borrow_mut();
            if held.last().is_none_or(|m| !Rc::ptr_eq(m, mem)) {
                held.push(mem.clone());
            }
        }
    }

    /// Every finished request was published: their memory tables may go.
    #[inline]
    pub(crate) fn all_published(&self) {
        self.unpublished_mem.borrow_mut().clear();
    }

    /// Whether any request finished since the last call.
    #[inline]
    pub(crate) fn take_any_done(&self) -> bool {
        self.any_done.replace(false)
    }

    /// Whether requests of the virtqueue in `slot` wait for their used-ring entries.
    #[inline]
    pub(crate) fn has_done(&self, slot: usize) -> bool {
        self.done
            .borrow()
            .get(slot)
            .is_some_and(|list| !list.is_empty())
    }

    /// Swaps the finished requests of the virtqueue in `slot` into `out` (an empty list,
    /// which takes their place); false when there are none.
    #[inline]
    pub(crate) fn take_done(&self, slot: usize, out: &mut Vec<Done>) -> bool {
        match self.done.borrow_mut().get_mut(slot) {
            Some(list) if !list.is_empty() => {
                std::mem::swap(list, out);
                true
            }
            _ => false,
        }
    }

    /// Logs a failed request, the first few at warning level, then only every 1000th.
    pub(crate) fn log_failure(&self, what: &str, detail: &dyn std::fmt::Display) {
        let n = self.failures.get() + 1;
        self.failures.set(n);
        if n <= LOGGED_FAILURES || n % 1000 == 0 {
            log::warn!(
                "vhost-user-blk export '{}': {what}: {detail}{}",
                self.cfg.id,
                if n == LOGGED_FAILURES {
                    " (further failures are logged only every 1000th)"
                } else {
                    ""
                }
            );
        }
    }
}
