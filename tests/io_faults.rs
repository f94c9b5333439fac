//! I/O errors of the storage under strata reach the guest (issue 17 item 2): strata serves an
//! image through strata-faultfs, which fails chosen reads, writes, fsyncs and fallocates
//! with EIO or ENOSPC. The libblkio client must see that request fail
//! (VIRTIO_BLK_S_IOERR, which libblkio reports as -EIO), nothing half-done may become
//! visible, the daemon keeps serving, a failed flush stays failed, and `qemu-img check`
//! finds no corruption afterwards (leaks are fine).

mod faultfs_rig;

use faultfs_rig::*;

const DISK: u64 = 16 << 20;
const CLUSTER: u64 = 65536;
const EIO: i32 = -libc::EIO;
const ERRNOS: [&str; 2] = ["EIO", "ENOSPC"];

fn pattern(tag: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(tag) | 1)
        .collect()
}

/// A flush that failed keeps failing, while reads and writes still work.
fn assert_flush_stays_failed(c: &mut Client, what: &str) {
    for i in 0..3 {
        assert_eq!(c.flush(), EIO, "{what}: flush {i} after a failed one");
    }
    assert_eq!(c.write(DISK - 4096, &pattern(9, 4096)), 0, "{what}: write");
    assert_eq!(
        c.read(DISK - 4096, 4096),
        Ok(pattern(9, 4096)),
        "{what}: read"
    );
    assert_eq!(c.flush(), EIO, "{what}: flush after a later write");
}

#[test]
fn raw_read_write_and_zeroing_errors_reach_the_guest() {
    if !require_fuse() {
        return;
    }
    for errno in ERRNOS {
        let rig = Rig::new(Format::Raw, DISK, 0);
        let _daemon = rig.start_strata(false, true);
        let mut c = Client::connect(&rig.socket(), 1 << 20);
        let old = pattern(1, 8192);
        assert_eq!(c.write(0, &old), 0);
        assert_eq!(c.flush(), 0);

        rig.mount()
            .command(&format!("fail write {errno} once"))
            .unwrap();
        assert_eq!(c.write(0, &pattern(2, 8192)), EIO, "{errno}: failed write");
        assert_eq!(c.read(0, 8192), Ok(old.clone()), "{errno}: old data stays");
        assert_eq!(c.write(4096, &pattern(3, 4096)), 0, "{errno}: next write");
        assert_eq!(c.flush(), 0, "{errno}: a failed write fails no flush");

        rig.mount()
            .command(&format!("fail read {errno} once"))
            .unwrap();
        assert_eq!(c.read(0, 4096), Err(EIO), "{errno}: failed read");
        assert_eq!(
            c.read(0, 4096),
            Ok(old[..4096].to_vec()),
            "{errno}: next read"
        );

        rig.mount()
            .command(&format!("fail fallocate {errno} once"))
            .unwrap();
        assert_eq!(c.write_zeroes(0, 4096), EIO, "{errno}: failed write-zeroes");
        assert_eq!(
            c.read(0, 4096),
            Ok(old[..4096].to_vec()),
            "{errno}: not zeroed"
        );
        assert_eq!(c.write_zeroes(0, 4096), 0, "{errno}: next write-zeroes");
        assert_eq!(c.read(0, 4096), Ok(vec![0; 4096]));
        assert_eq!(
            rig.mount().status().faults_fired,
            3,
            "{errno}: every fault hit"
        );
    }
}

#[test]
fn failed_flushes_stay_failed() {
    if !require_fuse() {
        return;
    }
    for format in [Format::Raw, Format::Qcow2] {
        for errno in ERRNOS {
            let what = format!("{format:?} {errno}");
            let mut rig = Rig::new(format, DISK, CLUSTER);
            let mut daemon = rig.start_strata(false, true);
            let mut c = Client::connect(&rig.socket(), 1 << 20);
            let data = pattern(4, 8192);
            assert_eq!(c.write(CLUSTER, &data), 0);
            rig.mount()
                .command(&format!("fail fsync {errno} once"))
                .unwrap();
            assert_eq!(c.flush(), EIO, "{what}: the failed flush");
            // The fault is gone and the file system's next fsync would succeed, but the
            // writes the failed one was to make durable are lost: strata must not say so.
            assert_flush_stays_failed(&mut c, &what);
            drop(c);
            daemon.stop();
            rig.unmount();
            rig.check_qcow2(&what);
            // A new daemon starts with a clean slate.
            rig.remount();
            let _daemon = rig.start_strata(false, true);
            let mut c = Client::connect(&rig.socket(), 1 << 20);
            assert_eq!(c.write(CLUSTER, &data), 0, "{what}: after a restart");
            assert_eq!(c.flush(), 0, "{what}: flush after a restart");
        }
    }
}

/// What became of one guest write in the qcow2 test.
struct Outcome {
    offset: u64,
    data: Vec<u8>,
    result: i32,
}

