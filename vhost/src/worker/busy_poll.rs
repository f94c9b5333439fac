//! Busy polling: after a burst, a worker watches its virtqueues and its io_uring completion
//! queue for a while instead of sleeping on their eventfds.

use strata_backend::accounting::clock;
use vhost_user_backend::{VringMutex, VringT};
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;

use super::Worker;
use crate::device::Device;
use crate::split_ring;

/// Longest a worker stays in one busy-poll stint before it goes back to its epoll loop (which
/// must see exit and control events now and then even under constant load).
const MAX_POLL_STINT_NS: u64 = 2_000_000;

/// CPU pause instructions after an idle busy-poll round (tens of ns each).
const IDLE_PAUSES: u32 = 16;

/// Busy-poll rounds between two looks at the clock.
const CLOCK_EVERY: u32 = 8;

/// Busy-poll rounds between two yields of the CPU while idle (a multiple of CLOCK_EVERY).
const YIELD_EVERY: u32 = 32;

impl Worker {
    /// At a wake-up: adapts the poll window to how long the worker waited for this work.
    pub(super) fn woke(&mut self) {
        if self.poll.adapts() && self.last_work != 0 {
            self.poll
                .waited(clock::read().saturating_sub(self.last_work));
        }
    }

    /// After an event: busy-polls for the current window (if open), then notes when the
    /// worker last found work, for the next wake-up to measure from.
    pub(super) fn poll_before_sleep(&mut self, dev: &Device, vrings: &[VringMutex]) {
        let window = self.poll.next_poll();
        if window > 0 {
            self.last_work = self.busy_poll(dev, vrings, window);
        } else if self.poll.adapts() {
            self.last_work = clock::read();
        }
    }

    /// Busy-polls the thread's virtqueues and its io_uring completion queue until nothing
    /// happened for `window` ns (or for at most MAX_POLL_STINT_NS), then
    /// re-enables kicks. Returns when the worker last found work (a [`clock::read`] reading),
    /// from which the next wake-up measures how long it waited.
    ///
    /// While the worker polls, guest notifications stay off, so the driver does not kick,
    /// and completions are seen without the eventfd wake-up: at high queue depth requests
    /// flow in and out continuously instead of in kick-sized batches, and at low depth the
    /// two cross-CPU wake-ups per request (kick, io_uring completion) are gone.
    fn busy_poll(&mut self, dev: &Device, vrings: &[VringMutex], window: u64) -> u64 {
        // Only the rings in use (a frontend may set up fewer than the 64 this thread could
        // serve); one that starts later is seen at its first kick, after this stint. Their
        // drivers stop kicking until the stint ends.
        self.active.clear();
        {
            let mem = dev.mem.memory().into_inner();
            self.active
                .extend(vrings.iter().enumerate().filter_map(|(slot, vring)| {
                    let state = vring.get_ref();
                    let queue = state.get_queue();
                    let active = state.is_enabled() && queue.ready();
                    if active {
                        split_ring::hold_kicks(&mem, queue);
                    }
                    active.then_some(slot)
                }));
        }
        let start = clock::read();
        if self.active.is_empty() {
            return start;
        }
        // When the current run of idle rounds began (None while there is work).
        let mut idle_since: Option<u64> = None;
        let mut rounds = 0u32;
        loop {
            let mut work = false;
            {
                let mem = dev.mem.memory().into_inner();
                for i in 0..self.active.len() {
                    let slot = self.active[i];
                    if let Some(vring) = vrings.get(slot) {
                        work |= self.run_batch(dev, &mem, slot, vring) > 0;
                    }
                }
            }
            if work {
                self.submit();
                // A new request, not the completion of one this worker started (which a
                // probe after each request would catch however far apart they come).
                self.poll.caught();
            }
            match self.exec.poll_completions() {
                Ok(n) => work |= n > 0,
                Err(e) => log::error!("vhost-user-blk export '{}': {e}", self.ctx.cfg.id),
            }
            work |= self.complete(dev, vrings);
            rounds = rounds.wrapping_add(1);
            if !work {
                // Back off a little before looking again: each look at the rings pulls their
                // cache lines over from the driver's CPU, slowing its writes.
                for _ in 0..IDLE_PAUSES {
                    std::hint::spin_loop();
                }
            }
            // Reading the clock is a good part of an idle round's cost: look at it every
            // CLOCK_EVERY rounds only (a round takes well under a µs).
            if rounds % CLOCK_EVERY != 0 {
                if work {
                    idle_since = None;
                }
                continue;
            }
            let now = clock::read();
            if now.saturating_sub(start) >= MAX_POLL_STINT_NS {
                // Still busy: the work goes on after the epoll loop's turn.
                idle_since = Some(now);
                break;
            }
            if work {
                idle_since = None;
                continue;
            }
            let since = *idle_since.get_or_insert(now);
            if now.saturating_sub(since) >= window {
                break;
            }
            if rounds % YIELD_EVERY == 0 {
                // Let another thread on this CPU run now and then instead of spinning against
                // it for the whole window; a yield is a system call, too slow for every round.
                std::thread::yield_now();
            }
        }
        // Back to sleeping on the eventfds: kicks on again, then whatever arrived meanwhile.
        for i in 0..self.active.len() {
            let slot = self.active[i];
            if let Some(vring) = vrings.get(slot) {
                self.process_queue(dev, slot, vring);
            }
        }
        self.submit();
        self.complete(dev, vrings);
        idle_since.unwrap_or(start)
    }
}
