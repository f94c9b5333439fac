//! Hand-built descriptor chains, valid and malformed, sent through a real vhost-user
//! connection (common/frontend.rs) into a split virtqueue in memfd-backed "guest" memory.
//! Every malformed chain must be completed with IOERR when it has a status byte (or returned
//! untouched when it has none), and the daemon must go on serving the next request.

mod common;

use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::frontend::*;
use common::*;
use strata_vhost::BlkExport;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const DISK: u64 = 16 << 20;
const QSIZE: u16 = 16;
const REGION: u64 = 1 << 20;
const HDR: u64 = 0x3000;
const STATUS: u64 = 0x3100;
const DATA: u64 = 0x10000;

/// A frontend with one virtqueue in two adjacent 1 MiB regions of shared memory (GPA 0 and
/// GPA 1 MiB), so buffers can cross a region boundary.
struct Guest {
    mem: GuestMemoryMmap,
    fe: Frontend,
    vring: Vring,
}

impl Guest {
    fn connect(export_socket: &std::path::Path, features_mask: u64) -> Guest {
        Self::connect_queue(export_socket, features_mask, 0)
    }

    /// Sets up virtqueue `queue` only (a frontend may use any of GET_QUEUE_NUM queues).
    fn connect_queue(export_socket: &std::path::Path, features_mask: u64, queue: usize) -> Guest {
        let mem = guest_memory(&[(0, REGION), (REGION, REGION)]);
        let (mut fe, _) = negotiate_with_memory(export_socket, features_mask, &mem);
        let vring = Vring::setup(&mut fe, &mem, queue, 0, QSIZE);
        Guest { mem, fe, vring }
    }

    fn desc(&self, table: u64, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        Vring::write_desc(&self.mem, table, index, addr, len, flags, next);
    }

    fn header(&self, typ: u32, sector: u64) {
        write_header(&self.mem, HDR, STATUS, typ, sector);
    }

    /// Makes `head` available and kicks.
    fn push(&mut self, head: u16) {
        self.vring.push(&self.mem, head);
    }

    /// Waits for the next `n` used entries: (descriptor id, length).
    fn used(&mut self, n: u16) -> Vec<(u32, u32)> {
        self.vring.used(&self.mem, n)
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).expect("status")
    }

    /// A well-formed three-descriptor request at descriptors 0..3: header, data, status.
    fn simple(
        &mut self,
        typ: u32,
        sector: u64,
        data: u64,
        len: u32,
        device_writes: bool,
    ) -> (u32, u8) {
        self.header(typ, sector);
        self.desc(DESC, 0, HDR, 16, F_NEXT, 1);
        let w = if device_writes { F_WRITE } else { 0 };
        self.desc(DESC, 1, data, len, F_NEXT | w, 2);
        self.desc(DESC, 2, STATUS, 1, F_WRITE, 0);
        self.push(0);
        let used = self.used(1);
        assert_eq!(used[0].0, 0);
        (used[0].1, self.status())
    }

    /// Reads sector 0..8 and checks the daemon still serves well-formed requests.
    fn still_serving(&mut self) {
        let (len, status) = self.simple(T_IN, 0, DATA, 4096, true);
        assert_eq!(
            (len, status),
            (4097, S_OK),
            "a following valid request is served"
        );
    }
}

fn all_features() -> u64 {
    u64::MAX
}

fn no_indirect() -> u64 {
    !(1u64 << 28)
}

