//! Crafted (hostile) qcow2 images: made with `qemu-img create` and `qemu-io`, then bytes
//! patched here. Shared by the backend tests (open, write, check) and the `strata img check`
//! tests of the binary.

// Each user takes a different subset.
#![allow(dead_code)]

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

pub mod mutated;

/// An L1/L2 entry's flag: refcount 1, writable in place.
pub const COPIED: u64 = 1 << 63;
/// Header: `incompatible_features` dirty bit.
pub const DIRTY: u64 = 1;

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A new qcow2 image (`-o opts`) of `size` with `0x5a` written over its first 128 KiB.
pub fn base(path: &Path, opts: &str, size: &str) -> PathBuf {
    let mut c = Command::new("qemu-img");
    c.args(["create", "-q", "-f", "qcow2"]);
    if !opts.is_empty() {
        c.args(["-o", opts]);
    }
    run(c.arg(path).arg(size));
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5a 0 128k"])
        .arg(path));
    path.to_path_buf()
}

/// Reads a big-endian u64 at `off` of the file.
pub fn get64(path: &Path, off: u64) -> u64 {
    let f = std::fs::File::open(path).expect("open image");
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, off).expect("read image");
    u64::from_be_bytes(b)
}

/// Reads a big-endian u32 at `off` of the file.
pub fn get32(path: &Path, off: u64) -> u32 {
    (get64(path, off) >> 32) as u32
}

/// Writes `bytes` at `off` of the file.
pub fn put(path: &Path, off: u64, bytes: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open image for patching");
    f.write_all_at(bytes, off).expect("patch image");
}

/// Writes a big-endian u64.
pub fn put64(path: &Path, off: u64, v: u64) {
    put(path, off, &v.to_be_bytes());
}

/// Writes a big-endian u32.
pub fn put32(path: &Path, off: u64, v: u32) {
    put(path, off, &v.to_be_bytes());
}

/// Header facts of an image: (cluster size, L1 offset, refcount table offset).
pub fn layout(path: &Path) -> (u64, u64, u64) {
    (1 << get32(path, 20), get64(path, 40), get64(path, 48))
}

/// The file offset of the L2 table of L1 entry 0.
pub fn l2_offset(path: &Path) -> u64 {
    get64(path, layout(path).1) & 0x00ff_ffff_ffff_fe00
}

/// The file offset of refcount block 0.
pub fn refblock_offset(path: &Path) -> u64 {
    get64(path, layout(path).2)
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).expect("stat image").len()
}

/// Moves the refcount table to the end of the file, `clusters` clusters long, every entry
/// pointing at refcount block 0 (so "all entries equal").
pub fn reftable_all_equal(path: &Path, clusters: u32) {
    let (cs, _, _) = layout(path);
    let block = refblock_offset(path);
    let at = file_len(path).div_ceil(cs) * cs;
    let n = u64::from(clusters) * cs / 8;
    let table: Vec<u8> = (0..n).flat_map(|_| block.to_be_bytes()).collect();
    put(path, at, &table);
    put64(path, 48, at);
    put32(path, 56, clusters);
}

/// Makes the file 1 TiB long (sparse) and points L2 entry 100 of the first table at its
/// last cluster, which no refcount counts.
pub fn sparse_tib_unrefcounted_cluster(path: &Path) {
    let (cs, _, _) = layout(path);
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(1 << 40))
        .expect("grow image");
    put64(path, l2_offset(path) + 8 * 100, ((1 << 40) - cs) | COPIED);
}

