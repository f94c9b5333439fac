//! The driver API: what an open driver instance does for its node (`BlockDriver`), and the
//! limits and status types it reports. Nothing here knows about nodes or the graph.

use std::future::Future;
use std::pin::Pin;

use crate::error::{BlockError, Result};
use crate::flags::NodeFlags;
use crate::io::iovec::IoVec;

/// A boxed future of a driver operation, borrowing the driver and the request's buffers.
pub type IoFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + 'a>>;

/// [`BlockDriver::reopen_prepare`] for a driver that holds nothing a flag change affects (no
/// file of its own; a child applies its own flags, as a reopen lists it too): every change is
/// fine.
pub fn accept_any_reopen<'a>() -> IoFuture<'a, ()> {
    Box::pin(std::future::ready(Ok(())))
}

/// Alignment and size limits of a node's requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Offsets and lengths must be multiples of this (O_DIRECT's logical block size), else the
    /// node widens the request (and read-modify-writes).
    pub request_alignment: u32,
    /// Every buffer's address and length must be a multiple of this, else the node bounces.
    pub min_mem_alignment: usize,
    /// Preferred buffer alignment.
    pub opt_mem_alignment: usize,
    /// Largest request in bytes the driver takes at once (0: no limit).
    pub max_transfer: u64,
    /// Most buffers in one request.
    pub max_iov: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            request_alignment: 1,
            min_mem_alignment: 1,
            opt_mem_alignment: 1,
            max_transfer: 0,
            max_iov: libc::UIO_MAXIOV as usize,
        }
    }
}

/// The identity of a file or device (`st_dev`, `st_ino`): two names of one file have the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    /// Device of the file system holding the file.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
}

/// Whether a range holds data, reads as zeroes, or is not allocated in this layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatus {
    /// Data is present (in this node or below).
    pub data: bool,
    /// The range reads as zeroes.
    pub zero: bool,
    /// Length of the range this status applies to, from the queried offset.
    pub len: u64,
}

/// The operations of an open driver instance. The node around it checks bounds, read-only,
/// alignment and the discard policy before calling these, so drivers see only valid requests.
pub trait BlockDriver: Send + Sync {
    /// Size of the node in bytes.
    fn size(&self) -> u64;

    /// Request limits.
    fn limits(&self) -> Limits {
        Limits::default()
    }

    /// The filename shown in queries.
    fn filename(&self) -> String {
        String::new()
    }

    /// The file or device a protocol driver opened, if any.
    fn file_id(&self) -> Option<FileId> {
        None
    }

    /// Whether discard reaches storage (else the node completes discards itself).
    fn supports_discard(&self) -> bool {
        false
    }

    /// Whether writes past the end extend the node (a regular file under a format driver).
    fn can_grow(&self) -> bool {
        false
    }

    /// Whether requests travel over the network to a storage cluster (rbd): they take a
    /// round trip far longer than an export's poll window.
    fn remote(&self) -> bool {
        false
    }

    /// Changes the size to `size` bytes (QMP's `block_resize`); the node checks that it is
    /// writable first. Drivers that cannot resize keep this default, which says so.
    fn truncate(&self, _size: u64) -> IoFuture<'_, ()> {
        Box::pin(async {
            Err(crate::error::BlockError::new(
                libc::ENOTSUP,
                "this driver cannot resize its node",
            ))
        })
    }

    /// Reads into `iov` from `offset`.
    fn read<'a>(&'a self, offset: u64, iov: &'a [IoVec<'a>]) -> IoFuture<'a, ()>;

    /// Writes `iov` at `offset`.
    fn write<'a>(&'a self, offset: u64, iov: &'a [IoVec<'a>]) -> IoFuture<'a, ()>;

    /// Makes completed writes durable.
    fn flush(&self) -> IoFuture<'_, ()>;

    /// Frees a range; afterwards it reads as zeroes or as before (the caller may not rely).
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()>;

    /// Makes a range read as zeroes; with `may_unmap` it may free the space.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> IoFuture<'_, ()>;

    /// Makes a range read as zeroes without writing zero data (QEMU's
    /// `BDRV_REQ_NO_FALLBACK`), growing a file that ends before the range's end. ENOTSUP
    /// where the storage could only write the zeroes: the caller then writes them itself,
    /// next to the data it writes anyway.
    fn write_zeroes_without_data(&self, _offset: u64, _len: u64) -> IoFuture<'_, ()> {
        Box::pin(std::future::ready(Err(BlockError::new(
            libc::ENOTSUP,
            "this driver cannot zero a range without writing zeroes",
        ))))
    }

    /// Allocation status at `offset` (up to `len` bytes).
    fn block_status(&self, _offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        Box::pin(async move {
            Ok(BlockStatus {
                data: true,
                zero: false,
                len,
            })
        })
    }

    /// Prepares a change of the node's flags from `old` to `new` (QMP's `blockdev-reopen`),
    /// called while no request is in flight on the node. What requests see changes only in
    /// [`reopen_commit`](Self::reopen_commit); [`reopen_abort`](Self::reopen_abort) undoes
    /// the rest. The node itself applies read-only, cache.no-flush, discard and detect-zeroes;
    /// this default refuses what a driver must do something for (becoming writable, changing
    /// cache.direct).
    fn reopen_prepare<'a>(&'a self, old: &NodeFlags, new: &NodeFlags) -> IoFuture<'a, ()> {
        let result = if old.read_only && !new.read_only {
            Err(BlockError::new(
                libc::ENOTSUP,
                "this driver cannot become writable while open",
            ))
        } else if old.cache_direct != new.cache_direct {
            Err(BlockError::new(
                libc::ENOTSUP,
                "this driver cannot change cache.direct while open",
            ))
        } else {
            Ok(())
        };
        Box::pin(std::future::ready(result))
    }

    /// Applies what [`reopen_prepare`](Self::reopen_prepare) prepared; cannot fail.
    fn reopen_commit(&self) {}

    /// Drops what [`reopen_prepare`](Self::reopen_prepare) prepared.
    fn reopen_abort(&self) {}

    /// Called once when the node closes, after its last request: write back what the driver
    /// caches and make it durable. Errors are logged by the node.
    fn close(&self) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}
