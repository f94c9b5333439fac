//! The `qcow2` format: QEMU's copy-on-write image format, versions 2 and 3.
//!
//! Layout: guest offsets map through a two-level table (the L1 table in memory, L2 tables
//! cached by [`l2cache`]) to host clusters of the `file` child; clusters not allocated in this
//! image come from the `backing` node, or read as zeroes. Reference counts
//! ([`refcount`]) record which host clusters are in use.
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

pub mod check;
pub mod compress;
pub mod create;
mod create_hook;
pub mod header;
pub mod l2cache;
pub mod refcount;
pub mod sync;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::lock::Mutex as AsyncMutex;

use self::header::{Header, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY};
use self::l2cache::{L2Cache, Slice};
use self::refcount::{read_bytes, write_bytes, Refcounts};
use self::sync::{InFlight, ReadEpoch};
use super::{
    BlockDriver, BlockStatus, DriverInfo, DriverKind, IoFuture, Limits, OpenContext, OpenFuture,
};
use crate::error::{BlockError, Result};
use crate::io::iovec::{self, IoVec};
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
pub const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bits of a standard L2 entry holding the cluster offset.
pub const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// The cluster (or L2 table) has refcount 1 and may be written in place.
pub const OFLAG_COPIED: u64 = 1 << 63;
/// The cluster is compressed.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// The cluster reads as zeroes (version 3).
pub const OFLAG_ZERO: u64 = 1;

/// QEMU's default upper bound of the L2 cache (32 MiB).
const DEFAULT_L2_CACHE_MAX: u64 = 32 << 20;
/// Minimum refcount cache, in clusters.
const MIN_REFCOUNT_CACHE_CLUSTERS: u64 = 4;
/// Pending frees that trigger a metadata write-back to apply them.
const FREE_BATCH: usize = 4096;
/// Longest run of clusters one allocating write takes at once.
const MAX_ALLOC_RUN: u64 = 1024;

/// What a guest range maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Data in this image at `host` (offset of the range's first byte).
    Data { host: u64, copied: bool },
    /// Reads as zeroes.
    Zero,
    /// Not allocated here: the backing node, or zeroes.
    Unallocated,
    /// A compressed cluster, by its L2 entry.
    Compressed { entry: u64 },
}

/// How a range of whole clusters is made to read as zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ZeroMode {
    /// A discard request: free the clusters.
    Discard,
    /// write_zeroes; `unmap` may free the clusters.
    Zero { unmap: bool },
}

/// State changed only under the metadata lock.
struct Meta {
    /// Refcounts (only for images opened read-write).
    rc: Option<Refcounts>,
    /// L1 entries changed in memory but not on disk.
    l1_dirty: BTreeSet<u64>,
    /// Clusters whose refcount drops once the metadata no longer referencing them is on
    /// disk and no request uses them any more.
    pending_frees: Vec<u64>,
}

impl Meta {
    fn rc(&mut self) -> Result<&mut Refcounts> {
        self.rc
            .as_mut()
            .ok_or_else(|| BlockError::new(libc::EROFS, "qcow2: image is read-only"))
    }
}

/// An open qcow2 image.
pub struct Qcow2 {
    file: Arc<Node>,
    backing: Option<Arc<Node>>,
    header: Header,
    cluster_bits: u32,
    cluster_size: u64,
    /// log2 of the entries per L2 table.
    l2_bits: u32,
    /// L2 entries per cache slice.
    slice_entries: u64,
    read_only: bool,
    pass_discard: bool,
    l1: Box<[AtomicU64]>,
    l2: L2Cache,
    meta: AsyncMutex<Meta>,
    inflight: InFlight,
    epoch: ReadEpoch,
}

/// Cache sizes from QEMU's options (`read_cache_sizes`).
struct CacheSizes {
    l2_bytes: u64,
    l2_entry_bytes: u64,
    refcount_bytes: u64,
}

