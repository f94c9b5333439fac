//! The per-thread io_uring reactor.
//!
//! Each thread that does block I/O owns one ring, created on first use. Request futures push
//! submission entries without entering the kernel; the thread's loop calls [`Reactor::submit`]
//! once for everything queued, and [`Reactor::reap`] when the completion eventfd fires.
//! The eventfd is registered with the ring, so an epoll loop can wait on it together with
//! its other file descriptors; wakers on other threads write to it as well.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use io_uring::register::Restriction;
use io_uring::{opcode, squeue, IoUring};
use slab::Slab;

use crate::accounting;
use crate::error::{BlockError, Result};

/// Ring size: submission queue entries per thread.
const RING_ENTRIES: u32 = 512;

/// The only operations a ring accepts: what the drivers submit (IORING_REGISTER_RESTRICTIONS).
/// Anything else (opening files, sockets, ...) fails with EACCES, so neither a bug nor an
/// attacker who reached a ring can use it to do more than these. Timeout (null-co's
/// `latency-ns`) touches no file.
const ALLOWED_OPS: [u8; 7] = [
    opcode::Read::CODE,
    opcode::Write::CODE,
    opcode::Readv::CODE,
    opcode::Writev::CODE,
    opcode::Fsync::CODE,
    opcode::Fallocate::CODE,
    opcode::Timeout::CODE,
];

/// A ring, created disabled (so restrictions can be registered) when the kernel allows it;
/// also whether it was.
fn build_ring() -> Result<(IoUring, bool)> {
    // Cooperative task running: a completion does not interrupt this thread with an IPI
    // (costly in a VM, and a busy-polling worker is always running); the kernel sets
    // IORING_SQ_TASKRUN instead, and the completion is posted at the thread's next system
    // call, which `reap` makes when the flag is set. A sleeping thread is still woken.
    // Kernels before 5.19 lack it, before 5.10 restrictions: fewer features then.
    let attempts: [(bool, bool); 3] = [(true, true), (false, true), (false, false)];
    let mut last = None;
    for (coop, disabled) in attempts {
        let mut builder = IoUring::builder();
        if coop {
            builder.setup_coop_taskrun().setup_taskrun_flag();
        }
        if disabled {
            builder.setup_r_disabled();
        }
        match builder.build(RING_ENTRIES) {
            Ok(ring) => return Ok((ring, disabled)),
            Err(e) => last = Some(e),
        }
    }
    let e = last.unwrap_or_else(|| io::Error::from_raw_os_error(libc::ENOSYS));
    Err(BlockError::io(&e, "Could not create an io_uring"))
}

/// Limits a disabled ring to [`ALLOWED_OPS`] and enables it.
fn restrict(ring: &IoUring) -> Result<()> {
    let submitter = ring.submitter();
    let mut allowed = ALLOWED_OPS.map(Restriction::sqe_op);
    if let Err(e) = submitter.register_restrictions(&mut allowed) {
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            log::warn!("io_uring restrictions are not available ({e}); rings accept any operation")
        });
    }
    submitter
        .register_enable_rings()
        .map_err(|e| BlockError::io(&e, "Could not enable the io_uring"))
}

enum OpState {
    /// Queued or in the kernel; the waker is the task to wake on completion.
    Pending(Option<Waker>),
    /// Completed with this result (bytes or negative errno).
    Done(i32),
}

/// One thread's io_uring, its completion eventfd and its in-flight operations.
pub struct Reactor {
    ring: RefCell<IoUring>,
    ops: RefCell<Slab<OpState>>,
    queued: Cell<u32>,
    eventfd: OwnedFd,
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<Reactor>>> = const { RefCell::new(None) };
}

impl Reactor {
    /// The calling thread's reactor, created on first use.
    pub fn current() -> Result<Rc<Reactor>> {
        CURRENT.with(|cur| {
            let mut cur = cur.borrow_mut();
            if let Some(r) = cur.as_ref() {
                return Ok(r.clone());
            }
            let r = Rc::new(Reactor::new()?);
            *cur = Some(r.clone());
            Ok(r)
        })
    }

