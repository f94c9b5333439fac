//! Protocol drivers `file` (regular files) and `host_device` (block devices), on io_uring:
//! the driver and its requests. Opening ([`open`]), O_DIRECT alignment ([`dio_alignment`])
//! and reopening ([`reopen`]) live in their own modules.

mod dio_alignment;
mod open;
mod reopen;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use io_uring::{opcode, types};

use super::{BlockDriver, DriverInfo, DriverKind, FileId, IoFuture, Limits};
use crate::error::{BlockError, Result};
use crate::flags::NodeFlags;
use crate::io::blocking::run_blocking;
use crate::io::bounce::BounceBuffer;
use crate::io::iovec::{self, IoVec};
use crate::io::reactor::{check, Reactor};
use open::{device_size, open_file, open_host_device};
use reopen::StagedReopen;

/// The `file` protocol driver.
pub const FILE_DRIVER: DriverInfo = DriverInfo {
    name: "file",
    kind: DriverKind::Protocol,
    protocol_prefix: Some("file"),
    probe_device: None,
    open: open_file,
    create: Some(super::file_create::create),
};

/// The `host_device` protocol driver.
pub const HOST_DEVICE_DRIVER: DriverInfo = DriverInfo {
    name: "host_device",
    kind: DriverKind::Protocol,
    protocol_prefix: Some("host_device"),
    probe_device: Some(probe_device),
    open: open_host_device,
    create: None,
};

// A Linux block-device ioctl (linux/fs.h) that libc does not define.
const BLKDISCARD: libc::c_ulong = 0x1277;

/// Largest chunk written at once when zeroes must be written as data.
const ZERO_CHUNK: u64 = 1 << 20;

/// How sure the `host_device` driver is that it serves `filename`: a block device.
fn probe_device(filename: &str) -> u32 {
    match std::fs::metadata(filename) {
        Ok(m) if m.file_type().is_block_device() => 100,
        _ => 0,
    }
}

/// An open file or block device.
pub struct FileDriver {
    /// The descriptor requests use; a reopen replaces it while no request is in flight.
    io: ArcSwap<IoFile>,
    /// The first descriptor, kept once a reopen replaced it: its open file description holds
    /// the image locks for the driver's life (a reopen changes their permissions in place).
    first: Mutex<Option<Arc<IoFile>>>,
    locking: bool,
    share_writes: bool,
    id: FileId,
    filename: String,
    block_device: bool,
    /// Grows when a format driver writes past the end (`Node::write_growing`).
    size: AtomicU64,
    flush_on_close: AtomicBool,
    /// What `reopen_prepare` prepared, until commit or abort.
    staged: Mutex<Option<StagedReopen>>,
}

/// A descriptor of the file, with what it was opened for.
struct IoFile {
    file: File,
    writable: bool,
    direct: bool,
    limits: Limits,
}

impl FileDriver {
    fn reactor() -> Result<std::rc::Rc<Reactor>> {
        Reactor::current()
    }

    fn fd(&self) -> types::Fd {
        // The descriptor stays open after the guard goes: it is replaced only while no
        // request is in flight (see `reopen_prepare`).
        types::Fd(self.io.load().file.as_raw_fd())
    }

