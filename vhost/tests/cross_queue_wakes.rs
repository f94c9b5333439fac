//! Cross-thread wakes through a real export: two queues, each on its own worker thread, write
//! 512-byte sectors of the same 4 KiB block of a loop device with 4096-byte sectors. Each such
//! write is a read-modify-write, which waits for the overlapping ones, and the node's write
//! serialiser wakes every waiting write whenever a write ends: a write waiting on one queue's
//! worker is woken from the other queue's worker, again and again while that one floods its
//! own blocks with aligned writes. Such a wake writes the waiting worker's eventfd only while
//! that worker announced its sleep (`LocalExecutor::prepare_to_sleep`, QEMU's `notify_me`);
//! one that lands while the worker is awake must be seen by the worker before it sleeps
//! (`go_to_sleep`). If the worker side of that handshake is wrong, such a wake is lost, the
//! worker sleeps with its write woken, the write never completes, and the client's wait
//! times out.
//!
//! Needs root, losetup and two CPUs; without them the test prints why it is skipped, and under
//! CI (`CI=true`) it fails instead.

mod common;

use std::mem::MaybeUninit;
use std::process::Command;
use std::time::Duration;

use blkio::{Blkioq, Completion, Errno, ReqFlags};
use common::*;
use strata_backend::{ChildRole, Graph};
use strata_vhost::{BlkExport, BlkExportConfig, Listen};

const SECTOR: usize = 512;
const BLOCK: usize = 4096;
/// Aligned writes of a flooding round.
const FLOOD: usize = 64;
const QUEUES: usize = 2;
const ROUNDS: usize = 1000;
/// How long a round may go without a completion before the test calls it a lost wake-up
/// (far longer than a round of RMWs takes on a busy machine).
const STALL: Duration = Duration::from_secs(5);

/// Why the test cannot run here, if it cannot.
fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("loop devices need root".into());
    }
    if let Err(e) = Command::new("losetup").arg("--version").output() {
        return Some(format!("losetup is missing: {e}"));
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < QUEUES {
        // With fewer CPUs the export runs both queues on one worker: no cross-thread wake.
        return Some(format!(
            "one worker per queue needs {QUEUES} CPUs, there are {cpus}"
        ));
    }
    None
}

/// The sector of block 0 queue `q` writes in `round`: one of every other sector, so the two
/// queues' writes of a round overlap, and over the rounds every sector is written.
fn sector_of(q: usize, round: usize) -> usize {
    round % (BLOCK / SECTOR / QUEUES) * QUEUES + q
}

/// What queue `q` writes to `sector` in `round`.
fn payload(q: usize, sector: usize, round: usize) -> Vec<u8> {
    pattern(
        (round * QUEUES + q) as u64,
        (sector * SECTOR) as u64,
        SECTOR,
    )
}

/// Waits for `n` completions on `q`, each within [`STALL`] of the one before; all must succeed.
fn wait_without_stall(q: &mut Blkioq, n: usize, what: &str) -> Result<(), String> {
    let mut comps: Vec<MaybeUninit<Completion>> = (0..n).map(|_| MaybeUninit::uninit()).collect();
    let mut done = 0;
    while done < n {
        let mut timeout = STALL;
        let want = n - done;
        let got = match q.do_io(&mut comps[..want], 1, Some(&mut timeout), None) {
            Ok(got) => got,
            Err(e) if e.errno() == Errno::TIME => {
                return Err(format!(
                    "{what}: {want} of {n} requests still in flight after {STALL:?} without a \
                     completion: a cross-thread wake-up was lost"
                ))
            }
            Err(e) => return Err(format!("{what}: do_io: {}", blkio_err(e))),
        };
        for c in &comps[..got] {
            // SAFETY: do_io initialised the first `got` completions.
            let c = unsafe { c.assume_init_ref() };
            if c.ret != 0 {
                return Err(format!("{what}: request {} failed: {}", c.user_data, c.ret));
            }
        }
        done += got;
    }
    Ok(())
}

/// Runs the rounds of queue `qi`: each round one 512-byte write into block 0, which the
/// other queue's write of the round overlaps, and, every other round, a flood of aligned
/// writes to its own blocks, whose completions wake the other queue's waiting write again
/// and again (the serialiser wakes every waiter when a write ends) while that worker is busy.
/// Gives the queue back, with why it failed if it did.
fn write_rounds(qi: usize, mut q: Blkioq, buf: usize) -> (Blkioq, Result<(), String>) {
    for round in 0..ROUNDS {
        let sector = sector_of(qi, round);
        let at = (buf + FLOOD * BLOCK) as *mut u8;
        fill(at, &payload(qi, sector, round));
        q.write((sector * SECTOR) as u64, at, SECTOR, 0, ReqFlags::empty());
        let mut n = 1;
        if floods(qi, round) {
            for (i, b) in flooded_by(qi).enumerate() {
                let at = (buf + i * BLOCK) as *mut u8;
                fill(at, &flood_payload(qi, b, round));
                q.write((b * BLOCK) as u64, at, BLOCK, b, ReqFlags::empty());
            }
            n += FLOOD;
        }
        if let Err(e) = wait_without_stall(&mut q, n, &format!("queue {qi} round {round}")) {
            return (q, Err(e));
        }
    }
    (q, Ok(()))
}

