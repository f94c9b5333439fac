//! `strata img check [-r all]` against `qemu-img check [-r all]` on copies of one image with
//! the same corruption: both must find the same number of corruptions and leaks, repair to an
//! image that `qemu-img check` finds clean, and keep the same guest-visible data.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::img_tools::{create_small_qcow2, qemu_io, ImgTool};
use serde_json::Value;

const CLUSTER: usize = 4096;
/// L2 and L1 entries: the cluster offset bits and the COPIED flag.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COPIED: u64 = 1 << 63;

fn run(cmd: &str, args: &[&str]) -> Output {
    let program = if cmd == "strata" {
        env!("CARGO_BIN_EXE_strata")
    } else {
        cmd
    };
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {cmd}: {e}"))
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn set_be64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// Where things are in the image: the first refcount block, and the L2 entry of guest
/// cluster 0 with the data cluster it points at.
struct Layout {
    refblock: usize,
    l2_entry_at: usize,
    data_cluster: usize,
}

fn layout(b: &[u8]) -> Layout {
    let l1 = be64(b, 40) as usize;
    let reftable = be64(b, 48) as usize;
    let refblock = (be64(b, reftable) & OFFSET_MASK) as usize;
    let l2 = (be64(b, l1) & OFFSET_MASK) as usize;
    let data = (be64(b, l2) & OFFSET_MASK) as usize;
    assert!(l2 != 0 && data != 0, "guest cluster 0 must be allocated");
    Layout {
        refblock,
        l2_entry_at: l2,
        data_cluster: data / CLUSTER,
    }
}

/// Sets the 16-bit refcount of host cluster `cluster`.
fn set_refcount(b: &mut [u8], l: &Layout, cluster: usize, v: u16) {
    let at = l.refblock + 2 * cluster;
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// (corruptions, leaks) as `check --output json` reports them.
fn counts(cmd: &str, img: &Path) -> (u64, u64) {
    let args: Vec<&str> = if cmd == "strata" {
        vec!["img", "check", "--output", "json", p(img)]
    } else {
        vec!["check", "--output=json", p(img)]
    };
    let out = run(cmd, &args);
    let json: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{cmd} check json: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let n = |k: &str| json[k].as_u64().unwrap_or(0);
    (n("corruptions"), n("leaks"))
}

#[test]
fn check_and_repair_agree_with_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pristine = dir.path().join("pristine.qcow2");
    create_small_qcow2(ImgTool::QemuImg, &pristine);
    qemu_io(&pristine, &["write -P 7 0 64k", "write -P 8 1M 8k"]);
    let base = std::fs::read(&pristine).expect("read image");

    type Corrupt = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Corrupt)> = vec![
        (
            "a leaked cluster",
            Box::new(|b: &mut Vec<u8>| {
                // A cluster at the end of the file that nothing references, counted once.
                let l = layout(b);
                let cluster = b.len().div_ceil(CLUSTER);
                b.resize((cluster + 1) * CLUSTER, 0);
                set_refcount(b, &l, cluster, 1)
            }),
        ),
        (
            "a used cluster with refcount 0",
            Box::new(move |b: &mut Vec<u8>| {
                let l = layout(b);
                set_refcount(b, &l, l.data_cluster, 0)
            }),
        ),
        (
            "a used cluster with refcount 2 and COPIED",
            Box::new(move |b: &mut Vec<u8>| {
                let l = layout(b);
                set_refcount(b, &l, l.data_cluster, 2)
            }),
        ),
        (
            "an L2 entry without COPIED for a refcount-1 cluster",
            Box::new(move |b: &mut Vec<u8>| {
                let l = layout(b);
                let e = be64(b, l.l2_entry_at);
                set_be64(b, l.l2_entry_at, e & !COPIED);
            }),
        ),
    ];
    for (what, corrupt) in &cases {
        let mut bytes = base.clone();
        corrupt(&mut bytes);
        let q = dir.path().join("qemu.qcow2");
        let s = dir.path().join("strata.qcow2");
        std::fs::write(&q, &bytes).expect("write copy");
        std::fs::write(&s, &bytes).expect("write copy");
        let found_q = counts("qemu-img", &q);
        let found_s = counts("strata", &s);
        assert_eq!(
            found_s, found_q,
            "{what}: (corruptions, leaks) strata vs qemu-img"
        );
        assert_ne!(found_q, (0, 0), "{what}: the corruption must be found");
        let rq = run("qemu-img", &["check", "-r", "all", p(&q)]);
        let rs = run("strata", &["img", "check", "-r", "all", p(&s)]);
        assert_eq!(
            rs.status.code(),
            rq.status.code(),
            "{what}: exit after repair\nqemu-img: {}\nstrata: {}{}",
            String::from_utf8_lossy(&rq.stdout),
            String::from_utf8_lossy(&rs.stdout),
            String::from_utf8_lossy(&rs.stderr)
        );
        let after = run("qemu-img", &["check", p(&s)]);
        assert!(
            after.status.success(),
            "{what}: qemu-img check after strata's repair: {}",
            String::from_utf8_lossy(&after.stdout)
        );
        let same = run(
            "qemu-img",
            &["compare", "-f", "qcow2", "-F", "qcow2", p(&q), p(&s)],
        );
        assert!(
            same.status.success(),
            "{what}: the repaired images differ: {}",
            String::from_utf8_lossy(&same.stdout)
        );
    }
}
