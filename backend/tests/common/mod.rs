//! Helpers shared by the integration tests: images, aligned buffers, blocking I/O wrappers,
//! file-descriptor inspection and a loop-device guard.

// Each test file uses a different subset of these helpers.
#![allow(dead_code)]

use std::future::Future;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use strata_backend::{block_on, BlockError, Graph, IoVec, Node, Options};
use tempfile::TempPath;

/// Runs a block-layer future to completion on this thread.
pub fn run<T>(f: impl Future<Output = strata_backend::Result<T>>) -> strata_backend::Result<T> {
    block_on(f).expect("block_on: could not set up the reactor")
}

/// Opens a node from keyval text, panicking with the error message on failure.
pub fn open(g: &Graph, opts: &str) -> Arc<Node> {
    try_open(g, opts).unwrap_or_else(|e| panic!("open '{opts}' failed: {e}"))
}

/// Opens a raw node over the file or device at `path`, with the keyval options `opts` (none
/// when empty) besides the driver and the file name.
pub fn open_raw(g: &Graph, opts: &str, path: impl AsRef<Path>) -> Arc<Node> {
    let path = path.as_ref().to_str().expect("test paths are UTF-8");
    let opts = if opts.is_empty() {
        String::new()
    } else {
        format!("{opts},")
    };
    open(g, &format!("driver=raw,{opts}file.filename={path}"))
}

/// Opens a node from keyval text.
pub fn try_open(g: &Graph, opts: &str) -> strata_backend::Result<Arc<Node>> {
    g.open(Options::parse(opts, None)?)
}

/// The error of a result that must have failed.
pub fn err<T: std::fmt::Debug>(r: strata_backend::Result<T>) -> BlockError {
    match r {
        Ok(v) => panic!("expected an error, got Ok({v:?})"),
        Err(e) => e,
    }
}

/// Reads `len` bytes at `off` through the node into a fresh (unaligned) Vec.
pub fn read(node: &Node, off: u64, len: usize) -> strata_backend::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    run(node.read(off, &[IoVec::new(&mut buf)]))?;
    Ok(buf)
}

/// Writes `data` at `off` through the node.
pub fn write(node: &Node, off: u64, data: &[u8]) -> strata_backend::Result<()> {
    let mut buf = data.to_vec();
    run(node.write(off, &[IoVec::new(&mut buf)]))
}

/// Deterministic pseudo-random bytes (xorshift), different for each seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A temporary file holding `content`, removed when dropped. Only its path is kept, so the
/// only descriptors of the file are the block layer's.
pub fn image_with(content: &[u8]) -> TempPath {
    let mut f = tempfile::Builder::new()
        .prefix("strata-test-")
        .suffix(".img")
        .tempfile()
        .expect("create temp image");
    f.write_all(content).expect("fill temp image");
    f.as_file().sync_all().expect("sync temp image");
    f.into_temp_path()
}

/// A temporary image of `len` bytes of `pattern(seed)`.
pub fn image(len: usize, seed: u64) -> TempPath {
    image_with(&pattern(seed, len))
}

/// The path of a temp file as a &str for option strings.
pub fn path_str(f: &TempPath) -> &str {
    f.to_str().expect("temp paths are UTF-8")
}

/// Reads the whole file through the page cache (std::fs), independent of the block layer.
pub fn file_bytes(path: impl AsRef<Path>) -> Vec<u8> {
    std::fs::read(path).expect("read file with std::fs")
}

/// Allocated 512-byte blocks of a file.
pub fn st_blocks(path: impl AsRef<Path>) -> u64 {
    std::fs::metadata(path).expect("stat").blocks()
}