    /// Reads or writes all of `iov`, resubmitting after short transfers.
    async fn transfer(&self, write: bool, offset: u64, iov: &[IoVec<'_>]) -> crate::Result<()> {
        let reactor = Self::reactor()?;
        let total = iovec::total_len(iov);
        let mut done = 0u64;
        while done < total {
            let rest;
            let part: &[IoVec<'_>] = if done == 0 {
                iov
            } else {
                rest = iovec::sub_iov(iov, done as usize, (total - done) as usize);
                &rest
            };
            let at = offset + done;
            let raw = iovec::as_raw(part);
            let entry = match (write, raw) {
                // One buffer: at most what one read(2) moves (MAX_RW_COUNT), which fits the
                // entry's u32 length; the loop goes on after the short transfer.
                (false, [one]) => {
                    opcode::Read::new(self.fd(), one.iov_base.cast(), rw_len(one.iov_len))
                        .offset(at)
                        .build()
                }
                (true, [one]) => {
                    opcode::Write::new(self.fd(), one.iov_base.cast(), rw_len(one.iov_len))
                        .offset(at)
                        .build()
                }
                (false, _) => opcode::Readv::new(self.fd(), raw.as_ptr(), raw.len() as u32)
                    .offset(at)
                    .build(),
                (true, _) => opcode::Writev::new(self.fd(), raw.as_ptr(), raw.len() as u32)
                    .offset(at)
                    .build(),
            };
            // SAFETY: the buffers and the iovec array `raw` are borrowed by this future until
            // the operation completes; dropping the op waits for the kernel.
            let res = unsafe { reactor.op(entry) }.await?;
            let n = check(res, || {
                format!(
                    "{} of {} bytes at offset {at} on '{}' failed",
                    if write { "write" } else { "read" },
                    total - done,
                    self.filename
                )
            })? as u64;
            if n == 0 {
                if write {
                    return Err(BlockError::new(
                        libc::EIO,
                        format!(
                            "write at offset {at} on '{}' made no progress",
                            self.filename
                        ),
                    ));
                }
                // End of file: the rest reads as zeroes.
                iovec::zero_iov(iov, done as usize);
                return Ok(());
            }
            done += n;
        }
        if write {
            self.size.fetch_max(offset + total, Ordering::AcqRel);
        }
        Ok(())
    }

    async fn fallocate(&self, mode: i32, offset: u64, len: u64) -> Result<()> {
        let reactor = Self::reactor()?;
        let entry = opcode::Fallocate::new(self.fd(), len)
            .offset(offset)
            .mode(mode)
            .build();
        // SAFETY: fallocate references no memory.
        let res = unsafe { reactor.op(entry) }.await?;
        check(res, || {
            format!(
                "fallocate of {len} bytes at {offset} on '{}' failed",
                self.filename
            )
        })?;
        Ok(())
    }

    /// BLKDISCARD on a block device. io_uring has no discard for block devices before
    /// Linux 6.12 (and fallocate on one zeroes instead), and the ioctl blocks until the device
    /// is done, so it runs on a helper thread, never on the queue's worker.
    async fn discard_device(&self, offset: u64, len: u64) -> Result<()> {
        let file =
            self.io.load().file.try_clone().map_err(|e| {
                BlockError::io(&e, format!("Could not discard on '{}'", self.filename))
            })?;
        let res = run_blocking(move || {
            let range: [u64; 2] = [offset, len];
            // SAFETY: BLKDISCARD reads a [u64; 2] range from a valid local; `file` is an owned
            // duplicate of the descriptor, open for the whole call.
            if unsafe { libc::ioctl(file.as_raw_fd(), BLKDISCARD, range.as_ptr()) } < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        })
        .await?;
        res.map_err(|e| {
            BlockError::io(
                &e,
                format!(
                    "discard of {len} bytes at {offset} on '{}' failed",
                    self.filename
                ),
            )
        })
    }

    async fn write_zero_data(&self, offset: u64, len: u64) -> Result<()> {
        let mut zeroes = BounceBuffer::new(len.min(ZERO_CHUNK) as usize)?;
        zeroes.as_mut_slice().fill(0);
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(ZERO_CHUNK) as usize;
            let buf = &mut zeroes.as_mut_slice()[..n];
            self.transfer(true, at, &[IoVec::new(buf)]).await?;
            at += n as u64;
        }
        Ok(())
    }
}

/// Most bytes one read or write moves in Linux (MAX_RW_COUNT: INT_MAX rounded down to a page).
const MAX_RW_COUNT: usize = 0x7fff_f000;

/// The length of a one-buffer read or write entry: a longer buffer is moved in several.
fn rw_len(len: usize) -> u32 {
    len.min(MAX_RW_COUNT) as u32
}

fn unsupported(e: &BlockError) -> bool {
    matches!(e.errno(), libc::EOPNOTSUPP | libc::ENOTTY | libc::EINVAL)
}

impl BlockDriver for FileDriver {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn can_grow(&self) -> bool {
        !self.block_device
    }

    fn file_id(&self) -> Option<FileId> {
        Some(self.id)
    }

