//! Two threads (as two queues' workers) write the same and straddling ranges at once, raw and
//! qcow2 (unallocated clusters, allocated ones, copy-on-write from a backing file). Afterwards
//! every sector holds one of the writes that covered it, whole (the sector atomicity a guest
//! relies on) and in the right place, and not one that a later write replaced (no lost update:
//! a write that started after another completed wins over it); qcow2 neither leaks nor
//! double-allocates.
//! Set STRATA_OVERLAP_SEED to replay a seed.

mod qcow2_util;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use qcow2_util::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use strata_backend::{Graph, IoVec, LocalExecutor, Node};

const SECTOR: usize = 512;
/// The contended range: a few clusters of every cluster size tested.
const REGION: usize = 384 << 10;
const IMAGE: u64 = 4 << 20;
const TASKS_PER_THREAD: usize = 8;
const WRITES_PER_TASK: usize = 60;
const MAGIC: u32 = 0x5354_5254;

/// One write: who, which, the sectors it covered, and when it started and completed (ticks
/// of one clock shared by the threads).
#[derive(Clone, Copy, Debug)]
struct Write {
    writer: u32,
    seq: u32,
    first: usize,
    end: usize,
    started: u64,
    completed: u64,
}

/// The shared clock.
static CLOCK: AtomicU64 = AtomicU64::new(0);

fn tick() -> u64 {
    CLOCK.fetch_add(1, Ordering::SeqCst)
}

/// The bytes a write puts in sector `s`: a 16-byte record naming it, repeated.
fn sector_bytes(w: &Write, s: usize) -> Vec<u8> {
    let mut rec = Vec::with_capacity(16);
    for v in [MAGIC, w.writer, w.seq, s as u32] {
        rec.extend_from_slice(&v.to_le_bytes());
    }
    rec.repeat(SECTOR / 16)
}

fn seed() -> u64 {
    std::env::var("STRATA_OVERLAP_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen())
}

/// Runs the writers of one thread: TASKS_PER_THREAD tasks writing at once.
fn writer_thread(node: &Node, writer: u32, seed: u64, log: &Mutex<Vec<Write>>) {
    let mut exec = LocalExecutor::new().expect("executor");
    for task in 0..TASKS_PER_THREAD {
        let mut rng = SmallRng::seed_from_u64(seed ^ (u64::from(writer) << 32) ^ task as u64);
        exec.spawn(async move {
            for i in 0..WRITES_PER_TASK {
                let sectors = REGION / SECTOR;
                let len = rng.gen_range(1..=64).min(sectors);
                let first = rng.gen_range(0..=sectors - len);
                let mut w = Write {
                    writer,
                    seq: (task * WRITES_PER_TASK + i) as u32,
                    first,
                    end: first + len,
                    started: 0,
                    completed: 0,
                };
                let mut data: Vec<u8> =
                    (w.first..w.end).flat_map(|s| sector_bytes(&w, s)).collect();
                let off = (first * SECTOR) as u64;
                w.started = tick();
                node.write(off, &[IoVec::new(&mut data)])
                    .await
                    .unwrap_or_else(|e| panic!("write {w:?}: {e}"));
                w.completed = tick();
                log.lock().unwrap().push(w);
            }
        });
    }
    exec.run().expect("run writers");
}

/// Writes from two threads at once, then checks every sector of the region.
fn race(node: &Node, before: &[u8], what: &str) {
    let seed = seed();
    let log = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for writer in 0..2 {
            let log = &log;
            s.spawn(move || writer_thread(node, writer, seed, log));
        }
    });
    let writes = log.into_inner().unwrap();
    let after = read(node, 0, REGION);
    for s in 0..REGION / SECTOR {
        let got = &after[s * SECTOR..(s + 1) * SECTOR];
        let covering: Vec<&Write> = writes
            .iter()
            .filter(|w| w.first <= s && s < w.end)
            .collect();
        if covering.is_empty() {
            assert_eq!(
                got,
                &before[s * SECTOR..(s + 1) * SECTOR],
                "{what}: sector {s} was never written (seed {seed})"
            );
            continue;
        }
        let Some(w) = covering
            .iter()
            .find(|w| got == sector_bytes(w, s).as_slice())
        else {
            panic!(
                "{what}: sector {s} holds none of the {} writes that covered it, whole \
                 (first record {:02x?}; seed {seed})",
                covering.len(),
                &got[..16]
            );
        };
        if let Some(later) = covering.iter().find(|o| o.started > w.completed) {
            panic!(
                "{what}: sector {s} holds write {w:?}, but {later:?} started after it completed \
                 (a lost update; seed {seed})"
            );
        }
    }
}