/// Write `index` of a qcow2 fault run: guest offset and data. Both go to clusters that are
/// not allocated yet; the second covers part of its cluster (copy-on-write of zeroes).
fn allocating_write(index: usize) -> (u64, Vec<u8>) {
    match index {
        0 => (5 * CLUSTER, pattern(5, CLUSTER as usize)),
        _ => (9 * CLUSTER + 512, pattern(6, 4096)),
    }
}

/// Fails the `after`-th file write (0-based) from the first allocating write on: the data
/// writes of the two allocations, then the metadata (L2 tables, refcount blocks) the flush
/// writes back. Checks every request's outcome and the image.
fn qcow2_fault_run(errno: &str, after: u64) {
    let what = format!("qcow2 {errno}, write {after} fails");
    let mut rig = Rig::new(Format::Qcow2, DISK, CLUSTER);
    rig.format_options = "discard=unmap".into();
    let mut daemon = rig.start_strata(false, true);
    let mut c = Client::connect(&rig.socket(), 1 << 20);
    // The L2 table and refcounts of the area exist before the fault.
    let first = pattern(1, 4096);
    assert_eq!(c.write(0, &first), 0);
    assert_eq!(c.flush(), 0);
    // A freed cluster full of old data, which the allocations below may reuse: an L2 entry
    // pointing at it after its data write failed would show that data.
    assert_eq!(c.write(20 * CLUSTER, &pattern(8, CLUSTER as usize)), 0);
    assert_eq!(c.flush(), 0);
    assert_eq!(c.discard(20 * CLUSTER, CLUSTER), 0);
    assert_eq!(c.flush(), 0);

    rig.mount()
        .command(&format!("fail write {errno} once after {after}"))
        .unwrap();
    let mut outcomes = Vec::new();
    for i in 0..2 {
        let (offset, data) = allocating_write(i);
        let result = c.write(offset, &data);
        assert!(result == 0 || result == EIO, "{what}: write {i}: {result}");
        outcomes.push(Outcome {
            offset,
            data,
            result,
        });
    }
    let flush = c.flush();
    assert!(flush == 0 || flush == EIO, "{what}: flush {flush}");
    let fired = rig.mount().status().faults_fired;
    let results: Vec<i32> = outcomes.iter().map(|o| o.result).collect();
    eprintln!("{what}: writes {results:?}, flush {flush}, faults fired {fired}");
    rig.mount().command("clear").unwrap();

    // A failed write left nothing: its clusters read as before (no L2 entry points at a
    // cluster whose data write failed); a successful one reads back whole.
    for (i, o) in outcomes.iter().enumerate() {
        let got = c.read(o.offset, o.data.len()).expect("read back");
        if o.result == 0 {
            assert!(
                got == o.data,
                "{what}: write {i} succeeded but reads back wrong"
            );
        } else {
            assert!(
                got.iter().all(|&b| b == 0),
                "{what}: failed write {i} is visible"
            );
        }
    }
    if flush != 0 {
        assert_flush_stays_failed(&mut c, &what);
    } else {
        assert!(
            outcomes.iter().any(|o| o.result != 0) || fired == 0,
            "{what}: a write failed under strata and every request succeeded"
        );
    }
    // The daemon keeps serving.
    let later = pattern(7, 8192);
    assert_eq!(c.write(12 * CLUSTER, &later), 0, "{what}: a later write");
    assert_eq!(c.read(12 * CLUSTER, 8192), Ok(later.clone()), "{what}");
    drop(c);
    daemon.stop();
    rig.unmount();
    rig.check_qcow2(&what);

    // On disk, as QEMU reads it: what a completed flush covered is there, a failed write
    // is not, and the rest is all old or all new per sector.
    let image = rig.stable_content();
    assert_eq!(image[..4096], first[..], "{what}: the flushed first write");
    for (i, o) in outcomes.iter().enumerate() {
        let on_disk = &image[o.offset as usize..o.offset as usize + o.data.len()];
        for (s, (got, new)) in on_disk
            .chunks(SECTOR as usize)
            .zip(o.data.chunks(SECTOR as usize))
            .enumerate()
        {
            let zero = got.iter().all(|&b| b == 0);
            match (o.result, flush) {
                (0, 0) => assert!(got == new, "{what}: write {i} sector {s} lost"),
                (0, _) => assert!(got == new || zero, "{what}: write {i} sector {s} torn"),
                _ => assert!(zero, "{what}: failed write {i} sector {s} on disk"),
            }
        }
    }
    let end = (12 * CLUSTER) as usize;
    assert!(
        flush != 0 || image[end..end + 8192] == later[..],
        "{what}: the later write (flushed at stop)"
    );
}

#[test]
fn qcow2_allocation_and_metadata_write_errors() {
    if !require_fuse() {
        return;
    }
    for errno in ERRNOS {
        // 0 and 1 hit the data writes of the two allocations, the others the metadata
        // the flush writes back (and past the last one, nothing).
        for after in 0..5 {
            qcow2_fault_run(errno, after);
        }
    }
}