    /// A regular file is truncated (grown sparse or shrunk); a block device cannot change
    /// size, so its size is read again (it may have been grown underneath) and `size` must
    /// not exceed it, as in QEMU.
    fn truncate(&self, size: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.block_device {
                let actual = device_size(&self.io.load().file, &self.filename)?;
                self.size.store(actual, Ordering::Release);
                if size > actual {
                    return Err(BlockError::new(
                        libc::EINVAL,
                        format!(
                            "Cannot grow device files: '{}' has {actual} bytes",
                            self.filename
                        ),
                    ));
                }
                return Ok(());
            }
            self.io
                .load()
                .file
                .set_len(size)
                .map_err(|e| BlockError::io(&e, format!("Could not resize '{}'", self.filename)))?;
            self.size.store(size, Ordering::Release);
            Ok(())
        })
    }

    fn limits(&self) -> Limits {
        self.io.load().limits
    }

    fn reopen_prepare<'a>(&'a self, old: &NodeFlags, new: &NodeFlags) -> IoFuture<'a, ()> {
        Box::pin(std::future::ready(self.prepare_reopen(old, new)))
    }

    fn reopen_commit(&self) {
        self.commit_reopen();
    }

    fn reopen_abort(&self) {
        self.abort_reopen();
    }

    fn filename(&self) -> String {
        self.filename.clone()
    }

    fn supports_discard(&self) -> bool {
        true
    }

    fn read<'a>(&'a self, offset: u64, iov: &'a [IoVec<'a>]) -> IoFuture<'a, ()> {
        Box::pin(self.transfer(false, offset, iov))
    }

    fn write<'a>(&'a self, offset: u64, iov: &'a [IoVec<'a>]) -> IoFuture<'a, ()> {
        Box::pin(self.transfer(true, offset, iov))
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let reactor = Self::reactor()?;
            let entry = opcode::Fsync::new(self.fd())
                .flags(types::FsyncFlags::DATASYNC)
                .build();
            // SAFETY: fsync references no memory.
            let res = unsafe { reactor.op(entry) }.await?;
            check(res, || format!("flush of '{}' failed", self.filename))?;
            Ok(())
        })
    }

    fn close(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            // The node is gone, so no request is in flight: make what was written durable.
            if self.flush_on_close.load(Ordering::Relaxed) {
                self.flush().await?;
            }
            Ok(())
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let r = if self.block_device {
                self.discard_device(offset, len).await
            } else {
                self.fallocate(
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset,
                    len,
                )
                .await
            };
            match r {
                // Discard is advisory: storage that cannot free space keeps the data.
                Err(e) if unsupported(&e) => Ok(()),
                r => r,
            }
        })
    }

    fn write_zeroes_without_data(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.block_device {
                // As in QEMU: a block device zeroes in place only through BLKZEROOUT or
                // fallocate(ZERO_RANGE), which fall back to writing zero pages in the kernel,
                // and its unmapping zero-out (PUNCH_HOLE) waits for the device on an io_uring
                // helper thread: slower on a loop device than writing the zeroes (measured).
                return Err(BlockError::new(
                    libc::ENOTSUP,
                    format!("'{}' is a block device", self.filename),
                ));
            }
            // Zeroed extents (unwritten ones on ext4 and XFS); without KEEP_SIZE the file
            // grows to cover them, as QEMU's file driver does.
            match self
                .fallocate(libc::FALLOC_FL_ZERO_RANGE, offset, len)
                .await
            {
                Ok(()) => {
                    self.size.fetch_max(offset + len, Ordering::AcqRel);
                    Ok(())
                }
                Err(e) if unsupported(&e) => Err(BlockError::new(
                    libc::ENOTSUP,
                    format!(
                        "'{}' cannot zero a range without writing zeroes: {e}",
                        self.filename
                    ),
                )),
                Err(e) => Err(e),
            }
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            // On a block device, fallocate zeroes (blkdev_fallocate): ZERO_RANGE is BLKZEROOUT,
            // PUNCH_HOLE zeroes by unmapping where the device guarantees zeroes after it.
            let mode = if may_unmap {
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
            } else {
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
            };
            let r = match self.fallocate(mode, offset, len).await {
                Err(e) if may_unmap && unsupported(&e) => {
                    let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
                    self.fallocate(mode, offset, len).await
                }
                r => r,
            };
            match r {
                Err(e) if unsupported(&e) => self.write_zero_data(offset, len).await,
                r => r,
            }
        })
    }
}
