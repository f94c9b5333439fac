//! The available and used rings of a split virtqueue, read and written a batch at a time.
//!
//! virtio-queue reads each available entry, writes each used entry and stores the used index
//! through the whole guest memory map, finding the region again every time, a good part of
//! the cost of a small request. Here each ring is found once per batch, as one checked slice
//! of guest memory, and the used index is stored once per batch.
//! The queue's positions stay in virtio-queue's `Queue` (`next_avail`, `next_used`), which
//! vhost-user-backend reads for GET_VRING_BASE.
//!
//! A ring that does not lie in one region (possible only when two regions are adjacent in
//! guest-physical memory) is read through the memory map instead, entry by entry.

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Address, AtomicAccess, Bytes, GuestAddress, GuestMemoryMmap, VolatileMemory, VolatileSlice,
};

use crate::regions::RegionCache;

/// Bytes before the entries of either ring: `flags` and `idx`, two u16.
const RING_HEADER: usize = 4;
const AVAIL_ENTRY: usize = 2;
const USED_ENTRY: usize = 8;

/// One ring's bytes in guest memory.
enum RingMem<'m> {
    /// All of them, in one region.
    Slice(VolatileSlice<'m>),
    /// The ring at this address, when it spans regions (or lies partly outside memory).
    Map(&'m GuestMemoryMmap, GuestAddress),
}

impl<'m> RingMem<'m> {
    fn new(regions: &mut RegionCache<'m>, addr: u64, len: usize) -> Self {
        let addr = GuestAddress(addr);
        match regions.slice(addr, len) {
            Some(slice) => RingMem::Slice(slice),
            None => RingMem::Map(regions.mem(), addr),
        }
    }

    fn load<T: AtomicAccess>(&self, offset: usize, order: Ordering) -> Option<T> {
        match self {
            RingMem::Slice(s) => s.load(offset, order).ok(),
            RingMem::Map(mem, addr) => mem.load(addr.checked_add(offset as u64)?, order).ok(),
        }
    }

    /// Writes one used-ring entry (`id`, `len`) at `offset`: one volatile 8-byte store.
    fn write_entry(&self, offset: usize, entry: [u32; 2]) -> Option<()> {
        match self {
            RingMem::Slice(s) => s.get_ref::<[u32; 2]>(offset).ok().map(|r| r.store(entry)),
            RingMem::Map(mem, addr) => mem.write_obj(entry, addr.checked_add(offset as u64)?).ok(),
        }
    }

    fn store<T: AtomicAccess>(&self, val: T, offset: usize, order: Ordering) -> Option<()> {
        match self {
            RingMem::Slice(s) => s.store(val, offset, order).ok(),
            RingMem::Map(mem, addr) => mem.store(val, addr.checked_add(offset as u64)?, order).ok(),
        }
    }
}

/// The available and used rings of one virtqueue, for one batch (one hold of its vring lock).
pub(crate) struct SplitRing<'m> {
    /// `flags`, `idx`, `ring[size]`, then `used_event` when EVENT_IDX was negotiated.
    avail: RingMem<'m>,
    /// `flags`, `idx`, `ring[size]` (of `{id: u32, len: u32}`).
    used: RingMem<'m>,
    size: u16,
    event_idx: bool,
}

impl<'m> SplitRing<'m> {
    /// The rings of `queue` in the memory `regions` looks into.
    pub(crate) fn new(regions: &mut RegionCache<'m>, queue: &Queue) -> Self {
        let size = queue.size();
        let event_idx = queue.event_idx_enabled();
        let avail_len =
            RING_HEADER + AVAIL_ENTRY * usize::from(size) + if event_idx { 2 } else { 0 };
        let used_len = RING_HEADER + USED_ENTRY * usize::from(size);
        SplitRing {
            avail: RingMem::new(regions, queue.avail_ring(), avail_len),
            used: RingMem::new(regions, queue.used_ring(), used_len),
            size,
            event_idx,
        }
    }

