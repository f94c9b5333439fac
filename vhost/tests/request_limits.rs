//! Requests at the limits the device advertises in its config space (issue 17, item 4):
//! reads and writes with `seg_max` data segments (in a direct chain and in an indirect table),
//! discard and write-zeroes of `max_discard_sectors` / `max_write_zeroes_sectors`, all served
//! with the right data; one segment or one sector more is refused with an error status and
//! changes nothing, and the device goes on serving.

mod common;

use common::frontend::*;
use common::*;
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// 2 GiB, sparse: room for a 1 GiB discard or write-zeroes plus a margin on both sides.
const DISK: u64 = 2 << 30;
const QSIZE: u16 = 256;
const MEM: u64 = 8 << 20;
const HDR: u64 = 0x1_0000;
const STATUS: u64 = 0x1_0100;
/// Indirect tables.
const TABLE: u64 = 0x2_0000;
/// Data buffers: seg_max + 1 segments of SEG bytes.
const DATA: u64 = 0x10_0000;
const SEG: u32 = 16 << 10;
/// VIRTIO_BLK_F_SIZE_MAX.
const FEATURE_SIZE_MAX: u64 = 1 << 1;

struct Guest {
    mem: GuestMemoryMmap,
    fe: Frontend,
    q: Vring,
    features: u64,
}

impl Guest {
    fn connect(disk: &Disk) -> Guest {
        let mem = guest_memory(&[(0, MEM)]);
        let (mut fe, features) = negotiate_with_memory(&disk.socket(), u64::MAX, &mem);
        let q = Vring::setup(&mut fe, &mem, 0, 0, QSIZE);
        Guest {
            mem,
            fe,
            q,
            features,
        }
    }

    /// A little-endian u32 of the config space at `offset`.
    fn config_u32(&mut self, offset: u32) -> u32 {
        let (_, data) = self
            .fe
            .get_config(offset, 4, VhostUserConfigFlags::empty(), &[0u8; 4])
            .expect("get_config");
        u32::from_le_bytes([data[0], data[1], data[2], data[3]])
    }

    /// Runs a request of type `typ` at `sector` with data segments `segs` (guest address,
    /// length), through an indirect table when `indirect`; returns (used length, status).
    fn run(
        &mut self,
        typ: u32,
        sector: u64,
        segs: &[(u64, u32)],
        device_writes: bool,
        indirect: bool,
    ) -> (u32, u8) {
        write_header(&self.mem, HDR, STATUS, typ, sector);
        let w = if device_writes { F_WRITE } else { 0 };
        let table = if indirect { TABLE } else { self.q.base + DESC };
        let n = segs.len() as u16 + 2;
        Vring::write_desc(&self.mem, table, 0, HDR, 16, F_NEXT, 1);
        for (i, &(addr, len)) in segs.iter().enumerate() {
            let i = i as u16 + 1;
            Vring::write_desc(&self.mem, table, i, addr, len, F_NEXT | w, i + 1);
        }
        Vring::write_desc(&self.mem, table, n - 1, STATUS, 1, F_WRITE, 0);
        if indirect {
            self.q
                .desc(&self.mem, 0, TABLE, 16 * u32::from(n), F_INDIRECT, 0);
        }
        self.q.push(&self.mem, 0);
        let (id, len) = self.q.used(&self.mem, 1)[0];
        assert_eq!(id, 0);
        let status = self.mem.read_obj(GuestAddress(STATUS)).expect("status");
        (len, status)
    }

    /// A discard or write-zeroes request of one segment.
    fn zero_discard(&mut self, typ: u32, sector: u64, sectors: u32, flags: u32) -> (u32, u8) {
        let seg = zero_discard_segment(sector, sectors, flags);
        self.mem
            .write_slice(&seg, GuestAddress(DATA))
            .expect("segment");
        self.run(typ, 0, &[(DATA, 16)], false, false)
    }
}

/// `n` data segments of SEG bytes, back to back from DATA.
fn segments(n: u32) -> Vec<(u64, u32)> {
    (0..u64::from(n))
        .map(|i| (DATA + i * u64::from(SEG), SEG))
        .collect()
}

/// A write of `segs` segments at `sector` then a read of them back, both with `indirect`;
/// returns both results and whether the data read back (and on disk) is the pattern.
fn write_then_read(
    g: &mut Guest,
    disk: &Disk,
    segs: u32,
    sector: u64,
    indirect: bool,
    tag: u64,
) -> ((u32, u8), (u32, u8), bool) {
    let len = segs as usize * SEG as usize;
    let data = pattern(tag, sector * 512, len);
    g.mem.write_slice(&data, GuestAddress(DATA)).expect("data");
    let wrote = g.run(T_OUT, sector, &segments(segs), false, indirect);
    g.mem
        .write_slice(&vec![0u8; len], GuestAddress(DATA))
        .expect("clear");
    let read = g.run(T_IN, sector, &segments(segs), true, indirect);
    let mut back = vec![0u8; len];
    g.mem
        .read_slice(&mut back, GuestAddress(DATA))
        .expect("read back");
    let same = back == data && disk.file_bytes(sector * 512, len) == data;
    (wrote, read, same)
}

