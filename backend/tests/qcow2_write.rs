//! Writing qcow2 images through strata: mixed-size random writes from 2 threads (several
//! requests in flight on each), zero writes, discards and partial-cluster writes over a
//! backing file. Afterwards `qemu-img check` finds no errors and no leaks, and
//! `qemu-img compare` finds the image equal to a raw model of what was written.

mod qcow2_util;

use std::sync::{Arc, Mutex};

use qcow2_util::*;
use rand::{rngs::SmallRng, Rng, SeedableRng};
use strata_backend::{Graph, IoVec, LocalExecutor, Node};

const THREADS: usize = 2;
const TASKS: usize = 4;
const OPS: usize = 120;

struct Setup {
    size: u64,
    cluster: u64,
    v3: bool,
    backing: Option<Vec<u8>>,
}

/// Applies an op to the model. Discard only changes whole clusters; it reads as zeroes
/// except on version 2 with a backing file, where the backing data shows again.
fn model_discard(model: &mut [u8], setup: &Setup, off: u64, len: u64) {
    let cs = setup.cluster;
    let start = off.div_ceil(cs) * cs;
    let end = if off + len >= setup.size {
        setup.size
    } else {
        (off + len) / cs * cs
    };
    for at in (start..end).step_by(cs as usize) {
        let e = (at + cs).min(setup.size) as usize;
        let at = at as usize;
        match (&setup.backing, setup.v3) {
            (Some(b), false) => {
                for (i, m) in model.iter_mut().enumerate().take(e).skip(at) {
                    *m = b.get(i).copied().unwrap_or(0);
                }
            }
            _ => model[at..e].fill(0),
        }
    }
}

/// The owner-disjoint layout: the first half is cut into 24 KiB stripes dealt round-robin
/// to the tasks (so tasks share clusters), the second half into chunks of 8 clusters (for
/// discards and whole-cluster zeroing).
/// (offset, length) ranges.
type Ranges = Vec<(u64, u64)>;

fn owned_ranges(setup: &Setup, task: usize) -> (Ranges, Ranges) {
    let n = THREADS * TASKS;
    let half = setup.size / 2;
    let stripes = dealt(0, half, 24 * 1024, n, task);
    let chunk = if setup.cluster >= 1 << 20 { 2 } else { 8 } * setup.cluster;
    let chunk_start = half.div_ceil(setup.cluster) * setup.cluster;
    let chunks = dealt(chunk_start, setup.size, chunk, n, task);
    (stripes, chunks)
}

/// Task `task`'s share when the `len`-byte ranges from `start` up to `end` are dealt
/// round-robin to `tasks` tasks.
fn dealt(start: u64, end: u64, len: u64, tasks: usize, task: usize) -> Ranges {
    (start..)
        .step_by(len as usize)
        .take_while(|at| at + len <= end)
        .skip(task)
        .step_by(tasks)
        .map(|at| (at, len))
        .collect()
}

async fn task_ops(node: &Node, setup: &Setup, task: usize, model: &Mutex<Vec<u8>>) {
    let mut rng = SmallRng::seed_from_u64(task as u64 * 7919 + setup.cluster);
    let (stripes, chunks) = owned_ranges(setup, task);
    let ops = if setup.cluster >= 1 << 20 {
        OPS / 4
    } else {
        OPS
    };
    for op in 0..ops {
        let use_chunk = !chunks.is_empty() && rng.gen_bool(0.4);
        let (base, span) = if use_chunk {
            chunks[rng.gen_range(0..chunks.len())]
        } else {
            stripes[rng.gen_range(0..stripes.len())]
        };
        let len = rng.gen_range(1..=span);
        let off = base + rng.gen_range(0..=span - len);
        let kind = rng.gen_range(0..10);
        if kind < 7 {
            let mut data = pattern((task * 100_000 + op) as u64, len as usize);
            node.write(off, &[IoVec::new(&mut data)])
                .await
                .expect("write");
            model.lock().unwrap()[off as usize..(off + len) as usize].copy_from_slice(&data);
        } else if kind < 9 {
            let unmap = rng.gen_bool(0.5);
            node.write_zeroes(off, len, unmap)
                .await
                .expect("write_zeroes");
            model.lock().unwrap()[off as usize..(off + len) as usize].fill(0);
        } else if use_chunk {
            node.discard(off, len).await.expect("discard");
            model_discard(&mut model.lock().unwrap(), setup, off, len);
        } else {
            node.flush().await.expect("flush");
        }
    }
}

fn run_threads(node: &Arc<Node>, setup: &Setup, model: &Mutex<Vec<u8>>) {
    std::thread::scope(|sc| {
        for t in 0..THREADS {
            let node = node.clone();
            sc.spawn(move || {
                let mut exec = LocalExecutor::new().expect("executor");
                for k in 0..TASKS {
                    let node = &*node;
                    exec.spawn(task_ops(node, setup, t * TASKS + k, model));
                }
                exec.run().expect("run");
            });
        }
    });
}

