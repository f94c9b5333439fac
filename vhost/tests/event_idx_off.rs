//! A driver that does not negotiate VIRTIO_RING_F_EVENT_IDX (issue 17, item 5), as QEMU's
//! `event_idx=off` does: its I/O is served, it is notified of completions through the call
//! eventfd (a driver that sleeps until notified does not hang), the driver's
//! VRING_AVAIL_F_NO_INTERRUPT flag is harmless (the device may ignore it, as virtio-queue
//! does, but must still complete everything), and the device never writes the avail_event
//! word, which without the feature is not part of the used ring. The same run with EVENT_IDX negotiated
//! is the control: the device then does write avail_event, so the check can fail.

mod common;

use std::os::fd::AsRawFd;
use std::time::Duration;

use common::frontend::*;
use common::*;
use vhost::vhost_user::Frontend;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const DISK: u64 = 16 << 20;
/// Large enough for BATCH three-descriptor chains.
const QSIZE: u16 = 256;
const MEM: u64 = 2 << 20;
/// Requests in flight at once, each 4 KiB with its own header, status and data.
const BATCH: u16 = 64;
const HDRS: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// What the avail_event word holds before the device writes it.
const AVAIL_EVENT_UNTOUCHED: u16 = 0xAAAA;

struct Guest {
    mem: GuestMemoryMmap,
    _fe: Frontend,
    q: Vring,
    event_idx: bool,
}

impl Guest {
    fn connect(disk: &Disk, event_idx: bool) -> Guest {
        let mask = if event_idx {
            u64::MAX
        } else {
            !FEATURE_EVENT_IDX
        };
        let mem = guest_memory(&[(0, MEM)]);
        let (mut fe, features) = negotiate_with_memory(&disk.socket(), mask, &mem);
        assert_eq!(features & FEATURE_EVENT_IDX != 0, event_idx);
        mem.write_obj(AVAIL_EVENT_UNTOUCHED, GuestAddress(Self::avail_event()))
            .expect("avail_event");
        let q = Vring::setup(&mut fe, &mem, 0, 0, QSIZE);
        Guest {
            mem,
            _fe: fe,
            q,
            event_idx,
        }
    }

    /// The used ring's trailing avail_event word (EVENT_IDX only).
    fn avail_event() -> u64 {
        USED + 4 + 8 * u64::from(QSIZE)
    }

    /// The available ring's trailing used_event word (EVENT_IDX only).
    fn used_event() -> u64 {
        AVAIL + 4 + 2 * u64::from(QSIZE)
    }

    fn set_avail_flags(&self, flags: u16) {
        self.mem
            .write_obj(flags.to_le(), GuestAddress(AVAIL))
            .expect("avail flags");
    }

    /// Queues BATCH 4 KiB requests (writes of `tag`'s pattern, or reads) at sectors 0.., each
    /// with its own header, status byte and data buffer.
    fn queue_batch(&mut self, write: bool, tag: u64) {
        for i in 0..BATCH {
            let hdr = HDRS + u64::from(i) * 0x20;
            let data = DATA + u64::from(i) * 4096;
            let sector = u64::from(i) * 8;
            let typ = if write { T_OUT } else { T_IN };
            write_header(&self.mem, hdr, hdr + 16, typ, sector);
            let buf = if write {
                pattern(tag, sector * 512, 4096)
            } else {
                vec![UNTOUCHED; 4096]
            };
            self.mem
                .write_slice(&buf, GuestAddress(data))
                .expect("data");
            let d = 3 * i;
            let w = if write { 0 } else { F_WRITE };
            self.q.desc(&self.mem, d, hdr, 16, F_NEXT, d + 1);
            self.q.desc(&self.mem, d + 1, data, 4096, F_NEXT | w, d + 2);
            self.q.desc(&self.mem, d + 2, hdr + 16, 1, F_WRITE, 0);
            self.q.push(&self.mem, d);
        }
    }

