//! A small single-threaded executor for block I/O tasks, driven by the thread's reactor.
//!
//! A device worker spawns one task per request, polls the ready ones after each batch of
//! events, and submits the queued io_uring entries once. Tasks may be woken from other threads
//! (a request waiting on another queue's overlapping write); such wakes write the reactor's
//! eventfd, which the worker's epoll already watches.

use std::future::Future;
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, ThreadId};

use futures::stream::{FuturesUnordered, StreamExt};

use super::reactor::Reactor;
use crate::error::Result;

/// Wakes a thread's loop: sets a flag, and from another thread also writes the eventfd.
struct LoopWaker {
    woken: AtomicBool,
    owner: ThreadId,
    eventfd: i32,
}

impl Wake for LoopWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        if thread::current().id() != self.owner {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a local u64 to the owner's eventfd, which lives as long
            // as the owner thread's reactor; a write to a closed descriptor fails harmlessly.
            let _ = unsafe { libc::write(self.eventfd, (&one as *const u64).cast(), 8) };
        }
    }
}

/// A set of tasks on the current thread.
pub struct LocalExecutor<'a> {
    tasks: FuturesUnordered<Pin<Box<dyn Future<Output = ()> + 'a>>>,
    waker: Arc<LoopWaker>,
    reactor: Rc<Reactor>,
}

impl<'a> LocalExecutor<'a> {
    /// An executor bound to the calling thread's reactor.
    pub fn new() -> Result<Self> {
        let reactor = Reactor::current()?;
        Ok(Self {
            tasks: FuturesUnordered::new(),
            waker: Arc::new(LoopWaker {
                woken: AtomicBool::new(false),
                owner: thread::current().id(),
                eventfd: reactor.eventfd(),
            }),
            reactor,
        })
    }

    /// The thread's reactor.
    pub fn reactor(&self) -> &Rc<Reactor> {
        &self.reactor
    }

    /// Adds a task; it first runs at the next [`poll`](Self::poll).
    pub fn spawn(&mut self, task: impl Future<Output = ()> + 'a) {
        self.tasks.push(Box::pin(task));
    }

    /// Number of unfinished tasks.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Whether no task is left.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Runs every task that can make progress, then submits their I/O in one system call.
    pub fn poll(&mut self) -> Result<()> {
        let waker = Waker::from(self.waker.clone());
        let mut cx = Context::from_waker(&waker);
        loop {
            self.waker.woken.store(false, Ordering::Release);
            while let Poll::Ready(Some(())) = self.tasks.poll_next_unpin(&mut cx) {}
            if !self.waker.woken.load(Ordering::Acquire) || self.tasks.is_empty() {
                break;
            }
        }
        self.reactor.submit()
    }

    /// Handles a readable eventfd: delivers completions and runs the woken tasks.
    pub fn on_eventfd(&mut self) -> Result<()> {
        self.reactor.clear_eventfd();
        self.reactor.reap();
        self.poll()
    }

    /// Runs until every task finished, blocking the thread while waiting for I/O.
    pub fn run(&mut self) -> Result<()> {
        self.poll()?;
        while !self.tasks.is_empty() {
            if self.reactor.reap() == 0 && !self.waker.woken.load(Ordering::Acquire) {
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
