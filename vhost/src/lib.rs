//! strata's vhost-user-blk device: a drop-in for `qemu-storage-daemon --export
//! type=vhost-user-blk`.
//!
//! [`BlkExport::start`] listens on a Unix socket and serves one vhost-user frontend (QEMU,
//! libblkio, ...) at a time, accepting the next after a disconnect. Requests are read straight
//! from the virtqueues in the guest's shared memory and handed to the block layer as buffers
//! pointing into that memory (no copy); each virtqueue is run by its own worker thread with its
//! own io_uring.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # fn f(node: Arc<strata_backend::Node>) -> Result<(), strata_vhost::Error> {
//! use strata_vhost::{BlkExport, BlkExportConfig, Listen};
//! let mut config = BlkExportConfig::new("disk0", node);
//! config.writable = true;
//! let export = BlkExport::start(config, Listen::UnixPath("/run/disk0.sock".into()))?;
//! // ... on SIGTERM, from another thread: export.stop();
//! export.join()?;
//! # Ok(()) }
//! ```

mod accounting;
mod device;
mod device_config;
mod error;
mod export_config;
mod inflight;
mod memory_faults;
mod memory_files;
mod regions;
mod relay;
mod request;
mod request_task;
mod server;
mod split_ring;
mod task_ctx;
mod worker;

pub use error::Error;
pub use export_config::{BlkExportConfig, DEFAULT_POLL_MAX_NS, DEFAULT_QUEUE_SIZE, MAX_QUEUES};
pub use server::{BlkExport, ExportPause, Listen, ListeningExport};
