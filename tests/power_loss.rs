//! Durability of FLUSH and write-through (issue 17 item 1): strata serves an image through
//! strata-faultfs, which holds every write not yet covered by an fsync in memory. A libblkio
//! client writes stamped sectors (each carries its write's sequence number) with several
//! requests in flight and flushes now and then; at a random moment the file system loses
//! power (unsynced writes vanish, some of them may reach the disk first) and strata is
//! killed. Then, on the backing file: every write acknowledged before a FLUSH that completed
//! was submitted (in write-through mode: every acknowledged write) is there, or a newer write
//! of the same sector; no sector holds anything but a stamp some write put there; and
//! `qemu-img check` finds at most leaks. Rounds go on with the image the last one left.
//!
//! `STRATA_POWER_LOSS_ROUNDS` sets the rounds per configuration (scripts/power-loss.sh runs
//! many), `STRATA_POWER_LOSS_SEED` replays a run (each run prints its seed).

mod faultfs_rig;

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use blkio::ReqFlags;
use faultfs_rig::*;
use rand::{rngs::SmallRng, Rng, SeedableRng};

const DISK: u64 = 16 << 20;
const QUEUE_DEPTH: usize = 8;
const MAX_SECTORS: u64 = 48;
const SLOT: usize = (MAX_SECTORS * SECTOR) as usize;

struct Config {
    format: Format,
    writethrough: bool,
    direct: bool,
}

/// One write of a round: where it went.
struct Written {
    lba: u64,
    sectors: u64,
}

/// What one round's client saw before the power failed.
#[derive(Default)]
struct Round {
    writes: HashMap<u64, Written>,
    /// (seq, clock at its completion) of the writes acknowledged as done.
    acked: Vec<(u64, u64)>,
    /// Writes acknowledged before this clock are durable: the submission time of the latest
    /// FLUSH that completed (every acknowledged write in write-through mode).
    durable_before: u64,
}

