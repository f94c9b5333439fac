//! A hostile guest or frontend against the real `strata` binary: it must not wedge the daemon,
//! kill it, or starve other queues, and the used lengths it reports must be honest.
//!
//! The guest is a hand-built split virtqueue in memfd-backed memory, driven through vhost's
//! `Frontend` (common/frontend.rs), with every socket read bounded by a timeout so that a
//! wedged daemon fails the test instead of hanging it.

mod common;

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::frontend::*;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

const QSIZE: u16 = 256;
const MEM: u64 = 4 << 20;
/// Each queue's rings and buffers: descriptors, avail, used, header, status, data.
const QUEUE_SPAN: u64 = 0x2_0000;
const HDR: u64 = 0x3000;
const STATUS: u64 = 0x3100;
const DATA: u64 = 0x4000;
/// An indirect table of 4096 descriptors.
const FLOOD_TABLE: u64 = 0x8000;

/// The null-co node's size: 1 GiB.
const DISK_SECTORS: u64 = (1 << 30) / 512;

const TIMEOUT: Duration = Duration::from_secs(5);

/// A guest with some virtqueues, each in its own QUEUE_SPAN of one memfd region.
struct Guest {
    mem: GuestMemoryMmap,
    /// Its connection: dropping it disconnects.
    fe: Frontend,
    queues: Vec<Vring>,
}

impl Guest {
    /// Connects to `socket` and sets up the virtqueues `queues` (any of GET_QUEUE_NUM).
    fn connect(socket: &std::path::Path, queues: &[usize]) -> Guest {
        let mem = guest_memory(&[(0, MEM)]);
        let (mut fe, _) = negotiate_with_memory(socket, u64::MAX, &mem);
        let queues = queues
            .iter()
            .enumerate()
            .map(|(k, &index)| Vring::setup(&mut fe, &mem, index, k as u64 * QUEUE_SPAN, QSIZE))
            .collect();
        Guest { mem, fe, queues }
    }

    /// Writes descriptor `index` of queue `k`'s table (`addr` relative to the queue's base).
    fn desc(&self, k: usize, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let base = self.queues[k].base;
        Vring::write_desc(&self.mem, base + DESC, index, base + addr, len, flags, next);
    }

    /// Writes a request header into queue `k`'s header buffer and fills its status and data
    /// buffers with UNTOUCHED.
    fn header(&self, k: usize, typ: u32, sector: u64) {
        let base = self.queues[k].base;
        write_header(&self.mem, base + HDR, base + STATUS, typ, sector);
        self.mem
            .write_slice(&[UNTOUCHED; 8192], GuestAddress(base + DATA))
            .expect("data");
    }

    /// Truncates the file behind guest memory to `len` bytes, as a hostile frontend may
    /// after sharing it. The guest must not touch memory past `len` afterwards.
    fn shrink_memory_file(&self, len: u64) {
        let region = self.mem.iter().next().expect("a region");
        let file = region.file_offset().expect("file-backed memory").file();
        file.set_len(len).expect("shrink the memory file");
    }

    fn byte(&self, k: usize, at: u64) -> u8 {
        self.mem
            .read_obj(GuestAddress(self.queues[k].base + at))
            .expect("byte")
    }

    /// Stores queue `k`'s available index as is and kicks.
    fn set_avail_idx(&mut self, k: usize, idx: u16) {
        self.queues[k].set_avail_idx(&self.mem, idx);
    }

    /// Makes `head` available on queue `k` and kicks.
    fn push(&mut self, k: usize, head: u16) {
        self.queues[k].push(&self.mem, head);
    }

    fn used_idx(&self, k: usize) -> u16 {
        self.queues[k].used_idx(&self.mem)
    }

    /// Waits for the next used entry of queue `k`: (descriptor id, length); None after
    /// `timeout`.
    fn next_used(&mut self, k: usize, timeout: Duration) -> Option<(u32, u32)> {
        self.queues[k].next_used(&self.mem, timeout)
    }

    /// A 4 KiB read of sector 0 on queue `k` (descriptors 0..3: header, data, status): its used
    /// length and status, or None when it does not complete within TIMEOUT.
    fn read(&mut self, k: usize) -> Option<(u32, u8)> {
        self.header(k, T_IN, 0);
        self.desc(k, 0, HDR, 16, F_NEXT, 1);
        self.desc(k, 1, DATA, 4096, F_NEXT | F_WRITE, 2);
        self.desc(k, 2, STATUS, 1, F_WRITE, 0);
        self.push(k, 0);
        let (id, len) = self.next_used(k, TIMEOUT)?;
        assert_eq!(id, 0);
        Some((len, self.byte(k, STATUS)))
    }
}

