//! Crash consistency: a child process (this test binary, re-executed) writes, zeroes and
//! discards through strata from 2 threads with several requests in flight each, flushing
//! periodically and reporting each completed flush; the parent kills it with SIGKILL at a
//! random moment. Then `qemu-img check` must find no corruption (leaks are acceptable), and
//! everything a reported flush covered must read back. Each round continues on the image the
//! previous kill left behind.

mod qcow2_util;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use qcow2_util::*;
use rand::{rngs::SmallRng, Rng, SeedableRng};
use strata_backend::{Graph, IoVec, LocalExecutor, Node};

const THREADS: usize = 2;
const TASKS: usize = 3;
const FLUSH_EVERY: usize = 6;
const MAX_OPS: usize = 100_000;

#[derive(Clone, Copy)]
struct Layout {
    size: u64,
    cluster: u64,
}

#[derive(Clone, Debug)]
enum Op {
    Write { off: u64, len: u64, seed: u64 },
    Zero { off: u64, len: u64, unmap: bool },
    Discard { off: u64, len: u64 },
}

/// Task `task` owns 20 KiB stripes of the first half (sharing clusters with other tasks)
/// and 4-cluster chunks of the second half.
fn owned(l: Layout, task: usize) -> (Vec<u64>, Vec<u64>) {
    let n = (THREADS * TASKS) as u64;
    let half = l.size / 2;
    let stripe = 20 * 1024;
    let stripes = (0..half / stripe)
        .filter(|i| i % n == task as u64)
        .map(|i| i * stripe)
        .collect();
    let chunk = 4 * l.cluster;
    let chunks = (0..(l.size - half) / chunk)
        .filter(|i| i % n == task as u64)
        .map(|i| half + i * chunk)
        .collect();
    (stripes, chunks)
}

/// The deterministic op sequence of one task in one round.
fn ops(l: Layout, round: u64, task: usize) -> impl Iterator<Item = Op> {
    let mut rng = SmallRng::seed_from_u64(round * 1000 + task as u64);
    let (stripes, chunks) = owned(l, task);
    let stripe = 20 * 1024;
    let chunk = 4 * l.cluster;
    (0..MAX_OPS).map(move |i| {
        let in_chunk = rng.gen_bool(0.3);
        let (base, span) = if in_chunk {
            (chunks[rng.gen_range(0..chunks.len())], chunk)
        } else {
            (stripes[rng.gen_range(0..stripes.len())], stripe)
        };
        let len = rng.gen_range(1..=span);
        let off = base + rng.gen_range(0..=span - len);
        match rng.gen_range(0..20) {
            0..=15 => Op::Write {
                off,
                len,
                seed: round << 40 | (task as u64) << 32 | i as u64,
            },
            16..=18 => Op::Zero {
                off,
                len,
                unmap: rng.gen_bool(0.5),
            },
            _ if in_chunk => Op::Discard { off, len },
            _ => Op::Zero {
                off,
                len,
                unmap: false,
            },
        }
    })
}

/// Applies an op to a byte model (version 3: discarded whole clusters read as zeroes).
fn apply(model: &mut [u8], l: Layout, op: &Op) {
    match *op {
        Op::Write { off, len, seed } => {
            model[off as usize..(off + len) as usize].copy_from_slice(&pattern(seed, len as usize))
        }
        Op::Zero { off, len, .. } => model[off as usize..(off + len) as usize].fill(0),
        Op::Discard { off, len } => {
            let start = off.div_ceil(l.cluster) * l.cluster;
            let end = (off + len) / l.cluster * l.cluster;
            if end > start {
                model[start as usize..end as usize].fill(0);
            }
        }
    }
}

/// The bytes an op may have left (for ops that may or may not have happened).
fn op_range(l: Layout, op: &Op) -> (u64, u64) {
    match *op {
        Op::Write { off, len, .. } | Op::Zero { off, len, .. } => (off, off + len),
        Op::Discard { off, len } => {
            let start = off.div_ceil(l.cluster) * l.cluster;
            ((start), ((off + len) / l.cluster * l.cluster).max(start))
        }
    }
}

async fn child_task(node: &Node, l: Layout, round: u64, task: usize) {
    for (i, op) in ops(l, round, task).enumerate() {
        match op {
            Op::Write { off, len, seed } => {
                let mut data = pattern(seed, len as usize);
                node.write(off, &[IoVec::new(&mut data)]).await
            }
            Op::Zero { off, len, unmap } => node.write_zeroes(off, len, unmap).await,
            Op::Discard { off, len } => node.discard(off, len).await,
        }
        .expect("I/O in the crash child");
        if i % FLUSH_EVERY == FLUSH_EVERY - 1 {
            node.flush().await.expect("flush");
            println!("F {task} {i}");
        }
    }
}

/// The writer process: runs until killed.
#[test]
fn crash_child() {
    let Ok(img) = std::env::var("STRATA_CRASH_IMG") else {
        return; // Only as the child of `kill_during_writes`.
    };
    let var = |k: &str| -> u64 { std::env::var(k).unwrap().parse().unwrap() };
    let l = Layout {
        size: var("STRATA_CRASH_SIZE"),
        cluster: var("STRATA_CRASH_CLUSTER"),
    };
    let round = var("STRATA_CRASH_ROUND");
    let g = Graph::new();
    let node = open(
        &g,
        &format!("driver=qcow2,file.filename={img},discard=unmap"),
    );
    println!("READY");
    std::thread::scope(|sc| {
        for t in 0..THREADS {
            let node = &node;
            sc.spawn(move || {
                let mut exec = LocalExecutor::new().unwrap();
                for k in 0..TASKS {
                    exec.spawn(child_task(node, l, round, t * TASKS + k));
                }
                exec.run().unwrap();
            });
        }
    });
}

