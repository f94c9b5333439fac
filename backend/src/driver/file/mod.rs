//! Protocol drivers `file` (regular files) and `host_device` (block devices), on io_uring.
//!
//! With `cache.direct=on` the file is opened O_DIRECT and its alignment is read from
//! `statx(STATX_DIOALIGN)` or the device's logical block size, or probed by trial reads;
//! the node above widens and bounces requests that do not meet it.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use io_uring::{opcode, types};

use super::image_lock::{self, Permissions};
use super::{
    BlockDriver, DriverInfo, DriverKind, FileId, IoFuture, Limits, OpenContext, OpenFuture,
};
use crate::error::{BlockError, Result};
use crate::flags::NodeFlags;
use crate::io::blocking::run_blocking;
use crate::io::bounce::BounceBuffer;
use crate::io::iovec::{self, IoVec};
use crate::io::reactor::{check, Reactor};

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

// Linux block-device ioctls (linux/fs.h) that libc does not define.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKDISCARD: libc::c_ulong = 0x1277;

/// Largest chunk written at once when zeroes must be written as data.
const ZERO_CHUNK: u64 = 1 << 20;

/// The size of block device `file` (BLKGETSIZE64).
fn device_size(file: &File, filename: &str) -> Result<u64> {
    let mut bytes: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 into `bytes`, a valid local.
    if unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut bytes) } < 0 {
        return Err(BlockError::last_os_error(format!(
            "Could not get the size of '{filename}'"
        )));
    }
    Ok(bytes)
}

fn probe_device(filename: &str) -> u32 {
    match std::fs::metadata(filename) {
        Ok(m) if m.file_type().is_block_device() => 100,
        _ => 0,
    }
}

fn open_file<'a>(ctx: &'a mut OpenContext<'_>) -> OpenFuture<'a> {
    Box::pin(std::future::ready(open_common(ctx, "file", false)))
}

fn open_host_device<'a>(ctx: &'a mut OpenContext<'_>) -> OpenFuture<'a> {
    Box::pin(std::future::ready(open_common(ctx, "host_device", true)))
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

/// A prepared reopen: the new descriptor (when one is needed), the lock permissions before
/// and after (already taken), and whether the node flushes at close afterwards.
struct StagedReopen {
    io: Option<Arc<IoFile>>,
    permissions: (Permissions, Permissions),
    flush_on_close: bool,
}

fn open_common(
    ctx: &mut OpenContext<'_>,
    driver: &str,
    want_device: bool,
) -> Result<Box<dyn BlockDriver>> {
    let filename = ctx.options.take("filename").ok_or_else(|| {
        BlockError::invalid(format!("The '{driver}' block driver requires a file name"))
    })?;
    let filename = filename
        .strip_prefix(&format!("{driver}:"))
        .unwrap_or(&filename)
        .to_string();
    match ctx.options.take("aio").as_deref() {
        None | Some("io_uring") => {}
        Some(other @ ("threads" | "native")) => {
            log::info!("{filename}: aio={other} requested; strata always uses io_uring")
        }
        Some(other) => {
            return Err(BlockError::invalid(format!(
                "Parameter 'aio' expects 'io_uring', 'native' or 'threads', got '{other}'"
            )))
        }
    }
    let locking = match ctx.options.take("locking").as_deref() {
        None | Some("auto" | "on") => true,
        Some("off") => false,
        Some(other) => {
            return Err(BlockError::invalid(format!(
                "Parameter 'locking' expects 'auto', 'on' or 'off', got '{other}'"
            )))
        }
    };
    let share_writes = ctx.options.take_bool("share-rw")?.unwrap_or(false);
    let (file, read_only) = open_file_with_fallback(&filename, &ctx.flags)?;
    ctx.flags.read_only = read_only;
    let meta = file
        .metadata()
        .map_err(|e| BlockError::io(&e, format!("Could not stat '{filename}'")))?;
    let block_device = meta.file_type().is_block_device();
    if want_device && !block_device {
        return Err(BlockError::invalid(format!(
            "'host_device' driver requires '{filename}' to be a block device"
        )));
    }
    if !want_device && !meta.file_type().is_file() {
        return Err(BlockError::invalid(format!(
            "'file' driver requires '{filename}' to be a regular file{}",
            if block_device {
                " (use driver=host_device for block devices)"
            } else {
                ""
            }
        )));
    }
    // Locked once the file is known to be what the driver serves (a wrong type is the more
    // useful error).
    if locking {
        image_lock::lock(
            &file,
            &filename,
            Permissions::for_device(!read_only, share_writes),
        )?;
    }
    let size = if block_device {
        device_size(&file, &filename)?
    } else {
        meta.len()
    };
    let limits = io_limits(&file, &filename, block_device, ctx.flags.cache_direct)?;
    Ok(Box::new(FileDriver {
        id: FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        },
        io: ArcSwap::from_pointee(IoFile {
            file,
            writable: !read_only,
            direct: ctx.flags.cache_direct,
            limits,
        }),
        first: Mutex::new(None),
        locking,
        share_writes,
        filename,
        block_device,
        size: AtomicU64::new(size),
        flush_on_close: AtomicBool::new(!read_only && !ctx.flags.cache_no_flush),
        staged: Mutex::new(None),
    }))
}

