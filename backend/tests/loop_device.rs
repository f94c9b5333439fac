//! host_device on loop devices with 4096-byte logical sectors: driver selection, alignment,
//! and 512-byte writes from concurrent writers that read-modify-write the same 4K blocks.
//!
//! Needs root and losetup; without them each test prints why it is skipped. Every loop device
//! is detached by a guard, also when a test fails.

mod common;

use std::cell::Cell;
use std::sync::Arc;

use common::{
    assert_bytes_eq, err, image, open, open_raw, read, run, try_open, write, AlignedBuf, LoopDevice,
};
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use strata_backend::{ChildRole, Graph, LocalExecutor, Node};
use tempfile::TempPath;

const SECTOR: usize = 512;
const BLOCK: usize = 4096;

#[test]
fn host_device_is_selected_and_aligned_to_4k() {
    require_loop!();
    let lo = loop_4k(1 << 20, 1);
    let d = lo.dev.path_str();
    let g = Graph::new();

    // A block device path selects host_device, given a format or probed.
    for opts in [
        format!("driver=raw,file.filename={d},cache.direct=on"),
        format!("file.filename={d},cache.direct=on"),
        format!("filename={d},cache.direct=on"),
        format!("driver=raw,file.filename=host_device:{d},cache.direct=on"),
    ] {
        let n = open(&g, &opts);
        assert_eq!(n.driver_name(), "raw", "{opts}");
        let file = n.child(ChildRole::File).unwrap();
        assert_eq!(file.driver_name(), "host_device", "{opts}");
        assert_eq!(file.filename(), d);
        assert_eq!(file.limits().request_alignment, 4096, "{opts}");
        assert_eq!(n.size(), 1 << 20);
    }
    let n = open_host_device(&g, &lo.dev);
    assert_eq!(n.limits().request_alignment, 4096);
    drop(n);
    // Without O_DIRECT the page cache takes any request.
    let n2 = open(&g, &format!("driver=host_device,filename={d}"));
    assert_eq!(n2.limits().request_alignment, 1);
    drop(n2);
    let n = open_host_device(&g, &lo.dev);

    // The file driver wants regular files.
    let e = err(try_open(&g, &format!("driver=file,filename={d}")));
    assert!(e.message().contains("host_device"), "{e}");

    // Aligned requests go zero-copy, sub-block ones are widened and still right.
    let data = common::pattern(1, 1 << 20);
    let mut buf = AlignedBuf::new(8192, 0);
    run(n.read(4096, &[buf.iovec()])).unwrap();
    assert_eq!(buf.as_slice(), &data[4096..12288]);
    assert_eq!(n.stats().bounced.get(), 0);
    assert_eq!(read(&n, 512, 512).unwrap(), data[512..1024]);
    assert_eq!(read(&n, 4095, 2).unwrap(), data[4095..4097]);
    assert_eq!(n.stats().bounced.get(), 2);
    write(&n, 1536, &[0xCD; 512]).unwrap();
    assert_eq!(n.stats().read_modify_write.get(), 1);
    let mut expected = data.clone();
    expected[1536..2048].fill(0xCD);
    assert_bytes_eq(
        &read(&n, 0, 1 << 20).unwrap(),
        &expected,
        "after 512-byte write",
    );
    run(n.flush()).unwrap();
    drop(n);
    drop(g);
    assert_bytes_eq(&common::file_bytes(&lo.img), &expected, "backing file");
}

#[test]
fn discard_and_write_zeroes_on_a_loop_device() {
    require_loop!();
    let lo = loop_4k(1 << 20, 2);
    let g = Graph::new();
    let n = open_raw(&g, "discard=unmap,cache.direct=on", lo.dev.path());
    let mut expected = common::pattern(2, 1 << 20);
    // BLKZEROOUT for the aligned middle, read-modify-write at the 4K edges.
    run(n.write_zeroes(1000, 20_000, false)).unwrap();
    expected[1000..21_000].fill(0);
    run(n.write_zeroes(65536, 65536, true)).unwrap();
    expected[65536..131_072].fill(0);
    assert_bytes_eq(
        &read(&n, 0, 1 << 20).unwrap(),
        &expected,
        "after write_zeroes",
    );
    // BLKDISCARD: the loop device punches the backing file; bytes outside stay.
    run(n.discard(262_144, 131_072)).unwrap();
    let got = read(&n, 0, 1 << 20).unwrap();
    assert_bytes_eq(
        &got[..262_144],
        &expected[..262_144],
        "before discarded range",
    );
    assert_bytes_eq(
        &got[393_216..],
        &expected[393_216..],
        "after discarded range",
    );
}

