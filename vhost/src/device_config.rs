//! What the device offers: virtio feature bits, vhost-user protocol features, and the
//! virtio-blk configuration space, all derived once per export from its settings and node.

use std::sync::Arc;

use strata_backend::accounting::IoStats;
use strata_backend::{ChildRole, Node};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::error::Error;
use crate::export_config::{BlkExportConfig, MAX_QUEUES};

/// Size of `struct virtio_blk_config` (through the zoned characteristics).
pub(crate) const CONFIG_LEN: usize = std::mem::size_of::<virtio_blk_config>();

/// Byte offset of the `writeback` (wce) field, the only one a driver may write.
pub(crate) const WCE_OFFSET: usize = 32;

/// Largest discard / write-zeroes segment, in 512-byte sectors (1 GiB).
const MAX_ZERO_DISCARD_SECTORS: u32 = 1 << 21;

/// Segments per discard / write-zeroes request.
pub(crate) const MAX_ZERO_DISCARD_SEG: u32 = 16;

/// Most descriptors in one indirect table.
pub(crate) const MAX_INDIRECT_DESCS: u32 = 4096;

/// Everything the device needs to know about its export, fixed for the export's lifetime.
#[derive(Debug)]
pub(crate) struct DeviceConfig {
    pub id: String,
    pub node: Arc<Node>,
    pub writable: bool,
    /// Queues the device reports in its config space, and worker threads.
    pub num_queues: u16,
    /// Virtqueues a frontend may set up (GET_QUEUE_NUM): at least `num_queues`.
    pub max_queues: u16,
    /// Largest virtqueue size a frontend may choose.
    pub queue_size: u16,
    /// Logical block size in bytes.
    pub logical_block_size: u32,
    /// log2(physical block / logical block).
    pub physical_block_exp: u8,
    /// GET_ID answer, zero padded.
    pub serial: [u8; VIRTIO_BLK_ID_BYTES as usize],
    /// Initial cache mode: false means the device starts with wce=1.
    pub writethrough: bool,
    pub discard: bool,
    pub write_zeroes: bool,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_sectors: u32,
    pub discard_sector_alignment: u32,
    /// Largest segment (0: no limit, SIZE_MAX not offered).
    pub size_max: u32,
    pub seg_max: u32,
    /// Largest request the node takes at once (0: no limit); bigger ones are split.
    pub max_transfer: u64,
    /// Most buffers the node takes in one request; longer vectors are split.
    pub max_iov: usize,
    /// Busy-poll window of a worker after its last activity (0: never poll).
    pub poll_max_ns: u64,
    /// CPUs this process may run on, read when the export starts: finding them reads cgroup
    /// files, which a sandbox (Landlock) may put out of reach once the export serves.
    pub cpus: usize,
    /// The requests of the export's frontends (every connection's), as `query-blockstats`
    /// reports them.
    pub stats: IoStats,
}

/// The largest `request_alignment` of the node and the storage below it (its file children):
/// the physical block size the storage wants.
pub(crate) fn storage_alignment(node: &Node) -> u32 {
    let mut align = node.limits().request_alignment;
    let mut cur = node;
    while let Some(child) = cur.child(ChildRole::File) {
        align = align.max(child.limits().request_alignment);
        cur = child;
    }
    align.max(1)
}

impl DeviceConfig {
    /// Derives the device from the export's settings, after checking them with
    /// [`BlkExportConfig::validate`].
    pub(crate) fn new(c: &BlkExportConfig) -> Result<Self, Error> {
        c.validate()?;
        let id = &c.id;
        let lbs = c.logical_block_size;
        let mut serial = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        if let Some(s) = &c.serial {
            for (to, from) in serial.iter_mut().zip(s.as_bytes()) {
                *to = *from;
            }
        }
        let storage = storage_alignment(&c.node);
        if storage > lbs {
            log::info!(
                "vhost-user-blk export '{id}': logical block size {lbs} is smaller than the \
                 storage's {storage}-byte blocks; smaller writes are read-modify-write"
            );
        }
        let physical = storage.max(lbs);
        let physical_block_exp = (physical / lbs).trailing_zeros() as u8;
        let lbs_sectors = lbs / 512;
        let align_sectors = (physical / 512).max(1);
        let round = |v: u32| v / align_sectors * align_sectors;
        let limits = c.node.limits();
        let max_transfer = limits.max_transfer;
        let size_max = if max_transfer == 0 {
            0
        } else {
            u32::try_from(max_transfer).unwrap_or(u32::MAX).max(lbs)
        };
        Ok(DeviceConfig {
            id: id.clone(),
            node: c.node.clone(),
            writable: c.writable,
            num_queues: c.num_queues,
            max_queues: MAX_QUEUES.max(c.num_queues),
            queue_size: c.queue_size,
            logical_block_size: lbs,
            physical_block_exp,
            serial,
            writethrough: c.writethrough,
            discard: c.writable && c.node.discard_enabled(),
            write_zeroes: c.writable,
            max_discard_sectors: round(MAX_ZERO_DISCARD_SECTORS).max(lbs_sectors),
            max_write_zeroes_sectors: round(MAX_ZERO_DISCARD_SECTORS).max(lbs_sectors),
            discard_sector_alignment: align_sectors,
            size_max,
            seg_max: u32::from(c.queue_size) - 2,
            max_transfer,
            max_iov: limits.max_iov.max(1),
            poll_max_ns: c.poll_max_ns,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            stats: IoStats::default(),
        })
    }