    /// Waits for the call eventfd for up to `timeout`; true when it was signalled (and reads
    /// it, so the next wait needs a new notification).
    fn notified(&self, timeout: Duration) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.q.call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is a valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
        assert!(n >= 0, "poll: {}", std::io::Error::last_os_error());
        if n == 0 {
            return false;
        }
        self.q.call.read().expect("read call eventfd");
        true
    }

    /// Collects BATCH completions, sleeping on the call eventfd whenever nothing new is in the
    /// used ring, as an interrupt-driven driver does; with EVENT_IDX it first asks to be
    /// notified of the next completion (used_event). Returns the notifications received.
    fn wait_batch_by_notification(&mut self) -> u32 {
        let mut got = 0u16;
        let mut notifications = 0;
        while got < BATCH {
            if self.event_idx {
                self.mem
                    .write_obj(self.q.used_seen.to_le(), GuestAddress(Self::used_event()))
                    .expect("used_event");
                std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            }
            // Entries published before used_event was set: take them, then ask again.
            if self.q.used_idx(&self.mem) != self.q.used_seen {
                while self.q.used_idx(&self.mem) != self.q.used_seen {
                    let used = self.q.next_used(&self.mem, Duration::ZERO);
                    self.check_completion(used);
                    got += 1;
                }
                continue;
            }
            assert!(
                self.notified(REPLY_TIMEOUT),
                "no notification in {REPLY_TIMEOUT:?} with {got}/{BATCH} complete \
                 (EVENT_IDX: {})",
                self.event_idx
            );
            notifications += 1;
        }
        notifications
    }

    fn check_completion(&self, used: Option<(u32, u32)>) {
        let (id, len) = used.expect("a used entry");
        let i = u64::from(id / 3);
        let status: u8 = self
            .mem
            .read_obj(GuestAddress(HDRS + i * 0x20 + 16))
            .expect("status");
        assert_eq!(status, S_OK, "request {i}");
        assert!(len == 1 || len == 4097, "request {i}: used length {len}");
    }

    /// The BATCH blocks read back into the data buffers equal `tag`'s pattern.
    fn check_read_back(&self, tag: u64) {
        let mut back = vec![0u8; 4096];
        for i in 0..u64::from(BATCH) {
            self.mem
                .read_slice(&mut back, GuestAddress(DATA + i * 4096))
                .expect("data");
            assert!(back == pattern(tag, i * 8 * 512, 4096), "block {i}");
        }
    }

    fn avail_event_word(&self) -> u16 {
        self.mem
            .read_obj(GuestAddress(Self::avail_event()))
            .expect("avail_event")
    }
}

#[test]
fn io_without_event_idx_is_notified_and_no_interrupt_is_harmless() {
    let disk = Disk::new(DISK, "");
    let _export = disk.export(|c| c.queue_size = QSIZE);
    for event_idx in [false, true] {
        let tag = 1 + u64::from(event_idx);
        let mut g = Guest::connect(&disk, event_idx);
        // Notifications wanted: the driver sleeps until told of completions.
        g.set_avail_flags(0);
        g.queue_batch(true, tag);
        let n_write = g.wait_batch_by_notification();
        assert!(
            disk.file_bytes(0, 4096 * BATCH as usize) == pattern_blocks(tag),
            "the disk after the writes (EVENT_IDX: {event_idx})"
        );
        g.queue_batch(false, 0);
        let n_read = g.wait_batch_by_notification();
        g.check_read_back(tag);
        eprintln!(
            "EVENT_IDX {event_idx}: {n_write} notifications for {BATCH} writes, {n_read} for \
             {BATCH} reads"
        );
        if event_idx {
            // The control: with the feature the device publishes avail_event (the index it
            // has reached when it last turned notifications on, so not a fixed value).
            assert_ne!(
                g.avail_event_word(),
                AVAIL_EVENT_UNTOUCHED,
                "avail_event with EVENT_IDX"
            );
            continue;
        }
        // Notifications not wanted: the device completes the requests without signalling.
        g.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT);
        while g.notified(Duration::ZERO) {}
        g.queue_batch(false, 0);
        for _ in 0..BATCH {
            let used = g.q.next_used(&g.mem, REPLY_TIMEOUT);
            g.check_completion(used);
        }
        g.check_read_back(tag);
        // The device may still notify (strata, like virtio-queue, does not read the flag: a
        // needless notification is harmless); the driver just finds nothing more to do.
        eprintln!(
            "notified with VRING_AVAIL_F_NO_INTERRUPT set: {}",
            g.notified(Duration::from_millis(100))
        );
        // Without EVENT_IDX the used ring ends before avail_event: the device left it alone.
        assert_eq!(
            g.avail_event_word(),
            AVAIL_EVENT_UNTOUCHED,
            "the word after the used ring, without EVENT_IDX"
        );
    }
}

/// BATCH consecutive 4 KiB blocks of `tag`'s pattern, as `queue_batch` writes them.
fn pattern_blocks(tag: u64) -> Vec<u8> {
    (0..u64::from(BATCH))
        .flat_map(|i| pattern(tag, i * 8 * 512, 4096))
        .collect()
}
