//! A failed flush stays failed ("fsyncgate"): after fdatasync reports an error once, the
//! kernel forgets it and the next fdatasync succeeds, although the writes it was to make
//! durable are lost. A node must never report a later flush as successful.
//!
//! The failing storage is real: a loop device on a sparse file in a tmpfs too small for the
//! data, so the loop driver's writes fail when the page cache is flushed.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use strata_backend::driver::{CreateRequest, CreateTarget};
use strata_backend::{registry, Graph, Options};

/// A loop device whose writes fail once its backing tmpfs is full; torn down when dropped.
struct FailingDevice {
    dev: Option<LoopDevice>,
    mount: PathBuf,
    _dir: tempfile::TempDir,
}

impl FailingDevice {
    /// A `size`-byte device backed by a tmpfs of `room` bytes, starting with `content`.
    fn new(size: u64, room: u64, content: &[u8]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mount = dir.path().join("tmpfs");
        std::fs::create_dir(&mount).expect("mkdir");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={room}"))
            .arg("tmpfs")
            .arg(&mount)
            .output()
            .expect("run mount");
        assert!(out.status.success(), "mount tmpfs: {out:?}");
        let backing = mount.join("backing");
        std::fs::write(&backing, content).expect("write backing file");
        std::fs::File::options()
            .write(true)
            .open(&backing)
            .and_then(|f| f.set_len(size))
            .expect("size backing file");
        let dev = LoopDevice::attach(&backing, 512);
        FailingDevice {
            dev: Some(dev),
            mount,
            _dir: dir,
        }
    }

    fn path(&self) -> &str {
        self.dev.as_ref().map_or("", LoopDevice::path_str)
    }
}

impl Drop for FailingDevice {
    fn drop(&mut self) {
        drop(self.dev.take());
        let _ = Command::new("umount").arg(&self.mount).status();
    }
}

/// Writes `len` bytes at `at` in 1 MiB pieces (buffered: they fail only when flushed).
fn fill(node: &strata_backend::Node, at: u64, len: u64) {
    let chunk = pattern(9, 1 << 20);
    let mut off = at;
    while off < at + len {
        write(node, off, &chunk).expect("buffered write");
        off += chunk.len() as u64;
    }
}

fn assert_flush_stays_failed(node: &strata_backend::Node, what: &str) {
    let first = run(node.flush());
    assert!(first.is_err(), "{what}: the first flush should fail");
    assert!(node.flush_failed(), "{what}");
    for i in 1..4 {
        let e = err(run(node.flush()));
        assert_eq!(e.errno(), first.as_ref().unwrap_err().errno(), "{what}");
        assert!(e.to_string().contains("earlier flush"), "{what} #{i}: {e}");
    }
}

#[test]
fn a_failed_flush_of_a_raw_device_stays_failed() {
    require_loop!();
    let dev = FailingDevice::new(64 << 20, 2 << 20, &[]);
    let node = open(
        &Graph::new(),
        &format!(
            "driver=raw,file.driver=host_device,file.filename={},cache.direct=off",
            dev.path()
        ),
    );
    fill(&node, 0, 8 << 20);
    assert_flush_stays_failed(&node, "raw");
}

#[test]
fn a_failed_flush_of_a_qcow2_image_stays_failed() {
    require_loop!();
    // The image starts small (header, tables) and fits; the data written later does not.
    let dir = tempfile::tempdir().expect("tempdir");
    let img: PathBuf = dir.path().join("img.qcow2");
    let request = CreateRequest {
        target: CreateTarget::File(&img),
        size: 64 << 20,
        options: Options::new(),
    };
    registry::create("qcow2", request).expect("create qcow2");
    let dev = FailingDevice::new(128 << 20, 2 << 20, &file_bytes(Path::new(&img)));
    let node = open(
        &Graph::new(),
        &format!(
            "driver=qcow2,file.driver=host_device,file.filename={},cache.direct=off",
            dev.path()
        ),
    );
    fill(&node, 0, 8 << 20);
    assert_flush_stays_failed(&node, "qcow2");
}
