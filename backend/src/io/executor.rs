//! A small single-threaded executor for block I/O tasks, driven by the thread's reactor.
//!
//! A device worker spawns one task per request, polls the ready ones after each batch of
//! events, and submits the queued io_uring entries once. Tasks may be woken from other threads
//! (a request waiting on another queue's overlapping write); such wakes write the reactor's
//! eventfd, which the worker's epoll already watches.

use std::future::Future;
use std::pin::pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use super::reactor::Reactor;
use super::task_cell::TaskCell;
use crate::accounting;
use crate::error::Result;

thread_local! {
    /// Its address identifies the thread (cheaper than `thread::current().id()`, which
    /// clones an Arc, on every wake). A later thread may get the address of one that ended,
    /// but an executor never outlives its thread (it is not Send), so no live executor is
    /// mistaken for another thread's.
    static THREAD_MARK: u8 = const { 0 };
}

fn thread_mark() -> usize {
    THREAD_MARK.with(|m| m as *const u8 as usize)
}

/// What the wakers of one executor share with it.
struct Shared {
    /// Slots of the tasks woken since the executor last looked.
    ready: Mutex<Vec<usize>>,
    /// Some task was woken (saves taking the lock when none was).
    woken: AtomicBool,
    /// The executor's thread (see [`thread_mark`]).
    owner: usize,
    eventfd: i32,
}

/// The waker of one task slot; made once per slot and reused by every task that occupies it.
/// A wake meant for an earlier task of the slot polls the current one once for nothing, which
/// futures allow.
struct SlotWaker {
    slot: usize,
    /// Already in the ready list.
    queued: AtomicBool,
    shared: Arc<Shared>,
}

impl Wake for SlotWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            let mut ready = self.shared.ready.lock().unwrap_or_else(|p| p.into_inner());
            ready.push(self.slot);
        }
        self.shared.woken.store(true, Ordering::Release);
        if thread_mark() != self.shared.owner {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a local u64 to the owner's eventfd, which lives as long
            // as the owner thread's reactor; a write to a closed descriptor fails harmlessly.
            let _ = unsafe { libc::write(self.shared.eventfd, (&one as *const u64).cast(), 8) };
        }
    }
}

/// One task slot: the task (none when free), in memory the slot keeps, and the slot's waker.
struct Slot<'a> {
    task: TaskCell<'a>,
    waker: Arc<SlotWaker>,
    /// `waker` as a Waker, made once: polling with it touches no reference count.
    handle: Waker,
}

/// A set of tasks on the current thread.
///
/// Tasks live in slots that are reused, each with a waker made once and memory that the next
/// task of the slot reuses, so spawning a task allocates nothing once the slots are made.
pub struct LocalExecutor<'a> {
    slots: Vec<Slot<'a>>,
    free: Vec<usize>,
    live: usize,
    /// Slots to poll now (swapped with the shared ready list).
    run: Vec<usize>,
    /// Slots of tasks spawned since the last poll: queued without the shared list's lock.
    spawned: Vec<usize>,
    shared: Arc<Shared>,
    reactor: Rc<Reactor>,
}

impl<'a> LocalExecutor<'a> {
    /// An executor bound to the calling thread's reactor.
    pub fn new() -> Result<Self> {
        Ok(Self::with_reactor(Reactor::current()?))
    }

    /// An executor for a thread that runs an event loop on the reactor's eventfd
    /// ([`Reactor::current_in_event_loop`]).
    pub fn in_event_loop() -> Result<Self> {
        Ok(Self::with_reactor(Reactor::current_in_event_loop()?))
    }

    fn with_reactor(reactor: Rc<Reactor>) -> Self {
        Self {
            slots: Vec::new(),
            free: Vec::new(),
            live: 0,
            run: Vec::new(),
            spawned: Vec::new(),
            shared: Arc::new(Shared {
                ready: Mutex::new(Vec::new()),
                woken: AtomicBool::new(false),
                owner: thread_mark(),
                eventfd: reactor.eventfd(),
            }),
            reactor,
        }
    }

    /// The thread's reactor.
    pub fn reactor(&self) -> &Rc<Reactor> {
        &self.reactor
    }

    /// Adds a task; it first runs at the next [`poll`](Self::poll).
    #[inline]
    pub fn spawn(&mut self, task: impl Future<Output = ()> + 'a) {
        self.spawn_with(|| task);
    }