    /// The virtio feature bits offered.
    pub(crate) fn features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_TOPOLOGY
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_CONFIG_WCE
            | 1 << VIRTIO_BLK_F_MQ;
        if self.size_max != 0 {
            f |= 1 << VIRTIO_BLK_F_SIZE_MAX;
        }
        if !self.writable {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        if self.discard {
            f |= 1 << VIRTIO_BLK_F_DISCARD;
        }
        if self.write_zeroes {
            f |= 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    /// The vhost-user protocol features offered.
    pub(crate) fn protocol_features() -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }

    /// Capacity in 512-byte sectors, read live from the node.
    pub(crate) fn capacity_sectors(&self) -> u64 {
        self.node.size() / 512
    }

    /// `struct virtio_blk_config`, little-endian, with the current capacity and cache mode.
    pub(crate) fn config_space(&self, writeback: bool) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let mut put = |offset: usize, bytes: &[u8]| {
            c[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        put(0, &self.capacity_sectors().to_le_bytes());
        put(8, &self.size_max.to_le_bytes());
        put(12, &self.seg_max.to_le_bytes());
        // 16..20: geometry (not offered).
        put(20, &self.logical_block_size.to_le_bytes());
        put(24, &[self.physical_block_exp]);
        // 25: alignment_offset = 0.
        // min_io_size, in logical blocks: one physical block. opt_io_size: unknown (0).
        put(26, &(1u16 << self.physical_block_exp).to_le_bytes());
        put(28, &0u32.to_le_bytes());
        put(WCE_OFFSET, &[u8::from(writeback)]);
        put(34, &self.num_queues.to_le_bytes());
        if self.discard {
            put(36, &self.max_discard_sectors.to_le_bytes());
            put(40, &MAX_ZERO_DISCARD_SEG.to_le_bytes());
            put(44, &self.discard_sector_alignment.to_le_bytes());
        }
        if self.write_zeroes {
            put(48, &self.max_write_zeroes_sectors.to_le_bytes());
            put(52, &MAX_ZERO_DISCARD_SEG.to_le_bytes());
            put(56, &[1]);
        }
        c
    }

    /// Bytes `offset..offset+size` of the config space, clipped to the struct: a request
    /// reaching past it gets fewer bytes (which vhost answers as an error), never other memory.
    pub(crate) fn read_config(&self, writeback: bool, offset: u32, size: u32) -> Vec<u8> {
        let space = self.config_space(writeback);
        let start = (offset as usize).min(CONFIG_LEN);
        let end = start.saturating_add(size as usize).min(CONFIG_LEN);
        space[start..end].to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    #[test]
    fn offsets_match_the_virtio_abi() {
        type C = virtio_blk_config;
        assert_eq!(offset_of!(C, capacity), 0);
        assert_eq!(offset_of!(C, size_max), 8);
        assert_eq!(offset_of!(C, seg_max), 12);
        assert_eq!(offset_of!(C, blk_size), 20);
        assert_eq!(offset_of!(C, physical_block_exp), 24);
        assert_eq!(offset_of!(C, min_io_size), 26);
        assert_eq!(offset_of!(C, opt_io_size), 28);
        assert_eq!(offset_of!(C, wce), WCE_OFFSET);
        assert_eq!(offset_of!(C, num_queues), 34);
        assert_eq!(offset_of!(C, max_discard_sectors), 36);
        assert_eq!(offset_of!(C, max_discard_seg), 40);
        assert_eq!(offset_of!(C, discard_sector_alignment), 44);
        assert_eq!(offset_of!(C, max_write_zeroes_sectors), 48);
        assert_eq!(offset_of!(C, max_write_zeroes_seg), 52);
        assert_eq!(offset_of!(C, write_zeroes_may_unmap), 56);
        assert_eq!(CONFIG_LEN, 96);
    }

    fn test_config(writable: bool, discard: bool) -> DeviceConfig {
        let opts = strata_backend::Options::parse(
            &format!(
                "driver=null-co,size=1048576,read-only={}",
                if writable { "off" } else { "on" }
            ),
            None,
        )
        .expect("options");
        let node = strata_backend::Graph::new().open(opts).expect("node");
        let mut c = crate::BlkExportConfig::new("t", node);
        c.writable = writable;
        let mut d = DeviceConfig::new(&c).expect("config");
        d.discard = discard;
        d
    }

    #[test]
    fn config_reads_are_clipped_to_the_struct() {
        let d = test_config(true, false);
        let full = d.config_space(true);
        assert_eq!(d.read_config(true, 0, 96), full.to_vec());
        assert_eq!(d.read_config(true, 0, 60), full[..60].to_vec());
        assert_eq!(d.read_config(true, 90, 16), full[90..].to_vec());
        assert!(d.read_config(true, 96, 4).is_empty());
        assert!(d.read_config(true, u32::MAX, u32::MAX).is_empty());
        assert_eq!(d.read_config(true, 8, u32::MAX), full[8..].to_vec());
        assert_eq!(u64::from_le_bytes(full[..8].try_into().unwrap()), 2048);
        assert_eq!(full[WCE_OFFSET], 1);
        assert_eq!(d.config_space(false)[WCE_OFFSET], 0);
    }

    #[test]
    fn features_follow_the_export() {
        let rw = test_config(true, true).features();
        let ro = test_config(false, false).features();
        for bit in [VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES] {
            assert_ne!(rw & 1 << bit, 0);
            assert_eq!(ro & 1 << bit, 0);
        }
        assert_eq!(rw & 1 << VIRTIO_BLK_F_RO, 0);
        assert_ne!(ro & 1 << VIRTIO_BLK_F_RO, 0);
        assert_eq!(
            rw & 1 << VIRTIO_BLK_F_SIZE_MAX,
            0,
            "no SIZE_MAX without a limit"
        );
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
        ] {
            assert_ne!(rw & 1 << bit, 0);
        }
    }
}