/// A loop device with 4096-byte logical sectors over a temporary image of `pattern(seed)`.
struct Loop4k {
    // Declared first so that it is detached before the image is removed.
    dev: LoopDevice,
    img: TempPath,
}

fn loop_4k(size: usize, seed: u64) -> Loop4k {
    let img = image(size, seed);
    let dev = LoopDevice::attach(&img, 4096);
    Loop4k { dev, img }
}

/// A host_device node with O_DIRECT on the loop device.
fn open_host_device(g: &Graph, dev: &LoopDevice) -> Arc<Node> {
    open(
        g,
        &format!(
            "driver=host_device,filename={},cache.direct=on",
            dev.path_str()
        ),
    )
}

/// The 512-byte payload of `sector` written by `thread` in `round`.
fn payload(thread: usize, sector: usize, round: usize) -> Vec<u8> {
    let mut p = common::pattern(((thread * 1_000_003 + sector) * 16 + round) as u64, SECTOR);
    p[..8].copy_from_slice(&(sector as u32).to_le_bytes().repeat(2));
    p[8] = thread as u8;
    p[9] = round as u8;
    p
}

/// Writes `rounds` versions of each of `sectors` (the last one last), every sector a task of its
/// own, so the writes of one 4K block are in flight together.
fn write_sectors(node: &Node, thread: usize, sectors: &[usize], rounds: usize) {
    let in_flight = Cell::new(0usize);
    let peak = Cell::new(0usize);
    let mut ex = LocalExecutor::new().unwrap();
    for &sector in sectors {
        let (in_flight, peak) = (&in_flight, &peak);
        ex.spawn(async move {
            for round in 0..rounds {
                // Alternate aligned and misaligned memory; both must end up right.
                let mut buf = AlignedBuf::from_slice(&payload(thread, sector, round), round % 2);
                in_flight.set(in_flight.get() + 1);
                peak.set(peak.get().max(in_flight.get()));
                let r = node.write((sector * SECTOR) as u64, &[buf.iovec()]).await;
                in_flight.set(in_flight.get() - 1);
                r.unwrap_or_else(|e| panic!("thread {thread} sector {sector}: {e}"));
            }
        });
    }
    ex.run().unwrap();
    assert!(
        peak.get() > 64,
        "only {} writes were in flight at once",
        peak.get()
    );
}

#[test]
fn concurrent_512_byte_writers_on_4k_sectors() {
    require_loop!();
    const SIZE: usize = 1 << 20;
    const ROUNDS: usize = 3;
    let lo = loop_4k(SIZE, 3);
    let g = Graph::new();
    let n = open_host_device(&g, &lo.dev);
    assert_eq!(n.limits().request_alignment, 4096);
    assert_eq!(n.size(), SIZE as u64);

    // Thread t owns the sectors whose index within their 4K block has parity t, so both threads
    // read-modify-write every block at the same time. Within a thread the order is shuffled.
    let sectors_per_block = BLOCK / SECTOR;
    let owned: Vec<Vec<usize>> = (0..2)
        .map(|t| {
            let mut v: Vec<usize> = (0..SIZE / SECTOR)
                .filter(|s| (s % sectors_per_block) % 2 == t)
                .collect();
            v.shuffle(&mut SmallRng::seed_from_u64(t as u64));
            v
        })
        .collect();
    std::thread::scope(|s| {
        for (t, sectors) in owned.iter().enumerate() {
            let n = &n;
            s.spawn(move || write_sectors(n, t, sectors, ROUNDS));
        }
    });
    assert_eq!(
        n.stats().read_modify_write.get(),
        (SIZE / SECTOR * ROUNDS) as u64
    );

    // Every sector holds its owner's last write.
    let mut expected = vec![0u8; SIZE];
    for s in 0..SIZE / SECTOR {
        let owner = (s % sectors_per_block) % 2;
        expected[s * SECTOR..(s + 1) * SECTOR].copy_from_slice(&payload(owner, s, ROUNDS - 1));
    }
    let got = read(&n, 0, SIZE).unwrap();
    for s in 0..SIZE / SECTOR {
        let range = s * SECTOR..(s + 1) * SECTOR;
        if got[range.clone()] != expected[range.clone()] {
            let (sector, thread, round) = (
                u32::from_le_bytes(got[range.start..range.start + 4].try_into().unwrap()),
                got[range.start + 8],
                got[range.start + 9],
            );
            panic!(
                "sector {s} lost its last write: it holds sector {sector} thread {thread} \
                 round {round} (or initial data)"
            );
        }
    }
    run(n.flush()).unwrap();
    drop(n);
    assert_bytes_eq(
        &common::file_bytes(lo.dev.path()),
        &expected,
        "device read by std::fs",
    );
}

