//! Large offsets: 2 TiB sparse raw and qcow2 images, I/O at their last sectors and across the
//! 4 GiB and 2 TiB boundaries (where 32-bit sector or byte counts would wrap), with qemu-io
//! as the independent reader and writer.

mod qcow2_util;

use std::path::Path;

use qcow2_util::*;
use strata_backend::driver::{CreateRequest, CreateTarget};
use strata_backend::{registry, Graph, Options};

const TIB2: u64 = 2 << 40;
const GIB4: u64 = 4 << 30;
/// Past the 2 TiB boundary, so requests can cross it.
const SIZE: u64 = TIB2 + (64 << 20);

/// (offset, length) of the requests: across 4 GiB and 8 GiB, across 2 TiB and just past it,
/// the last sectors.
fn places() -> Vec<(u64, usize)> {
    // Not overlapping: each keeps its own pattern.
    vec![
        (GIB4 - 4096, 12288),
        (2 * GIB4 - 512, 1024),
        (TIB2 - 65536, 131072),
        (TIB2 + (1 << 20) - 512, 1024),
        (SIZE - 16384, 8192),
        (SIZE - 512, 512),
    ]
}

fn check(path: &Path, format: &str) {
    let opts = format!(
        "driver={format},file.filename={},cache.direct=on",
        path.display()
    );
    let node = open(&Graph::new(), &opts);
    assert_eq!(node.size(), SIZE);
    // strata writes, qemu-io reads what strata wrote.
    for (i, &(off, len)) in places().iter().enumerate() {
        let data = vec![0x40 + i as u8; len];
        write(&node, off, &data);
        assert_eq!(
            read(&node, off, len),
            data,
            "{format}: strata read at {off}"
        );
    }
    // Past the end is refused, not wrapped.
    assert!(block_on_read(&node, SIZE - 512, 1024).is_err());
    assert!(block_on_read(&node, u64::MAX - 511, 512).is_err());
    drop(node);
    let reads: Vec<String> = places()
        .iter()
        .enumerate()
        .map(|(i, &(off, len))| format!("read -P {} {off} {len}", 0x40 + i))
        .collect();
    qemu_io(path, format, &reads);
    // qemu-io writes, strata reads what qemu-io wrote.
    let writes: Vec<String> = places()
        .iter()
        .enumerate()
        .map(|(i, &(off, len))| format!("write -P {} {off} {len}", 0x60 + i))
        .collect();
    qemu_io(path, format, &writes);
    let node = open(&Graph::new(), &opts);
    for (i, &(off, len)) in places().iter().enumerate() {
        assert_eq!(
            read(&node, off, len),
            vec![0x60 + i as u8; len],
            "{format}: what qemu-io wrote at {off}"
        );
    }
}

fn block_on_read(
    node: &strata_backend::Node,
    off: u64,
    len: usize,
) -> strata_backend::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    strata_backend::block_on(node.read(off, &[strata_backend::IoVec::new(&mut buf)]))??;
    Ok(buf)
}

#[test]
fn raw_image_past_2_tib() {
    let dir = tempdir();
    let path = dir.path().join("big.raw");
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(SIZE))
        .expect("sparse 2 TiB file");
    check(&path, "raw");
}

#[test]
fn qcow2_image_past_2_tib() {
    let dir = tempdir();
    let path = dir.path().join("big.qcow2");
    let request = CreateRequest {
        target: CreateTarget::File(&path),
        size: SIZE,
        options: Options::new(),
    };
    registry::create("qcow2", request).expect("create qcow2");
    check(&path, "qcow2");
    assert_check_clean(&path, true);
}
