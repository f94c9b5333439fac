//! The per-thread io_uring reactor.
//!
//! Each thread that does block I/O owns one ring, created on first use. Request futures push
//! submission entries without entering the kernel; the thread's loop calls [`Reactor::submit`]
//! once for everything queued, and [`Reactor::reap`] when the completion eventfd fires.
//! The eventfd is registered with the ring, so an epoll loop can wait on it together with
//! its other file descriptors; wakers on other threads write to it as well while the thread
//! sleeps (see [`LocalExecutor::prepare_to_sleep`](super::executor::LocalExecutor::prepare_to_sleep)).

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

/// How a ring is set up: the first that the kernel accepts, from [`RingSetup::EVENT_LOOP`] or
/// [`RingSetup::OTHER`] down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingSetup {
    /// Single issuer with deferred task running (Linux 6.1+), restricted. Completions wait
    /// on the ring until its thread enters the kernel with GETEVENTS, which
    /// [`Reactor::reap`] does when IORING_SQ_TASKRUN says some wait; no task work interrupts
    /// the thread, and the kernel skips the locking a shared ring needs. The eventfd fires
    /// for the first work that waits and for posted completions, so a sleeping thread
    /// wakes; for work an enter leaves behind, the reactor fires it itself
    /// (`wake_self_if_work_is_left`).
    ///
    /// Only for a thread whose event loop reaps whenever the eventfd fires
    /// ([`Reactor::current_in_event_loop`]): the kernel also frees finished requests as
    /// deferred work, so a request's file (and the image locks its open file description
    /// holds) stays referenced until the thread next enters the ring. A thread that ran a
    /// `block_on` and went on to other things would keep a closed image locked.
    DeferTaskrun,
    /// Cooperative task running (5.19+), restricted: a completion does not interrupt the
    /// thread with an IPI (costly in a VM, and a busy-polling worker is always running); it
    /// is posted at the thread's next system call, which `reap` makes when the flag is set.
    CoopTaskrun,
    /// Restricted (5.10+): created disabled so that the operations can be limited.
    Restricted,
    /// None of the above.
    Plain,
}

impl RingSetup {
    /// The setup tried first for a thread that runs an event loop on the eventfd.
    pub const EVENT_LOOP: RingSetup = RingSetup::DeferTaskrun;

    /// The setup tried first for any other thread.
    pub const OTHER: RingSetup = RingSetup::CoopTaskrun;

    /// The next setup to try when the kernel refuses this one.
    fn fallback(self) -> Option<RingSetup> {
        match self {
            RingSetup::DeferTaskrun => Some(RingSetup::CoopTaskrun),
            RingSetup::CoopTaskrun => Some(RingSetup::Restricted),
            RingSetup::Restricted => Some(RingSetup::Plain),
            RingSetup::Plain => None,
        }
    }

    fn builder(self) -> io_uring::Builder {
        let mut builder = IoUring::builder();
        match self {
            // The ring is used by the thread that creates it only (it is thread-local, and
            // SINGLE_ISSUER binds it to the thread that enables it, the same one here).
            RingSetup::DeferTaskrun => {
                builder
                    .setup_single_issuer()
                    .setup_defer_taskrun()
                    .setup_taskrun_flag();
            }
            RingSetup::CoopTaskrun => {
                builder.setup_coop_taskrun().setup_taskrun_flag();
            }
            RingSetup::Restricted | RingSetup::Plain => {}
        }
        if self != RingSetup::Plain {
            builder.setup_r_disabled();
        }
        builder
    }
}

/// A ring with the first setup from `first` down that the kernel accepts (created disabled,
/// so restrictions can be registered, unless [`RingSetup::Plain`]), and that setup.
fn build_ring(first: RingSetup) -> Result<(IoUring, RingSetup)> {
    let mut setup = Some(first);
    let mut last = None;
    while let Some(s) = setup {
        match s.builder().build(RING_ENTRIES) {
            Ok(ring) => return Ok((ring, s)),
            Err(e) => last = Some(e),
        }
        setup = s.fallback();
    }
    let e = last.unwrap_or_else(|| io::Error::from_raw_os_error(libc::ENOSYS));
    Err(BlockError::io(&e, "Could not create an io_uring"))
}

