//! Parsing: a walked descriptor chain in guest memory becomes a typed request, or is refused.
//!
//! The request is laid out as VIRTIO 1.x says, without assuming any descriptor arrangement: the
//! device-readable part starts with the 16-byte header, the device-writable part ends with the
//! status byte, and the data is what lies between. The header and the discard / write-zeroes
//! segments are read out of guest memory as little-endian `#[repr(C)]` structs; data buffers
//! are not copied but resolved into pointers to guest memory, split where they cross a region
//! boundary. Every range is checked by vm-memory before use.

use std::ptr::NonNull;

use strata_backend::io::iovec;
use strata_backend::IoVec;
use virtio_bindings::virtio_blk::*;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend, VolatileMemory};

use super::error::SegmentError;
use super::{ChainError, Desc, Op, Outcome, Parsed, Refusal, Segment, StatusByte};
use crate::device_config::{DeviceConfig, MAX_ZERO_DISCARD_SEG};
use crate::regions::RegionCache;

const SECTOR: u64 = 512;

/// The virtio-blk request header (`struct virtio_blk_outhdr`), little-endian in guest memory.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct RequestHeader {
    /// The request type (`VIRTIO_BLK_T_*`).
    request_type: u32,
    /// I/O priority class and level.
    #[allow(
        dead_code,
        reason = "part of the layout; strata does not prioritise requests"
    )]
    ioprio: u32,
    /// First 512-byte sector of a read or write.
    sector: u64,
}

// SAFETY: plain old data: three integers with no padding between or after them (4 + 4 + 8
// bytes, 8-byte aligned), so every bit pattern is a valid value.
unsafe impl ByteValued for RequestHeader {}

impl RequestHeader {
    fn request_type(&self) -> RequestType {
        RequestType::from(u32::from_le(self.request_type))
    }

    fn sector(&self) -> u64 {
        u64::from_le(self.sector)
    }
}

/// One segment of a discard or write-zeroes request (`struct virtio_blk_discard_write_zeroes`),
/// little-endian in guest memory.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct DiscardWriteZeroes {
    /// First 512-byte sector.
    sector: u64,
    /// Length in 512-byte sectors.
    num_sectors: u32,
    /// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP` or nothing.
    flags: u32,
}

// SAFETY: plain old data: three integers with no padding between or after them (8 + 4 + 4
// bytes, 8-byte aligned), so every bit pattern is a valid value.
unsafe impl ByteValued for DiscardWriteZeroes {}

impl DiscardWriteZeroes {
    fn sector(&self) -> u64 {
        u64::from_le(self.sector)
    }

    fn num_sectors(&self) -> u32 {
        u32::from_le(self.num_sectors)
    }

    fn flags(&self) -> u32 {
        u32::from_le(self.flags)
    }
}

/// The type of a request, from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(value: u32) -> Self {
        match value {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            VIRTIO_BLK_T_DISCARD => RequestType::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
            other => RequestType::Unsupported(other),
        }
    }
}

impl RequestType {
    /// The request's name in messages.
    pub(crate) fn name(self) -> &'static str {
        match self {
            RequestType::In => "read",
            RequestType::Out => "write",
            RequestType::Flush => "flush",
            RequestType::GetId => "get-id",
            RequestType::Discard => "discard",
            RequestType::WriteZeroes => "write-zeroes",
            RequestType::Unsupported(_) => "unsupported request",
        }
    }
}

/// A byte range of guest memory (guest physical address, length).
type Piece = (u64, u64);

/// What parsing one request makes: the operation and the bytes of device-writable data it
/// fills on success.
type Request = Result<(Op, u32), Refusal>;

/// Turns a descriptor chain into a request, validating layout, sizes, ranges and memory.
/// A read or write takes `spare` (an empty vector, recycled from an earlier request) for its
/// buffers.
pub(crate) fn parse(
    regions: &mut RegionCache<'_>,
    descs: &[Desc],
    cfg: &DeviceConfig,
    spare: &mut Vec<IoVec<'static>>,
) -> Outcome {
    // Device-readable descriptors first, then device-writable ones.
    let first_w = descs.iter().position(|d| d.writable).unwrap_or(descs.len());
    if descs[first_w..].iter().any(|d| !d.writable) {
        return Outcome::Drop(ChainError::ReadableAfterWritable);
    }
    let Some(last_w) = descs[first_w..].iter().rposition(|d| d.len > 0) else {
        return Outcome::Drop(ChainError::NoStatusByte);
    };
    let last_w = first_w + last_w;
    let status_desc = descs[last_w];
    let Some(status) = status_desc
        .addr
        .checked_add(u64::from(status_desc.len) - 1)
        .and_then(|a| regions.slice(GuestAddress(a), 1))
        .and_then(|byte| NonNull::new(byte.ptr_guard_mut().as_ptr()))
        .map(StatusByte)
    else {
        return Outcome::Drop(ChainError::StatusOutsideMemory);
    };

    // The readable stream: header, then data.
    let mut readable = Stream::new(descs[..first_w].iter().map(|d| (d.addr, u64::from(d.len))));
    let Some(header) = readable.read_next::<RequestHeader>(regions) else {
        return Outcome::Refused(status, Refusal::HeaderUnreadable, None);
    };
    // The writable stream: data, then the status byte.
    let in_data = descs[first_w..=last_w]
        .iter()
        .enumerate()
        .filter_map(|(i, d)| {
            let len = u64::from(d.len) - u64::from(first_w + i == last_w);
            (len > 0).then_some((d.addr, len))
        });

    let request_type = header.request_type();
    let request = match request_type {
        RequestType::In => read_write(regions, cfg, false, header.sector(), in_data, spare),
        RequestType::Out => {
            let out_data = readable.into_pieces();
            read_write(regions, cfg, true, header.sector(), out_data, spare)
        }
        RequestType::Flush => Ok((Op::Flush, 0)),
        RequestType::GetId => get_id(regions, in_data),
        kind @ (RequestType::Discard | RequestType::WriteZeroes) => {
            discard_or_write_zeroes(regions, cfg, kind, readable)
        }
        RequestType::Unsupported(other) => Err(Refusal::Unsupported(other)),
    };
    match request {
        Ok((op, in_len)) => Outcome::Request(Parsed { op, status, in_len }),
        Err(why) => Outcome::Refused(status, why, Some(request_type)),
    }
}