/// Issue 12, item 1: a driver that moves `avail.idx` more than a queue size ahead. Before the
/// fix the worker spun on that queue forever: its other queue starved, the connection never
/// ended (a new frontend got no answer), SIGTERM was ignored and the log grew by megabytes.
#[test]
fn an_avail_index_jump_stops_only_that_queue() {
    let mut d = Daemon::start(&[("a", ",num-queues=1"), ("b", "")]);
    // Queues 0 and 1 of export a, both run by its one worker thread.
    let mut g = Guest::connect(&d.socket("a"), &[0, 1]);
    assert_eq!(g.read(0), Some((4097, S_OK)));
    assert_eq!(g.read(1), Some((4097, S_OK)));

    // The frontend's error eventfd for queue 0 (SET_VRING_ERR) hears of the failure.
    let err = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    g.fe.set_vring_err(0, &err).expect("set_vring_err");
    assert!(err.read().is_err(), "error signalled before the ring broke");
    g.set_avail_idx(0, 300);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(err.read().ok(), Some(1), "queue 0's error eventfd");
    // The worker's other queue and the other export are served.
    assert_eq!(g.read(1), Some((4097, S_OK)), "queue 1 after queue 0 broke");
    let mut other = Guest::connect(&d.socket("b"), &[0]);
    assert_eq!(other.read(0), Some((4097, S_OK)), "export b");
    // The broken queue takes nothing more, and the daemon does not spin on it.
    let before = d.cpu_ticks();
    std::thread::sleep(Duration::from_secs(1));
    let ticks_per_s = 100; // USER_HZ
    let used = d.cpu_ticks() - before;
    assert!(
        used < ticks_per_s / 4,
        "daemon used {used} ticks of CPU in 1 s with a broken queue"
    );
    assert!(g.next_used(0, Duration::ZERO).is_none());
    // Logged once, not per look at the ring.
    let log = d.log_text();
    assert_eq!(
        log.matches("more than a queue size ahead").count(),
        1,
        "log:\n{log}"
    );

    // The connection ends cleanly and a new frontend starts clean.
    drop(g);
    let mut g = Guest::connect(&d.socket("a"), &[0]);
    assert_eq!(g.read(0), Some((4097, S_OK)), "queue 0 after a reconnect");
    // Break it again and stop the daemon while it is broken and connected.
    g.set_avail_idx(0, 1 + 2 * QSIZE);
    std::thread::sleep(Duration::from_millis(100));
    assert!(d.alive());
    d.terminate_within(Duration::from_secs(2));
}

/// Issue 12, item 4: a memory region longer than its file. Before the fix the daemon mapped
/// it, and its first access past the end of the file (here: the available ring) killed the
/// whole process with SIGBUS.
#[test]
fn a_memory_region_beyond_its_file_is_refused() {
    let mut d = Daemon::start(&[("a", "")]);
    let short = memfd(64 << 10);
    // The region claims 1 MiB of a 64 KiB file; its "user address" is only a name for it.
    let va = 0x7f00_0000_0000u64;
    let region = VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: 1 << 20,
        userspace_addr: va,
        mmap_offset: 0,
        mmap_handle: short.as_raw_fd(),
    };
    for add in [false, true] {
        let (mut fe, _) = negotiate(&d.socket("a"), u64::MAX);
        let refused = if add {
            fe.add_mem_region(&region).is_err()
        } else {
            fe.set_mem_table(std::slice::from_ref(&region)).is_err()
        };
        // Whatever the answer, go on as a guest would, with the rings past the end of the file.
        let kick = EventFd::new(0).expect("eventfd");
        let rings = va + (512 << 10);
        let _ = fe.set_vring_num(0, QSIZE);
        let _ = fe.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: rings,
                used_ring_addr: rings + USED,
                avail_ring_addr: rings + AVAIL,
                log_addr: None,
            },
        );
        let _ = fe.set_vring_base(0, 0);
        let _ = fe.set_vring_kick(0, &kick);
        let _ = fe.set_vring_enable(0, true);
        let _ = kick.write(1);
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            d.alive(),
            "strata died (add_mem_region: {add}); log:\n{}",
            d.log_text()
        );
        assert!(refused, "the region was accepted (add_mem_region: {add})");
        drop(fe);
        // The export takes the next frontend.
        let mut g = Guest::connect(&d.socket("a"), &[0]);
        assert_eq!(g.read(0), Some((4097, S_OK)));
    }
    assert!(d
        .log_text()
        .contains("memory_size 0x100000 lies beyond the end"));
}

