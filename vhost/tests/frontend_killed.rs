//! A libblkio client killed with SIGKILL while 32 writes are in flight (issue 17, item 5),
//! over and over, against the real `strata` binary serving raw images opened with O_DIRECT,
//! with 512- and 4096-byte logical blocks. After every kill the daemon is alive, the next
//! client is served and reads back what it writes, no 4 KiB block of the image is torn (each
//! write carries its block number and its own sequence number in every sector, and every
//! block must hold all eight sectors of one write), and the daemon's descriptors, threads and
//! mappings come back to what they were, its resident memory does not grow.
//!
//! The client is this test binary run again as a child process (the ignored test
//! `child_writer`), so that the kill takes a whole process with its vhost-user connection and
//! shared memory, as a crashing VMM would.

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::mem::MaybeUninit;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use blkio::{Completion, ReqFlags};
use common::daemon::Daemon;
use common::*;

/// The blocks the killed clients write: 1 MiB at the start of the image.
const BLOCKS: u64 = 256;
const BLOCK: usize = 4096;
const IN_FLIGHT: usize = 32;
/// Where the next client writes its own check: after the killed clients' range.
const CHECK_OFFSET: u64 = 2 << 20;
const IMAGE_SIZE: u64 = 16 << 20;
const MAGIC: u64 = 0x7374_7261_7461_4b39; // "strataK9"

