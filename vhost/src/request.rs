//! virtio-blk requests: walking a descriptor chain in guest memory, validating it, and turning
//! it into a block-layer operation on buffers that point straight into guest memory.
//!
//! Every guest address is checked against the guest's memory regions before use (vm-memory's
//! checked accessors), buffers that cross a region boundary are split, and a chain that loops,
//! nests indirect tables or points outside guest memory is refused. The device never trusts a
//! length or an index it read from guest memory.
//!
//! The request is laid out as VIRTIO 1.x says, without assuming any descriptor arrangement: the
//! device-readable part starts with the 16-byte header, the device-writable part ends with the
//! status byte, and the data is what lies between.

use std::ptr::NonNull;
use std::sync::Arc;

use strata_backend::io::iovec;
use strata_backend::{BlockError, IoVec, Node};
use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileMemory,
};

use crate::device_config::{DeviceConfig, MAX_INDIRECT_DESCS, MAX_ZERO_DISCARD_SEG};
use crate::regions::RegionCache;

/// Status values of the last byte of a request.
pub(crate) const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
pub(crate) const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
pub(crate) const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

const HEADER_LEN: usize = 16;
const SEGMENT_LEN: usize = 16;
const SECTOR: u64 = 512;

/// One descriptor of a chain, as the guest gave it (not yet checked against guest memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Desc {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

/// A virtqueue's descriptor table: its guest address and number of entries (the queue size).
#[derive(Debug, Clone, Copy)]
pub(crate) struct DescTable {
    pub addr: GuestAddress,
    pub size: u16,
}

/// Starts loading, for every chain in `heads`, the head descriptor and then the first buffer it
/// points to (the request header, or an indirect table), so that parsing the batch does not
/// wait for each cache line in turn: the driver's CPU has just written them.
///
/// Only a hint: it reads nothing it relies on and skips whatever is out of range.
pub(crate) fn prefetch_chains(regions: &mut RegionCache<'_>, table: DescTable, heads: &[u16]) {
    let Some(descs) = regions.slice(table.addr, usize::from(table.size) * 16) else {
        return;
    };
    let base = descs.ptr_guard().as_ptr();
    for &head in heads.iter().filter(|&&h| h < table.size) {
        prefetch(base.wrapping_add(usize::from(head) * 16));
    }
    for &head in heads.iter().filter(|&&h| h < table.size) {
        // A descriptor starts with its buffer's guest address (little-endian u64).
        let Ok(addr) = descs.get_ref::<u64>(usize::from(head) * 16) else {
            continue;
        };
        if let Some(buf) = regions.slice(GuestAddress(u64::from_le(addr.load())), 1) {
            prefetch(buf.ptr_guard().as_ptr());
        }
    }
}

/// Asks the CPU to start loading the cache line at `ptr`.
fn prefetch(ptr: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint that never faults, whatever the address; SSE, which
    // provides it, is part of every x86_64 CPU.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(ptr.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = ptr;
}

/// Reads the chain starting at descriptor `head` into `out`.
///
/// Follows NEXT links and one indirect table (as the first descriptor, when `indirect_ok`);
/// refuses indices outside the table, tables outside guest memory, nested or empty indirect
/// tables, and chains longer than their table (which is how a loop shows).
pub(crate) fn walk_chain(
    regions: &mut RegionCache<'_>,
    desc_table: DescTable,
    head: u16,
    indirect_ok: bool,
    out: &mut Vec<Desc>,
) -> Result<(), &'static str> {
    out.clear();
    let mut table = desc_table.addr;
    let mut table_len = u32::from(desc_table.size);
    let mut index = u32::from(head);
    let mut indirect = false;
    let mut seen = 0u32;
    // The table as one slice of guest memory when it lies in one region (it nearly always
    // does): reading a descriptor from it is a bounds check and a copy, where a read through
    // the whole memory map looks the region up again each time.
    let mut slice = regions.slice(table, table_len as usize * 16);
    loop {
        if index >= table_len {
            return Err("descriptor index outside the descriptor table");
        }
        let offset = u64::from(index) * 16;
        let desc: Descriptor = match &slice {
            // index < table_len, so the 16 bytes lie inside the slice.
            // A volatile load of the 16 bytes (two moves); `read_obj` copies byte-generically.
            Some(s) => s
                .get_ref::<Descriptor>(offset as usize)
                .map(|d| d.load())
                .map_err(|_| "descriptor table outside guest memory")?,
            None => {
                let addr = table
                    .checked_add(offset)
                    .ok_or("descriptor address overflows")?;
                regions
                    .mem()
                    .read_obj(addr)
                    .map_err(|_| "descriptor table outside guest memory")?
            }
        };
        seen += 1;
        if seen > table_len {
            return Err("descriptor chain loops or is longer than its table");
        }
        if desc.refers_to_indirect_table() {
            if !indirect_ok {
                return Err("indirect descriptor, but INDIRECT_DESC was not negotiated");
            }
            if indirect || !out.is_empty() {
                return Err("indirect descriptor inside a chain or an indirect table");
            }
            if desc.has_next() {
                return Err("indirect descriptor with the NEXT flag");
            }
            let len = desc.len();
            if len == 0 || len % 16 != 0 || len / 16 > MAX_INDIRECT_DESCS {
                return Err("indirect table of invalid size");
            }
            table = desc.addr();
            table_len = len / 16;
            slice = regions.slice(table, table_len as usize * 16);
            index = 0;
            seen = 0;
            indirect = true;
            continue;
        }
        out.push(Desc {
            addr: desc.addr().0,
            len: desc.len(),
            writable: desc.is_write_only(),
        });
        if !desc.has_next() {
            return Ok(());
        }
        index = u32::from(desc.next());
    }
}

