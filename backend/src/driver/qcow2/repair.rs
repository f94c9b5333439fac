//! Repairs found by the check: leaks fixed in place, a new refcount structure for errors,
//! and the repair of an image left dirty before it is opened for writing.

use std::collections::{BTreeMap, BTreeSet};

use super::check::{check, read_header, write_at, Checker, Repair, Stored};
use super::header::{field, Header, INCOMPAT_DIRTY, MAX_REFTABLE_BYTES};
use super::refcount::{max_refcount, set_entry};
use crate::error::{BlockError, Result};
use crate::node::Node;

/// Lowers the refcounts of leaked clusters to their references, in place.
pub(super) async fn fix_leaks(
    c: &Checker<'_>,
    stored: &Stored,
    leaked: &[(u64, u64)],
) -> Result<()> {
    let mut changed: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    for &(cl, reference) in leaked {
        let Some((off, data)) = stored.block(cl / stored.per_block) else {
            continue;
        };
        let entry = changed.entry(off).or_insert_with(|| data.to_vec());
        set_entry(entry, stored.order, cl % stored.per_block, reference);
    }
    for (off, data) in &changed {
        write_at(c.file, *off, data).await?;
    }
    c.file.flush().await
}

/// Writes a new refcount structure (blocks, then table) past everything in use, then points
/// the header at it and clears the dirty bit. Returns the new refcounts. Blocks are written
/// only where a cluster is in use (a table entry of 0 reads as all-zero refcounts), so a
/// sparse file's holes cost nothing; a table larger than qcow2 allows is refused.
pub(super) async fn rebuild_refcounts(
    c: &Checker<'_>,
    mut refs: BTreeMap<u64, u64>,
) -> Result<BTreeMap<u64, u64>> {
    let cs = c.cs;
    let order = c.h.refcount_order;
    let per_block = (cs * 8) >> order;
    let max = max_refcount(order);
    if let Some((cl, r)) = refs.iter().find(|(_, &r)| r > max) {
        return Err(BlockError::invalid(format!(
            "cluster {cl} has {r} references, more than the refcount width allows"
        )));
    }
    // After the file and after every cluster the old structures use, so a crash before the
    // header switch leaves the old ones intact.
    let in_use_end = c.refs.keys().next_back().map_or(0, |&k| k + 1);
    let start = c.file.size().div_ceil(cs).max(in_use_end);
    // The table indices that need a block: those of the clusters in use and those of the new
    // structure's own clusters, which depend on how many blocks there are.
    let in_use: BTreeSet<u64> = refs.keys().map(|cl| cl / per_block).collect();
    let (mut indices, mut table_clusters) = (in_use.clone(), 1u64);
    loop {
        let end = start + indices.len() as u64 + table_clusters;
        let mut need = in_use.clone();
        need.extend(start / per_block..=(end - 1) / per_block);
        let last = need.last().copied().unwrap_or(0);
        let need_table = ((last + 1) * 8).div_ceil(cs).max(table_clusters);
        if need.len() == indices.len() && need_table == table_clusters {
            break;
        }
        indices = need;
        table_clusters = need_table;
    }
    if table_clusters * cs > MAX_REFTABLE_BYTES {
        return Err(BlockError::invalid(format!(
            "a refcount table reaching cluster {start} of the file would take {} bytes, more \
             than qcow2's {MAX_REFTABLE_BYTES}",
            table_clusters * cs
        )));
    }
    let blocks = indices.len() as u64;
    let table_offset = (start + blocks) * cs;
    for cl in start..start + blocks + table_clusters {
        refs.insert(cl, 1);
    }
    let mut table = vec![0u8; (table_clusters * cs) as usize];
    for (i, &b) in indices.iter().enumerate() {
        let mut data = vec![0u8; cs as usize];
        for (&cl, &r) in refs.range(b * per_block..(b + 1) * per_block) {
            set_entry(&mut data, order, cl - b * per_block, r);
        }
        let off = (start + i as u64) * cs;
        write_at(c.file, off, &data).await?;
        table[(b * 8) as usize..(b * 8 + 8) as usize].copy_from_slice(&off.to_be_bytes());
    }
    write_at(c.file, table_offset, &table).await?;
    c.file.flush().await?;
    let mut hdr = [0u8; 12];
    hdr[..8].copy_from_slice(&table_offset.to_be_bytes());
    hdr[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
    write_at(c.file, field::REFCOUNT_TABLE_OFFSET, &hdr).await?;
    if c.h.version >= 3 {
        let features = c.h.incompatible_features & !INCOMPAT_DIRTY;
        write_at(
            c.file,
            field::INCOMPATIBLE_FEATURES,
            &features.to_be_bytes(),
        )
        .await?;
    }
    c.file.flush().await?;
    Ok(refs)
}

/// Repairs an image whose dirty bit is set (refcounts may be stale) before it is written.
pub async fn repair_dirty(file: &Node, header: &Header) -> Result<()> {
    let res = check(file, Repair::All).await?;
    if res.corruptions > 0 {
        return Err(BlockError::new(
            libc::EIO,
            format!(
                "qcow2 image '{}' was not closed cleanly and has {} errors that cannot be \
                 repaired",
                file.filename(),
                res.corruptions
            ),
        ));
    }
    // A check that found nothing to rebuild leaves the dirty bit: clear it here.
    if header.version >= 3 {
        let h = read_header(file).await?;
        if h.incompatible_features & INCOMPAT_DIRTY != 0 {
            let features = h.incompatible_features & !INCOMPAT_DIRTY;
            write_at(file, field::INCOMPATIBLE_FEATURES, &features.to_be_bytes()).await?;
            file.flush().await?;
        }
    }
    Ok(())
}
