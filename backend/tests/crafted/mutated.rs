//! Randomly mutated qcow2 images: a valid image with data, compressed and zero clusters (of
//! one of four kinds: small clusters, a snapshot, extended L2 entries, 1-bit refcounts and
//! zstd), whose metadata (header and extensions, L1 and L2 tables, refcount table and
//! blocks, snapshot table) gets a few random bytes, bit flips or pointer-like values.
//! Case `n` is always the same image, so a failure is reproduced by its number.

use std::path::{Path, PathBuf};
use std::process::Command;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::{get32, get64, put, put32, put64, run, COPIED};

/// Offset bits of an L1 or L2 entry.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// An L2 entry's flag: the cluster is compressed.
const COMPRESSED: u64 = 1 << 62;
/// Bytes of a snapshot table entry before its variable parts.
const SNAPSHOT_FIXED: u64 = 40;
/// Entries of the snapshot table looked at (a base image has at most one snapshot).
const MAX_SNAPSHOTS: u64 = 4;

/// The images cases start from: (name, `qemu-img create -o` options, take a snapshot).
/// strata writes no image that has internal snapshots, so only the others reach the write
/// paths.
pub const BASES: [(&str, &str, bool); 4] = [
    ("4k", "cluster_size=4096", false),
    ("4k-snapshot", "cluster_size=4096", true),
    ("extended-l2", "cluster_size=65536,extended_l2=on", false),
    (
        "1-bit-refcounts-zstd",
        "cluster_size=4096,refcount_bits=1,compression_type=zstd",
        false,
    ),
];

/// Base image `i` of [`BASES`], made in `dir`: 64 MiB, data at 0, 1 MiB and 63 MiB, a
/// compressed range at 33 MiB, zero clusters at 40 MiB; with a snapshot, then a snapshot and
/// a rewrite of the first 8 KiB (clusters shared and not).
pub fn base_image(dir: &Path, i: usize) -> PathBuf {
    let (name, opts, snapshot) = BASES[i];
    let p = dir.join(format!("mutation-base-{name}.qcow2"));
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", opts])
        .arg(&p)
        .arg("64M"));
    let io = |cmd: &str| {
        run(Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", cmd])
            .arg(&p))
    };
    io("write -P 0x5a 0 128k");
    io("write -P 0x11 1M 64k");
    io("write -c -P 0x22 33M 64k");
    io("write -z 40M 64k");
    io("write -P 0x44 63M 64k");
    if snapshot {
        run(Command::new("qemu-img")
            .args(["snapshot", "-c", "s1"])
            .arg(&p));
        io("write -P 0x33 0 8k");
    }
    p
}

/// File byte ranges (start, end) holding metadata; the first is the header cluster.
fn metadata_ranges(img: &Path) -> Vec<(u64, u64)> {
    let cs = 1u64 << get32(img, 20);
    let len = std::fs::metadata(img).expect("stat image").len();
    let mut out = vec![(0, cs)];
    let table = |off: u64, bytes: u64, out: &mut Vec<(u64, u64)>| {
        if off > 0 && off < len {
            out.push((off, (off + bytes).min(len)));
        }
    };
    let (l1, l1_size) = (get64(img, 40), u64::from(get32(img, 36)));
    table(l1, l1_size * 8, &mut out);
    for i in 0..l1_size {
        table(get64(img, l1 + i * 8) & OFFSET_MASK, cs, &mut out);
    }
    let (rt, rt_clusters) = (get64(img, 48), u64::from(get32(img, 56)));
    table(rt, rt_clusters * cs, &mut out);
    for i in 0..rt_clusters * cs / 8 {
        table(get64(img, rt + i * 8), cs, &mut out);
    }
    let (count, mut at) = (u64::from(get32(img, 60)), get64(img, 64));
    table(at, cs, &mut out);
    for _ in 0..count.min(MAX_SNAPSHOTS) {
        if at == 0 || at + SNAPSHOT_FIXED > len {
            break;
        }
        let (snap_l1, snap_l1_size) = (get64(img, at), u64::from(get32(img, at + 8)));
        table(snap_l1, snap_l1_size * 8, &mut out);
        let extra = u64::from(get32(img, at + 36));
        let (id, name) = (
            get64(img, at + 12) >> 48,
            (get64(img, at + 12) >> 32) & 0xffff,
        );
        at += (SNAPSHOT_FIXED + extra + id + name).div_ceil(8) * 8;
    }
    out.retain(|(s, e)| e > s);
    out
}

/// A value that looks like what a hostile image would put in a table entry or header field.
fn pointer_like(rng: &mut SmallRng, cs: u64, len: u64, ranges: &[(u64, u64)]) -> u64 {
    let aligned = |v: u64| v / cs * cs;
    match rng.gen_range(0..9) {
        0 => 0,
        1 => u64::MAX,
        2 => rng.gen(),
        // At some metadata, with or without the flags of an entry.
        3 => {
            let (s, _) = ranges[rng.gen_range(0..ranges.len())];
            s | [0, COPIED, COMPRESSED][rng.gen_range(0..3)]
        }
        4 => aligned(rng.gen_range(0..len.max(1))) | COPIED,
        5 => aligned(len) + cs * rng.gen_range(0..4),
        6 => 1 << rng.gen_range(30..62),
        7 => COMPRESSED | rng.gen_range(0..len.max(1) * 2),
        _ => OFFSET_MASK,
    }
}

/// Makes case `n`: a copy of `base` at `dest` with 1 to 4 mutations in its metadata. Returns
/// what was changed, for the failure message.
pub fn mutate(base: &Path, dest: &Path, n: u64) -> String {
    std::fs::copy(base, dest).expect("copy base image");
    let mut rng = SmallRng::seed_from_u64(n);
    let ranges = metadata_ranges(dest);
    let cs = 1u64 << get32(dest, 20);
    let len = std::fs::metadata(dest).expect("stat image").len();
    let mut done = Vec::new();
    for _ in 0..rng.gen_range(1..=4) {
        // The header's first 112 bytes (its fields) a third of the time.
        let (s, e) = if rng.gen_bool(0.33) {
            (0, 112)
        } else {
            ranges[rng.gen_range(0..ranges.len())]
        };
        let at = rng.gen_range(s..e);
        match rng.gen_range(0..4) {
            0 => {
                let b: u8 = rng.gen();
                put(dest, at, &[b]);
                done.push(format!("byte {at:#x} = {b:#04x}"));
            }
            1 => {
                let old = get64(dest, at) >> 56;
                let b = (old as u8) ^ (1 << rng.gen_range(0..8));
                put(dest, at, &[b]);
                done.push(format!("bit flip at {at:#x}: {old:#04x} -> {b:#04x}"));
            }
            2 => {
                let at = (at / 4 * 4).min(e.saturating_sub(4));
                let v = [0, 1, u32::MAX, 1 << rng.gen_range(0..32), rng.gen()][rng.gen_range(0..5)];
                put32(dest, at, v);
                done.push(format!("u32 {at:#x} = {v:#x}"));
            }
            _ => {
                let at = (at / 8 * 8).min(e.saturating_sub(8));
                let v = pointer_like(&mut rng, cs, len, &ranges);
                put64(dest, at, v);
                done.push(format!("u64 {at:#x} = {v:#x}"));
            }
        }
    }
    done.join("; ")
}