/// A byte range of guest memory (guest physical address, length).
type Piece = (u64, u64);

/// A discard / write-zeroes segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Segment {
    pub offset: u64,
    pub len: u64,
    pub unmap: bool,
}

/// What a request asks for, with its buffers resolved into guest memory.
pub(crate) enum Op {
    Read {
        offset: u64,
        iov: Vec<IoVec<'static>>,
    },
    Write {
        offset: u64,
        iov: Vec<IoVec<'static>>,
    },
    Flush,
    GetId {
        iov: Vec<IoVec<'static>>,
    },
    Discard(Vec<Segment>),
    WriteZeroes(Vec<Segment>),
    /// Complete at once with this status.
    Status(u8),
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bufs = |iov: &[IoVec<'_>]| -> Vec<(usize, usize)> {
            iov.iter().map(|v| (v.as_ptr() as usize, v.len())).collect()
        };
        match self {
            Op::Read { offset, iov } => write!(f, "Read({offset}, {:?})", bufs(iov)),
            Op::Write { offset, iov } => write!(f, "Write({offset}, {:?})", bufs(iov)),
            Op::Flush => write!(f, "Flush"),
            Op::GetId { iov } => write!(f, "GetId({:?})", bufs(iov)),
            Op::Discard(s) => write!(f, "Discard({s:?})"),
            Op::WriteZeroes(s) => write!(f, "WriteZeroes({s:?})"),
            Op::Status(c) => write!(f, "Status({c})"),
        }
    }
}

/// A parsed request.
#[derive(Debug)]
pub(crate) struct Parsed {
    pub op: Op,
    /// Where the status byte goes.
    pub status: StatusByte,
    /// Bytes of device-writable data the request fills on success (not counting the status).
    pub in_len: u32,
    /// Why the request is refused (for the log), when `op` is `Status` with an error.
    pub problem: Option<String>,
}

/// A request's status byte, in our mapping of guest memory (found and checked by `parse`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct StatusByte(NonNull<u8>);

impl StatusByte {
    /// Writes the request's status.
    ///
    /// # Safety
    /// The caller holds the guest memory map `parse` found the byte in (its mappings stay
    /// valid while any reference to the map lives).
    pub(crate) unsafe fn write(self, code: u8) {
        // The guest may look at the byte concurrently, as with any DMA buffer: a volatile
        // write, like vm-memory's own accessors.
        // SAFETY: the byte lies in a mapped guest region (vm-memory checked it) that the
        // caller keeps mapped.
        unsafe { std::ptr::write_volatile(self.0.as_ptr(), code) }
    }
}

