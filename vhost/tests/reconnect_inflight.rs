//! Issue 14: a daemon killed with requests in flight, and a new one that picks them up from
//! the in-flight buffer the frontend kept (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), as QEMU
//! does with `reconnect=1`.
//!
//! The frontend is hand-built (common/frontend.rs), so the test can see exactly which
//! requests complete, how often, and what the buffer says in between.

mod common;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use common::daemon::Daemon;
use common::frontend::*;
use vhost::vhost_user::message::VhostUserInflight;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const QSIZE: u16 = 16;
const MEM: u64 = 1 << 20;
/// Request buffers: per chain head, a header, a status byte and 4 KiB of data.
const HDR: u64 = 0x4000;
const STATUS: u64 = 0x5000;
const DATA: u64 = 0x10000;

/// The heads of the reads (each chain uses descriptors head..head+3) and of a GET_ID.
const READS: [u16; 4] = [0, 3, 6, 9];
const GET_ID: u16 = 12;

/// A strata daemon serving export `a` (one queue) on `socket`, each request taking 400 ms.
fn start(socket: &Path) -> Daemon {
    start_with(socket, 400, &[])
}

/// As [`start`], each request taking `latency_ms`, with `env` for the daemon.
fn start_with(socket: &Path, latency_ms: u64, env: &[(&str, &str)]) -> Daemon {
    let args = [
        "--blockdev".to_string(),
        format!(
            "driver=null-co,node-name=n,read-zeroes=on,latency-ns={}",
            latency_ms * 1_000_000
        ),
        "--export".to_string(),
        format!(
            "type=vhost-user-blk,id=a,node-name=n,writable=on,num-queues=1,addr.type=unix,\
             addr.path={}",
            socket.display()
        ),
    ];
    Daemon::start_in_with_env(tempfile::tempdir().expect("tempdir"), &args, 1, env)
}

/// Writes the chain at `head`: header (`typ`), 4 KiB of data (device-writable), status.
fn chain(mem: &GuestMemoryMmap, q: &Vring, head: u16, typ: u32) {
    let h = u64::from(head);
    let (hdr, data, status) = (HDR + 16 * h, DATA + 0x1000 * h, STATUS + h);
    write_header(mem, hdr, status, typ, h * 8);
    let len = if typ == T_GET_ID { 20 } else { 4096 };
    q.desc(mem, head, hdr, 16, F_NEXT, head + 1);
    q.desc(mem, head + 1, data, len, F_NEXT | F_WRITE, head + 2);
    q.desc(mem, head + 2, status, 1, F_WRITE, 0);
}

/// Connects, hands the daemon the in-flight buffer (making one first when `buffer` is
/// None), shares `mem` and starts queue 0 at `next`, as QEMU does.
fn connect(
    socket: &Path,
    mem: &GuestMemoryMmap,
    buffer: Option<(VhostUserInflight, File)>,
    next: u16,
) -> (Frontend, Vring, VhostUserInflight, File) {
    let (mut fe, _) = negotiate(socket, u64::MAX);
    let (info, file) = match buffer {
        Some(b) => b,
        None => fe
            .get_inflight_fd(&VhostUserInflight {
                mmap_size: 0,
                mmap_offset: 0,
                num_queues: 1,
                queue_size: QSIZE,
            })
            .expect("GET_INFLIGHT_FD"),
    };
    fe.set_inflight_fd(&info, file.as_raw_fd())
        .expect("SET_INFLIGHT_FD");
    fe.set_mem_table(&region_infos(mem)).expect("set_mem_table");
    let q = Vring::setup_at(&mut fe, mem, 0, 0, QSIZE, next);
    (fe, q, info, file)
}

/// The `inflight` byte of descriptor `head` in queue 0's part of the buffer.
fn marked(file: &File, head: u16) -> bool {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 1];
    file.read_exact_at(&mut b, 16 + 16 * u64::from(head))
        .expect("read the buffer");
    b[0] == 1
}