fn cache_sizes(ctx: &mut OpenContext<'_>, h: &Header) -> Result<CacheSizes> {
    let cs = h.cluster_size();
    let combined = ctx.options.take_size("cache-size")?;
    let l2_set = ctx.options.take_size("l2-cache-size")?;
    let rc_set = ctx.options.take_size("refcount-cache-size")?;
    let entry_set = ctx.options.take_size("l2-cache-entry-size")?;
    let max_l2_cache = (h.size.div_ceil(cs) * h.l2_entry_size()).div_ceil(cs) * cs;
    let mut l2 = max_l2_cache.min(l2_set.unwrap_or(DEFAULT_L2_CACHE_MAX));
    let mut rc = rc_set.unwrap_or(0);
    let min_rc = MIN_REFCOUNT_CACHE_CLUSTERS * cs;
    if let Some(combined) = combined {
        if l2_set.is_some() && rc_set.is_some() {
            return Err(BlockError::invalid(
                "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time",
            ));
        }
        if l2_set.is_some_and(|l| l > combined) {
            return Err(BlockError::invalid(
                "l2-cache-size may not exceed cache-size",
            ));
        }
        if rc > combined {
            return Err(BlockError::invalid(
                "refcount-cache-size may not exceed cache-size",
            ));
        }
        if l2_set.is_some() {
            rc = combined - l2;
        } else if rc_set.is_some() {
            l2 = combined - rc;
        } else if combined >= max_l2_cache + min_rc {
            l2 = max_l2_cache;
            rc = combined - l2;
        } else {
            rc = combined.min(min_rc);
            l2 = combined - rc;
        }
    }
    let mut entry = entry_set.unwrap_or(cs);
    if l2 < max_l2_cache && entry_set.is_none() {
        entry = cs.min(4096);
    }
    if entry < 512 || entry > cs || !entry.is_power_of_two() {
        return Err(BlockError::invalid(format!(
            "L2 cache entry size must be a power of two between 512 and the cluster size ({cs})"
        )));
    }
    Ok(CacheSizes {
        l2_bytes: l2,
        l2_entry_bytes: entry,
        refcount_bytes: rc,
    })
}

fn open<'a>(ctx: &'a mut OpenContext<'_>) -> OpenFuture<'a> {
    Box::pin(open_qcow2(ctx))
}

