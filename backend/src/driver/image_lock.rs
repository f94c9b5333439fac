//! Image locking that QEMU, qemu-img, qemu-storage-daemon and strata all respect: QEMU's
//! file-posix scheme of open file description (OFD) byte-range locks.
//!
//! Each permission a user of the image takes (consistent read, write, write-unchanged,
//! resize) is a shared lock on byte 100 + bit; each permission it does not share with others
//! is a shared lock on byte 200 + bit. An opener holding a permission conflicts with any lock
//! on the "not shared" byte of that permission, and an opener not sharing a permission
//! conflicts with any lock on its "held" byte. So while strata serves an image read-write,
//! `qemu-img info` says it is in use, a second writer is refused, and `qemu-img info -U`
//! (which shares everything) still works; and strata refuses an image another process writes.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::error::{BlockError, Result};

/// Reading data that is consistent (QEMU's BLK_PERM_CONSISTENT_READ).
pub(crate) const PERM_CONSISTENT_READ: u32 = 1 << 0;
/// Writing (BLK_PERM_WRITE).
pub(crate) const PERM_WRITE: u32 = 1 << 1;
/// Writes that do not change what is read (BLK_PERM_WRITE_UNCHANGED).
pub(crate) const PERM_WRITE_UNCHANGED: u32 = 1 << 2;
/// Changing the size (BLK_PERM_RESIZE).
pub(crate) const PERM_RESIZE: u32 = 1 << 3;

/// QEMU's names of the permissions, by bit, as its error messages use them.
const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];
/// First lock byte of the held permissions.
const LOCK_PERM_BASE: i64 = 100;
/// First lock byte of the permissions not shared.
const LOCK_SHARED_BASE: i64 = 200;

/// What an opener of an image takes and what it lets others take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Permissions {
    /// Permissions held.
    pub perm: u32,
    /// Permissions others may hold at the same time.
    pub shared: u32,
}

impl Permissions {
    /// What a QEMU virtio-blk device takes: a writable one writes (and, under a format, may
    /// grow the file) and does not let others write unless `share_writes`; any user lets
    /// others read and write unchanged data.
    pub(crate) fn for_device(writable: bool, share_writes: bool) -> Self {
        let mut shared = PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED;
        if share_writes {
            shared |= PERM_WRITE | PERM_RESIZE;
        }
        let perm = if writable {
            PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE
        } else {
            // Nobody resizes what a reader reads, but it may grow under it (QEMU's resizable
            // devices share RESIZE).
            shared |= PERM_RESIZE;
            PERM_CONSISTENT_READ
        };
        Permissions { perm, shared }
    }
}

fn ofd_lock(file: &File, cmd: libc::c_int, kind: libc::c_int, byte: i64) -> std::io::Result<i16> {
    // SAFETY: an all-zero `flock` is valid (plain integers); l_pid must be 0 for OFD locks.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    // SAFETY: F_OFD_SETLK/F_OFD_GETLK read (and GETLK writes) the `flock` we pass, which
    // lives for the call; the descriptor is open for as long as `file`.
    if unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fl.l_type)
}

/// Whether another open file description holds a lock on `byte`.
fn locked_by_others(file: &File, byte: i64) -> std::io::Result<bool> {
    Ok(ofd_lock(file, libc::F_OFD_GETLK, libc::F_WRLCK, byte)? != libc::F_UNLCK as i16)
}

/// How long a conflict may last before it is an error: a process that was just killed can
/// hold its image for a moment (its io_uring is torn down after the process is reaped), and a
/// restarted daemon must not fail on that.
const CONFLICT_GRACE: Duration = Duration::from_secs(1);

/// Takes the lock bytes of `p` on `file` (released when it is closed) and checks that no other
/// user of the image conflicts, as QEMU's raw_apply_lock_bytes and raw_check_lock_bytes do.
pub(crate) fn lock(file: &File, filename: &str, p: Permissions) -> Result<()> {
    let io = |e: std::io::Error| BlockError::io(&e, format!("Could not lock '{filename}'"));
    for bit in 0..PERM_NAMES.len() {
        let mask = 1u32 << bit;
        if p.perm & mask != 0 {
            ofd_lock(
                file,
                libc::F_OFD_SETLK,
                libc::F_RDLCK,
                LOCK_PERM_BASE + bit as i64,
            )
            .map_err(io)?;
        }
        if p.shared & mask == 0 {
            ofd_lock(
                file,
                libc::F_OFD_SETLK,
                libc::F_RDLCK,
                LOCK_SHARED_BASE + bit as i64,
            )
            .map_err(io)?;
        }
    }
    let start = Instant::now();
    loop {
        match conflict(file, p).map_err(io)? {
            None => return Ok(()),
            Some(_) if start.elapsed() < CONFLICT_GRACE => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Some(what) => {
                return Err(BlockError::new(
                    libc::EAGAIN,
                    format!(
                        "Failed to get {what} lock\nIs another process using the image \
                         [{filename}]?"
                    ),
                ))
            }
        }
    }
}

/// Changes the lock permissions `file` holds from `from` to `to` (QMP's `blockdev-reopen`):
/// the bytes of `to` are taken and checked as [`lock`] does, then those only `from` needed
/// are given up. On a conflict, `file` holds `from` again.
pub(crate) fn change(
    file: &File,
    filename: &str,
    from: Permissions,
    to: Permissions,
) -> Result<()> {
    if let Err(e) = lock(file, filename, to) {
        release(file, to, from);
        return Err(e);
    }
    release(file, from, to);
    Ok(())
}

/// Unlocks the bytes that `held` takes and `keep` does not.
fn release(file: &File, held: Permissions, keep: Permissions) {
    for bit in 0..PERM_NAMES.len() {
        let mask = 1u32 << bit;
        let mut bytes = Vec::new();
        if held.perm & mask != 0 && keep.perm & mask == 0 {
            bytes.push(LOCK_PERM_BASE + bit as i64);
        }
        if held.shared & mask == 0 && keep.shared & mask != 0 {
            bytes.push(LOCK_SHARED_BASE + bit as i64);
        }
        for byte in bytes {
            // Unlocking a byte this description holds cannot conflict.
            if let Err(e) = ofd_lock(file, libc::F_OFD_SETLK, libc::F_UNLCK, byte) {
                log::warn!("could not unlock image lock byte {byte}: {e}");
            }
        }
    }
}

/// The first lock of another user that conflicts with `p`, named as QEMU names it.
fn conflict(file: &File, p: Permissions) -> std::io::Result<Option<String>> {
    for (bit, name) in PERM_NAMES.iter().enumerate() {
        let mask = 1u32 << bit;
        if p.perm & mask != 0 && locked_by_others(file, LOCK_SHARED_BASE + bit as i64)? {
            return Ok(Some(format!("\"{name}\"")));
        }
        if p.shared & mask == 0 && locked_by_others(file, LOCK_PERM_BASE + bit as i64)? {
            return Ok(Some(format!("shared \"{name}\"")));
        }
    }
    Ok(None)
}
