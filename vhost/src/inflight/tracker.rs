//! A worker's side of in-flight tracking: the buffer it writes, and per virtqueue the fetch
//! counter, whether the queue's start was handled, and the requests to resubmit.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::{QueueLog, Region, Shared};

/// In-flight tracking for the virtqueues of one worker thread (indexed by slot).
pub(crate) struct Tracker {
    region: Option<Arc<Region>>,
    /// [`Shared`]'s generation `region` is from.
    seen: u64,
    /// Per slot: the next fetch counter.
    counters: Vec<u64>,
    /// Per slot: the queue's start was handled (recovery done or not needed).
    started: Vec<bool>,
    /// Per slot: requests in flight at the last disconnect, to start before new ones.
    resubmit: Vec<Vec<u16>>,
}

impl Tracker {
    pub(crate) fn new(slots: usize) -> Self {
        Tracker {
            region: None,
            seen: 0,
            counters: vec![0; slots],
            started: vec![false; slots],
            resubmit: vec![Vec::new(); slots],
        }
    }

    /// Picks up the buffer the frontend installed, if it changed (one atomic load).
    #[inline]
    pub(crate) fn refresh(&mut self, shared: &Shared) {
        if let Some(region) = shared.changed(&mut self.seen) {
            self.region = region;
        }
    }

    fn log(&self, queue: usize, size: u16) -> Option<QueueLog<'_>> {
        self.region.as_ref()?.queue(queue, size)
    }

    /// The virtqueue in `slot` is not running: its next start is handled anew.
    #[inline]
    pub(crate) fn stopped(&mut self, slot: usize) {
        if let Some(s) = self.started.get_mut(slot) {
            *s = false;
        }
    }

    /// Handles the start of virtqueue `queue` (in `slot`), once per start: with a buffer in
    /// use, repairs its last batch and takes the requests it still marks in flight for
    /// resubmission, and moves the queue's indices past them (the available index QEMU sent
    /// was rewound to the used index). `in_flight` is how many of the queue's requests this
    /// process has in flight: then this is no new start (the log describes them) and
    /// nothing is resubmitted. Returns how many requests will be resubmitted.
    pub(crate) fn start(
        &mut self,
        slot: usize,
        queue: usize,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        in_flight: usize,
    ) -> usize {
        if self.started.get(slot).copied().unwrap_or(true) {
            return 0;
        }
        // No buffer yet (or none for this queue): the start is handled when one comes, so a
        // buffer installed after the queue's first look still gets its marks recovered.
        if self.log(queue, q.size()).is_none() {
            return 0;
        }
        self.started[slot] = true;
        if in_flight != 0 {
            return 0;
        }
        let used_at = GuestAddress(q.used_ring()).checked_add(2);
        let Some(used) = used_at.and_then(|a| mem.load::<u16>(a, Ordering::Acquire).ok()) else {
            return 0;
        };
        let used = u16::from_le(used);
        let Some(recovered) = self.log(queue, q.size()).and_then(|log| log.recover(used)) else {
            self.counters[slot] = 0;
            return 0;
        };
        self.counters[slot] = recovered.counter;
        let n = recovered.heads.len();
        q.set_next_used(used);
        q.set_next_avail(used.wrapping_add(n as u16));
        self.resubmit[slot] = recovered.heads;
        n
    }

    /// Whether requests of `slot` wait to be resubmitted.
    #[inline]
    pub(crate) fn has_resubmit(&self, slot: usize) -> bool {
        self.resubmit.get(slot).is_some_and(|r| !r.is_empty())
    }

    /// Moves up to `room` requests to resubmit from `slot` to `heads`; returns how many.
    pub(crate) fn take_resubmit(&mut self, slot: usize, room: u16, heads: &mut Vec<u16>) -> u16 {
        let Some(list) = self.resubmit.get_mut(slot) else {
            return 0;
        };
        let n = list.len().min(usize::from(room));
        heads.extend(list.drain(..n));
        n as u16
    }

    /// Marks `heads`, just taken from virtqueue `queue` (in `slot`, of `size` entries), in
    /// flight, in the order taken.
    #[inline]
    pub(crate) fn mark(&mut self, slot: usize, queue: usize, size: u16, heads: &[u16]) {
        let Some(region) = &self.region else {
            return;
        };
        let Some(log) = region.queue(queue, size) else {
            return;
        };
        let counter = &mut self.counters[slot];
        for &head in heads {
            log.mark(head, *counter);
            *counter = counter.wrapping_add(1);
        }
    }

    /// Before the used entries for `heads` are written.
    #[inline]
    pub(crate) fn begin_publish(&self, queue: usize, size: u16, heads: impl Iterator<Item = u16>) {
        if let Some(log) = self.log(queue, size) {
            log.begin_publish(heads);
        }
    }

    /// After the used index `used_idx` that covers `heads` was stored.
    #[inline]
    pub(crate) fn end_publish(
        &self,
        queue: usize,
        size: u16,
        heads: impl Iterator<Item = u16>,
        used_idx: u16,
    ) {
        if let Some(log) = self.log(queue, size) {
            log.end_publish(heads, used_idx);
        }
    }
}
