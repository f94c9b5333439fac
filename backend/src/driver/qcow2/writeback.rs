//! Metadata changes and their write-back: the state behind the metadata lock, new L2
//! tables, and writing refcount blocks, L2 tables and L1 entries in crash-safe order;
//! clusters are freed only once nothing on disk or in flight uses them.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::l2cache::Slice;
use super::overlap::{ACTIVE_L1, ACTIVE_L2};
use super::refcount::{write_bytes, Refcounts};
use super::{Qcow2, L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED};
use crate::error::{BlockError, Result};

/// Pending frees that trigger a metadata write-back to apply them.
const FREE_BATCH: usize = 4096;

/// State changed only under the metadata lock.
pub(super) struct Meta {
    /// Refcounts (only for images opened read-write).
    pub(super) rc: Option<Refcounts>,
    /// L1 entries changed in memory but not on disk.
    pub(super) l1_dirty: BTreeSet<u64>,
    /// Clusters whose refcount drops once the metadata no longer referencing them is on
    /// disk and no request uses them any more.
    pub(super) pending_frees: Vec<u64>,
}

impl Meta {
    /// The refcounts, or EROFS for an image opened read-only.
    pub(super) fn rc(&mut self) -> Result<&mut Refcounts> {
        self.rc
            .as_mut()
            .ok_or_else(|| BlockError::new(libc::EROFS, "qcow2: image is read-only"))
    }
}

impl Qcow2 {
    /// Clusters that stop being referenced when an L2 entry `old` becomes `new`.
    pub(super) fn freed_by(&self, old: u64, new: u64, out: &mut Vec<u64>) {
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
    pub(super) async fn slice_for_update(
        &self,
        meta: &mut Meta,
        cluster: u64,
    ) -> Result<(Arc<Slice>, u64)> {
        let l1_index = cluster >> self.l2_bits;
        let l1e = self.l1.load().get(l1_index).ok_or_else(|| {
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
        self.guard_write(l2_off, self.cluster_size, 0).await?;
        if let Some(o) = &self.overlap {
            o.add(ACTIVE_L2, l2_off, self.cluster_size)?;
        }
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
        self.l1.load().set(l1_index, l2_off | OFLAG_COPIED);
        meta.l1_dirty.insert(l1_index);
        Ok((slice, in_table % self.slice_entries))
    }

    /// Writes metadata back after changes, when many frees wait or dirty slices fill the
    /// cache of an image whose tables do not all fit in it. When they fit, nothing is ever
    /// evicted, so dirty slices wait for the next flush, as in QEMU (writing back here would
    /// cost flushes and table writes every few allocating writes).
    pub(super) async fn after_change(&self, meta: &mut Meta) -> Result<()> {
        if meta.pending_frees.len() >= FREE_BATCH {
            self.apply_frees(meta).await?;
        } else if self.l2.dirty_count() * 2 > self.l2.capacity() && !self.l2_cache_holds_all() {
            self.write_back(meta).await?;
        }
        Ok(())
    }

    /// Whether the L2 cache has room for every slice of the image's L2 tables.
    fn l2_cache_holds_all(&self) -> bool {
        let clusters = self.size().div_ceil(self.cluster_size);
        clusters.div_ceil(self.slice_entries) <= self.l2.capacity() as u64
    }

    /// Writes dirty metadata in crash-safe order; returns whether the file was flushed last.
    pub(super) async fn write_back(&self, meta: &mut Meta) -> Result<bool> {
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
                let written = async {
                    self.guard_write(s.offset, self.l2.slice_bytes(), ACTIVE_L2)
                        .await?;
                    write_bytes(&self.file, s.offset, &s.to_bytes(), "L2 table").await
                };
                if let Err(e) = written.await {
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
        // Until the flush after them succeeds, the tables written are not known to be on
        // disk: they stay dirty, so a failed flush never marks them clean.
        if let Err(e) = result {
            meta.l1_dirty.extend(l1_dirty);
            return Err(e);
        }
        if let Err(e) = self.file.flush().await {
            for s in &slices {
                self.l2.mark_dirty(s);
            }
            meta.l1_dirty.extend(l1_dirty);
            return Err(e);
        }
        Ok(true)
    }

    /// Writes the dirty L1 entries, after a flush if L2 tables were just written.
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
        // The metadata lock is held, so the table is not replaced meanwhile.
        let l1 = self.l1.load_full();
        for (start, end) in runs {
            let bytes = l1.to_bytes(start, end);
            let at = l1.offset + start * 8;
            self.guard_write(at, bytes.len() as u64, ACTIVE_L1).await?;
            write_bytes(&self.file, at, &bytes, "L1 table").await?;
        }
        Ok(())
    }

    /// Drops the refcounts of clusters no longer referenced: after the metadata that
    /// dropped the references is on disk and no request still uses them.
    pub(super) async fn apply_frees(&self, meta: &mut Meta) -> Result<()> {
        if meta.pending_frees.is_empty() {
            return Ok(());
        }
        self.write_back(meta).await?;
        self.epoch.synchronize().await;
        let mut frees = std::mem::take(&mut meta.pending_frees);
        frees.sort_unstable();
        // A cluster that L2 entries point at may not be metadata: freeing it would let a
        // discard or a new allocation destroy that metadata.
        let mut refused = None;
        for &c in &frees {
            let at = c << self.cluster_bits;
            if let Err(e) = self.guard_write(at, self.cluster_size, 0).await {
                refused = Some(e);
                break;
            }
        }
        if let Some(e) = refused {
            meta.pending_frees = frees;
            return Err(e);
        }
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

    /// Writes every metadata change back and flushes the file (no-op when read-only).
    pub(super) async fn flush_impl(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.check_writable()?;
        let mut meta = self.meta.lock().await;
        self.apply_frees(&mut meta).await?;
        if !self.write_back(&mut meta).await? {
            self.file.flush().await?;
        }
        Ok(())
    }
}
