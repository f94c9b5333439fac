//! Hostile qcow2 images (issue 13, items 5 to 7): metadata overlap checks refuse guest
//! writes onto metadata and mark the image corrupt; a refcount table that overlaps itself
//! or other metadata is refused at a read-write open; the free-cluster scan is bounded;
//! and opening, writing and checking every crafted image ends with a clear error or
//! success, in bounded time and memory (a child process under `prlimit --as`).

mod crafted;
mod qcow2_util;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crafted::{get64, l2_offset, layout, put64, refblock_offset, COPIED};
use qcow2_util::*;
use strata_backend::driver::qcow2::{self, Repair};
use strata_backend::{block_on, BlockError, Graph, IoVec, Node, Options};

/// Address-space limit of the child that opens and checks crafted images.
const CHILD_AS_LIMIT: &str = "--as=536870912";
/// How long one crafted image may take.
const CHILD_TIMEOUT: Duration = Duration::from_secs(120);

fn try_open(g: &Graph, opts: &str) -> strata_backend::Result<Arc<Node>> {
    g.open(Options::parse(opts, None)?)
}

fn try_run<T>(
    f: impl std::future::Future<Output = strata_backend::Result<T>>,
) -> strata_backend::Result<T> {
    block_on(f).expect("reactor")
}

fn try_write(node: &Node, off: u64, data: &[u8]) -> strata_backend::Result<()> {
    let mut buf = data.to_vec();
    try_run(node.write(off, &[IoVec::new(&mut buf)]))
}

fn open_rw(g: &Graph, img: &Path, extra: &str) -> strata_backend::Result<Arc<Node>> {
    try_open(g, &format!("driver=qcow2,file.filename={}{extra}", s(img)))
}

#[track_caller]
fn expect_err<T>(r: strata_backend::Result<T>, what: &str) -> BlockError {
    match r {
        Ok(_) => panic!("{what}: expected an error, got success"),
        Err(e) => e,
    }
}

fn bytes(img: &Path, off: u64, len: usize) -> Vec<u8> {
    std::fs::read(img).expect("read image")[off as usize..off as usize + len].to_vec()
}

/// A guest write into a cluster whose L2 entry (with COPIED) points at the L1 table, the
/// refcount table, refcount block 0 or the L2 table itself fails with EIO naming the
/// structure; the image is marked corrupt and takes no further writes; no metadata byte
/// changed on disk (except the corrupt bit), as `qemu-img check` confirms once the crafted
/// entry is undone. (An L2 entry cannot point at the header: offset 0 means unallocated.)
#[test]
fn guest_write_onto_metadata_is_refused() {
    let dir = tempdir();
    for (name, structure) in [
        ("l1", "active L1 table"),
        ("reftable", "refcount table"),
        ("refblock", "refcount block"),
        ("l2", "active L2 table"),
    ] {
        let img = crafted::base(&path(&dir, &format!("{name}.qcow2")), "", "64M");
        let target = match name {
            "l1" => layout(&img).1,
            "reftable" => layout(&img).2,
            "refblock" => refblock_offset(&img),
            _ => l2_offset(&img),
        };
        let l2 = l2_offset(&img);
        let original = get64(&img, l2);
        put64(&img, l2, target | COPIED);
        let before = std::fs::read(&img).unwrap();

        let g = Graph::new();
        let node = open_rw(&g, &img, "").expect("open read-write");
        let e = expect_err(try_write(&node, 4096, &[0xee; 4096]), name);
        assert_eq!(e.errno(), libc::EIO, "{name}: {e}");
        assert!(
            e.message().contains(structure) && e.message().contains("corrupt"),
            "{name}: {e}"
        );
        // Marked corrupt: an ordinary allocating write elsewhere is refused too.
        let e = expect_err(try_write(&node, 8 << 20, &[1; 512]), name);
        assert!(e.message().contains("corrupt"), "{name}: {e}");
        drop(node);
        drop(g);

        let after = std::fs::read(&img).unwrap();
        assert_eq!(before.len(), after.len(), "{name}: the file changed size");
        // Only the corrupt bit (incompatible_features, byte 79 bit 1) changed.
        let changed: Vec<usize> = (0..before.len())
            .filter(|&i| before[i] != after[i])
            .collect();
        assert_eq!(changed, vec![79], "{name}: bytes changed on disk");
        assert_eq!(after[79], before[79] | 2, "{name}");
        let info = qemu_img(&["info", "--output=json", s(&img)]);
        assert!(info.contains("\"corrupt\": true"), "{name}: {info}");

        // Undo the crafted entry and the bit: the image is as qemu-io left it.
        put64(&img, l2, original);
        crafted::put(&img, 79, &[before[79]]);
        assert_check_clean(&img, true);
        assert_eq!(
            qemu_raw(&img)[..128 << 10],
            vec![0x5a; 128 << 10][..],
            "{name}"
        );
    }
}