#[test]
fn valid_requests_and_get_id() {
    let disk = Disk::new(DISK, "discard=unmap");
    let _export: BlkExport = disk.export(|c| c.serial = Some("strata-serial-0".into()));
    let mut g = Guest::connect(&disk.socket(), all_features());
    // Write 8 KiB crossing the boundary between the two memory regions, read it back.
    let data = pattern(1, 4096, 8192);
    let cross = REGION - 4096;
    g.mem.write_slice(&data, GuestAddress(cross)).expect("data");
    assert_eq!(g.simple(T_OUT, 8, cross, 8192, false), (1, S_OK));
    assert!(disk.file_bytes(4096, 8192) == data);
    g.mem
        .write_slice(&[0u8; 8192], GuestAddress(cross))
        .expect("clear");
    assert_eq!(g.simple(T_IN, 8, cross, 8192, true), (8193, S_OK));
    let mut back = vec![0u8; 8192];
    g.mem
        .read_slice(&mut back, GuestAddress(cross))
        .expect("read");
    assert!(back == data);
    // GET_ID: the serial, zero padded to 20 bytes.
    assert_eq!(g.simple(T_GET_ID, 0, DATA, 20, true), (21, S_OK));
    let mut id = [0u8; 20];
    g.mem.read_slice(&mut id, GuestAddress(DATA)).expect("id");
    assert_eq!(&id, b"strata-serial-0\0\0\0\0\0");
    // FLUSH with only header and status.
    g.header(T_FLUSH, 0);
    g.desc(DESC, 0, HDR, 16, F_NEXT, 2);
    g.desc(DESC, 2, STATUS, 1, F_WRITE, 0);
    g.push(0);
    assert_eq!(g.used(1)[0], (0, 1));
    assert_eq!(g.status(), S_OK);
    // An indirect table: header, data, status.
    let table = 0x4000;
    g.header(T_IN, 8);
    g.desc(table, 0, HDR, 16, F_NEXT, 1);
    g.desc(table, 1, DATA, 4096, F_NEXT | F_WRITE, 2);
    g.desc(table, 2, STATUS, 1, F_WRITE, 0);
    g.desc(DESC, 5, table, 48, F_INDIRECT, 0);
    g.push(5);
    assert_eq!(g.used(1)[0], (5, 4097));
    assert_eq!(g.status(), S_OK);
    // Everything in one descriptor pair: header+data readable, data+status writable.
    let combined = 0x5000;
    g.mem
        .write_slice(
            &{
                let mut b = vec![0u8; 16 + 512];
                b[0..4].copy_from_slice(&T_OUT.to_le_bytes());
                b[8..16].copy_from_slice(&100u64.to_le_bytes());
                b[16..].copy_from_slice(&pattern(3, 51200, 512));
                b
            },
            GuestAddress(combined),
        )
        .expect("combined");
    g.mem
        .write_obj(UNTOUCHED, GuestAddress(STATUS))
        .expect("status");
    g.desc(DESC, 0, combined, 16 + 512, F_NEXT, 1);
    g.desc(DESC, 1, STATUS, 1, F_WRITE, 0);
    g.push(0);
    assert_eq!(g.used(1)[0], (0, 1));
    assert_eq!(g.status(), S_OK);
    assert!(disk.file_bytes(51200, 512) == pattern(3, 51200, 512));
}

