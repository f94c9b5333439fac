//! Reference counts: the refcount table, a cache of refcount blocks of any width (1 to 64
//! bits), and cluster allocation.
//!
//! Everything here runs under the image's metadata lock. Ordering rules that keep the image
//! consistent after a crash at any point:
//! - refcount increments may reach the disk at any time (at worst a leak), so a dirty block
//!   can be written whenever the cache needs room;
//! - decrements are only applied once the metadata that stopped referencing the clusters is
//!   on disk (the driver keeps them pending until then);
//! - a new refcount block is written before the refcount table entry pointing at it, and a
//!   new refcount table before the header pointing at it, with flushes in between.

use std::collections::HashMap;
use std::sync::Arc;

use super::header::field;
use super::overlap::{Overlap, REFCOUNT_BLOCK, REFCOUNT_TABLE};
use crate::error::{BlockError, Result};
use crate::io::iovec::IoVec;
use crate::node::Node;

/// How far past the end of the file (and of every allocation) the free-cluster scan looks
/// before it gives up: refcounts claiming that much space there are corrupt.
const SCAN_SLACK: u64 = 1 << 20;

/// Bits of a refcount table entry holding the block's offset.
pub const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;

/// Reads entry `index` of a refcount block of width `1 << order` bits.
pub fn get_entry(block: &[u8], order: u32, index: u64) -> u64 {
    let i = index as usize;
    match order {
        0 => u64::from((block[i / 8] >> (i % 8)) & 1),
        1 => u64::from((block[i / 4] >> (2 * (i % 4))) & 3),
        2 => u64::from((block[i / 2] >> (4 * (i % 2))) & 0xf),
        3 => u64::from(block[i]),
        4 => u64::from(u16::from_be_bytes([block[2 * i], block[2 * i + 1]])),
        5 => {
            let b = &block[4 * i..4 * i + 4];
            u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        }
        _ => {
            let mut a = [0u8; 8];
            a.copy_from_slice(&block[8 * i..8 * i + 8]);
            u64::from_be_bytes(a)
        }
    }
}

/// Writes entry `index` of a refcount block (the value fits the width; the caller checked).
pub fn set_entry(block: &mut [u8], order: u32, index: u64, value: u64) {
    let i = index as usize;
    let small = |block: &mut [u8], per_byte: usize, bits: usize, mask: u8| {
        let shift = bits * (i % per_byte);
        let b = &mut block[i / per_byte];
        *b = (*b & !(mask << shift)) | (((value as u8) & mask) << shift);
    };
    match order {
        0 => small(block, 8, 1, 1),
        1 => small(block, 4, 2, 3),
        2 => small(block, 2, 4, 0xf),
        3 => block[i] = value as u8,
        4 => block[2 * i..2 * i + 2].copy_from_slice(&(value as u16).to_be_bytes()),
        5 => block[4 * i..4 * i + 4].copy_from_slice(&(value as u32).to_be_bytes()),
        _ => block[8 * i..8 * i + 8].copy_from_slice(&value.to_be_bytes()),
    }
}

/// Largest refcount of a width.
pub fn max_refcount(order: u32) -> u64 {
    let bits = 1u32 << order;
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

/// Writes `bytes` at `offset` of the image file, growing it if needed.
pub async fn write_bytes(file: &Node, offset: u64, bytes: &[u8], what: &str) -> Result<()> {
    let mut buf = bytes.to_vec();
    file.write_growing(offset, &[IoVec::new(&mut buf)])
        .await
        .map_err(|e| e.context(format!("qcow2: could not write {what} at {offset:#x}")))
}

/// Reads `len` bytes at `offset` of the image file; what lies past its end reads as zeroes
/// (as QEMU's file driver does).
pub async fn read_bytes(file: &Node, offset: u64, len: usize, what: &str) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    read_into(file, offset, &mut buf, what).await?;
    Ok(buf)
}