/// Issue 12, item 5: a queue whose driver keeps publishing must not keep the worker from its
/// other queues. Before the fix the worker stayed on the flooded queue as long as the driver
/// kept up.
#[test]
fn a_flooded_queue_does_not_starve_the_other_queue_of_its_worker() {
    let d = Daemon::start(&[("a", ",num-queues=1")]);
    let mut g = Guest::connect(&d.socket("a"), &[0, 1]);
    // Queue 0: one GET_ID request at head 0, made available over and over, always a full
    // queue ahead of the used index. Its indirect table of 4096 descriptors (header, 4094
    // one-byte buffers, status) makes each request slow to parse, so that the driver keeps
    // ahead of the device even when its thread does not run for a while.
    g.header(0, T_GET_ID, 0);
    let last = 4095u16;
    let base = g.queues[0].base;
    for i in 0..=last {
        let (addr, len, flags) = match i {
            0 => (HDR, 16, F_NEXT),
            i if i == last => (STATUS, 1, F_WRITE),
            i => (DATA + u64::from(i), 1, F_NEXT | F_WRITE),
        };
        let next = i.wrapping_add(1);
        Vring::write_desc(&g.mem, base + FLOOD_TABLE, i, base + addr, len, flags, next);
    }
    g.desc(0, 0, FLOOD_TABLE, 16 * (u32::from(last) + 1), F_INDIRECT, 0);
    let stop = Arc::new(AtomicBool::new(false));
    let flood = {
        let mem = g.mem.clone();
        let stop = stop.clone();
        let base = g.queues[0].base;
        let kick = g.queues[0].kick.try_clone().expect("kick");
        std::thread::spawn(move || {
            let mut avail = 0u16;
            let mut published = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let used: u16 = mem
                    .load(GuestAddress(base + USED + 2), Ordering::Acquire)
                    .expect("used idx");
                if avail.wrapping_sub(used) >= QSIZE {
                    std::hint::spin_loop();
                    continue;
                }
                while avail.wrapping_sub(used) < QSIZE {
                    let slot = u64::from(avail % QSIZE);
                    mem.write_obj(0u16, GuestAddress(base + AVAIL + 4 + 2 * slot))
                        .expect("avail ring");
                    avail = avail.wrapping_add(1);
                    published += 1;
                }
                mem.store(
                    avail.to_le(),
                    GuestAddress(base + AVAIL + 2),
                    Ordering::Release,
                )
                .expect("avail idx");
                kick.write(1).expect("kick");
            }
            published
        })
    };
    // Let the flood get going, then ask for one read on queue 1.
    let start = Instant::now();
    while g.used_idx(0) < 2 * QSIZE && start.elapsed() < TIMEOUT {
        std::thread::sleep(Duration::from_millis(1));
    }
    let served = g.read(1);
    stop.store(true, Ordering::Relaxed);
    let published = flood.join().expect("flood thread");
    assert!(published > u64::from(2 * QSIZE), "the flood did not run");
    assert_eq!(
        served,
        Some((4097, S_OK)),
        "queue 1 while queue 0 is flooded"
    );
}

/// Runs the chain `descs` (address, length, flags) at head 0 of queue 0 with a `typ` header
/// at `sector`; returns its used entry.
fn run(g: &mut Guest, typ: u32, sector: u64, descs: &[(u64, u32, u16)]) -> (u32, u32) {
    g.header(0, typ, sector);
    for (i, &(addr, len, flags)) in descs.iter().enumerate() {
        let next = if i + 1 < descs.len() { F_NEXT } else { 0 };
        g.desc(0, i as u16, addr, len, flags | next, i as u16 + 1);
    }
    g.push(0, 0);
    g.next_used(0, TIMEOUT).expect("completion")
}

/// Issue 12, item 6: the used length counts the bytes the device wrote into device-writable
/// buffers, no more: with a zero-length last descriptor (the status byte then is the last
/// byte of the one before), and for refused or dropped chains.
#[test]
fn used_lengths_count_only_the_bytes_written() {
    let d = Daemon::start(&[("a", "")]);
    let mut g = Guest::connect(&d.socket("a"), &[0]);
    // A read whose status byte ends the data descriptor, followed by an empty one.
    let descs = [(HDR, 16, 0), (DATA, 4097, F_WRITE), (STATUS, 0, F_WRITE)];
    assert_eq!(run(&mut g, T_IN, 0, &descs), (0, 4097));
    assert_eq!(g.byte(0, DATA + 4096), S_OK);
    assert_eq!(g.byte(0, DATA), 0, "read-zeroes data");
    assert_eq!(g.byte(0, STATUS), UNTOUCHED);
    // GET_ID: 19 bytes of serial before the status byte, nothing in the empty descriptor.
    let descs = [(HDR, 16, 0), (DATA, 20, F_WRITE), (STATUS, 0, F_WRITE)];
    assert_eq!(run(&mut g, T_GET_ID, 0, &descs), (0, 20));
    // Refused (beyond the disk): only the status byte, whatever the chain's data buffers.
    let descs = [(HDR, 16, 0), (DATA, 4097, F_WRITE), (STATUS, 0, F_WRITE)];
    assert_eq!(run(&mut g, T_IN, DISK_SECTORS, &descs), (0, 1));
    assert_eq!(g.byte(0, DATA + 4096), S_IOERR);
    assert_eq!(g.byte(0, DATA), UNTOUCHED);
    let descs = [(HDR, 16, 0), (DATA, 4096, F_WRITE), (STATUS, 1, F_WRITE)];
    assert_eq!(run(&mut g, T_IN, DISK_SECTORS, &descs), (0, 1));
    assert_eq!(g.byte(0, STATUS), S_IOERR);
    // Only empty writable descriptors: no status byte, nothing written, length 0.
    let descs = [(HDR, 16, 0), (DATA, 0, F_WRITE), (STATUS, 0, F_WRITE)];
    assert_eq!(run(&mut g, T_IN, 0, &descs), (0, 0));
    assert_eq!(g.byte(0, DATA), UNTOUCHED);
    assert_eq!(g.byte(0, STATUS), UNTOUCHED);
    // And the device still serves.
    assert_eq!(g.read(0), Some((4097, S_OK)));
}

