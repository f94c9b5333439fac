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
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

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
        return Outcome::Refused(status, Refusal::HeaderUnreadable);
    };
    // The writable stream: data, then the status byte.
    let in_data = descs[first_w..=last_w]
        .iter()
        .enumerate()
        .filter_map(|(i, d)| {
            let len = u64::from(d.len) - u64::from(first_w + i == last_w);
            (len > 0).then_some((d.addr, len))
        });

    let request = match header.request_type() {
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
        Err(why) => Outcome::Refused(status, why),
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
    let len = to_iovecs(regions, data, &mut iov).ok_or(Refusal::DataOutsideMemory)?;
    let offset = check_range(cfg, sector, len)?;
    if write {
        return Ok((Op::Write { offset, iov }, 0));
    }
    // len <= u32::MAX: a chain's descriptors are u32 and the sum was checked below the
    // capacity, but a chain may still be longer than 4 GiB in theory.
    let in_len = u32::try_from(len).map_err(|_| Refusal::TooLong)?;
    Ok((Op::Read { offset, iov }, in_len))
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