/// Fills `buf` from `offset` of the image file, zeroes past its end.
pub async fn read_into(file: &Node, offset: u64, buf: &mut [u8], what: &str) -> Result<()> {
    let have = file.size().saturating_sub(offset).min(buf.len() as u64) as usize;
    buf[have..].fill(0);
    if have > 0 {
        file.read(offset, &[IoVec::new(&mut buf[..have])])
            .await
            .map_err(|e| e.context(format!("qcow2: could not read {what} at {offset:#x}")))?;
    }
    Ok(())
}

fn corrupt(msg: String) -> BlockError {
    BlockError::new(libc::EIO, format!("qcow2: {msg}; the image is corrupt"))
}

struct Block {
    data: Vec<u8>,
    dirty: bool,
    last_use: u64,
}

/// The refcount structures of an open image.
pub struct Refcounts {
    file: Arc<Node>,
    /// Entries of the refcount table (offsets of refcount blocks, 0: none).
    pub table: Vec<u64>,
    /// File offset of the refcount table.
    pub table_offset: u64,
    cluster_bits: u32,
    order: u32,
    cache: HashMap<u64, Block>,
    capacity: usize,
    tick: u64,
    /// No cluster below this one is free.
    pub free_hint: u64,
    /// End of the highest run of clusters allocated so far.
    alloc_high: u64,
    /// The overlap checks of the image (set once they are built).
    pub overlap: Option<Arc<Overlap>>,
}

impl Refcounts {
    /// Reads the refcount table.
    pub async fn open(
        file: Arc<Node>,
        table_offset: u64,
        table_clusters: u32,
        cluster_bits: u32,
        order: u32,
        cache_blocks: usize,
    ) -> Result<Self> {
        let len = (u64::from(table_clusters) << cluster_bits) as usize;
        let raw = read_bytes(&file, table_offset, len, "refcount table").await?;
        let table = raw
            .chunks_exact(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                u64::from_be_bytes(a)
            })
            .collect();
        Ok(Self {
            file,
            table,
            table_offset,
            cluster_bits,
            order,
            cache: HashMap::new(),
            capacity: cache_blocks.max(4),
            tick: 0,
            free_hint: 0,
            alloc_high: 0,
            overlap: None,
        })
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refuses a write of `kind` (0: new metadata) that would overlap other metadata.
    async fn guard(&self, offset: u64, len: u64, kind: u32) -> Result<()> {
        match &self.overlap {
            Some(o) => o.check(&self.file, offset, len, kind).await,
            None => Ok(()),
        }
    }

