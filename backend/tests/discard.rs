//! discard and write_zeroes on files (with and without O_DIRECT) and on null-co.

mod common;

use common::{
    assert_bytes_eq, file_bytes, image_with, open, open_raw, read, run, st_blocks, write,
};
use strata_backend::{ChildRole, Graph, IoVec};

const MIB: usize = 1 << 20;

/// A 4 MiB image full of data, written and synced so all of it is allocated.
fn full_image(seed: u64) -> (tempfile::TempPath, Vec<u8>) {
    let data = common::pattern(seed, 4 * MIB);
    let img = image_with(&data);
    (img, data)
}

#[test]
fn discard_unmap_punches_holes() {
    for direct in ["off", "on"] {
        let (img, mut expected) = full_image(1);
        let g = Graph::new();
        let n = open_raw(&g, &format!("discard=unmap,cache.direct={direct}"), &img);
        assert!(n.discard_enabled());
        let blocks_before = st_blocks(&img);
        assert!(
            blocks_before >= (4 * MIB / 512) as u64,
            "image not allocated"
        );

        run(n.discard(MIB as u64, 2 * MIB as u64)).unwrap();
        run(n.flush()).unwrap();
        expected[MIB..3 * MIB].fill(0);
        assert_bytes_eq(&read(&n, 0, 4 * MIB).unwrap(), &expected, "discarded");
        assert_bytes_eq(&file_bytes(&img), &expected, "file");
        let blocks_after = st_blocks(&img);
        assert!(
            blocks_after <= blocks_before - (2 * MIB / 512) as u64,
            "cache.direct={direct}: st_blocks {blocks_before} -> {blocks_after}"
        );

        // A misaligned discard never touches bytes outside its range.
        let before = file_bytes(&img);
        run(n.discard(100, 10_000)).unwrap();
        let after = file_bytes(&img);
        assert_eq!(after[..100], before[..100]);
        assert_eq!(after[10_100..], before[10_100..]);
        // What it discarded reads as zeroes; what it kept is unchanged.
        for (a, b) in after[100..10_100].iter().zip(&before[100..10_100]) {
            assert!(a == b || *a == 0);
        }
        assert_eq!(
            file_bytes(&img).len(),
            4 * MIB,
            "discard changed the file size"
        );
    }
}

#[test]
fn discard_ignore_keeps_data() {
    let (img, data) = full_image(2);
    let g = Graph::new();
    // discard=ignore is the default on the format node.
    let n = open_raw(&g, "", &img);
    assert!(!n.discard_enabled());
    let blocks = st_blocks(&img);
    run(n.discard(0, 4 * MIB as u64)).unwrap();
    assert_bytes_eq(&read(&n, 0, 4 * MIB).unwrap(), &data, "node");
    assert_eq!(st_blocks(&img), blocks);
    drop(n);
    // ... as when the file child has discard=ignore under an unmapping format.
    let n = open_raw(&g, "discard=unmap,file.discard=ignore", &img);
    assert!(!n.discard_enabled());
    run(n.discard(0, 4 * MIB as u64)).unwrap();
    assert_bytes_eq(&read(&n, 0, 4 * MIB).unwrap(), &data, "node");
}

#[test]
fn write_zeroes_with_and_without_unmap() {
    for direct in ["off", "on"] {
        let (img, mut expected) = full_image(3);
        let g = Graph::new();
        let n = open_raw(&g, &format!("discard=unmap,cache.direct={direct}"), &img);
        let blocks0 = st_blocks(&img);

        // Without may_unmap: zeroes, space stays allocated.
        run(n.write_zeroes(0, MIB as u64, false)).unwrap();
        expected[..MIB].fill(0);
        assert_bytes_eq(&read(&n, 0, 4 * MIB).unwrap(), &expected, "node");
        let blocks1 = st_blocks(&img);
        assert!(
            blocks1 >= blocks0,
            "cache.direct={direct}: write_zeroes without may_unmap freed space ({blocks0} -> {blocks1})"
        );

        // With may_unmap (and discard=unmap): zeroes, space freed.
        run(n.write_zeroes(2 * MIB as u64, MIB as u64, true)).unwrap();
        expected[2 * MIB..3 * MIB].fill(0);
        assert_bytes_eq(&read(&n, 0, 4 * MIB).unwrap(), &expected, "node");
        let blocks2 = st_blocks(&img);
        assert!(
            blocks2 <= blocks1 - (MIB / 512) as u64,
            "cache.direct={direct}: write_zeroes with may_unmap kept space ({blocks1} -> {blocks2})"
        );
        run(n.flush()).unwrap();
        drop(n);
        assert_bytes_eq(&file_bytes(&img), &expected, "file");
    }

    // may_unmap is only a permission: with discard=ignore the space stays.
    let (img, mut expected) = full_image(4);
    let g = Graph::new();
    let n = open_raw(&g, "", &img);
    let blocks = st_blocks(&img);
    run(n.write_zeroes(MIB as u64, MIB as u64, true)).unwrap();
    expected[MIB..2 * MIB].fill(0);
    assert_bytes_eq(&read(&n, 0, 4 * MIB).unwrap(), &expected, "node");
    assert!(st_blocks(&img) >= blocks, "unmapped despite discard=ignore");
}

