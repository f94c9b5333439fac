//! The `qcow2` format: QEMU's copy-on-write image format, versions 2 and 3.
//!
//! Layout: guest offsets map through a two-level table (the L1 table in memory, L2 tables
//! cached by `l2cache`) to host clusters of the `file` child; clusters not allocated in this
//! image come from the `backing` node, or read as zeroes. Reference counts
//! (`refcount`) record which host clusters are in use.
//!
//! Concurrency: one instance serves every queue thread. Reads and writes into clusters this
//! image owns go straight to the file child from the caller's buffers after a lock-free L2
//! lookup. Everything that changes metadata (allocating writes, zeroing, discard, flush)
//! runs under one async metadata lock, released while an allocating write copies data; the
//! guest clusters it is changing are registered as in flight, so no second request
//! allocates them again. Host clusters whose last reference went away are freed only after
//! the metadata change is on disk and every request that might still use them finished.
//!
//! Crash consistency (what `qemu-img check` verifies): a refcount block is written before
//! any L2/L1 entry that points at a cluster it counts, data before the L2 entry pointing at
//! it, a new L2 table before the L1 entry, and decrements only after the references are
//! gone from the disk. A flush writes data, then refcount blocks, then L2 tables, then L1
//! entries, with a flush of the file between each step.

mod cache_sizes;
mod check;
mod cluster_map;
mod compress;
mod create;
mod create_hook;
mod feature_names;
mod header;
mod info;
mod l1table;
mod l2cache;
mod mapping;
mod overlap;
mod read;
mod refcount;
mod repair;
mod resize;
mod sync;
mod write;
mod writeback;
mod zero;

// The interface of the image tools (`strata img`): create, check and describe an image.
pub use self::check::{check, CheckResult, Repair};
pub use self::create::{create_file, CreateOptions};
pub use self::info::{read_info, ImageInfo};

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use futures::lock::Mutex as AsyncMutex;

use self::cache_sizes::{cache_sizes, CacheSizes};
use self::header::{Header, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY};
use self::l1table::L1Table;
use self::l2cache::L2Cache;
use self::overlap::Overlap;
use self::refcount::{read_bytes, write_bytes, Refcounts};
use self::sync::{InFlight, ReadEpoch};
use self::writeback::Meta;
use self::zero::ZeroMode;
use super::{
    BlockDriver, BlockStatus, DriverInfo, DriverKind, IoFuture, Limits, OpenContext, OpenFuture,
};
use crate::error::{BlockError, Result};
use crate::io::iovec::IoVec;
use crate::node::{ChildRole, Node};

/// The `qcow2` driver.
pub const DRIVER: DriverInfo = DriverInfo {
    name: "qcow2",
    kind: DriverKind::Format,
    protocol_prefix: None,
    probe_device: None,
    open,
    create: Some(create_hook::create_image),
};

/// Bits of an L1 entry holding the L2 table offset.
const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bits of a standard L2 entry holding the cluster offset.
const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// The cluster (or L2 table) has refcount 1 and may be written in place.
const OFLAG_COPIED: u64 = 1 << 63;
/// The cluster is compressed.
const OFLAG_COMPRESSED: u64 = 1 << 62;
/// The cluster reads as zeroes (version 3).
const OFLAG_ZERO: u64 = 1;

/// An open qcow2 image.
struct Qcow2 {
    file: Arc<Node>,
    backing: Option<Arc<Node>>,
    /// The header as opened (its size and L1 fields as they were then: see `size` and `l1`).
    header: Header,
    /// Virtual disk size in bytes (changed by `resize`).
    size: AtomicU64,
    cluster_bits: u32,
    cluster_size: u64,
    /// log2 of the entries per L2 table.
    l2_bits: u32,
    /// L2 entries per cache slice.
    slice_entries: u64,
    read_only: bool,
    pass_discard: bool,
    /// The active L1 table, replaced when the image grows past it (see `l1table`).
    l1: ArcSwap<L1Table>,
    l2: L2Cache,
    meta: AsyncMutex<Meta>,
    /// Metadata overlap checks (images opened read-write).
    overlap: Option<Arc<Overlap>>,
    inflight: InFlight,
    epoch: ReadEpoch,
    /// Whether the file can zero new clusters without writing zeroes (see `write_alloc`);
    /// cleared at its first refusal.
    zeroes_without_data: AtomicBool,
    /// Guest writes in flight on the image.
    writes_in_flight: AtomicUsize,
}