/// The outcome of parsing a chain.
#[derive(Debug)]
pub(crate) enum Outcome {
    Request(Parsed),
    /// No status byte to report anything in: return the chain with nothing written.
    Drop(&'static str),
}

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
        return Outcome::Drop("device-readable descriptor after a device-writable one");
    }
    let Some(last_w) = descs[first_w..].iter().rposition(|d| d.len > 0) else {
        return Outcome::Drop("no device-writable status byte");
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
        return Outcome::Drop("status byte outside guest memory");
    };
    let fail = |status_code: u8, problem: String| {
        Outcome::Request(Parsed {
            op: Op::Status(status_code),
            status,
            in_len: 0,
            problem: Some(problem),
        })
    };

    // The readable stream: header, then data.
    let readable = descs[..first_w].iter().map(|d| (d.addr, u64::from(d.len)));
    let mut header = [0u8; HEADER_LEN];
    let Some(out_data) = read_stream(regions, readable, &mut header) else {
        return fail(
            S_IOERR,
            "request header shorter than 16 bytes or outside guest memory".into(),
        );
    };
    let req_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14],
        header[15],
    ]);
    // The writable stream: data, then the status byte.
    let in_data = descs[first_w..=last_w]
        .iter()
        .enumerate()
        .filter_map(|(i, d)| {
            let len = u64::from(d.len) - u64::from(first_w + i == last_w);
            (len > 0).then_some((d.addr, len))
        });

    let request = |op: Op, in_len: u32| {
        Outcome::Request(Parsed {
            op,
            status,
            in_len,
            problem: None,
        })
    };
    match req_type {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let write = req_type == VIRTIO_BLK_T_OUT;
            if write && !cfg.writable {
                return fail(S_IOERR, "write to a read-only export".into());
            }
            let mut iov = std::mem::take(spare);
            iov.clear();
            let len = if write {
                to_iovecs(regions, out_data.iter().copied(), &mut iov)
            } else {
                to_iovecs(regions, in_data, &mut iov)
            };
            let Some(len) = len else {
                return fail(S_IOERR, "data buffer outside guest memory".into());
            };
            let offset = match check_range(cfg, sector, len) {
                Ok(offset) => offset,
                Err(problem) => return fail(S_IOERR, problem),
            };
            if write {
                request(Op::Write { offset, iov }, 0)
            } else {
                // len <= u32::MAX: a chain's descriptors are u32 and the sum was checked below
                // the capacity, but a chain may still be longer than 4 GiB in theory.
                match u32::try_from(len) {
                    Ok(in_len) => request(Op::Read { offset, iov }, in_len),
                    Err(_) => fail(S_IOERR, "request longer than 4 GiB".into()),
                }
            }
        }
        VIRTIO_BLK_T_FLUSH => request(Op::Flush, 0),
        VIRTIO_BLK_T_GET_ID => {
            let mut iov = Vec::new();
            let Some(len) = to_iovecs(regions, in_data, &mut iov) else {
                return fail(S_IOERR, "GET_ID buffer outside guest memory".into());
            };
            let n = len.min(VIRTIO_BLK_ID_BYTES.into());
            let iov = iovec::sub_iov(&iov, 0, n as usize);
            request(Op::GetId { iov }, n as u32)
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = req_type == VIRTIO_BLK_T_DISCARD;
            let (offered, max_sectors, what) = if discard {
                (cfg.discard, cfg.max_discard_sectors, "discard")
            } else {
                (
                    cfg.write_zeroes,
                    cfg.max_write_zeroes_sectors,
                    "write-zeroes",
                )
            };
            if !offered {
                return fail(S_UNSUPP, format!("{what} is not offered by this export"));
            }
            match parse_segments(regions.mem(), &out_data, cfg, discard, max_sectors) {
                Ok(segs) if discard => request(Op::Discard(segs), 0),
                Ok(segs) => request(Op::WriteZeroes(segs), 0),
                Err((code, problem)) => fail(code, format!("{what}: {problem}")),
            }
        }
        other => fail(S_UNSUPP, format!("unsupported request type {other}")),
    }
}

