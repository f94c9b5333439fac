//! A hostile guest or frontend against the real `strata` binary: it must not wedge the daemon,
//! kill it, or starve other queues, and the used lengths it reports must be honest.
//!
//! The guest is a hand-built split virtqueue in memfd-backed memory, driven through vhost's
//! `Frontend` (as in `chains.rs`), with every socket read bounded by a timeout so that a wedged
//! daemon fails the test instead of hanging it.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const QSIZE: u16 = 256;
const MEM: u64 = 4 << 20;
/// Each queue's rings and buffers: descriptors, avail, used, header, status, data.
const QUEUE_SPAN: u64 = 0x2_0000;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HDR: u64 = 0x3000;
const STATUS: u64 = 0x3100;
const DATA: u64 = 0x4000;
/// An indirect table of 4096 descriptors.
const FLOOD_TABLE: u64 = 0x8000;

const T_IN: u32 = 0;
const T_GET_ID: u32 = 8;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const UNTOUCHED: u8 = 0xAA;
/// The null-co node's size: 1 GiB.
const DISK_SECTORS: u64 = (1 << 30) / 512;

const TIMEOUT: Duration = Duration::from_secs(5);

/// The `strata` binary of this build, built (or brought up to date) once per test run.
fn strata_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // This test runs from <target>/<profile>/deps.
        let exe = std::env::current_exe().expect("test executable");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>");
        let target = profile_dir.parent().expect("target dir");
        let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        build.args([
            "build",
            "--quiet",
            "-p",
            "strata",
            "--bin",
            "strata",
            "--target-dir",
        ]);
        build.arg(target);
        if profile_dir.ends_with("release") {
            build.arg("--release");
        }
        let mut child = build.spawn().expect("run cargo build");
        let deadline = Instant::now() + Duration::from_secs(900);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for cargo build") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("cargo build of the strata binary did not finish in 15 minutes");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(status.success(), "cargo build of the strata binary failed");
        profile_dir.join("strata")
    })
}

/// A running `strata` daemon with the given exports, each of its own null-co node (1 GiB,
/// reads return zeroes), its log in a file.
struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
    log: PathBuf,
}

impl Daemon {
    /// Starts the daemon with one export per `(id, extra export options)`, on socket `<id>`.
    fn start(exports: &[(&str, &str)]) -> Daemon {
        Daemon::start_with_nodes("", exports)
    }