    fn new() -> Result<Self> {
        let (ring, restrictable) = build_ring()?;
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(BlockError::last_os_error("Could not create an eventfd"));
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(fd) };
        ring.submitter()
            .register_eventfd(fd)
            .map_err(|e| BlockError::io(&e, "Could not register the io_uring eventfd"))?;
        if restrictable {
            restrict(&ring)?;
        }
        Ok(Self {
            ring: RefCell::new(ring),
            ops: RefCell::new(Slab::with_capacity(RING_ENTRIES as usize)),
            queued: Cell::new(0),
            eventfd,
        })
    }

    /// The eventfd that becomes readable when completions arrive or a task is woken from
    /// another thread. Put it in the thread's epoll set.
    pub fn eventfd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    /// Number of operations queued or in the kernel.
    pub fn in_flight(&self) -> usize {
        self.ops.borrow().len()
    }

    /// Submits everything queued since the last call, in one system call.
    pub fn submit(&self) -> Result<()> {
        if self.queued.get() == 0 {
            return Ok(());
        }
        self.queued.set(0);
        self.ring
            .borrow()
            .submit()
            .map(|_| ())
            .map_err(|e| BlockError::io(&e, "io_uring submit failed"))
    }

    /// Delivers completions to their operations and wakes their tasks. Returns how many.
    pub fn reap(&self) -> usize {
        let mut wakers = Vec::new();
        {
            let mut ring = self.ring.borrow_mut();
            let mut ops = self.ops.borrow_mut();
            if ring.submission().taskrun() {
                // Completions wait as task work (cooperative task running): enter the kernel
                // to have them posted. submit() adds GETEVENTS when the flag is set.
                self.queued.set(0);
                if let Err(e) = ring.submit() {
                    log::error!("io_uring enter to run completion task work failed: {e}");
                }
            }
            loop {
                for cqe in ring.completion() {
                    let key = cqe.user_data() as usize;
                    if let Some(state) = ops.get_mut(key) {
                        if let OpState::Pending(waker) =
                            std::mem::replace(state, OpState::Done(cqe.result()))
                        {
                            wakers.extend(waker);
                        }
                    }
                }
                // Completions that did not fit in the completion queue wait in the kernel
                // (IORING_FEAT_NODROP) until an io_uring_enter with GETEVENTS moves them in;
                // submit() makes that call when the overflow flag is set. Without it, they would
                // never arrive: the eventfd already fired for them.
                if !ring.submission().cq_overflow() {
                    break;
                }
                self.queued.set(0);
                if let Err(e) = ring.submit() {
                    log::error!("io_uring enter to flush overflowed completions failed: {e}");
                    break;
                }
            }
        }
        let n = wakers.len();
        if n > 0 {
            // Time passed for the requests that completed: they read the clock again.
            accounting::clock::invalidate();
        }
        // Wake after releasing the borrows: a waker may poll code that queues new operations.
        for w in wakers {
            w.wake();
        }
        n
    }

    /// Blocks until the eventfd fires (a completion or a cross-thread wake), then clears it.
    pub fn wait(&self) -> Result<()> {
        self.submit()?;
        let mut pfd = libc::pollfd {
            fd: self.eventfd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: pfd is a valid pollfd for the duration of the call.
            let r = unsafe { libc::poll(&mut pfd, 1, -1) };
            if r >= 0 {
                break;
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(BlockError::io(&err, "poll on the io_uring eventfd failed"));
            }
        }
        self.clear_eventfd();
        accounting::clock::invalidate();
        Ok(())
    }

    /// Resets the eventfd counter after it fired.
    pub fn clear_eventfd(&self) {
        let mut value: u64 = 0;
        // SAFETY: reads 8 bytes into a local u64 from our own non-blocking eventfd.
        let _ = unsafe { libc::read(self.eventfd(), (&mut value as *mut u64).cast(), 8) };
    }

    /// Queues an operation; the returned future resolves to its result.
    ///
    /// # Safety
    /// Every buffer and iovec array the entry points at must stay valid until the future
    /// completes or is dropped (a drop waits for the kernel to finish with it).
    pub unsafe fn op<'a>(self: &Rc<Self>, entry: squeue::Entry) -> UringOp<'a> {
        UringOp {
            reactor: self.clone(),
            entry: Some(entry),
            key: None,
            _borrows: PhantomData,
        }
    }

    fn push(&self, entry: squeue::Entry, waker: Waker) -> Result<usize> {
        let key = self.ops.borrow_mut().insert(OpState::Pending(Some(waker)));
        let entry = entry.user_data(key as u64);
        let mut ring = self.ring.borrow_mut();
        loop {
            // SAFETY: the caller of `op` promised the entry's buffers outlive the operation.
            if unsafe { ring.submission().push(&entry) }.is_ok() {
                break;
            }
            // Submission queue full: hand the queued entries to the kernel and retry.
            if let Err(e) = ring.submit() {
                self.ops.borrow_mut().remove(key);
                return Err(BlockError::io(&e, "io_uring submit failed"));
            }
            self.queued.set(0);
        }
        self.queued.set(self.queued.get() + 1);
        Ok(key)
    }

    /// Waits, blocking the thread, until operation `key` completed.
    fn wait_for(&self, key: usize) {
        loop {
            if matches!(self.ops.borrow().get(key), Some(OpState::Done(_)) | None) {
                return;
            }
            let waited = {
                let ring = self.ring.borrow();
                self.queued.set(0);
                ring.submit_and_wait(1)
            };
            if let Err(e) = waited {
                if e.kind() != io::ErrorKind::Interrupted {
                    log::error!("io_uring wait failed while dropping an operation: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
            self.reap();
        }
    }
}

/// A queued io_uring operation; resolves to the kernel's result (bytes, or negative errno).
pub struct UringOp<'a> {
    reactor: Rc<Reactor>,
    entry: Option<squeue::Entry>,
    key: Option<usize>,
    _borrows: PhantomData<&'a mut [u8]>,
}

impl Future for UringOp<'_> {
    type Output = Result<i32>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let Some(key) = this.key else {
            let Some(entry) = this.entry.take() else {
                return Poll::Ready(Err(BlockError::invalid(
                    "io_uring operation polled after completion",
                )));
            };
            this.key = Some(this.reactor.push(entry, cx.waker().clone())?);
            return Poll::Pending;
        };
        let mut ops = this.reactor.ops.borrow_mut();
        match ops.get_mut(key) {
            Some(OpState::Done(res)) => {
                let res = *res;
                ops.remove(key);
                this.key = None;
                Poll::Ready(Ok(res))
            }
            Some(OpState::Pending(waker)) => {
                if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            None => Poll::Ready(Err(BlockError::invalid("io_uring operation lost"))),
        }
    }
}

