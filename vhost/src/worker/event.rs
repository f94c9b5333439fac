//! One turn of a worker's epoll loop: serve the event, busy-poll for more work, and go back
//! to sleep.
//!
//! A task woken from another thread (librbd's completion callback, another queue's
//! overlapping write) writes the worker's eventfd only while the worker sleeps
//! ([`LocalExecutor::prepare_to_sleep`](strata_backend::LocalExecutor::prepare_to_sleep)), as
//! QEMU's `aio_notify` does: at high queue depth a burst of completions costs one eventfd
//! write and one wake-up, not one each. Those that come while the worker is awake are
//! served before it sleeps.

use strata_backend::accounting::clock;
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
        for _ in 0..MAX_WOKEN_ROUNDS {
            if self.exec.prepare_to_sleep() {
                return;
            }
            self.serve(dev, None, vrings);
        }
        self.raise_eventfd(dev);
    }

    /// Writes the worker's own eventfd: its epoll loop comes back to it after the events
    /// already pending.
    pub(super) fn raise_eventfd(&self, dev: &Device) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live local array to the eventfd of this worker's
        // reactor, which `self.exec` keeps open; the eventfd is non-blocking.
        let n = unsafe {
            libc::write(
                self.exec.reactor().eventfd(),
                one.as_ptr().cast(),
                one.len(),
            )
        };
        if n < 0 {
            log::error!(
                "vhost-user-blk export '{}': could not wake worker: {}",
                dev.cfg.id,
                std::io::Error::last_os_error()
            );
        }
    }
}