/// A discard of a guest cluster whose L2 entry points at the L1 table would free (and
/// punch) the L1 table: the free is refused, the L1 table stays.
#[test]
fn discard_onto_metadata_is_refused() {
    let dir = tempdir();
    let img = crafted::base(&path(&dir, "d.qcow2"), "", "64M");
    let (_, l1, _) = layout(&img);
    put64(&img, l2_offset(&img), l1 | COPIED);
    let l1_before = bytes(&img, l1, 512);
    let g = Graph::new();
    let node = open_rw(&g, &img, ",discard=unmap").expect("open read-write");
    let discarded = try_run(node.discard(0, 64 << 10)).and_then(|()| try_run(node.flush()));
    let e = expect_err(discarded, "discard + flush");
    assert!(e.message().contains("active L1 table"), "{e}");
    drop(node);
    drop(g);
    assert_eq!(bytes(&img, l1, 512), l1_before, "the L1 table changed");
}

/// `overlap-check` is honoured: `none` lets the write through (onto a refcount block),
/// `constant` does not check refcount blocks but does check the L1 table, and
/// `overlap-check.refcount-block=off` turns one kind off.
#[test]
fn overlap_check_option_selects_the_kinds() {
    let dir = tempdir();
    for (opts, onto_l1, refused) in [
        (",overlap-check=none", false, false),
        (",overlap-check=constant", false, false),
        (",overlap-check=constant", true, true),
        (
            ",overlap-check.template=all,overlap-check.refcount-block=off",
            false,
            false,
        ),
        (",overlap-check=cached", false, true),
    ] {
        let img = crafted::base(&path(&dir, "o.qcow2"), "", "64M");
        let target = if onto_l1 {
            layout(&img).1
        } else {
            refblock_offset(&img)
        };
        put64(&img, l2_offset(&img), target | COPIED);
        let g = Graph::new();
        let node = open_rw(&g, &img, opts).expect("open read-write");
        let r = try_write(&node, 0, &pattern(1, 512));
        assert_eq!(r.is_err(), refused, "{opts} onto_l1={onto_l1}: {r:?}");
        drop(node);
        drop(g);
        std::fs::remove_file(&img).unwrap();
    }
    let g = Graph::new();
    let img = crafted::base(&path(&dir, "p.qcow2"), "", "64M");
    let e = expect_err(open_rw(&g, &img, ",overlap-check=sometimes"), "bad value");
    assert!(e.message().contains("overlap-check"), "{e}");
}

/// Refcount tables that point into themselves or other metadata are refused at a
/// read-write open, naming the entry (before, their allocations scanned ~1e13 entries or
/// overwrote metadata); read-only opens still work.
#[test]
fn bad_refcount_table_is_refused_at_open() {
    let dir = tempdir();
    for (name, want) in [
        ("reftable-all-equal", "refcount table entry 1"),
        ("reftable-entry-on-l1", "refcount table entry 1"),
        ("reftable-on-header", "refcount table"),
        ("reftable-on-l1", "refcount table"),
        ("reftable-entry-past-eof", "past the end of the file"),
        ("l1-entry-past-eof", "L1 entry 1"),
        ("l1-entry-on-reftable", "L1 entry 1"),
    ] {
        let img = path(&dir, &format!("{name}.qcow2"));
        crafted::base(&img, "", "2G");
        match name {
            "reftable-all-equal" => crafted::reftable_all_equal(&img, 128),
            _ => patch_by_name(&img, name),
        }
        let g = Graph::new();
        let e = expect_err(open_rw(&g, &img, ""), name);
        assert!(
            e.message().contains(want) && e.message().contains(s(&img)),
            "{name}: {e}"
        );
        let ro = open_rw(&g, &img, ",read-only=on").unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(read(&ro, 0, 4096), vec![0x5a; 4096], "{name}");
    }
}

fn patch_by_name(img: &Path, name: &str) {
    let (_, l1, rt) = layout(img);
    match name {
        "reftable-entry-on-l1" => put64(img, rt + 8, l1),
        "reftable-on-header" => put64(img, 48, 0),
        "reftable-on-l1" => put64(img, 48, l1),
        "reftable-entry-past-eof" => put64(img, rt + 8, 1 << 40),
        "l1-entry-past-eof" => put64(img, l1 + 8, (1 << 40) | COPIED),
        "l1-entry-on-reftable" => put64(img, l1 + 8, rt | COPIED),
        other => panic!("no patch {other}"),
    }
}

