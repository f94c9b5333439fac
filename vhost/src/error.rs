//! The crate's error type.

use std::io;

use strata_backend::BlockError;

/// Why an export could not be started or stopped cleanly.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The export's configuration is not usable (names the offending setting).
    #[error("vhost-user-blk export '{id}': {message}")]
    InvalidConfig {
        /// Export id.
        id: String,
        /// What is wrong.
        message: String,
    },
    /// A system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The vhost-user machinery (vhost-user-backend) failed.
    #[error("vhost-user-blk export '{id}': {message}")]
    VhostUser {
        /// Export id.
        id: String,
        /// What failed.
        message: String,
    },
    /// The block layer failed (e.g. the final flush).
    #[error("vhost-user-blk export '{id}': {source}")]
    Block {
        /// Export id.
        id: String,
        /// The block layer's error.
        #[source]
        source: BlockError,
    },
    /// The serving thread panicked.
    #[error("vhost-user-blk export '{id}': the serving thread panicked")]
    Panicked {
        /// Export id.
        id: String,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn config(id: &str, message: impl Into<String>) -> Self {
        Error::InvalidConfig {
            id: id.to_string(),
            message: message.into(),
        }
    }
}
