//! One turn of a worker's epoll loop: serve the event, busy-poll for more work, and go back
//! to sleep.
//!
//! A task woken from another thread (librbd's completion callback, another queue's
//! overlapping write) writes the worker's eventfd only while the worker sleeps
//! ([`LocalExecutor::prepare_to_sleep`](strata_backend::LocalExecutor::prepare_to_sleep)), as
//! QEMU's `aio_notify` does: at high queue depth a burst of completions costs one eventfd
//! write and one wake-up, not one each. Those that come while the worker is awake are
//! served before it sleeps.

use std::io;

use strata_backend::accounting::clock;
use strata_backend::LocalExecutor;
use vhost_user_backend::VringMutex;

use super::Worker;
use crate::device::Device;
use crate::memory_faults;

/// Most rounds of tasks woken from other threads a worker serves after one event before it
/// lets its epoll loop look at the other events (exit, control messages) first.
const MAX_WOKEN_ROUNDS: u32 = 8;

impl Worker {
    /// Handles an event of the thread's epoll (`device_event`: a kick of that virtqueue, or
    /// the io_uring's completion eventfd), then busy-polls for more work, and goes back to
    /// sleep ([`Self::go_to_sleep`]).
    pub(crate) fn handle_event(&mut self, dev: &Device, device_event: u16, vrings: &[VringMutex]) {
        self.exec.woke_up();
        self.serve(dev, Some(device_event), vrings);
        self.go_to_sleep(dev, vrings);
    }

    /// Serves an event (None: tasks woken from other threads, which wrote no eventfd as the
    /// worker was awake), then busy-polls for more work.
    fn serve(&mut self, dev: &Device, device_event: Option<u16>, vrings: &[VringMutex]) {
        // The thread slept since its last event: no cached clock reading holds.
        clock::invalidate();
        self.woke();
        match device_event {
            Some(e) if u64::from(e) != dev.eventfd_token() => {
                if let Some(vring) = vrings.get(usize::from(e)) {
                    self.process_queue(dev, usize::from(e), vring);
                    self.submit();
                }
            }
            _ => {
                if device_event.is_some() {
                    self.on_eventfd();
                } else {
                    self.on_woken();
                }
                if !self.paused.is_empty() && !dev.paused() {
                    for slot in std::mem::take(&mut self.paused) {
                        if !self.backlog.contains(&slot) {
                            self.backlog.push(slot);
                        }
                    }
                }
                self.run_backlog(dev, vrings);
            }
        }
        self.complete(dev, vrings);
        self.poll_before_sleep(dev, vrings);
        // Between events only requests in flight hold the memory table: update_memory
        // waits until nothing holds the one it replaced.
        self.held = None;
        // A memory file shrunk under this event's accesses was contained: drop the connection.
        let faults = memory_faults::faults();
        if faults != self.faults_seen {
            self.faults_seen = faults;
            dev.check_memory_faults();
        }
        clock::invalidate();
    }

    /// Completions arrived: run the woken tasks (and submit what they queued).
    fn on_eventfd(&mut self) {
        if let Err(e) = self.exec.on_eventfd() {
            log::error!("vhost-user-blk export '{}': {e}", self.ctx.cfg.id);
        }
    }

    /// Tasks were woken with the eventfd left alone: run them (and the completions already
    /// in the ring), and submit what they queued.
    fn on_woken(&mut self) {
        if let Err(e) = self.exec.poll_completions() {
            log::error!("vhost-user-blk export '{}': {e}", self.ctx.cfg.id);
        }
    }

    /// At the end of an event, before the thread returns to its epoll loop: announces the
    /// sleep to the wakers on other threads, or, when tasks were woken meanwhile, serves
    /// them (with a busy-poll after, as after any event) and tries again. After
    /// [`MAX_WOKEN_ROUNDS`], it raises its own eventfd instead, which brings it back after
    /// the epoll loop's other events.
    ///
    /// The announcement is the last thing the event does: nothing may wake a task of this
    /// thread between it and the epoll wait, or that task would sleep with it.
    fn go_to_sleep(&mut self, dev: &Device, vrings: &[VringMutex]) {
        let raised = sleep_or_come_back(self, |w| &w.exec, |w| w.serve(dev, None, vrings));
        report_raise(dev, raised);
    }

    /// Writes the worker's own eventfd: its epoll loop comes back to it after the events
    /// already pending.
    pub(super) fn raise_eventfd(&self, dev: &Device) {
        report_raise(dev, raise(&self.exec));
    }
}

/// The loop of [`Worker::go_to_sleep`]: announces `owner`'s sleep on its executor (`exec`),
/// or, when tasks were woken meanwhile, serves them (`serve_woken`) and tries again; after
/// [`MAX_WOKEN_ROUNDS`] it [`raise`]s the executor's eventfd instead. An error only when
/// that write failed. Generic over the owner so that it is tested without a device.
fn sleep_or_come_back<W>(
    owner: &mut W,
    exec: fn(&W) -> &LocalExecutor<'static>,
    mut serve_woken: impl FnMut(&mut W),
) -> io::Result<()> {
    for _ in 0..MAX_WOKEN_ROUNDS {
        if exec(owner).prepare_to_sleep() {
            return Ok(());
        }
        serve_woken(owner);
    }
    raise(exec(owner))
}