/// A buffer that starts `misalign` bytes after a 4096-byte boundary.
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// `len` zero bytes starting at a page boundary plus `misalign`.
    pub fn new(len: usize, misalign: usize) -> Self {
        let storage = vec![0u8; len + 4096 + misalign];
        let addr = storage.as_ptr() as usize;
        let start = (4096 - addr % 4096) % 4096 + misalign;
        Self {
            storage,
            start,
            len,
        }
    }

    /// A buffer holding `data`, at the given misalignment.
    pub fn from_slice(data: &[u8], misalign: usize) -> Self {
        let mut b = Self::new(data.len(), misalign);
        b.as_mut_slice().copy_from_slice(data);
        b
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }

    pub fn iovec(&mut self) -> IoVec<'_> {
        IoVec::new(self.as_mut_slice())
    }
}

/// The open-file flags (from /proc/self/fdinfo) of every descriptor of this process that
/// refers to `path`.
pub fn open_flags_of(path: impl AsRef<Path>) -> Vec<i32> {
    let want = std::fs::canonicalize(path).expect("canonicalize");
    let mut flags = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").expect("read /proc/self/fd") {
        let entry = entry.expect("fd entry");
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if target != want {
            continue;
        }
        let fd = entry.file_name();
        let Ok(info) =
            std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.to_string_lossy()))
        else {
            continue;
        };
        for line in info.lines() {
            if let Some(octal) = line.strip_prefix("flags:") {
                flags.push(i32::from_str_radix(octal.trim(), 8).expect("octal flags"));
            }
        }
    }
    flags
}

/// Why loop-device tests cannot run here, if they cannot.
pub fn loop_unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root".into());
    }
    match Command::new("losetup").arg("--version").output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => return Some(format!("losetup --version failed: {o:?}")),
        Err(e) => return Some(format!("losetup is missing: {e}")),
    }
    if !Path::new("/dev/loop-control").exists() {
        return Some("/dev/loop-control is missing".into());
    }
    None
}

/// Skips the calling test (returns from it) with a printed reason when loop devices are not
/// usable; under CI (`CI=true`, as root, with losetup) a test that cannot run fails instead.
#[macro_export]
macro_rules! require_loop {
    () => {
        if let Some(reason) = common::loop_unavailable() {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("cannot run under CI: {reason}");
            }
            eprintln!("SKIPPED: {reason}");
            return;
        }
    };
}

/// A loop device attached to a file; detached when dropped (also when a test panics).
pub struct LoopDevice {
    path: PathBuf,
}

impl LoopDevice {
    /// Attaches `file` with the given logical sector size.
    pub fn attach(file: impl AsRef<Path>, sector_size: u32) -> Self {
        let file = file.as_ref();
        let mut last = String::new();
        // Parallel tests may race for the same free device; losetup then fails and we retry.
        for _ in 0..10 {
            let out = Command::new("losetup")
                .arg("--sector-size")
                .arg(sector_size.to_string())
                .args(["-f", "--show"])
                .arg(file)
                .output()
                .expect("run losetup");
            if out.status.success() {
                let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
                // The guard exists before anything can panic, so the device is detached.
                let dev = Self {
                    path: PathBuf::from(&path),
                };
                assert!(
                    path.starts_with("/dev/loop"),
                    "unexpected losetup output {path:?}"
                );
                return dev;
            }
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("losetup -f --show {} failed: {last}", file.display());
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn path_str(&self) -> &str {
        self.path.to_str().expect("loop device paths are UTF-8")
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let out = Command::new("losetup").arg("-d").arg(&self.path).output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "losetup -d {} failed: {}",
                self.path.display(),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("losetup -d {} failed: {e}", self.path.display()),
        }
    }
}

/// Asserts two byte strings are equal, reporting the first difference instead of both dumps.
#[track_caller]
pub fn assert_bytes_eq(got: &[u8], want: &[u8], what: &str) {
    if got == want {
        return;
    }
    match got.iter().zip(want).position(|(a, b)| a != b) {
        Some(i) => panic!(
            "{what}: first difference at byte {i}: got {:#04x}, want {:#04x} (lengths {} and {})",
            got[i],
            want[i],
            got.len(),
            want.len()
        ),
        None => panic!(
            "{what}: lengths differ: got {}, want {}",
            got.len(),
            want.len()
        ),
    }
}
