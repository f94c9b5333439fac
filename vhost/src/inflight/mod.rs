//! In-flight request tracking in a buffer the frontend keeps across reconnects
//! (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD, the vhost-user specification's "Inflight I/O
//! tracking", split virtqueues).
//!
//! strata completes requests out of order, so after a crash the available ring alone cannot
//! tell which requests were done: QEMU rewinds to the used index, and a new daemon would
//! complete some requests twice and lose others. Instead every request is marked in this
//! buffer (one entry per descriptor head, with a fetch counter) when it is taken, and
//! cleared when its used entry is published; the used entries of a batch are linked from
//! `last_batch_head` while they are published. A daemon that finds marked entries when a
//! queue starts repairs the last batch, resubmits them in their original order, and starts
//! taking new requests after them ([`QueueLog::recover`]).
//!
//! The daemon creates the buffer (GET_INFLIGHT_FD, a sealed memfd) and the frontend hands it
//! back to the next daemon (SET_INFLIGHT_FD). The frontend can write it at any time, so every
//! index read from it is checked; only the frontend's own requests can suffer from what it
//! writes there.

mod tracker;

pub(crate) use tracker::Tracker;

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, FileOffset, VolatileMemory, VolatileSlice};

/// The region layout's version.
const VERSION: u16 = 1;
/// Bytes of a queue region's header: features (u64), version, desc_num, last_batch_head,
/// used_idx (u16 each).
const HEADER: usize = 16;
const VERSION_AT: usize = 8;
const DESC_NUM_AT: usize = 10;
const LAST_BATCH_HEAD_AT: usize = 12;
const USED_IDX_AT: usize = 14;
/// Bytes of one descriptor's state: inflight (u8), padding, next (u16 at 6), counter (u64 at 8).
const DESC: usize = 16;
const NEXT_AT: usize = 6;
const COUNTER_AT: usize = 8;
/// Queue regions are aligned to this, as libvhost-user lays them out (so a buffer made by
/// another vhost-user backend reads the same).
const ALIGN: usize = 64;
/// The most virtqueues and entries per virtqueue a buffer may describe.
const MAX_QUEUES: u16 = 64;
const MAX_QUEUE_SIZE: u16 = 32768;

/// Bytes of one queue's region for a `queue_size`-entry virtqueue (libvhost-user's
/// `vu_inflight_queue_size`).
fn queue_region_size(queue_size: u16) -> usize {
    (DESC * usize::from(queue_size) + 2).div_ceil(ALIGN) * ALIGN
}

/// The buffer's description in GET_INFLIGHT_FD and SET_INFLIGHT_FD (`VhostUserInflight`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Description {
    pub mmap_size: u64,
    pub mmap_offset: u64,
    pub num_queues: u16,
    pub queue_size: u16,
}

impl Description {
    /// Its bytes in a message.
    pub(crate) const LEN: usize = 24;

    pub(crate) fn parse(payload: &[u8]) -> Option<Self> {
        if payload.len() != Self::LEN {
            return None;
        }
        let u64_at = |i: usize| u64::from_le_bytes(payload[i..i + 8].try_into().unwrap_or([0; 8]));
        let u16_at = |i: usize| u16::from_le_bytes([payload[i], payload[i + 1]]);
        Some(Description {
            mmap_size: u64_at(0),
            mmap_offset: u64_at(8),
            num_queues: u16_at(16),
            queue_size: u16_at(18),
        })
    }

    pub(crate) fn to_bytes(self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..8].copy_from_slice(&self.mmap_size.to_le_bytes());
        b[8..16].copy_from_slice(&self.mmap_offset.to_le_bytes());
        b[16..18].copy_from_slice(&self.num_queues.to_le_bytes());
        b[18..20].copy_from_slice(&self.queue_size.to_le_bytes());
        b
    }

    fn check(&self) -> io::Result<()> {
        if self.num_queues == 0 || self.num_queues > MAX_QUEUES {
            return Err(invalid(format!(
                "{} queues (at most {MAX_QUEUES})",
                self.num_queues
            )));
        }
        if self.queue_size == 0 || self.queue_size > MAX_QUEUE_SIZE {
            return Err(invalid(format!(
                "queue size {} (at most {MAX_QUEUE_SIZE})",
                self.queue_size
            )));
        }
        Ok(())
    }

    fn needed(&self) -> usize {
        queue_region_size(self.queue_size) * usize::from(self.num_queues)
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("in-flight buffer: {msg}"),
    )
}

