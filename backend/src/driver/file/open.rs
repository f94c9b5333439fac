//! Opening a file or block device for the driver: the options `filename`, `aio`, `locking`
//! and `share-rw`, the read-write open with its auto-read-only fallback, the check that the
//! file is of the kind the driver serves (regular file or block device), and its size.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Mutex;

use arc_swap::ArcSwap;

use super::dio_alignment::io_limits;
use super::{FileDriver, IoFile};
use crate::driver::image_lock::{self, Permissions};
use crate::driver::{BlockDriver, FileId, OpenContext, OpenFuture};
use crate::error::{BlockError, Result};
use crate::flags::NodeFlags;

// A Linux block-device ioctl (linux/fs.h) that libc does not define.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// The size of block device `file` (BLKGETSIZE64).
pub(super) fn device_size(file: &File, filename: &str) -> Result<u64> {
    let mut bytes: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 into `bytes`, a valid local.
    if unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut bytes) } < 0 {
        return Err(BlockError::last_os_error(format!(
            "Could not get the size of '{filename}'"
        )));
    }
    Ok(bytes)
}

/// The `file` driver's open hook.
pub(super) fn open_file<'a>(ctx: &'a mut OpenContext<'_>) -> OpenFuture<'a> {
    Box::pin(std::future::ready(open_common(ctx, "file", false)))
}

/// The `host_device` driver's open hook.
pub(super) fn open_host_device<'a>(ctx: &'a mut OpenContext<'_>) -> OpenFuture<'a> {
    Box::pin(std::future::ready(open_common(ctx, "host_device", true)))
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

/// Opens `filename` for reading, and writing when `write`, with O_DIRECT when `direct`.
pub(super) fn open_for(filename: &str, write: bool, direct: bool) -> std::io::Result<File> {
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