#[test]
fn requests_in_flight_at_a_crash_complete_once_after_the_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("a.sock");
    let mem = guest_memory(&[(0, MEM)]);
    let d = start(&socket);
    let (fe, mut q, info, file) = connect(&socket, &mem, None, 0);
    assert_eq!(info.num_queues, 1);
    assert!(info.mmap_size >= 16 + 16 * u64::from(QSIZE));

    // Four slow reads, and a GET_ID that completes at once, out of order.
    for head in READS {
        chain(&mem, &q, head, T_IN);
    }
    chain(&mem, &q, GET_ID, T_GET_ID);
    for head in [READS[0], READS[1], GET_ID, READS[2], READS[3]] {
        q.push(&mem, head);
    }
    let first = q.next_used(&mem, Duration::from_millis(300));
    assert_eq!(first.map(|(id, _)| id), Some(u32::from(GET_ID)));
    // The reads are marked in flight, the GET_ID is not.
    for head in READS {
        assert!(marked(&file, head), "head {head} not marked in flight");
    }
    assert!(
        !marked(&file, GET_ID),
        "the completed GET_ID is still marked"
    );

    // Crash with the reads in flight: the frontend keeps memory, rings and buffer.
    drop(d);
    drop(fe);
    let d = start(&socket);
    // QEMU starts the queue at the used index, which it rewound to.
    let used = q.used_idx(&mem);
    assert_eq!(used, 1);
    let (_fe, mut q2, _, file) = connect(&socket, &mem, Some((info, file)), used);
    q2.avail_idx = q.avail_idx;

    // Each read completes once, with its data; the GET_ID is not run again.
    let mut done: Vec<u32> = q2.used(&mem, 4).into_iter().map(|(id, _)| id).collect();
    done.sort_unstable();
    assert_eq!(done, READS.map(u32::from));
    for head in READS {
        let status: u8 = mem
            .read_obj(GuestAddress(STATUS + u64::from(head)))
            .expect("status");
        assert_eq!(status, S_OK, "read at head {head}");
        assert!(
            !marked(&file, head),
            "head {head} still marked after it completed"
        );
    }
    // New requests go on after them, and nothing completes twice.
    chain(&mem, &q2, 13, T_GET_ID);
    q2.push(&mem, 13);
    assert_eq!(q2.used(&mem, 1)[0].0, 13);
    assert!(q2.next_used(&mem, Duration::from_millis(600)).is_none());
    assert!(d
        .log_text()
        .contains("resubmitting 4 requests that were in flight"));
}

/// Issue 14: a queue stopped (GET_VRING_BASE) while a request is still in flight after the
/// drain timeout belongs to the frontend again: the late completion must not be written into
/// its used ring. Before the fix it was.
#[test]
fn a_request_that_outlasts_the_stop_never_touches_the_ring() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("a.sock");
    let mem = guest_memory(&[(0, MEM)]);
    let d = start_with(&socket, 1500, &[("STRATA_DRAIN_TIMEOUT_MS", "300")]);
    let (mut fe, _) = negotiate_with_memory(&socket, u64::MAX, &mem);
    let mut q = Vring::setup(&mut fe, &mem, 0, 0, QSIZE);
    chain(&mem, &q, 0, T_IN);
    q.push(&mem, 0);
    std::thread::sleep(Duration::from_millis(100));
    // The device gives up waiting after 300 ms and hands the ring back at index 1.
    assert_eq!(fe.get_vring_base(0).expect("GET_VRING_BASE"), 1);
    let used = GuestAddress(USED);
    let sentinel = [0xEEu8; 4 + 8 * QSIZE as usize];
    mem.write_slice(&sentinel, used).expect("used ring");
    // The read completes 1.5 s after it started.
    std::thread::sleep(Duration::from_millis(2000));
    let mut now = sentinel;
    mem.read_slice(&mut now, used).expect("used ring");
    let changed: Vec<usize> = (0..now.len()).filter(|&i| now[i] != sentinel[i]).collect();
    assert!(
        changed.is_empty(),
        "the used ring was written after the queue stopped: bytes {changed:?}; log:\n{}",
        d.log_text()
    );
    assert_eq!(q.used_idx(&mem), 0xEEEE);
    assert!(
        d.log_text().contains("dropped 1 late completions"),
        "{}",
        d.log_text()
    );
}

/// Issue 14, the upgrade path: on SIGTERM the daemon finishes the requests in flight and puts
/// them in the used ring before it disconnects, so the frontend gets back a complete ring and
/// the next daemon has nothing to resubmit. Before the fix it disconnected first and completed
/// into the ring afterwards.
#[test]
fn sigterm_completes_requests_in_flight_before_it_disconnects() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("a.sock");
    let mem = guest_memory(&[(0, MEM)]);
    let d = start_with(&socket, 500, &[]);
    let (mut fe, _) = negotiate_with_memory(&socket, u64::MAX, &mem);
    let mut q = Vring::setup(&mut fe, &mem, 0, 0, QSIZE);
    for head in READS {
        chain(&mem, &q, head, T_IN);
        q.push(&mem, head);
    }
    std::thread::sleep(Duration::from_millis(100));
    // SAFETY: kill has no memory-safety preconditions; the pid is the daemon's.
    let sent = unsafe { libc::kill(d.pid() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(sent, 0);
    // Wait for the disconnect: any request fails once the socket is closed.
    let start = std::time::Instant::now();
    while fe.get_features().is_ok() {
        assert!(
            start.elapsed() < REPLY_TIMEOUT,
            "the daemon did not disconnect"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        q.used_idx(&mem),
        READS.len() as u16,
        "the frontend was disconnected with requests still in flight"
    );
    d.terminate_within(Duration::from_secs(5));
}
