//! Making guest ranges read as zeroes: write_zeroes and discard, with zero flags or
//! unallocated entries for whole clusters and zeroes written as data for the rest.

use super::mapping::Kind;
use super::{Qcow2, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO};
use crate::error::Result;
use crate::io::iovec::IoVec;

/// How a range of whole clusters is made to read as zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ZeroMode {
    /// A discard request: free the clusters.
    Discard,
    /// write_zeroes; `unmap` may free the clusters.
    Zero { unmap: bool },
    /// The clusters leave the image (shrinking): unallocated entries, whatever lies below.
    Unallocate,
}

impl Qcow2 {
    /// The new L2 entry making a cluster read as zeroes, or `None` to leave it.
    fn zeroed_entry(&self, old: u64, mode: ZeroMode) -> Option<u64> {
        if mode == ZeroMode::Unallocate {
            return (old != 0).then_some(0);
        }
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
            ZeroMode::Unallocate => 0,
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
    pub(super) async fn zero_clusters(&self, start: u64, end: u64, mode: ZeroMode) -> Result<()> {
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
                None if self.backing.is_some() && mode != ZeroMode::Unallocate => {
                    Some(self.slice_for_update(&mut meta, c).await?)
                }
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
    pub(super) async fn write_zero_data(&self, offset: u64, len: u64) -> Result<()> {
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
    pub(super) fn whole_clusters(&self, offset: u64, len: u64) -> (u64, u64) {
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

    /// Makes guest bytes `offset..offset+len` read as zeroes; `unmap` lets whole clusters
    /// be freed.
    pub(super) async fn write_zeroes_impl(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.check_writable()?;
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
}