/// The in-flight buffer of one connection, mapped.
pub(crate) struct Region {
    map: MmapRegion<()>,
    queue_size: u16,
    num_queues: u16,
}

impl Region {
    /// Makes a new, zeroed buffer as GET_INFLIGHT_FD asks (`req`'s queue count and size):
    /// a memfd sealed against resizing (so neither side can make the other fault on it).
    /// Returns it, its descriptor for the frontend and its description.
    pub(crate) fn create(req: &Description) -> io::Result<(Region, OwnedFd, Description)> {
        req.check()?;
        let size = req.needed();
        // SAFETY: memfd_create takes a NUL-terminated name; the result is checked.
        let fd = unsafe {
            libc::memfd_create(
                c"strata-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let file = File::from(fd.try_clone()?);
        file.set_len(size as u64)?;
        let seals = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
        // SAFETY: F_ADD_SEALS takes an int argument and touches no memory of ours.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let desc = Description {
            mmap_size: size as u64,
            mmap_offset: 0,
            num_queues: req.num_queues,
            queue_size: req.queue_size,
        };
        let region = Region::map(file, &desc)?;
        // Born initialised: a daemon that dies before a queue's first start still leaves a
        // buffer whose marks the next one recovers (a zero version means "new, ignore").
        for queue in 0..usize::from(req.num_queues) {
            if let Some(log) = region.queue(queue, req.queue_size) {
                log.store16(DESC_NUM_AT, req.queue_size);
                log.store16(VERSION_AT, VERSION);
            }
        }
        Ok((region, fd, desc))
    }

    /// Maps the buffer a frontend hands back (SET_INFLIGHT_FD). It must be a file sealed
    /// against shrinking (as the ones [`Region::create`] makes), large enough for what it
    /// claims to hold.
    pub(crate) fn open(fd: &OwnedFd, desc: &Description) -> io::Result<Region> {
        desc.check()?;
        let file = File::from(fd.try_clone()?);
        // SAFETY: F_GET_SEALS only reads the seals of a descriptor we hold open.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(invalid(
                "its file is not sealed against shrinking (a truncation would fault)".into(),
            ));
        }
        let len = file.metadata()?.len();
        let needed = desc.needed() as u64;
        if desc.mmap_size < needed
            || desc
                .mmap_offset
                .checked_add(desc.mmap_size)
                .is_none_or(|end| end > len)
        {
            return Err(invalid(format!(
                "mmap_offset {:#x} + mmap_size {:#x} in a {len}-byte file, {needed} bytes needed",
                desc.mmap_offset, desc.mmap_size
            )));
        }
        Region::map(file, desc)
    }

    fn map(file: File, desc: &Description) -> io::Result<Region> {
        let map = MmapRegion::build(
            Some(FileOffset::new(file, desc.mmap_offset)),
            desc.needed(),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
        .map_err(|e| io::Error::other(format!("could not map the in-flight buffer: {e}")))?;
        Ok(Region {
            map,
            queue_size: desc.queue_size,
            num_queues: desc.num_queues,
        })
    }

    /// The log of virtqueue `queue`, whose size is `size`; None when the buffer does not
    /// describe it (fewer queues, another size).
    pub(crate) fn queue(&self, queue: usize, size: u16) -> Option<QueueLog<'_>> {
        if queue >= usize::from(self.num_queues) || size != self.queue_size {
            return None;
        }
        let len = queue_region_size(self.queue_size);
        let slice = self
            .map
            .as_volatile_slice()
            .subslice(queue * len, len)
            .ok()?;
        Some(QueueLog { slice, size })
    }
}

/// One virtqueue's part of the buffer.
pub(crate) struct QueueLog<'a> {
    slice: VolatileSlice<'a>,
    size: u16,
}

/// What a queue's log said when the queue started.
pub(crate) struct Recovered {
    /// Heads of the requests in flight at the last disconnect, in the order they were taken.
    pub heads: Vec<u16>,
    /// The next fetch counter (above every counter in the log).
    pub counter: u64,
}

