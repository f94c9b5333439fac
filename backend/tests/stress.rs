//! Concurrent random I/O on one node (raw over an O_DIRECT file) from two threads, each with
//! up to 32 requests in flight, every byte checked against an in-memory model.
//!
//! The file is cut into runs of 4 KiB blocks, each owned by thread 0, thread 1 or nobody, and
//! interleaved. A thread writes only its own runs and reads its own runs or nobody's, so its
//! model is exact; neighbouring blocks of the two threads are read-modify-written at the same
//! time. Within a thread, a request never overlaps an in-flight write of the same thread.
//! Set STRATA_STRESS_SEED to replay a seed.

mod common;

use std::cell::{Cell, RefCell};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{assert_bytes_eq, file_bytes, image_with, open, path_str, run, AlignedBuf};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use strata_backend::{ChildRole, Graph, IoVec, LocalExecutor, Node};

const SIZE: usize = 8 << 20;
const BLOCK: usize = 4096;
const OPS_PER_THREAD: usize = 4000;
const IN_FLIGHT: usize = 32;
const NOBODY: usize = 2;

/// A run of blocks with one owner, as a byte range.
#[derive(Clone, Copy, Debug)]
struct Run {
    start: usize,
    end: usize,
}

/// Owner of every block (0, 1 or NOBODY), in runs of 1 to 8 blocks.
fn assign_owners(rng: &mut SmallRng) -> Vec<usize> {
    let blocks = SIZE / BLOCK;
    let mut owners = Vec::with_capacity(blocks);
    while owners.len() < blocks {
        let owner = match rng.gen_range(0..10) {
            0..=3 => 0,
            4..=7 => 1,
            _ => NOBODY,
        };
        let len = rng.gen_range(1..=8).min(blocks - owners.len());
        owners.extend(std::iter::repeat_n(owner, len));
    }
    owners
}

/// Maximal runs of blocks whose owner satisfies `pred`.
fn runs(owners: &[usize], pred: impl Fn(usize) -> bool) -> Vec<Run> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < owners.len() {
        if !pred(owners[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < owners.len() && owners[i] == owners[start] {
            i += 1;
        }
        out.push(Run {
            start: start * BLOCK,
            end: i * BLOCK,
        });
    }
    out
}

/// A random byte range inside `run`: tiny, sub-4K, 512-aligned or anything.
fn pick_range(rng: &mut SmallRng, run: Run) -> (usize, usize) {
    let span = run.end - run.start;
    let (off, len) = match rng.gen_range(0..4) {
        0 => {
            let len = rng.gen_range(1..=512);
            (rng.gen_range(0..=span - len), len)
        }
        1 => {
            let len = rng.gen_range(1..=4096.min(span));
            (rng.gen_range(0..=span - len), len)
        }
        2 => {
            let sectors = span / 512;
            let len = rng.gen_range(1..=sectors);
            (rng.gen_range(0..=sectors - len) * 512, len * 512)
        }
        _ => {
            let a = rng.gen_range(0..span);
            let b = rng.gen_range(0..span);
            (a.min(b), a.max(b) - a.min(b) + 1)
        }
    };
    (run.start + off, len)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    WriteZeroes,
}

struct Worker<'a> {
    thread: usize,
    node: &'a Node,
    rng: RefCell<SmallRng>,
    model: RefCell<Vec<u8>>,
    own: Vec<Run>,
    readable: Vec<Run>,
    in_flight: RefCell<Vec<(usize, usize, Kind)>>,
    started: Cell<usize>,
    done: Cell<[usize; 3]>,
    peak: Cell<usize>,
}