/// The limits of requests on `file`: O_DIRECT's alignment when `direct`.
fn io_limits(file: &File, filename: &str, block_device: bool, direct: bool) -> Result<Limits> {
    let mut limits = Limits::default();
    if direct {
        let (request, memory) = dio_alignment(file, block_device)
            .map_err(|e| e.context(format!("'{filename}' with cache.direct=on")))?;
        limits.request_alignment = request;
        limits.min_mem_alignment = memory;
        limits.opt_mem_alignment = memory.max(4096);
        log::debug!("{filename}: O_DIRECT alignment: requests {request}, memory {memory}");
    }
    Ok(limits)
}

/// Opens `filename` for reading, and writing when `write`, with O_DIRECT when `direct`.
fn open_for(filename: &str, write: bool, direct: bool) -> std::io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(write);
    let mut flags = libc::O_CLOEXEC;
    if direct {
        flags |= libc::O_DIRECT;
    }
    o.custom_flags(flags);
    o.open(filename)
}

/// Opens read-write unless read-only; with auto-read-only, falls back to read-only.
fn open_file_with_fallback(filename: &str, flags: &NodeFlags) -> Result<(File, bool)> {
    let open = |write: bool| open_for(filename, write, flags.cache_direct);
    if flags.read_only {
        return open(false)
            .map(|f| (f, true))
            .map_err(|e| BlockError::io(&e, format!("Could not open '{filename}'")));
    }
    match open(true) {
        Ok(f) => Ok((f, false)),
        Err(e)
            if flags.auto_read_only
                && matches!(
                    e.raw_os_error(),
                    Some(libc::EACCES | libc::EROFS | libc::EPERM)
                ) =>
        {
            log::info!("{filename}: opening read-only (auto-read-only): {e}");
            open(false)
                .map(|f| (f, true))
                .map_err(|e| BlockError::io(&e, format!("Could not open '{filename}'")))
        }
        Err(e) => Err(BlockError::io(&e, format!("Could not open '{filename}'"))),
    }
}

