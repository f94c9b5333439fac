//! A node of the graph: a driver instance with its flags, limits, children and parents, the
//! checks every request passes before reaching the driver, and the zero-copy path of aligned
//! requests. Requests off the storage's alignment go through `bounced.rs`; flushes and their
//! sticky failure are in `flush.rs`.
//!
//! Requests are futures that borrow the node and the caller's buffers, so a node cannot be
//! dropped while one of its requests is in flight: dropping the last reference is the drain
//! point, after which the driver closes (and flushes) its storage.

use std::fmt;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use crate::accounting::{clock, IoKind, IoStats};
use crate::driver::{BlockDriver, BlockStatus, FileId, Limits};
use crate::error::{BlockError, Result};
use crate::flags::{DetectZeroes, DiscardMode, NodeFlags, SharedFlags};
use crate::io::executor::block_on;
use crate::io::iovec::{self, IoVec};
use crate::io::serialise::WriteSerialiser;
use crate::options::Options;

mod bounced;
mod flush;
mod stats;
pub use stats::NodeStats;

/// The role a child plays for its parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChildRole {
    /// The storage a format reads its image from (a protocol node).
    File,
    /// The image below an overlay (opened read-only).
    Backing,
}

impl ChildRole {
    /// The option key of the role (`file`, `backing`).
    pub fn key(self) -> &'static str {
        match self {
            ChildRole::File => "file",
            ChildRole::Backing => "backing",
        }
    }
}

/// A child link.
#[derive(Clone)]
pub struct Child {
    /// Role of the child.
    pub role: ChildRole,
    /// The child node.
    pub node: Arc<Node>,
}

/// An open block node.
pub struct Node {
    name: String,
    driver_name: &'static str,
    driver: Box<dyn BlockDriver>,
    /// Changed by `blockdev-reopen` (see [`reopen_prepare`](Self::reopen_prepare)).
    flags: SharedFlags,
    /// The driver's limits when the node opened; the two alignments below replace theirs.
    limits: Limits,
    /// `limits.request_alignment` as it is now: a reopen that changes `cache.direct` changes it.
    request_alignment: AtomicU32,
    /// `limits.min_mem_alignment` as it is now.
    min_mem_alignment: AtomicUsize,
    options: Options,
    explicit_options: Options,
    children: Vec<Child>,
    parents: Mutex<Vec<(ChildRole, Weak<Node>)>>,
    serialiser: WriteSerialiser,
    stats: NodeStats,
    /// Requests as QMP's `query-blockstats` reports them.
    io: IoStats,
    /// The errno of the first failed flush: once a flush failed, writes it was to make
    /// durable may be lost (the kernel forgets the error after reporting it once), so every
    /// later flush fails too, until the node is reopened. 0: none failed.
    flush_failure: AtomicI32,
}

/// What a query shows of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// Node name.
    pub name: String,
    /// Driver name.
    pub driver: String,
    /// File the node reads (its own or its file child's).
    pub filename: String,
    /// Size in bytes.
    pub size: u64,
    /// Read-only flag.
    pub read_only: bool,
    /// Children as (role, node name).
    pub children: Vec<(String, String)>,
}

pub(crate) struct NodeParts {
    pub name: String,
    pub driver_name: &'static str,
    pub driver: Box<dyn BlockDriver>,
    pub flags: NodeFlags,
    pub options: Options,
    pub explicit_options: Options,
    pub children: Vec<(ChildRole, Arc<Node>)>,
}

impl Node {
    pub(crate) fn new(parts: NodeParts) -> Result<Arc<Node>> {
        let limits = parts.driver.limits();
        if !limits.request_alignment.is_power_of_two()
            || !limits.min_mem_alignment.is_power_of_two()
        {
            return Err(BlockError::invalid(format!(
                "driver '{}' reported invalid alignment {limits:?}",
                parts.driver_name
            )));
        }
        let node = Arc::new(Node {
            name: parts.name,
            driver_name: parts.driver_name,
            driver: parts.driver,
            flags: SharedFlags::new(parts.flags),
            limits,
            request_alignment: AtomicU32::new(limits.request_alignment),
            min_mem_alignment: AtomicUsize::new(limits.min_mem_alignment),
            options: parts.options,
            explicit_options: parts.explicit_options,
            children: parts
                .children
                .into_iter()
                .map(|(role, node)| Child { role, node })
                .collect(),
            parents: Mutex::new(Vec::new()),
            serialiser: WriteSerialiser::default(),
            flush_failure: AtomicI32::new(0),
            stats: NodeStats::default(),
            io: IoStats::default(),
        });
        for child in &node.children {
            child
                .node
                .lock_parents()
                .push((child.role, Arc::downgrade(&node)));
        }
        Ok(node)
    }