#[test]
fn concurrent_writers_to_the_same_sectors_never_mix() {
    // Both threads write every sector of the first 64 blocks; whichever write is last, each
    // sector must hold one complete write, and no sector may go back to its initial data.
    require_loop!();
    const SIZE: usize = 256 * 1024;
    let lo = loop_4k(SIZE, 4);
    let g = Graph::new();
    let n = open_host_device(&g, &lo.dev);
    let sectors: Vec<usize> = (0..SIZE / SECTOR).collect();
    std::thread::scope(|s| {
        for t in 0..2 {
            let (n, sectors) = (&n, &sectors);
            s.spawn(move || write_sectors(n, t, sectors, 2));
        }
    });
    let got = read(&n, 0, SIZE).unwrap();
    for s in 0..SIZE / SECTOR {
        let sector = &got[s * SECTOR..(s + 1) * SECTOR];
        assert!(
            sector == payload(0, s, 1) || sector == payload(1, s, 1),
            "sector {s} holds neither thread's last write"
        );
    }
}

#[test]
fn long_misaligned_requests_bounce_chunk_by_chunk() {
    require_loop!();
    // Longer than several bounce chunks, starting and ending inside 4 KiB sectors, from and
    // into buffers that are not 4 KiB aligned: every bounced path in pieces.
    const SIZE: usize = 16 << 20;
    let lo = loop_4k(SIZE, 8);
    let n = open_raw(&Graph::new(), "cache.direct=on", lo.dev.path());
    let mut expected = common::pattern(8, SIZE);
    let (off, len) = (1536u64, (5 << 20) + 1000);
    let mut buf = AlignedBuf::new(len, 512);
    run(n.read(off, &[buf.iovec()])).unwrap();
    assert_bytes_eq(
        buf.as_slice(),
        &expected[off as usize..off as usize + len],
        "read",
    );

    let data = common::pattern(9, len);
    let mut src = AlignedBuf::from_slice(&data, 512);
    let woff = 3 * 4096 + 700;
    run(n.write(woff, &[src.iovec()])).unwrap();
    expected[woff as usize..woff as usize + len].copy_from_slice(&data);
    // Aligned offsets and lengths from misaligned memory.
    let aligned = common::pattern(10, 3 << 20);
    let mut src = AlignedBuf::from_slice(&aligned, 512);
    run(n.write(8 << 20, &[src.iovec()])).unwrap();
    expected[8 << 20..(8 << 20) + (3 << 20)].copy_from_slice(&aligned);
    run(n.flush()).unwrap();
    assert_bytes_eq(&read(&n, 0, SIZE).unwrap(), &expected, "after the writes");
    drop(n);
    drop(lo.dev);
    assert_bytes_eq(&common::file_bytes(&lo.img), &expected, "on disk");
}

#[test]
fn many_misaligned_writes_to_a_probed_image_on_4k_sectors_never_wait_for_ever() {
    require_loop!();
    // A probed raw image guards sector 0 and works in whole blocks of the device: many
    // concurrent 512-byte-aligned writes from misaligned memory, more than the thread's bounce
    // budget holds at once, all finish (none waits for ever for a bounce buffer) and land
    // where they belong.
    const SIZE: usize = 80 << 20;
    let lo = loop_4k(SIZE, 12);
    let n = open(
        &Graph::new(),
        &format!("file.filename={},cache.direct=on", lo.dev.path_str()),
    );
    assert_eq!(n.driver_name(), "raw", "probed");
    let (tx, rx) = std::sync::mpsc::channel();
    let writer = {
        let n = n.clone();
        std::thread::spawn(move || {
            let mut exec = strata_backend::LocalExecutor::new().expect("executor");
            for t in 0..24u64 {
                let n = n.clone();
                exec.spawn(async move {
                    let data = common::pattern(100 + t, (2 << 20) + 1024);
                    let mut buf = AlignedBuf::from_slice(&data, 512);
                    let off = (1 << 20) + t * (3 << 20) + 512;
                    n.write(off, &[buf.iovec()]).await.expect("write");
                });
            }
            exec.run().expect("run");
            let _ = tx.send(());
        })
    };
    assert!(
        rx.recv_timeout(std::time::Duration::from_secs(120)).is_ok(),
        "concurrent misaligned writes did not finish (waiting for bounce buffers?)"
    );
    writer.join().expect("writer");
    for t in 0..24u64 {
        let off = (1 << 20) + t * (3 << 20) + 512;
        let want = common::pattern(100 + t, (2 << 20) + 1024);
        assert_bytes_eq(
            &read(&n, off, want.len()).unwrap(),
            &want,
            &format!("write {t}"),
        );
    }
}