fn qcow2_image(dir: &Path, name: &str, cluster: u64, backing: Option<&str>) -> std::path::PathBuf {
    let img = dir.join(name);
    let mut args = vec![
        "create".to_string(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
    ];
    args.push("-o".into());
    args.push(format!("cluster_size={cluster}"));
    if let Some(b) = backing {
        args.extend(["-b".into(), b.into(), "-F".into(), "raw".into()]);
    }
    args.push(img.to_str().unwrap().into());
    args.push(IMAGE.to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    qemu_img(&args);
    img
}

#[test]
fn raw_on_an_o_direct_file() {
    let dir = tempdir();
    let img = dir.path().join("raw.img");
    let base = pattern(3, IMAGE as usize);
    std::fs::write(&img, &base).unwrap();
    let node = open(
        &Graph::new(),
        &format!("driver=raw,cache.direct=on,file.filename={}", img.display()),
    );
    race(&node, &base, "raw");
}

#[test]
fn raw_on_4k_sectors_with_512_byte_writes() {
    // Sub-block writes are read-modify-write: overlapping ones must be serialised.
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if std::env::var("CI").as_deref() != Ok("true") && !root {
        eprintln!("SKIPPED: loop devices need root");
        return;
    }
    let dir = tempdir();
    let img = dir.path().join("raw4k.img");
    let base = pattern(5, IMAGE as usize);
    std::fs::write(&img, &base).unwrap();
    let out = std::process::Command::new("losetup")
        .args(["--sector-size", "4096", "-f", "--show"])
        .arg(&img)
        .output()
        .expect("losetup");
    assert!(out.status.success(), "losetup: {out:?}");
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let result = std::panic::catch_unwind(|| {
        let node = open(
            &Graph::new(),
            &format!("driver=raw,cache.direct=on,file.filename={dev}"),
        );
        race(&node, &base, "raw on 4K sectors");
    });
    let _ = std::process::Command::new("losetup")
        .arg("-d")
        .arg(&dev)
        .status();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn qcow2_allocating_allocated_and_copy_on_write() {
    let dir = tempdir();
    let base = pattern(4, IMAGE as usize);
    std::fs::write(dir.path().join("base.raw"), &base).unwrap();
    for (name, cluster, backing) in [
        ("empty-64k.qcow2", 65536, None),
        ("cow-64k.qcow2", 65536, Some("base.raw")),
        ("cow-4k.qcow2", 4096, Some("base.raw")),
    ] {
        let img = qcow2_image(dir.path(), name, cluster, backing);
        let opts = format!(
            "driver=qcow2,cache.direct=on,file.filename={}",
            img.display()
        );
        let before = if backing.is_some() {
            base.clone()
        } else {
            vec![0; IMAGE as usize]
        };
        // Unallocated clusters first (the writers race to allocate them), then the same
        // clusters allocated.
        for round in ["unallocated", "allocated"] {
            let node = open(&Graph::new(), &opts);
            let now = if round == "unallocated" {
                before.clone()
            } else {
                read(&node, 0, IMAGE as usize)
            };
            race(&node, &now, &format!("{name}, {round}"));
            drop(node);
            assert_check_clean(&img, true);
        }
    }
}