impl Drop for UringOp<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            // The kernel may still write into the borrowed buffers: wait for it.
            self.reactor.wait_for(key);
            self.reactor.ops.borrow_mut().try_remove(key);
        }
    }
}

/// Converts an io_uring result into bytes transferred or an error with context.
pub fn check(res: i32, what: impl FnOnce() -> String) -> Result<usize> {
    if res < 0 {
        Err(BlockError::from_errno(-res, what()))
    } else {
        Ok(res as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::executor::block_on;

    #[test]
    fn a_ring_refuses_operations_the_drivers_do_not_use() {
        let reactor = Reactor::current().expect("reactor");
        // SAFETY: a no-op and an fsync of stdin reference no memory.
        let nop = block_on(unsafe { reactor.op(opcode::Nop::new().build()) })
            .expect("executor")
            .expect("submitted");
        assert_eq!(
            nop,
            -libc::EACCES,
            "a NOP is not among the allowed operations"
        );
        let file = tempfile::tempfile().expect("temp file");
        let fd = io_uring::types::Fd(std::os::fd::AsRawFd::as_raw_fd(&file));
        // SAFETY: as above; the file outlives the operation.
        let fsync = block_on(unsafe { reactor.op(opcode::Fsync::new(fd).build()) })
            .expect("executor")
            .expect("submitted");
        assert_eq!(fsync, 0, "an allowed operation still works");
    }
}
