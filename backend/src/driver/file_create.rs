//! Creating a file as the `file` protocol does (QEMU's file-posix `raw_co_create`, reached by
//! QMP's `blockdev-create` with `driver=file`): the file is locked as a writer before it is
//! emptied, so an image another process serves is never cut, then sized with the
//! preallocation asked for.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use super::image_lock::{
    self, Permissions, PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE, PERM_WRITE_UNCHANGED,
};
use super::{CreateRequest, CreateTarget};
use crate::error::{BlockError, Result};

/// Largest run of zeroes written at once by `preallocation=full`.
const ZERO_CHUNK: usize = 1 << 20;

/// How the file's blocks are allocated (QEMU's PreallocMode, as far as a file has it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Preallocation {
    /// Sparse.
    Off,
    /// `fallocate`: blocks reserved, reading zeroes.
    Falloc,
    /// Zeroes written.
    Full,
}

/// The `file` protocol's create hook: options `preallocation` (off, falloc, full), `nocow`
/// and `extent_size_hint` (accepted; strata sets no file attributes, and QEMU applies them only
/// where the file system has them).
pub(super) fn create(req: CreateRequest<'_>) -> Result<Vec<(&'static str, String)>> {
    let CreateTarget::File(path) = req.target else {
        return Err(BlockError::new(
            libc::ENOTSUP,
            "Protocol 'file' creates files, not images on a node",
        ));
    };
    let mut options = req.options;
    let prealloc = match options.take("preallocation").as_deref() {
        None | Some("off") => Preallocation::Off,
        Some("falloc") => Preallocation::Falloc,
        Some("full") => Preallocation::Full,
        Some(other) => {
            return Err(BlockError::new(
                libc::ENOTSUP,
                format!("Unsupported preallocation mode: {other}"),
            ))
        }
    };
    options.take_bool("nocow")?;
    options.take_size("extent_size_hint")?;
    if let Some(key) = options.first_key() {
        return Err(BlockError::invalid(format!(
            "Invalid parameter '{key}' for protocol 'file' (it takes preallocation, nocow, \
             extent_size_hint)"
        )));
    }
    let name = path.display().to_string();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        // Emptied only once locked (below).
        .truncate(false)
        .open(path)
        .map_err(|e| BlockError::io(&e, format!("Could not create '{name}'")))?;
    // QEMU's creation takes WRITE and RESIZE and shares everything but RESIZE.
    image_lock::lock(
        &file,
        &name,
        Permissions {
            perm: PERM_WRITE | PERM_RESIZE,
            shared: PERM_CONSISTENT_READ | PERM_WRITE | PERM_WRITE_UNCHANGED,
        },
    )?;
    let resize = |e: std::io::Error| {
        BlockError::io(
            &e,
            format!("Could not resize file '{name}' to {} bytes", req.size),
        )
    };
    file.set_len(0).map_err(resize)?;
    match prealloc {
        Preallocation::Off => file.set_len(req.size).map_err(resize)?,
        Preallocation::Falloc => fallocate(&file, req.size)
            .map_err(|e| BlockError::io(&e, format!("Could not preallocate '{name}'")))?,
        Preallocation::Full => write_zeroes(&file, req.size)
            .map_err(|e| BlockError::io(&e, format!("Could not preallocate '{name}'")))?,
    }
    file.sync_all()
        .map_err(|e| BlockError::io(&e, format!("Could not write '{name}'")))?;
    let mode = match prealloc {
        Preallocation::Off => "off",
        Preallocation::Falloc => "falloc",
        Preallocation::Full => "full",
    };
    Ok(vec![
        ("size", req.size.to_string()),
        ("preallocation", mode.to_string()),
    ])
}

/// Reserves `size` bytes of blocks (the file's length becomes `size`).
fn fallocate(file: &File, size: u64) -> std::io::Result<()> {
    let len =
        libc::off_t::try_from(size).map_err(|_| std::io::Error::from_raw_os_error(libc::EFBIG))?;
    if len == 0 {
        return Ok(());
    }
    // SAFETY: fallocate on a descriptor this function borrows; it touches no memory.
    if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Writes `size` bytes of zeroes from the start.
fn write_zeroes(file: &File, size: u64) -> std::io::Result<()> {
    let zeroes = vec![0u8; ZERO_CHUNK];
    let mut at = 0u64;
    while at < size {
        let n = (size - at).min(ZERO_CHUNK as u64) as usize;
        file.write_all_at(&zeroes[..n], at)?;
        at += n as u64;
    }
    Ok(())
}