/// Every crafted image, made in `dir`: (name, path).
pub fn all(dir: &Path) -> Vec<(&'static str, PathBuf)> {
    let mut out = Vec::new();
    // (name, `qemu-img create -o` options, patch)
    let mut add = |name: &'static str, opts: &str, patch: &dyn Fn(&Path)| {
        let p = base(&dir.join(format!("{name}.qcow2")), opts, "2G");
        patch(&p);
        out.push((name, p));
    };
    add("reftable-all-equal", "", &|p| reftable_all_equal(p, 128));
    add("dirty-reftable-all-equal", "", &|p| {
        reftable_all_equal(p, 128);
        put64(p, 72, DIRTY);
    });
    add("reftable-entry-on-l1", "", &|p| {
        let (_, l1, rt) = layout(p);
        put64(p, rt + 8, l1);
    });
    add("reftable-on-header", "", &|p| put64(p, 48, 0));
    add("reftable-on-l1", "", &|p| {
        let (_, l1, _) = layout(p);
        put64(p, 48, l1);
    });
    add("reftable-entry-past-eof", "", &|p| {
        let (_, _, rt) = layout(p);
        put64(p, rt + 8, 1 << 40);
    });
    add("l1-entry-past-eof", "", &|p| {
        let (_, l1, _) = layout(p);
        put64(p, l1 + 8, (1 << 40) | COPIED);
    });
    add("l1-entry-on-reftable", "", &|p| {
        let (_, l1, rt) = layout(p);
        put64(p, l1 + 8, rt | COPIED);
    });
    add("l2-copied-on-own-table", "", &|p| {
        put64(p, l2_offset(p), l2_offset(p) | COPIED)
    });
    add("l2-copied-on-l1", "", &|p| {
        let (_, l1, _) = layout(p);
        put64(p, l2_offset(p), l1 | COPIED);
    });
    add("l2-copied-on-refblock", "", &|p| {
        put64(p, l2_offset(p), refblock_offset(p) | COPIED)
    });
    add("huge-l1-size", "", &|p| put32(p, 36, u32::MAX));
    add("huge-reftable-clusters", "", &|p| put32(p, 56, u32::MAX));
    add("refcount-order-7", "", &|p| put32(p, 96, 7));
    add("cluster-bits-8", "", &|p| put32(p, 20, 8));
    add("cluster-bits-40", "", &|p| put32(p, 20, 40));
    add("header-length-huge", "", &|p| put32(p, 100, u32::MAX));
    add("header-length-short", "", &|p| put32(p, 100, 50));
    add("backing-name-huge", "", &|p| {
        put64(p, 8, 512);
        put32(p, 16, u32::MAX);
    });
    add("extension-length-huge", "", &|p| {
        put32(p, 112, 0x1234_5678);
        put32(p, 116, 0xffff_fff0);
    });
    add("dirty-corrupt-tables", "", &|p| {
        let (cs, _, rt) = layout(p);
        let l2 = l2_offset(p);
        // Every L2 entry points at the refcount table, the table at the L1 table's block.
        let entries: Vec<u8> = (0..cs / 8)
            .flat_map(|i| ((rt + (i % 4) * cs) | COPIED).to_be_bytes())
            .collect();
        put(p, l2, &entries);
        put64(p, rt + 8, refblock_offset(p));
        put64(p, rt + 16, 3 * cs + 7);
        put64(p, 72, DIRTY);
    });
    add("snapshots-garbage", "", &|p| {
        let (cs, _, _) = layout(p);
        let at = file_len(p).div_ceil(cs) * cs;
        let garbage: Vec<u8> = (0..cs).map(|i| (i * 37 % 251) as u8 | 0x80).collect();
        put(p, at, &garbage);
        put32(p, 60, 65536);
        put64(p, 64, at);
    });
    // A write through it would put the L1 table 1 TiB into the file. (4 KiB clusters: a
    // refcount structure covering 1 TiB then takes 512 MiB.)
    add("l1-table-past-eof", "cluster_size=4096", &|p| {
        put64(p, 40, 1 << 40)
    });
    add("reftable-past-eof", "cluster_size=4096", &|p| {
        put64(p, 48, 1 << 40)
    });
    // A sparse 1 TiB file with a data cluster near its end that no refcount counts: a
    // repair must not write refcount blocks for the empty terabyte.
    add(
        "sparse-tib-unrefcounted-cluster",
        "cluster_size=4096",
        &sparse_tib_unrefcounted_cluster,
    );
    add("snapshots-past-eof", "", &|p| {
        put32(p, 60, 1000);
        put64(p, 64, 1 << 40);
    });
    out
}