/// Writes the eventfd of `exec`'s reactor: the epoll loop of its thread comes back to it
/// after the events already pending.
fn raise(exec: &LocalExecutor<'_>) -> io::Result<()> {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live local array to the eventfd of the executor's
    // reactor, which the executor keeps open; the eventfd is non-blocking.
    let n = unsafe { libc::write(exec.reactor().eventfd(), one.as_ptr().cast(), one.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Logs a failed [`raise`] of a worker of `dev`.
fn report_raise(dev: &Device, raised: io::Result<()>) {
    if let Err(e) = raised {
        log::error!(
            "vhost-user-blk export '{}': could not wake worker: {e}",
            dev.cfg.id
        );
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::sync::{Arc, Mutex};
    use std::task::{Poll, Waker};

    use super::*;

    /// An executor with one task that never finishes, whose waker the test uses from other
    /// threads, and the rounds the loop served.
    struct Owner {
        exec: LocalExecutor<'static>,
        waker: Arc<Mutex<Option<Waker>>>,
        served: u32,
    }

    impl Owner {
        fn new() -> Owner {
            let mut exec = LocalExecutor::new().expect("executor");
            let waker = Arc::new(Mutex::new(None::<Waker>));
            let stash = waker.clone();
            exec.spawn(poll_fn(move |cx| {
                *stash.lock().expect("stash") = Some(cx.waker().clone());
                Poll::<()>::Pending
            }));
            exec.poll().expect("poll");
            Owner {
                exec,
                waker,
                served: 0,
            }
        }

        /// Wakes the task from another thread, as a write ending on another queue's worker
        /// does.
        fn wake_from_another_thread(&self) {
            let waker = self.waker.lock().expect("stash").clone().expect("waker");
            std::thread::spawn(move || waker.wake())
                .join()
                .expect("waking thread");
        }

        /// Serves the woken task, which another thread wakes again before the next look
        /// while `wakes_left` lasts.
        fn serve_woken(&mut self, wakes_left: &mut u32) {
            self.exec.poll().expect("poll");
            self.served += 1;
            if *wakes_left > 0 {
                *wakes_left -= 1;
                self.wake_from_another_thread();
            }
        }
    }

    /// Whether the eventfd was written since it was last read (and resets it).
    fn eventfd_written(fd: i32) -> bool {
        let mut value: u64 = 0;
        // SAFETY: reads 8 bytes into a local u64 from the reactor's eventfd, which the live
        // executor keeps open and non-blocking.
        let n = unsafe { libc::read(fd, (&mut value as *mut u64).cast(), 8) };
        n == 8 && value > 0
    }

    /// Tasks woken from another thread after every round: the loop serves them
    /// MAX_WOKEN_ROUNDS times, then raises the eventfd instead of announcing the sleep
    /// (the epoll loop sees its other events first, then comes back), however long the
    /// wakes would go on. Once they stop, the woken task is served once and the sleep
    /// announced; with nothing woken, it is announced at once.
    #[test]
    fn woken_rounds_are_bounded_then_the_eventfd_is_raised() {
        let mut owner = Owner::new();
        let fd = owner.exec.reactor().eventfd();
        let _ = eventfd_written(fd);
        owner.wake_from_another_thread();
        // Far more wakes than rounds: an unbounded loop would serve them all.
        let mut wakes_left = 4 * MAX_WOKEN_ROUNDS;
        sleep_or_come_back(&mut owner, |o| &o.exec, |o| o.serve_woken(&mut wakes_left))
            .expect("raise");
        assert_eq!(owner.served, MAX_WOKEN_ROUNDS, "rounds served");
        // The wakes came while the owner was awake and wrote nothing: the write is the raise.
        assert!(
            eventfd_written(fd),
            "woken every round: the eventfd must be raised"
        );

        // The wake after the last round above is still pending.
        owner.served = 0;
        let mut wakes_left = 0;
        sleep_or_come_back(&mut owner, |o| &o.exec, |o| o.serve_woken(&mut wakes_left))
            .expect("raise");
        assert_eq!(owner.served, 1, "the woken task is served once");
        assert!(!eventfd_written(fd), "served in time: no raise");
        owner.wake_from_another_thread();
        assert!(eventfd_written(fd), "the sleep was announced");
        owner.exec.woke_up();
        owner.exec.poll().expect("poll");

        owner.served = 0;
        sleep_or_come_back(&mut owner, |o| &o.exec, |o| o.serve_woken(&mut wakes_left))
            .expect("raise");
        assert_eq!(owner.served, 0, "nothing woken: nothing served");
        owner.wake_from_another_thread();
        assert!(eventfd_written(fd), "the sleep was announced at once");
        owner.exec.woke_up();
    }
}