/// Returns the final number of refcount table clusters.
fn write_and_compare(name: &str, opts: &str, cluster: u64, v3: bool, backing: Option<&str>) -> u32 {
    write_and_compare_with(name, opts, cluster, v3, backing, "")
}

/// As [`write_and_compare`], with extra node options.
fn write_and_compare_with(
    name: &str,
    opts: &str,
    cluster: u64,
    v3: bool,
    backing: Option<&str>,
    node_opts: &str,
) -> u32 {
    let dir = tempdir();
    let size: u64 = (6 << 20).max(16 * cluster);
    let img = path(&dir, &format!("{name}.qcow2"));
    let mut backing_bytes = None;
    if let Some(fmt) = backing {
        let b = path(&dir, "base.img");
        // The backing file is shorter than the image: past it, reads are zeroes.
        let data = pattern(99, (size - size / 3) as usize);
        if fmt == "raw" {
            std::fs::write(&b, &data).unwrap();
        } else {
            let raw = path(&dir, "base.src");
            std::fs::write(&raw, &data).unwrap();
            qemu_img(&["convert", "-q", "-O", "qcow2", s(&raw), s(&b)]);
        }
        backing_bytes = Some(data);
        create_qcow2(&img, opts, Some(("base.img", fmt)), size);
    } else {
        create_qcow2(&img, opts, None, size);
    }
    let mut model = qemu_raw(&img);
    // Pre-existing data written by QEMU.
    let pre = (3 * cluster).min(size / 4);
    qemu_io(
        &img,
        "qcow2",
        &[format!("write -P 0x3c {} {pre}", cluster / 2)],
    );
    model[(cluster / 2) as usize..(cluster / 2 + pre) as usize].fill(0x3c);
    let setup = Setup {
        size,
        cluster,
        v3,
        backing: backing_bytes,
    };
    let model = Mutex::new(model);
    {
        let g = Graph::new();
        let node = open(
            &g,
            &format!("file.filename={},discard=unmap{node_opts}", s(&img)),
        );
        assert_eq!(node.driver_name(), "qcow2");
        run_threads(&node, &setup, &model);
        // Reads through strata agree before closing, too.
        assert_same(&read_all(&node), &model.lock().unwrap(), "strata read-back");
    }
    assert_check_clean(&img, true);
    let model = model.into_inner().unwrap();
    let raw = path(&dir, "model.raw");
    std::fs::write(&raw, &model).unwrap();
    qemu_img(&[
        "compare",
        "-q",
        "-f",
        "raw",
        "-F",
        "qcow2",
        s(&raw),
        s(&img),
    ]);
    // And strata reads its own image back after reopening.
    let g = Graph::new();
    let node = open_ro(&g, &img);
    assert_same(&read_all(&node), &model, "read after reopen");
    let header = std::fs::read(&img).unwrap();
    u32::from_be_bytes(header[56..60].try_into().unwrap())
}

#[test]
fn v3_64k_over_raw_backing() {
    write_and_compare("v3-64k", "cluster_size=65536", 65536, true, Some("raw"));
}

#[test]
fn v2_4k_over_qcow2_backing() {
    write_and_compare(
        "v2-4k",
        "compat=0.10,cluster_size=4096",
        4096,
        false,
        Some("qcow2"),
    );
}

#[test]
fn v3_512_no_backing_small_refcounts() {
    // 512-byte clusters need many refcount blocks and refcount table growth.
    write_and_compare(
        "v3-512",
        "cluster_size=512,refcount_bits=2",
        512,
        true,
        None,
    );
}

#[test]
fn v3_512_refcount_table_growth() {
    // 64-bit refcounts in 512-byte clusters: a block covers 32 KiB and a table cluster
    // 2 MiB, so the refcount table moves several times.
    let clusters = write_and_compare(
        "v3-512-64",
        "cluster_size=512,refcount_bits=64",
        512,
        true,
        Some("raw"),
    );
    assert!(clusters > 1, "the refcount table did not grow");
}

#[test]
fn v3_2m_clusters_64bit_refcounts_zstd() {
    write_and_compare(
        "v3-2m",
        "cluster_size=2M,refcount_bits=64,compression_type=zstd",
        2 << 20,
        true,
        Some("raw"),
    );
}

#[test]
fn v2_64k_no_backing() {
    write_and_compare("v2-64k", "compat=0.10", 65536, false, None);
}