#[test]
fn malformed_chains_get_ioerr_or_are_dropped() {
    let disk = Disk::new(DISK, "discard=unmap");
    let _export = disk.export(|_| {});
    let mut g = Guest::connect(&disk.socket(), no_indirect());

    // Short header: 8 bytes.
    g.header(T_IN, 0);
    g.desc(DESC, 0, HDR, 8, F_NEXT, 1);
    g.desc(DESC, 1, DATA, 512, F_NEXT | F_WRITE, 2);
    g.desc(DESC, 2, STATUS, 1, F_WRITE, 0);
    g.push(0);
    assert_eq!(g.used(1)[0], (0, 1));
    assert_eq!(g.status(), S_IOERR, "short header");
    g.still_serving();

    // Read-only status descriptor: no status byte, the chain is returned untouched.
    g.header(T_IN, 0);
    g.desc(DESC, 0, HDR, 16, F_NEXT, 1);
    g.desc(DESC, 1, DATA, 512, F_NEXT | F_WRITE, 2);
    g.desc(DESC, 2, STATUS, 1, 0, 0);
    g.push(0);
    assert_eq!(g.used(1)[0], (0, 0));
    assert_eq!(g.status(), UNTOUCHED, "read-only status");
    g.header(T_FLUSH, 0);
    g.desc(DESC, 0, HDR, 16, F_NEXT, 2);
    g.desc(DESC, 2, STATUS, 1, 0, 0);
    g.push(0);
    assert_eq!(g.used(1)[0], (0, 0));
    assert_eq!(g.status(), UNTOUCHED, "no writable descriptor");
    g.still_serving();

    // Data outside guest memory, and data running off the end of guest memory.
    for (addr, len) in [
        (0x7000_0000u64, 4096u32),
        (2 * REGION - 2048, 4096),
        (u64::MAX - 100, 512),
    ] {
        assert_eq!(
            g.simple(T_IN, 0, addr, len, true),
            (1, S_IOERR),
            "data at {addr:#x}"
        );
        assert_eq!(
            g.simple(T_OUT, 0, addr, len, false),
            (1, S_IOERR),
            "data at {addr:#x}"
        );
    }
    // Status byte outside guest memory: nowhere to report, returned untouched.
    g.header(T_IN, 0);
    g.desc(DESC, 0, HDR, 16, F_NEXT, 1);
    g.desc(DESC, 1, DATA, 512, F_NEXT | F_WRITE, 2);
    g.desc(DESC, 2, 0x7000_0000, 1, F_WRITE, 0);
    g.push(0);
    assert_eq!(g.used(1)[0], (0, 0));
    // Header outside guest memory.
    g.desc(DESC, 0, 0x7000_0000, 16, F_NEXT, 2);
    g.desc(DESC, 2, STATUS, 1, F_WRITE, 0);
    g.mem
        .write_obj(UNTOUCHED, GuestAddress(STATUS))
        .expect("status");
    g.push(0);
    assert_eq!(g.used(1)[0], (0, 1));
    assert_eq!(g.status(), S_IOERR, "header outside guest memory");
    g.still_serving();

    // A descriptor loop: 0 -> 1 -> 0 ...
    g.header(T_IN, 0);
    g.desc(DESC, 0, HDR, 16, F_NEXT, 1);
    g.desc(DESC, 1, DATA, 512, F_NEXT | F_WRITE, 0);
    g.push(0);
    assert_eq!(g.used(1)[0], (0, 0));
    assert_eq!(g.status(), UNTOUCHED, "loop");
    // A next index outside the table.
    g.desc(DESC, 0, HDR, 16, F_NEXT, 200);
    g.push(0);
    assert_eq!(g.used(1)[0], (0, 0));
    // An indirect descriptor without INDIRECT_DESC negotiated.
    g.desc(DESC, 3, 0x4000, 48, F_INDIRECT, 0);
    g.push(3);
    assert_eq!(g.used(1)[0], (3, 0));
    g.still_serving();

    // A head index outside the queue cannot be completed: skipped; the next one is served.
    g.push(999);
    g.still_serving();

    // Sector past the end, across the end, and overflowing.
    let sectors = DISK / 512;
    assert_eq!(
        g.simple(T_IN, sectors, DATA, 512, true),
        (1, S_IOERR),
        "past the end"
    );
    assert_eq!(
        g.simple(T_IN, sectors - 1, DATA, 1024, true),
        (1, S_IOERR),
        "across the end"
    );
    assert_eq!(
        g.simple(T_OUT, u64::MAX, DATA, 512, false),
        (1, S_IOERR),
        "overflow"
    );
    assert_eq!(
        g.simple(T_IN, sectors - 1, DATA, 512, true),
        (513, S_OK),
        "last sector"
    );
    // Data not a multiple of 512 bytes.
    assert_eq!(
        g.simple(T_IN, 0, DATA, 500, true),
        (1, S_IOERR),
        "500 bytes"
    );
    assert_eq!(
        g.simple(T_OUT, 0, DATA, 513, false),
        (1, S_IOERR),
        "513 bytes"
    );

    // Unknown request type; discard with the unmap flag; too many and malformed segments.
    assert_eq!(
        g.simple(99, 0, DATA, 512, true),
        (1, S_UNSUPP),
        "unknown type"
    );
    let seg = zero_discard_segment;
    g.mem
        .write_slice(&seg(0, 8, 1), GuestAddress(DATA))
        .expect("seg");
    assert_eq!(
        g.simple(T_DISCARD, 0, DATA, 16, false),
        (1, S_UNSUPP),
        "discard+unmap"
    );
    g.mem
        .write_slice(&seg(0, 8, 2), GuestAddress(DATA))
        .expect("seg");
    assert_eq!(
        g.simple(T_WRITE_ZEROES, 0, DATA, 16, false),
        (1, S_UNSUPP),
        "unknown flag"
    );
    g.mem
        .write_slice(&seg(sectors - 4, 8, 0), GuestAddress(DATA))
        .expect("seg");
    assert_eq!(
        g.simple(T_WRITE_ZEROES, 0, DATA, 16, false),
        (1, S_IOERR),
        "beyond the end"
    );
    assert_eq!(
        g.simple(T_DISCARD, 0, DATA, 15, false),
        (1, S_IOERR),
        "15-byte segment"
    );
    assert_eq!(
        g.simple(T_DISCARD, 0, DATA, 17 * 16, false),
        (1, S_UNSUPP),
        "17 segments"
    );
    g.mem
        .write_slice(&seg(8, 8, 1), GuestAddress(DATA))
        .expect("seg");
    assert_eq!(
        g.simple(T_WRITE_ZEROES, 0, DATA, 16, false),
        (1, S_OK),
        "valid write-zeroes"
    );
    g.still_serving();

    // GET_VRING_BASE stops the ring after its requests finished; then a new connection.
    let base = g.fe.get_vring_base(0).expect("get_vring_base");
    assert_eq!(base as u16, g.vring.avail_idx);
    drop(g);
    let mut g = Guest::connect(&disk.socket(), all_features());
    // Nested indirect tables are refused.
    g.desc(0x4000, 0, 0x4100, 16, F_INDIRECT, 0);
    g.desc(DESC, 4, 0x4000, 16, F_INDIRECT, 0);
    g.push(4);
    assert_eq!(g.used(1)[0], (4, 0));
    g.still_serving();
}

