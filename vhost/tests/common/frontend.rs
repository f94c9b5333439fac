//! A hand-built vhost-user frontend: memfd-backed "guest" memory, the vhost-user negotiation
//! (through vhost's `Frontend`) and split virtqueues whose descriptors, available ring and used
//! ring the test writes and reads itself, so that it can send any chain, valid or not.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Where a virtqueue's rings lie, relative to its base address.
pub const DESC: u64 = 0x0;
pub const AVAIL: u64 = 0x1000;
pub const USED: u64 = 0x2000;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
/// What status bytes and buffers hold before the device writes them.
pub const UNTOUCHED: u8 = 0xAA;

/// VIRTIO_RING_F_EVENT_IDX and VIRTIO_RING_F_INDIRECT_DESC.
pub const FEATURE_EVENT_IDX: u64 = 1 << 29;
pub const FEATURE_INDIRECT: u64 = 1 << 28;

/// How long a reply from the daemon may take before the test fails instead of hanging.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// An anonymous memory file of `len` bytes.
pub fn memfd(len: u64) -> File {
    // SAFETY: memfd_create takes a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"guest".as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: `fd` is a fresh descriptor we own.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).expect("size memfd");
    f
}

/// Guest memory made of one memfd per `(guest physical address, length)`.
pub fn guest_memory(regions: &[(u64, u64)]) -> GuestMemoryMmap {
    let ranges: Vec<_> = regions
        .iter()
        .map(|&(gpa, len)| {
            (
                GuestAddress(gpa),
                len as usize,
                Some(FileOffset::new(memfd(len), 0)),
            )
        })
        .collect();
    GuestMemoryMmap::<()>::from_ranges_with_files(&ranges).expect("guest memory")
}

/// The memory table describing `mem`, as SET_MEM_TABLE sends it.
pub fn region_infos(mem: &GuestMemoryMmap) -> Vec<VhostUserMemoryRegionInfo> {
    mem.iter()
        .map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).expect("region info"))
        .collect()
}

/// A frontend connection with REPLY_ACK on every message, whose reads time out so that a
/// wedged daemon fails the test.
pub fn frontend(socket: &Path) -> Frontend {
    let sock = UnixStream::connect(socket).expect("connect");
    sock.set_read_timeout(Some(REPLY_TIMEOUT))
        .expect("read timeout");
    let fe = Frontend::from_stream(sock, 64);
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe
}

/// Connects and negotiates: SET_OWNER, the offered features masked by `features_mask`, every
/// protocol feature offered. Returns the frontend and the features set.
pub fn negotiate(socket: &Path, features_mask: u64) -> (Frontend, u64) {
    let mut fe = frontend(socket);
    fe.set_owner().expect("set_owner");
    let features = fe.get_features().expect("get_features") & features_mask;
    fe.set_features(features).expect("set_features");
    let proto = fe.get_protocol_features().expect("protocol features");
    fe.set_protocol_features(proto)
        .expect("set protocol features");
    (fe, features)
}

/// [`negotiate`]s, then gives the backend `mem` as the guest's memory table. Returns the
/// frontend and the features set.
pub fn negotiate_with_memory(
    socket: &Path,
    features_mask: u64,
    mem: &GuestMemoryMmap,
) -> (Frontend, u64) {
    let (fe, features) = negotiate(socket, features_mask);
    fe.set_mem_table(&region_infos(mem)).expect("set_mem_table");
    (fe, features)
}

/// One split virtqueue of the guest: where its rings are, its eventfds and its indices.
pub struct Vring {
    /// Guest physical address of the descriptor table; the rings follow at AVAIL and USED.
    pub base: u64,
    pub size: u16,
    pub kick: EventFd,
    pub call: EventFd,
    pub avail_idx: u16,
    pub used_seen: u16,
}

impl Vring {
    /// Sets up and enables virtqueue `index` of `size` entries with its rings at `base`.
    pub fn setup(
        fe: &mut Frontend,
        mem: &GuestMemoryMmap,
        index: usize,
        base: u64,
        size: u16,
    ) -> Vring {
        Self::setup_at(fe, mem, index, base, size, 0)
    }

