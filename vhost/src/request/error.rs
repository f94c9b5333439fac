//! Why a descriptor chain is dropped, or a request refused. The messages end up in the log.

use std::fmt;

use super::parse::RequestType;
use super::{S_IOERR, S_UNSUPP};
use crate::device_config::MAX_ZERO_DISCARD_SEG;

/// Why a descriptor chain is dropped: it cannot be followed, or holds no status byte to report
/// an error in. The chain is returned to the driver with nothing written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChainError {
    /// A head or NEXT index at or past the end of its table.
    IndexOutsideTable,
    /// A descriptor table (or indirect table) not in guest memory.
    TableOutsideMemory,
    /// A descriptor's address wraps around the address space.
    AddressOverflow,
    /// More descriptors than the table holds: the NEXT links loop.
    Loop,
    /// An indirect descriptor while VIRTIO_RING_F_INDIRECT_DESC was not negotiated.
    IndirectNotNegotiated,
    /// An indirect descriptor after other descriptors, or inside an indirect table.
    NestedIndirect,
    /// An indirect descriptor that also has the NEXT flag.
    IndirectWithNext,
    /// An indirect table that is empty, not a whole number of descriptors, or too long.
    BadIndirectSize,
    /// A device-readable descriptor after a device-writable one.
    ReadableAfterWritable,
    /// No device-writable byte to put the status in.
    NoStatusByte,
    /// The status byte is not in guest memory.
    StatusOutsideMemory,
}

impl fmt::Display for ChainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChainError::IndexOutsideTable => "descriptor index outside the descriptor table",
            ChainError::TableOutsideMemory => "descriptor table outside guest memory",
            ChainError::AddressOverflow => "descriptor address overflows",
            ChainError::Loop => "descriptor chain loops or is longer than its table",
            ChainError::IndirectNotNegotiated => {
                "indirect descriptor, but INDIRECT_DESC was not negotiated"
            }
            ChainError::NestedIndirect => "indirect descriptor inside a chain or an indirect table",
            ChainError::IndirectWithNext => "indirect descriptor with the NEXT flag",
            ChainError::BadIndirectSize => "indirect table of invalid size",
            ChainError::ReadableAfterWritable => {
                "device-readable descriptor after a device-writable one"
            }
            ChainError::NoStatusByte => "no device-writable status byte",
            ChainError::StatusOutsideMemory => "status byte outside guest memory",
        })
    }
}

/// Why a request with a status byte is refused; [`Refusal::status`] is what the driver sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The device-readable part is shorter than the header, or not in guest memory.
    HeaderUnreadable,
    /// A write to an export that is not writable.
    ReadOnly,
    /// A read or write buffer is not in guest memory.
    DataOutsideMemory,
    /// The sector's byte offset does not fit in 64 bits.
    SectorOutOfRange { sector: u64 },
    /// Offset or length not a multiple of the logical block size.
    Unaligned {
        len: u64,
        sector: u64,
        block_size: u64,
    },
    /// The request reaches past the end of the disk.
    BeyondEnd {
        len: u64,
        sector: u64,
        capacity: u64,
    },
    /// A read whose data does not fit the used ring's 32-bit length.
    TooLong,
    /// More data segments than the device offers (`seg_max`).
    TooManySegments { count: u32, max: u32 },
    /// A data segment longer than the device offers (`size_max`).
    SegmentTooLong { len: u64, max: u32 },
    /// The GET_ID buffer is not in guest memory.
    GetIdOutsideMemory,
    /// Discard or write-zeroes on an export that does not offer it.
    NotOffered(RequestType),
    /// A discard or write-zeroes request with bad segments.
    BadSegments(RequestType, SegmentError),
    /// A request type the device does not know.
    Unsupported(u32),
}

