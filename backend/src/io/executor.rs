//! A small single-threaded executor for block I/O tasks, driven by the thread's reactor.
//!
//! A device worker spawns one task per request, polls the ready ones after each batch of
//! events, and submits the queued io_uring entries once. Tasks may be woken from other threads
//! (a request waiting on another queue's overlapping write, librbd's completion callbacks);
//! such a wake writes the reactor's eventfd, which the worker's epoll already watches, only
//! when the owner thread sleeps or is about to ([`LocalExecutor::prepare_to_sleep`]), as
//! QEMU's `aio_notify` does with `notify_me`: a busy owner sees the wake when it next looks.

use std::future::Future;
use std::pin::pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering, Ordering::SeqCst};
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
    /// The owner blocks, or is about to, until its eventfd is written: a wake from another
    /// thread must write it. See [`LocalExecutor::prepare_to_sleep`].
    sleeping: AtomicBool,
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
        if thread_mark() == self.shared.owner {
            // The owner is running: it looks at `woken` before it sleeps.
            self.shared.woken.store(true, Ordering::Release);
            return;
        }
        // The other half of the handshake in `prepare_to_sleep` (Dekker's): this thread
        // stores `woken` then reads `sleeping`, the owner stores `sleeping` then reads
        // `woken`, all four SeqCst, so at least one of the two reads sees the other's store:
        // the owner does not sleep, or this thread writes the eventfd. A wake that finds
        // `woken` already set skips the write: whoever set it made sure the owner sees it
        // (by this same handshake), and the owner takes this slot with the same look at the
        // ready list.
        if self.shared.woken.swap(true, SeqCst) || !self.shared.sleeping.load(SeqCst) {
            return;
        }
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a local u64 to the owner's eventfd, which lives as long
        // as the owner thread's reactor; a write to a closed descriptor fails harmlessly.
        let _ = unsafe { libc::write(self.shared.eventfd, (&one as *const u64).cast(), 8) };
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
                sleeping: AtomicBool::new(false),
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

    /// Announces that the thread is about to block until the reactor's eventfd is written;
    /// from now on a wake from another thread writes it. Returns false, with the
    /// announcement taken back, when a task was woken meanwhile or completions wait
    /// ([`Reactor::ready_to_sleep`]): the caller reaps and runs the woken tasks
    /// ([`poll_completions`](Self::poll_completions)) instead of blocking. After true, the
    /// caller must block on the eventfd (doing nothing that may wake a task of this executor
    /// first) and call [`woke_up`](Self::woke_up) when it runs again.
    ///
    /// The announcement comes before the look at `woken` (both SeqCst; see `wake_by_ref`):
    /// a wake that this look misses reads the announcement and writes the eventfd.
    pub fn prepare_to_sleep(&self) -> bool {
        if !self.reactor.ready_to_sleep() {
            return false;
        }
        self.shared.sleeping.store(true, SeqCst);
        if self.shared.woken.load(SeqCst) {
            self.woke_up();
            return false;
        }
        true
    }

    /// Takes back [`prepare_to_sleep`](Self::prepare_to_sleep)'s announcement once the thread
    /// runs again: wakes from other threads leave the eventfd alone until the next one.
    /// Relaxed is enough: a wake that reads this store comes before the next announcement
    /// in the SeqCst order, so the owner's look after that one sees its `woken`.
    pub fn woke_up(&self) {
        self.shared.sleeping.store(false, Ordering::Relaxed);
    }

    /// Runs until every task finished, blocking the thread while waiting for I/O.
    pub fn run(&mut self) -> Result<()> {
        // The thread may have done anything since it last read the clock.
        accounting::clock::invalidate();
        self.poll()?;
        while !self.is_empty() {
            if self.reactor.reap() == 0 && self.prepare_to_sleep() {
                let waited = self.reactor.wait();
                self.woke_up();
                waited?;
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

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::future::poll_fn;
    use std::sync::mpsc;
    use std::time::Duration;

    use futures::channel::oneshot;

    use super::*;

    /// Runs `f` on a new thread (with a reactor of its own); fails if it does not finish
    /// within `limit`, as a thread that lost a wake-up sleeps forever.
    fn on_thread_within(limit: Duration, f: impl FnOnce() + Send + 'static) {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            f();
            let _ = tx.send(());
        });
        match rx.recv_timeout(limit) {
            Ok(()) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("hung: a wake-up was lost"),
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("the test thread failed"),
        }
    }

    /// The eventfd's counter, read (and so reset) without blocking.
    fn take_eventfd_count(fd: i32) -> u64 {
        let mut value: u64 = 0;
        // SAFETY: reads 8 bytes into a local u64 from the reactor's non-blocking eventfd.
        let n = unsafe { libc::read(fd, (&mut value as *mut u64).cast(), 8) };
        if n == 8 {
            value
        } else {
            let e = std::io::Error::last_os_error();
            assert_eq!(
                e.kind(),
                std::io::ErrorKind::WouldBlock,
                "eventfd read: {e}"
            );
            0
        }
    }

    /// Spins for about `n` short pauses.
    fn spin(n: u32) {
        for _ in 0..n {
            std::hint::spin_loop();
        }
    }

    /// xorshift32: the test's delays, the same in every run.
    fn next(seed: &mut u32) -> u32 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 17;
        *seed ^= *seed << 5;
        *seed
    }

    /// The owner sleeps as a vhost worker does: it runs its tasks, stays busy for a while
    /// (a busy-poll), announces its sleep and blocks on the eventfd; another thread wakes its
    /// task at a moment that lands while it runs, while it is busy (no eventfd written then),
    /// around the announcement, or while it sleeps. Every round ends: no wake is lost. A wake
    /// while the owner is busy is lost unless the announcement looks at `woken` again.
    #[test]
    fn cross_thread_wakes_never_leave_a_task_asleep() {
        const ROUNDS: usize = 10_000;
        on_thread_within(Duration::from_secs(60), || {
            let (to_waker, rounds) = mpsc::channel::<(oneshot::Sender<()>, Arc<AtomicBool>)>();
            let waker = std::thread::spawn(move || {
                let mut seed = 0x2545_f491_u32;
                for (sender, waiting) in rounds {
                    // The task waits with its waker registered: the send is a real wake.
                    while !waiting.load(Ordering::Acquire) {
                        std::hint::spin_loop();
                    }
                    spin(next(&mut seed) % 2048);
                    sender.send(()).expect("the task waits");
                }
            });
            let mut seed = 0x9e37_79b9_u32;
            for _ in 0..ROUNDS {
                let mut exec = LocalExecutor::new().expect("executor");
                let waiting = Arc::new(AtomicBool::new(false));
                let done = Rc::new(Cell::new(false));
                let (tx, rx) = oneshot::channel::<()>();
                {
                    let waiting = waiting.clone();
                    let done = done.clone();
                    exec.spawn(async move {
                        let mut rx = pin!(rx);
                        poll_fn(|cx| {
                            let r = rx.as_mut().poll(cx);
                            waiting.store(true, Ordering::Release);
                            r
                        })
                        .await
                        .expect("sent");
                        done.set(true);
                    });
                }
                to_waker.send((tx, waiting)).expect("waker thread");
                loop {
                    exec.poll().expect("poll");
                    if done.get() {
                        break;
                    }
                    spin(next(&mut seed) % 2048);
                    if exec.prepare_to_sleep() {
                        exec.reactor().wait().expect("wait");
                        exec.woke_up();
                    }
                }
            }
            drop(to_waker);
            waker.join().expect("waker thread");
        });
    }

    /// A wake from another thread writes the owner's eventfd only after the owner announced
    /// its sleep, once however many wakes come before it runs again; and an announcement
    /// made after such a wake is refused (the owner runs the task instead of sleeping).
    #[test]
    fn a_cross_thread_wake_writes_the_eventfd_only_while_the_owner_sleeps() {
        on_thread_within(Duration::from_secs(30), || {
            let mut exec = LocalExecutor::new().expect("executor");
            let fd = exec.reactor().eventfd();
            let stash = Arc::new(Mutex::new(None::<Waker>));
            let polls = Rc::new(Cell::new(0));
            {
                let stash = stash.clone();
                let polls = polls.clone();
                exec.spawn(poll_fn(move |cx| {
                    polls.set(polls.get() + 1);
                    *stash.lock().expect("stash") = Some(cx.waker().clone());
                    Poll::<()>::Pending
                }));
            }
            exec.poll().expect("poll");
            let wake_elsewhere = || {
                let waker = stash.lock().expect("stash").clone().expect("waker");
                std::thread::spawn(move || waker.wake())
                    .join()
                    .expect("waking thread");
            };
            let _ = take_eventfd_count(fd);

            wake_elsewhere();
            assert_eq!(take_eventfd_count(fd), 0, "the owner is awake: no write");
            assert!(!exec.prepare_to_sleep(), "woken: the owner must not sleep");
            exec.poll().expect("poll");
            assert_eq!(polls.get(), 2, "the woken task ran");

            assert!(
                exec.prepare_to_sleep(),
                "nothing woken: the owner may sleep"
            );
            wake_elsewhere();
            wake_elsewhere();
            assert_eq!(
                take_eventfd_count(fd),
                1,
                "the owner sleeps: one write for the wakes until it runs"
            );
            exec.woke_up();
            exec.poll().expect("poll");
            assert_eq!(polls.get(), 3, "the woken task ran once");

            exec.woke_up();
            wake_elsewhere();
            assert_eq!(take_eventfd_count(fd), 0, "awake again: no write");
        });
    }
}