fn open<'a>(ctx: &'a mut OpenContext<'_>) -> OpenFuture<'a> {
    Box::pin(open_qcow2(ctx))
}

async fn open_qcow2(ctx: &mut OpenContext<'_>) -> Result<Box<dyn BlockDriver>> {
    // Options QEMU has that need no action here: refcounts are always kept exact.
    ctx.options.take_bool("lazy-refcounts")?;
    ctx.options.take_u64("cache-clean-interval")?;
    ctx.options.take_bool("pass-discard-snapshot")?;
    ctx.options.take_bool("pass-discard-other")?;
    ctx.options.take_bool("discard-no-unref")?;
    let overlap_mask = overlap::parse_options(&mut ctx.options)?;
    let pass_discard = ctx
        .options
        .take_bool("pass-discard-request")?
        .unwrap_or(true);
    if ctx.options.contains("data-file") || ctx.options.has_prefix("data-file") {
        return Err(BlockError::new(
            libc::ENOTSUP,
            "qcow2: external data files ('data-file') are not supported",
        ));
    }
    if ctx.options.has_prefix("encrypt") {
        return Err(BlockError::new(
            libc::ENOTSUP,
            "qcow2: encryption ('encrypt.*') is not supported",
        ));
    }
    let file = ctx.open_child(ChildRole::File).await?;
    let header = read_header(&file).await?;
    let read_only = ctx.flags.read_only;
    check_features(&header, read_only, &file.filename())?;
    let sizes = cache_sizes(ctx, &header)?;
    let backing = ctx
        .open_backing(
            header.backing_file.as_deref(),
            header.backing_format().as_deref(),
        )
        .await
        .map_err(|e| e.context("Could not open backing file"))?;
    let image = Qcow2::open_image(
        file,
        backing,
        header,
        Settings {
            read_only,
            pass_discard,
            overlap_mask,
        },
        sizes,
    )
    .await?;
    Ok(Box::new(image))
}

async fn read_header(file: &Node) -> Result<Header> {
    let size = file.size();
    let first = size.min(4096) as usize;
    let mut buf = vec![0u8; first];
    file.read(0, &[IoVec::new(&mut buf)])
        .await
        .map_err(|e| e.context("qcow2: could not read the header"))?;
    if buf.len() >= 24 {
        let bits = header::get_u32(&buf, 20);
        if (header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&bits) {
            let want = size.min(1 << bits) as usize;
            if want > buf.len() {
                buf = vec![0u8; want];
                file.read(0, &[IoVec::new(&mut buf)])
                    .await
                    .map_err(|e| e.context("qcow2: could not read the header"))?;
            }
        }
    }
    Header::parse(&buf)
        .map_err(|e| e.context(format!("Could not open qcow2 image '{}'", file.filename())))
}

/// Refuses features strata does not implement, naming them.
fn check_features(h: &Header, read_only: bool, filename: &str) -> Result<()> {
    let refuse = |what: String| {
        Err(BlockError::new(
            libc::ENOTSUP,
            format!("qcow2 image '{filename}': {what}"),
        ))
    };
    if h.incompatible_features & INCOMPAT_DATA_FILE != 0 {
        return refuse(format!(
            "{} is not supported{}",
            h.describe_features(0, INCOMPAT_DATA_FILE),
            h.data_file()
                .map(|f| format!(" (data file '{f}')"))
                .unwrap_or_default()
        ));
    }
    if read_only {
        return Ok(());
    }
    if h.incompatible_features & INCOMPAT_CORRUPT != 0 {
        return Err(BlockError::new(
            libc::EACCES,
            format!(
                "qcow2: Image '{filename}' is corrupt; cannot be opened read/write (repair it with \
                 'strata img check -r all' or open it read-only)"
            ),
        ));
    }
    if h.extended_l2() {
        return refuse(format!(
            "writing images with {} is not supported; open it read-only",
            h.describe_features(0, header::INCOMPAT_EXTL2)
        ));
    }
    if h.nb_snapshots > 0 {
        return refuse(format!(
            "writing images with internal snapshots ({} found) is not supported; open it \
             read-only",
            h.nb_snapshots
        ));
    }
    Ok(())
}