    fn lock_parents(&self) -> std::sync::MutexGuard<'_, Vec<(ChildRole, Weak<Node>)>> {
        self.parents.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Node name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Driver name.
    pub fn driver_name(&self) -> &'static str {
        self.driver_name
    }

    /// Flags (as they are now: `blockdev-reopen` changes them).
    pub fn flags(&self) -> NodeFlags {
        self.flags.load()
    }

    /// Whether the node refuses writes.
    pub fn is_read_only(&self) -> bool {
        self.flags.read_only()
    }

    /// Request limits (as they are now: a reopen that changes `cache.direct` changes the
    /// alignments).
    pub fn limits(&self) -> Limits {
        Limits {
            request_alignment: self.request_alignment(),
            min_mem_alignment: self.min_mem_alignment.load(Ordering::Relaxed),
            ..self.limits
        }
    }

    fn request_alignment(&self) -> u32 {
        self.request_alignment.load(Ordering::Relaxed)
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.driver.size()
    }

    /// Effective options (after inheritance and defaults).
    pub fn options(&self) -> &Options {
        &self.options
    }

    /// Options the user gave for this node.
    pub fn explicit_options(&self) -> &Options {
        &self.explicit_options
    }

    /// Children.
    pub fn children(&self) -> &[Child] {
        &self.children
    }

    /// Whether this node or one below it sends requests over the network (rbd).
    pub fn reaches_network(&self) -> bool {
        self.driver.remote() || self.children.iter().any(|c| c.node.reaches_network())
    }

    /// The child in a role.
    pub fn child(&self, role: ChildRole) -> Option<&Arc<Node>> {
        self.children
            .iter()
            .find(|c| c.role == role)
            .map(|c| &c.node)
    }

    /// Names of the live parents, with the role this node plays for each.
    pub fn parents(&self) -> Vec<(ChildRole, String)> {
        self.lock_parents()
            .iter()
            .filter_map(|(role, p)| Some((*role, p.upgrade()?.name.clone())))
            .collect()
    }

    /// Whether writes past the end grow the node (a regular file).
    pub fn can_grow(&self) -> bool {
        self.driver.can_grow()
    }

    /// Counters.
    pub fn stats(&self) -> &NodeStats {
        &self.stats
    }

    /// The requests made to this node: operations, bytes, times, failures, histograms.
    pub fn io_stats(&self) -> &IoStats {
        &self.io
    }

    /// Whether discards reach storage (discard=unmap and the driver supports it).
    pub fn discard_enabled(&self) -> bool {
        self.flags.discard() == DiscardMode::Unmap && self.driver.supports_discard()
    }

    /// The filename of this node or, for formats, of the storage below.
    pub fn filename(&self) -> String {
        let own = self.driver.filename();
        if own.is_empty() {
            if let Some(file) = self.child(ChildRole::File) {
                return file.filename();
            }
        }
        own
    }

    /// The file or device below this node (its own, or for formats its file child's).
    pub fn file_id(&self) -> Option<FileId> {
        self.driver
            .file_id()
            .or_else(|| self.child(ChildRole::File)?.file_id())
    }

    /// A summary for queries.
    pub fn info(&self) -> NodeInfo {
        NodeInfo {
            name: self.name.clone(),
            driver: self.driver_name.to_string(),
            filename: self.filename(),
            size: self.size(),
            read_only: self.is_read_only(),
            children: self
                .children
                .iter()
                .map(|c| (c.role.key().to_string(), c.node.name.clone()))
                .collect(),
        }
    }

    /// Checks that `len` bytes at `offset` lie inside the node; inlined into every request,
    /// its error built out of line.
    #[inline]
    fn check_range(&self, offset: u64, len: u64, what: &str) -> Result<()> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(self.beyond_end(offset, len, what, size)),
        }
    }

    #[cold]
    fn beyond_end(&self, offset: u64, len: u64, what: &str, size: u64) -> BlockError {
        BlockError::new(
            libc::EIO,
            format!(
                "{what} of {len} bytes at offset {offset} is beyond the end of node '{}' \
                 ({size} bytes)",
                self.name
            ),
        )
    }

    fn check_writable(&self, what: &str) -> Result<()> {
        if self.is_read_only() {
            return Err(BlockError::new(
                libc::EROFS,
                format!("{what} refused: node '{}' is read-only", self.name),
            ));
        }
        Ok(())
    }

    fn is_aligned(&self, offset: u64, len: u64) -> bool {
        let a = u64::from(self.request_alignment());
        offset % a == 0 && len % a == 0
    }

    /// Whether the kernel takes these buffers as they are with O_DIRECT: every address a
    /// multiple of the memory alignment and, as block-device direct I/O requires of each segment
    /// on many kernels, every length a multiple of the request alignment (logical block size).
    fn mem_aligned(&self, iov: &[IoVec<'_>]) -> bool {
        let m = self.min_mem_alignment.load(Ordering::Relaxed);
        let len_align = (self.request_alignment() as usize).max(m);
        m == 1
            || iov
                .iter()
                .all(|v| (v.as_ptr() as usize) % m == 0 && v.len() % len_align == 0)
    }

    fn widen(&self, offset: u64, len: u64) -> (u64, u64) {
        let a = u64::from(self.request_alignment());
        let start = offset - offset % a;
        let end = (offset + len).div_ceil(a) * a;
        (start, end)
    }

    /// Reads `iov.len()` bytes at `offset` into the caller's buffers.
    pub async fn read(&self, offset: u64, iov: &[IoVec<'_>]) -> Result<()> {
        let len = iovec::total_len(iov);
        if let Err(e) = self.check_range(offset, len, "read") {
            self.io.invalid(IoKind::Read);
            return Err(e);
        }
        let start = clock::now();
        let result = self.read_checked(offset, iov, len).await;
        self.io.done(IoKind::Read, len, start, result.is_ok());
        result
    }

    /// [`read`](Self::read) of a range checked and accounted.
    async fn read_checked(&self, offset: u64, iov: &[IoVec<'_>], len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        if self.is_aligned(offset, len) && self.mem_aligned(iov) {
            self.stats.zero_copy.add(1);
            return self.driver.read(offset, iov).await;
        }
        // Boxed (here and on the other slow paths): a request's task is as big as its future's
        // largest state, so rare paths kept inline would make every request's task bigger.
        Box::pin(self.read_bounced(offset, iov, len)).await
    }

    /// Writes the caller's buffers at `offset`.
    pub async fn write(&self, offset: u64, iov: &[IoVec<'_>]) -> Result<()> {
        let len = iovec::total_len(iov);
        if let Err(e) = self
            .check_writable("write")
            .and_then(|()| self.check_range(offset, len, "write"))
        {
            self.io.invalid(IoKind::Write);
            return Err(e);
        }
        let start = clock::now();
        let result = self.write_checked(offset, iov, len).await;
        self.write_done(offset, len, start, result.is_ok());
        result
    }

    /// [`write`](Self::write) of a range checked and accounted.
    async fn write_checked(&self, offset: u64, iov: &[IoVec<'_>], len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let detect_zeroes = self.flags.detect_zeroes();
        if detect_zeroes != DetectZeroes::Off && iovec::iov_is_zero(iov) {
            self.stats.zeroes_detected.add(1);
            let may_unmap = detect_zeroes == DetectZeroes::Unmap;
            return Box::pin(self.zero_range(offset, len, may_unmap)).await;
        }
        self.write_data(offset, iov, len).await
    }

    /// Accounts a write (or write-zeroes) of `len` bytes at `offset` that started at `start`.
    fn write_done(&self, offset: u64, len: u64, start: u64, ok: bool) {
        self.io.done(IoKind::Write, len, start, ok);
        if ok && len > 0 {
            self.io.wrote_up_to(offset + len);
        }
    }

    /// Writes the caller's buffers at `offset` of a growable node (a regular file), extending
    /// it when the range reaches past its end: format drivers grow their image file this way.
    /// Other nodes check the range as [`write`](Self::write) does.
    pub async fn write_growing(&self, offset: u64, iov: &[IoVec<'_>]) -> Result<()> {
        if !self.driver.can_grow() {
            return self.write(offset, iov).await;
        }
        let len = iovec::total_len(iov);
        if let Err(e) = self.check_growing("write", offset, len) {
            self.io.invalid(IoKind::Write);
            return Err(e);
        }
        let start = clock::now();
        let result = if len == 0 {
            Ok(())
        } else {
            self.write_data(offset, iov, len).await
        };
        self.write_done(offset, len, start, result.is_ok());
        result
    }

    /// Checks a write of `len` bytes at `offset` of a node that grows when written past its end
    /// (a regular file): writable, and ending where a file can.
    fn check_growing(&self, what: &str, offset: u64, len: u64) -> Result<()> {
        self.check_writable(what)?;
        if offset
            .checked_add(len)
            .is_none_or(|end| end > i64::MAX as u64)
        {
            return Err(BlockError::new(
                libc::EFBIG,
                format!(
                    "{what} of {len} bytes at offset {offset} on node '{}' is too large",
                    self.name
                ),
            ));
        }
        Ok(())
    }

    /// Makes `len` bytes at `offset` read as zeroes without writing zero data, growing a
    /// regular file as [`write_growing`](Self::write_growing) does: for a format driver that
    /// would otherwise write zeroes around the data of a newly allocated cluster. ENOTSUP
    /// when the storage cannot, or the range is not made of whole blocks of the node; the
    /// caller then writes the zeroes.
    pub async fn write_zeroes_without_data(&self, offset: u64, len: u64) -> Result<()> {
        let checked = if self.driver.can_grow() {
            self.check_growing("write_zeroes", offset, len)
        } else {
            self.check_writable("write_zeroes")
                .and_then(|()| self.check_range(offset, len, "write_zeroes"))
        };
        if let Err(e) = checked {
            self.io.invalid(IoKind::Write);
            return Err(e);
        }
        if len == 0 || !self.is_aligned(offset, len) {
            return Err(BlockError::new(
                libc::ENOTSUP,
                format!(
                    "{len} bytes at offset {offset} are not whole blocks of node '{}'",
                    self.name
                ),
            ));
        }
        let start = clock::now();
        let result = {
            let _guard = self.serialiser.begin(offset, offset + len, false).await;
            self.driver.write_zeroes_without_data(offset, len).await
        };
        match &result {
            // Nothing happened: the caller writes the zeroes, and that write is accounted.
            Err(e) if e.errno() == libc::ENOTSUP => {}
            _ => self.write_done(offset, len, start, result.is_ok()),
        }
        result
    }

    /// Writes data, widening and serialising sub-block writes as alignment requires.
    async fn write_data(&self, offset: u64, iov: &[IoVec<'_>], len: u64) -> Result<()> {
        if self.request_alignment() == 1 {
            // Nothing can need read-modify-write: no serialisation needed.
            return self.write_aligned(offset, iov).await;
        }
        let aligned = self.is_aligned(offset, len);
        let (start, end) = self.widen(offset, len);
        let _guard = self.serialiser.begin(start, end, !aligned).await;
        if aligned {
            return self.write_aligned(offset, iov).await;
        }
        Box::pin(self.write_rmw(offset, iov, len, start, end)).await
    }

    async fn write_aligned(&self, offset: u64, iov: &[IoVec<'_>]) -> Result<()> {
        if self.mem_aligned(iov) {
            self.stats.zero_copy.add(1);
            return self.driver.write(offset, iov).await;
        }
        Box::pin(self.write_bounced(offset, iov)).await
    }

    /// Resizes the node to `size` bytes (QMP's `block_resize`); the parents that follow their
    /// child's size (raw without `size`) see the new size at once.
    pub async fn truncate(&self, size: u64) -> Result<()> {
        if self.is_read_only() {
            return Err(BlockError::new(
                libc::EACCES,
                format!("Cannot resize node '{}': it is read-only", self.name),
            ));
        }
        self.driver
            .truncate(size)
            .await
            .map_err(|e| e.context(format!("Could not resize node '{}'", self.name)))
    }

    /// First step of QMP's `blockdev-reopen` of this node with `new` flags, taken while no
    /// request is in flight on it (its exports are paused): a node that becomes read-only is
    /// flushed, then the driver prepares what the change needs (a file opened again
    /// read-write or with O_DIRECT, its lock permissions), changing nothing its requests see.
    /// Then either [`reopen_commit`](Self::reopen_commit) or
    /// [`reopen_abort`](Self::reopen_abort) follows, so that a reopen of several nodes
    /// changes all of them or none.
    pub async fn reopen_prepare(&self, new: &NodeFlags) -> Result<()> {
        let old = self.flags();
        if new.read_only && !old.read_only {
            self.flush().await?;
        }
        self.driver.reopen_prepare(&old, new).await
    }

    /// Applies the change [`reopen_prepare`](Self::reopen_prepare) prepared.
    pub fn reopen_commit(&self, new: &NodeFlags) {
        self.driver.reopen_commit();
        let limits = self.driver.limits();
        self.request_alignment
            .store(limits.request_alignment, Ordering::Relaxed);
        self.min_mem_alignment
            .store(limits.min_mem_alignment, Ordering::Relaxed);
        self.flags.store(*new);
    }

    /// Drops the change [`reopen_prepare`](Self::reopen_prepare) prepared.
    pub fn reopen_abort(&self) {
        self.driver.reopen_abort();
    }

    /// Discards a range; with discard=ignore this succeeds without doing anything.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if let Err(e) = self
            .check_writable("discard")
            .and_then(|()| self.check_range(offset, len, "discard"))
        {
            self.io.invalid(IoKind::Unmap);
            return Err(e);
        }
        let start = clock::now();
        let result = self.discard_checked(offset, len).await;
        self.io.done(IoKind::Unmap, len, start, result.is_ok());
        result
    }

    /// [`discard`](Self::discard) of a range checked and accounted.
    async fn discard_checked(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 || !self.discard_enabled() {
            return Ok(());
        }
        // Only whole aligned blocks can be discarded; the rest is left as is.
        let a = u64::from(self.request_alignment());
        let start = offset.div_ceil(a) * a;
        let end = (offset + len) / a * a;
        if end <= start {
            return Ok(());
        }
        let _guard = self.serialiser.begin(start, end, false).await;
        let result = self.driver.discard(start, end - start).await;
        if result.is_ok() {
            self.stats.discards_ok.add(1);
            self.stats.discard_bytes_ok.add(end - start);
        } else {
            self.stats.discards_failed.add(1);
        }
        result
    }

    /// Makes a range read as zeroes. `may_unmap` lets it free space when discard=unmap.
    pub async fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        if let Err(e) = self
            .check_writable("write_zeroes")
            .and_then(|()| self.check_range(offset, len, "write_zeroes"))
        {
            self.io.invalid(IoKind::Write);
            return Err(e);
        }
        let start = clock::now();
        let result = self.zero_range(offset, len, may_unmap).await;
        self.write_done(offset, len, start, result.is_ok());
        result
    }

    /// [`write_zeroes`](Self::write_zeroes) of a range checked and accounted (and the zero
    /// writes detect-zeroes turns writes into).
    async fn zero_range(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let may_unmap = may_unmap && self.flags.discard() == DiscardMode::Unmap;
        let a = u64::from(self.request_alignment());
        let (start, end) = self.widen(offset, len);
        if start == offset && end == offset + len {
            let _guard = self.serialiser.begin(start, end, false).await;
            return self.driver.write_zeroes(offset, len, may_unmap).await;
        }
        // Unaligned edges: zero them with read-modify-write, the aligned middle directly.
        let mid_start = offset.div_ceil(a) * a;
        let mid_end = ((offset + len) / a * a).max(mid_start);
        let zeroes = vec![0u8; to_usize(a)?];
        for (s, e) in [
            (offset, mid_start.min(offset + len)),
            (mid_end.max(offset), offset + len),
        ] {
            let mut at = s;
            while at < e {
                let n = (e - at).min(a - at % a);
                let mut chunk = zeroes[..to_usize(n)?].to_vec();
                self.write_data(at, &[IoVec::new(&mut chunk)], n).await?;
                at += n;
            }
        }
        if mid_end > mid_start {
            let _guard = self.serialiser.begin(mid_start, mid_end, false).await;
            self.driver
                .write_zeroes(mid_start, mid_end - mid_start, may_unmap)
                .await?;
        }
        Ok(())
    }

    /// Allocation status of the range starting at `offset`.
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.check_range(offset, len, "block_status")?;
        self.driver.block_status(offset, len).await
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // The last holder let go, so no request is in flight: the driver writes back and
        // flushes. Nodes are closed by control threads (exports and the graph hold them), which
        // may wait for that I/O.
        let result = block_on(self.driver.close());
        if let Err(e) = result.and_then(|r| r) {
            log::error!("node '{}': could not close cleanly: {e}", self.name);
        }
    }
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("driver", &self.driver_name)
            .field("flags", &self.flags())
            .field("limits", &self.limits())
            .finish_non_exhaustive()
    }
}

fn to_usize(v: u64) -> Result<usize> {
    usize::try_from(v)
        .map_err(|_| BlockError::invalid(format!("request of {v} bytes is too large")))
}
