//! Requests outside a node and writes to read-only nodes fail with the errno a guest expects
//! (EIO, EROFS), without a panic and without touching the image.

mod common;

use std::sync::Arc;

use common::{err, image, open, path_str, pattern, read, run, write};
use strata_backend::{ChildRole, Graph, IoVec, Node};

/// Every kind of request past the end of `n` fails with EIO.
fn check_out_of_range(n: &Node) {
    let size = n.size();
    let what = format!("{} ({})", n.name(), n.driver_name());
    for (off, len) in [
        (size, 1u64),
        (size - 1, 2),
        (size + 4096, 512),
        (0, size + 1),
        (u64::MAX - 10, 20),
        (u64::MAX, 1),
        (size + 1, 0),
    ] {
        let mut buf = vec![0u8; len as usize];
        let e = err(run(n.read(off, &[IoVec::new(&mut buf)])));
        assert_eq!(e.errno(), libc::EIO, "{what}: read {len}@{off}: {e}");
        if !n.is_read_only() {
            let e = err(run(n.write(off, &[IoVec::new(&mut buf)])));
            assert_eq!(e.errno(), libc::EIO, "{what}: write {len}@{off}: {e}");
            let e = err(run(n.write_zeroes(off, len, true)));
            assert_eq!(
                e.errno(),
                libc::EIO,
                "{what}: write_zeroes {len}@{off}: {e}"
            );
            let e = err(run(n.discard(off, len)));
            assert_eq!(e.errno(), libc::EIO, "{what}: discard {len}@{off}: {e}");
        }
        let e = err(run(n.block_status(off, len)));
        assert_eq!(
            e.errno(),
            libc::EIO,
            "{what}: block_status {len}@{off}: {e}"
        );
    }
    // Huge lengths are refused by the range check before any allocation.
    let e = err(run(n.write_zeroes(0, u64::MAX, false)));
    assert!(
        matches!(e.errno(), libc::EIO | libc::EROFS),
        "{what}: write_zeroes of u64::MAX: {e}"
    );
    // The last byte and empty requests at the end are fine.
    read(n, size - 1, 1).unwrap();
    read(n, size, 0).unwrap();
}

#[test]
fn out_of_range_requests_fail_with_eio() {
    let size = 64 * 1024;
    let data = common::pattern(1, size);
    let img = common::image_with(&data);
    let p = path_str(&img);
    let g = Graph::new();
    for opts in [
        format!("driver=raw,file.filename={p}"),
        format!("driver=raw,cache.direct=on,discard=unmap,file.filename={p}"),
        format!("driver=raw,offset=4096,size=16K,file.filename={p}"),
        format!("driver=file,filename={p},cache.direct=on"),
        format!("file.filename={p}"),
        "driver=null-co,size=1M".to_string(),
    ] {
        let n = open(&g, &opts);
        check_out_of_range(&n);
        if let Some(file) = n.child(ChildRole::File) {
            check_out_of_range(file);
        }
    }
    assert_eq!(
        common::file_bytes(&img),
        data,
        "failed requests changed the image"
    );
}

#[test]
fn read_only_nodes_refuse_writes_with_erofs() {
    let size = 32 * 1024;
    let data = common::pattern(2, size);
    let img = common::image_with(&data);
    let p = path_str(&img);
    let g = Graph::new();
    let nodes: Vec<Arc<Node>> = [
        format!("driver=raw,read-only=on,file.filename={p}"),
        format!("driver=raw,read-only=on,discard=unmap,cache.direct=on,file.filename={p}"),
        format!("driver=file,read-only=on,filename={p},discard=unmap"),
        format!("read-only=on,file.filename={p}"),
        "driver=null-co,read-only=on,size=1M".to_string(),
    ]
    .iter()
    .map(|o| open(&g, o))
    .collect();
    for n in &nodes {
        assert!(n.is_read_only());
        let what = format!("{} ({})", n.name(), n.driver_name());
        for (off, len) in [(0u64, 512u64), (7, 100), (4096, 4096), (0, 0)] {
            let mut buf = vec![0x5Au8; len as usize];
            let e = err(run(n.write(off, &[IoVec::new(&mut buf)])));
            assert_eq!(e.errno(), libc::EROFS, "{what}: write {len}@{off}: {e}");
            let mut zeroes = vec![0u8; len as usize];
            let e = err(run(n.write(off, &[IoVec::new(&mut zeroes)])));
            assert_eq!(e.errno(), libc::EROFS, "{what}: zero write: {e}");
            let e = err(run(n.discard(off, len)));
            assert_eq!(e.errno(), libc::EROFS, "{what}: discard: {e}");
            let e = err(run(n.write_zeroes(off, len, true)));
            assert_eq!(e.errno(), libc::EROFS, "{what}: write_zeroes: {e}");
        }
        // Reads, flushes and status queries still work; out-of-range writes are still EROFS
        // or EIO (never a panic).
        assert_eq!(read(n, 0, 16).unwrap().len(), 16);
        run(n.flush()).unwrap();
        run(n.block_status(0, 512)).unwrap();
        let e = err(write(n, n.size() + 1, b"x"));
        assert!(matches!(e.errno(), libc::EROFS | libc::EIO), "{what}: {e}");
        if n.driver_name() != "null-co" {
            assert_eq!(read(n, 0, size).unwrap(), data, "{what}");
        }
    }
    drop(nodes);
    assert_eq!(
        common::file_bytes(&img),
        data,
        "a read-only node changed the image"
    );
}

#[test]
fn writable_nodes_do_write_in_range() {
    // The counterpart of the above: the same requests succeed on a writable node, so the
    // errors above come from the checks and not from broken I/O.
    let img = image(32 * 1024, 3);
    let g = Graph::new();
    let n = open(
        &g,
        &format!("driver=raw,discard=unmap,file.filename={}", path_str(&img)),
    );
    for (off, len) in [(0u64, 512usize), (7, 100), (4096, 4096), (32 * 1024 - 1, 1)] {
        write(&n, off, &vec![0x5A; len]).unwrap();
        assert_eq!(read(&n, off, len).unwrap(), vec![0x5A; len]);
        run(n.write_zeroes(off, len as u64, false)).unwrap();
        assert_eq!(read(&n, off, len).unwrap(), vec![0; len]);
        run(n.discard(off, len as u64)).unwrap();
    }
    run(n.flush()).unwrap();
}

#[test]
fn one_buffer_longer_than_4_gib_is_read_whole() {
    // The length of a one-buffer io_uring read is a u32: a longer buffer was truncated, and
    // the zero-length read that followed was taken for the end of the file (zeroes, status OK).
    const GIB4: u64 = 4 << 30;
    let file = tempfile::NamedTempFile::new().expect("temp file");
    file.as_file().set_len(GIB4 + 65536).expect("sparse file");
    let tail = pattern(44, 4096);
    std::os::unix::fs::FileExt::write_all_at(file.as_file(), &tail, GIB4).expect("write tail");
    let node = open(
        &Graph::new(),
        &format!("driver=raw,file.filename={}", file.path().display()),
    );
    let mut buf = vec![0u8; (GIB4 + 4096) as usize];
    run(node.read(0, &[IoVec::new(&mut buf)])).expect("read");
    assert_eq!(&buf[GIB4 as usize..], &tail[..], "the bytes past 4 GiB");
}