    /// Adds the task `make` returns, built in the memory it runs in (a task built by the
    /// caller is copied there); it first runs at the next [`poll`](Self::poll).
    #[inline]
    pub fn spawn_with<F: Future<Output = ()> + 'a>(&mut self, make: impl FnOnce() -> F) {
        let slot = match self.free.pop() {
            Some(i) => i,
            None => {
                let i = self.slots.len();
                let waker = Arc::new(SlotWaker {
                    slot: i,
                    queued: AtomicBool::new(false),
                    shared: self.shared.clone(),
                });
                self.slots.push(Slot {
                    task: TaskCell::new(),
                    handle: Waker::from(waker.clone()),
                    waker,
                });
                i
            }
        };
        let s = &mut self.slots[slot];
        s.task.put(make);
        self.live += 1;
        // A new task is polled once without a wake. It goes on the executor's own list: the
        // shared one's lock and atomics would each wait for the caller's pending stores (on the
        // hot path, used-ring entries still on their way to the driver's CPU).
        s.waker.queued.store(true, Ordering::Release);
        self.spawned.push(slot);
    }

    /// Number of unfinished tasks.
    pub fn len(&self) -> usize {
        self.live
    }

    /// Whether no task is left.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Polls the woken tasks until none is left woken; true if any task was polled.
    fn run_ready(&mut self) -> bool {
        let mut any = false;
        loop {
            std::mem::swap(&mut self.spawned, &mut self.run);
            // Looked at before the swap, which is an atomic write, when nothing was woken.
            if self.shared.woken.load(Ordering::Acquire)
                && self.shared.woken.swap(false, Ordering::AcqRel)
            {
                let mut ready = self.shared.ready.lock().unwrap_or_else(|p| p.into_inner());
                self.run.append(&mut ready);
                // Woken from another thread: time passed for them.
                accounting::clock::invalidate();
            }
            if self.run.is_empty() {
                break;
            }
            for i in 0..self.run.len() {
                let slot = self.run[i];
                let Some(s) = self.slots.get_mut(slot) else {
                    continue;
                };
                // Cleared before the poll, so a wake during it queues the slot again.
                s.waker.queued.store(false, Ordering::Release);
                if !s.task.is_occupied() {
                    continue;
                }
                any = true;
                if s.task.poll(&mut Context::from_waker(&s.handle)).is_ready() {
                    // Dropped here, outside any borrow of the executor's lists.
                    s.task.clear();
                    self.free.push(slot);
                    self.live -= 1;
                }
            }
            self.run.clear();
        }
        any
    }

    /// Runs every task that can make progress, then submits their I/O in one system call.
    pub fn poll(&mut self) -> Result<()> {
        self.run_ready();
        self.reactor.submit()
    }

    /// Handles a readable eventfd: delivers completions and runs the woken tasks.
    pub fn on_eventfd(&mut self) -> Result<()> {
        self.reactor.clear_eventfd();
        self.reactor.reap();
        self.poll()
    }

    /// Delivers the completions already in the completion queue, without reading the eventfd
    /// (for a caller that polls), and runs the woken tasks. Returns how many completions.
    pub fn poll_completions(&mut self) -> Result<usize> {
        let n = self.reactor.reap();
        if n > 0 || self.shared.woken.load(Ordering::Acquire) {
            self.poll()?;
        }
        Ok(n)
    }

    /// Runs until every task finished, blocking the thread while waiting for I/O.
    pub fn run(&mut self) -> Result<()> {
        // The thread may have done anything since it last read the clock.
        accounting::clock::invalidate();
        self.poll()?;
        while !self.is_empty() {
            if self.reactor.reap() == 0 && !self.shared.woken.load(Ordering::Acquire) {
                self.reactor.wait()?;
                self.reactor.reap();
            }
            self.poll()?;
        }
        Ok(())
    }
}

/// Runs one future to completion on the calling thread (for opening, management and tests).
pub fn block_on<F: Future>(future: F) -> Result<F::Output> {
    let mut output = None;
    {
        let mut exec = LocalExecutor::new()?;
        let slot = &mut output;
        exec.spawn(async move {
            *slot = Some(future.await);
        });
        exec.run()?;
    }
    Ok(output.expect("run() returns only when every task finished"))
}

/// Pins and polls a future once, without a reactor; for code that knows it completes at once.
pub fn now_or_never<F: Future>(future: F) -> Option<F::Output> {
    let fut = pin!(future);
    let waker = Waker::noop();
    match fut.poll(&mut Context::from_waker(waker)) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}
