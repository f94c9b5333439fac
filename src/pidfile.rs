//! `--pidfile`: written once every export listens (a client that waits for it can connect at
//! once), locked for the daemon's life with the lock QEMU takes (so a second strata or QSD with
//! the same pidfile refuses to start), never through a symbolic link, removed at exit.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Flags of every open: the last component is never followed, and a FIFO or a terminal at the
/// path neither blocks the open nor becomes the controlling terminal (both are then refused).
const OPEN_FLAGS: libc::c_int = libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY;

/// How often [`PidFile::write`] tries again when the file it locked was replaced meanwhile.
const ATTEMPTS: usize = 10;

/// The daemon's locked pidfile; removed (if it still is this one) when dropped.
pub struct PidFile {
    file: File,
    path: PathBuf,
}

/// Refuses, before anything starts, a pidfile that is a symbolic link or not a regular file,
/// or that a running daemon holds.
pub fn check(path: &Path) -> Result<(), String> {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(OPEN_FLAGS)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(open_error(path, e)),
    };
    check_regular(&file, path)?;
    match lock_holder(&file).map_err(|e| lock_error(path, e))? {
        Some(pid) => Err(held_error(path, pid)),
        None => Ok(()),
    }
}

impl PidFile {
    /// Creates (or reuses) the pidfile, locks it and writes the daemon's pid, as QEMU does.
    pub fn write(path: &Path) -> Result<PidFile, String> {
        for _ in 0..ATTEMPTS {
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .mode(0o600)
                .custom_flags(OPEN_FLAGS)
                .open(path)
                .map_err(|e| open_error(path, e))?;
            check_regular(&file, path)?;
            if !try_lock(&file).map_err(|e| lock_error(path, e))? {
                let pid = lock_holder(&file).map_err(|e| lock_error(path, e))?;
                return Err(held_error(path, pid.unwrap_or(-1)));
            }
            // The daemon that held the file may have removed it at its exit, and another may
            // have made a new one, between our open and our lock: lock the one at the path.
            if !is_at(&file, path) {
                continue;
            }
            let pid = format!("{}\n", std::process::id());
            file.set_len(0)
                .and_then(|()| file.write_all_at(pid.as_bytes(), 0))
                .map_err(|e| format!("Could not write pidfile '{}': {e}", path.display()))?;
            return Ok(PidFile {
                file,
                path: path.to_path_buf(),
            });
        }
        Err(format!(
            "Could not lock pidfile '{}': it was replaced {ATTEMPTS} times while being locked",
            path.display()
        ))
    }

    /// Where the pidfile is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if is_at(&self.file, &self.path) {
            if let Err(e) = std::fs::remove_file(&self.path) {
                log::warn!("Could not remove pidfile '{}': {e}", self.path.display());
            }
        }
    }
}

/// Whether `path` (not followed) names the file `file` has open.
fn is_at(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

fn check_regular(file: &File, path: &Path) -> Result<(), String> {
    match file.metadata() {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(format!(
            "pidfile '{}' is not a regular file",
            path.display()
        )),
        Err(e) => Err(format!("Could not stat pidfile '{}': {e}", path.display())),
    }
}

/// A write lock on the whole file (QEMU's pidfile lock), or a query for one.
fn whole_file_lock() -> libc::flock {
    // SAFETY: flock is plain data; all zeroes is a valid value.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_WRLCK as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock
}

/// Takes the lock; false when another process holds it.
fn try_lock(file: &File) -> io::Result<bool> {
    let lock = whole_file_lock();
    // SAFETY: F_SETLK reads the flock struct `lock`, a local, and keeps no pointer to it.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &lock as *const libc::flock) };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN | libc::EACCES) => Ok(false),
        _ => Err(e),
    }
}

/// The pid of the process that holds a lock on `file` (-1 for an open file description lock),
/// if one does.
fn lock_holder(file: &File) -> io::Result<Option<libc::pid_t>> {
    let mut lock = whole_file_lock();
    // SAFETY: F_GETLK reads and rewrites the flock struct `lock`, a local.
    let r = unsafe {
        libc::fcntl(
            file.as_raw_fd(),
            libc::F_GETLK,
            &mut lock as *mut libc::flock,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((lock.l_type != libc::F_UNLCK as libc::c_short).then_some(lock.l_pid))
}

fn open_error(path: &Path, e: io::Error) -> String {
    if e.raw_os_error() == Some(libc::ELOOP) {
        format!(
            "pidfile '{}' is a symbolic link; strata does not write through one",
            path.display()
        )
    } else {
        format!("Could not open pidfile '{}': {e}", path.display())
    }
}

fn lock_error(path: &Path, e: io::Error) -> String {
    format!("Could not lock pidfile '{}': {e}", path.display())
}

fn held_error(path: &Path, pid: libc::pid_t) -> String {
    let holder = if pid > 0 {
        format!("process {pid}")
    } else {
        "another process".to_string()
    };
    format!(
        "pidfile '{}' is locked by {holder}: another daemon with this pidfile is running",
        path.display()
    )
}