#[test]
fn writes_to_a_read_only_export_fail() {
    let disk = Disk::new(DISK, "");
    std::fs::write(&disk.image, pattern(8, 0, 4096)).expect("fill");
    let _export = disk.export(|c| c.writable = false);
    let mut g = Guest::connect(&disk.socket(), all_features());
    let features = g.fe.get_features().expect("features");
    assert_ne!(features & (1 << 5), 0, "VIRTIO_BLK_F_RO");
    assert_eq!(features & (1 << 14), 0, "no WRITE_ZEROES");
    assert_eq!(g.simple(T_OUT, 0, DATA, 512, false), (1, S_IOERR));
    let mut seg = [0u8; 16];
    seg[8..12].copy_from_slice(&8u32.to_le_bytes());
    g.mem.write_slice(&seg, GuestAddress(DATA)).expect("seg");
    assert_eq!(g.simple(T_WRITE_ZEROES, 0, DATA, 16, false), (1, S_UNSUPP));
    assert_eq!(g.simple(T_DISCARD, 0, DATA, 16, false), (1, S_UNSUPP));
    assert!(disk.file_bytes(0, 4096) == pattern(8, 0, 4096));
    g.still_serving();
}

#[test]
fn config_space_and_resize_notice() {
    let disk = Disk::new(DISK, "discard=unmap");
    let export = disk.export(|c| {
        c.num_queues = 2;
        c.logical_block_size = 4096;
        c.queue_size = 128;
    });
    let mut g = Guest::connect(&disk.socket(), all_features());
    assert!(
        g.fe.get_queue_num().expect("queue num") >= 64,
        "GET_QUEUE_NUM"
    );
    let proto = g.fe.get_protocol_features().expect("protocol features");
    for f in [
        VhostUserProtocolFeatures::CONFIG,
        VhostUserProtocolFeatures::MQ,
        VhostUserProtocolFeatures::REPLY_ACK,
        VhostUserProtocolFeatures::BACKEND_REQ,
        VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
    ] {
        assert!(proto.contains(f), "{f:?}");
    }
    let read = |g: &mut Guest, offset: u32, size: u32| {
        g.fe.get_config(
            offset,
            size,
            VhostUserConfigFlags::empty(),
            &vec![0u8; size as usize],
        )
        .map(|(_, data)| data)
    };
    let c = read(&mut g, 0, 96).expect("config");
    let u32_at = |o: usize| u32::from_le_bytes(c[o..o + 4].try_into().expect("4"));
    let u16_at = |o: usize| u16::from_le_bytes(c[o..o + 2].try_into().expect("2"));
    assert_eq!(
        u64::from_le_bytes(c[0..8].try_into().expect("8")),
        DISK / 512,
        "capacity"
    );
    assert_eq!(u32_at(12), 126, "seg_max");
    assert_eq!(u32_at(20), 4096, "blk_size");
    assert_eq!(c[32], 1, "wce");
    assert_eq!(u16_at(34), 2, "num_queues");
    assert_eq!(u32_at(40), 16, "max_discard_seg");
    assert_eq!(u32_at(44), 8, "discard_sector_alignment");
    assert_eq!(c[56], 1, "write_zeroes_may_unmap");
    // A window of the config space. (Reads past its end get an empty, failed reply, which
    // vhost's Frontend cannot receive; the clipping is unit-tested in config.rs.)
    assert_eq!(read(&mut g, 32, 4).expect("window"), c[32..36].to_vec());
    assert_eq!(read(&mut g, 80, 16).expect("tail"), c[80..96].to_vec());
    // The guest may toggle wce.
    g.fe.set_config(32, VhostUserConfigFlags::WRITABLE, &[0])
        .expect("wce=0");
    assert_eq!(read(&mut g, 32, 1).expect("wce"), vec![0]);
    g.fe.set_config(32, VhostUserConfigFlags::WRITABLE, &[1])
        .expect("wce=1");
    assert_eq!(read(&mut g, 32, 1).expect("wce"), vec![1]);
    // Requests not aligned to the 4 KiB logical block size fail.
    assert_eq!(g.simple(T_IN, 1, DATA, 4096, true), (1, S_IOERR));
    assert_eq!(g.simple(T_IN, 8, DATA, 512, true), (1, S_IOERR));
    assert_eq!(g.simple(T_IN, 8, DATA, 4096, true), (4097, S_OK));

    // Without a backend channel, no notice can be sent.
    assert!(!export.notify_resize());
    let (ours, theirs) = UnixStream::pair().expect("pair");
    g.fe.set_backend_request_fd(&theirs)
        .expect("backend channel");
    assert!(export.notify_resize());
    let mut msg = [0u8; 12];
    use std::io::Read;
    (&ours).read_exact(&mut msg).expect("config change message");
    assert_eq!(
        u32::from_le_bytes(msg[0..4].try_into().expect("4")),
        2,
        "CONFIG_CHANGE_MSG"
    );
    assert_eq!(
        u32::from_le_bytes(msg[8..12].try_into().expect("4")),
        0,
        "no payload"
    );
    g.still_serving();

    // Nothing else in the config space is writable. The refusal is a failed reply, after
    // which vhost-user-backend drops the connection; the export takes the next one.
    let bad: [(u32, &[u8]); 3] = [(0, &[0; 8]), (32, &[0, 0]), (32, &[7])];
    for (offset, bytes) in bad {
        assert!(g
            .fe
            .set_config(offset, VhostUserConfigFlags::WRITABLE, bytes)
            .is_err());
        drop(g);
        g = Guest::connect(&disk.socket(), all_features());
    }
    g.still_serving();
}