/// What the options say about an image being opened.
struct Settings {
    read_only: bool,
    pass_discard: bool,
    /// The metadata kinds `overlap-check` selects.
    overlap_mask: u32,
}

impl Qcow2 {
    async fn open_image(
        file: Arc<Node>,
        backing: Option<Arc<Node>>,
        mut header: Header,
        settings: Settings,
        sizes: CacheSizes,
    ) -> Result<Self> {
        let Settings {
            read_only,
            pass_discard,
            overlap_mask,
        } = settings;
        let cs = header.cluster_size();
        let l1_bytes = u64::from(header.l1_size) * 8;
        let raw = read_bytes(&file, header.l1_table_offset, l1_bytes as usize, "L1 table").await?;
        let l1 = L1Table::new(
            header.l1_table_offset,
            raw.chunks_exact(8).map(|c| header::get_u64(c, 0)),
        );
        let mut rc = None;
        let mut overlap = None;
        if !read_only {
            if header.incompatible_features & INCOMPAT_DIRTY != 0 {
                log::warn!(
                    "qcow2 image '{}' was not closed cleanly: repairing its refcounts",
                    file.filename()
                );
                repair::repair_dirty(&file, &header).await?;
                header = read_header(&file).await?;
            }
            if header.autoclear_features != 0 {
                log::info!(
                    "qcow2 image '{}': clearing autoclear features ({}) that strata does not \
                     maintain",
                    file.filename(),
                    header.describe_features(2, header.autoclear_features)
                );
                write_bytes(
                    &file,
                    header::field::AUTOCLEAR_FEATURES,
                    &0u64.to_be_bytes(),
                    "header (autoclear features)",
                )
                .await?;
                file.flush().await?;
                header.autoclear_features = 0;
            }
            let mut refcounts = Refcounts::open(
                file.clone(),
                header.refcount_table_offset,
                header.refcount_table_clusters,
                header.cluster_bits,
                header.refcount_order,
                (sizes.refcount_bytes / cs) as usize,
            )
            .await?;
            let o = Arc::new(Overlap::build(
                &header,
                &l1.entries,
                &refcounts.table,
                file.size(),
                file.filename(),
                overlap_mask,
            )?);
            refcounts.overlap = Some(o.clone());
            overlap = Some(o);
            rc = Some(refcounts);
        }
        let l2_bits = header.cluster_bits - header.l2_entry_size().trailing_zeros();
        let slice_entries = sizes.l2_entry_bytes / header.l2_entry_size();
        let l2 = L2Cache::new(
            (sizes.l2_bytes / sizes.l2_entry_bytes) as usize,
            sizes.l2_entry_bytes,
        );
        Ok(Self {
            file,
            backing,
            cluster_bits: header.cluster_bits,
            cluster_size: cs,
            l2_bits,
            slice_entries,
            read_only,
            pass_discard,
            l1: ArcSwap::from_pointee(l1),
            l2,
            meta: AsyncMutex::new(Meta {
                rc,
                l1_dirty: BTreeSet::new(),
                pending_frees: Vec::new(),
            }),
            overlap,
            inflight: InFlight::default(),
            epoch: ReadEpoch::default(),
            zeroes_without_data: AtomicBool::new(true),
            writes_in_flight: AtomicUsize::new(0),
            size: AtomicU64::new(header.size),
            header,
        })
    }

