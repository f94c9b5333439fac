//! Asynchronous I/O machinery: buffers, the per-thread io_uring reactor, the task executor,
//! bounce buffers, write serialisation, and helper threads for blocking calls.

pub mod blocking;
pub mod bounce;
pub mod executor;
pub mod iovec;
pub mod reactor;
pub mod serialise;
mod task_cell;
