//! cache.direct=on on a real file: aligned requests go zero-copy to the kernel, misaligned
//! memory is bounced, misaligned offsets and lengths are widened (read-modify-write for
//! writes) — and the bytes are right in every case, checked against std::fs.

mod common;

use common::{
    assert_bytes_eq, file_bytes, image_with, open, open_flags_of, open_raw, path_str, run,
    AlignedBuf,
};
use strata_backend::{ChildRole, Graph, IoVec, Node};

const SIZE: usize = 1 << 20;

struct Counters {
    zero_copy: u64,
    bounced: u64,
    rmw: u64,
}

fn counters(n: &Node) -> Counters {
    let s = n.stats();
    Counters {
        zero_copy: s.zero_copy.get(),
        bounced: s.bounced.get(),
        rmw: s.read_modify_write.get(),
    }
}

#[test]
fn aligned_buffers_go_zero_copy() {
    let data = common::pattern(1, SIZE);
    let img = image_with(&data);
    let g = Graph::new();
    let n = open_raw(&g, "cache.direct=on", &img);
    let file = n.child(ChildRole::File).unwrap();
    let limits = file.limits();
    assert!(limits.request_alignment >= 512, "{limits:?}");
    assert!(limits.request_alignment <= 4096, "{limits:?}");
    assert!(limits.min_mem_alignment <= 4096, "{limits:?}");
    let flags = open_flags_of(&img);
    assert_eq!(flags.len(), 1);
    assert_ne!(flags[0] & libc::O_DIRECT, 0);

    // Single aligned buffers, reads and writes of several sizes.
    let mut expected = data.clone();
    for (i, (off, len)) in [
        (0usize, 4096usize),
        (8192, 65536),
        (4096, 4096),
        (SIZE - 131072, 131072),
    ]
    .into_iter()
    .enumerate()
    {
        let mut buf = AlignedBuf::new(len, 0);
        run(n.read(off as u64, &[buf.iovec()])).unwrap();
        assert_eq!(buf.as_slice(), &expected[off..off + len]);
        let new = common::pattern(100 + i as u64, len);
        let mut buf = AlignedBuf::from_slice(&new, 0);
        run(n.write(off as u64, &[buf.iovec()])).unwrap();
        expected[off..off + len].copy_from_slice(&new);
    }
    // Vectored: three aligned buffers of different sizes in one request.
    let (mut a, mut b, mut c) = (
        AlignedBuf::from_slice(&common::pattern(7, 4096), 0),
        AlignedBuf::from_slice(&common::pattern(8, 8192), 0),
        AlignedBuf::from_slice(&common::pattern(9, 4096), 0),
    );
    run(n.write(16384, &[a.iovec(), b.iovec(), c.iovec()])).unwrap();
    expected[16384..20480].copy_from_slice(&common::pattern(7, 4096));
    expected[20480..28672].copy_from_slice(&common::pattern(8, 8192));
    expected[28672..32768].copy_from_slice(&common::pattern(9, 4096));
    let (mut a, mut b) = (AlignedBuf::new(8192, 0), AlignedBuf::new(8192, 0));
    run(n.read(12288, &[a.iovec(), b.iovec()])).unwrap();
    assert_eq!(a.as_slice(), &expected[12288..20480]);
    assert_eq!(b.as_slice(), &expected[20480..28672]);
    run(n.flush()).unwrap();

    let c = counters(file);
    assert_eq!(c.bounced, 0, "aligned requests were bounced");
    assert_eq!(c.rmw, 0);
    assert_eq!(c.zero_copy, 10, "one zero-copy request per read and write");
    assert_bytes_eq(&file_bytes(&img), &expected, "file");
    let mut whole = AlignedBuf::new(SIZE, 0);
    run(n.read(0, &[whole.iovec()])).unwrap();
    assert_bytes_eq(whole.as_slice(), &expected, "whole read");
    assert_eq!(counters(file).bounced, 0);
}