fn rounds() -> u64 {
    std::env::var("STRATA_POWER_LOSS_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

fn seed() -> u64 {
    std::env::var("STRATA_POWER_LOSS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
}

/// Writes (and in write-back mode flushes) until `stop_after` requests completed, then
/// cuts the power with requests still in flight.
fn run_round(rig: &Rig, cfg: &Config, rng: &mut SmallRng, next_seq: &mut u64) -> Round {
    let mut client = Client::connect(&rig.socket(), QUEUE_DEPTH * SLOT);
    let sectors_total = DISK / SECTOR;
    let stop_after = rng.gen_range(10..250);
    let mut round = Round::default();
    let mut clock = 0u64;
    // Per slot: what is in flight there (a write's seq, or 0 for a flush) and its submit time.
    let mut slots: Vec<Option<(u64, u64)>> = vec![None; QUEUE_DEPTH];
    let mut completed = 0;
    while completed < stop_after {
        for slot in 0..QUEUE_DEPTH {
            if slots[slot].is_some() {
                continue;
            }
            clock += 1;
            if !cfg.writethrough && rng.gen_ratio(1, 8) {
                client.queue.flush(slot, ReqFlags::empty());
                slots[slot] = Some((0, clock));
                continue;
            }
            // A write that overlaps none in flight, so that the order of the writes to a
            // sector is the order of their sequence numbers.
            let (lba, sectors) = loop {
                let sectors = rng.gen_range(1..=MAX_SECTORS);
                let lba = rng.gen_range(0..=sectors_total - sectors);
                let overlaps = slots.iter().flatten().any(|&(seq, _)| {
                    round
                        .writes
                        .get(&seq)
                        .is_some_and(|w| lba < w.lba + w.sectors && w.lba < lba + sectors)
                });
                if !overlaps {
                    break (lba, sectors);
                }
            };
            let seq = *next_seq;
            *next_seq += 1;
            let data = stamped(seq, lba, sectors);
            let at = slot * SLOT;
            client.buf()[at..at + data.len()].copy_from_slice(&data);
            let p = client.ptr(at);
            client
                .queue
                .write(lba * SECTOR, p, data.len(), slot, ReqFlags::empty());
            round.writes.insert(seq, Written { lba, sectors });
            slots[slot] = Some((seq, clock));
        }
        for (slot, ret) in client.complete(QUEUE_DEPTH) {
            clock += 1;
            let (seq, submitted) = slots[slot].take().expect("a completion for a free slot");
            assert_eq!(ret, 0, "request {seq} failed before the power loss");
            if seq == 0 {
                round.durable_before = round.durable_before.max(submitted);
            } else {
                round.acked.push((seq, clock));
            }
            completed += 1;
        }
    }
    if cfg.writethrough {
        round.durable_before = u64::MAX;
    }
    // Power fails with requests in flight; half the time the disk had written some of the
    // unsynced pages first.
    let keep = if rng.gen_bool(0.5) {
        rng.gen_range(1..100)
    } else {
        0
    };
    rig.mount()
        .command(&format!("power-loss keep {keep} seed {}", rng.gen::<u64>()))
        .expect("power-loss");
    round
}

/// Checks every sector of the stable image against the round; returns each sector's seq.
fn verify(content: &[u8], baseline: &[u64], round: &Round, what: &str) -> Vec<u64> {
    let sectors = baseline.len();
    // The newest durable seq per sector.
    let mut required = baseline.to_vec();
    for &(seq, acked_at) in &round.acked {
        if acked_at < round.durable_before {
            let w = &round.writes[&seq];
            for lba in w.lba..w.lba + w.sectors {
                required[lba as usize] = required[lba as usize].max(seq);
            }
        }
    }
    let mut found = vec![0u64; sectors];
    for lba in 0..sectors {
        let bytes = &content[lba * SECTOR as usize..(lba + 1) * SECTOR as usize];
        let seq = read_stamp(lba as u64, bytes).unwrap_or_else(|| {
            panic!("{what}: sector {lba} holds bytes no write put there: {bytes:02x?}")
        });
        let written_here = seq == baseline[lba]
            || round
                .writes
                .get(&seq)
                .is_some_and(|w| (w.lba..w.lba + w.sectors).contains(&(lba as u64)));
        assert!(
            written_here,
            "{what}: sector {lba} holds write {seq}, which never wrote it"
        );
        assert!(
            seq >= required[lba],
            "{what}: sector {lba} lost write {} (acknowledged{}), it holds {seq}",
            required[lba],
            if round.durable_before == u64::MAX {
                " in write-through mode".to_string()
            } else {
                " before a completed FLUSH".to_string()
            }
        );
        found[lba] = seq;
    }
    found
}

fn power_loss_rounds(cfg: Config) {
    if !require_fuse() {
        return;
    }
    let seed = seed();
    let name = format!(
        "{:?} writethrough={} cache.direct={}",
        cfg.format, cfg.writethrough, cfg.direct
    );
    eprintln!("{name}: STRATA_POWER_LOSS_SEED={seed}");
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut rig = Rig::new(cfg.format, DISK, 65536);
    let mut baseline = vec![0u64; (DISK / SECTOR) as usize];
    let mut next_seq = 1;
    for r in 0..rounds() {
        let what = format!("{name}, seed {seed}, round {r}");
        let mut daemon = rig.start_strata(cfg.writethrough, cfg.direct);
        let round = run_round(&rig, &cfg, &mut rng, &mut next_seq);
        daemon.kill();
        drop(daemon);
        rig.unmount();
        rig.check_qcow2(&what);
        baseline = verify(&rig.stable_content(), &baseline, &round, &what);
        rig.remount();
    }
}

#[test]
fn raw_writeback_direct() {
    power_loss_rounds(Config {
        format: Format::Raw,
        writethrough: false,
        direct: true,
    });
}

#[test]
fn raw_writethrough_direct() {
    power_loss_rounds(Config {
        format: Format::Raw,
        writethrough: true,
        direct: true,
    });
}

#[test]
fn raw_writeback_buffered() {
    power_loss_rounds(Config {
        format: Format::Raw,
        writethrough: false,
        direct: false,
    });
}

#[test]
fn qcow2_writeback_direct() {
    power_loss_rounds(Config {
        format: Format::Qcow2,
        writethrough: false,
        direct: true,
    });
}

#[test]
fn qcow2_writethrough_direct() {
    power_loss_rounds(Config {
        format: Format::Qcow2,
        writethrough: true,
        direct: true,
    });
}

#[test]
fn qcow2_writeback_buffered() {
    power_loss_rounds(Config {
        format: Format::Qcow2,
        writethrough: false,
        direct: false,
    });
}
