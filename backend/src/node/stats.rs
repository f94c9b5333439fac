//! A node's own event counters (zero-copy, bounced, read-modify-write, detected zeroes,
//! discards carried out), beside the request accounting of [`crate::accounting`].

use crate::counter::Counter;

/// Counters of a node, for tests and metrics (sharded: the workers of every queue bump them).
#[derive(Debug, Default)]
pub struct NodeStats {
    /// Requests served straight from the caller's memory.
    pub zero_copy: Counter,
    /// Requests copied through an aligned bounce buffer.
    pub bounced: Counter,
    /// Writes done as read-modify-write (sub-block).
    pub read_modify_write: Counter,
    /// Writes of zeroes turned into write_zeroes by detect-zeroes.
    pub zeroes_detected: Counter,
    /// Discards the driver carried out (QEMU's `discard-nb-ok` of file nodes).
    pub discards_ok: Counter,
    /// Discards the driver failed (`discard-nb-failed`).
    pub discards_failed: Counter,
    /// Bytes of the discards carried out (`discard-bytes-ok`).
    pub discard_bytes_ok: Counter,
}
