//! virtio-blk requests as the device takes them from guest memory: a descriptor chain walked
//! ([`chain`]) and parsed into a typed request ([`parse`]) on buffers that point straight into
//! guest memory, or refused with a reason ([`error`]). Nothing here does I/O on the node; the
//! request's execution is [`crate::request_task`]'s.

mod chain;
mod error;
mod parse;

use std::ptr::NonNull;

use strata_backend::IoVec;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};

pub(crate) use chain::{prefetch_chains, walk_chain, Desc, DescTable, TableView};
pub(crate) use error::{ChainError, Refusal};
pub(crate) use parse::{parse, RequestType};

/// Status values of the last byte of a request.
pub(crate) const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
pub(crate) const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
pub(crate) const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// A discard / write-zeroes segment, checked against the disk.
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
        /// The bytes of `iov`, summed once by the parser.
        len: u64,
        iov: Vec<IoVec<'static>>,
    },
    Write {
        offset: u64,
        /// The bytes of `iov`, summed once by the parser.
        len: u64,
        iov: Vec<IoVec<'static>>,
    },
    Flush,
    GetId {
        iov: Vec<IoVec<'static>>,
    },
    Discard(Vec<Segment>),
    WriteZeroes(Vec<Segment>),
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bufs = |iov: &[IoVec<'_>]| -> Vec<(usize, usize)> {
            iov.iter().map(|v| (v.as_ptr() as usize, v.len())).collect()
        };
        match self {
            Op::Read { offset, iov, .. } => write!(f, "Read({offset}, {:?})", bufs(iov)),
            Op::Write { offset, iov, .. } => write!(f, "Write({offset}, {:?})", bufs(iov)),
            Op::Flush => write!(f, "Flush"),
            Op::GetId { iov } => write!(f, "GetId({:?})", bufs(iov)),
            Op::Discard(s) => write!(f, "Discard({s:?})"),
            Op::WriteZeroes(s) => write!(f, "WriteZeroes({s:?})"),
        }
    }
}

/// A request to execute.
#[derive(Debug)]
pub(crate) struct Parsed {
    pub op: Op,
    /// Where the status byte goes.
    pub status: StatusByte,
    /// Bytes of device-writable data the request fills on success (not counting the status).
    pub in_len: u32,
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
    #[inline]
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
    /// A request to execute.
    Request(Parsed),
    /// A request refused at once: its status byte gets `Refusal::status()`; the request's
    /// type when its header could be read.
    Refused(StatusByte, Refusal, Option<RequestType>),
    /// No status byte to report anything in: return the chain with nothing written.
    Drop(ChainError),
}
