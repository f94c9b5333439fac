//! Resizing an image (QMP's `block_resize`), as QEMU 7.2's qcow2_co_truncate does it.
//!
//! Growing: when the new size needs more L1 entries, a new L1 table is allocated, its
//! refcounts written, the table written, the header pointed at it (`l1_size` and
//! `l1_table_offset` in one write), and the old table freed, with a flush between each step.
//! When a backing file would show through the new area, that area is made to read as
//! zeroes. Shrinking frees the clusters past the new end (their L2 entries become
//! unallocated); the L1 table keeps its size, as QEMU's does. In both directions the
//! header's `size` field is written last: a crash leaves an image of the old size or the new
//! one, consistent, with at most leaked clusters.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::header::MAX_L1_BYTES;
use super::l1table::L1Table;
use super::overlap::ACTIVE_L1;
use super::refcount::write_bytes;
use super::writeback::Meta;
use super::zero::ZeroMode;
use super::Qcow2;
use crate::error::{BlockError, Result};

/// Header field `size` (u64).
const HEADER_SIZE_FIELD: u64 = 24;
/// Header field `l1_size` (u32), followed by `l1_table_offset` (u64).
const HEADER_L1_FIELDS: u64 = 36;

impl Qcow2 {
    /// Changes the virtual size to `size` bytes.
    pub(super) async fn resize(&self, size: u64) -> Result<()> {
        if size % 512 != 0 {
            return Err(BlockError::invalid(
                "The new size must be a multiple of 512",
            ));
        }
        if self.read_only {
            return Err(BlockError::new(libc::EACCES, "Image is read-only"));
        }
        self.check_writable()?;
        let old = self.size();
        if size < old {
            self.free_past(size, old)
                .await
                .map_err(|e| e.context("Failed to discard cropped clusters"))?;
        }
        let mut meta = self.meta.lock().await;
        if size > old {
            let entries = size.div_ceil(self.cluster_size << self.l2_bits);
            self.grow_l1(&mut meta, entries)
                .await
                .map_err(|e| e.context("Failed to grow the L1 table"))?;
            drop(meta);
            self.hide_backing(old, size)
                .await
                .map_err(|e| e.context("Failed to zero out new clusters"))?;
            meta = self.meta.lock().await;
        }
        // Everything the new size relies on is on disk before the header says it.
        self.write_back(&mut meta).await?;
        self.file.flush().await?;
        write_bytes(
            &self.file,
            HEADER_SIZE_FIELD,
            &size.to_be_bytes(),
            "header (size)",
        )
        .await?;
        self.file.flush().await?;
        self.size.store(size, Ordering::Release);
        Ok(())
    }

    /// Replaces the L1 table with one of `entries` entries, if the current one is smaller
    /// (metadata lock held).
    async fn grow_l1(&self, meta: &mut Meta, entries: u64) -> Result<()> {
        let old = self.l1.load_full();
        if entries <= old.len() {
            return Ok(());
        }
        let bytes = entries * 8;
        if bytes > MAX_L1_BYTES {
            return Err(BlockError::from_errno(
                libc::EFBIG,
                format!("an L1 table of {entries} entries is over QEMU's limit"),
            ));
        }
        // The copy must equal what is on disk: entries not yet written back would point at
        // L2 tables and refcounts that may not be there yet.
        self.write_back(meta).await?;
        let cs = self.cluster_size;
        let clusters = bytes.div_ceil(cs);
        let rc = meta.rc()?;
        let offset = if clusters < rc.per_block() {
            rc.alloc(clusters).await?
        } else {
            rc.alloc_area(clusters).await?
        };
        self.guard_write(offset, clusters * cs, 0).await?;
        if let Some(o) = &self.overlap {
            o.add(ACTIVE_L1, offset, bytes)?;
        }
        let placed = async {
            // The new table's refcounts, then the table, then the header that points at it.
            meta.rc()?.write_dirty().await?;
            self.file.flush().await?;
            let table = L1Table::new(offset, (0..entries).map(|i| old.get(i).unwrap_or(0)));
            let mut on_disk = table.to_bytes(0, entries);
            on_disk.resize((clusters * cs) as usize, 0);
            write_bytes(&self.file, offset, &on_disk, "new L1 table").await?;
            self.file.flush().await?;
            let mut fields = Vec::with_capacity(12);
            fields.extend_from_slice(&u32::try_from(entries).unwrap_or(u32::MAX).to_be_bytes());
            fields.extend_from_slice(&offset.to_be_bytes());
            write_bytes(&self.file, HEADER_L1_FIELDS, &fields, "header (L1 table)").await?;
            self.file.flush().await?;
            Ok::<L1Table, BlockError>(table)
        }
        .await;
        // On failure the header may or may not point at the new table: its clusters stay
        // allocated (a leak at worst), and the file's flush failure is sticky, so nothing
        // written after this is taken as durable.
        let table = placed?;
        self.l1.store(Arc::new(table));
        // The old table is no longer referenced on disk; no request reads it from there.
        let old_bytes = old.len() * 8;
        if let Some(o) = &self.overlap {
            o.remove(ACTIVE_L1, old.offset, old_bytes);
        }
        let rc = meta.rc()?;
        let first = old.offset >> self.cluster_bits;
        for c in first..first + old_bytes.div_ceil(cs) {
            rc.update(c, -1).await?;
        }
        rc.write_dirty().await?;
        Ok(())
    }

    /// Makes the new area `old..new` read as zeroes where the backing file would otherwise
    /// show through (QEMU does the same when a backing file is longer than the old size).
    async fn hide_backing(&self, old: u64, new: u64) -> Result<()> {
        let end = match &self.backing {
            Some(b) if b.size() > old => b.size().min(new),
            _ => return Ok(()),
        };
        if self.header.version < 3 {
            return Err(BlockError::from_errno(
                libc::ENOTSUP,
                "version 2 images have no zero clusters",
            ));
        }
        let cs = self.cluster_size;
        let first_whole = old.div_ceil(cs);
        if first_whole * cs > old {
            // The rest of the old last cluster, as data.
            self.write_zero_data(old, (first_whole * cs).min(end) - old)
                .await?;
        }
        let last = end.div_ceil(cs);
        if last > first_whole {
            self.zero_clusters(first_whole, last, ZeroMode::Zero { unmap: true })
                .await?;
        }
        Ok(())
    }

    /// Frees the clusters wholly past `new` (up to the old end `old`): their L2 entries
    /// become unallocated, and the clusters are freed once that is on disk.
    async fn free_past(&self, new: u64, old: u64) -> Result<()> {
        let cs = self.cluster_size;
        let first = new.div_ceil(cs);
        let last = old.div_ceil(cs);
        if last > first {
            self.zero_clusters(first, last, ZeroMode::Unallocate)
                .await?;
        }
        let mut meta = self.meta.lock().await;
        self.apply_frees(&mut meta).await
    }
}