fn crash_rounds(opts: &str, l: Layout, rounds: u64) {
    let dir = tempdir();
    let base = path(&dir, "base.raw");
    std::fs::write(&base, pattern(7, (l.size - l.size / 4) as usize)).unwrap();
    let img = path(&dir, "crash.qcow2");
    create_qcow2(&img, opts, Some(("base.raw", "raw")), l.size);
    let mut baseline = qemu_raw(&img);
    let mut rng = SmallRng::seed_from_u64(l.cluster);
    for round in 0..rounds {
        let exe = std::env::current_exe().unwrap();
        let mut child = Command::new(exe)
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env("STRATA_CRASH_IMG", &img)
            .env("STRATA_CRASH_SIZE", l.size.to_string())
            .env("STRATA_CRASH_CLUSTER", l.cluster.to_string())
            .env("STRATA_CRASH_ROUND", round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the crash child");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut flushed = vec![None::<usize>; THREADS * TASKS];
        let mut ready = false;
        let start = Instant::now();
        let kill_after = Duration::from_millis(rng.gen_range(50..1200));
        while !ready || start.elapsed() < kill_after {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "crash child hangs"
            );
            let Ok(line) = rx.recv_timeout(Duration::from_millis(5)) else {
                continue;
            };
            if line.ends_with("READY") {
                ready = true;
            }
            if let Some(rest) = line.strip_prefix("F ") {
                let mut it = rest.split(' ').map(|x| x.parse::<usize>().unwrap());
                let (t, i) = (it.next().unwrap(), it.next().unwrap());
                flushed[t] = Some(i);
            }
        }
        child.kill().expect("SIGKILL the child");
        let status = child.wait().unwrap();
        // Lines already written before the kill count too.
        for line in rx.try_iter().chain(std::iter::from_fn(|| {
            rx.recv_timeout(Duration::from_millis(200)).ok()
        })) {
            if let Some(rest) = line.strip_prefix("F ") {
                let mut it = rest.split(' ').map(|x| x.parse::<usize>().unwrap());
                let (t, i) = (it.next().unwrap(), it.next().unwrap());
                flushed[t] = Some(i);
            }
        }
        reader.join().unwrap();
        assert!(
            status.code().is_none(),
            "the child exited by itself: {status:?}"
        );
        // No corruption (leaks are fine).
        let (code, out) = qemu_check(&img);
        assert!(
            code == 0 || code == 3,
            "round {round}: qemu-img check exited {code}:\n{out}"
        );
        let got = qemu_raw(&img);
        // Every byte equals the model after the flushed ops, or the value some later op
        // (possibly in flight at the kill) gave it.
        let mut want = baseline.clone();
        let mut later: Vec<(u64, u64, Vec<u8>)> = Vec::new();
        for (task, last) in flushed.iter().enumerate() {
            let mut seq = ops(l, round, task);
            let done = last.map_or(0, |i| i + 1);
            for op in seq.by_ref().take(done) {
                apply(&mut want, l, &op);
            }
            // At most a few ops per task can be past the last flush report; allow every op
            // up to the next flush.
            for op in seq.take(FLUSH_EVERY * 4) {
                let (s0, e0) = op_range(l, &op);
                let mut vals = want[s0 as usize..e0 as usize].to_vec();
                let mut m = vec![0u8; l.size as usize];
                if let Op::Write { .. } = op {
                    apply(&mut m, l, &op);
                    vals.copy_from_slice(&m[s0 as usize..e0 as usize]);
                } else {
                    vals.fill(0);
                }
                later.push((s0, e0, vals));
            }
        }
        for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
            if g == w {
                continue;
            }
            let i64_ = i as u64;
            let explained = later
                .iter()
                .any(|(s0, e0, vals)| i64_ >= *s0 && i64_ < *e0 && vals[(i64_ - s0) as usize] == g);
            assert!(
                explained,
                "round {round}: byte {i:#x} is {g:#04x}, flushed data says {w:#04x} (flush \
                 reports {flushed:?})"
            );
        }
        eprintln!(
            "round {round}: killed after {:?}, flushes {flushed:?}, check exit {code}",
            kill_after
        );
        baseline = got;
    }
    // strata's check counts the leaks qemu-img counts, and repairs them.
    {
        use strata_backend::driver::qcow2::{check, Repair};
        let (code, out) = qemu_check(&img);
        let g = Graph::new();
        let file = open(&g, &format!("driver=file,filename={}", s(&img)));
        let r = run(check(&file, Repair::None));
        assert_eq!(r.corruptions, 0, "{:?}", r.messages);
        if code == 3 {
            assert!(
                out.contains(&format!("\n{} leaked clusters", r.leaks)),
                "strata: {} leaks, qemu-img:\n{out}",
                r.leaks
            );
        } else {
            assert_eq!(r.leaks, 0, "{:?}", r.messages);
        }
        let r = run(check(&file, Repair::Leaks));
        assert_eq!((r.leaks, r.corruptions), (0, 0));
    }
    assert_check_clean(&img, true);
    // Strata opens the crashed image read-write again and reads what qemu sees.
    let g = Graph::new();
    let node = open(&g, &format!("driver=qcow2,file.filename={}", s(&img)));
    assert_same(&read_all(&node), &baseline, "strata after the crashes");
}

#[test]
fn kill_during_writes_64k() {
    crash_rounds(
        "cluster_size=65536",
        Layout {
            size: 16 << 20,
            cluster: 65536,
        },
        5,
    );
}

#[test]
fn kill_during_writes_4k() {
    crash_rounds(
        "cluster_size=4096,refcount_bits=8",
        Layout {
            size: 12 << 20,
            cluster: 4096,
        },
        5,
    );
}