impl Worker<'_> {
    /// Picks a request that does not overlap this thread's in-flight writes (nor, for a write,
    /// any of its in-flight requests), and registers it.
    fn next_request(&self) -> (Kind, usize, usize) {
        let mut rng = self.rng.borrow_mut();
        loop {
            let kind = match rng.gen_range(0..20) {
                0..=8 => Kind::Read,
                9..=18 => Kind::Write,
                _ => Kind::WriteZeroes,
            };
            let runs = if kind == Kind::Read {
                &self.readable
            } else {
                &self.own
            };
            let run = runs[rng.gen_range(0..runs.len())];
            let (off, len) = pick_range(&mut rng, run);
            let end = off + len;
            let mut in_flight = self.in_flight.borrow_mut();
            let conflict = in_flight
                .iter()
                .any(|&(s, e, k)| s < end && off < e && (kind != Kind::Read || k != Kind::Read));
            if !conflict {
                in_flight.push((off, end, kind));
                self.peak.set(self.peak.get().max(in_flight.len()));
                return (kind, off, len);
            }
        }
    }

    fn finish(&self, kind: Kind, off: usize) {
        let mut in_flight = self.in_flight.borrow_mut();
        let i = in_flight
            .iter()
            .position(|&(s, _, k)| s == off && k == kind)
            .expect("registered request");
        in_flight.swap_remove(i);
        let mut done = self.done.get();
        done[kind as usize] += 1;
        self.done.set(done);
    }

    /// Splits an aligned-or-not buffer into 1 to 3 iovecs.
    fn iovecs<'b>(&self, buf: &'b mut [u8]) -> Vec<IoVec<'b>> {
        let mut rng = self.rng.borrow_mut();
        let pieces = if buf.len() < 3 || rng.gen_bool(0.5) {
            1
        } else {
            rng.gen_range(2..=3)
        };
        let mut out = Vec::new();
        let mut rest = buf;
        for i in 0..pieces {
            let take = if i + 1 == pieces || rest.len() < 2 {
                rest.len()
            } else if rng.gen_bool(0.5) && rest.len() > 1024 {
                // Often split at a 512 boundary so zero-copy stays possible.
                rng.gen_range(1..=(rest.len() - 1) / 512) * 512
            } else {
                rng.gen_range(1..rest.len())
            };
            let (head, tail) = rest.split_at_mut(take);
            out.push(IoVec::new(head));
            rest = tail;
        }
        out
    }

    async fn work(&self) {
        while self.started.get() < OPS_PER_THREAD {
            self.started.set(self.started.get() + 1);
            let (kind, off, len) = self.next_request();
            let misalign = {
                let mut rng = self.rng.borrow_mut();
                if rng.gen_bool(0.6) {
                    0
                } else {
                    rng.gen_range(1..64)
                }
            };
            let what = format!("thread {} {kind:?} {len}@{off}", self.thread);
            match kind {
                Kind::Read => {
                    let mut buf = AlignedBuf::new(len, misalign);
                    buf.as_mut_slice().fill(0xA5);
                    let iov = self.iovecs(buf.as_mut_slice());
                    let r = self.node.read(off as u64, &iov).await;
                    drop(iov);
                    r.unwrap_or_else(|e| panic!("{what}: {e}"));
                    assert_bytes_eq(buf.as_slice(), &self.model.borrow()[off..off + len], &what);
                }
                Kind::Write => {
                    let data: Vec<u8> = {
                        let mut rng = self.rng.borrow_mut();
                        (0..len).map(|_| rng.gen()).collect()
                    };
                    let mut buf = AlignedBuf::from_slice(&data, misalign);
                    let iov = self.iovecs(buf.as_mut_slice());
                    let r = self.node.write(off as u64, &iov).await;
                    drop(iov);
                    r.unwrap_or_else(|e| panic!("{what}: {e}"));
                    self.model.borrow_mut()[off..off + len].copy_from_slice(&data);
                }
                Kind::WriteZeroes => {
                    let unmap = self.rng.borrow_mut().gen_bool(0.5);
                    self.node
                        .write_zeroes(off as u64, len as u64, unmap)
                        .await
                        .unwrap_or_else(|e| panic!("{what}: {e}"));
                    self.model.borrow_mut()[off..off + len].fill(0);
                }
            }
            self.finish(kind, off);
        }
    }
}

fn seed() -> u64 {
    match std::env::var("STRATA_STRESS_SEED") {
        Ok(s) => s.parse().expect("STRATA_STRESS_SEED must be a number"),
        Err(_) => rand::random(),
    }
}

