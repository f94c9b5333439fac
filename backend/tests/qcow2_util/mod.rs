//! Helpers for the qcow2 tests: running qemu-img / qemu-io, opening images through strata,
//! reading whole images, and a byte model of what was written.

// Each qcow2 test file uses a different subset of these helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use strata_backend::{block_on, Graph, IoVec, Node, Options};

#[path = "../common/mod.rs"]
pub mod common;
#[allow(unused_imports)]
pub use common::pattern;

/// A temporary directory for one test's images.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("strata-qcow2-")
        .tempdir()
        .expect("create temp dir")
}

/// Runs a command, panicking with its output if it fails; returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img ARGS`.
pub fn qemu_img(args: &[&str]) -> String {
    run_ok(Command::new("qemu-img").args(args))
}

/// `qemu-img create -f qcow2` of `img` with the creation options `opts` (none when empty)
/// and, when given, a backing file (its name as the image records it, and its format).
pub fn create_qcow2(img: &Path, opts: &str, backing: Option<(&str, &str)>, size: impl ToString) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    if let Some((file, format)) = backing {
        args.extend(["-b", file, "-F", format]);
    }
    let size = size.to_string();
    args.extend([s(img), &size]);
    qemu_img(&args);
}

/// `qemu-io -f FMT -c CMD ... FILE`.
pub fn qemu_io(file: &Path, fmt: &str, cmds: &[String]) {
    let mut c = Command::new("qemu-io");
    c.arg("-f").arg(fmt);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(file);
    let out = run_ok(&mut c);
    assert!(
        !out.contains("error") && !out.contains("failed"),
        "qemu-io reported a failure: {out}"
    );
}

/// The guest-visible bytes of an image, as `qemu-img convert -O raw` shows them.
pub fn qemu_raw(img: &Path) -> Vec<u8> {
    let out = img.with_extension("converted.raw");
    qemu_img(&[
        "convert",
        // Force-share: the writer may have just been killed, and its io_uring can hold the
        // file (and so its lock bytes) for a moment after the process is reaped.
        "-U",
        "-O",
        "raw",
        img.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    let bytes = std::fs::read(&out).expect("read converted image");
    std::fs::remove_file(&out).ok();
    bytes
}

/// `qemu-img check` of an image: (exit code, output).
pub fn qemu_check(img: &Path) -> (i32, String) {
    let out = Command::new("qemu-img")
        // -U: see qemu_raw.
        .args(["check", "-U", img.to_str().unwrap()])
        .output()
        .expect("run qemu-img check");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Asserts `qemu-img check` finds no corruption (and, if `no_leaks`, no leaks).
#[track_caller]
pub fn assert_check_clean(img: &Path, no_leaks: bool) {
    let (code, out) = qemu_check(img);
    let ok = code == 0 || (!no_leaks && code == 3);
    assert!(ok, "qemu-img check {} exited {code}:\n{out}", img.display());
}

/// A graph that follows backing file names as QEMU does, to compare with qemu-img on images
/// whose chains leave the top image's directory (the daemon's default policy refuses those).
pub fn qemu_like_graph() -> Graph {
    Graph::with_backing_policy(strata_backend::driver::BackingPolicy {
        trust_images: true,
        ..Default::default()
    })
}

/// Opens a node from keyval text.
pub fn open(g: &Graph, opts: &str) -> Arc<Node> {
    g.open(Options::parse(opts, None).expect("options"))
        .unwrap_or_else(|e| panic!("open '{opts}' failed: {e}"))
}

/// Opens an image read-only, probing its format.
pub fn open_ro(g: &Graph, path: &Path) -> Arc<Node> {
    open(g, &format!("file.filename={},read-only=on", path.display()))
}

/// Runs a block-layer future to completion on this thread.
pub fn run<T>(f: impl std::future::Future<Output = strata_backend::Result<T>>) -> T {
    block_on(f)
        .expect("reactor")
        .unwrap_or_else(|e| panic!("I/O failed: {e}"))
}

/// Reads `len` bytes at `off`.
pub fn read(node: &Node, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    run(node.read(off, &[IoVec::new(&mut buf)]));
    buf
}

/// Writes `data` at `off`.
pub fn write(node: &Node, off: u64, data: &[u8]) {
    let mut buf = data.to_vec();
    run(node.write(off, &[IoVec::new(&mut buf)]));
}

/// Reads the whole node in chunks of an odd size (so reads cross cluster boundaries).
pub fn read_all(node: &Node) -> Vec<u8> {
    let size = node.size();
    let mut out = Vec::with_capacity(size as usize);
    let chunk = 3 * 65536 + 4096 + 512;
    let mut off = 0;
    while off < size {
        let n = (size - off).min(chunk) as usize;
        out.extend_from_slice(&read(node, off, n));
        off += n as u64;
    }
    out
}

/// Asserts two byte strings are equal, naming the first difference.
#[track_caller]
pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i:#x}: got {:#04x}, want {:#04x}",
            got[i], want[i]
        );
    }
}

/// A path inside `dir`.
pub fn path(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// The path as &str.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}