/// Refcount blocks claiming every cluster far past the end of the file: an allocating
/// write fails with an error naming the image instead of scanning on (and growing the
/// file to follow the claim).
#[test]
fn free_cluster_scan_is_bounded() {
    let dir = tempdir();
    let img = crafted::base(&path(&dir, "full.qcow2"), "cluster_size=512", "64M");
    let (cs, _, _) = layout(&img);
    // 4160 blocks of 256 16-bit refcounts, all 0xffff: 1 064 960 clusters claimed, more
    // than the scan's slack of 2^20 past the end of the file.
    let blocks = 4160u64;
    let table_clusters = (blocks * 8).div_ceil(cs);
    let start = std::fs::metadata(&img).unwrap().len().div_ceil(cs) * cs;
    let table_at = start;
    let blocks_at = start + table_clusters * cs;
    let table: Vec<u8> = (0..table_clusters * cs / 8)
        .flat_map(|i| {
            let v = if i < blocks { blocks_at + i * cs } else { 0 };
            v.to_be_bytes()
        })
        .collect();
    crafted::put(&img, table_at, &table);
    crafted::put(&img, blocks_at, &vec![0xff; (blocks * cs) as usize]);
    put64(&img, 48, table_at);
    crafted::put32(&img, 56, table_clusters as u32);
    let size_before = std::fs::metadata(&img).unwrap().len();

    let g = Graph::new();
    let node = open_rw(&g, &img, "").expect("open read-write");
    let t = Instant::now();
    let e = expect_err(try_write(&node, 32 << 20, &[7; 512]), "allocating write");
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "took {:?}",
        t.elapsed()
    );
    assert!(
        e.message().contains("no free cluster") && e.message().contains(s(&img)),
        "{e}"
    );
    drop(node);
    drop(g);
    assert_eq!(std::fs::metadata(&img).unwrap().len(), size_before);
}

/// What one crafted image does in the child: check it, open it read-only and read, open it
/// read-write and write. Each outcome is printed as a `RESULT` line.
fn exercise(img: &Path) {
    let show = |what: &str, r: Result<String, BlockError>| match r {
        Ok(v) => println!("RESULT {what}: ok {v}"),
        Err(e) => println!("RESULT {what}: error {e}"),
    };
    let g = Graph::new();
    let checked =
        try_open(&g, &format!("driver=file,read-only=on,filename={}", s(img))).and_then(|file| {
            let r = try_run(qcow2::check(&file, Repair::None))?;
            Ok(format!(
                "corruptions={} leaks={} messages={} first={:?}",
                r.corruptions,
                r.leaks,
                r.messages.len(),
                r.messages.first()
            ))
        });
    show("check", checked);
    let ro = open_rw(&g, img, ",read-only=on").and_then(|n| {
        let mut buf = vec![0u8; 65536];
        try_run(n.read(0, &[IoVec::new(&mut buf)]))?;
        Ok(String::new())
    });
    show("ro-open-read", ro);
    let rw = open_rw(&g, img, "").and_then(|n| {
        try_write(&n, 4096, &[0xee; 4096])?;
        try_write(&n, 40 << 20, &[0xee; 4096])?;
        try_run(n.flush())?;
        Ok(String::new())
    });
    show("rw-open-write", rw);
}

/// The child's entry point (run by `crafted_images_fail_cleanly` under `prlimit`).
#[test]
#[ignore = "run by crafted_images_fail_cleanly in a child process"]
fn crafted_child() {
    let img = std::env::var("STRATA_CRAFTED").expect("STRATA_CRAFTED names the image");
    exercise(Path::new(&img));
    println!("DONE");
}

/// Every crafted image: checking, opening read-only and read-write, and writing end with
/// success or a clear error; no panic, no abort, within 512 MiB of address space and a
/// time limit.
#[test]
fn crafted_images_fail_cleanly() {
    let dir = tempdir();
    let exe = std::env::current_exe().expect("test binary");
    let mut failures = Vec::new();
    for (name, img) in crafted::all(dir.path()) {
        let mut child = Command::new("prlimit")
            .arg(CHILD_AS_LIMIT)
            .arg("--")
            .arg(&exe)
            .args(["--ignored", "--exact", "crafted_child", "--nocapture"])
            .args(["--test-threads=1"])
            .env("STRATA_CRAFTED", &img)
            // Few malloc arenas: the limit then measures memory used, not reserved.
            .env("MALLOC_ARENA_MAX", "2")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn child");
        let t = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().expect("wait") {
                break Some(st);
            }
            if t.elapsed() > CHILD_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = child.wait_with_output().expect("child output");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        // The first line follows the harness's "test crafted_child ... ".
        let results: Vec<&str> = stdout
            .lines()
            .filter_map(|l| l.find("RESULT ").map(|i| &l[i..]))
            .collect();
        println!("{name}:\n  {}", results.join("\n  "));
        let ok =
            status.is_some_and(|s| s.success()) && stdout.contains("DONE") && results.len() == 3;
        if !ok {
            failures.push(format!(
                "{name}: status {status:?}\n{stdout}\n{}",
                stderr.lines().rev().take(15).collect::<Vec<_>>().join("\n")
            ));
            continue;
        }
        // Errors are clear: they say what is wrong, not just a code.
        for r in &results {
            if let Some(msg) = r.split_once(": error ").map(|x| x.1) {
                if msg.len() < 20 {
                    failures.push(format!("{name}: unclear error '{r}'"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
