//! Guest-to-host mapping: what an L2 entry says about a guest range (data, zeroes,
//! unallocated, compressed), the L2 lookup through the L1 table and the slice cache, and the
//! block status built on it.

use std::sync::Arc;

use super::l2cache::{self, Slice};
use super::{Qcow2, L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO};
use crate::driver::BlockStatus;
use crate::error::{BlockError, Result};

/// What a guest range maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// Data in this image at `host` (offset of the range's first byte).
    Data { host: u64, copied: bool },
    /// Reads as zeroes.
    Zero,
    /// Not allocated here: the backing node, or zeroes.
    Unallocated,
    /// A compressed cluster, by its L2 entry.
    Compressed { entry: u64 },
}

impl Qcow2 {
    /// Host clusters a compressed L2 entry covers: (offset, compressed bytes).
    pub(super) fn compressed_extent(&self, entry: u64) -> (u64, u64) {
        let x = 62 - (self.cluster_bits - 8);
        let offset = entry & ((1u64 << x) - 1);
        let sectors = ((entry >> x) & ((1u64 << (self.cluster_bits - 8)) - 1)) + 1;
        (offset, sectors * 512 - (offset & 511))
    }

    /// Classifies the cluster piece at `intra` (offset inside the cluster) of an L2 entry;
    /// returns the kind and the bytes up to the end of the piece.
    pub(super) fn classify(
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
    pub(super) async fn slice_of(&self, cluster: u64) -> Result<Option<(Arc<Slice>, u64)>> {
        let l1_index = cluster >> self.l2_bits;
        let Some(l1e) = self.l1.load().get(l1_index) else {
            return Err(self.corrupt(format!("guest cluster {cluster:#x} lies past the L1 table")));
        };
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

    /// The L2 entry at `index` of a slice and its subcluster bitmap (0 without extended L2).
    #[inline]
    pub(super) fn entry_at(&self, slice: &Slice, index: u64) -> (u64, u64) {
        let w = self.words();
        let i = index as usize * w;
        let bitmap = if w == 2 { slice.get(i + 1) } else { 0 };
        (slice.get(i), bitmap)
    }

    /// What guest bytes `offset..offset+max` map to: the kind of the first byte and how many
    /// bytes from `offset` share it (contiguously, for data).
    pub(super) async fn map(&self, offset: u64, max: u64) -> Result<(Kind, u64)> {
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

    /// Whether guest bytes from `offset` hold data, read as zeroes, or come from the
    /// backing node (asked in turn), and for how many bytes.
    pub(super) async fn block_status_impl(&self, offset: u64, len: u64) -> Result<BlockStatus> {
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