impl QueueLog<'_> {
    fn load16(&self, at: usize) -> u16 {
        u16::from_le(self.slice.load(at, Ordering::Acquire).unwrap_or(0))
    }

    fn store16(&self, at: usize, v: u16) {
        let _ = self.slice.store(v.to_le(), at, Ordering::Release);
    }

    fn desc(head: u16) -> usize {
        HEADER + DESC * usize::from(head)
    }

    fn inflight(&self, head: u16) -> bool {
        self.slice
            .load::<u8>(Self::desc(head), Ordering::Acquire)
            .unwrap_or(0)
            == 1
    }

    fn set_inflight(&self, head: u16, on: bool) {
        let _ = self
            .slice
            .store(u8::from(on), Self::desc(head), Ordering::Release);
    }

    /// Marks `head` in flight with fetch counter `counter` (before its request starts).
    #[inline]
    pub(crate) fn mark(&self, head: u16, counter: u64) {
        if head >= self.size {
            return;
        }
        let at = Self::desc(head);
        let _ = self
            .slice
            .store(counter.to_le(), at + COUNTER_AT, Ordering::Relaxed);
        self.set_inflight(head, true);
    }

    /// Links the heads about to be published into the last-batch list (before the used
    /// entries are written).
    #[inline]
    pub(crate) fn begin_publish(&self, heads: impl Iterator<Item = u16>) {
        for head in heads.filter(|&h| h < self.size) {
            let last = self.load16(LAST_BATCH_HEAD_AT);
            self.store16(Self::desc(head) + NEXT_AT, last);
            self.store16(LAST_BATCH_HEAD_AT, head);
        }
    }

    /// Clears the heads just published and records the used index that covers them (after
    /// the used index was stored).
    #[inline]
    pub(crate) fn end_publish(&self, heads: impl Iterator<Item = u16>, used_idx: u16) {
        for head in heads.filter(|&h| h < self.size) {
            self.set_inflight(head, false);
        }
        self.store16(USED_IDX_AT, used_idx);
    }

    /// Reads the log when its queue starts, with `ring_used_idx` the used ring's index in
    /// guest memory: a new log is initialised (None); otherwise the last batch is repaired
    /// as the specification says and the requests still marked are returned in the order
    /// they were taken.
    pub(crate) fn recover(&self, ring_used_idx: u16) -> Option<Recovered> {
        if self.load16(VERSION_AT) != VERSION || self.load16(DESC_NUM_AT) != self.size {
            // New (or of another layout): start it clean.
            for head in 0..self.size {
                self.set_inflight(head, false);
            }
            self.store16(DESC_NUM_AT, self.size);
            self.store16(LAST_BATCH_HEAD_AT, 0);
            self.store16(USED_IDX_AT, ring_used_idx);
            self.store16(VERSION_AT, VERSION);
            return None;
        }
        let logged = self.load16(USED_IDX_AT);
        if logged != ring_used_idx {
            // The daemon died between publishing a batch and clearing it: the batch's heads
            // are done. Follow its list, at most a queue's worth of links.
            let batch = ring_used_idx.wrapping_sub(logged).min(self.size);
            let mut head = self.load16(LAST_BATCH_HEAD_AT);
            for _ in 0..batch {
                if head >= self.size {
                    break;
                }
                self.set_inflight(head, false);
                head = self.load16(Self::desc(head) + NEXT_AT);
            }
            self.store16(USED_IDX_AT, ring_used_idx);
        }
        let mut marked: Vec<(u64, u16)> = (0..self.size)
            .filter(|&h| self.inflight(h))
            .map(|h| {
                let counter = self
                    .slice
                    .load::<u64>(Self::desc(h) + COUNTER_AT, Ordering::Acquire)
                    .map(u64::from_le)
                    .unwrap_or(0);
                (counter, h)
            })
            .collect();
        marked.sort_unstable();
        let counter = marked.last().map_or(0, |&(c, _)| c.wrapping_add(1));
        Some(Recovered {
            heads: marked.into_iter().map(|(_, h)| h).collect(),
            counter,
        })
    }
}

/// The connection's in-flight buffer, as the relay sets it and the workers read it: a
/// worker looks at `generation` (one atomic load per batch) and takes the lock only when the
/// buffer changed.
#[derive(Default)]
pub(crate) struct Shared {
    region: Mutex<Option<Arc<Region>>>,
    generation: AtomicU64,
}