#[test]
fn reads_and_writes_with_seg_max_segments_are_served() {
    let disk = Disk::new(DISK, "");
    let _export = disk.export(|c| c.queue_size = QSIZE);
    let mut g = Guest::connect(&disk);
    let seg_max = g.config_u32(12);
    assert_eq!(seg_max, u32::from(QSIZE) - 2, "seg_max");
    // A file node has no transfer limit: no SIZE_MAX, a segment may be as long as a
    // descriptor allows (the 4 MiB one below).
    assert_eq!(g.features & FEATURE_SIZE_MAX, 0, "SIZE_MAX offered");
    for indirect in [false, true] {
        let bytes = u64::from(seg_max * SEG);
        let (w, r, same) = write_then_read(&mut g, &disk, seg_max, 2048, indirect, 1);
        assert_eq!(
            w,
            (1, S_OK),
            "write of {seg_max} segments (indirect: {indirect})"
        );
        assert_eq!(
            r,
            (bytes as u32 + 1, S_OK),
            "read of {seg_max} segments (indirect: {indirect})"
        );
        assert!(same, "data of {seg_max} segments (indirect: {indirect})");
    }
    // One segment of all of them: 4 MiB in one descriptor.
    let len = seg_max * SEG;
    let data = pattern(2, 0, len as usize);
    g.mem.write_slice(&data, GuestAddress(DATA)).expect("data");
    assert_eq!(g.run(T_OUT, 0, &[(DATA, len)], false, false), (1, S_OK));
    assert!(disk.file_bytes(0, len as usize) == data, "one big segment");
}

#[test]
fn one_segment_more_than_seg_max_is_refused() {
    let disk = Disk::new(DISK, "");
    let _export = disk.export(|c| c.queue_size = QSIZE);
    let mut g = Guest::connect(&disk);
    let seg_max = g.config_u32(12);
    let len = (seg_max as usize + 1) * SEG as usize;
    // Only an indirect table can carry more descriptors than the queue has.
    let before = disk.file_bytes(2048 * 512, len);
    let (w, r, _) = write_then_read(&mut g, &disk, seg_max + 1, 2048, true, 3);
    assert_eq!(w.1, S_IOERR, "write of {} segments", seg_max + 1);
    assert_eq!(r, (1, S_IOERR), "read of {} segments", seg_max + 1);
    assert!(
        disk.file_bytes(2048 * 512, len) == before,
        "a refused write changed the disk"
    );
    let (w, r, same) = write_then_read(&mut g, &disk, seg_max, 2048, true, 4);
    assert_eq!((w, r.1, same), ((1, S_OK), S_OK, true), "served afterwards");
}

#[test]
fn discard_and_write_zeroes_of_the_advertised_maximum() {
    let disk = Disk::new(DISK, "discard=unmap");
    let _export = disk.export(|_| {});
    let mut g = Guest::connect(&disk);
    let max_discard = g.config_u32(36);
    let max_zeroes = g.config_u32(48);
    assert!(
        max_discard > 0 && max_zeroes > 0,
        "discard and write-zeroes offered"
    );
    for (typ, max, name) in [
        (T_WRITE_ZEROES, max_zeroes, "write-zeroes"),
        (T_DISCARD, max_discard, "discard"),
    ] {
        let start = 1u64 << 20; // sectors: 512 MiB into the disk
        let end = start + u64::from(max);
        // A pattern on the first and last 4 KiB of the range and 4 KiB on each side.
        let marks = [start - 8, start, end - 8, end];
        let mark = |i: usize| pattern(10 + i as u64, marks[i] * 512, 4096);
        let put_marks = || {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&disk.image)
                .expect("image");
            for (i, &m) in marks.iter().enumerate() {
                f.write_all_at(&mark(i), m * 512).expect("mark");
            }
        };
        // One sector more than the maximum: refused, nothing changed.
        put_marks();
        let (len, status) = g.zero_discard(typ, start, max + 1, 0);
        assert_eq!(len, 1, "{name} of max + 1 sectors");
        assert!(
            status == S_IOERR || status == S_UNSUPP,
            "{name} of max + 1 sectors: status {status}"
        );
        for (i, &m) in marks.iter().enumerate() {
            assert!(
                disk.file_bytes(m * 512, 4096) == mark(i),
                "{name} of max + 1 sectors changed sector {m}"
            );
        }
        // The maximum: the range reads as zeroes, its neighbours keep their data.
        let (len, status) = g.zero_discard(typ, start, max, 0);
        assert_eq!((len, status), (1, S_OK), "{name} of {max} sectors");
        assert!(
            disk.file_bytes(marks[0] * 512, 4096) == mark(0),
            "{name}: before"
        );
        assert!(
            disk.file_bytes(marks[3] * 512, 4096) == mark(3),
            "{name}: after"
        );
        for &m in &marks[1..3] {
            assert!(
                disk.file_bytes(m * 512, 4096).iter().all(|&b| b == 0),
                "{name} of {max} sectors: sector {m} not zero"
            );
        }
    }
    // Still serving.
    let (w, r, same) = write_then_read(&mut g, &disk, 4, 0, false, 5);
    assert_eq!((w, r.1, same), ((1, S_OK), S_OK, true));
}
