//! Request accounting per node (what `query-blockstats` reports with `query-nodes`): each node
//! counts the requests made to it, a format node and its file child each their own, refusals
//! before I/O as invalid, and nothing twice.

mod common;

use common::{err, image, open, path_str, read, run, write};
use strata_backend::accounting::{IoKind, KindSnapshot};
use strata_backend::{Graph, Node};

fn kind(n: &Node, k: IoKind) -> KindSnapshot {
    n.io_stats().snapshot().kinds[k as usize]
}

#[test]
fn a_format_node_and_its_file_count_their_own_requests() {
    let img = image(1 << 20, 3);
    let g = Graph::new();
    let raw = open(
        &g,
        &format!(
            "driver=raw,node-name=d0,offset=65536,file.driver=file,file.node-name=f0,\
             file.filename={},discard=unmap",
            path_str(&img)
        ),
    );
    let file = g.find("f0").expect("file node");
    for i in 0..3u64 {
        write(&raw, i * 4096, &[7u8; 4096]).unwrap();
    }
    for _ in 0..2 {
        read(&raw, 0, 8192).unwrap();
    }
    run(raw.flush()).unwrap();
    run(raw.write_zeroes(65536, 4096, false)).unwrap();
    run(raw.discard(0, 4096)).unwrap();
    // Refused before any I/O: beyond the end.
    err(read(&raw, raw.size(), 512));
    err(run(raw.discard(raw.size(), 4096)));

    let w = kind(&raw, IoKind::Write);
    assert_eq!((w.ops, w.bytes, w.failed, w.invalid), (4, 4 * 4096, 0, 0));
    let r = kind(&raw, IoKind::Read);
    assert_eq!((r.ops, r.bytes, r.invalid), (2, 2 * 8192, 1));
    assert_eq!(kind(&raw, IoKind::Flush).ops, 1);
    let u = kind(&raw, IoKind::Unmap);
    assert_eq!((u.ops, u.bytes, u.invalid), (1, 4096, 1));
    let s = raw.io_stats().snapshot();
    assert_eq!(s.wr_highest_offset, 65536 + 4096);
    assert!(s.idle_time_ns.is_some());

    // The file child saw the same requests, shifted by the raw offset; nothing refused.
    let fw = kind(&file, IoKind::Write);
    assert_eq!((fw.ops, fw.bytes, fw.invalid), (4, 4 * 4096, 0));
    assert_eq!(kind(&file, IoKind::Read).ops, 2);
    assert_eq!(kind(&file, IoKind::Read).invalid, 0);
    assert_eq!(
        file.io_stats().snapshot().wr_highest_offset,
        65536 + 65536 + 4096
    );
    assert!(kind(&file, IoKind::Flush).ops >= 1);
    assert_eq!(file.stats().discards_ok.get(), 1);
    assert_eq!(file.stats().discard_bytes_ok.get(), 4096);
}

#[test]
fn writes_to_a_read_only_node_are_invalid_and_detected_zeroes_count_once() {
    let img = image(1 << 20, 4);
    let g = Graph::new();
    let ro = open(
        &g,
        &format!("driver=raw,read-only=on,file.filename={}", path_str(&img)),
    );
    err(write(&ro, 0, &[1u8; 512]));
    err(run(ro.write_zeroes(0, 512, false)));
    let w = kind(&ro, IoKind::Write);
    assert_eq!((w.ops, w.invalid, w.failed), (0, 2, 0));

    let img2 = image(1 << 20, 5);
    let rw = open(
        &g,
        &format!(
            "driver=raw,node-name=z,detect-zeroes=on,file.filename={}",
            path_str(&img2)
        ),
    );
    write(&rw, 0, &[0u8; 4096]).unwrap();
    assert_eq!(rw.stats().zeroes_detected.get(), 1);
    let w = kind(&rw, IoKind::Write);
    assert_eq!(
        (w.ops, w.bytes),
        (1, 4096),
        "a detected zero write is one write"
    );
}

#[test]
fn latency_histograms_count_every_request() {
    let g = Graph::new();
    let n = open(&g, "driver=null-co,size=16M,latency-ns=200000");
    let h = n
        .io_stats()
        .histogram(IoKind::Read)
        .expect("read histogram");
    h.set(Some(&[100_000, 1_000_000_000])).unwrap();
    for _ in 0..5 {
        read(&n, 0, 4096).unwrap();
    }
    let s = n.io_stats().snapshot();
    let hist = s.histograms[0].as_ref().expect("set");
    // Each read waits 200 µs on an io_uring timeout: all in the middle interval.
    assert_eq!(hist.bins, [0, 5, 0]);
    assert!(s.kinds[IoKind::Read as usize].total_time_ns >= 5 * 200_000);
}