impl Shared {
    /// Installs the buffer for the connection's queues (replacing any earlier one).
    pub(crate) fn set(&self, region: Region) {
        *self.region.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(region));
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// The buffer, if it changed since `seen` (which is updated).
    pub(crate) fn changed(&self, seen: &mut u64) -> Option<Option<Arc<Region>>> {
        let now = self.generation.load(Ordering::Acquire);
        if now == *seen {
            return None;
        }
        *seen = now;
        Some(
            self.region
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(queues: u16, size: u16) -> Region {
        let req = Description {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: queues,
            queue_size: size,
        };
        let (r, fd, desc) = Region::create(&req).expect("create");
        assert_eq!(
            desc.mmap_size as usize,
            queue_region_size(size) * queues as usize
        );
        // The frontend hands the same file back: it opens as well.
        Region::open(&fd, &desc).expect("open");
        r
    }

    #[test]
    fn region_sizes_match_libvhost_user() {
        assert_eq!(queue_region_size(256), 4160);
        assert_eq!(queue_region_size(128), 2112);
        assert_eq!(queue_region_size(1), 64);
    }

    #[test]
    fn requests_in_flight_come_back_in_the_order_they_were_taken() {
        let r = region(2, 8);
        let log = r.queue(1, 8).expect("queue 1");
        assert!(log.recover(0).expect("born initialised").heads.is_empty());
        // Taken: 6, 1, 4, 3; 1 completed out of order.
        for (i, h) in [6u16, 1, 4, 3].into_iter().enumerate() {
            log.mark(h, i as u64);
        }
        log.begin_publish([1u16].into_iter());
        log.end_publish([1u16].into_iter(), 1);
        let got = log.recover(1).expect("a log in use");
        assert_eq!(got.heads, [6, 4, 3]);
        assert_eq!(got.counter, 4);
        // The other queue's log is separate and new.
        assert!(r
            .queue(0, 8)
            .expect("queue 0")
            .recover(0)
            .expect("in use")
            .heads
            .is_empty());
        assert!(r.queue(2, 8).is_none());
        assert!(r.queue(0, 16).is_none());
    }

    /// A daemon can mark requests before the queue's first start is handled (its first look
    /// found no buffer yet): the next daemon must still find them.
    #[test]
    fn marks_made_before_a_first_start_are_recovered() {
        let r = region(1, 8);
        let log = r.queue(0, 8).expect("queue");
        log.mark(3, 0);
        log.mark(5, 1);
        assert_eq!(log.recover(0).expect("born initialised").heads, [3, 5]);
        // A zero version (a buffer no daemon initialised) is still new.
        log.store16(VERSION_AT, 0);
        assert!(log.recover(0).is_none());
    }

    #[test]
    fn a_batch_published_but_not_cleared_is_done() {
        let r = region(1, 8);
        let log = r.queue(0, 8).expect("queue");
        assert!(log.recover(5).expect("in use").heads.is_empty());
        for (i, h) in [2u16, 5, 7, 0].into_iter().enumerate() {
            log.mark(h, 10 + i as u64);
        }
        // 5 and 0 published (used index 5 -> 7), then the daemon died before clearing them.
        log.begin_publish([5u16, 0].into_iter());
        let got = log.recover(7).expect("in use");
        assert_eq!(got.heads, [2, 7]);
        // The repair was recorded: a second look agrees.
        assert_eq!(log.recover(7).expect("in use").heads, [2, 7]);
    }

    #[test]
    fn a_log_scribbled_by_the_frontend_is_bounded() {
        let r = region(1, 4);
        let log = r.queue(0, 4).expect("queue");
        assert!(log.recover(0).expect("in use").heads.is_empty());
        log.mark(1, 1);
        // Links that point outside the table or loop, and a used index far ahead.
        log.store16(LAST_BATCH_HEAD_AT, 3);
        log.store16(QueueLog::desc(3) + NEXT_AT, 3);
        log.mark(3, 0);
        let got = log.recover(60000).expect("in use");
        assert_eq!(got.heads, [1]);
        log.store16(LAST_BATCH_HEAD_AT, 999);
        log.store16(USED_IDX_AT, 0);
        assert_eq!(log.recover(3).expect("in use").heads, [1]);
    }

    #[test]
    fn descriptions_are_checked() {
        let bad = |queues, size| Description {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: queues,
            queue_size: size,
        };
        assert!(Region::create(&bad(0, 8)).is_err());
        assert!(Region::create(&bad(65, 8)).is_err());
        assert!(Region::create(&bad(1, 0)).is_err());
        let (_r, fd, mut desc) = Region::create(&bad(1, 8)).expect("create");
        desc.num_queues = 2;
        assert!(Region::open(&fd, &desc).is_err(), "larger than its file");
        // An unsealed file is refused.
        let plain = tempfile::tempfile().expect("tempfile");
        plain.set_len(4096).expect("size");
        let desc = bad(1, 8);
        let fd = OwnedFd::from(plain);
        assert!(Region::open(&fd, &desc).is_err());
        let d = Description {
            mmap_size: 4160,
            mmap_offset: 64,
            num_queues: 1,
            queue_size: 256,
        };
        assert_eq!(Description::parse(&d.to_bytes()), Some(d));
        assert_eq!(Description::parse(&[0; 20]), None);
    }
}