/// Sector `k` of the write `seq` to `block`: magic, block, seq, k, then bytes derived from
/// all of them.
fn sector(block: u64, seq: u64, k: u64) -> [u8; 512] {
    let mut s = [0u8; 512];
    for (i, v) in [MAGIC, block, seq, k].iter().enumerate() {
        s[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    let fill = pattern(seq ^ (block << 40), k * 512 + 32, 480);
    s[32..].copy_from_slice(&fill);
    s
}

fn fill_block(buf: &mut [u8], block: u64, seq: u64) {
    for (k, chunk) in buf.chunks_exact_mut(512).enumerate() {
        chunk.copy_from_slice(&sector(block, seq, k as u64));
    }
}

/// Checks that `data` (block `block`) is all zeroes (never written) or all eight sectors of
/// one write; returns that write's sequence number.
fn whole_block(block: u64, data: &[u8]) -> Result<Option<u64>, String> {
    if data.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    let u64_at = |s: &[u8], i: usize| {
        let mut v = [0u8; 8];
        v.copy_from_slice(&s[i * 8..i * 8 + 8]);
        u64::from_le_bytes(v)
    };
    let first = &data[..512];
    let seq = u64_at(first, 2);
    for (k, s) in data.chunks_exact(512).enumerate() {
        if s != sector(block, seq, k as u64) {
            return Err(format!(
                "block {block} is torn: sector 0 is from write {seq}, sector {k} holds magic \
                 {:#x} block {} seq {} sector {}",
                u64_at(s, 0),
                u64_at(s, 1),
                u64_at(s, 2),
                u64_at(s, 3)
            ));
        }
    }
    Ok(Some(seq))
}

/// Run as a child process by `a_client_killed_mid_io_...`: connects to STRATA_CHILD_SOCKET and
/// keeps IN_FLIGHT 4 KiB writes in flight on distinct random blocks, their sequence numbers
/// starting at STRATA_CHILD_SEQ; prints "running" once 2 * IN_FLIGHT writes completed and goes
/// on until killed.
#[test]
#[ignore = "the child process of a_client_killed_mid_io_leaves_whole_blocks_and_no_leak"]
fn child_writer() {
    let socket = std::env::var("STRATA_CHILD_SOCKET").expect("STRATA_CHILD_SOCKET");
    let mut seq: u64 = std::env::var("STRATA_CHILD_SEQ")
        .expect("STRATA_CHILD_SEQ")
        .parse()
        .expect("a number");
    let mut c = Client::connect(Path::new(&socket), 1, IN_FLIGHT * BLOCK).expect("connect");
    let mut w = Writer {
        rng: seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        busy: HashSet::new(),
        slot_block: [0; IN_FLIGHT],
    };
    for slot in 0..IN_FLIGHT {
        w.submit(&mut c, slot, &mut seq);
    }
    let mut done = 0usize;
    let mut comps: Vec<MaybeUninit<Completion>> =
        (0..IN_FLIGHT).map(|_| MaybeUninit::uninit()).collect();
    loop {
        let got = c.queues[0]
            .do_io(&mut comps, 1, None, None)
            .unwrap_or_else(|e| panic!("do_io: {}", blkio_err(e)));
        let finished: Vec<(usize, i32)> = comps[..got]
            .iter()
            .map(|c| {
                // SAFETY: do_io initialised the first `got` completions.
                let c = unsafe { c.assume_init_ref() };
                (c.user_data, c.ret)
            })
            .collect();
        for (slot, ret) in finished {
            assert_eq!(ret, 0, "write of block {} failed", w.slot_block[slot]);
            w.busy.remove(&w.slot_block[slot]);
            done += 1;
            if done == 2 * IN_FLIGHT {
                let mut out = std::io::stdout();
                writeln!(out, "running").expect("stdout");
                out.flush().expect("stdout");
            }
            w.submit(&mut c, slot, &mut seq);
        }
    }
}

/// The child writer's state: its random generator and which block each slot writes.
struct Writer {
    rng: u64,
    /// Blocks with a write in flight: never two at once on one block, so that each block's
    /// final content is one write's, whatever order the device completes them in.
    busy: HashSet<u64>,
    slot_block: [u64; IN_FLIGHT],
}

impl Writer {
    /// Submits write `seq + 1` from buffer `slot` to a random block with none in flight.
    fn submit(&mut self, c: &mut Client, slot: usize, seq: &mut u64) {
        let block = loop {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            let b = self.rng % BLOCKS;
            if self.busy.insert(b) {
                break b;
            }
        };
        self.slot_block[slot] = block;
        *seq += 1;
        fill_block(&mut c.buf()[slot * BLOCK..(slot + 1) * BLOCK], block, *seq);
        let p = c.ptr(slot * BLOCK);
        c.queues[0].write(block * BLOCK as u64, p, BLOCK, slot, ReqFlags::empty());
    }
}

/// Starts `child_writer` against `socket`, waits until it is running with IN_FLIGHT writes in
/// flight, lets it go on for a moment and kills it with SIGKILL.
fn run_and_kill_a_writer(socket: &Path, first_seq: u64, linger: Duration) {
    let exe = std::env::current_exe().expect("test executable");
    let mut child = Command::new(exe)
        .args(["--exact", "child_writer", "--ignored", "--nocapture"])
        .env("STRATA_CHILD_SOCKET", socket)
        .env("STRATA_CHILD_SEQ", first_seq.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the child writer");
    let stdout = child.stdout.take().expect("child stdout");
    let mut lines = BufReader::new(stdout).lines();
    let running = lines.any(|l| l.map(|l| l.trim() == "running").unwrap_or(false));
    if !running {
        let status = child.wait().expect("wait");
        panic!("the child writer ended before it was running: {status}");
    }
    std::thread::sleep(linger);
    child.kill().expect("SIGKILL the child writer");
    let status = child.wait().expect("wait for the child writer");
    assert!(
        !status.success(),
        "the child writer was not killed: {status}"
    );
}

/// The next client after a kill: every block of the killed clients' range is whole (checked
/// both through strata and in the image file), and its own write reads back.
fn next_client_checks(socket: &Path, image: &Path, round: u64) -> usize {
    let len = BLOCKS as usize * BLOCK;
    let mut c = Client::connect(socket, 1, len).expect("the next client connects");
    let p = c.ptr(0);
    assert_eq!(read(&mut c.queues[0], 0, p, len), 0, "read after the kill");
    let through_strata = c.buf()[..len].to_vec();
    let in_file = {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(image).expect("open image");
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, 0).expect("read image");
        buf
    };
    assert!(
        through_strata == in_file,
        "round {round}: strata reads other data than the image file holds"
    );
    let mut written = 0;
    for b in 0..BLOCKS {
        let at = b as usize * BLOCK;
        match whole_block(b, &in_file[at..at + BLOCK]) {
            Ok(Some(_)) => written += 1,
            Ok(None) => {}
            Err(e) => panic!("round {round}: {e}"),
        }
    }
    let data = pattern(round, CHECK_OFFSET, 64 << 10);
    c.buf()[..data.len()].copy_from_slice(&data);
    assert_eq!(
        write(&mut c.queues[0], CHECK_OFFSET, p, data.len()),
        0,
        "round {round}: write"
    );
    c.buf()[..data.len()].fill(0);
    assert_eq!(
        read(&mut c.queues[0], CHECK_OFFSET, p, data.len()),
        0,
        "round {round}: read"
    );
    assert!(
        c.buf()[..data.len()] == data[..],
        "round {round}: read back"
    );
    written
}

/// Descriptors, threads and mappings of the daemon.
fn resources(d: &Daemon) -> (usize, usize, usize) {
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", d.pid())).expect("maps");
    (d.fd_count(), d.thread_count(), maps.lines().count())
}

/// Waits until the daemon's resources are back to `baseline` (connections are torn down
/// asynchronously after a disconnect).
fn settle(d: &Daemon, baseline: (usize, usize, usize), round: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = resources(d);
        if now == baseline {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "round {round}: (fds, threads, mappings) {now:?}, after the first round {baseline:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_client_killed_mid_io_leaves_whole_blocks_and_no_leak() {
    let long = std::env::var_os("STRATA_LONG_TESTS").is_some();
    let rounds: u64 = if long { 100 } else { 10 };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut args = Vec::new();
    for lbs in [512u32, 4096] {
        let image = dir.path().join(format!("disk{lbs}.img"));
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(IMAGE_SIZE))
            .expect("image");
        args.extend([
            "--blockdev".to_string(),
            format!(
                "driver=file,node-name=f{lbs},filename={},cache.direct=on,aio=io_uring",
                image.display()
            ),
            "--blockdev".to_string(),
            format!("driver=raw,node-name=d{lbs},file=f{lbs}"),
            "--export".to_string(),
            format!(
                "type=vhost-user-blk,id=e{lbs},node-name=d{lbs},writable=on,\
                 logical-block-size={lbs},addr.type=unix,addr.path={}",
                dir.path().join(format!("e{lbs}")).display()
            ),
        ]);
    }
    let image = |lbs: u32| dir.path().join(format!("disk{lbs}.img"));
    let socket = |lbs: u32| dir.path().join(format!("e{lbs}"));
    let mut d = Daemon::start_in(tempfile::tempdir().expect("tempdir"), &args, 2);
    let mut baseline = None;
    let mut rss_first = 0;
    for round in 0..rounds {
        let lbs = if round % 2 == 0 { 512 } else { 4096 };
        let linger = Duration::from_millis(round * 7 % 50);
        run_and_kill_a_writer(&socket(lbs), round * 1_000_000_000, linger);
        assert!(
            d.alive(),
            "round {round}: strata died; log:\n{}",
            d.log_text()
        );
        let written = next_client_checks(&socket(lbs), &image(lbs), round);
        assert!(
            written > 0,
            "round {round}: the killed client wrote nothing"
        );
        match baseline {
            // The first two rounds (one per export) set up what stays: the baseline.
            None if round == 1 => {
                std::thread::sleep(Duration::from_millis(300));
                baseline = Some(resources(&d));
                rss_first = d.rss_kib();
            }
            Some(b) => settle(&d, b, round),
            None => {}
        }
    }
    let rss_last = d.rss_kib();
    eprintln!(
        "{rounds} clients killed; (fds, threads, mappings) {baseline:?}; RSS {rss_first} KiB \
         after round 1, {rss_last} KiB at the end"
    );
    // Leaked mappings are counted exactly above; this catches what grows without a mapping
    // of its own (heap), above the allocator's noise.
    assert!(
        rss_last <= rss_first + 8 * 1024,
        "the daemon's RSS grew from {rss_first} KiB to {rss_last} KiB over {rounds} killed clients"
    );
    d.terminate_within(Duration::from_secs(5));
}

/// The oracle itself: a block mixing the sectors of two writes, or holding another block's
/// write, is reported; one write's block and a never-written block are not.
#[test]
fn the_whole_block_check_sees_torn_and_misplaced_blocks() {
    let mut block = vec![0u8; BLOCK];
    assert_eq!(whole_block(5, &block), Ok(None));
    fill_block(&mut block, 5, 41);
    assert_eq!(whole_block(5, &block), Ok(Some(41)));
    assert!(whole_block(6, &block).is_err(), "another block's write");
    block[3 * 512..4 * 512].copy_from_slice(&sector(5, 42, 3));
    assert!(
        whole_block(5, &block).is_err(),
        "sector 3 from another write"
    );
    fill_block(&mut block, 5, 41);
    block[4095] ^= 1;
    assert!(whole_block(5, &block).is_err(), "one bit changed");
}
