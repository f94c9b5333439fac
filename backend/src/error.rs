//! The block layer's one error type: an errno for the guest, a message for the user.

use std::fmt;
use std::io;

/// An error from the block layer.
///
/// `errno` is what a device model reports to its guest (EIO, ENOSPC, EROFS, EINVAL ...);
/// `message` says to a person what went wrong and, where it came from the user, which option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockError {
    errno: i32,
    message: String,
}

/// Result type of the block layer.
pub type Result<T> = std::result::Result<T, BlockError>;

impl BlockError {
    /// An error with an explicit errno.
    pub fn new(errno: i32, message: impl Into<String>) -> Self {
        Self {
            errno,
            message: message.into(),
        }
    }

    /// An invalid argument: a bad option, node name or request.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(libc::EINVAL, message)
    }

    /// An I/O error from the kernel, given as a positive errno, with context.
    pub fn from_errno(errno: i32, context: impl fmt::Display) -> Self {
        let os = io::Error::from_raw_os_error(errno);
        Self::new(errno, format!("{context}: {os}"))
    }

    /// The last OS error (errno), with context.
    pub fn last_os_error(context: impl fmt::Display) -> Self {
        let errno = io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO);
        Self::from_errno(errno, context)
    }

    /// A `std::io::Error` with context.
    pub fn io(err: &io::Error, context: impl fmt::Display) -> Self {
        Self::new(
            err.raw_os_error().unwrap_or(libc::EIO),
            format!("{context}: {err}"),
        )
    }

    /// The positive errno to report to a guest.
    pub fn errno(&self) -> i32 {
        self.errno
    }

    /// The message for the user.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Prefix the message with more context, keeping the errno.
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }
}

impl fmt::Display for BlockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for BlockError {}

impl From<BlockError> for io::Error {
    fn from(e: BlockError) -> Self {
        io::Error::new(io::Error::from_raw_os_error(e.errno).kind(), e.message)
    }
}