/// Queues `n` writes of `len` bytes (through indirect tables) without waiting for them.
fn queue_writes(g: &mut Guest, n: u16, len: u32) {
    for i in 0..n {
        let table = 0x4000 + u64::from(i) * 0x100;
        let hdr = 0x8000 + u64::from(i) * 0x20;
        let status = 0x8010 + u64::from(i) * 0x20;
        let h = blk_header(T_OUT, u64::from(i) * u64::from(len) / 512);
        g.mem.write_slice(&h, GuestAddress(hdr)).expect("header");
        g.mem
            .write_obj(UNTOUCHED, GuestAddress(status))
            .expect("status");
        g.desc(table, 0, hdr, 16, F_NEXT, 1);
        g.desc(table, 1, DATA, len, F_NEXT, 2);
        g.desc(table, 2, status, 1, F_WRITE, 0);
        g.desc(DESC, i, table, 48, F_INDIRECT, 0);
        g.push(i);
    }
}

/// Waits until the device took all `n` requests (with EVENT_IDX it then sets avail_event to
/// its next available index) and returns how many were complete at that moment.
fn wait_taken(g: &Guest, n: u16) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(10);
    let avail_event = GuestAddress(USED + 4 + 8 * u64::from(QSIZE));
    loop {
        let seen: u16 = g
            .mem
            .load(avail_event, Ordering::Acquire)
            .expect("avail_event");
        if seen == n {
            return used_idx(g);
        }
        assert!(
            Instant::now() < deadline,
            "device did not take the requests"
        );
        std::hint::spin_loop();
    }
}