#[test]
fn unaligned_write_zeroes_on_o_direct() {
    let (img, mut expected) = full_image(5);
    let g = Graph::new();
    let n = open_raw(&g, "discard=unmap,cache.direct=on", &img);
    let file = n.child(ChildRole::File).unwrap();
    assert!(file.limits().request_alignment > 1);
    let cases: &[(usize, usize)] = &[
        (1000, 10_000),     // both edges unaligned, aligned middle
        (4100, 10),         // inside one block
        (8192, 700),        // aligned start, unaligned end
        (20_000, 12_768),   // unaligned start, aligned end (32768)
        (65_535, 2),        // across a block boundary, no middle
        (100_000, 300_000), // large
        (4 * MIB - 5, 5),   // the very end
    ];
    for &(off, len) in cases {
        for unmap in [false, true] {
            // Refill with data so each case starts from non-zero bytes.
            let fill = common::pattern((off + len) as u64 + u64::from(unmap), len);
            write(&n, off as u64, &fill).unwrap();
            run(n.write_zeroes(off as u64, len as u64, unmap)).unwrap();
            expected[off..off + len].fill(0);
            assert_bytes_eq(
                &file_bytes(&img),
                &expected,
                &format!("write_zeroes {len}@{off} unmap={unmap}"),
            );
            assert_eq!(read(&n, off as u64, len).unwrap(), vec![0u8; len]);
        }
    }
    assert_bytes_eq(&read(&n, 0, 4 * MIB).unwrap(), &expected, "node");
}

#[test]
fn detect_zeroes_turns_zero_writes_into_write_zeroes() {
    let (img, mut expected) = full_image(6);
    let g = Graph::new();
    let n = open_raw(&g, "discard=unmap,detect-zeroes=unmap", &img);
    let blocks = st_blocks(&img);
    write(&n, MIB as u64, &vec![0u8; 2 * MIB]).unwrap();
    expected[MIB..3 * MIB].fill(0);
    assert_eq!(n.stats().zeroes_detected.get(), 1);
    assert_bytes_eq(&read(&n, 0, 4 * MIB).unwrap(), &expected, "node");
    assert!(
        st_blocks(&img) <= blocks - (2 * MIB / 512) as u64,
        "detect-zeroes=unmap did not free space"
    );
    // Non-zero data is written as data.
    write(&n, 10, &[0, 0, 1]).unwrap();
    expected[10..13].copy_from_slice(&[0, 0, 1]);
    assert_eq!(n.stats().zeroes_detected.get(), 1);
    drop(n);
    assert_bytes_eq(&file_bytes(&img), &expected, "file");
}

#[test]
fn null_co_discard_and_write_zeroes() {
    let g = Graph::new();
    let n = open(&g, "driver=null-co,size=16M,read-zeroes=on,discard=unmap");
    assert!(n.discard_enabled());
    write(&n, 0, &[0xFF; 4096]).unwrap();
    run(n.discard(0, 16 << 20)).unwrap();
    run(n.discard(7, 100)).unwrap();
    run(n.write_zeroes(3, 5000, true)).unwrap();
    run(n.write_zeroes(0, 16 << 20, false)).unwrap();
    let mut buf = vec![0x33u8; 8192];
    run(n.read(5, &[IoVec::new(&mut buf)])).unwrap();
    assert!(buf.iter().all(|&b| b == 0));

    // Under raw, with the default discard=ignore on the format.
    let n = open(
        &g,
        "driver=raw,file.driver=null-co,file.size=1M,file.read-zeroes=on",
    );
    run(n.discard(0, 4096)).unwrap();
    run(n.write_zeroes(1, 4094, false)).unwrap();
    assert_eq!(read(&n, 0, 4096).unwrap(), vec![0u8; 4096]);
}