    /// Records (or with `add` false, forgets) metadata for the overlap checks.
    fn record(&self, kind: u32, offset: u64, len: u64, add: bool) -> Result<()> {
        match &self.overlap {
            Some(o) if add => o.add(kind, offset, len),
            Some(o) => {
                o.remove(kind, offset, len);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Refcount entries per block.
    pub fn per_block(&self) -> u64 {
        (self.cluster_size() * 8) >> self.order
    }

    fn block_offset(&self, rt: u64) -> Result<Option<u64>> {
        let Some(&entry) = self.table.get(rt as usize) else {
            return Ok(None);
        };
        let off = entry & REFT_OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if off & (self.cluster_size() - 1) != 0 {
            return Err(corrupt(format!(
                "Refblock offset {off:#x} unaligned (reftable index: {rt:#x})"
            )));
        }
        Ok(Some(off))
    }

    async fn block(&mut self, offset: u64) -> Result<&mut Block> {
        if !self.cache.contains_key(&offset) {
            let data = read_bytes(
                &self.file,
                offset,
                self.cluster_size() as usize,
                "refcount block",
            )
            .await?;
            self.cache_clean(offset, data).await?;
        }
        self.tick += 1;
        let tick = self.tick;
        let Some(b) = self.cache.get_mut(&offset) else {
            return Err(BlockError::invalid(
                "refcount block vanished from the cache",
            ));
        };
        b.last_use = tick;
        Ok(b)
    }

    /// Caches a clean block: `data` is what the disk holds at `offset` (read from it or just
    /// written), so it needs no write-back. Makes room for it first.
    async fn cache_clean(&mut self, offset: u64, data: Vec<u8>) -> Result<()> {
        self.make_room().await?;
        self.tick += 1;
        self.cache.insert(
            offset,
            Block {
                data,
                dirty: false,
                last_use: self.tick,
            },
        );
        Ok(())
    }

    async fn make_room(&mut self) -> Result<()> {
        while self.cache.len() >= self.capacity {
            let Some((&off, _)) = self.cache.iter().min_by_key(|(_, b)| b.last_use) else {
                return Ok(());
            };
            if let Some(b) = self.cache.get(&off) {
                if b.dirty {
                    // Increments may always reach the disk early (see the module notes).
                    self.guard(off, self.cluster_size(), REFCOUNT_BLOCK).await?;
                    write_bytes(&self.file, off, &b.data, "refcount block").await?;
                }
            }
            self.cache.remove(&off);
        }
        Ok(())
    }

    /// Adds `delta` to a cluster's refcount; returns the new value.
    pub async fn update(&mut self, cluster: u64, delta: i64) -> Result<u64> {
        let per = self.per_block();
        let rt = cluster / per;
        if self.block_offset(rt)?.is_none() {
            if delta < 0 {
                return Err(corrupt(format!(
                    "cannot decrease the refcount of cluster {cluster:#x}: no refcount block \
                     covers it"
                )));
            }
            self.ensure_block(rt).await?;
        }
        self.adjust(cluster, delta).await
    }

    /// Adds `delta` to the refcount of a cluster that a block already covers.
    async fn adjust(&mut self, cluster: u64, delta: i64) -> Result<u64> {
        let per = self.per_block();
        let rt = cluster / per;
        let Some(off) = self.block_offset(rt)? else {
            return Err(corrupt(format!(
                "no refcount block covers cluster {cluster:#x}"
            )));
        };
        let order = self.order;
        let b = self.block(off).await?;
        let old = get_entry(&b.data, order, cluster % per);
        let new = if delta < 0 {
            old.checked_sub(delta.unsigned_abs()).ok_or_else(|| {
                corrupt(format!(
                    "refcount of cluster {cluster:#x} would drop below zero (is {old})"
                ))
            })?
        } else {
            old.checked_add(delta as u64)
                .filter(|&v| v <= max_refcount(order))
                .ok_or_else(|| {
                    BlockError::new(
                        libc::EINVAL,
                        format!(
                            "qcow2: refcount of cluster {cluster:#x} would exceed the maximum of \
                             the {}-bit refcount width",
                            1 << order
                        ),
                    )
                })?
        };
        set_entry(&mut b.data, order, cluster % per, new);
        b.dirty = true;
        if new == 0 && cluster < self.free_hint {
            self.free_hint = cluster;
        }
        Ok(new)
    }

    /// Makes sure a refcount block covers refcount table index `rt`; returns whether one was
    /// created (the caller then rescans, as the block took a cluster).
    async fn ensure_block(&mut self, rt: u64) -> Result<bool> {
        if rt as usize >= self.table.len() {
            self.grow_table(rt).await?;
            return Ok(true);
        }
        if self.block_offset(rt)?.is_some() {
            return Ok(false);
        }
        // The block describes itself: it takes the first cluster of the range it covers,
        // which is free because nothing counted it yet.
        let cluster = rt * self.per_block();
        if cluster == 0 {
            return Err(corrupt(
                "the refcount table has no block for the header cluster".into(),
            ));
        }
        let offset = cluster << self.cluster_bits;
        let mut data = vec![0u8; self.cluster_size() as usize];
        set_entry(&mut data, self.order, 0, 1);
        let cs = self.cluster_size();
        self.guard(offset, cs, 0).await?;
        self.record(REFCOUNT_BLOCK, offset, cs, true)?;
        let written = async {
            write_bytes(&self.file, offset, &data, "new refcount block").await?;
            self.file.flush().await?;
            self.guard(self.table_offset + rt * 8, 8, REFCOUNT_TABLE)
                .await
        }
        .await;
        if let Err(e) = written {
            self.record(REFCOUNT_BLOCK, offset, cs, false)?;
            return Err(e);
        }
        write_bytes(
            &self.file,
            self.table_offset + rt * 8,
            &offset.to_be_bytes(),
            "refcount table entry",
        )
        .await?;
        self.file.flush().await?;
        self.table[rt as usize] = offset;
        self.cache_clean(offset, data).await?;
        Ok(true)
    }

    /// Moves the refcount table to a bigger one covering index `needed`, placed with the
    /// refcount blocks describing it in a new area after everything the old table covers.
    async fn grow_table(&mut self, needed: u64) -> Result<()> {
        let cs = self.cluster_size();
        let per_block = self.per_block();
        let per_table_cluster = cs / 8;
        let old_len = self.table.len() as u64;
        // First refcount range that no block covers: the area starts there.
        let first_rt = old_len;
        let area_start = first_rt * per_block;
        let mut nb = 1u64;
        let (new_len, table_clusters) = loop {
            let want = (needed + 1).max(old_len * 2).max(first_rt + nb);
            let new_len = want.div_ceil(per_table_cluster) * per_table_cluster;
            let tc = new_len / per_table_cluster;
            let need_blocks = (tc + nb).div_ceil(per_block);
            if need_blocks <= nb {
                break (new_len, tc);
            }
            nb = need_blocks;
        };
        if new_len * 8 > super::header::MAX_REFTABLE_BYTES {
            return Err(BlockError::new(
                libc::EFBIG,
                "qcow2: the refcount table would exceed its maximum size",
            ));
        }
        let area_len = nb + table_clusters;
        let area = area_start << self.cluster_bits;
        let table_offset = (area_start + nb) << self.cluster_bits;
        // The new area must hold no metadata; it is metadata from now on.
        self.guard(area, area_len * cs, 0).await?;
        self.record(REFCOUNT_BLOCK, area, nb * cs, true)?;
        self.record(REFCOUNT_TABLE, table_offset, table_clusters * cs, true)?;
        let mut table = self.table.clone();
        table.resize(new_len as usize, 0);
        let written = self.write_area(first_rt, nb, area_len, &mut table).await;
        let blocks = match written {
            Ok(blocks) => blocks,
            Err(e) => {
                self.record(REFCOUNT_BLOCK, area, nb * cs, false)?;
                self.record(REFCOUNT_TABLE, table_offset, table_clusters * cs, false)?;
                return Err(e);
            }
        };
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&table_offset.to_be_bytes());
        hdr[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
        write_bytes(
            &self.file,
            field::REFCOUNT_TABLE_OFFSET,
            &hdr,
            "header (refcount table)",
        )
        .await?;
        self.file.flush().await?;
        let old_offset = self.table_offset;
        let old_clusters = (old_len * 8).div_ceil(cs);
        self.table = table;
        self.table_offset = table_offset;
        for (offset, data) in blocks {
            self.cache_clean(offset, data).await?;
        }
        // The header no longer points at the old table (it is on disk): free it.
        self.record(REFCOUNT_TABLE, old_offset, old_clusters * cs, false)?;
        let first_old = old_offset >> self.cluster_bits;
        for c in first_old..first_old + old_clusters {
            self.adjust(c, -1).await?;
        }
        log::debug!(
            "qcow2: refcount table moved to {table_offset:#x} ({table_clusters} clusters, {nb} \
             new refcount blocks)"
        );
        Ok(())
    }

    /// Writes the new area of [`grow_table`](Self::grow_table): `nb` refcount blocks
    /// (counting the whole area) from the first cluster refcount table index `first_rt`
    /// covers, then `table` (their entries filled in) after them, and flushes. Returns the
    /// blocks (offset, contents).
    async fn write_area(
        &self,
        first_rt: u64,
        nb: u64,
        area_len: u64,
        table: &mut [u64],
    ) -> Result<Vec<(u64, Vec<u8>)>> {
        let cs = self.cluster_size();
        let per_block = self.per_block();
        let area_start = first_rt * per_block;
        let mut blocks = Vec::with_capacity(nb as usize);
        for j in 0..nb {
            let mut data = vec![0u8; cs as usize];
            let range_start = (first_rt + j) * per_block;
            for c in area_start..area_start + area_len {
                if c >= range_start && c < range_start + per_block {
                    set_entry(&mut data, self.order, c - range_start, 1);
                }
            }
            let offset = (area_start + j) << self.cluster_bits;
            write_bytes(&self.file, offset, &data, "new refcount block").await?;
            table[(first_rt + j) as usize] = offset;
            blocks.push((offset, data));
        }
        let table_offset = (area_start + nb) << self.cluster_bits;
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        write_bytes(&self.file, table_offset, &bytes, "new refcount table").await?;
        self.file.flush().await?;
        Ok(blocks)
    }

    /// Allocates `n` contiguous free clusters (refcount 1); returns the first one's offset.
    /// The scan gives up (the refcounts are corrupt) when the file and every allocation
    /// end more than [`SCAN_SLACK`] clusters before any free run.
    pub async fn alloc(&mut self, n: u64) -> Result<u64> {
        let per = self.per_block();
        'search: loop {
            let file_end = self.file.size().div_ceil(self.cluster_size());
            let limit = file_end.max(self.alloc_high).max(self.free_hint) + SCAN_SLACK + n;
            let mut c = self.free_hint;
            let mut run_start = c;
            let start = loop {
                if c - run_start == n {
                    break run_start;
                }
                if c >= limit {
                    return Err(corrupt(format!(
                        "image '{}': no free cluster found below cluster {limit:#x} (the file \
                         ends at cluster {file_end:#x}): its refcounts claim space far past the \
                         end of the file",
                        self.file.filename()
                    )));
                }
                let rt = c / per;
                match self.block_offset(rt)? {
                    None => {
                        // Nothing counted in this range: all of it is free.
                        let range_end = (rt + 1) * per;
                        if range_end - run_start >= n {
                            break run_start;
                        }
                        c = range_end;
                    }
                    Some(off) => {
                        let order = self.order;
                        let range_end = (rt + 1) * per;
                        let b = self.block(off).await?;
                        while c < range_end && c - run_start < n {
                            if get_entry(&b.data, order, c % per) != 0 {
                                run_start = c + 1;
                            }
                            c += 1;
                        }
                    }
                }
            };
            let end = start + n;
            if (end << self.cluster_bits) > i64::MAX as u64 / 2 {
                return Err(BlockError::new(libc::EFBIG, "qcow2: image file too large"));
            }
            for rt in start / per..=(end - 1) / per {
                if self.ensure_block(rt).await? {
                    continue 'search;
                }
            }
            for cl in start..end {
                self.update(cl, 1).await?;
            }
            self.free_hint = self.free_hint.max(end);
            self.alloc_high = self.alloc_high.max(end);
            return Ok(start << self.cluster_bits);
        }
    }

    /// Allocates `n` contiguous clusters (refcount 1) in refcount ranges nothing uses yet,
    /// after the refcount blocks that count them: for runs of a refcount block's range or
    /// longer, which [`alloc`](Self::alloc) cannot place (each range it uses starts with its
    /// block). Returns the first cluster's offset.
    pub async fn alloc_area(&mut self, n: u64) -> Result<u64> {
        let per = self.per_block();
        let cs = self.cluster_size();
        // Blocks counting themselves and the run.
        let mut nb = 1;
        while nb * per < nb + n {
            nb += 1;
        }
        let first_rt = loop {
            let file_end = self.file.size().div_ceil(cs);
            let used_end = file_end.max(self.alloc_high).max(self.free_hint);
            let last_block = self
                .table
                .iter()
                .rposition(|&e| e != 0)
                .map_or(0, |i| i + 1);
            let first_rt = used_end.div_ceil(per).max(last_block as u64);
            if first_rt + nb <= self.table.len() as u64 {
                break first_rt;
            }
            self.grow_table(first_rt + nb - 1).await?;
        };
        let area_start = first_rt * per;
        let area = area_start << self.cluster_bits;
        let area_len = nb + n;
        if ((area_start + area_len) << self.cluster_bits) > i64::MAX as u64 / 2 {
            return Err(BlockError::new(libc::EFBIG, "qcow2: image file too large"));
        }
        self.guard(area, area_len * cs, 0).await?;
        self.record(REFCOUNT_BLOCK, area, nb * cs, true)?;
        let mut blocks = Vec::with_capacity(nb as usize);
        let written = async {
            for j in 0..nb {
                let mut data = vec![0u8; cs as usize];
                let range_start = (first_rt + j) * per;
                let range_end = (range_start + per).min(area_start + area_len);
                for c in range_start..range_end {
                    set_entry(&mut data, self.order, c - range_start, 1);
                }
                let offset = (area_start + j) << self.cluster_bits;
                write_bytes(&self.file, offset, &data, "new refcount block").await?;
                blocks.push((offset, data));
            }
            self.file.flush().await?;
            let entries: Vec<u8> = blocks.iter().flat_map(|(o, _)| o.to_be_bytes()).collect();
            let at = self.table_offset + first_rt * 8;
            self.guard(at, entries.len() as u64, REFCOUNT_TABLE).await?;
            write_bytes(&self.file, at, &entries, "refcount table entries").await?;
            self.file.flush().await
        }
        .await;
        if let Err(e) = written {
            self.record(REFCOUNT_BLOCK, area, nb * cs, false)?;
            return Err(e);
        }
        for (j, (offset, data)) in blocks.into_iter().enumerate() {
            self.table[first_rt as usize + j] = offset;
            self.cache_clean(offset, data).await?;
        }
        self.alloc_high = self.alloc_high.max(area_start + area_len);
        Ok((area_start + nb) << self.cluster_bits)
    }

    /// Writes every dirty block; returns how many were written.
    pub async fn write_dirty(&mut self) -> Result<usize> {
        let mut dirty: Vec<u64> = self
            .cache
            .iter()
            .filter(|(_, b)| b.dirty)
            .map(|(&k, _)| k)
            .collect();
        dirty.sort_unstable();
        for off in &dirty {
            self.guard(*off, self.cluster_size(), REFCOUNT_BLOCK)
                .await?;
            if let Some(b) = self.cache.get_mut(off) {
                write_bytes(&self.file, *off, &b.data, "refcount block").await?;
                b.dirty = false;
            }
        }
        Ok(dirty.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths() {
        for order in 0..=6u32 {
            let bits = 1u64 << order;
            let mut block = vec![0u8; 512];
            let n = 512 * 8 / bits;
            for i in 0..n {
                set_entry(&mut block, order, i, (i * 7 + 1) & max_refcount(order));
            }
            for i in 0..n {
                assert_eq!(
                    get_entry(&block, order, i),
                    (i * 7 + 1) & max_refcount(order),
                    "order {order} index {i}"
                );
            }
        }
        // QEMU's layout: sub-byte widths fill each byte from its least significant bit.
        let mut b = vec![0u8; 1];
        set_entry(&mut b, 0, 1, 1);
        assert_eq!(b[0], 0b10);
        set_entry(&mut b, 2, 1, 0xa);
        assert_eq!(b[0], 0xa2);
        assert_eq!(max_refcount(6), u64::MAX);
        assert_eq!(max_refcount(0), 1);
    }
}