impl Refusal {
    /// The status the driver gets.
    pub(crate) fn status(&self) -> u8 {
        match self {
            Refusal::NotOffered(_) | Refusal::Unsupported(_) => S_UNSUPP,
            Refusal::BadSegments(_, e) => e.status(),
            Refusal::HeaderUnreadable
            | Refusal::ReadOnly
            | Refusal::DataOutsideMemory
            | Refusal::SectorOutOfRange { .. }
            | Refusal::Unaligned { .. }
            | Refusal::BeyondEnd { .. }
            | Refusal::TooLong
            | Refusal::TooManySegments { .. }
            | Refusal::SegmentTooLong { .. }
            | Refusal::GetIdOutsideMemory => S_IOERR,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::HeaderUnreadable => {
                f.write_str("request header shorter than 16 bytes or outside guest memory")
            }
            Refusal::ReadOnly => f.write_str("write to a read-only export"),
            Refusal::DataOutsideMemory => f.write_str("data buffer outside guest memory"),
            Refusal::SectorOutOfRange { sector } => write!(f, "sector {sector} is out of range"),
            Refusal::Unaligned {
                len,
                sector,
                block_size,
            } => write!(
                f,
                "request of {len} bytes at sector {sector} is not aligned to the \
                 {block_size}-byte logical block size"
            ),
            Refusal::BeyondEnd {
                len,
                sector,
                capacity,
            } => write!(
                f,
                "request of {len} bytes at sector {sector} is beyond the end of the disk \
                 ({capacity} bytes)"
            ),
            Refusal::TooLong => f.write_str("request longer than 4 GiB"),
            Refusal::TooManySegments { count, max } => {
                write!(f, "{count} data segments (the device offers at most {max})")
            }
            Refusal::SegmentTooLong { len, max } => write!(
                f,
                "a data segment of {len} bytes (the device offers at most {max})"
            ),
            Refusal::GetIdOutsideMemory => f.write_str("GET_ID buffer outside guest memory"),
            Refusal::NotOffered(kind) => write!(f, "{} is not offered by this export", kind.name()),
            Refusal::BadSegments(kind, e) => write!(f, "{}: {e}", kind.name()),
            Refusal::Unsupported(other) => write!(f, "unsupported request type {other}"),
        }
    }
}

/// What is wrong with the segments of a discard or write-zeroes request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SegmentError {
    /// The segment data is empty or not a whole number of segments.
    Length { bytes: u64 },
    /// More segments than the device offers.
    TooMany { count: u64 },
    /// The segment data is not in guest memory.
    OutsideMemory,
    /// Flags the device does not know.
    UnknownFlags { flags: u32 },
    /// The unmap flag on a discard.
    UnmapNotAllowed,
    /// A segment longer than the device offers.
    TooManySectors { sectors: u32, max: u32 },
    /// A segment not aligned to the logical block size.
    Unaligned { sectors: u32, sector: u64 },
    /// A segment reaching past the end of the disk.
    BeyondEnd { sectors: u32, sector: u64 },
}

impl SegmentError {
    /// The status the driver gets.
    fn status(&self) -> u8 {
        match self {
            SegmentError::TooMany { .. }
            | SegmentError::UnknownFlags { .. }
            | SegmentError::UnmapNotAllowed => S_UNSUPP,
            SegmentError::Length { .. }
            | SegmentError::OutsideMemory
            | SegmentError::TooManySectors { .. }
            | SegmentError::Unaligned { .. }
            | SegmentError::BeyondEnd { .. } => S_IOERR,
        }
    }
}

impl fmt::Display for SegmentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SegmentError::Length { bytes } => write!(f, "segment data of {bytes} bytes"),
            SegmentError::TooMany { count } => {
                write!(f, "{count} segments (at most {MAX_ZERO_DISCARD_SEG})")
            }
            SegmentError::OutsideMemory => f.write_str("segment data outside guest memory"),
            SegmentError::UnknownFlags { flags } => write!(f, "unknown flags {flags:#x}"),
            SegmentError::UnmapNotAllowed => f.write_str("the unmap flag is not allowed"),
            SegmentError::TooManySectors { sectors, max } => {
                write!(f, "{sectors} sectors (at most {max})")
            }
            SegmentError::Unaligned { sectors, sector } => write!(
                f,
                "{sectors} sectors at {sector} not aligned to the logical block size"
            ),
            SegmentError::BeyondEnd { sectors, sector } => write!(
                f,
                "{sectors} sectors at {sector} are beyond the end of the disk"
            ),
        }
    }
}