    /// As [`Vring::setup`], with the rings' indices at `next` (SET_VRING_BASE), as a
    /// frontend does when it reconnects.
    pub fn setup_at(
        fe: &mut Frontend,
        mem: &GuestMemoryMmap,
        index: usize,
        base: u64,
        size: u16,
        next: u16,
    ) -> Vring {
        let va = |gpa: u64| mem.get_host_address(GuestAddress(base + gpa)).expect("va") as u64;
        fe.set_vring_num(index, size).expect("vring num");
        fe.set_vring_addr(
            index,
            &VringConfigData {
                queue_max_size: size,
                queue_size: size,
                flags: 0,
                desc_table_addr: va(DESC),
                used_ring_addr: va(USED),
                avail_ring_addr: va(AVAIL),
                log_addr: None,
            },
        )
        .expect("vring addr");
        fe.set_vring_base(index, next).expect("vring base");
        let q = Vring {
            base,
            size,
            kick: EventFd::new(0).expect("eventfd"),
            call: EventFd::new(0).expect("eventfd"),
            avail_idx: next,
            used_seen: next,
        };
        fe.set_vring_call(index, &q.call).expect("call");
        fe.set_vring_kick(index, &q.kick).expect("kick");
        fe.set_vring_enable(index, true).expect("enable");
        q
    }

    /// Writes descriptor `index` of the table at guest address `table`.
    #[allow(
        clippy::too_many_arguments,
        reason = "a descriptor's fields, in their order"
    )]
    pub fn write_desc(
        mem: &GuestMemoryMmap,
        table: u64,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = GuestAddress(table + 16 * u64::from(index));
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&raw, at).expect("write desc");
    }

    /// Writes descriptor `index` of this queue's own table.
    pub fn desc(
        &self,
        mem: &GuestMemoryMmap,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        Self::write_desc(mem, self.base + DESC, index, addr, len, flags, next);
    }

    /// Stores the available index as is and kicks.
    pub fn set_avail_idx(&mut self, mem: &GuestMemoryMmap, idx: u16) {
        self.avail_idx = idx;
        mem.store(
            idx.to_le(),
            GuestAddress(self.base + AVAIL + 2),
            Ordering::Release,
        )
        .expect("avail idx");
        self.kick.write(1).expect("kick");
    }

    /// Makes `head` available and kicks.
    pub fn push(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head.to_le(), GuestAddress(self.base + AVAIL + 4 + 2 * slot))
            .expect("avail ring");
        self.set_avail_idx(mem, self.avail_idx.wrapping_add(1));
    }

    /// The device's used index.
    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.load(GuestAddress(self.base + USED + 2), Ordering::Acquire)
            .expect("used idx")
    }

    /// Waits for the next used entry: (descriptor id, length); None after `timeout`.
    pub fn next_used(&mut self, mem: &GuestMemoryMmap, timeout: Duration) -> Option<(u32, u32)> {
        let deadline = Instant::now() + timeout;
        while self.used_idx(mem) == self.used_seen {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let at = self.base + USED + 4 + 8 * u64::from(self.used_seen % self.size);
        self.used_seen = self.used_seen.wrapping_add(1);
        let id: u32 = mem.read_obj(GuestAddress(at)).expect("used id");
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).expect("used len");
        Some((id, len))
    }

    /// Waits for the next `n` used entries, failing the test after REPLY_TIMEOUT.
    pub fn used(&mut self, mem: &GuestMemoryMmap, n: u16) -> Vec<(u32, u32)> {
        (0..n)
            .map(|_| {
                self.next_used(mem, REPLY_TIMEOUT)
                    .expect("timed out waiting for used entries")
            })
            .collect()
    }
}

/// A virtio-blk request header for `typ` at `sector`.
pub fn blk_header(typ: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&typ.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// Writes a request header for `typ` at `sector` to guest address `hdr`, and UNTOUCHED to
/// the status byte at `status`, so that the test sees whether the device wrote one.
pub fn write_header(mem: &GuestMemoryMmap, hdr: u64, status: u64, typ: u32, sector: u64) {
    mem.write_slice(&blk_header(typ, sector), GuestAddress(hdr))
        .expect("header");
    mem.write_obj(UNTOUCHED, GuestAddress(status))
        .expect("status");
}

/// A discard / write-zeroes segment.
pub fn zero_discard_segment(sector: u64, num: u32, flags: u32) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&num.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    s
}