    /// Appends to `heads` the chain heads made available since the queue's `next_avail`, at
    /// most `room` of them, and moves `next_avail` past those taken. Returns whether entries
    /// were left for want of room. A driver that claims more new entries than the queue holds
    /// is refused (nothing is taken).
    pub(crate) fn take_available(
        &self,
        queue: &mut Queue,
        heads: &mut Vec<u16>,
        room: u16,
    ) -> Result<bool, &'static str> {
        if self.size == 0 {
            return Err("queue size is zero");
        }
        // Acquire: the entries the driver wrote before this index are visible after it.
        let idx = u16::from_le(
            self.avail
                .load::<u16>(2, Ordering::Acquire)
                .ok_or("available ring outside guest memory")?,
        );
        let next = queue.next_avail();
        let count = idx.wrapping_sub(next);
        if count > self.size {
            return Err("available index is more than a queue size ahead");
        }
        let left = count > room;
        let count = count.min(room);
        heads.reserve(usize::from(count));
        for i in 0..count {
            let pos = usize::from(next.wrapping_add(i) % self.size);
            let head = self
                .avail
                .load::<u16>(RING_HEADER + AVAIL_ENTRY * pos, Ordering::Relaxed)
                .ok_or("available ring outside guest memory")?;
            heads.push(u16::from_le(head));
        }
        queue.set_next_avail(next.wrapping_add(count));
        Ok(left)
    }

    /// Puts `(head, len)` entries in the used ring, then makes them visible to the driver with
    /// one store of the used index, and moves the queue's `next_used` past them.
    pub(crate) fn add_used(
        &self,
        queue: &mut Queue,
        entries: impl Iterator<Item = (u16, u32)>,
    ) -> Result<(), &'static str> {
        if self.size == 0 {
            return Err("queue size is zero");
        }
        let mut next = Wrapping(queue.next_used());
        let outside = "used ring outside guest memory";
        for (head, len) in entries {
            let at = RING_HEADER + USED_ENTRY * usize::from(next.0 % self.size);
            self.used
                .write_entry(at, [u32::from(head).to_le(), len.to_le()])
                .ok_or(outside)?;
            next += 1;
            // Kept current entry by entry: entries written before a failure stay counted,
            // and the index store below publishes them.
            queue.set_next_used(next.0);
        }
        // Release: the driver that sees the new index sees the entries before it.
        self.used
            .store(next.0.to_le(), 2, Ordering::Release)
            .ok_or(outside)
    }

    /// Whether the driver asked to be notified of the used entries added after `since` (the
    /// used index at the previous check). Without EVENT_IDX, always (as virtio-queue, which
    /// does not honour VRING_AVAIL_F_NO_INTERRUPT either); when `used_event` cannot be read,
    /// too (a needless notification is harmless, a missing one hangs the driver).
    pub(crate) fn needs_notification(&self, queue: &Queue, since: u16) -> bool {
        let used = Wrapping(queue.next_used());
        let since = Wrapping(since);
        if used == since {
            return false;
        }
        if !self.event_idx {
            return true;
        }
        // The used-index store must be visible before `used_event` is read: the driver writes
        // `used_event` and then reads the used index, so one of the two sides sees the other.
        fence(Ordering::SeqCst);
        let offset = RING_HEADER + AVAIL_ENTRY * usize::from(self.size);
        let Some(event) = self.avail.load::<u16>(offset, Ordering::Relaxed) else {
            return true;
        };
        // Notify when used_event lies in (since, used], in the ring's wrapping index space
        // (vring_need_event in the VIRTIO spec and Linux).
        used - Wrapping(u16::from_le(event)) - Wrapping(1) < used - since
    }
}