/// O_DIRECT alignment (request, memory): statx(STATX_DIOALIGN), the logical block size of a
/// device, or trial reads when the kernel reports neither.
fn dio_alignment(file: &File, block_device: bool) -> Result<(u32, usize)> {
    let fd = file.as_raw_fd();
    // SAFETY: an all-zero statx is a valid value of this plain C struct.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let empty = CString::default();
    // SAFETY: statx with AT_EMPTY_PATH reads `fd` and writes into `stx`, a valid local.
    let r = unsafe {
        libc::statx(
            fd,
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    let (mut request, mut memory) = (0u32, 0usize);
    if r == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_offset_align != 0 {
        request = stx.stx_dio_offset_align;
        memory = stx.stx_dio_mem_align as usize;
    }
    if block_device {
        let mut lbs: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int into `lbs`, a valid local.
        if unsafe { libc::ioctl(fd, libc::BLKSSZGET, &mut lbs) } == 0 && lbs > 0 {
            request = request.max(lbs as u32);
        }
    }
    if request == 0 {
        request = probe_request_alignment(fd)?;
    }
    if memory == 0 {
        memory = probe_memory_alignment(fd, request);
    }
    if !request.is_power_of_two() || !memory.is_power_of_two() {
        return Err(BlockError::invalid(format!(
            "unusable O_DIRECT alignment: offsets {request}, memory {memory}"
        )));
    }
    Ok((request, memory))
}

const PROBE_SIZES: [u32; 8] = [1, 512, 1024, 2048, 4096, 8192, 16384, 65536];

fn probe_request_alignment(fd: i32) -> Result<u32> {
    let mut buf = BounceBuffer::new(65536)?;
    for size in PROBE_SIZES {
        // SAFETY: reads at most `size` <= 65536 bytes into our own buffer of that capacity.
        let r =
            unsafe { libc::pread(fd, buf.as_mut_slice().as_mut_ptr().cast(), size as usize, 0) };
        if r >= 0 {
            return Ok(size);
        }
    }
    Err(BlockError::invalid(
        "Could not find a working O_DIRECT alignment; try cache.direct=off",
    ))
}

fn probe_memory_alignment(fd: i32, request: u32) -> usize {
    let Ok(mut buf) = BounceBuffer::new(65536 + 8192) else {
        return 4096;
    };
    for align in [1usize, 512, 1024, 2048, 4096] {
        let slice = &mut buf.as_mut_slice()[align..];
        // SAFETY: reads `request` <= 65536 bytes into the buffer past `align` <= 4096 bytes.
        let r = unsafe { libc::pread(fd, slice.as_mut_ptr().cast(), request as usize, 0) };
        if r >= 0 {
            return align;
        }
    }
    4096
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

    /// A reopen's first step: a new descriptor when the file must become writable or change
    /// O_DIRECT (the same file: its device and inode are checked), and the lock permissions of
    /// the new flags (a conflict with another user is an error, as in QEMU).
    fn prepare_reopen(&self, old: &NodeFlags, new: &NodeFlags) -> Result<()> {
        let current = self.io.load_full();
        let write = !new.read_only;
        let io = if (write && !current.writable) || new.cache_direct != current.direct {
            let file = open_for(&self.filename, write, new.cache_direct)
                .map_err(|e| BlockError::io(&e, format!("Could not reopen '{}'", self.filename)))?;
            let meta = file
                .metadata()
                .map_err(|e| BlockError::io(&e, format!("Could not stat '{}'", self.filename)))?;
            if (meta.dev(), meta.ino()) != (self.id.dev, self.id.ino) {
                return Err(BlockError::invalid(format!(
                    "Could not reopen '{}': it is no longer the file the node opened",
                    self.filename
                )));
            }
            let limits = io_limits(&file, &self.filename, self.block_device, new.cache_direct)?;
            Some(Arc::new(IoFile {
                file,
                writable: write,
                direct: new.cache_direct,
                limits,
            }))
        } else {
            None
        };
        let permissions = (
            Permissions::for_device(!old.read_only, self.share_writes),
            Permissions::for_device(!new.read_only, self.share_writes),
        );
        if self.locking && permissions.0 != permissions.1 {
            let holder = self.lock_holder();
            image_lock::change(&holder.file, &self.filename, permissions.0, permissions.1)?;
        }
        *self.lock_staged() = Some(StagedReopen {
            io,
            permissions,
            flush_on_close: !new.read_only && !new.cache_no_flush,
        });
        Ok(())
    }

    /// The descriptor whose open file description holds the image locks: the first one.
    fn lock_holder(&self) -> Arc<IoFile> {
        let first = self.first.lock().unwrap_or_else(|p| p.into_inner());
        first.clone().unwrap_or_else(|| self.io.load_full())
    }

    fn lock_staged(&self) -> std::sync::MutexGuard<'_, Option<StagedReopen>> {
        // Each change is one assignment, so a poisoned lock is still consistent.
        self.staged.lock().unwrap_or_else(|p| p.into_inner())
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
        if let Some(staged) = self.lock_staged().take() {
            if let Some(io) = staged.io {
                // No request is in flight: the old descriptor closes here, unused, unless it
                // is the first one, which keeps the locks.
                let old = self.io.swap(io);
                let mut first = self.first.lock().unwrap_or_else(|p| p.into_inner());
                first.get_or_insert(old);
            }
            self.flush_on_close
                .store(staged.flush_on_close, Ordering::Relaxed);
        }
    }

    fn reopen_abort(&self) {
        let Some(staged) = self.lock_staged().take() else {
            return;
        };
        let (before, after) = staged.permissions;
        if self.locking && before != after {
            // Giving back what was taken; taking back what was given up may meet a new user.
            let holder = self.lock_holder();
            if let Err(e) = image_lock::change(&holder.file, &self.filename, after, before) {
                log::warn!(
                    "{}: could not restore its lock permissions: {e}",
                    self.filename
                );
            }
        }
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