#[test]
fn concurrent_random_io_matches_the_model() {
    let seed = seed();
    eprintln!("stress seed {seed} (set STRATA_STRESS_SEED={seed} to replay the layout)");
    let mut rng = SmallRng::seed_from_u64(seed);
    let initial: Vec<u8> = (0..SIZE).map(|_| rng.gen()).collect();
    let owners = assign_owners(&mut rng);
    let img = image_with(&initial);
    let g = Graph::new();
    let node = open(
        &g,
        &format!(
            "driver=raw,discard=unmap,cache.direct=on,file.filename={}",
            path_str(&img)
        ),
    );
    let file = node.child(ChildRole::File).unwrap();
    assert!(file.limits().request_alignment >= 512);

    let started = Instant::now();
    let results: Vec<(Vec<u8>, [usize; 3], usize)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|t| {
                let (node, owners, initial) = (&*node, &owners, &initial);
                let thread_seed = seed ^ (t as u64 + 1).wrapping_mul(0x9E37_79B9);
                s.spawn(move || {
                    let w = Worker {
                        thread: t,
                        node,
                        rng: RefCell::new(SmallRng::seed_from_u64(thread_seed)),
                        model: RefCell::new(initial.clone()),
                        own: runs(owners, |o| o == t),
                        readable: runs(owners, |o| o == t || o == NOBODY),
                        in_flight: RefCell::new(Vec::new()),
                        started: Cell::new(0),
                        done: Cell::new([0; 3]),
                        peak: Cell::new(0),
                    };
                    let mut ex = LocalExecutor::new().unwrap();
                    for _ in 0..IN_FLIGHT {
                        ex.spawn(w.work());
                    }
                    ex.run().unwrap();
                    drop(ex);
                    run(w.node.flush()).unwrap();
                    (w.model.into_inner(), w.done.get(), w.peak.get())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let elapsed = started.elapsed();

    let mut expected = initial.clone();
    for (b, &owner) in owners.iter().enumerate() {
        if owner != NOBODY {
            let r = b * BLOCK..(b + 1) * BLOCK;
            expected[r.clone()].copy_from_slice(&results[owner].0[r]);
        }
    }
    let stats = file.stats();
    eprintln!(
        "{} requests in {elapsed:?}; per thread [reads, writes, write_zeroes] {:?} {:?}, \
         peak in flight {} {}; file node: zero_copy {}, bounced {}, read-modify-write {}",
        2 * OPS_PER_THREAD,
        results[0].1,
        results[1].1,
        results[0].2,
        results[1].2,
        stats.zero_copy.get(),
        stats.bounced.get(),
        stats.read_modify_write.get(),
    );
    for (t, r) in results.iter().enumerate() {
        assert_eq!(r.1.iter().sum::<usize>(), OPS_PER_THREAD, "thread {t}");
        assert!(r.2 >= IN_FLIGHT / 2, "thread {t}: peak in flight {}", r.2);
    }
    // Every path was taken.
    assert!(stats.zero_copy.get() > 100);
    assert!(stats.bounced.get() > 100);
    assert!(stats.read_modify_write.get() > 100);

    let mut whole = AlignedBuf::new(SIZE, 0);
    run(node.read(0, &[whole.iovec()])).unwrap();
    assert_bytes_eq(whole.as_slice(), &expected, "read back through the node");
    drop(node);
    assert_bytes_eq(&file_bytes(&img), &expected, "read back with std::fs");
}

#[test]
fn more_requests_in_flight_than_the_ring_holds() {
    // 3000 concurrent reads on one thread: more than the submission and completion queues
    // hold at once. All must complete (no lost completion, no hang) with the right data.
    const N: usize = 3000;
    let data = common::pattern(9, N * BLOCK);
    let img = image_with(&data);
    let (tx, rx) = mpsc::channel();
    let path = path_str(&img).to_string();
    let worker = std::thread::spawn(move || {
        let g = Graph::new();
        let node = open(
            &g,
            &format!("driver=raw,cache.direct=on,file.filename={path}"),
        );
        let mut bufs: Vec<AlignedBuf> = (0..N).map(|_| AlignedBuf::new(BLOCK, 0)).collect();
        let mut ex = LocalExecutor::new().unwrap();
        for (i, buf) in bufs.iter_mut().enumerate() {
            let node = &node;
            ex.spawn(async move {
                let i = (i * 7919) % N;
                node.read((i * BLOCK) as u64, &[buf.iovec()]).await.unwrap();
            });
        }
        ex.run().unwrap();
        drop(ex);
        let got: Vec<Vec<u8>> = bufs.iter().map(|b| b.as_slice().to_vec()).collect();
        tx.send(got).unwrap();
    });
    let got = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("requests beyond the ring size did not complete within 60 s");
    worker.join().unwrap();
    for (i, buf) in got.iter().enumerate() {
        let b = (i * 7919) % N;
        assert_bytes_eq(
            buf,
            &data[b * BLOCK..(b + 1) * BLOCK],
            &format!("block {b}"),
        );
    }
}