/// Whether completions wait in the kernel for an io_uring_enter with GETEVENTS.
fn waiting_in_kernel(ring: &mut IoUring) -> bool {
    let sq = ring.submission();
    sq.taskrun() || sq.cq_overflow()
}

/// Whether the ring reports completions or task work waiting for its thread: poll(2) on the
/// ring's descriptor, which the kernel answers from its own lists, so it is exact where
/// IORING_SQ_TASKRUN is only a hint (the flag can stay set with nothing behind it).
fn ring_has_work(ring: &IoUring) -> bool {
    let mut pfd = libc::pollfd {
        fd: ring.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: pfd is a valid pollfd for the duration of the call; timeout 0 never blocks.
        let r = unsafe { libc::poll(&mut pfd, 1, 0) };
        if r >= 0 {
            return r > 0 && pfd.revents & libc::POLLIN != 0;
        }
        if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            // Unknown: answer yes, which costs a wake-up, rather than risk a lost one.
            return true;
        }
    }
}

/// Limits a disabled ring to [`ALLOWED_OPS`] without submission flags, except
/// `allowed_sqe_flags` (none outside tests), and enables it.
fn restrict(ring: &IoUring, allowed_sqe_flags: u8) -> Result<()> {
    let submitter = ring.submitter();
    let mut allowed: Vec<Restriction> = ALLOWED_OPS.map(Restriction::sqe_op).into();
    if allowed_sqe_flags != 0 {
        allowed.push(Restriction::sqe_flags_allowed(allowed_sqe_flags));
    }
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
    /// Completions were taken since the eventfd was last cleared. Posting them wrote the
    /// eventfd again (the kernel writes it for every batch of completions it posts, also
    /// those it posts in this thread's own `io_uring_enter`), with nothing left to wake for.
    posted: Cell<bool>,
    eventfd: OwnedFd,
    setup: RingSetup,
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<Reactor>>> = const { RefCell::new(None) };
}

impl Reactor {
    /// The calling thread's reactor, created on first use.
    pub fn current() -> Result<Rc<Reactor>> {
        Self::current_or_new(RingSetup::OTHER)
    }

    /// The calling thread's reactor, created on first use with the setup for a thread whose
    /// event loop watches the eventfd and reaps whenever it fires, as long as the thread
    /// lives ([`RingSetup::EVENT_LOOP`]). A reactor the thread already has is kept.
    pub fn current_in_event_loop() -> Result<Rc<Reactor>> {
        Self::current_or_new(RingSetup::EVENT_LOOP)
    }

    fn current_or_new(first: RingSetup) -> Result<Rc<Reactor>> {
        CURRENT.with(|cur| {
            let mut cur = cur.borrow_mut();
            if let Some(r) = cur.as_ref() {
                return Ok(r.clone());
            }
            let r = Rc::new(Reactor::new(first, 0)?);
            *cur = Some(r.clone());
            Ok(r)
        })
    }

    /// Makes a reactor whose ring has the first setup from `first` down that the kernel
    /// accepts, and makes it the calling thread's (for tests of the older kernels' setups).
    #[cfg(test)]
    fn install(first: RingSetup) -> Result<Rc<Reactor>> {
        Self::install_with_sqe_flags(first, 0)
    }

    /// [`Self::install`], with a restricted ring that accepts `allowed_sqe_flags` too.
    #[cfg(test)]
    fn install_with_sqe_flags(first: RingSetup, allowed_sqe_flags: u8) -> Result<Rc<Reactor>> {
        let r = Rc::new(Reactor::new(first, allowed_sqe_flags)?);
        CURRENT.with(|cur| *cur.borrow_mut() = Some(r.clone()));
        Ok(r)
    }