#[test]
fn misaligned_memory_is_bounced_and_correct() {
    let data = common::pattern(2, SIZE);
    let img = image_with(&data);
    let g = Graph::new();
    let n = open_raw(&g, "cache.direct=on", &img);
    let file = n.child(ChildRole::File).unwrap();
    let mut expected = data.clone();

    // Aligned offset and length, but the buffer starts at ptr+1.
    let mut buf = AlignedBuf::new(8192, 1);
    run(n.read(4096, &[buf.iovec()])).unwrap();
    assert_eq!(buf.as_slice(), &expected[4096..12288]);
    let c = counters(file);
    assert_eq!((c.bounced, c.zero_copy), (1, 0));

    let new = common::pattern(20, 8192);
    let mut buf = AlignedBuf::from_slice(&new, 1);
    run(n.write(8192, &[buf.iovec()])).unwrap();
    expected[8192..16384].copy_from_slice(&new);
    let c = counters(file);
    assert_eq!(
        (c.bounced, c.rmw),
        (2, 0),
        "a bounce, not a read-modify-write"
    );

    // One aligned and one misaligned buffer in the same request: bounced as a whole.
    let mut good = AlignedBuf::from_slice(&common::pattern(21, 4096), 0);
    let mut bad = AlignedBuf::from_slice(&common::pattern(22, 4096), 3);
    run(n.write(65536, &[good.iovec(), bad.iovec()])).unwrap();
    expected[65536..69632].copy_from_slice(&common::pattern(21, 4096));
    expected[69632..73728].copy_from_slice(&common::pattern(22, 4096));
    let mut r1 = AlignedBuf::new(4096, 0);
    let mut r2 = AlignedBuf::new(4096, 511);
    run(n.read(65536, &[r1.iovec(), r2.iovec()])).unwrap();
    assert_eq!(r1.as_slice(), &expected[65536..69632]);
    assert_eq!(r2.as_slice(), &expected[69632..73728]);
    assert_eq!(counters(file).bounced, 4);

    drop(n);
    assert_bytes_eq(&file_bytes(&img), &expected, "file");
}

#[test]
fn misaligned_offsets_and_lengths() {
    let data = common::pattern(3, SIZE);
    let img = image_with(&data);
    let g = Graph::new();
    let n = open_raw(&g, "cache.direct=on", &img);
    let file = n.child(ChildRole::File).unwrap();
    let align = u64::from(file.limits().request_alignment);
    let mut expected = data.clone();

    let cases: &[(usize, usize)] = &[
        (7, 100),              // inside one block
        (0, 1),                // first byte
        (511, 2),              // across a 512 boundary
        (4000, 300),           // across a 4096 boundary
        (4096 - 1, 4096 + 2),  // one byte into each of three blocks
        (12345, 70000),        // long, both ends misaligned
        (65536, 1000),         // aligned start, misaligned end
        (131072 - 1000, 1000), // misaligned start, aligned end
        (SIZE - 3, 3),         // last bytes
    ];
    for (i, &(off, len)) in cases.iter().enumerate() {
        // Read into unaligned memory, then into aligned memory.
        let mut buf = vec![0u8; len];
        run(n.read(off as u64, &[IoVec::new(&mut buf)])).unwrap();
        assert_eq!(buf, expected[off..off + len], "read {len}@{off}");
        let mut abuf = AlignedBuf::new(len, 0);
        run(n.read(off as u64, &[abuf.iovec()])).unwrap();
        assert_eq!(abuf.as_slice(), &expected[off..off + len]);

        let before = counters(file).rmw;
        let new = common::pattern(1000 + i as u64, len);
        let mut wbuf = new.clone();
        run(n.write(off as u64, &[IoVec::new(&mut wbuf)])).unwrap();
        expected[off..off + len].copy_from_slice(&new);
        let aligned = off as u64 % align == 0 && len as u64 % align == 0;
        assert_eq!(
            counters(file).rmw - before,
            u64::from(!aligned),
            "read-modify-write count for {len}@{off}"
        );
        // Compare the whole file after each write: neighbours must be untouched.
        assert_bytes_eq(
            &file_bytes(&img),
            &expected,
            &format!("after writing {len}@{off}"),
        );
    }

    // Scatter-gather with odd piece sizes at an odd offset, both directions.
    let new = common::pattern(77, 1 + 510 + 3000 + 7);
    let mut p = [
        new[..1].to_vec(),
        new[1..511].to_vec(),
        new[511..3511].to_vec(),
        new[3511..].to_vec(),
    ];
    {
        let [a, b, c, d] = &mut p;
        let iov = [IoVec::new(a), IoVec::new(b), IoVec::new(c), IoVec::new(d)];
        run(n.write(200_001, &iov)).unwrap();
    }
    expected[200_001..200_001 + new.len()].copy_from_slice(&new);
    let mut q = [vec![0u8; 3], vec![0u8; 2000], vec![0u8; new.len() - 2003]];
    {
        let [a, b, c] = &mut q;
        let iov = [IoVec::new(a), IoVec::new(b), IoVec::new(c)];
        run(n.read(200_001, &iov)).unwrap();
    }
    assert_eq!(q.concat(), new);
    drop(n);
    assert_bytes_eq(&file_bytes(&img), &expected, "file");
}

