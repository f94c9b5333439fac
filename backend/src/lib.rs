//! strata's block layer.
//!
//! A [`Graph`] of named [`Node`]s, each a driver (format: `raw`; protocol: `file`,
//! `host_device`, `null-co`) with children in roles, opened from QEMU-style [`Options`].
//! I/O is asynchronous: node methods return futures that run on the calling thread's io_uring
//! [`Reactor`], driven by a [`LocalExecutor`] (or [`block_on`]), zero-copy into the caller's
//! buffers whenever O_DIRECT alignment allows.

pub mod accounting;
pub mod counter;
pub mod driver;
pub mod error;
pub mod filename;
pub mod flags;
pub mod graph;
pub mod io;
pub mod node;
pub mod node_name;
pub mod options;
pub mod probe;
pub mod registry;
pub mod secret;

pub use driver::{BlockStatus, Limits};
pub use error::{BlockError, Result};
pub use flags::{DetectZeroes, DiscardMode, NodeFlags};
pub use graph::Graph;
pub use io::executor::{block_on, LocalExecutor};
pub use io::iovec::IoVec;
pub use io::reactor::Reactor;
pub use node::{ChildRole, Node, NodeInfo};
pub use options::Options;