/// Asks the driver not to kick for the requests it makes available from now on, while the
/// worker polls the ring. With EVENT_IDX, virtio-queue's `disable_notification` leaves
/// `avail_event` where the last `enable_notification` put it, so the driver still kicks for
/// the first request after it, and that kick later wakes the worker for nothing. Here
/// `avail_event` goes one behind the next entry to take, an index the driver's index cannot
/// pass again while the entries in between wait. `enable_notification` puts it back when the
/// worker stops polling; a store the driver does not see yet costs one kick, nothing more.
pub(crate) fn hold_kicks(mem: &GuestMemoryMmap, queue: &Queue) {
    if !queue.event_idx_enabled() {
        return;
    }
    let offset = RING_HEADER + USED_ENTRY * usize::from(queue.size());
    if let Some(at) = queue.used_ring().checked_add(offset as u64) {
        let behind = queue.next_avail().wrapping_sub(1);
        // Outside guest memory: the queue is broken, and the next batch says so.
        let _ = mem.store(behind.to_le(), GuestAddress(at), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

    const SIZE: u16 = 8;
    const AVAIL: u64 = 0x1000;
    const USED: u64 = 0x2000;

    /// A queue of SIZE entries whose rings are at AVAIL and USED in `mem`.
    fn queue(event_idx: bool) -> Queue {
        let mut q = Queue::new(SIZE).expect("valid size");
        q.set_size(SIZE);
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_event_idx(event_idx);
        q.set_ready(true);
        q
    }

    fn one_region() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).expect("test mapping")
    }

    /// Two adjacent regions split at `at`, so that a ring can span both.
    fn split_at(at: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), at as usize), (GuestAddress(at), 0x10000)])
            .expect("test mappings")
    }

    fn make_available(mem: &GuestMemoryMmap, first: u16, heads: &[u16]) {
        for (i, &h) in heads.iter().enumerate() {
            let pos = u64::from(first.wrapping_add(i as u16) % SIZE);
            mem.write_obj(h.to_le(), GuestAddress(AVAIL + 4 + 2 * pos))
                .expect("in memory");
        }
        let idx = first.wrapping_add(heads.len() as u16);
        mem.write_obj(idx.to_le(), GuestAddress(AVAIL + 2))
            .expect("in memory");
    }

    fn used_entry(mem: &GuestMemoryMmap, pos: u16) -> (u32, u32) {
        let at = USED + 4 + 8 * u64::from(pos % SIZE);
        let id: u32 = mem.read_obj(GuestAddress(at)).expect("in memory");
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).expect("in memory");
        (u32::from_le(id), u32::from_le(len))
    }

    fn used_idx(mem: &GuestMemoryMmap) -> u16 {
        u16::from_le(mem.read_obj(GuestAddress(USED + 2)).expect("in memory"))
    }

    fn round_trip(mem: &GuestMemoryMmap) {
        let mut q = queue(false);
        // Start near the wrap of the 16-bit indices, so entries wrap in the ring and in u16.
        q.set_next_avail(65533);
        q.set_next_used(65533);
        make_available(mem, 65533, &[3, 1, 7, 0, 5]);
        let mut regions = RegionCache::new(mem);
        let ring = SplitRing::new(&mut regions, &q);
        let mut heads = Vec::new();
        assert!(!ring
            .take_available(&mut q, &mut heads, SIZE)
            .expect("valid ring"));
        assert_eq!(heads, [3, 1, 7, 0, 5]);
        assert_eq!(q.next_avail(), 2);
        // Nothing new: nothing taken.
        assert!(!ring
            .take_available(&mut q, &mut heads, SIZE)
            .expect("valid ring"));
        assert_eq!(heads.len(), 5);

        ring.add_used(&mut q, heads.iter().map(|&h| (h, u32::from(h) * 100)))
            .expect("valid ring");
        assert_eq!(q.next_used(), 2);
        assert_eq!(used_idx(mem), 2);
        for (i, &h) in heads.iter().enumerate() {
            let pos = 65533u16.wrapping_add(i as u16);
            assert_eq!(used_entry(mem, pos), (u32::from(h), u32::from(h) * 100));
        }
    }

    #[test]
    fn entries_round_trip_in_one_region() {
        let mem = one_region();
        round_trip(&mem);
    }

    #[test]
    fn entries_round_trip_across_two_regions() {
        // Both rings cross the boundary between the two regions.
        let mem = split_at(AVAIL + 8);
        round_trip(&mem);
        let mem = split_at(USED + 12);
        round_trip(&mem);
    }

    #[test]
    fn no_more_than_room_is_taken() {
        let mem = one_region();
        let mut q = queue(false);
        make_available(&mem, 0, &[4, 2, 6, 1, 3]);
        let mut regions = RegionCache::new(&mem);
        let ring = SplitRing::new(&mut regions, &q);
        let mut heads = Vec::new();
        assert!(ring
            .take_available(&mut q, &mut heads, 2)
            .expect("valid ring"));
        assert_eq!((heads.as_slice(), q.next_avail()), (&[4, 2][..], 2));
        assert!(ring
            .take_available(&mut q, &mut heads, 0)
            .expect("valid ring"));
        assert_eq!(q.next_avail(), 2);
        assert!(!ring
            .take_available(&mut q, &mut heads, 3)
            .expect("valid ring"));
        assert_eq!(
            (heads.as_slice(), q.next_avail()),
            (&[4, 2, 6, 1, 3][..], 5)
        );
    }

    #[test]
    fn a_driver_claiming_too_many_entries_is_refused() {
        let mem = one_region();
        let mut q = queue(false);
        mem.write_obj((SIZE + 1).to_le(), GuestAddress(AVAIL + 2))
            .expect("in memory");
        let mut regions = RegionCache::new(&mem);
        let ring = SplitRing::new(&mut regions, &q);
        let mut heads = Vec::new();
        assert!(ring.take_available(&mut q, &mut heads, SIZE).is_err());
        assert!(heads.is_empty());
        assert_eq!(q.next_avail(), 0);
    }

    #[test]
    fn rings_outside_guest_memory_are_errors() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1800)]).expect("mapping");
        let mut q = queue(false);
        let mut regions = RegionCache::new(&mem);
        let ring = SplitRing::new(&mut regions, &q);
        assert!(ring
            .take_available(&mut q, &mut Vec::new(), SIZE)
            .is_ok_and(|left| !left && q.next_avail() == 0));
        assert!(ring.add_used(&mut q, [(0, 1)].into_iter()).is_err());
    }

    #[test]
    fn notifications_follow_used_event() {
        let mem = one_region();
        let mut q = queue(true);
        let used_event = GuestAddress(AVAIL + 4 + 2 * u64::from(SIZE));
        let mut regions = RegionCache::new(&mem);
        let ring = SplitRing::new(&mut regions, &q);
        for (since, added, event, expected) in [
            // The driver wants to hear when entry 2 (index 3) is used.
            (0u16, 2u16, 2u16, false),
            (0, 3, 2, true),
            (3, 5, 2, false),
            // Across the 16-bit wrap.
            (65534, 3, 0, true),
            (65534, 1, 0, false),
            // Nothing added: nothing to tell.
            (5, 0, 4, false),
        ] {
            q.set_next_used(since);
            mem.write_obj(event.to_le(), used_event).expect("in memory");
            ring.add_used(&mut q, (0..added).map(|_| (0, 0)))
                .expect("valid ring");
            assert_eq!(
                ring.needs_notification(&q, since),
                expected,
                "since {since}, {added} added, used_event {event}"
            );
        }
        // Without EVENT_IDX every new entry is notified.
        let q = {
            let mut q = queue(false);
            q.set_next_used(1);
            q
        };
        let ring = SplitRing::new(&mut regions, &q);
        assert!(ring.needs_notification(&q, 0));
        assert!(!ring.needs_notification(&q, 1));
    }

    /// Whether a driver that moves the available index from `old` to `new` kicks
    /// (vring_need_event in Linux's virtio_ring, with the device's `avail_event`).
    fn driver_kicks(mem: &GuestMemoryMmap, old: u16, new: u16) -> bool {
        let at = GuestAddress(USED + 4 + 8 * u64::from(SIZE));
        let event = u16::from_le(mem.read_obj(at).expect("in memory"));
        new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
    }

    #[test]
    fn held_kicks_stay_held_until_notifications_are_enabled() {
        let mem = one_region();
        for next in [0u16, 5, 65535] {
            let mut q = queue(true);
            q.set_next_avail(next);
            q.enable_notification(&mem).expect("in memory");
            assert!(
                driver_kicks(&mem, next, next.wrapping_add(1)),
                "enabled: the next request kicks"
            );
            hold_kicks(&mem, &q);
            for (old, new) in [(0u16, 1u16), (0, 3), (1, 2), (3, 8)] {
                let (old, new) = (next.wrapping_add(old), next.wrapping_add(new));
                assert!(
                    !driver_kicks(&mem, old, new),
                    "held at {next}: no kick from {old} to {new}"
                );
            }
            q.enable_notification(&mem).expect("in memory");
            assert!(
                driver_kicks(&mem, next, next.wrapping_add(1)),
                "enabled again: the next request kicks"
            );
        }
        // Without EVENT_IDX the used ring's flags do the job: nothing is written.
        let q = queue(false);
        let at = GuestAddress(USED + 4 + 8 * u64::from(SIZE));
        mem.write_obj(0x1234u16, at).expect("in memory");
        hold_kicks(&mem, &q);
        assert_eq!(mem.read_obj::<u16>(at).expect("in memory"), 0x1234);
    }

    /// A queue of `size` entries with its rings at `avail` and `used`.
    fn queue_at(size: u16, avail: u64, used: u64, event_idx: bool) -> Queue {
        let mut q = Queue::new(256).expect("valid size");
        q.set_size(size);
        q.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
        q.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        q.set_event_idx(event_idx);
        q.set_ready(true);
        q
    }

    /// One ring state a driver can leave: what the property test generates and a corpus file
    /// holds.
    #[derive(Debug)]
    struct RingCase {
        size: u16,
        /// Guest memory regions: one of 64 KiB, or two adjacent ones split here.
        split: Option<u64>,
        avail: u64,
        used: u64,
        event_idx: bool,
        entries: Vec<u16>,
        avail_idx: u16,
        used_event: u16,
        next_avail: u16,
        next_used: u16,
        room: u16,
        /// Entries to put in the used ring.
        add: u16,
    }

    /// Runs `case` through take_available, add_used and needs_notification against what the
    /// split ring's rules say.
    fn check_ring(c: &RingCase) -> Result<(), proptest::test_runner::TestCaseError> {
        use proptest::{prop_assert, prop_assert_eq};
        let mem = match c.split {
            None => one_region(),
            Some(at) => split_at(at),
        };
        // virtio-queue keeps the rings at 0 when given a misaligned address.
        let mut q = queue_at(c.size, c.avail, c.used, c.event_idx);
        let (avail, used) = (q.avail_ring(), q.used_ring());
        let size = u64::from(c.size);
        let avail_len = 4 + 2 * size + 2;
        let used_len = 4 + 8 * size;
        let end = mem
            .iter()
            .map(|r| r.start_addr().0 + r.len())
            .max()
            .unwrap_or(0);
        let avail_in = avail.checked_add(avail_len).is_some_and(|e| e <= end);
        let used_in = used.checked_add(used_len).is_some_and(|e| e <= end);
        if avail_in {
            let a = GuestAddress(avail);
            mem.write_obj(c.avail_idx.to_le(), a.unchecked_add(2))
                .expect("in memory");
            for (i, e) in c.entries.iter().take(usize::from(c.size)).enumerate() {
                mem.write_obj(e.to_le(), a.unchecked_add(4 + 2 * i as u64))
                    .expect("in memory");
            }
            mem.write_obj(c.used_event.to_le(), a.unchecked_add(4 + 2 * size))
                .expect("in memory");
        }
        q.set_next_avail(c.next_avail);
        q.set_next_used(c.next_used);
        let mut regions = RegionCache::new(&mem);
        let ring = SplitRing::new(&mut regions, &q);

        let mut heads = Vec::new();
        let taken = ring.take_available(&mut q, &mut heads, c.room);
        let count = c.avail_idx.wrapping_sub(c.next_avail);
        match taken {
            Ok(left) => {
                prop_assert!(avail_in || count == 0, "read a ring outside memory");
                prop_assert!(count <= c.size, "took from a driver a queue size ahead");
                let n = count.min(c.room);
                prop_assert_eq!(left, count > c.room);
                prop_assert_eq!(heads.len(), usize::from(n));
                prop_assert_eq!(q.next_avail(), c.next_avail.wrapping_add(n));
                for (i, &h) in heads.iter().enumerate() {
                    let pos = usize::from(c.next_avail.wrapping_add(i as u16) % c.size);
                    prop_assert_eq!(h, c.entries[pos]);
                }
            }
            Err(_) => {
                prop_assert!(!avail_in || count > c.size, "refused a valid ring");
                prop_assert_eq!(q.next_avail(), c.next_avail, "moved on a refused ring");
            }
        }

        let added = ring.add_used(&mut q, (0..c.add).map(|i| (i, u32::from(i) * 512)));
        if used_in {
            prop_assert!(added.is_ok());
            let new_used = c.next_used.wrapping_add(c.add);
            prop_assert_eq!(q.next_used(), new_used);
            let idx: u16 = mem.read_obj(GuestAddress(used + 2)).expect("in memory");
            prop_assert_eq!(u16::from_le(idx), new_used);
            for i in 0..c.add {
                let pos = u64::from(c.next_used.wrapping_add(i) % c.size);
                let at = GuestAddress(used + 4 + 8 * pos);
                let id: u32 = mem.read_obj(at).expect("in memory");
                let len: u32 = mem.read_obj(at.unchecked_add(4)).expect("in memory");
                prop_assert_eq!(
                    (u32::from_le(id), u32::from_le(len)),
                    (u32::from(i), u32::from(i) * 512)
                );
            }
            let notify = ring.needs_notification(&q, c.next_used);
            let apart = avail + avail_len <= used || used + used_len <= avail;
            if c.add > 0 && c.event_idx && avail_in && !apart {
                // The used entries overwrote used_event: whatever it now says goes.
                return Ok(());
            }
            let expected = if c.add == 0 {
                false
            } else if !c.event_idx || !avail_in {
                true
            } else {
                // vring_need_event: used_event lies in (old, new].
                new_used.wrapping_sub(c.used_event).wrapping_sub(1) < c.add
            };
            prop_assert_eq!(notify, expected);
        } else {
            // A ring partly in memory: the entries that land in memory are written; the index
            // is published only when it and every entry could be.
            if added.is_ok() {
                let idx: u16 = mem.read_obj(GuestAddress(used + 2)).expect("published");
                prop_assert_eq!(u16::from_le(idx), c.next_used.wrapping_add(c.add));
            }
        }
        Ok(())
    }

    /// Reads a ring corpus file: `key value` lines for the fields of [`RingCase`] (`entries`
    /// takes a list, `event_idx` and `split` are optional); `#` starts a comment.
    fn read_ring_case(text: &str) -> RingCase {
        let mut c = RingCase {
            size: 0,
            split: None,
            avail: 0x1000,
            used: 0x2000,
            event_idx: false,
            entries: vec![0; 256],
            avail_idx: 0,
            used_event: 0,
            next_avail: 0,
            next_used: 0,
            room: 0,
            add: 0,
        };
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or_default();
            let mut words = line.split_whitespace();
            let Some(key) = words.next() else { continue };
            let nums: Vec<u64> = words
                .map(|w| {
                    match w.strip_prefix("0x") {
                        Some(hex) => u64::from_str_radix(hex, 16),
                        None => w.parse(),
                    }
                    .unwrap_or_else(|e| panic!("bad number {w:?} in {line:?}: {e}"))
                })
                .collect();
            let one = || nums.first().copied().unwrap_or(1);
            match key {
                "size" => c.size = one() as u16,
                "split" => c.split = Some(one()),
                "avail" => c.avail = one(),
                "used" => c.used = one(),
                "event_idx" => c.event_idx = true,
                "entries" => {
                    for (e, &n) in c.entries.iter_mut().zip(&nums) {
                        *e = n as u16;
                    }
                }
                "avail_idx" => c.avail_idx = one() as u16,
                "used_event" => c.used_event = one() as u16,
                "next_avail" => c.next_avail = one() as u16,
                "next_used" => c.next_used = one() as u16,
                "room" => c.room = one() as u16,
                "add" => c.add = one() as u16,
                other => panic!("unknown corpus key {other:?}"),
            }
        }
        c
    }

    /// Every ring state in the committed corpus (vhost/fuzz-corpus/rings: the hostile rings
    /// found so far) follows the property test's rules.
    #[test]
    fn the_ring_corpus_follows_the_split_ring_rules() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz-corpus/rings");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("corpus directory") {
            let path = entry.expect("corpus entry").path();
            let text = std::fs::read_to_string(&path).expect("corpus file");
            if let Err(e) = check_ring(&read_ring_case(&text)) {
                panic!("{}: {e}", path.display());
            }
            n += 1;
        }
        assert!(n >= 5, "only {n} corpus files in {}", dir.display());
    }

    fn any_ring_addr() -> impl proptest::strategy::Strategy<Value = u64> {
        use proptest::prelude::*;
        prop_oneof![
            // In the first region, across the split, near or past the end, far outside.
            Just(0x1000u64),
            0x7000u64..0x9000,
            0x1_0000u64..0x2_0000,
            Just(0x7000_0000),
            any::<u64>(),
        ]
    }

    proptest::proptest! {
        // Bounded here (the test command); scripts/fuzz.sh runs many more.
        #![proptest_config(proptest::test_runner::Config {
            cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(512),
            ..proptest::test_runner::Config::default()
        })]

        /// Whatever a driver leaves in its rings and indices, and wherever it puts them, the
        /// device takes exactly the new entries it has room for (none from a driver a queue
        /// size ahead), publishes used entries where they belong, and notifies as the driver
        /// asked; it never panics.
        #[test]
        fn any_ring_state_follows_the_split_ring_rules(
            size_log in 0u32..9,
            // Regions start at page boundaries, as mappings do.
            split in proptest::option::of(proptest::strategy::Strategy::prop_map(7u64..10, |p| p * 0x1000)),
            avail in any_ring_addr(),
            used in any_ring_addr(),
            event_idx in proptest::prelude::any::<bool>(),
            entries in proptest::collection::vec(proptest::prelude::any::<u16>(), 256),
            avail_idx in proptest::prelude::any::<u16>(),
            used_event in proptest::prelude::any::<u16>(),
            next_avail in proptest::prelude::any::<u16>(),
            next_used in proptest::prelude::any::<u16>(),
            room in 0u16..=256,
            add in 0u16..=256,
            near in proptest::prelude::any::<bool>(),
        ) {
            let size = 1u16 << size_log;
            // Half the cases have the driver within a queue size of the device.
            let avail_idx = if near { next_avail.wrapping_add(avail_idx % (size + 1)) } else { avail_idx };
            check_ring(&RingCase {
                size, split, avail, used, event_idx, entries, avail_idx, used_event,
                next_avail, next_used, room: room.min(size), add: add.min(size),
            })?;
        }
    }
}
