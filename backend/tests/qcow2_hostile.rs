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

/// An L1 or refcount table that starts past the end of the file is refused at a read-write
/// open: a write through it would make the file as long as its offset (here 1 TiB). The
/// image stays readable read-only, and the file keeps its length.
#[test]
fn a_table_past_the_end_of_the_file_is_refused_read_write() {
    let dir = tempdir();
    for (field, at, name) in [(40, "L1 table", "l1"), (48, "refcount table", "reftable")] {
        let img = crafted::base(&path(&dir, name), "cluster_size=4096", "64M");
        put64(&img, field, 1 << 40);
        let len = std::fs::metadata(&img).unwrap().len();
        let g = Graph::new();
        let e = expect_err(open_rw(&g, &img, ""), name);
        assert!(
            e.message().contains(&format!("the {at}"))
                && e.message()
                    .contains("0x10000000000 lies past the end of the file"),
            "{e}"
        );
        let ro = open_rw(&g, &img, ",read-only=on").expect("read-only open");
        let mut buf = vec![0u8; 4096];
        try_run(ro.read(0, &[IoVec::new(&mut buf)])).expect("read-only read");
        drop(ro);
        assert_eq!(std::fs::metadata(&img).unwrap().len(), len, "{name}");
    }
}

/// A repair of a sparse 1 TiB image whose one far cluster lacks a refcount writes refcount
/// blocks only where clusters are in use: the table (1 MiB, one entry per 8 MiB of file) and
/// a few blocks, not the 512 MiB of blocks that cover the whole terabyte with 4 KiB
/// clusters. QEMU then finds the image clean.
#[test]
fn a_repair_writes_no_refcount_blocks_for_a_sparse_files_holes() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempdir();
    let img = crafted::base(&path(&dir, "sparse"), "cluster_size=4096", "64M");
    crafted::sparse_tib_unrefcounted_cluster(&img);
    let allocated = |p: &Path| std::fs::metadata(p).unwrap().blocks() * 512;
    let before = allocated(&img);
    let g = Graph::new();
    let file = try_open(&g, &format!("driver=file,filename={}", s(&img))).expect("open file");
    let r = try_run(qcow2::check(&file, Repair::All)).expect("repair");
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
    drop(file);
    let written = allocated(&img) - before;
    assert!(written < 2 << 20, "the repair allocated {written} bytes");
    assert_check_clean(&img, true);
}

/// RESULT lines `exercise` prints.
const EXERCISE_STEPS: usize = 5;

/// What one crafted image does in the child: check it; open it read-only and read at its
/// start, middle and end; open it read-write and write, zero, discard, map and flush; repair
/// it. Each outcome is printed as a `RESULT` line.
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
        let size = n.size();
        for off in [0, size / 2, size.saturating_sub(65536)] {
            try_run(n.read(off / 512 * 512, &[IoVec::new(&mut buf)]))?;
        }
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
    let other = open_rw(&g, img, ",discard=unmap").and_then(|n| {
        try_run(n.write_zeroes(0, 65536, true))?;
        try_run(n.discard(1 << 20, 65536))?;
        let status = try_run(n.block_status(0, n.size()))?;
        try_run(n.flush())?;
        Ok(format!("{status:?}"))
    });
    show("rw-open-zero-discard-map", other);
    let repaired = try_open(&g, &format!("driver=file,filename={}", s(img))).and_then(|file| {
        let r = try_run(qcow2::check(&file, Repair::All))?;
        Ok(format!("corruptions={} leaks={}", r.corruptions, r.leaks))
    });
    show("repair", repaired);
}

/// The child's entry point (run by `crafted_images_fail_cleanly` under `prlimit`).
#[test]
#[ignore = "run by crafted_images_fail_cleanly in a child process"]
fn crafted_child() {
    let img = std::env::var("STRATA_CRAFTED").expect("STRATA_CRAFTED names the image");
    exercise(Path::new(&img));
    println!("DONE");
}