/// A read into the device-writable `data` (`write` false) or a write from the device-readable
/// `data`, at `sector`; the buffers go into `spare`'s allocation.
fn read_write(
    regions: &mut RegionCache<'_>,
    cfg: &DeviceConfig,
    write: bool,
    sector: u64,
    data: impl Iterator<Item = Piece>,
    spare: &mut Vec<IoVec<'static>>,
) -> Request {
    if write && !cfg.writable {
        return Err(Refusal::ReadOnly);
    }
    let mut iov = std::mem::take(spare);
    iov.clear();
    // The limits the device advertises, enforced: a driver that ignores them gets an error,
    // not a request larger than the device said it would take.
    let mut segments = 0u32;
    let mut longest = 0u64;
    let data = data.inspect(|&(_, len)| {
        segments += u32::from(len > 0);
        longest = longest.max(len);
    });
    let len = to_iovecs(regions, data, &mut iov);
    if segments > cfg.seg_max {
        return Err(Refusal::TooManySegments {
            count: segments,
            max: cfg.seg_max,
        });
    }
    if cfg.size_max != 0 && longest > u64::from(cfg.size_max) {
        return Err(Refusal::SegmentTooLong {
            len: longest,
            max: cfg.size_max,
        });
    }
    let len = len.ok_or(Refusal::DataOutsideMemory)?;
    let offset = check_range(cfg, sector, len)?;
    if write {
        return Ok((Op::Write { offset, len, iov }, 0));
    }
    // len <= u32::MAX: a chain's descriptors are u32 and the sum was checked below the
    // capacity, but a chain may still be longer than 4 GiB in theory.
    let in_len = u32::try_from(len).map_err(|_| Refusal::TooLong)?;
    Ok((Op::Read { offset, len, iov }, in_len))
}

/// A GET_ID request: the serial goes into the device-writable `data`.
fn get_id(regions: &mut RegionCache<'_>, data: impl Iterator<Item = Piece>) -> Request {
    let mut iov = Vec::new();
    let len = to_iovecs(regions, data, &mut iov).ok_or(Refusal::GetIdOutsideMemory)?;
    let n = len.min(VIRTIO_BLK_ID_BYTES.into());
    let iov = iovec::sub_iov(&iov, 0, n as usize);
    Ok((Op::GetId { iov }, n as u32))
}

/// A discard or write-zeroes request (`kind`) whose segments are the rest of `readable`.
fn discard_or_write_zeroes<I>(
    regions: &mut RegionCache<'_>,
    cfg: &DeviceConfig,
    kind: RequestType,
    readable: Stream<I>,
) -> Request
where
    I: Iterator<Item = Piece> + Clone,
{
    let discard = kind == RequestType::Discard;
    let (offered, max_sectors) = if discard {
        (cfg.discard, cfg.max_discard_sectors)
    } else {
        (cfg.write_zeroes, cfg.max_write_zeroes_sectors)
    };
    if !offered {
        return Err(Refusal::NotOffered(kind));
    }
    let segs = read_segments(regions, readable, cfg, discard, max_sectors)
        .map_err(|e| Refusal::BadSegments(kind, e))?;
    let op = if discard {
        Op::Discard(segs)
    } else {
        Op::WriteZeroes(segs)
    };
    Ok((op, 0))
}

/// A byte stream that lies in guest memory as a sequence of pieces, read from the front.
#[derive(Clone)]
struct Stream<I> {
    /// The unread part of the piece being read.
    current: Option<Piece>,
    /// The pieces after it.
    rest: I,
}

impl<I: Iterator<Item = Piece>> Stream<I> {
    fn new(pieces: I) -> Self {
        Stream {
            current: None,
            rest: pieces,
        }
    }

    /// Reads the next `T` (which may span pieces and memory regions); None when the stream
    /// ends first or a byte is not in guest memory.
    fn read_next<T: ByteValued>(&mut self, regions: &mut RegionCache<'_>) -> Option<T> {
        let size = std::mem::size_of::<T>();
        let (addr, len) = match self.current.take() {
            Some(piece) => piece,
            None => self.rest.next()?,
        };
        // The usual case (a request header): the next piece holds the whole value, aligned for
        // it, in one region: one volatile load instead of a byte copy.
        if len >= size as u64 {
            let whole = regions
                .slice(GuestAddress(addr), size)
                .and_then(|slice| slice.get_ref::<T>(0).ok().map(|r| r.load()));
            if let Some(value) = whole {
                if len > size as u64 {
                    self.current = Some((addr.checked_add(size as u64)?, len - size as u64));
                }
                return Some(value);
            }
        }
        self.current = Some((addr, len));
        let mut value = T::zeroed();
        let bytes = value.as_mut_slice();
        let mut filled = 0usize;
        while filled < bytes.len() {
            let (addr, len) = match self.current.take() {
                Some(piece) => piece,
                None => self.rest.next()?,
            };
            let n = (bytes.len() - filled).min(usize::try_from(len).unwrap_or(usize::MAX));
            if n == 0 {
                continue;
            }
            let dst = &mut bytes[filled..filled + n];
            // One region (the usual case): a plain copy; else vm-memory's read, which splits
            // it at region boundaries.
            match regions.slice(GuestAddress(addr), n) {
                Some(slice) => {
                    slice.copy_to(dst);
                }
                None => regions.mem().read_slice(dst, GuestAddress(addr)).ok()?,
            }
            filled += n;
            if (n as u64) < len {
                self.current = Some((addr.checked_add(n as u64)?, len - n as u64));
            }
        }
        Some(value)
    }

    /// The unread rest of the stream.
    fn into_pieces(self) -> impl Iterator<Item = Piece> {
        self.current.into_iter().chain(self.rest)
    }
}

/// Appends IoVecs covering the pieces (split at guest memory region boundaries) and returns
/// the total length, or None if any byte lies outside guest memory.
fn to_iovecs(
    regions: &mut RegionCache<'_>,
    pieces: impl Iterator<Item = Piece>,
    out: &mut Vec<IoVec<'static>>,
) -> Option<u64> {
    let mut total = 0u64;
    for (addr, len) in pieces {
        let len = usize::try_from(len).ok()?;
        if len == 0 {
            continue;
        }
        // Fast path: the buffer lies in one region (get_slice checks the whole range).
        if let Some(slice) = regions.slice(GuestAddress(addr), len) {
            out.push(iovec_of(&slice));
            total += slice.len() as u64;
            continue;
        }
        for slice in GuestMemoryBackend::get_slices(regions.mem(), GuestAddress(addr), len) {
            let slice = slice.ok()?;
            out.push(iovec_of(&slice));
            total += slice.len() as u64;
        }
    }
    Some(total)
}