    /// Virtual disk size in bytes.
    #[inline]
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Whether L2 entries have subcluster bitmaps.
    #[inline]
    fn ext_l2(&self) -> bool {
        self.header.extended_l2()
    }

    /// Words per L2 entry in a slice.
    #[inline]
    fn words(&self) -> usize {
        if self.ext_l2() {
            2
        } else {
            1
        }
    }

    /// Fails once the image was marked corrupt (by an overlap check): it takes no writes.
    #[inline]
    fn check_writable(&self) -> Result<()> {
        match &self.overlap {
            Some(o) if o.is_corrupt() => Err(o.corrupt_error()),
            _ => Ok(()),
        }
    }

    /// Refuses a write of `kind` (0: guest data or new metadata) to host bytes
    /// `offset..offset+len` that would overlap other metadata (see `overlap`). A few loads
    /// unless the map has metadata there (a corrupt image), which takes the boxed slow path.
    async fn guard_write(&self, offset: u64, len: u64, kind: u32) -> Result<()> {
        match &self.overlap {
            Some(o) if o.is_corrupt() || o.may_hit(offset, len) => {
                Box::pin(o.check(&self.file, offset, len, kind)).await
            }
            _ => Ok(()),
        }
    }

    /// An EIO error saying that this image's metadata is corrupt, and how.
    fn corrupt(&self, msg: String) -> BlockError {
        BlockError::new(
            libc::EIO,
            format!("qcow2 image '{}' is corrupt: {msg}", self.file.filename()),
        )
    }
}

impl BlockDriver for Qcow2 {
    fn size(&self) -> u64 {
        self.size()
    }

    fn limits(&self) -> Limits {
        let file = self.file.limits();
        Limits {
            max_iov: file.max_iov.saturating_sub(2).max(1),
            ..Limits::default()
        }
    }

    fn supports_discard(&self) -> bool {
        true
    }

    fn read<'a>(&'a self, offset: u64, iov: &'a [IoVec<'a>]) -> IoFuture<'a, ()> {
        if let Some(f) = self.read_fast(offset, iov) {
            return f;
        }
        Box::pin(self.read_impl(offset, iov))
    }

    fn write<'a>(&'a self, offset: u64, iov: &'a [IoVec<'a>]) -> IoFuture<'a, ()> {
        Box::pin(self.write_impl(offset, iov))
    }

    fn truncate(&self, size: u64) -> IoFuture<'_, ()> {
        Box::pin(self.resize(size))
    }

    /// Becoming read-only needs nothing more than the flush the node does first (which
    /// writes the cached metadata back). Becoming writable again works for an image opened
    /// read-write; one opened read-only was never checked, repaired or marked for writing.
    fn reopen_prepare<'a>(
        &'a self,
        _old: &crate::flags::NodeFlags,
        new: &crate::flags::NodeFlags,
    ) -> IoFuture<'a, ()> {
        let result = if !new.read_only && self.read_only {
            Err(BlockError::new(
                libc::ENOTSUP,
                format!(
                    "Could not make the qcow2 image '{}' writable: it was opened read-only \
                     (open it read-write and make it read-only with blockdev-reopen instead)",
                    self.file.filename()
                ),
            ))
        } else {
            Ok(())
        };
        Box::pin(std::future::ready(result))
    }

    fn close(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.read_only || self.check_writable().is_err() {
                // A corrupt image keeps what is on disk (its header says it is corrupt).
                return Ok(());
            }
            // No request is in flight (the node is gone): write the cached metadata back.
            let mut meta = self.meta.lock().await;
            self.apply_frees(&mut meta).await?;
            self.write_back(&mut meta).await?;
            self.file.flush().await
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(self.flush_impl())
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.check_writable()?;
            let (c0, c1) = self.whole_clusters(offset, len);
            if c1 > c0 {
                self.zero_clusters(c0, c1, ZeroMode::Discard).await?;
            }
            Ok(())
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> IoFuture<'_, ()> {
        Box::pin(self.write_zeroes_impl(offset, len, may_unmap))
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        Box::pin(self.block_status_impl(offset, len))
    }
}