/// Copies the first `header.len()` bytes of the readable stream into `header` and returns the
/// rest of the stream as pieces, or None when the stream is too short or not in guest memory.
fn read_stream(
    regions: &mut RegionCache<'_>,
    pieces: impl Iterator<Item = Piece>,
    header: &mut [u8],
) -> Option<Vec<Piece>> {
    let mut filled = 0usize;
    let mut rest = Vec::new();
    for (addr, len) in pieces {
        if filled < header.len() {
            let n = (header.len() - filled).min(usize::try_from(len).ok()?);
            let dst = &mut header[filled..filled + n];
            // One region (the usual case): a plain copy; else the general, splitting read.
            match regions.slice(GuestAddress(addr), n) {
                Some(slice) => {
                    slice.copy_to(dst);
                }
                None => regions.mem().read_slice(dst, GuestAddress(addr)).ok()?,
            }
            filled += n;
            if (n as u64) < len {
                rest.push((addr.checked_add(n as u64)?, len - n as u64));
            }
        } else if len > 0 {
            rest.push((addr, len));
        }
    }
    (filled == header.len()).then_some(rest)
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
fn check_range(cfg: &DeviceConfig, sector: u64, len: u64) -> Result<u64, String> {
    let lbs = u64::from(cfg.logical_block_size);
    let offset = sector
        .checked_mul(SECTOR)
        .ok_or_else(|| format!("sector {sector} is out of range"))?;
    if offset % lbs != 0 || len % lbs != 0 {
        return Err(format!(
            "request of {len} bytes at sector {sector} is not aligned to the {lbs}-byte \
             logical block size"
        ));
    }
    let capacity = cfg.capacity_sectors() * SECTOR;
    match offset.checked_add(len) {
        Some(end) if end <= capacity => Ok(offset),
        _ => Err(format!(
            "request of {len} bytes at sector {sector} is beyond the end of the disk \
             ({capacity} bytes)"
        )),
    }
}

/// Reads and checks the segments of a discard / write-zeroes request.
fn parse_segments(
    mem: &GuestMemoryMmap,
    data: &[Piece],
    cfg: &DeviceConfig,
    discard: bool,
    max_sectors: u32,
) -> Result<Vec<Segment>, (u8, String)> {
    let total: u64 = data.iter().map(|p| p.1).sum();
    if total == 0 || total % SEGMENT_LEN as u64 != 0 {
        return Err((S_IOERR, format!("segment data of {total} bytes")));
    }
    let count = total / SEGMENT_LEN as u64;
    if count > u64::from(MAX_ZERO_DISCARD_SEG) {
        return Err((
            S_UNSUPP,
            format!("{count} segments (at most {MAX_ZERO_DISCARD_SEG})"),
        ));
    }
    // At most 16 segments of 16 bytes: copy them out of guest memory.
    let mut raw = vec![0u8; total as usize];
    let mut at = 0usize;
    for &(addr, len) in data {
        let len = len as usize;
        mem.read_slice(&mut raw[at..at + len], GuestAddress(addr))
            .map_err(|_| (S_IOERR, "segment data outside guest memory".to_string()))?;
        at += len;
    }
    let lbs_sectors = u64::from(cfg.logical_block_size) / SECTOR;
    let capacity = cfg.capacity_sectors();
    raw.chunks_exact(SEGMENT_LEN)
        .map(|s| {
            let sector = u64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]);
            let num = u32::from_le_bytes([s[8], s[9], s[10], s[11]]);
            let flags = u32::from_le_bytes([s[12], s[13], s[14], s[15]]);
            let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 {
                return Err((S_UNSUPP, format!("unknown flags {flags:#x}")));
            }
            if discard && unmap {
                return Err((S_UNSUPP, "the unmap flag is not allowed".to_string()));
            }
            if num > max_sectors {
                return Err((S_IOERR, format!("{num} sectors (at most {max_sectors})")));
            }
            if sector % lbs_sectors != 0 || u64::from(num) % lbs_sectors != 0 {
                return Err((
                    S_IOERR,
                    format!("{num} sectors at {sector} not aligned to the logical block size"),
                ));
            }
            match sector.checked_add(u64::from(num)) {
                Some(end) if end <= capacity => Ok(Segment {
                    offset: sector * SECTOR,
                    len: u64::from(num) * SECTOR,
                    unmap,
                }),
                _ => Err((
                    S_IOERR,
                    format!("{num} sectors at {sector} are beyond the end of the disk"),
                )),
            }
        })
        .collect()
}

/// Reads or writes `iov` at `offset`, splitting requests the node cannot take at once (more
/// buffers than `max_iov`, more bytes than `max_transfer`).
pub(crate) async fn read_write(
    node: &Arc<Node>,
    write: bool,
    offset: u64,
    iov: &[IoVec<'_>],
    max_iov: usize,
    max_transfer: u64,
) -> Result<(), BlockError> {
    let total = iovec::total_len(iov);
    let fits_bytes = max_transfer == 0 || total <= max_transfer;
    if iov.len() <= max_iov && fits_bytes {
        return if write {
            node.write(offset, iov).await
        } else {
            node.read(offset, iov).await
        };
    }
    // Boxed: rare, and kept out of the size of every request's future.
    Box::pin(read_write_split(
        node,
        write,
        offset,
        iov,
        max_iov,
        max_transfer,
    ))
    .await
}

/// The part of [`read_write`] for requests the node cannot take at once.
async fn read_write_split(
    node: &Arc<Node>,
    write: bool,
    offset: u64,
    iov: &[IoVec<'_>],
    max_iov: usize,
    max_transfer: u64,
) -> Result<(), BlockError> {
    let total = iovec::total_len(iov);
    let chunk = if max_transfer == 0 {
        total
    } else {
        (max_transfer / SECTOR * SECTOR).max(SECTOR)
    };
    let mut done = 0u64;
    while done < total {
        let n = chunk.min(total - done);
        let part = iovec::sub_iov(iov, done as usize, n as usize);
        let mut pos = offset + done;
        for group in part.chunks(max_iov) {
            if write {
                node.write(pos, group).await?;
            } else {
                node.read(pos, group).await?;
            }
            pos += iovec::total_len(group);
        }
        done += n;
    }
    Ok(())
}