/// What became of one image in the child: its RESULT lines, or why the child failed.
fn run_child(img: &Path) -> Result<Vec<String>, String> {
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new("prlimit")
        .arg(CHILD_AS_LIMIT)
        .arg("--")
        .arg(&exe)
        .args(["--ignored", "--exact", "crafted_child", "--nocapture"])
        .args(["--test-threads=1"])
        .env("STRATA_CRAFTED", img)
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
        std::thread::sleep(Duration::from_millis(5));
    };
    let out = child.wait_with_output().expect("child output");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    // The first line follows the harness's "test crafted_child ... ".
    let results: Vec<String> = stdout
        .lines()
        .filter_map(|l| l.find("RESULT ").map(|i| l[i..].to_string()))
        .collect();
    let ok = status.is_some_and(|s| s.success())
        && stdout.contains("DONE")
        && results.len() == EXERCISE_STEPS;
    if !ok {
        return Err(format!(
            "status {status:?} (None: killed after {CHILD_TIMEOUT:?})\n{stdout}\n{}",
            stderr.lines().rev().take(15).collect::<Vec<_>>().join("\n")
        ));
    }
    // Errors are clear: they say what is wrong, not just a code.
    for r in &results {
        if let Some(msg) = r.split_once(": error ").map(|x| x.1) {
            if msg.len() < 20 {
                return Err(format!("unclear error '{r}'"));
            }
        }
    }
    Ok(results)
}

/// Every crafted image: checking, opening read-only and read-write, writing, zeroing,
/// discarding and repairing end with success or a clear error; no panic, no abort, within
/// 512 MiB of address space and a time limit.
#[test]
fn crafted_images_fail_cleanly() {
    let dir = tempdir();
    let mut failures = Vec::new();
    for (name, img) in crafted::all(dir.path()) {
        match run_child(&img) {
            Ok(results) => println!("{name}:\n  {}", results.join("\n  ")),
            Err(why) => failures.push(format!("{name}: {why}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Randomly mutated images (crafted::mutated) do the same as the crafted ones. The test
/// command runs cases 0 to 39; `STRATA_MUTATED_CASES=N STRATA_MUTATED_FIRST=K` runs N cases
/// from K (scripts/fuzz.sh runs thousands), and a failure names its case.
#[test]
fn mutated_images_fail_cleanly() {
    let env = |name: &str, default: u64| {
        std::env::var(name).map_or(default, |v| v.parse().expect("a number"))
    };
    let (first, cases) = (
        env("STRATA_MUTATED_FIRST", 0),
        env("STRATA_MUTATED_CASES", 40),
    );
    let dir = tempdir();
    // Case n starts from base n % 4.
    let bases: Vec<_> = (0..crafted::mutated::BASES.len())
        .map(|i| crafted::mutated::base_image(dir.path(), i))
        .collect();
    let img = dir.path().join("case.qcow2");
    let mut failures = Vec::new();
    // How far the cases got: how many opened read-only, wrote, were found corrupt.
    let (mut read, mut wrote, mut corrupt) = (0, 0, 0);
    for n in first..first + cases {
        let what = crafted::mutated::mutate(&bases[n as usize % bases.len()], &img, n);
        match run_child(&img) {
            Ok(results) => {
                let ok = |step: &str| {
                    results
                        .iter()
                        .any(|r| r.starts_with(&format!("RESULT {step}: ok")))
                };
                read += usize::from(ok("ro-open-read"));
                wrote += usize::from(ok("rw-open-write"));
                corrupt += usize::from(
                    results[0].contains("corruptions=") && !results[0].contains("corruptions=0 "),
                );
            }
            Err(why) => {
                let base = crafted::mutated::BASES[n as usize % bases.len()].0;
                failures.push(format!("case {n} (base {base}; {what}): {why}"))
            }
        }
    }
    println!(
        "{cases} mutated images: {read} opened read-only and read, {wrote} opened read-write \
         and written, {corrupt} found corrupt by check"
    );
    assert!(
        failures.is_empty(),
        "{} of {cases} mutated images failed; rerun one with STRATA_MUTATED_CASES=1 \
         STRATA_MUTATED_FIRST=<case>:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}