#[test]
fn overwriting_compressed_clusters() {
    let dir = tempdir();
    let src = path(&dir, "src.raw");
    let data: Vec<u8> = (0..(4usize << 20)).map(|i| (i / 1000 % 13) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    let img = path(&dir, "c.qcow2");
    qemu_img(&[
        "convert",
        "-q",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "compression_type=zstd",
        s(&src),
        s(&img),
    ]);
    let mut model = data.clone();
    {
        let g = Graph::new();
        let node = open(
            &g,
            &format!("driver=qcow2,file.filename={},discard=unmap", s(&img)),
        );
        for (i, (off, len)) in [(100u64, 5000u64), (65536 * 3 + 7, 70000), (1 << 20, 65536)]
            .into_iter()
            .enumerate()
        {
            let p = pattern(i as u64 + 50, len as usize);
            write(&node, off, &p);
            model[off as usize..(off + len) as usize].copy_from_slice(&p);
        }
        run(node.discard(2 << 20, 1 << 20));
        model[2 << 20..3 << 20].fill(0);
        run(node.write_zeroes(3 << 20, 100_000, false));
        model[3 << 20..(3 << 20) + 100_000].fill(0);
        run(node.flush());
    }
    assert_check_clean(&img, true);
    assert_same(
        &qemu_raw(&img),
        &model,
        "after overwriting compressed clusters",
    );
}

#[test]
fn zero_clusters_and_discard_free_space() {
    let dir = tempdir();
    let img = path(&dir, "z.qcow2");
    create_qcow2(&img, "cluster_size=65536", None, 64 << 20);
    let g = Graph::new();
    let node = open(
        &g,
        &format!("driver=qcow2,file.filename={},discard=unmap", s(&img)),
    );
    let data = pattern(5, 16 << 20);
    write(&node, 0, &data);
    run(node.flush());
    let len_after_write = std::fs::metadata(&img).unwrap().len();
    // Whole-cluster zero writes become zero clusters: no data, reads zero.
    run(node.write_zeroes(0, 4 << 20, true));
    let st = run(node.block_status(0, 4 << 20));
    assert!(st.zero && !st.data, "{st:?}");
    // Discarded clusters are freed and reused by later writes: the file does not grow.
    run(node.discard(4 << 20, 12 << 20));
    run(node.flush());
    let blocks_after_discard = std::fs::metadata(&img)
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m))
        .unwrap();
    assert!(
        blocks_after_discard * 512 < 4 << 20,
        "discarded space was not punched: {blocks_after_discard} blocks"
    );
    write(&node, 20 << 20, &data);
    run(node.flush());
    assert!(
        std::fs::metadata(&img).unwrap().len() <= len_after_write + (1 << 20),
        "freed clusters were not reused"
    );
    assert_eq!(read(&node, 20 << 20, 1 << 20), data[..1 << 20].to_vec());
    drop(node);
    assert_check_clean(&img, true);
}

#[test]
fn v3_64k_o_direct() {
    // With cache.direct=on metadata I/O of any size goes through the file node's alignment
    // handling (bounces and serialised read-modify-write).
    write_and_compare_with(
        "v3-direct",
        "cluster_size=65536",
        65536,
        true,
        Some("raw"),
        ",cache.direct=on",
    );
}

#[test]
fn many_tasks_race_for_the_same_clusters() {
    // 16 tasks on 2 threads write disjoint 512-byte sectors of the same few clusters at the
    // same time: every cluster is allocated exactly once, nothing written is lost.
    let dir = tempdir();
    let img = path(&dir, "race.qcow2");
    let base = path(&dir, "base.raw");
    let backing = pattern(4, 1 << 20);
    std::fs::write(&base, &backing).unwrap();
    create_qcow2(
        &img,
        "cluster_size=65536",
        Some(("base.raw", "raw")),
        1 << 20,
    );
    let g = Graph::new();
    let node = open(&g, &format!("driver=qcow2,file.filename={}", s(&img)));
    let tasks = 16usize;
    let rounds = 4usize;
    std::thread::scope(|sc| {
        for t in 0..2 {
            let node = &node;
            sc.spawn(move || {
                let mut exec = LocalExecutor::new().unwrap();
                for k in 0..tasks / 2 {
                    let task = t * tasks / 2 + k;
                    exec.spawn(async move {
                        for r in 0..rounds {
                            // Sector `task` of each cluster of round `r`.
                            for c in 0..4u64 {
                                let cluster = r as u64 * 4 + c;
                                let off = cluster * 65536 + task as u64 * 512;
                                let mut data = vec![(task * 16 + r) as u8 + 1; 512];
                                node.write(off, &[IoVec::new(&mut data)]).await.unwrap();
                            }
                        }
                    });
                }
                exec.run().unwrap();
            });
        }
    });
    let mut want = backing.clone();
    for r in 0..rounds {
        for c in 0..4 {
            for task in 0..tasks {
                let off = (r * 4 + c) * 65536 + task * 512;
                want[off..off + 512].fill((task * 16 + r) as u8 + 1);
            }
        }
    }
    assert_same(&read_all(&node), &want, "racing writers");
    drop(node);
    assert_check_clean(&img, true);
    assert_same(&qemu_raw(&img), &want, "qemu's view");
    let info = qemu_img(&["check", s(&img)]);
    assert!(info.contains("16/16 = 100.00% allocated"), "{info}");
}