/// An IoVec over a slice of guest memory.
fn iovec_of(slice: &vm_memory::VolatileSlice<'_, ()>) -> IoVec<'static> {
    let ptr = slice.ptr_guard_mut().as_ptr();
    // The guest may change these bytes concurrently, as with any DMA buffer; they are plain
    // bytes with no validity invariant.
    // SAFETY: the slice lies inside one mapped guest region (vm-memory checked it), and each
    // request task owns an Arc of this GuestMemoryMmap until its I/O (including any in-flight
    // io_uring operation, which waits for the kernel on drop) has finished.
    unsafe { IoVec::from_raw_parts(ptr, slice.len()) }
}

/// Checks a data request's sector and length against the block size and the capacity, and
/// returns its byte offset.
fn check_range(cfg: &DeviceConfig, sector: u64, len: u64) -> Result<u64, Refusal> {
    let block_size = u64::from(cfg.logical_block_size);
    let offset = sector
        .checked_mul(SECTOR)
        .ok_or(Refusal::SectorOutOfRange { sector })?;
    if offset % block_size != 0 || len % block_size != 0 {
        return Err(Refusal::Unaligned {
            len,
            sector,
            block_size,
        });
    }
    let capacity = cfg.capacity_sectors() * SECTOR;
    match offset.checked_add(len) {
        Some(end) if end <= capacity => Ok(offset),
        _ => Err(Refusal::BeyondEnd {
            len,
            sector,
            capacity,
        }),
    }
}

/// Reads and checks the segments of a discard / write-zeroes request, the rest of `data`.
fn read_segments<I>(
    regions: &mut RegionCache<'_>,
    mut data: Stream<I>,
    cfg: &DeviceConfig,
    discard: bool,
    max_sectors: u32,
) -> Result<Vec<Segment>, SegmentError>
where
    I: Iterator<Item = Piece> + Clone,
{
    let seg_len = std::mem::size_of::<DiscardWriteZeroes>() as u64;
    let total: u64 = data.clone().into_pieces().map(|(_, len)| len).sum();
    if total == 0 || total % seg_len != 0 {
        return Err(SegmentError::Length { bytes: total });
    }
    let count = total / seg_len;
    if count > u64::from(MAX_ZERO_DISCARD_SEG) {
        return Err(SegmentError::TooMany { count });
    }
    // All of them are read before any is checked: data outside guest memory is reported
    // before a bad segment.
    let mut raw = [DiscardWriteZeroes::default(); MAX_ZERO_DISCARD_SEG as usize];
    let raw = &mut raw[..count as usize];
    for seg in raw.iter_mut() {
        *seg = data.read_next(regions).ok_or(SegmentError::OutsideMemory)?;
    }
    let lbs_sectors = u64::from(cfg.logical_block_size) / SECTOR;
    let capacity = cfg.capacity_sectors();
    raw.iter()
        .map(|s| check_segment(s, discard, max_sectors, lbs_sectors, capacity))
        .collect()
}

/// Checks one segment against the request type, the limits and the disk.
fn check_segment(
    s: &DiscardWriteZeroes,
    discard: bool,
    max_sectors: u32,
    lbs_sectors: u64,
    capacity_sectors: u64,
) -> Result<Segment, SegmentError> {
    let (sector, sectors, flags) = (s.sector(), s.num_sectors(), s.flags());
    let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
    if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 {
        return Err(SegmentError::UnknownFlags { flags });
    }
    if discard && unmap {
        return Err(SegmentError::UnmapNotAllowed);
    }
    if sectors > max_sectors {
        return Err(SegmentError::TooManySectors {
            sectors,
            max: max_sectors,
        });
    }
    if sector % lbs_sectors != 0 || u64::from(sectors) % lbs_sectors != 0 {
        return Err(SegmentError::Unaligned { sectors, sector });
    }
    match sector.checked_add(u64::from(sectors)) {
        Some(end) if end <= capacity_sectors => Ok(Segment {
            offset: sector * SECTOR,
            len: u64::from(sectors) * SECTOR,
            unmap,
        }),
        _ => Err(SegmentError::BeyondEnd { sectors, sector }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export_config::BlkExportConfig;
    use crate::request::{walk_chain, DescTable, S_IOERR, S_UNSUPP};
    use std::mem::{offset_of, size_of};
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use vm_memory::GuestMemoryMmap;

    /// Guest memory: two adjacent regions, so buffers can cross a region boundary.
    const REGION: u64 = 0x10000;
    const END: u64 = 2 * REGION;
    const TABLE: u64 = 0x0;
    const QSIZE: u16 = 16;
    const INDIRECT: u64 = 0x1000;
    const HDR: u64 = 0x2000;
    const STATUS: u64 = 0x3000;
    const DATA: u64 = 0x4000;
    const OUTSIDE: u64 = 0x7000_0000;
    const DISK: u64 = 1 << 20;
    const DISK_SECTORS: u64 = DISK / 512;

    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    const INDIRECT_F: u16 = VRING_DESC_F_INDIRECT as u16;
    /// Device-readable / device-writable, for [`Guest::chain`].
    const R: bool = false;
    const W: bool = true;

    struct Guest {
        mem: GuestMemoryMmap,
    }

    impl Guest {
        fn new() -> Guest {
            Self::with_ranges(&[
                (GuestAddress(0), REGION as usize),
                (GuestAddress(REGION), REGION as usize),
            ])
        }

        fn with_ranges(ranges: &[(GuestAddress, usize)]) -> Guest {
            Guest {
                mem: GuestMemoryMmap::from_ranges(ranges).expect("anonymous test mappings"),
            }
        }

        /// Writes descriptor `index` of the table at `table`.
        fn desc(&self, table: u64, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            let at = GuestAddress(table + 16 * u64::from(index));
            self.mem
                .write_slice(&raw, at)
                .expect("descriptor in memory");
        }

        /// Writes the buffers as the chain of descriptors 0, 1, ... of the table at `table`.
        fn chain(&self, table: u64, bufs: &[(u64, u32, bool)]) {
            for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
                let index = i as u16;
                let mut flags = if writable { WRITE } else { 0 };
                if i + 1 < bufs.len() {
                    flags |= NEXT;
                }
                self.desc(table, index, addr, len, flags, index + 1);
            }
        }

        fn write(&self, at: u64, bytes: &[u8]) {
            self.mem
                .write_slice(bytes, GuestAddress(at))
                .expect("in memory");
        }

        /// Writes a request header at `at`.
        fn header(&self, at: u64, request_type: u32, sector: u64) {
            self.write(at, &header_bytes(request_type, sector));
        }

        /// Host address of guest address `gpa`.
        fn host(&self, gpa: u64) -> usize {
            self.mem
                .get_host_address(GuestAddress(gpa))
                .expect("in memory") as usize
        }

        /// Walks the chain at `head` of the queue's table and parses it.
        fn parse_head(&self, cfg: &DeviceConfig, head: u16, indirect_ok: bool) -> Outcome {
            let table = DescTable {
                addr: GuestAddress(TABLE),
                size: QSIZE,
            };
            self.parse_in(cfg, table, head, indirect_ok)
        }

        fn parse_in(
            &self,
            cfg: &DeviceConfig,
            table: DescTable,
            head: u16,
            indirect_ok: bool,
        ) -> Outcome {
            let mut regions = RegionCache::new(&self.mem);
            let mut descs = Vec::new();
            let view = table.view(&mut regions);
            if let Err(e) = walk_chain(&mut regions, &view, head, indirect_ok, &mut descs) {
                return Outcome::Drop(e);
            }
            parse(&mut regions, &descs, cfg, &mut Vec::new())
        }

        /// Writes `bufs` as the chain at descriptor 0 and parses it.
        fn request(&self, cfg: &DeviceConfig, bufs: &[(u64, u32, bool)]) -> Outcome {
            self.chain(TABLE, bufs);
            self.parse_head(cfg, 0, true)
        }

        /// A request of `request_type` at `sector`: header, data `(addr, len)`, status byte.
        fn simple(
            &self,
            cfg: &DeviceConfig,
            request_type: u32,
            sector: u64,
            data: (u64, u32),
        ) -> Outcome {
            self.header(HDR, request_type, sector);
            let device_writes = matches!(request_type, VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID);
            let data_dir = if device_writes { W } else { R };
            self.request(
                cfg,
                &[(HDR, 16, R), (data.0, data.1, data_dir), (STATUS, 1, W)],
            )
        }
    }

    fn header_bytes(request_type: u32, sector: u64) -> [u8; 16] {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&request_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        h
    }

    fn segment_bytes(sector: u64, sectors: u32, flags: u32) -> [u8; 16] {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&sectors.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        s
    }

    /// The device of a `size`-byte null-co node with `logical_block_size`; discard is offered
    /// when writable.
    fn config_with(writable: bool, logical_block_size: u32, size: u64) -> DeviceConfig {
        let opts = strata_backend::Options::parse(&format!("driver=null-co,size={size}"), None)
            .expect("options");
        let node = strata_backend::Graph::new().open(opts).expect("node");
        let mut c = BlkExportConfig::new("t", node);
        c.writable = writable;
        c.logical_block_size = logical_block_size;
        let mut d = DeviceConfig::new(&c).expect("config");
        d.discard = writable;
        d
    }

    fn config() -> DeviceConfig {
        config_with(true, 512, DISK)
    }

    fn request(o: Outcome) -> Parsed {
        match o {
            Outcome::Request(p) => p,
            other => panic!("not a request: {other:?}"),
        }
    }

    fn refusal(o: Outcome) -> Refusal {
        match o {
            Outcome::Refused(_, why, _) => why,
            other => panic!("not refused: {other:?}"),
        }
    }

    fn dropped(o: Outcome) -> ChainError {
        match o {
            Outcome::Drop(why) => why,
            other => panic!("not dropped: {other:?}"),
        }
    }

    /// The buffers of an operation, as (host address, length).
    fn bufs(iov: &[IoVec<'_>]) -> Vec<(usize, usize)> {
        iov.iter().map(|v| (v.as_ptr() as usize, v.len())).collect()
    }

    fn status_at(g: &Guest, status: StatusByte, gpa: u64) {
        assert_eq!(status.0.as_ptr() as usize, g.host(gpa), "status byte");
    }

    #[test]
    fn structs_match_the_virtio_abi() {
        use virtio_bindings::virtio_blk::{virtio_blk_discard_write_zeroes, virtio_blk_outhdr};
        type H = virtio_blk_outhdr;
        type S = virtio_blk_discard_write_zeroes;
        assert_eq!(size_of::<RequestHeader>(), size_of::<H>());
        assert_eq!(
            offset_of!(RequestHeader, request_type),
            offset_of!(H, type_)
        );
        assert_eq!(offset_of!(RequestHeader, ioprio), offset_of!(H, ioprio));
        assert_eq!(offset_of!(RequestHeader, sector), offset_of!(H, sector));
        assert_eq!(size_of::<DiscardWriteZeroes>(), size_of::<S>());
        assert_eq!(
            offset_of!(DiscardWriteZeroes, sector),
            offset_of!(S, sector)
        );
        assert_eq!(
            offset_of!(DiscardWriteZeroes, num_sectors),
            offset_of!(S, num_sectors)
        );
        assert_eq!(offset_of!(DiscardWriteZeroes, flags), offset_of!(S, flags));
    }

    #[test]
    fn request_types_come_from_the_header() {
        for (value, expected) in [
            (VIRTIO_BLK_T_IN, RequestType::In),
            (VIRTIO_BLK_T_OUT, RequestType::Out),
            (VIRTIO_BLK_T_FLUSH, RequestType::Flush),
            (VIRTIO_BLK_T_GET_ID, RequestType::GetId),
            (VIRTIO_BLK_T_DISCARD, RequestType::Discard),
            (VIRTIO_BLK_T_WRITE_ZEROES, RequestType::WriteZeroes),
            (99, RequestType::Unsupported(99)),
        ] {
            assert_eq!(RequestType::from(value), expected);
        }
    }

    #[test]
    fn header_data_and_status_in_separate_descriptors() {
        let g = Guest::new();
        let cfg = config();
        let p = request(g.simple(&cfg, VIRTIO_BLK_T_IN, 8, (DATA, 4096)));
        let Op::Read { offset, iov, .. } = &p.op else {
            panic!("{:?}", p.op);
        };
        assert_eq!(*offset, 8 * 512);
        assert_eq!(bufs(iov), [(g.host(DATA), 4096)]);
        assert_eq!(p.in_len, 4096);
        status_at(&g, p.status, STATUS);

        let p = request(g.simple(&cfg, VIRTIO_BLK_T_OUT, 16, (DATA, 1024)));
        let Op::Write { offset, iov, .. } = &p.op else {
            panic!("{:?}", p.op);
        };
        assert_eq!(*offset, 16 * 512);
        assert_eq!(bufs(iov), [(g.host(DATA), 1024)]);
        assert_eq!(p.in_len, 0);
        status_at(&g, p.status, STATUS);
    }

    #[test]
    fn header_and_data_share_a_descriptor() {
        let g = Guest::new();
        g.header(HDR, VIRTIO_BLK_T_OUT, 0);
        let p = request(g.request(&config(), &[(HDR, 16 + 512, R), (STATUS, 1, W)]));
        let Op::Write { iov, .. } = &p.op else {
            panic!("{:?}", p.op);
        };
        assert_eq!(bufs(iov), [(g.host(HDR + 16), 512)]);
    }

    #[test]
    fn status_shares_a_descriptor_with_the_data_before_it() {
        let g = Guest::new();
        g.header(HDR, VIRTIO_BLK_T_IN, 0);
        // Zero-length writable descriptors after the status byte do not count.
        let bufs_in = [(HDR, 16, R), (DATA, 512 + 1, W), (STATUS, 0, W)];
        let p = request(g.request(&config(), &bufs_in));
        let Op::Read { iov, .. } = &p.op else {
            panic!("{:?}", p.op);
        };
        assert_eq!(bufs(iov), [(g.host(DATA), 512)]);
        assert_eq!(p.in_len, 512);
        status_at(&g, p.status, DATA + 512);
    }

    #[test]
    fn flush_and_get_id_need_no_data_beyond_their_own() {
        let g = Guest::new();
        let cfg = config();
        g.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
        let p = request(g.request(&cfg, &[(HDR, 16, R), (STATUS, 1, W)]));
        assert!(matches!(p.op, Op::Flush));
        assert_eq!(p.in_len, 0);

        // GET_ID fills at most 20 bytes of a larger buffer, or a smaller buffer whole.
        for (len, filled) in [(64u32, 20usize), (8, 8)] {
            let p = request(g.simple(&cfg, VIRTIO_BLK_T_GET_ID, 0, (DATA, len)));
            let Op::GetId { iov } = &p.op else {
                panic!("{:?}", p.op);
            };
            assert_eq!(bufs(iov), [(g.host(DATA), filled)]);
            assert_eq!(p.in_len as usize, filled);
        }
    }

    #[test]
    fn data_split_across_descriptors_and_regions() {
        let g = Guest::new();
        let cfg = config();
        let pieces = [(DATA, 512u32), (DATA + 0x1000, 1024), (REGION - 512, 1024)];
        // Split at the region boundary too.
        let expected = [
            (g.host(DATA), 512),
            (g.host(DATA + 0x1000), 1024),
            (g.host(REGION - 512), 512),
            (g.host(REGION), 512),
        ];
        for (request_type, dir) in [(VIRTIO_BLK_T_IN, W), (VIRTIO_BLK_T_OUT, R)] {
            g.header(HDR, request_type, 0);
            let mut chain = vec![(HDR, 16, R)];
            chain.extend(pieces.iter().map(|&(addr, len)| (addr, len, dir)));
            chain.push((STATUS, 1, W));
            let p = request(g.request(&cfg, &chain));
            let (iov, len) = match &p.op {
                Op::Read { iov, len, .. } | Op::Write { iov, len, .. } => (iov, *len),
                other => panic!("{other:?}"),
            };
            assert_eq!(bufs(iov), expected);
            assert_eq!(
                len, 2560,
                "the byte count the request is accounted and split by"
            );
            let in_len = if dir == W { 2560 } else { 0 };
            assert_eq!(p.in_len, in_len);
        }
    }

    #[test]
    fn header_split_across_descriptors_and_regions() {
        let g = Guest::new();
        let cfg = config();
        let h = header_bytes(VIRTIO_BLK_T_OUT, 24);
        // Three descriptors of 4, 4 and 8 bytes; the last also holds the start of the data.
        g.write(HDR, &h[0..4]);
        g.write(HDR + 0x100, &h[4..8]);
        g.write(DATA, &h[8..16]);
        let chain = [
            (HDR, 4, R),
            (HDR + 0x100, 4, R),
            (DATA, 8 + 512, R),
            (DATA + 0x1000, 512, R),
            (STATUS, 1, W),
        ];
        let p = request(g.request(&cfg, &chain));
        let Op::Write { offset, iov, .. } = &p.op else {
            panic!("{:?}", p.op);
        };
        assert_eq!(*offset, 24 * 512);
        assert_eq!(
            bufs(iov),
            [(g.host(DATA + 8), 512), (g.host(DATA + 0x1000), 512)]
        );

        // One descriptor whose header crosses from one region into the next.
        g.write(REGION - 8, &h);
        let p = request(g.request(&cfg, &[(REGION - 8, 16 + 512, R), (STATUS, 1, W)]));
        let Op::Write { offset, iov, .. } = &p.op else {
            panic!("{:?}", p.op);
        };
        assert_eq!(*offset, 24 * 512);
        assert_eq!(bufs(iov), [(g.host(REGION + 8), 512)]);
    }

    #[test]
    fn indirect_tables() {
        let g = Guest::new();
        let cfg = config();
        g.header(HDR, VIRTIO_BLK_T_IN, 2);
        g.chain(INDIRECT, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
        g.desc(TABLE, 5, INDIRECT, 48, INDIRECT_F, 0);
        let p = request(g.parse_head(&cfg, 5, true));
        let Op::Read { offset, iov, .. } = &p.op else {
            panic!("{:?}", p.op);
        };
        assert_eq!(*offset, 2 * 512);
        assert_eq!(bufs(iov), [(g.host(DATA), 512)]);
        status_at(&g, p.status, STATUS);
        // A table longer than the queue is fine.
        g.desc(TABLE, 5, INDIRECT, 16 * 4 * u32::from(QSIZE), INDIRECT_F, 0);
        request(g.parse_head(&cfg, 5, true));
    }

    #[test]
    fn chains_that_cannot_be_followed_are_dropped() {
        let g = Guest::new();
        let cfg = config();
        g.header(HDR, VIRTIO_BLK_T_IN, 0);
        let head = |g: &Guest| g.parse_head(&cfg, 0, true);

        // A NEXT index outside the table.
        g.desc(TABLE, 0, HDR, 16, NEXT, QSIZE);
        assert_eq!(dropped(head(&g)), ChainError::IndexOutsideTable);
        // A loop: 0 -> 1 -> 0.
        g.desc(TABLE, 0, HDR, 16, NEXT, 1);
        g.desc(TABLE, 1, DATA, 512, NEXT | WRITE, 0);
        assert_eq!(dropped(head(&g)), ChainError::Loop);
        // A loop inside an indirect table.
        g.desc(INDIRECT, 0, HDR, 16, NEXT, 1);
        g.desc(INDIRECT, 1, DATA, 512, NEXT | WRITE, 0);
        g.desc(TABLE, 0, INDIRECT, 32, INDIRECT_F, 0);
        assert_eq!(dropped(head(&g)), ChainError::Loop);

        // Indirect tables: not negotiated, nested, after other descriptors, with NEXT.
        g.chain(INDIRECT, &[(HDR, 16, R), (STATUS, 1, W)]);
        g.desc(TABLE, 0, INDIRECT, 32, INDIRECT_F, 0);
        assert_eq!(
            dropped(g.parse_head(&cfg, 0, false)),
            ChainError::IndirectNotNegotiated
        );
        g.desc(INDIRECT + 0x100, 0, INDIRECT, 32, INDIRECT_F, 0);
        g.desc(TABLE, 0, INDIRECT + 0x100, 16, INDIRECT_F, 0);
        assert_eq!(dropped(head(&g)), ChainError::NestedIndirect);
        g.desc(TABLE, 0, HDR, 16, NEXT, 1);
        g.desc(TABLE, 1, INDIRECT, 32, INDIRECT_F, 0);
        assert_eq!(dropped(head(&g)), ChainError::NestedIndirect);
        g.desc(TABLE, 0, INDIRECT, 32, INDIRECT_F | NEXT, 1);
        assert_eq!(dropped(head(&g)), ChainError::IndirectWithNext);
        for len in [0, 17, 16 * (4096 + 1)] {
            g.desc(TABLE, 0, INDIRECT, len, INDIRECT_F, 0);
            assert_eq!(dropped(head(&g)), ChainError::BadIndirectSize, "{len}");
        }

        // Tables outside guest memory.
        g.desc(TABLE, 0, OUTSIDE, 32, INDIRECT_F, 0);
        assert_eq!(dropped(head(&g)), ChainError::TableOutsideMemory);
        let far = |addr: u64| DescTable {
            addr: GuestAddress(addr),
            size: QSIZE,
        };
        assert_eq!(
            dropped(g.parse_in(&cfg, far(OUTSIDE), 0, true)),
            ChainError::TableOutsideMemory
        );
        // A table at the top of the address space: descriptor 1 would wrap around.
        let top = far(u64::MAX - 8);
        assert_eq!(
            dropped(g.parse_in(&cfg, top, 0, true)),
            ChainError::TableOutsideMemory
        );
        assert_eq!(
            dropped(g.parse_in(&cfg, top, 1, true)),
            ChainError::AddressOverflow
        );
    }

    #[test]
    fn chains_without_a_usable_status_byte_are_dropped() {
        let g = Guest::new();
        let cfg = config();
        g.header(HDR, VIRTIO_BLK_T_IN, 0);
        for (chain, expected) in [
            (
                &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, R)][..],
                ChainError::ReadableAfterWritable,
            ),
            (&[(HDR, 16, R), (STATUS, 1, R)], ChainError::NoStatusByte),
            (&[(HDR, 16, R), (STATUS, 0, W)], ChainError::NoStatusByte),
            (
                &[(HDR, 16, R), (OUTSIDE, 1, W)],
                ChainError::StatusOutsideMemory,
            ),
            (
                &[(HDR, 16, R), (u64::MAX, 2, W)],
                ChainError::StatusOutsideMemory,
            ),
            (
                &[(HDR, 16, R), (END - 1, 2, W)],
                ChainError::StatusOutsideMemory,
            ),
        ] {
            assert_eq!(dropped(g.request(&cfg, chain)), expected, "{chain:x?}");
        }
    }

    #[test]
    fn unreadable_headers_are_refused() {
        let g = Guest::new();
        let cfg = config();
        g.header(HDR, VIRTIO_BLK_T_IN, 0);
        for chain in [
            &[(HDR, 8, R), (DATA, 512, W), (STATUS, 1, W)][..],
            &[(HDR, 8, R), (HDR + 8, 4, R), (STATUS, 1, W)],
            &[(OUTSIDE, 16, R), (STATUS, 1, W)],
            &[(END - 8, 16, R), (STATUS, 1, W)],
            &[(u64::MAX - 7, 16, R), (STATUS, 1, W)],
            &[(STATUS, 1, W)],
        ] {
            let o = g.request(&cfg, chain);
            let Outcome::Refused(status, why, None) = o else {
                panic!("{chain:x?}: {o:?}");
            };
            assert_eq!(why, Refusal::HeaderUnreadable, "{chain:x?}");
            assert_eq!(why.status(), S_IOERR);
            status_at(&g, status, STATUS);
        }
    }

    #[test]
    fn bad_reads_and_writes_are_refused() {
        let g = Guest::new();
        let cfg = config();
        let (t_in, t_out) = (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT);
        let ro = config_with(false, 512, DISK);
        assert_eq!(
            refusal(g.simple(&ro, t_out, 0, (DATA, 512))),
            Refusal::ReadOnly
        );
        // Reads still work on a read-only export.
        request(g.simple(&ro, t_in, 0, (DATA, 512)));
        for data in [(OUTSIDE, 512), (END - 256, 512), (u64::MAX - 100, 512)] {
            for t in [t_in, t_out] {
                assert_eq!(
                    refusal(g.simple(&cfg, t, 0, data)),
                    Refusal::DataOutsideMemory,
                    "{t} {data:x?}"
                );
            }
        }
        assert_eq!(
            refusal(g.simple(&cfg, t_out, u64::MAX, (DATA, 512))),
            Refusal::SectorOutOfRange { sector: u64::MAX }
        );
        assert_eq!(
            refusal(g.simple(&cfg, t_in, 0, (DATA, 500))),
            Refusal::Unaligned {
                len: 500,
                sector: 0,
                block_size: 512
            }
        );
        let big_blocks = config_with(true, 4096, DISK);
        assert_eq!(
            refusal(g.simple(&big_blocks, t_in, 1, (DATA, 4096))),
            Refusal::Unaligned {
                len: 4096,
                sector: 1,
                block_size: 4096
            }
        );
        request(g.simple(&big_blocks, t_in, 8, (DATA, 4096)));
        for (sector, len) in [(DISK_SECTORS, 512), (DISK_SECTORS - 1, 1024)] {
            assert_eq!(
                refusal(g.simple(&cfg, t_in, sector, (DATA, len))),
                Refusal::BeyondEnd {
                    len: u64::from(len),
                    sector,
                    capacity: DISK
                }
            );
        }
        request(g.simple(&cfg, t_in, DISK_SECTORS - 1, (DATA, 512)));
        assert_eq!(
            refusal(g.simple(&cfg, VIRTIO_BLK_T_GET_ID, 0, (OUTSIDE, 20))),
            Refusal::GetIdOutsideMemory
        );
        let why = refusal(g.simple(&cfg, 99, 0, (DATA, 512)));
        assert_eq!(why, Refusal::Unsupported(99));
        assert_eq!(why.status(), S_UNSUPP);
    }

    #[test]
    fn reads_longer_than_4_gib_are_refused() {
        // 2 GiB of guest memory (reserved, never touched), used three times by one read.
        const SIZE: u64 = 1 << 31;
        let g = Guest::with_ranges(&[(GuestAddress(0), SIZE as usize)]);
        let cfg = config_with(true, 512, 4 * SIZE);
        g.header(HDR, VIRTIO_BLK_T_IN, 0);
        let piece = (DATA, (SIZE - DATA) as u32, W);
        let chain = [(HDR, 16, R), piece, piece, piece, (STATUS, 1, W)];
        assert_eq!(refusal(g.request(&cfg, &chain)), Refusal::TooLong);
    }

    #[test]
    fn seg_max_and_size_max_are_enforced() {
        let g = Guest::new();
        let mut cfg = config();
        cfg.seg_max = 3;
        for (t, dir) in [(VIRTIO_BLK_T_IN, W), (VIRTIO_BLK_T_OUT, R)] {
            g.header(HDR, t, 0);
            let seg = |i: u64| (DATA + 0x1000 * i, 512, dir);
            let at_limit = [(HDR, 16, R), seg(0), seg(1), seg(2), (STATUS, 1, W)];
            request(g.request(&cfg, &at_limit));
            let over = [(HDR, 16, R), seg(0), seg(1), seg(2), seg(3), (STATUS, 1, W)];
            let why = refusal(g.request(&cfg, &over));
            assert_eq!(why, Refusal::TooManySegments { count: 4, max: 3 });
            assert_eq!(why.status(), S_IOERR);
            // Empty descriptors carry no data and do not count.
            let with_empty = [
                (HDR, 16, R),
                seg(0),
                (DATA, 0, dir),
                seg(1),
                seg(2),
                (STATUS, 1, W),
            ];
            request(g.request(&cfg, &with_empty));
        }
        // A header descriptor that carries data too counts that data as one segment.
        g.header(HDR, VIRTIO_BLK_T_OUT, 0);
        let joined = [
            (HDR, 16 + 512, R),
            (DATA, 512, R),
            (DATA, 512, R),
            (STATUS, 1, W),
        ];
        request(g.request(&cfg, &joined));
        let joined = [
            (HDR, 16 + 512, R),
            (DATA, 512, R),
            (DATA, 512, R),
            (DATA, 512, R),
            (STATUS, 1, W),
        ];
        assert_eq!(
            refusal(g.request(&cfg, &joined)),
            Refusal::TooManySegments { count: 4, max: 3 }
        );

        // No SIZE_MAX offered (size_max 0): any segment length.
        assert_eq!(cfg.size_max, 0);
        request(g.simple(&cfg, VIRTIO_BLK_T_IN, 0, (DATA, 16384)));
        cfg.size_max = 8192;
        request(g.simple(&cfg, VIRTIO_BLK_T_IN, 0, (DATA, 8192)));
        for t in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT] {
            let why = refusal(g.simple(&cfg, t, 0, (DATA, 8704)));
            assert_eq!(
                why,
                Refusal::SegmentTooLong {
                    len: 8704,
                    max: 8192
                }
            );
            assert_eq!(why.status(), S_IOERR);
        }
    }

    /// A discard or write-zeroes request with `segments` (written at DATA, one descriptor).
    fn segments_request(g: &Guest, cfg: &DeviceConfig, t: u32, segments: &[[u8; 16]]) -> Outcome {
        for (i, s) in segments.iter().enumerate() {
            g.write(DATA + 16 * i as u64, s);
        }
        let len = 16 * segments.len() as u32;
        g.simple(cfg, t, 0, (DATA, len))
    }

    #[test]
    fn discard_and_write_zeroes_segments() {
        let g = Guest::new();
        let cfg = config();
        let (t_discard, t_zeroes) = (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES);
        let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
        let segs = [segment_bytes(8, 8, 0), segment_bytes(64, 16, 0)];
        let p = request(segments_request(&g, &cfg, t_discard, &segs));
        let Op::Discard(got) = &p.op else {
            panic!("{:?}", p.op);
        };
        let expected = [
            Segment {
                offset: 8 * 512,
                len: 8 * 512,
                unmap: false,
            },
            Segment {
                offset: 64 * 512,
                len: 16 * 512,
                unmap: false,
            },
        ];
        assert_eq!(got, &expected);

        // A segment split across two descriptors (and the header sharing the first one).
        g.header(HDR, t_zeroes, 0);
        let s = segment_bytes(32, 8, unmap);
        g.write(HDR + 16, &s[..8]);
        g.write(DATA, &s[8..]);
        let chain = [(HDR, 16 + 8, R), (DATA, 8, R), (STATUS, 1, W)];
        let p = request(g.request(&cfg, &chain));
        let Op::WriteZeroes(got) = &p.op else {
            panic!("{:?}", p.op);
        };
        let expected = Segment {
            offset: 32 * 512,
            len: 8 * 512,
            unmap: true,
        };
        assert_eq!(got, &[expected]);
    }

    #[test]
    fn bad_segments_are_refused() {
        let g = Guest::new();
        let cfg = config();
        let (t_discard, t_zeroes) = (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES);
        let discard = RequestType::Discard;
        let zeroes = RequestType::WriteZeroes;
        let max = cfg.max_discard_sectors;
        let ok = segment_bytes(0, 8, 0);
        let bad = |t: u32, segs: &[[u8; 16]]| refusal(segments_request(&g, &cfg, t, segs));
        let cases = [
            (
                bad(t_discard, &[]),
                Refusal::BadSegments(discard, SegmentError::Length { bytes: 0 }),
                S_IOERR,
            ),
            (
                bad(t_zeroes, &[ok; 17]),
                Refusal::BadSegments(zeroes, SegmentError::TooMany { count: 17 }),
                S_UNSUPP,
            ),
            (
                bad(t_zeroes, &[ok, segment_bytes(0, 8, 2)]),
                Refusal::BadSegments(zeroes, SegmentError::UnknownFlags { flags: 2 }),
                S_UNSUPP,
            ),
            (
                bad(t_discard, &[segment_bytes(0, 8, 1)]),
                Refusal::BadSegments(discard, SegmentError::UnmapNotAllowed),
                S_UNSUPP,
            ),
            (
                bad(t_discard, &[segment_bytes(0, max + 8, 0)]),
                Refusal::BadSegments(
                    discard,
                    SegmentError::TooManySectors {
                        sectors: max + 8,
                        max,
                    },
                ),
                S_IOERR,
            ),
            (
                bad(t_zeroes, &[segment_bytes(DISK_SECTORS - 4, 8, 0)]),
                Refusal::BadSegments(
                    zeroes,
                    SegmentError::BeyondEnd {
                        sectors: 8,
                        sector: DISK_SECTORS - 4,
                    },
                ),
                S_IOERR,
            ),
        ];
        for (got, expected, status) in cases {
            assert_eq!(got, expected);
            assert_eq!(got.status(), status, "{got}");
        }

        // 15 bytes of segment data.
        g.header(HDR, t_discard, 0);
        let why = refusal(g.request(&cfg, &[(HDR, 16, R), (DATA, 15, R), (STATUS, 1, W)]));
        let expected = Refusal::BadSegments(discard, SegmentError::Length { bytes: 15 });
        assert_eq!(why, expected);
        // Segment data outside guest memory, reported before a bad segment in front of it.
        g.write(DATA, &segment_bytes(0, 8, 2));
        let chain = [
            (HDR, 16, R),
            (DATA, 16, R),
            (OUTSIDE, 16, R),
            (STATUS, 1, W),
        ];
        let why = refusal(g.request(&cfg, &chain));
        let expected = Refusal::BadSegments(discard, SegmentError::OutsideMemory);
        assert_eq!(why, expected);
        assert_eq!(why.status(), S_IOERR);
        // Segments not aligned to a 4 KiB logical block.
        let big_blocks = config_with(true, 4096, DISK);
        for (sector, sectors) in [(1, 8), (8, 4)] {
            let segs = [segment_bytes(sector, sectors, 0)];
            let why = refusal(segments_request(&g, &big_blocks, t_zeroes, &segs));
            let expected = SegmentError::Unaligned { sectors, sector };
            assert_eq!(why, Refusal::BadSegments(zeroes, expected));
        }
        // Not offered: discard on a node without it, either on a read-only export.
        let mut no_discard = config();
        no_discard.discard = false;
        let why = refusal(segments_request(&g, &no_discard, t_discard, &[ok]));
        assert_eq!(why, Refusal::NotOffered(discard));
        assert_eq!(why.status(), S_UNSUPP);
        let ro = config_with(false, 512, DISK);
        for (t, kind) in [(t_discard, discard), (t_zeroes, zeroes)] {
            let why = refusal(segments_request(&g, &ro, t, &[ok]));
            assert_eq!(why, Refusal::NotOffered(kind));
        }
    }

    #[test]
    fn messages_stay_as_they_were() {
        assert_eq!(
            ChainError::Loop.to_string(),
            "descriptor chain loops or is longer than its table"
        );
        assert_eq!(
            ChainError::IndirectNotNegotiated.to_string(),
            "indirect descriptor, but INDIRECT_DESC was not negotiated"
        );
        assert_eq!(
            ChainError::NoStatusByte.to_string(),
            "no device-writable status byte"
        );
        assert_eq!(
            Refusal::Unaligned {
                len: 500,
                sector: 3,
                block_size: 512
            }
            .to_string(),
            "request of 500 bytes at sector 3 is not aligned to the 512-byte logical block size"
        );
        assert_eq!(
            Refusal::BadSegments(
                RequestType::WriteZeroes,
                SegmentError::TooMany { count: 17 }
            )
            .to_string(),
            "write-zeroes: 17 segments (at most 16)"
        );
        assert_eq!(
            Refusal::NotOffered(RequestType::Discard).to_string(),
            "discard is not offered by this export"
        );
    }

    /// One random descriptor: address (near or inside guest memory), length, flags, next.
    fn any_desc() -> impl proptest::strategy::Strategy<Value = (u64, u32, u16, u16)> {
        use proptest::prelude::*;
        (
            prop_oneof![
                0..END + 0x1000,
                Just(END - 1),
                Just(u64::MAX - 7),
                any::<u64>()
            ],
            prop_oneof![0u32..0x2000, Just(0), Just(1), Just(16), any::<u32>()],
            0u16..8,
            0u16..24,
        )
    }

    proptest::proptest! {
        // Bounded here (the test command); scripts/fuzz.sh runs many more.
        #![proptest_config(proptest::test_runner::Config {
            cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(512),
            ..proptest::test_runner::Config::default()
        })]

        /// Whatever a guest writes into a descriptor table, an indirect table and a header,
        /// walking and parsing never panic, and every buffer of a request lies inside guest
        /// memory.
        #[test]
        fn any_chain_parses_without_panic_and_within_memory(
            table in proptest::collection::vec(any_desc(), QSIZE as usize),
            indirect in proptest::collection::vec(any_desc(), 0..8),
            header in proptest::array::uniform16(proptest::prelude::any::<u8>()),
            head in 0u16..20,
            indirect_ok in proptest::prelude::any::<bool>(),
            writable in proptest::prelude::any::<bool>(),
        ) {
            check_chain(&ChainCase { table, indirect, header, head, indirect_ok, writable, ..ChainCase::default() })?;
        }
    }

    /// One guest-written chain: what the property test generates and a corpus file holds.
    #[derive(Debug, Default)]
    struct ChainCase {
        /// Descriptors 0.. of the queue's table at TABLE: address, length, flags, next.
        table: Vec<(u64, u32, u16, u16)>,
        /// Descriptors of the table at INDIRECT.
        indirect: Vec<(u64, u32, u16, u16)>,
        /// The bytes at HDR.
        header: [u8; 16],
        /// More bytes of guest memory: address, bytes.
        memory: Vec<(u64, Vec<u8>)>,
        head: u16,
        indirect_ok: bool,
        writable: bool,
        /// What must come of it (a corpus file says): "request", "refused" or "dropped".
        expect: Option<String>,
    }

    /// Walks and parses `case`: no panic, and every buffer of a request in guest memory.
    fn check_chain(case: &ChainCase) -> Result<(), proptest::test_runner::TestCaseError> {
        let g = Guest::new();
        for (i, &(addr, len, flags, next)) in case.table.iter().enumerate() {
            g.desc(TABLE, i as u16, addr, len, flags, next);
        }
        for (i, &(addr, len, flags, next)) in case.indirect.iter().enumerate() {
            g.desc(INDIRECT, i as u16, addr, len, flags, next);
        }
        g.write(HDR, &case.header);
        for (addr, bytes) in &case.memory {
            g.write(*addr, bytes);
        }
        let cfg = config_with(case.writable, 512, DISK);
        let inside = |p: usize, len: usize| {
            [0u64, REGION].iter().any(|&base| {
                let start = g.host(base);
                p >= start && p + len <= start + REGION as usize
            })
        };
        let outcome = g.parse_head(&cfg, case.head, case.indirect_ok);
        if let Some(expect) = &case.expect {
            let got = match &outcome {
                Outcome::Request(_) => "request",
                Outcome::Refused(..) => "refused",
                Outcome::Drop(_) => "dropped",
            };
            proptest::prop_assert_eq!(got, expect.as_str(), "{:?}", outcome);
        }
        if let Outcome::Request(parsed) = outcome {
            let p = parsed.status.0.as_ptr() as usize;
            proptest::prop_assert!(inside(p, 1), "status byte outside guest memory");
            let iov: &[IoVec<'_>] = match &parsed.op {
                Op::Read { iov, .. } | Op::Write { iov, .. } | Op::GetId { iov } => iov,
                _ => &[],
            };
            let mut in_len = 0u64;
            for v in iov {
                proptest::prop_assert!(
                    inside(v.as_ptr() as usize, v.len()),
                    "buffer outside guest memory"
                );
                in_len += v.len() as u64;
            }
            if let Op::Read { .. } = parsed.op {
                proptest::prop_assert_eq!(u64::from(parsed.in_len), in_len, "used length");
            }
        }
        Ok(())
    }

    /// Reads a chain corpus file: lines `table|indirect ADDR LEN FLAGS NEXT`, `header` and 16
    /// bytes, `memory ADDR BYTES...`, `head N`, `indirect_ok`, `writable` and
    /// `expect request|refused|dropped`; `#`
    /// starts a comment. Numbers
    /// are decimal or 0x-prefixed hex.
    fn read_chain_case(text: &str) -> ChainCase {
        let mut case = ChainCase::default();
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or_default();
            let words: Vec<&str> = line.split_whitespace().collect();
            let num = |i: usize| -> u64 {
                let w = words[i];
                match w.strip_prefix("0x") {
                    Some(hex) => u64::from_str_radix(hex, 16),
                    None => w.parse(),
                }
                .unwrap_or_else(|e| panic!("bad number {w:?} in {line:?}: {e}"))
            };
            match words.first().copied() {
                None => {}
                Some(kind @ ("table" | "indirect")) => {
                    let d = (num(1), num(2) as u32, num(3) as u16, num(4) as u16);
                    if kind == "table" {
                        case.table.push(d);
                    } else {
                        case.indirect.push(d);
                    }
                }
                Some("header") => {
                    for (i, b) in case.header.iter_mut().enumerate() {
                        *b = num(i + 1) as u8;
                    }
                }
                Some("memory") => {
                    let bytes = (2..words.len()).map(|i| num(i) as u8).collect();
                    case.memory.push((num(1), bytes));
                }
                Some("head") => case.head = num(1) as u16,
                Some("indirect_ok") => case.indirect_ok = true,
                Some("writable") => case.writable = true,
                Some("expect") => case.expect = words.get(1).map(|w| w.to_string()),
                Some(other) => panic!("unknown corpus line {other:?}"),
            }
        }
        case
    }

    /// Every shape in the committed corpus (vhost/fuzz-corpus/chains: the hostile chains
    /// found so far) goes through the property test's checks and has the outcome its file
    /// expects.
    #[test]
    fn the_chain_corpus_parses_without_panic_and_within_memory() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz-corpus/chains");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("corpus directory") {
            let path = entry.expect("corpus entry").path();
            let text = std::fs::read_to_string(&path).expect("corpus file");
            if let Err(e) = check_chain(&read_chain_case(&text)) {
                panic!("{}: {e}", path.display());
            }
            n += 1;
        }
        assert!(n >= 8, "only {n} corpus files in {}", dir.display());
    }
}