#[test]
fn file_node_directly_and_without_cache_direct() {
    let data = common::pattern(4, SIZE);
    let img = image_with(&data);
    let g = Graph::new();
    let mut expected = data.clone();

    // A file node opened on its own, O_DIRECT.
    let f = open(
        &g,
        &format!("driver=file,filename={},cache.direct=on", path_str(&img)),
    );
    common::write(&f, 1001, &[0xEE; 2000]).unwrap();
    expected[1001..3001].fill(0xEE);
    assert_eq!(common::read(&f, 0, 8192).unwrap(), expected[..8192]);
    assert_eq!(counters(&f).rmw, 1);
    drop(f);
    assert_bytes_eq(&file_bytes(&img), &expected, "file");

    // Without cache.direct nothing needs aligning: every request goes straight through.
    let n = open_raw(&g, "", &img);
    let file = n.child(ChildRole::File).unwrap();
    assert_eq!(file.limits().request_alignment, 1);
    assert_eq!(file.limits().min_mem_alignment, 1);
    assert_eq!(open_flags_of(&img)[0] & libc::O_DIRECT, 0);
    common::write(&n, 7, &[0x77; 100]).unwrap();
    expected[7..107].fill(0x77);
    let mut buf = AlignedBuf::new(100, 1);
    run(n.read(7, &[buf.iovec()])).unwrap();
    assert_eq!(buf.as_slice(), &[0x77; 100]);
    let c = counters(file);
    assert_eq!((c.bounced, c.rmw, c.zero_copy), (0, 0, 2));
    drop(n);
    assert_bytes_eq(&file_bytes(&img), &expected, "file");
}

#[test]
fn unaligned_file_size_with_cache_direct() {
    // The tail of a file whose size is not a multiple of the alignment reads right: the
    // widened O_DIRECT read stops short at the end of the file.
    let data = common::pattern(5, 10_000);
    let img = image_with(&data);
    let g = Graph::new();
    let n = open_raw(&g, "cache.direct=on", &img);
    assert_eq!(n.size(), 10_000);
    assert_eq!(common::read(&n, 9_900, 100).unwrap(), data[9_900..]);
    assert_eq!(common::read(&n, 0, 10_000).unwrap(), data);
    common::write(&n, 9_990, b"0123456789").unwrap();
    assert_eq!(common::read(&n, 9_980, 20).unwrap()[10..], *b"0123456789");
    drop(n);
    let on_disk = file_bytes(&img);
    assert_eq!(on_disk[..9_990], data[..9_990]);
    assert_eq!(on_disk[9_990..10_000], *b"0123456789");
    // The aligned O_DIRECT write of the last block grows the file to the next multiple of
    // the alignment; the bytes past the node's end are zeroes.
    assert!(on_disk[10_000..].iter().all(|&b| b == 0));
}
