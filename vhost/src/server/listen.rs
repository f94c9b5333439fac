//! The export's listening socket: one bound at a path (owner-only until it has its group and
//! mode, never over a socket a daemon still answers on) or an inherited one; and removing the
//! path's socket at the end, only if it still is the export's.

use std::fs::{File, OpenOptions, Permissions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use crate::error::Error;
use crate::export_config::BlkExportConfig;

/// Where the export listens for its frontend.
#[derive(Debug, Clone)]
pub enum Listen {
    /// A Unix socket at this path, with the export's `socket_mode` and `socket_group`. A stale
    /// socket there is removed first; a socket that a daemon still answers on, or anything else
    /// at the path, is an error. The socket file is removed when the export ends (if it still
    /// is the export's).
    UnixPath(PathBuf),
    /// An inherited listening Unix stream socket; the export takes ownership and closes it.
    Fd(RawFd),
}

/// The socket file an export created, known by device and inode so that only it is removed
/// (when this is dropped).
pub(super) struct BoundSocket {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl BoundSocket {
    /// Where the socket was created.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for BoundSocket {
    /// Removes the socket file, unless something else took its place at the path meanwhile.
    fn drop(&mut self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == (self.dev, self.ino) => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    log::warn!("Could not remove {}: {e}", self.path.display());
                }
            }
            Ok(_) => log::warn!(
                "{} is no longer this export's socket; left in place",
                self.path.display()
            ),
            Err(_) => {}
        }
    }
}

/// Opens the listener `listen` describes for the export `config`.
pub(super) fn open(
    listen: Listen,
    config: &BlkExportConfig,
) -> Result<(UnixListener, Option<BoundSocket>), Error> {
    match listen {
        Listen::UnixPath(path) => {
            make_way(&config.id, &path)?;
            let (listener, bound) = bind(&path, config)?;
            Ok((listener, Some(bound)))
        }
        Listen::Fd(fd) => Ok((inherited(&config.id, fd)?, None)),
    }
}

/// Clears `path` for a new socket: nothing there, or a stale socket (removed). A socket that a
/// daemon still answers on, and anything that is not a socket, are refused and left alone.
fn make_way(id: &str, path: &Path) -> Result<(), Error> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {}
        Ok(_) => {
            return Err(Error::config(
                id,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("Could not stat {}", path.display()), e)),
    }
    let live = answers(path).map_err(|e| {
        Error::io(
            format!("Could not tell whether socket {} is in use", path.display()),
            e,
        )
    })?;
    if live {
        return Err(Error::config(
            id,
            format!("socket {} is in use by a running daemon", path.display()),
        ));
    }
    log::debug!(
        "vhost-user-blk export '{id}': removing stale {}",
        path.display()
    );
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(Error::io(format!("Could not remove {}", path.display()), e))
        }
        _ => Ok(()),
    }
}

/// Whether something listens on the socket at `path`. The connect does not block: it succeeds
/// (or finds the backlog full) on a live socket, and is refused on a stale one.
fn answers(path: &Path) -> io::Result<bool> {
    let mut addr = libc::sockaddr_un {
        sun_family: libc::AF_UNIX as libc::sa_family_t,
        sun_path: [0; 108],
    };
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the path is too long for a socket address",
        ));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket has no memory-safety preconditions; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is an initialised sockaddr_un and the length passed is its size.
    let r = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN | libc::EINPROGRESS) => Ok(true),
        Some(libc::ECONNREFUSED | libc::ENOENT) => Ok(false),
        _ => Err(e),
    }
}

/// Binds a listening socket at `path` that is never more open than the export's
/// `socket_mode` and `socket_group`: created owner-only, then given its group, then its mode.
fn bind(path: &Path, config: &BlkExportConfig) -> Result<(UnixListener, BoundSocket), Error> {
    let listener = bind_owner_only(path)
        .map_err(|e| Error::io(format!("Could not listen on {}", path.display()), e))?;
    // What was just created, opened without following a symlink: the group and mode go to
    // this inode even if the path is swapped meanwhile.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(path)
        .and_then(|f| f.metadata().map(|m| (f, m)));
    let (file, meta) = match file {
        Ok((f, m)) if m.file_type().is_socket() => (f, m),
        Ok(_) => {
            return Err(Error::config(
                &config.id,
                format!(
                    "{} was replaced while its socket was set up",
                    path.display()
                ),
            ))
        }
        Err(e) => return Err(Error::io(format!("Could not open {}", path.display()), e)),
    };
    let bound = BoundSocket {
        path: path.to_path_buf(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    if let Err(e) = set_access(&file, config.socket_mode, config.socket_group) {
        drop(bound);
        let group = config
            .socket_group
            .map_or_else(String::new, |g| format!(" and group {g}"));
        return Err(Error::io(
            format!(
                "Could not give socket {} mode {:04o}{group}",
                path.display(),
                config.socket_mode
            ),
            e,
        ));
    }
    Ok((listener, bound))
}

/// Binds `path` with the process's umask tightened to owner-only for the call. The umask is the
/// whole process's: a file another thread creates meanwhile is at most as open as it would
/// have been, and still usable by its owner.
fn bind_owner_only(path: &Path) -> io::Result<UnixListener> {
    // SAFETY: umask only swaps the process's file mode creation mask; it cannot fail.
    let old = unsafe { libc::umask(0o077) };
    // SAFETY: as above.
    unsafe { libc::umask(old | 0o077) };
    let listener = UnixListener::bind(path);
    // SAFETY: as above; puts back the mask the process had.
    unsafe { libc::umask(old) };
    listener
}

/// Gives the socket `file` (an O_PATH descriptor) its group, then its mode, through
/// /proc/self/fd, which reaches the inode itself (fchown and fchmod refuse O_PATH descriptors).
fn set_access(file: &File, mode: u32, group: Option<u32>) -> io::Result<()> {
    let fd_path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    if let Some(gid) = group {
        std::os::unix::fs::chown(&fd_path, None, Some(gid))?;
    }
    std::fs::set_permissions(&fd_path, Permissions::from_mode(mode))
}

/// Takes an inherited descriptor after checking it is a listening Unix stream socket.
fn inherited(id: &str, fd: RawFd) -> Result<UnixListener, Error> {
    let check = || -> io::Result<bool> {
        Ok(sockopt_int(fd, libc::SO_DOMAIN)? == libc::AF_UNIX
            && sockopt_int(fd, libc::SO_TYPE)? == libc::SOCK_STREAM
            && sockopt_int(fd, libc::SO_ACCEPTCONN)? == 1)
    };
    match check() {
        Ok(true) => {}
        Ok(false) => {
            return Err(Error::config(
                id,
                format!("file descriptor {fd} is not a listening Unix stream socket"),
            ))
        }
        Err(e) => {
            return Err(Error::io(
                format!("File descriptor {fd} is not a usable socket"),
                e,
            ))
        }
    }
    // SAFETY: the caller hands the descriptor over (Listen::Fd's contract); it is an open
    // listening Unix stream socket (checked above), owned by the listener from now.
    Ok(unsafe { UnixListener::from_raw_fd(fd) })
}

fn sockopt_int(fd: RawFd, opt: libc::c_int) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the option is an int; getsockopt writes at most `len` bytes into `v`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(v)
    }
}