fn used_idx(g: &Guest) -> u16 {
    g.vring.used_idx(&g.mem)
}

#[test]
fn requests_drain_before_get_vring_base_and_memory_changes() {
    let disk = Disk::new(DISK, "");
    // Writethrough: every write waits for fdatasync, so requests are still in flight when the
    // frontend stops the ring.
    let _export = disk.export(|c| c.writethrough = true);
    let mut g = Guest::connect(&disk.socket(), all_features());
    let data = pattern(21, 0, 512 * 1024);
    g.mem.write_slice(&data, GuestAddress(DATA)).expect("data");
    queue_writes(&mut g, QSIZE, 512 * 1024);
    let done_before_stop = wait_taken(&g, QSIZE);
    let base = g.fe.get_vring_base(0).expect("get_vring_base");
    assert_eq!(base as u16, QSIZE);
    // Everything the ring had taken is complete in the used ring when GET_VRING_BASE answers.
    assert_eq!(
        used_idx(&g),
        QSIZE,
        "used index when GET_VRING_BASE answered"
    );
    drop(g);

    // A memory table change waits for the requests using the old table.
    let mut g = Guest::connect(&disk.socket(), all_features());
    g.mem.write_slice(&data, GuestAddress(DATA)).expect("data");
    queue_writes(&mut g, QSIZE, 512 * 1024);
    let done_before_table = wait_taken(&g, QSIZE);
    g.fe.set_mem_table(&region_infos(&g.mem))
        .expect("set_mem_table");
    assert_eq!(
        used_idx(&g),
        QSIZE,
        "used index when SET_MEM_TABLE answered"
    );
    let done = g.used(QSIZE);
    assert!(done.iter().all(|&(_, len)| len == 1));
    for i in 0..u64::from(QSIZE) {
        let st: u8 = g
            .mem
            .read_obj(GuestAddress(0x8010 + i * 0x20))
            .expect("status");
        assert_eq!(st, S_OK, "write {i}");
    }
    assert!(disk.file_bytes(0, data.len()) == data);
    // Not asserted (timing), but shows the drains had something to wait for.
    eprintln!(
        "complete when the ring was stopped: {done_before_stop}/{QSIZE}; when the memory \
         table changed: {done_before_table}/{QSIZE}"
    );
}

#[test]
fn any_of_the_offered_queues_can_be_used() {
    // QEMU gives the device one queue per vCPU by default, whatever the export's num-queues:
    // queues beyond it are shared by the export's workers.
    let disk = Disk::new(DISK, "");
    for (threads, queue) in [(1u16, 5usize), (2, 5), (2, 63)] {
        let _export = disk.export(|c| c.num_queues = threads);
        let mut g = Guest::connect_queue(&disk.socket(), all_features(), queue);
        assert!(g.fe.get_queue_num().expect("queue num") > queue as u64);
        let data = pattern(queue as u64, 0, 4096);
        g.mem.write_slice(&data, GuestAddress(DATA)).expect("data");
        assert_eq!(g.simple(T_OUT, 0, DATA, 4096, false), (1, S_OK));
        g.still_serving();
        assert!(disk.file_bytes(0, 4096) == data);
    }
}