    /// As [`Daemon::start`], with `node_extra` added to each null-co node's options.
    fn start_with_nodes(node_extra: &str, exports: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("strata.log");
        let mut cmd = Command::new(strata_bin());
        for (id, extra) in exports {
            cmd.arg("--blockdev").arg(format!(
                "driver=null-co,node-name=n-{id},read-zeroes=on{node_extra}"
            ));
            cmd.arg("--export").arg(format!(
                "type=vhost-user-blk,id={id},node-name=n-{id},writable=on,addr.type=unix,\
                 addr.path={}{extra}",
                dir.path().join(id).display()
            ));
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("log file"))
            .spawn()
            .expect("run strata");
        let mut d = Daemon { child, dir, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while d.log_text().matches("serving node").count() < exports.len() {
            assert!(
                d.alive() && Instant::now() < deadline,
                "strata did not start:\n{}",
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        d
    }

    fn socket(&self, id: &str) -> PathBuf {
        self.dir.path().join(id)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// CPU time (user + system) the daemon used so far, in clock ticks.
    fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .expect("/proc/<pid>/stat");
        // Fields after the command name (which ends at the last ')'): state is field 3, utime
        // and stime fields 14 and 15.
        let rest = &stat[stat.rfind(')').expect("comm") + 2..];
        let fields: Vec<&str> = rest.split(' ').collect();
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
    }

    /// Sends SIGTERM and waits up to `limit` for a clean exit.
    fn terminate_within(mut self, limit: Duration) {
        // SAFETY: kill has no memory-safety preconditions; the pid is our own child's.
        let r = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(r, 0, "kill");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                assert!(status.success(), "strata exited with {status}");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "strata ignored SIGTERM for {limit:?}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn memfd(len: u64) -> File {
    // SAFETY: memfd_create takes a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"guest".as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: `fd` is a fresh descriptor we own.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).expect("size memfd");
    f
}

/// A frontend connection whose reads time out, so that a wedged daemon fails the test.
fn frontend(socket: &Path) -> Frontend {
    let sock = UnixStream::connect(socket).expect("connect");
    sock.set_read_timeout(Some(TIMEOUT)).expect("read timeout");
    let fe = Frontend::from_stream(sock, 64);
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe
}

/// One virtqueue of the guest: where its rings are, its eventfds and its indices.
struct Queue {
    base: u64,
    kick: EventFd,
    _call: EventFd,
    avail_idx: u16,
    used_seen: u16,
}

/// A guest with some virtqueues, each in its own QUEUE_SPAN of one memfd region.
struct Guest {
    mem: GuestMemoryMmap,
    /// The file behind `mem`.
    memfd: File,
    fe: Frontend,
    queues: Vec<Queue>,
}

impl Guest {
    /// Connects to `socket` and sets up the virtqueues `queues` (any of GET_QUEUE_NUM).
    fn connect(socket: &Path, queues: &[usize]) -> Guest {
        let memfd = memfd(MEM);
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
            GuestAddress(0),
            MEM as usize,
            Some(FileOffset::new(memfd.try_clone().expect("dup memfd"), 0)),
        )])
        .expect("guest memory");
        let mut fe = frontend(socket);
        fe.set_owner().expect("set_owner");
        let features = fe.get_features().expect("get_features");
        fe.set_features(features).expect("set_features");
        let proto = fe.get_protocol_features().expect("protocol features");
        fe.set_protocol_features(proto)
            .expect("set protocol features");
        let regions: Vec<_> = mem
            .iter()
            .map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).expect("region info"))
            .collect();
        fe.set_mem_table(&regions).expect("set_mem_table");
        let mut g = Guest {
            mem,
            memfd,
            fe,
            queues: Vec::new(),
        };
        for (k, &index) in queues.iter().enumerate() {
            let base = k as u64 * QUEUE_SPAN;
            let q = Queue {
                base,
                kick: EventFd::new(0).expect("eventfd"),
                _call: EventFd::new(0).expect("eventfd"),
                avail_idx: 0,
                used_seen: 0,
            };
            let va = |gpa: u64| {
                g.mem
                    .get_host_address(GuestAddress(base + gpa))
                    .expect("va") as u64
            };
            g.fe.set_vring_num(index, QSIZE).expect("vring num");
            g.fe.set_vring_addr(
                index,
                &VringConfigData {
                    queue_max_size: QSIZE,
                    queue_size: QSIZE,
                    flags: 0,
                    desc_table_addr: va(DESC),
                    used_ring_addr: va(USED),
                    avail_ring_addr: va(AVAIL),
                    log_addr: None,
                },
            )
            .expect("vring addr");
            g.fe.set_vring_base(index, 0).expect("vring base");
            g.fe.set_vring_call(index, &q._call).expect("call");
            g.fe.set_vring_kick(index, &q.kick).expect("kick");
            g.fe.set_vring_enable(index, true).expect("enable");
            g.queues.push(q);
        }
        g
    }

    /// Writes descriptor `index` of queue `k`'s table (`addr` relative to the queue's base).
    fn desc(&self, k: usize, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.desc_in(k, DESC, index, addr, len, flags, next);
    }

    /// Writes descriptor `index` of the table at `table` (addresses relative to queue `k`'s
    /// base).
    #[allow(
        clippy::too_many_arguments,
        reason = "a descriptor's fields, in their order"
    )]
    fn desc_in(
        &self,
        k: usize,
        table: u64,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let base = self.queues[k].base;
        let at = GuestAddress(base + table + 16 * u64::from(index));
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&(base + addr).to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&raw, at).expect("write desc");
    }

    /// Writes a request header into queue `k`'s header buffer and fills its status and data
    /// buffers with UNTOUCHED.
    fn header(&self, k: usize, typ: u32, sector: u64) {
        let base = self.queues[k].base;
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&typ.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem
            .write_slice(&h, GuestAddress(base + HDR))
            .expect("header");
        self.mem
            .write_obj(UNTOUCHED, GuestAddress(base + STATUS))
            .expect("status");
        self.mem
            .write_slice(&[UNTOUCHED; 8192], GuestAddress(base + DATA))
            .expect("data");
    }

    fn byte(&self, k: usize, at: u64) -> u8 {
        self.mem
            .read_obj(GuestAddress(self.queues[k].base + at))
            .expect("byte")
    }

    /// Stores queue `k`'s available index as is and kicks.
    fn set_avail_idx(&mut self, k: usize, idx: u16) {
        let q = &mut self.queues[k];
        q.avail_idx = idx;
        self.mem
            .store(
                idx.to_le(),
                GuestAddress(q.base + AVAIL + 2),
                Ordering::Release,
            )
            .expect("avail idx");
        q.kick.write(1).expect("kick");
    }

    /// Makes `head` available on queue `k` and kicks.
    fn push(&mut self, k: usize, head: u16) {
        let q = &self.queues[k];
        let slot = u64::from(q.avail_idx % QSIZE);
        self.mem
            .write_obj(head.to_le(), GuestAddress(q.base + AVAIL + 4 + 2 * slot))
            .expect("avail ring");
        let idx = q.avail_idx.wrapping_add(1);
        self.set_avail_idx(k, idx);
    }

    fn used_idx(&self, k: usize) -> u16 {
        self.mem
            .load(
                GuestAddress(self.queues[k].base + USED + 2),
                Ordering::Acquire,
            )
            .expect("used idx")
    }

    /// Waits for the next used entry of queue `k`: (descriptor id, length); None after
    /// `timeout`.
    fn next_used(&mut self, k: usize, timeout: Duration) -> Option<(u32, u32)> {
        let deadline = Instant::now() + timeout;
        while self.used_idx(k) == self.queues[k].used_seen {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let q = &mut self.queues[k];
        let at = q.base + USED + 4 + 8 * u64::from(q.used_seen % QSIZE);
        q.used_seen = q.used_seen.wrapping_add(1);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).expect("used id");
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).expect("used len");
        Some((id, len))
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

    g.set_avail_idx(0, 300);
    std::thread::sleep(Duration::from_millis(200));
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
        let mut fe = frontend(&d.socket("a"));
        fe.set_owner().expect("set_owner");
        let features = fe.get_features().expect("get_features");
        fe.set_features(features).expect("set_features");
        let proto = fe.get_protocol_features().expect("protocol features");
        fe.set_protocol_features(proto)
            .expect("set protocol features");
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
    for i in 0..=last {
        let (addr, len, flags) = match i {
            0 => (HDR, 16, F_NEXT),
            i if i == last => (STATUS, 1, F_WRITE),
            i => (DATA + u64::from(i), 1, F_NEXT | F_WRITE),
        };
        g.desc_in(0, FLOOD_TABLE, i, addr, len, flags, i.wrapping_add(1));
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
    g.memfd.set_len(FAR).expect("shrink the memfd");
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
