//! The settings of one export, their defaults and limits, and the one place they are checked.

use std::sync::Arc;

use strata_backend::Node;
use virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES;

use crate::error::Error;

/// Most virtqueues a frontend may use: vhost-user-backend maps queues to worker threads with
/// 64-bit masks.
pub const MAX_QUEUES: u16 = 64;

/// Default of [`BlkExportConfig::queue_size`].
pub const DEFAULT_QUEUE_SIZE: u16 = 256;

/// Default of [`BlkExportConfig::poll_max_ns`] for a node on local storage (none for a
/// node that reaches the network, see [`BlkExportConfig::new`]).
pub const DEFAULT_POLL_MAX_NS: u64 = 50_000;

/// Default of [`BlkExportConfig::socket_mode`]: owner and group may connect.
const DEFAULT_SOCKET_MODE: u32 = 0o660;

/// Largest virtqueue size a split virtqueue may have.
const MAX_QUEUE_SIZE: u16 = 32768;

/// Smallest and largest logical block size a guest driver takes.
const LOGICAL_BLOCK_SIZES: std::ops::RangeInclusive<u32> = 512..=65536;

/// Settings of a vhost-user-blk export (QSD's `--export type=vhost-user-blk,...`).
#[derive(Debug, Clone)]
pub struct BlkExportConfig {
    /// Export id (`id=`), used in messages.
    pub id: String,
    /// The node to export (`node-name=`).
    pub node: Arc<Node>,
    /// Whether the guest may write (`writable=`, off by default as in QSD). A read-only export
    /// offers VIRTIO_BLK_F_RO and fails writes with IOERR.
    pub writable: bool,
    /// Queues in the config space and worker threads (`num-queues=`, 1..=[`MAX_QUEUES`]). A
    /// frontend may still set up as many as [`MAX_QUEUES`] queues (QEMU defaults to one per
    /// vCPU); the extra ones are shared round-robin by the workers.
    pub num_queues: u16,
    /// Largest virtqueue size a frontend may use (power of two, default
    /// [`DEFAULT_QUEUE_SIZE`]); `seg_max` is this minus 2.
    pub queue_size: u16,
    /// Logical block size (`logical-block-size=`, power of two, 512..=65536, default 512).
    /// Smaller than the storage's block size works, through read-modify-write.
    pub logical_block_size: u32,
    /// GET_ID answer, at most 20 bytes (none: 20 zero bytes).
    pub serial: Option<String>,
    /// Start with the guest's write cache off (wce=0): every write is flushed before it
    /// completes. The guest may toggle it through the config space.
    pub writethrough: bool,
    /// The longest a worker keeps polling its virtqueues and io_uring completions after the
    /// last request or completion before it sleeps until a kick (`poll-max-ns=`, 0: never
    /// poll); the window adapts below it to how long the worker waits for work.
    /// While it polls, the guest need not kick and completions need no eventfd wake-up.
    pub poll_max_ns: u64,
    /// Permissions of the socket the export creates at a path (`socket-mode=`, a strata
    /// extension; permission bits only, default 0o660). The socket is created owner-only and
    /// opened up to this once it has its group.
    pub socket_mode: u32,
    /// Group of that socket (`socket-group=`, a strata extension; none: the daemon's group).
    pub socket_group: Option<u32>,
    /// Where the export makes its private directory (the socket between the relay and
    /// vhost-user-backend); None: the temporary directory. A sandboxed daemon that adds
    /// exports at run time gives a directory its sandbox lets it write.
    pub private_dir_parent: Option<std::path::PathBuf>,
}

impl BlkExportConfig {
    /// QSD's defaults: read-only, one queue, 512-byte blocks, writeback. Workers poll for
    /// [`DEFAULT_POLL_MAX_NS`], except over a node that reaches the network (rbd): a network
    /// round trip is far longer than the window, so polling after each completion would only
    /// burn CPU that librbd's threads (and, on one machine, the cluster) need.
    pub fn new(id: impl Into<String>, node: Arc<Node>) -> Self {
        let poll_max_ns = if node.reaches_network() {
            0
        } else {
            DEFAULT_POLL_MAX_NS
        };
        BlkExportConfig {
            id: id.into(),
            node,
            writable: false,
            num_queues: 1,
            queue_size: DEFAULT_QUEUE_SIZE,
            logical_block_size: 512,
            serial: None,
            writethrough: false,
            poll_max_ns,
            socket_mode: DEFAULT_SOCKET_MODE,
            socket_group: None,
            private_dir_parent: None,
        }
    }