async fn open_qcow2(ctx: &mut OpenContext<'_>) -> Result<Box<dyn BlockDriver>> {
    // Options QEMU has that need no action here: refcounts are always kept exact, and the
    // overlap checks guard against bugs strata's ordering rules avoid by construction.
    ctx.options.take_bool("lazy-refcounts")?;
    ctx.options.take_u64("cache-clean-interval")?;
    ctx.options.take_bool("pass-discard-snapshot")?;
    ctx.options.take_bool("pass-discard-other")?;
    ctx.options.take_bool("discard-no-unref")?;
    if let Some(v) = ctx.options.take("overlap-check") {
        if !matches!(v.as_str(), "none" | "constant" | "cached" | "all") {
            return Err(BlockError::invalid(format!(
                "Parameter 'overlap-check' expects 'none', 'constant', 'cached' or 'all', got \
                 '{v}'"
            )));
        }
    }
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
    let image = Qcow2::open_image(file, backing, header, read_only, pass_discard, sizes).await?;
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

impl Qcow2 {
    async fn open_image(
        file: Arc<Node>,
        backing: Option<Arc<Node>>,
        mut header: Header,
        read_only: bool,
        pass_discard: bool,
        sizes: CacheSizes,
    ) -> Result<Self> {
        let cs = header.cluster_size();
        let l1_bytes = u64::from(header.l1_size) * 8;
        let raw = read_bytes(&file, header.l1_table_offset, l1_bytes as usize, "L1 table").await?;
        let l1: Box<[AtomicU64]> = raw
            .chunks_exact(8)
            .map(|c| AtomicU64::new(header::get_u64(c, 0)))
            .collect();
        let mut rc = None;
        if !read_only {
            if header.incompatible_features & INCOMPAT_DIRTY != 0 {
                log::warn!(
                    "qcow2 image '{}' was not closed cleanly: repairing its refcounts",
                    file.filename()
                );
                check::repair_dirty(&file, &header).await?;
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
            rc = Some(
                Refcounts::open(
                    file.clone(),
                    header.refcount_table_offset,
                    header.refcount_table_clusters,
                    header.cluster_bits,
                    header.refcount_order,
                    (sizes.refcount_bytes / cs) as usize,
                )
                .await?,
            );
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
            l1,
            l2,
            meta: AsyncMutex::new(Meta {
                rc,
                l1_dirty: BTreeSet::new(),
                pending_frees: Vec::new(),
            }),
            inflight: InFlight::default(),
            epoch: ReadEpoch::default(),
            header,
        })
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    fn size(&self) -> u64 {
        self.header.size
    }

    fn ext_l2(&self) -> bool {
        self.header.extended_l2()
    }

    /// Words per L2 entry in a slice.
    fn words(&self) -> usize {
        if self.ext_l2() {
            2
        } else {
            1
        }
    }

    fn corrupt(&self, msg: String) -> BlockError {
        BlockError::new(
            libc::EIO,
            format!("qcow2 image '{}' is corrupt: {msg}", self.file.filename()),
        )
    }

    /// Host clusters a compressed L2 entry covers: (offset, compressed bytes).
    fn compressed_extent(&self, entry: u64) -> (u64, u64) {
        let x = 62 - (self.cluster_bits - 8);
        let offset = entry & ((1u64 << x) - 1);
        let sectors = ((entry >> x) & ((1u64 << (self.cluster_bits - 8)) - 1)) + 1;
        (offset, sectors * 512 - (offset & 511))
    }

    /// Classifies the cluster piece at `intra` (offset inside the cluster) of an L2 entry;
    /// returns the kind and the bytes up to the end of the piece.
    fn classify(
        &self,
        entry: u64,
        bitmap: u64,
        intra: u64,
        where_: (u64, u64),
    ) -> Result<(Kind, u64)> {
        let cs = self.cluster_size;
        if entry & OFLAG_COMPRESSED != 0 {
            return Ok((Kind::Compressed { entry }, cs - intra));
        }
        let off = entry & L2E_OFFSET_MASK;
        if off & (cs - 1) != 0 {
            return Err(self.corrupt(format!(
                "Cluster allocation offset {off:#x} unaligned (L2 offset: {:#x}, L2 index: {:#x})",
                where_.0, where_.1
            )));
        }
        let copied = entry & OFLAG_COPIED != 0;
        if !self.ext_l2() {
            let kind = if entry & OFLAG_ZERO != 0 {
                Kind::Zero
            } else if off == 0 {
                Kind::Unallocated
            } else {
                Kind::Data {
                    host: off + intra,
                    copied,
                }
            };
            return Ok((kind, cs - intra));
        }
        // Extended L2: 32 subclusters, an allocation bit and a zero bit each.
        let scs = cs / 32;
        let sc_kind = |sc: u64| -> Result<Kind> {
            let alloc = (bitmap >> sc) & 1 != 0;
            let zero = (bitmap >> (32 + sc)) & 1 != 0;
            match (alloc, zero) {
                (true, true) => Err(self.corrupt(format!(
                    "subcluster {sc} of L2 entry {:#x} (L2 offset {:#x}) is both allocated and zero",
                    where_.1, where_.0
                ))),
                (true, false) if off == 0 => Err(self.corrupt(format!(
                    "subcluster {sc} of unallocated L2 entry {:#x} (L2 offset {:#x}) is marked \
                     allocated",
                    where_.1, where_.0
                ))),
                (true, false) => Ok(Kind::Data { host: 0, copied }),
                (false, true) => Ok(Kind::Zero),
                (false, false) => Ok(Kind::Unallocated),
            }
        };
        let first = intra / scs;
        let kind = sc_kind(first)?;
        let mut end = first + 1;
        while end < 32 && sc_kind(end)? == kind {
            end += 1;
        }
        let kind = match kind {
            Kind::Data { copied, .. } => Kind::Data {
                host: off + intra,
                copied,
            },
            k => k,
        };
        Ok((kind, end * scs - intra))
    }

    /// The L2 slice holding guest cluster `cluster`, if its L2 table exists, and the index of
    /// the cluster's entry in it.
    async fn slice_of(&self, cluster: u64) -> Result<Option<(Arc<Slice>, u64)>> {
        let l1_index = cluster >> self.l2_bits;
        let Some(l1e) = self.l1.get(l1_index as usize) else {
            return Err(self.corrupt(format!("guest cluster {cluster:#x} lies past the L1 table")));
        };
        let l1e = l1e.load(Ordering::Acquire);
        let l2_off = l1e & L1E_OFFSET_MASK;
        if l2_off == 0 {
            return Ok(None);
        }
        if l2_off & (self.cluster_size - 1) != 0 {
            return Err(l2cache::bad_l2_offset(l1_index, l1e));
        }
        let in_table = cluster & ((1 << self.l2_bits) - 1);
        let slice_index = in_table / self.slice_entries;
        let slice_off = l2_off + slice_index * self.l2.slice_bytes();
        let slice = self.l2.get(&self.file, slice_off).await?;
        Ok(Some((slice, in_table % self.slice_entries)))
    }

    fn entry_at(&self, slice: &Slice, index: u64) -> (u64, u64) {
        let w = self.words();
        let i = index as usize * w;
        let bitmap = if w == 2 { slice.get(i + 1) } else { 0 };
        (slice.get(i), bitmap)
    }

    /// What guest bytes `offset..offset+max` map to: the kind of the first byte and how many
    /// bytes from `offset` share it (contiguously, for data).
    async fn map(&self, offset: u64, max: u64) -> Result<(Kind, u64)> {
        let cs = self.cluster_size;
        let cluster = offset >> self.cluster_bits;
        let Some((slice, index)) = self.slice_of(cluster).await? else {
            let l1_span = cs << self.l2_bits;
            let rest = l1_span - offset % l1_span;
            return Ok((Kind::Unallocated, rest.min(max)));
        };
        let mut pos = offset;
        let mut i = index;
        let mut result: Option<(Kind, u64)> = None;
        while pos < offset + max && i < self.slice_entries {
            let (entry, bitmap) = self.entry_at(&slice, i);
            let intra = pos & (cs - 1);
            let (kind, len) = self.classify(entry, bitmap, intra, (slice.offset, i))?;
            let len = len.min(offset + max - pos);
            match result {
                None => result = Some((kind, len)),
                Some((first, total)) => {
                    let merges = match (first, kind) {
                        (Kind::Zero, Kind::Zero) | (Kind::Unallocated, Kind::Unallocated) => true,
                        (
                            Kind::Data {
                                host: h0,
                                copied: c0,
                            },
                            Kind::Data {
                                host: h1,
                                copied: c1,
                            },
                        ) => c0 == c1 && h0 + total == h1,
                        _ => false,
                    };
                    if !merges {
                        break;
                    }
                    result = Some((first, total + len));
                }
            }
            pos += len;
            if pos & (cs - 1) == 0 {
                i += 1;
            } else if matches!(result, Some((Kind::Compressed { .. }, _))) {
                break;
            }
        }
        result.ok_or_else(|| BlockError::invalid("qcow2: empty mapping request"))
    }

    /// Reads guest range `offset..` from the backing node (zeroes past its end or without one).
    async fn read_backing(&self, offset: u64, iov: &[IoVec<'_>]) -> Result<()> {
        let len = iovec::total_len(iov);
        let Some(b) = &self.backing else {
            iovec::zero_iov(iov, 0);
            return Ok(());
        };
        let have = b.size().saturating_sub(offset).min(len);
        if have < len {
            iovec::zero_iov(iov, have as usize);
        }
        if have > 0 {
            let part = iovec::sub_iov(iov, 0, have as usize);
            b.read(offset, &part).await?;
        }
        Ok(())
    }

    /// Decompresses the cluster of a compressed L2 entry.
    async fn read_compressed_cluster(&self, entry: u64) -> Result<Vec<u8>> {
        let (offset, csize) = self.compressed_extent(entry);
        // The last sector may lie past the end of the file.
        let avail = self.file.size().saturating_sub(offset).min(csize);
        if avail == 0 {
            return Err(self.corrupt(format!(
                "compressed cluster at {offset:#x} lies past the end of the file"
            )));
        }
        let input = read_bytes(&self.file, offset, avail as usize, "compressed cluster").await?;
        let mut out = vec![0u8; self.cluster_size as usize];
        compress::decompress(self.header.compression_type, &input, &mut out)
            .map_err(|e| e.context(format!("cluster at {offset:#x}")))?;
        Ok(out)
    }

    /// A read of data this image holds in one cluster whose L2 slice is cached: the whole
    /// request goes to the file child with no further lookup or allocation. `None` for
    /// everything else (the general path handles it).
    fn read_fast<'a>(&'a self, offset: u64, iov: &'a [IoVec<'a>]) -> Option<IoFuture<'a, ()>> {
        if self.ext_l2() {
            return None;
        }
        let cs = self.cluster_size;
        let intra = offset & (cs - 1);
        let len = iovec::total_len(iov);
        if len == 0 || intra + len > cs {
            return None;
        }
        // Entered before the lookup, as in `read_impl`: the host cluster cannot be freed
        // until the read finished.
        let guard = self.epoch.enter();
        let cluster = offset >> self.cluster_bits;
        let l1e = self.l1.get((cluster >> self.l2_bits) as usize)?;
        let l2_off = l1e.load(Ordering::Acquire) & L1E_OFFSET_MASK;
        if l2_off == 0 || l2_off & (cs - 1) != 0 {
            return None;
        }
        let in_table = cluster & ((1 << self.l2_bits) - 1);
        let slice_off = l2_off + (in_table / self.slice_entries) * self.l2.slice_bytes();
        let entry = self
            .l2
            .peek(slice_off, (in_table % self.slice_entries) as usize)?;
        let host = entry & L2E_OFFSET_MASK;
        if entry & (OFLAG_COMPRESSED | OFLAG_ZERO) != 0 || host == 0 || host & (cs - 1) != 0 {
            return None;
        }
        let file = &self.file;
        Some(Box::pin(async move {
            let _guard = guard;
            file.read(host + intra, iov).await
        }))
    }

    async fn read_impl(&self, offset: u64, iov: &[IoVec<'_>]) -> Result<()> {
        let len = iovec::total_len(iov);
        let _guard = self.epoch.enter();
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let (kind, n) = self.map(pos, len - done).await?;
            let part = iovec::sub_iov(iov, done as usize, n as usize);
            match kind {
                Kind::Data { host, .. } => self.file.read(host, &part).await?,
                Kind::Zero => iovec::zero_iov(&part, 0),
                Kind::Unallocated => self.read_backing(pos, &part).await?,
                Kind::Compressed { entry } => {
                    let cluster = self.read_compressed_cluster(entry).await?;
                    let intra = (pos & (self.cluster_size - 1)) as usize;
                    iovec::copy_to_iov(&part, 0, &cluster[intra..intra + n as usize]);
                }
            }
            done += n;
        }
        Ok(())
    }

    /// The logical content of `len` bytes at guest `offset` inside the cluster whose old L2
    /// entry is `entry` (for copy-on-write).
    async fn cow_data(&self, entry: u64, offset: u64, len: u64) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len as usize];
        if len == 0 {
            return Ok(buf);
        }
        let intra = offset & (self.cluster_size - 1);
        match self.classify(entry, 0, intra, (0, 0))?.0 {
            Kind::Zero => {}
            Kind::Unallocated => self.read_backing(offset, &[IoVec::new(&mut buf)]).await?,
            Kind::Data { host, .. } => {
                self.file.read(host, &[IoVec::new(&mut buf)]).await?;
            }
            Kind::Compressed { entry } => {
                let cluster = self.read_compressed_cluster(entry).await?;
                buf.copy_from_slice(&cluster[intra as usize..(intra + len) as usize]);
            }
        }
        Ok(buf)
    }

    /// Whether writing into the cluster of this entry needs a new cluster.
    fn needs_alloc(entry: u64) -> bool {
        entry & OFLAG_COMPRESSED != 0
            || entry & OFLAG_ZERO != 0
            || entry & OFLAG_COPIED == 0
            || entry & L2E_OFFSET_MASK == 0
    }

    /// Clusters that stop being referenced when an L2 entry `old` becomes `new`.
    fn freed_by(&self, old: u64, new: u64, out: &mut Vec<u64>) {
        if old & OFLAG_COMPRESSED != 0 {
            let (offset, csize) = self.compressed_extent(old);
            let first = offset >> self.cluster_bits;
            let last = (offset + csize - 1) >> self.cluster_bits;
            out.extend(first..=last);
            return;
        }
        let off = old & L2E_OFFSET_MASK;
        if off != 0 && (new & OFLAG_COMPRESSED != 0 || new & L2E_OFFSET_MASK != off) {
            out.push(off >> self.cluster_bits);
        }
    }

    /// The L2 slice for guest cluster `cluster`, allocating its L2 table if there is none
    /// (metadata lock held).
    async fn slice_for_update(&self, meta: &mut Meta, cluster: u64) -> Result<(Arc<Slice>, u64)> {
        let l1_index = cluster >> self.l2_bits;
        let l1e = self
            .l1
            .get(l1_index as usize)
            .map(|e| e.load(Ordering::Acquire))
            .ok_or_else(|| {
                self.corrupt(format!("guest cluster {cluster:#x} lies past the L1 table"))
            })?;
        if l1e & L1E_OFFSET_MASK != 0 {
            if l1e & OFLAG_COPIED == 0 {
                return Err(BlockError::new(
                    libc::ENOTSUP,
                    format!(
                        "qcow2: L2 table of L1 entry {l1_index} is shared (refcount > 1); \
                         writing to it is not supported"
                    ),
                ));
            }
            return self
                .slice_of(cluster)
                .await?
                .ok_or_else(|| BlockError::invalid("qcow2: L2 table vanished"));
        }
        // A new L2 table: zeroed on disk before the L1 entry (in memory now, on disk at the
        // next write-back, after its refcount) points at it.
        let l2_off = meta.rc()?.alloc(1).await?;
        write_bytes(
            &self.file,
            l2_off,
            &vec![0u8; self.cluster_size as usize],
            "new L2 table",
        )
        .await?;
        let in_table = cluster & ((1 << self.l2_bits) - 1);
        let slice_index = in_table / self.slice_entries;
        let slice = self
            .l2
            .insert_zeroed(l2_off + slice_index * self.l2.slice_bytes());
        self.l1[l1_index as usize].store(l2_off | OFLAG_COPIED, Ordering::Release);
        meta.l1_dirty.insert(l1_index);
        Ok((slice, in_table % self.slice_entries))
    }

    /// Writes metadata back after changes, when the cache is getting full or many frees wait.
    async fn after_change(&self, meta: &mut Meta) -> Result<()> {
        if meta.pending_frees.len() >= FREE_BATCH {
            self.apply_frees(meta).await?;
        } else if self.l2.dirty_count() * 2 > self.l2.capacity() {
            self.write_back(meta).await?;
        }
        Ok(())
    }

    /// Writes dirty metadata in crash-safe order; returns whether the file was flushed last.
    async fn write_back(&self, meta: &mut Meta) -> Result<bool> {
        let Some(rc) = meta.rc.as_mut() else {
            return Ok(false);
        };
        let slices = self.l2.take_dirty();
        let l1_dirty = std::mem::take(&mut meta.l1_dirty);
        if slices.is_empty() && l1_dirty.is_empty() {
            // Only refcount blocks: increments and applied frees may go at any time.
            rc.write_dirty().await?;
            return Ok(false);
        }
        let result = async {
            // Data the new entries point at, then the refcounts of new clusters.
            let first = async {
                self.file.flush().await?;
                if rc.write_dirty().await? > 0 {
                    self.file.flush().await?;
                }
                Ok::<(), BlockError>(())
            };
            first.await.map_err(|e| (e, 0))?;
            for (i, s) in slices.iter().enumerate() {
                if let Err(e) = write_bytes(&self.file, s.offset, &s.to_bytes(), "L2 table").await {
                    return Err((e, i));
                }
            }
            Ok(())
        }
        .await;
        let result = match result {
            Ok(()) => Ok(()),
            Err((e, i)) => {
                for s in &slices[i..] {
                    self.l2.mark_dirty(s);
                }
                Err(e)
            }
        };
        let result = match result {
            Ok(()) if !l1_dirty.is_empty() => self.write_l1(&l1_dirty, !slices.is_empty()).await,
            r => r,
        };
        if let Err(e) = result {
            meta.l1_dirty.extend(l1_dirty);
            return Err(e);
        }
        self.file.flush().await?;
        Ok(true)
    }

    async fn write_l1(&self, dirty: &BTreeSet<u64>, after_l2: bool) -> Result<()> {
        if after_l2 {
            self.file.flush().await?;
        }
        // Contiguous runs of dirty entries, one write each.
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &i in dirty {
            match runs.last_mut() {
                Some((_, end)) if *end == i => *end += 1,
                _ => runs.push((i, i + 1)),
            }
        }
        for (start, end) in runs {
            let bytes: Vec<u8> = (start..end)
                .flat_map(|i| self.l1[i as usize].load(Ordering::Acquire).to_be_bytes())
                .collect();
            write_bytes(
                &self.file,
                self.header.l1_table_offset + start * 8,
                &bytes,
                "L1 table",
            )
            .await?;
        }
        Ok(())
    }

    /// Drops the refcounts of clusters no longer referenced: after the metadata that
    /// dropped the references is on disk and no request still uses them.
    async fn apply_frees(&self, meta: &mut Meta) -> Result<()> {
        if meta.pending_frees.is_empty() {
            return Ok(());
        }
        self.write_back(meta).await?;
        self.epoch.synchronize().await;
        let mut frees = std::mem::take(&mut meta.pending_frees);
        frees.sort_unstable();
        let rc = meta.rc()?;
        let mut unused: Vec<(u64, u64)> = Vec::new();
        for c in frees {
            if rc.update(c, -1).await? == 0 {
                match unused.last_mut() {
                    Some((_, end)) if *end == c => *end += 1,
                    _ => unused.push((c, c + 1)),
                }
            }
        }
        // Give the space back to the file system while nothing can allocate it.
        if self.pass_discard && self.file.discard_enabled() {
            for (start, end) in unused {
                let off = start << self.cluster_bits;
                let len = (end - start) << self.cluster_bits;
                let file_size = self.file.size();
                if off < file_size {
                    self.file.discard(off, len.min(file_size - off)).await?;
                }
            }
        }
        rc.write_dirty().await?;
        Ok(())
    }

    /// Writes data at `pos` (the `done..` part of `iov`) into newly allocated clusters, with
    /// copy-on-write of the partial clusters at both ends. Returns the bytes written, or 0
    /// if the first cluster needs no allocation any more (the caller writes it in place).
    async fn write_alloc(&self, pos: u64, iov: &[IoVec<'_>], done: u64, len: u64) -> Result<u64> {
        let cs = self.cluster_size;
        let c0 = pos >> self.cluster_bits;
        let req_end = pos + (len - done);
        let slice_end = (c0 / self.slice_entries + 1) * self.slice_entries;
        let c_max = req_end.div_ceil(cs).min(slice_end).min(c0 + MAX_ALLOC_RUN);
        let mut meta = loop {
            let meta = self.meta.lock().await;
            if !self.inflight.overlaps(c0, c_max) {
                break meta;
            }
            drop(meta);
            self.inflight.wait_clear(c0, c_max).await;
        };
        let (slice, index) = self.slice_for_update(&mut meta, c0).await?;
        let mut old = Vec::new();
        for i in 0..(c_max - c0) {
            let (entry, _) = self.entry_at(&slice, index + i);
            if !Self::needs_alloc(entry) {
                break;
            }
            old.push(entry);
        }
        if old.is_empty() {
            return Ok(0);
        }
        let n = old.len() as u64;
        let host = meta.rc()?.alloc(n).await?;
        let guard = self.inflight.register(c0, c0 + n);
        drop(meta);

        let start = c0 * cs;
        let end = (c0 + n) * cs;
        let wend = req_end.min(end);
        let written = wend - pos;
        let data = async {
            let mut head = self.cow_data(old[0], start, pos - start).await?;
            let mut tail = self.cow_data(old[n as usize - 1], wend, end - wend).await?;
            let mut v = Vec::with_capacity(iov.len() + 2);
            if !head.is_empty() {
                v.push(IoVec::new(&mut head));
            }
            v.extend(iovec::sub_iov(iov, done as usize, written as usize));
            if !tail.is_empty() {
                v.push(IoVec::new(&mut tail));
            }
            self.file.write_growing(host, &v).await
        }
        .await;
        let mut meta = self.meta.lock().await;
        if let Err(e) = data {
            // Nothing references the new clusters: give them back at once.
            let rc = meta.rc()?;
            for i in 0..n {
                rc.update((host >> self.cluster_bits) + i, -1).await?;
            }
            return Err(e);
        }
        let mut frees = Vec::new();
        for (i, &entry) in old.iter().enumerate() {
            let new = (host + i as u64 * cs) | OFLAG_COPIED;
            self.freed_by(entry, new, &mut frees);
            slice.set((index as usize + i) * self.words(), new);
        }
        self.l2.mark_dirty(&slice);
        meta.pending_frees.extend(frees);
        drop(guard);
        self.after_change(&mut meta).await?;
        Ok(written)
    }

    async fn write_impl(&self, offset: u64, iov: &[IoVec<'_>]) -> Result<()> {
        let len = iovec::total_len(iov);
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let in_place = {
                let _guard = self.epoch.enter();
                match self.map(pos, len - done).await? {
                    (Kind::Data { host, copied: true }, n) => {
                        let part = iovec::sub_iov(iov, done as usize, n as usize);
                        self.file.write_growing(host, &part).await?;
                        n
                    }
                    _ => 0,
                }
            };
            done += if in_place > 0 {
                in_place
            } else {
                self.write_alloc(pos, iov, done, len).await?
            };
        }
        Ok(())
    }

    /// The new L2 entry making a cluster read as zeroes, or `None` to leave it.
    fn zeroed_entry(&self, old: u64, mode: ZeroMode) -> Option<u64> {
        let v3 = self.header.version >= 3;
        let has_backing = self.backing.is_some();
        let off = old & L2E_OFFSET_MASK;
        let compressed = old & OFLAG_COMPRESSED != 0;
        let unallocated = old == 0 || (!compressed && off == 0 && old & OFLAG_ZERO == 0);
        if unallocated && !has_backing {
            return None;
        }
        let new = match mode {
            ZeroMode::Discard => {
                if v3 {
                    OFLAG_ZERO
                } else {
                    0
                }
            }
            ZeroMode::Zero { unmap } => {
                if !compressed && off != 0 && old & OFLAG_COPIED != 0 && !unmap {
                    off | OFLAG_COPIED | OFLAG_ZERO
                } else {
                    OFLAG_ZERO
                }
            }
        };
        (new != old).then_some(new)
    }

    /// Makes whole clusters `start..end` read as zeroes (zero flag, or unallocated).
    async fn zero_clusters(&self, start: u64, end: u64, mode: ZeroMode) -> Result<()> {
        let mut c = start;
        while c < end {
            let slice_end = ((c / self.slice_entries + 1) * self.slice_entries).min(end);
            let mut meta = self.meta.lock().await;
            if self.inflight.overlaps(c, slice_end) {
                drop(meta);
                self.inflight.wait_clear(c, slice_end).await;
                continue;
            }
            let slice = match self.slice_of(c).await? {
                Some(s) => Some(s),
                // No L2 table: everything reads from the backing file, or as zeroes.
                None if self.backing.is_some() => Some(self.slice_for_update(&mut meta, c).await?),
                None => None,
            };
            if let Some((slice, index)) = slice {
                let mut frees = Vec::new();
                let mut changed = false;
                for i in 0..(slice_end - c) {
                    let w = (index + i) as usize * self.words();
                    let old = slice.get(w);
                    if let Some(new) = self.zeroed_entry(old, mode) {
                        self.freed_by(old, new, &mut frees);
                        slice.set(w, new);
                        changed = true;
                    }
                }
                if changed {
                    self.l2.mark_dirty(&slice);
                    meta.pending_frees.extend(frees);
                    self.after_change(&mut meta).await?;
                }
            }
            c = slice_end;
        }
        Ok(())
    }

    /// Whether guest bytes `offset..offset+len` already read as zeroes.
    async fn reads_as_zero(&self, offset: u64, len: u64) -> Result<bool> {
        let mut done = 0;
        while done < len {
            let pos = offset + done;
            let (kind, n) = self.map(pos, len - done).await?;
            let zero = match kind {
                Kind::Zero => true,
                Kind::Unallocated => self.backing.as_ref().is_none_or(|b| pos >= b.size()),
                _ => false,
            };
            if !zero {
                return Ok(false);
            }
            done += n;
        }
        Ok(true)
    }

    /// Writes zeroes as data (where zero clusters cannot be used).
    async fn write_zero_data(&self, offset: u64, len: u64) -> Result<()> {
        let chunk = len.min(1 << 20);
        let mut zeroes = vec![0u8; chunk as usize];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(chunk);
            self.write_impl(at, &[IoVec::new(&mut zeroes[..n as usize])])
                .await?;
            at += n;
        }
        Ok(())
    }

    /// Whole clusters of `offset..offset+len` (the last partial cluster of the image counts).
    fn whole_clusters(&self, offset: u64, len: u64) -> (u64, u64) {
        let cs = self.cluster_size;
        let start = offset.div_ceil(cs);
        let end_byte = offset + len;
        let end = if end_byte >= self.size() {
            end_byte.div_ceil(cs)
        } else {
            end_byte / cs
        };
        (start, end.max(start))
    }

    async fn write_zeroes_impl(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let v3 = self.header.version >= 3;
        if !v3 && self.backing.is_some() {
            // Version 2 has no zero flag: only data hides the backing file.
            return self.write_zero_data(offset, len).await;
        }
        let cs = self.cluster_size;
        let (c0, c1) = self.whole_clusters(offset, len);
        let (mid_start, mid_end) = if c1 > c0 {
            ((c0 * cs).max(offset), (c1 * cs).min(offset + len))
        } else {
            (offset + len, offset + len)
        };
        for (s, e) in [
            (offset, mid_start.min(offset + len)),
            (mid_end.max(offset), offset + len),
        ] {
            if e > s && !self.reads_as_zero(s, e - s).await? {
                self.write_zero_data(s, e - s).await?;
            }
        }
        if c1 > c0 {
            let mode = if v3 {
                ZeroMode::Zero { unmap }
            } else {
                ZeroMode::Discard
            };
            self.zero_clusters(c0, c1, mode).await?;
        }
        Ok(())
    }

    async fn flush_impl(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut meta = self.meta.lock().await;
        self.apply_frees(&mut meta).await?;
        if !self.write_back(&mut meta).await? {
            self.file.flush().await?;
        }
        Ok(())
    }

    async fn block_status_impl(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let (kind, n) = self.map(offset, len).await?;
        Ok(match kind {
            Kind::Data { .. } | Kind::Compressed { .. } => BlockStatus {
                data: true,
                zero: false,
                len: n,
            },
            Kind::Zero => BlockStatus {
                data: false,
                zero: true,
                len: n,
            },
            Kind::Unallocated => match &self.backing {
                Some(b) if offset < b.size() => {
                    let mut s = b.block_status(offset, n.min(b.size() - offset)).await?;
                    s.len = s.len.min(n);
                    s
                }
                _ => BlockStatus {
                    data: false,
                    zero: true,
                    len: n,
                },
            },
        })
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

    fn close(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.read_only {
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