/// The blocks queue `q` floods: its own, so that each has one writer.
fn flooded_by(q: usize) -> std::ops::RangeInclusive<usize> {
    1 + q * FLOOD..=(q + 1) * FLOOD
}

/// Whether queue `q` floods in `round`.
fn floods(q: usize, round: usize) -> bool {
    round % QUEUES == q
}

/// What queue `q` writes to block `block` when it floods in `round`.
fn flood_payload(q: usize, block: usize, round: usize) -> Vec<u8> {
    pattern(
        (round * QUEUES + q) as u64 | 1 << 40,
        (block * BLOCK) as u64,
        BLOCK,
    )
}

/// Copies `data` to `at`, in the calling queue's share of the client's mapped region.
fn fill(at: *mut u8, data: &[u8]) {
    // SAFETY: every caller's `at..at + data.len()` lies in its queue's share of the mapped
    // region, which no request uses between rounds.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), at, data.len()) };
}

/// Overlapping 512-byte writes on two queues at once, each a read-modify-write that waits for
/// the other queue's: every round completes (no wake-up lost), and every sector ends with its
/// queue's last write (none undone by a read-modify-write of the other queue).
#[test]
fn overlapping_rmw_writes_on_two_workers_all_complete() {
    if let Some(reason) = unavailable() {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "cannot run under CI: {reason}"
        );
        eprintln!("SKIPPED: {reason}");
        return;
    }
    init_log();
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(MIB as u64))
        .expect("image");
    let dev = Loop4k::attach(&image);
    let graph = Graph::new();
    let node = dev.open_raw(&graph);
    let socket = dir.path().join("vhost.sock");
    let mut cfg = BlkExportConfig::new("wakes", node.clone());
    cfg.writable = true;
    cfg.num_queues = QUEUES as u16;
    cfg.logical_block_size = SECTOR as u32;
    let export = BlkExport::start(cfg, Listen::UnixPath(socket.clone())).expect("export");

    let share = (FLOOD + 1) * BLOCK;
    let mut client = Client::connect(&socket, QUEUES as i32, QUEUES * share).expect("connect");
    let base = client.region.addr;
    let threads: Vec<_> = std::mem::take(&mut client.queues)
        .into_iter()
        .enumerate()
        .map(|(qi, q)| std::thread::spawn(move || write_rounds(qi, q, base + qi * share)))
        .collect();
    let mut failures = Vec::new();
    for t in threads {
        let (q, result) = t.join().expect("queue thread");
        client.queues.push(q);
        failures.extend(result.err());
    }
    if !failures.is_empty() {
        // The stuck requests would hold the disconnect for the drain timeout: leave the
        // export and the client to the end of the process.
        std::mem::forget(client);
        std::mem::forget(export);
        panic!("{}", failures.join("; "));
    }

    let rmw = node.stats().read_modify_write.get()
        + node
            .child(ChildRole::File)
            .map_or(0, |f| f.stats().read_modify_write.get());
    assert!(
        rmw >= (ROUNDS * QUEUES) as u64,
        "only {rmw} of the writes were read-modify-write"
    );
    let written = (1 + QUEUES * FLOOD) * BLOCK;
    let buf = client.ptr(0);
    client.buf()[..written].fill(0);
    let q = &mut client.queues[0];
    q.read(0, buf, written, 0, ReqFlags::empty());
    wait_without_stall(q, 1, "read back").expect("read back");
    let got = client.buf()[..written].to_vec();
    // Each sector of block 0 has one writer, and the flooded blocks the last flood: they hold
    // the last write to them.
    let mut want = vec![0u8; written];
    for round in 0..ROUNDS {
        for q in 0..QUEUES {
            let sector = sector_of(q, round);
            want[sector * SECTOR..(sector + 1) * SECTOR]
                .copy_from_slice(&payload(q, sector, round));
            if floods(q, round) {
                for b in flooded_by(q) {
                    want[b * BLOCK..(b + 1) * BLOCK].copy_from_slice(&flood_payload(q, b, round));
                }
            }
        }
    }
    for sector in 0..written / SECTOR {
        let range = sector * SECTOR..(sector + 1) * SECTOR;
        assert!(
            got[range.clone()] == want[range],
            "sector {sector} does not hold the last write to it"
        );
    }
    drop(client);
    drop(export);
}