    /// Checks every setting; the error names the export and the offending option.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |message: String| Err(Error::config(&self.id, message));
        if !(1..=MAX_QUEUES).contains(&self.num_queues) {
            return bad(format!(
                "num-queues must be between 1 and {MAX_QUEUES}, not {}",
                self.num_queues
            ));
        }
        let queue_size = self.queue_size;
        if !(2..=MAX_QUEUE_SIZE).contains(&queue_size) || !queue_size.is_power_of_two() {
            return bad(format!(
                "queue-size must be a power of two between 2 and {MAX_QUEUE_SIZE}, not \
                 {queue_size}"
            ));
        }
        let lbs = self.logical_block_size;
        if !LOGICAL_BLOCK_SIZES.contains(&lbs) || !lbs.is_power_of_two() {
            return bad(format!(
                "logical-block-size must be a power of two between {} and {}, not {lbs}",
                LOGICAL_BLOCK_SIZES.start(),
                LOGICAL_BLOCK_SIZES.end()
            ));
        }
        if self.writable && self.node.is_read_only() {
            return bad(format!(
                "writable=on, but node '{}' is read-only",
                self.node.name()
            ));
        }
        if self.socket_mode & !0o777 != 0 {
            return bad(format!(
                "socket-mode takes permission bits only (at most 0777), not {:04o}",
                self.socket_mode
            ));
        }
        if let Some(serial) = &self.serial {
            if serial.len() > VIRTIO_BLK_ID_BYTES as usize {
                return bad(format!(
                    "serial '{serial}' is longer than {VIRTIO_BLK_ID_BYTES} bytes"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_only_node() -> Arc<Node> {
        let opts = strata_backend::Options::parse("driver=null-co,size=1048576,read-only=on", None)
            .expect("options");
        strata_backend::Graph::new().open(opts).expect("node")
    }

    #[test]
    fn bad_settings_are_refused_with_the_export_and_option_named() {
        let base = BlkExportConfig::new("t", read_only_node());
        type Change = fn(&mut BlkExportConfig);
        let check = |change: Change| {
            let mut c = base.clone();
            change(&mut c);
            c.validate().map_err(|e| e.to_string())
        };
        assert!(check(|_| {}).is_ok());
        let refused: [(Change, &str); 10] = [
            (|c| c.writable = true, "writable"),
            (|c| c.num_queues = 0, "num-queues"),
            (|c| c.num_queues = MAX_QUEUES + 1, "num-queues"),
            (|c| c.queue_size = 100, "queue-size"),
            (|c| c.queue_size = 1, "queue-size"),
            (|c| c.logical_block_size = 1000, "logical-block-size"),
            (|c| c.logical_block_size = 256, "logical-block-size"),
            (|c| c.logical_block_size = 1 << 17, "logical-block-size"),
            (|c| c.serial = Some("x".repeat(21)), "serial"),
            (|c| c.socket_mode = 0o4660, "socket-mode"),
        ];
        for (change, option) in refused {
            let err = check(change).expect_err(option);
            assert!(err.contains("export 't'"), "{err}");
            assert!(err.contains(option), "{err}");
        }
        assert!(check(|c| c.writable = true)
            .unwrap_err()
            .contains("read-only"));
        let accepted: [Change; 5] = [
            |c| c.serial = Some("x".repeat(20)),
            |c| c.num_queues = MAX_QUEUES,
            |c| c.queue_size = MAX_QUEUE_SIZE,
            |c| c.logical_block_size = 65536,
            |c| c.socket_mode = 0o777,
        ];
        for change in accepted {
            assert!(check(change).is_ok());
        }
    }
}