/// Issue 12, item 2: a driver that makes entries available again before their requests
/// complete (here: a full queue more every 5 ms, on requests that take 300 ms) must not get
/// more than a queue's worth of requests in flight. Before the fix the device took every
/// round: thousands of requests in flight on a 256-entry queue, each holding memory.
#[test]
fn requests_in_flight_never_exceed_the_queue_size() {
    let d = Daemon::start_with_nodes(",latency-ns=300000000", &[("a", ",num-queues=1")]);
    let mut g = Guest::connect(&d.socket("a"), &[0]);
    g.header(0, T_IN, 0);
    g.desc(0, 0, HDR, 16, F_NEXT, 1);
    g.desc(0, 1, DATA, 4096, F_NEXT | F_WRITE, 2);
    g.desc(0, 2, STATUS, 1, F_WRITE, 0);
    for slot in 0..u64::from(QSIZE) {
        g.mem
            .write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * slot))
            .expect("avail ring");
    }
    // Every entry of the ring names head 0; each round moves the index a queue further.
    let mut completed = 0u64;
    let mut last_used = 0u16;
    let mut count_used = |g: &Guest| {
        let used = g.used_idx(0);
        completed += u64::from(used.wrapping_sub(last_used));
        last_used = used;
    };
    for round in 1..=40u16 {
        g.set_avail_idx(0, round.wrapping_mul(QSIZE));
        std::thread::sleep(Duration::from_millis(5));
        count_used(&g);
    }
    let deadline = Instant::now() + Duration::from_millis(900);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
        count_used(&g);
    }
    assert!(
        completed <= u64::from(QSIZE),
        "{completed} requests completed within 1.1 s of 300 ms each on a {QSIZE}-entry queue"
    );
    // The connection ends cleanly and the next frontend is served.
    drop(g);
    let mut g = Guest::connect(&d.socket("a"), &[0]);
    assert_eq!(g.read(0), Some((4097, S_OK)));
}

/// Issue 12, item 4: a frontend that shrinks its memory file after sharing it. Before the fix
/// the daemon's next access to the lost part (here: a read's data, zeroed by the daemon)
/// killed the whole process, every export with it, with SIGBUS.
#[test]
fn a_memory_file_shrunk_after_sharing_loses_only_its_connection() {
    let mut d = Daemon::start(&[("a", ""), ("b", "")]);
    let mut g = Guest::connect(&d.socket("a"), &[0]);
    assert_eq!(g.read(0), Some((4097, S_OK)));
    // A read into the last MiB of guest memory, which the frontend then cuts off its file.
    const FAR: u64 = MEM - (1 << 20);
    g.header(0, T_IN, 0);
    g.desc(0, 0, HDR, 16, F_NEXT, 1);
    g.desc(0, 1, FAR, 4096, F_NEXT | F_WRITE, 2);
    g.desc(0, 2, STATUS, 1, F_WRITE, 0);
    g.shrink_memory_file(FAR);
    g.push(0, 0);
    let deadline = Instant::now() + TIMEOUT;
    while !d.log_text().contains("shrank the file") {
        assert!(d.alive(), "strata died; log:\n{}", d.log_text());
        assert!(Instant::now() < deadline, "log:\n{}", d.log_text());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(d.alive(), "strata died; log:\n{}", d.log_text());
    // That connection is closed; the other export and the next frontend are served.
    assert!(g.fe.get_features().is_err(), "the connection is still open");
    let mut other = Guest::connect(&d.socket("b"), &[0]);
    assert_eq!(other.read(0), Some((4097, S_OK)), "export b");
    drop(g);
    let mut g = Guest::connect(&d.socket("a"), &[0]);
    assert_eq!(g.read(0), Some((4097, S_OK)), "the next frontend");
    d.terminate_within(Duration::from_secs(2));
}