    fn new(first: RingSetup, allowed_sqe_flags: u8) -> Result<Self> {
        let (ring, setup) = build_ring(first)?;
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
        if setup != RingSetup::Plain {
            restrict(&ring, allowed_sqe_flags)?;
        }
        Ok(Self {
            ring: RefCell::new(ring),
            ops: RefCell::new(Slab::with_capacity(RING_ENTRIES as usize)),
            queued: Cell::new(0),
            posted: Cell::new(false),
            eventfd,
            setup,
        })
    }

    /// How this thread's ring is set up.
    pub fn setup(&self) -> RingSetup {
        self.setup
    }

    /// The eventfd that becomes readable when completions arrive or a task is woken from
    /// another thread while this one sleeps. Put it in the thread's epoll set.
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
        let mut ring = self.ring.borrow_mut();
        // The enter runs deferred task work only when one of these flags is set (it carries
        // GETEVENTS then). Without them, work queued from now on writes the eventfd itself,
        // as it did when a fast device completed a request during this very enter.
        let may_run_work = waiting_in_kernel(&mut ring);
        ring.submit()
            .map_err(|e| BlockError::io(&e, "io_uring submit failed"))?;
        if may_run_work {
            self.wake_self_if_work_is_left(&mut ring);
        }
        Ok(())
    }

    /// After an enter that may have run deferred task work: makes the thread's next wait
    /// return at once if the enter left some of that work waiting with no completion posted.
    ///
    /// With deferred task running the eventfd fires when work is queued on an empty list and
    /// when completions are posted. One enter runs a limited batch of the work and leaves
    /// the rest (IORING_SQ_TASKRUN set again); a batch of work that posts nothing (a request
    /// the kernel re-issues) then leaves the rest with no wake-up to come, and a thread that
    /// sleeps on its eventfd would never run it. Completions in the queue are not at risk:
    /// posting them fired the eventfd, which is cleared only right before a reap, or before a
    /// sleep that looks at the queue after the clear ([`Self::ready_to_sleep`]).
    fn wake_self_if_work_is_left(&self, ring: &mut IoUring) {
        if waiting_in_kernel(ring) && ring.completion().is_empty() && ring_has_work(ring) {
            self.signal_eventfd();
        }
    }

    /// Makes the eventfd readable, as a completion or a cross-thread wake does.
    fn signal_eventfd(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a local u64 to our own eventfd.
        let _ = unsafe { libc::write(self.eventfd(), (&one as *const u64).cast(), 8) };
    }

    /// Delivers completions to their operations and wakes their tasks. Returns how many.
    pub fn reap(&self) -> usize {
        let mut wakers = Vec::new();
        {
            let mut ring = self.ring.borrow_mut();
            let mut ops = self.ops.borrow_mut();
            // Completions that wait as task work (IORING_SQ_TASKRUN), or that did not fit in
            // the completion queue (IORING_SQ_CQ_OVERFLOW, kept by IORING_FEAT_NODROP), are
            // posted by an io_uring_enter with GETEVENTS, which submit() makes when either
            // flag is set. The eventfd does not fire again for them: with deferred task
            // running, one enter posts a limited number and sets the flag again for the rest,
            // so this enters again while the flag is set and the last enter posted some. The
            // flag is a hint, not a count: the kernel sets it after queueing the work, so it
            // can stay set with nothing left (the work ran in between), until work comes
            // again; entering until it clears would spin forever then. (Work that posts
            // nothing, such as a request the kernel re-issues, could end the loop early with
            // some left; `wake_self_if_work_is_left` makes sure the next reap comes.)
            let mut enter = waiting_in_kernel(&mut ring);
            loop {
                if enter {
                    self.queued.set(0);
                    if let Err(e) = ring.submit() {
                        log::error!("io_uring enter to post completions failed: {e}");
                        enter = false;
                    }
                }
                let mut posted = false;
                for cqe in ring.completion() {
                    posted = true;
                    let key = cqe.user_data() as usize;
                    if let Some(state) = ops.get_mut(key) {
                        if let OpState::Pending(waker) =
                            std::mem::replace(state, OpState::Done(cqe.result()))
                        {
                            wakers.extend(waker);
                        }
                    }
                }
                if !enter || !posted || !waiting_in_kernel(&mut ring) {
                    break;
                }
            }
            self.wake_self_if_work_is_left(&mut ring);
        }
        let n = wakers.len();
        if n > 0 {
            self.posted.set(true);
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
    /// Cross-thread wakes write it only after the executor's `prepare_to_sleep`.
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

    /// Before the thread sleeps on the eventfd: clears what posting the completions it took
    /// wrote there, so that the sleep does not end at once for nothing, and tells whether the
    /// ring has work for it now. Returns true when it may sleep; false when it must reap
    /// first (work that comes after this look writes the eventfd again).
    pub fn ready_to_sleep(&self) -> bool {
        if !self.posted.get() {
            // Nothing was taken since the last clear: whatever wrote the eventfd since then
            // is work to wake for.
            return true;
        }
        self.clear_eventfd();
        let mut ring = self.ring.borrow_mut();
        if !ring.completion().is_empty() {
            return false;
        }
        // Task work or overflowed completions queued before the clear, whose write the
        // clear took back. (Neither flag set: none.)
        !(waiting_in_kernel(&mut ring) && ring_has_work(&ring))
    }

    /// Resets the eventfd counter after it fired.
    pub fn clear_eventfd(&self) {
        self.posted.set(false);
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
    use std::io::{Read, Seek};
    use std::os::unix::fs::OpenOptionsExt;
    use std::time::{Duration, Instant};

    use io_uring::types;

    use super::*;
    use crate::io::executor::{block_on, LocalExecutor};

    /// Every setup, best first.
    const SETUPS: [RingSetup; 4] = [
        RingSetup::DeferTaskrun,
        RingSetup::CoopTaskrun,
        RingSetup::Restricted,
        RingSetup::Plain,
    ];

    /// The running kernel's (major, minor) version.
    fn kernel_version() -> (u32, u32) {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
        let mut parts = release
            .trim()
            .split(|c: char| !c.is_ascii_digit())
            .map(|p| p.parse::<u32>().unwrap_or(0));
        (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
    }

    /// Runs `f` on a new thread whose reactor has `setup` (asserted where the kernel has it).
    fn on_ring_with(setup: RingSetup, f: impl FnOnce(&Rc<Reactor>) + Send + 'static) {
        std::thread::spawn(move || {
            let reactor = Reactor::install(setup).expect("reactor");
            if kernel_version() >= (6, 1) {
                assert_eq!(reactor.setup(), setup, "this kernel has every setup");
            }
            f(&reactor);
        })
        .join()
        .expect("test thread");
    }

    /// A monotonic-clock time `after` from now, as io_uring takes it.
    fn deadline(after: Duration) -> types::Timespec {
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes into the local timespec.
        let r = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
        assert_eq!(r, 0);
        let at = Duration::new(now.tv_sec as u64, now.tv_nsec as u32) + after;
        types::Timespec::new()
            .sec(at.as_secs())
            .nsec(at.subsec_nanos())
    }

    /// Spawns a task that waits for the absolute monotonic time `at` (the timeout must
    /// expire), then runs `then`.
    fn spawn_timeout(
        exec: &mut LocalExecutor<'_>,
        reactor: &Rc<Reactor>,
        at: types::Timespec,
        then: impl FnOnce() + 'static,
    ) {
        let reactor = reactor.clone();
        exec.spawn(async move {
            let entry = opcode::Timeout::new(&at)
                .flags(types::TimeoutFlags::ABS)
                .build();
            // SAFETY: `at` is copied into this future, which outlives the operation.
            let res = unsafe { reactor.op(entry) }.await;
            assert_eq!(res.expect("submitted"), -libc::ETIME);
            then();
        });
    }

    #[test]
    fn a_ring_refuses_operations_the_drivers_do_not_use() {
        for setup in &SETUPS[..3] {
            on_ring_with(*setup, |reactor| {
                // SAFETY: a no-op and an fsync of a file reference no memory.
                let nop = block_on(unsafe { reactor.op(opcode::Nop::new().build()) })
                    .expect("executor")
                    .expect("submitted");
                assert_eq!(
                    nop,
                    -libc::EACCES,
                    "a NOP is not among the allowed operations"
                );
                let file = tempfile::tempfile().expect("temp file");
                let fd = types::Fd(file.as_raw_fd());
                // SAFETY: as above; the file outlives the operation.
                let fsync = block_on(unsafe { reactor.op(opcode::Fsync::new(fd).build()) })
                    .expect("executor")
                    .expect("submitted");
                assert_eq!(fsync, 0, "an allowed operation still works");
            });
        }
    }

    #[test]
    fn a_thread_gets_the_best_setup_its_kernel_has() {
        let best = |in_event_loop: bool| {
            std::thread::spawn(move || {
                let reactor = match in_event_loop {
                    true => Reactor::current_in_event_loop(),
                    false => Reactor::current(),
                };
                reactor.expect("reactor").setup()
            })
            .join()
            .expect("test thread")
        };
        let expected = match kernel_version() {
            v if v >= (6, 1) => RingSetup::DeferTaskrun,
            v if v >= (5, 19) => RingSetup::CoopTaskrun,
            v if v >= (5, 10) => RingSetup::Restricted,
            _ => RingSetup::Plain,
        };
        assert_eq!(best(true), expected, "an event loop's thread");
        let expected = match kernel_version() {
            v if v >= (5, 19) => RingSetup::CoopTaskrun,
            v if v >= (5, 10) => RingSetup::Restricted,
            _ => RingSetup::Plain,
        };
        assert_eq!(best(false), expected, "any other thread");
    }

    /// A thread asleep on its eventfd wakes when an operation completes, and direct I/O on a
    /// real file goes through, with every setup.
    #[test]
    fn every_setup_wakes_a_sleeping_thread_and_does_direct_io() {
        for setup in SETUPS {
            on_ring_with(setup, |reactor| {
                let ts = types::Timespec::new().nsec(20_000_000);
                let started = Instant::now();
                // SAFETY: the timeout's timespec is a local that outlives the operation.
                let res = block_on(unsafe { reactor.op(opcode::Timeout::new(&ts).build()) })
                    .expect("executor")
                    .expect("submitted");
                assert_eq!(res, -libc::ETIME, "the timeout expired");
                assert!(started.elapsed() >= Duration::from_millis(20));

                let dir = tempfile::tempdir().expect("dir");
                let path = dir.path().join("image");
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(&path)
                    .expect("O_DIRECT file");
                let mut buf = crate::io::bounce::BounceBuffer::new(4096).expect("buffer");
                buf.as_mut_slice().fill(0xa5);
                let fd = types::Fd(file.as_raw_fd());
                let write = opcode::Write::new(fd, buf.as_mut_slice().as_mut_ptr(), 4096)
                    .offset(8192)
                    .build();
                // SAFETY: `buf` outlives the operation.
                let res = block_on(unsafe { reactor.op(write) })
                    .expect("executor")
                    .expect("submitted");
                assert_eq!(res, 4096, "the direct write went through");
                let mut back = vec![0u8; 4096];
                drop(file);
                std::fs::File::open(&path)
                    .and_then(|mut f| {
                        f.seek(std::io::SeekFrom::Start(8192))?;
                        f.read_exact(&mut back)
                    })
                    .expect("read back");
                assert!(back.iter().all(|b| *b == 0xa5), "the data is in the file");
            });
        }
    }

    /// More completions than one io_uring_enter posts with deferred task running (it sets
    /// IORING_SQ_TASKRUN again for the rest, with no new eventfd wake): one reap delivers
    /// them all, so a worker that sleeps on its eventfd after a reap loses none.
    #[test]
    fn one_reap_delivers_every_completion_that_waits() {
        const OPS: usize = 64;
        for setup in SETUPS {
            on_ring_with(setup, move |reactor| {
                let mut exec = LocalExecutor::new().expect("executor");
                // One deadline for all: they expire in the same timer interrupt.
                let at = deadline(Duration::from_millis(30));
                let done = Rc::new(Cell::new(0));
                for _ in 0..OPS {
                    let done = done.clone();
                    spawn_timeout(&mut exec, reactor, at, move || done.set(done.get() + 1));
                }
                exec.poll().expect("submitted");
                std::thread::sleep(Duration::from_millis(60));
                assert_eq!(
                    reactor.reap(),
                    OPS,
                    "{setup:?}: every expired timeout, in one reap"
                );
                exec.poll().expect("tasks ran");
                assert_eq!(done.get(), OPS);
            });
        }
    }

    /// Whether `reactor`'s eventfd is readable now.
    fn eventfd_readable(reactor: &Reactor) -> bool {
        let mut pfd = libc::pollfd {
            fd: reactor.eventfd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: pfd is a valid pollfd for the duration of the call; timeout 0 never blocks.
        unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
    }

    /// Waits until `reactor`'s eventfd fires, as a worker's epoll does (at most 5 s).
    fn wait_for_eventfd(reactor: &Reactor) {
        let mut pfd = libc::pollfd {
            fd: reactor.eventfd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: pfd is a valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, 5_000) };
        assert_eq!(ready, 1, "the eventfd fired");
    }

    /// A thread that took its completions sleeps until the next one. Posting them wrote the
    /// eventfd again (also when the thread's own enter posts them); that write is cleared
    /// before the sleep. Before, every sleep after a reap ended at once, and a polling worker
    /// then polled a whole window for nothing. A completion that comes after the reap, whose
    /// write the clear takes back, still keeps the thread from sleeping.
    #[test]
    fn a_thread_that_took_its_completions_sleeps_until_the_next() {
        for setup in SETUPS {
            on_ring_with(setup, move |reactor| {
                let mut exec = LocalExecutor::new().expect("executor");
                let done = Rc::new(Cell::new(0));
                // A timeout that expires `ms` from now and then counts itself done.
                let after = |exec: &mut LocalExecutor<'_>, ms: u64| {
                    let done = done.clone();
                    let at = deadline(Duration::from_millis(ms));
                    spawn_timeout(exec, reactor, at, move || done.set(done.get() + 1));
                };
                after(&mut exec, 10);
                exec.poll().expect("submitted");
                wait_for_eventfd(reactor);
                exec.on_eventfd().expect("reaped");
                assert_eq!(done.get(), 1);
                assert!(exec.prepare_to_sleep(), "{setup:?}: nothing left to do");
                assert!(
                    !eventfd_readable(reactor),
                    "{setup:?}: the sleep does not end at once"
                );
                exec.woke_up();

                // One completion taken, then another comes before the thread sleeps.
                after(&mut exec, 10);
                after(&mut exec, 40);
                exec.poll().expect("submitted");
                wait_for_eventfd(reactor);
                exec.on_eventfd().expect("reaped");
                assert_eq!(done.get(), 2);
                std::thread::sleep(Duration::from_millis(80));
                assert!(
                    !exec.prepare_to_sleep(),
                    "{setup:?}: a completion waits, so no sleep"
                );
                exec.poll_completions().expect("reaped");
                assert_eq!(done.get(), 3, "{setup:?}: and the next reap takes it");
            });
        }
    }

    /// Deferred task work that one enter leaves for later, after a batch of it that posted
    /// no completion (here timeouts whose expiry counts as success with no completion asked
    /// for; in service, requests the kernel re-issues): the eventfd still fires, so a worker
    /// that sleeps on it after each reap runs all of it. (Before, the worker slept for ever.)
    #[test]
    fn work_left_after_a_batch_that_posted_nothing_wakes_the_thread() {
        // More than the kernel runs per enter with deferred task running.
        const SILENT: usize = 100;
        std::thread::spawn(|| {
            let skip = squeue::Flags::SKIP_SUCCESS.bits();
            let reactor =
                Reactor::install_with_sqe_flags(RingSetup::DeferTaskrun, skip).expect("reactor");
            if reactor.setup() != RingSetup::DeferTaskrun {
                assert!(
                    kernel_version() < (6, 1),
                    "this kernel has deferred task running"
                );
                return;
            }
            // One deadline: they expire in one timer interrupt, in the order queued, and
            // their work runs in that order, the silent ones first.
            let at = deadline(Duration::from_millis(30));
            let silent = opcode::Timeout::new(&at)
                .flags(types::TimeoutFlags::ABS | types::TimeoutFlags::ETIME_SUCCESS)
                .build()
                .flags(squeue::Flags::SKIP_SUCCESS)
                .user_data(u64::MAX);
            for _ in 0..SILENT {
                let mut ring = reactor.ring.borrow_mut();
                // SAFETY: `at` outlives the operations: this thread waits for them below.
                unsafe { ring.submission().push(&silent) }.expect("room in the ring");
            }
            let mut exec = LocalExecutor::new().expect("executor");
            let done = Rc::new(Cell::new(false));
            {
                let done = done.clone();
                spawn_timeout(&mut exec, &reactor, at, move || done.set(true));
            }
            exec.poll().expect("submitted");
            std::thread::sleep(Duration::from_millis(60));
            // A worker's loop: sleep on the eventfd, reap, run the woken tasks.
            while !done.get() {
                // The eventfd fires while work is left.
                wait_for_eventfd(&reactor);
                exec.on_eventfd().expect("reaped");
            }
        })
        .join()
        .expect("every timeout completed");
    }

    /// The kernel's offset of the submission queue flags in the ring mapping, from a ring of
    /// the test's own (the same for every ring of the kernel).
    fn sq_flags_offset() -> usize {
        /// `struct io_uring_params` (include/uapi/linux/io_uring.h): fields, then the
        /// submission and completion queue offsets.
        #[repr(C)]
        struct Params {
            fields: [u32; 10],
            sq_off: [u32; 10],
            cq_off: [u32; 10],
        }
        let mut p = Params {
            fields: [0; 10],
            sq_off: [0; 10],
            cq_off: [0; 10],
        };
        // SAFETY: io_uring_setup writes into `p`, a live struct of the kernel's layout.
        let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1, &mut p as *mut Params) };
        assert!(fd >= 0, "io_uring_setup");
        // SAFETY: the descriptor is the fresh ring's, owned here only.
        drop(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
        // `flags` is the fifth offset: head, tail, ring_mask, ring_entries, flags.
        p.sq_off[4] as usize
    }

    /// IORING_SQ_TASKRUN set with no task work behind it, as the kernel leaves it when the
    /// thread ran the work between its queueing and the flag's setting: a reap still returns
    /// (once spun forever, entering the kernel again and again), and the ring works after.
    #[test]
    fn a_stale_taskrun_flag_does_not_make_a_reap_spin() {
        let offset = sq_flags_offset();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let reactor = Reactor::install(RingSetup::DeferTaskrun).expect("reactor");
            let fd = reactor.ring.borrow().as_raw_fd();
            let len = offset + 4;
            // SAFETY: maps the ring's submission queue ring (offset 0), shared, as the
            // library does; unmapped below.
            let map = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd,
                    0,
                )
            };
            assert_ne!(map, libc::MAP_FAILED, "map the ring");
            // SAFETY: the flags word lies in the mapping, 4-byte aligned, and the kernel
            // updates it atomically too.
            let flags =
                unsafe { &*(map.cast::<u8>().add(offset) as *const std::sync::atomic::AtomicU32) };
            flags.fetch_or(1 << 1, std::sync::atomic::Ordering::SeqCst); // IORING_SQ_TASKRUN
            assert_eq!(reactor.reap(), 0, "nothing completed");
            // SAFETY: `map` is the mapping made above, no longer used.
            unsafe { libc::munmap(map, len) };
            let ts = types::Timespec::new().nsec(1_000_000);
            // SAFETY: the timeout's timespec is a local that outlives the operation.
            let res = block_on(unsafe { reactor.op(opcode::Timeout::new(&ts).build()) })
                .expect("executor")
                .expect("submitted");
            let _ = tx.send(res);
        });
        let res = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the reap returned and the ring still works");
        assert_eq!(res, -libc::ETIME);
    }
}
