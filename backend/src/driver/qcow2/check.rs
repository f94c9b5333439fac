//! Consistency check and repair of a qcow2 image, as `qemu-img check` does it.
//!
//! Every reference in the metadata (header, L1 and L2 tables, refcount structures, snapshot
//! tables, persistent bitmaps) is counted and compared with the stored refcounts: a stored
//! count below the references is a corruption (the cluster could be allocated twice), one
//! above is a leak (wasted space). `OFLAG_COPIED` must be set exactly where the refcount
//! is 1. Leaks are repaired in place; errors (and images left dirty) get a new refcount
//! structure written after the end of the image, switched to by one header write.

use std::collections::{BTreeMap, HashMap};

use super::header::{get_u16, get_u32, get_u64, Header, AUTOCLEAR_BITMAPS, INCOMPAT_DIRTY};
use super::refcount::{get_entry, REFT_OFFSET_MASK};
use super::repair::{fix_leaks, rebuild_refcounts};
use super::{L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO};
use crate::error::Result;
use crate::io::iovec::IoVec;
use crate::node::Node;

/// What to repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    /// Only report.
    None,
    /// Fix leaked clusters.
    Leaks,
    /// Fix leaks and errors.
    All,
}

/// The outcome of a check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckResult {
    /// Errors: refcounts too low, bad flags, bad offsets.
    pub corruptions: u64,
    /// Clusters with refcounts above their references.
    pub leaks: u64,
    /// Problems that kept the check from completing.
    pub check_errors: u64,
    /// Errors repaired.
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// End of the last cluster in use.
    pub image_end_offset: u64,
    /// Guest clusters with data in this image.
    pub allocated_clusters: u64,
    /// Guest clusters of the virtual disk.
    pub total_clusters: u64,
    /// Allocated clusters not following their predecessor on the host.
    pub fragmented_clusters: u64,
    /// Compressed clusters.
    pub compressed_clusters: u64,
    /// One line per problem found, as qemu-img prints them.
    pub messages: Vec<String>,
}

/// Problem lines kept in a result; the rest are only counted.
const MAX_MESSAGES: usize = 1000;

async fn read_at(file: &Node, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let have = file.size().saturating_sub(offset).min(len as u64) as usize;
    if have > 0 {
        file.read(offset, &[IoVec::new(&mut buf[..have])]).await?;
    }
    Ok(buf)
}

pub(super) async fn write_at(file: &Node, offset: u64, bytes: &[u8]) -> Result<()> {
    let mut buf = bytes.to_vec();
    file.write_growing(offset, &[IoVec::new(&mut buf)]).await
}

pub(super) struct Checker<'a> {
    pub(super) file: &'a Node,
    pub(super) h: Header,
    pub(super) cs: u64,
    /// References counted per cluster.
    pub(super) refs: BTreeMap<u64, u64>,
    res: CheckResult,
    /// Clusters at or past this are far beyond the file: counted as errors, not stored.
    limit: u64,
    /// Size of the image file.
    file_size: u64,
    /// Bytes of snapshot L1 and bitmap tables read so far (bounded by the file size).
    table_bytes: u64,
}

/// The L2 tables an L1 table (or several) points at, each once, with how many entries
/// point at it (the references each of its entries makes).
#[derive(Default)]
struct L2Tables {
    order: Vec<u64>,
    count: HashMap<u64, u64>,
}

impl L2Tables {
    fn add(&mut self, offset: u64) {
        let n = self.count.entry(offset).or_insert(0);
        if *n == 0 {
            self.order.push(offset);
        }
        *n += 1;
    }
}

impl Checker<'_> {
    fn error(&mut self, msg: String) {
        self.res.corruptions += 1;
        self.note(msg);
    }

    /// Keeps a problem line, up to [`MAX_MESSAGES`] of them.
    fn note(&mut self, msg: String) {
        let n = self.res.messages.len();
        if n < MAX_MESSAGES {
            self.res.messages.push(msg);
        } else if n == MAX_MESSAGES {
            self.res
                .messages
                .push("... (further problems are counted, not listed)".into());
        }
    }

    /// Counts a reference to every cluster of `offset..offset+len`.
    fn inc(&mut self, offset: u64, len: u64, what: &str) {
        self.inc_by(offset, len, what, 1);
    }

    /// Counts `n` references to every cluster of `offset..offset+len`.
    fn inc_by(&mut self, offset: u64, len: u64, what: &str, n: u64) {
        if len == 0 {
            return;
        }
        let first = offset / self.cs;
        let last = offset.checked_add(len - 1).map(|e| e / self.cs);
        let Some(last) = last.filter(|&l| l < self.limit) else {
            self.error(format!(
                "ERROR {what} at offset {offset:#x} lies far beyond the end of the image file"
            ));
            return;
        };
        for c in first..=last {
            let r = self.refs.entry(c).or_default();
            *r = r.saturating_add(n);
        }
    }

    /// Whether a table of `len` bytes at `offset` may be read: inside the file, and the
    /// tables read so far stay within the file size (they would be separate clusters in a
    /// sound image), so a crafted image cannot make the check read more than its file.
    fn may_read_table(&mut self, offset: u64, len: u64, what: &str) -> bool {
        let end = offset.checked_add(len).filter(|&e| e <= self.file_size);
        let total = self.table_bytes.saturating_add(len);
        if end.is_none() || total > self.file_size {
            self.error(format!(
                "ERROR {what} at offset {offset:#x} ({len} bytes) lies outside the image file \
                 (or the tables read so far would exceed its size)"
            ));
            return false;
        }
        self.table_bytes = total;
        true
    }

    fn compressed_extent(&self, entry: u64) -> (u64, u64) {
        let cb = self.h.cluster_bits;
        let x = 62 - (cb - 8);
        let offset = entry & ((1u64 << x) - 1);
        let sectors = ((entry >> x) & ((1u64 << (cb - 8)) - 1)) + 1;
        (offset, sectors * 512 - (offset & 511))
    }

    /// Counts an L1 table and adds the L2 tables it points at to `tables`; `active`
    /// enables the OFLAG_COPIED bookkeeping of its entries.
    async fn count_l1(
        &mut self,
        l1_offset: u64,
        l1_size: u64,
        active: bool,
        copied: &mut Vec<CopiedCheck>,
        tables: &mut L2Tables,
    ) -> Result<()> {
        self.inc(l1_offset, l1_size * 8, "L1 table");
        let l1 = read_at(self.file, l1_offset, (l1_size * 8) as usize).await?;
        for i in 0..l1_size {
            let l1e = get_u64(&l1, (i * 8) as usize);
            let l2_off = l1e & L1E_OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            if l2_off % self.cs != 0 {
                self.error(format!(
                    "ERROR l2_offset={l2_off:#x}: Table is not cluster aligned; L1 entry corrupted"
                ));
                continue;
            }
            if l2_off >= self.file_size {
                self.error(format!(
                    "ERROR l2_offset={l2_off:#x}: Table lies outside the image file; L1 entry \
                     corrupted"
                ));
                continue;
            }
            self.inc(l2_off, self.cs, "L2 table");
            if active {
                copied.push(CopiedCheck::L1 {
                    index: i,
                    entry: l1e,
                });
            }
            tables.add(l2_off);
        }
        Ok(())
    }

    /// Counts the references of each L2 table once, times the entries pointing at it;
    /// `active` enables statistics and the OFLAG_COPIED bookkeeping.
    async fn count_l2_tables(
        &mut self,
        tables: &L2Tables,
        active: bool,
        copied: &mut Vec<CopiedCheck>,
    ) -> Result<()> {
        let entry_size = self.h.l2_entry_size();
        let mut next_contiguous = 0u64;
        for &l2_off in &tables.order {
            let times = tables.count.get(&l2_off).copied().unwrap_or(1);
            let l2 = read_at(self.file, l2_off, self.cs as usize).await?;
            for j in 0..self.cs / entry_size {
                let entry = get_u64(&l2, (j * entry_size) as usize);
                if entry & OFLAG_COMPRESSED != 0 {
                    if entry & OFLAG_COPIED != 0 {
                        self.error(format!(
                            "ERROR: coffset={:#x}: copied flag must never be set for compressed \
                             clusters",
                            self.compressed_extent(entry).0
                        ));
                    }
                    let (off, len) = self.compressed_extent(entry);
                    self.inc_by(off, len, "compressed cluster", times);
                    if active {
                        self.res.allocated_clusters += 1;
                        self.res.compressed_clusters += 1;
                        self.res.fragmented_clusters += 1;
                        next_contiguous = 0;
                    }
                    continue;
                }
                let off = entry & L2E_OFFSET_MASK;
                if off == 0 {
                    continue;
                }
                if off % self.cs != 0 {
                    self.error(format!(
                        "ERROR offset={off:#x}: Cluster is not properly aligned; L2 entry corrupted"
                    ));
                    continue;
                }
                self.inc_by(off, self.cs, "data cluster", times);
                if active {
                    if entry & OFLAG_ZERO == 0 || self.h.extended_l2() {
                        self.res.allocated_clusters += 1;
                        if next_contiguous != 0 && off != next_contiguous {
                            self.res.fragmented_clusters += 1;
                        }
                        next_contiguous = off + self.cs;
                    }
                    copied.push(CopiedCheck::L2 {
                        l2_offset: l2_off,
                        index: j,
                        entry,
                    });
                }
            }
        }
        Ok(())
    }

    async fn count_snapshots(&mut self) -> Result<()> {
        let n = self.h.nb_snapshots;
        if n == 0 {
            return Ok(());
        }
        let mut off = self.h.snapshots_offset;
        let mut tables = Vec::new();
        for i in 0..n {
            if off.saturating_add(40) > self.file_size {
                self.error(format!(
                    "ERROR snapshot table entry {i} at offset {off:#x} lies outside the image file"
                ));
                break;
            }
            let fixed = read_at(self.file, off, 40).await?;
            let l1_offset = get_u64(&fixed, 0);
            let l1_size = u64::from(get_u32(&fixed, 8));
            let id_len = u64::from(get_u16(&fixed, 12));
            let name_len = u64::from(get_u16(&fixed, 14));
            let extra = u64::from(get_u32(&fixed, 36));
            if l1_offset % self.cs != 0 || l1_size * 8 > super::header::MAX_L1_BYTES {
                self.error(format!(
                    "ERROR snapshot {i} has an invalid L1 table (offset {l1_offset:#x}, {l1_size} \
                     entries)"
                ));
            } else if self.may_read_table(l1_offset, l1_size * 8, "snapshot L1 table") {
                tables.push((l1_offset, l1_size));
            }
            let len = 40 + extra + id_len + name_len;
            off += len.div_ceil(8) * 8;
        }
        self.inc(
            self.h.snapshots_offset,
            off - self.h.snapshots_offset,
            "snapshot table",
        );
        let mut l2 = L2Tables::default();
        for (l1_offset, l1_size) in tables {
            self.count_l1(l1_offset, l1_size, false, &mut Vec::new(), &mut l2)
                .await?;
        }
        self.count_l2_tables(&l2, false, &mut Vec::new()).await
    }

    async fn count_bitmaps(&mut self) -> Result<()> {
        if self.h.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
            return Ok(());
        }
        let Some(ext) = self.h.bitmaps() else {
            return Ok(());
        };
        // QEMU's limits: a 64 MiB directory, 1 GiB bitmap tables.
        if ext.directory_size > 64 << 20 {
            self.error(format!(
                "ERROR bitmap directory size {} is too large",
                ext.directory_size
            ));
            return Ok(());
        }
        self.inc(ext.directory_offset, ext.directory_size, "bitmap directory");
        if !self.may_read_table(ext.directory_offset, ext.directory_size, "bitmap directory") {
            return Ok(());
        }
        let dir = read_at(self.file, ext.directory_offset, ext.directory_size as usize).await?;
        let mut pos = 0usize;
        for _ in 0..ext.nb_bitmaps {
            if pos + 24 > dir.len() {
                self.error("ERROR bitmap directory is truncated".into());
                break;
            }
            let table_offset = get_u64(&dir, pos);
            let table_size = u64::from(get_u32(&dir, pos + 8));
            let name_len = usize::from(get_u16(&dir, pos + 18));
            let extra = get_u32(&dir, pos + 20) as usize;
            if table_size > (1 << 27) {
                self.error(format!("ERROR bitmap table size {table_size} is too large"));
                break;
            }
            self.inc(table_offset, table_size * 8, "bitmap table");
            if !self.may_read_table(table_offset, table_size * 8, "bitmap table") {
                break;
            }
            let table = read_at(self.file, table_offset, (table_size * 8) as usize).await?;
            for k in 0..table_size as usize {
                let off = get_u64(&table, k * 8) & L2E_OFFSET_MASK;
                if off != 0 {
                    self.inc(off, self.cs, "bitmap data");
                }
            }
            pos += (24 + extra + name_len).div_ceil(8) * 8;
        }
        Ok(())
    }
}

/// A flag to verify once the refcounts are known.
enum CopiedCheck {
    L1 {
        index: u64,
        entry: u64,
    },
    L2 {
        l2_offset: u64,
        index: u64,
        entry: u64,
    },
}

/// The stored refcounts: the refcount blocks covering clusters the check compares, each
/// read once however many table entries point at it.
pub(super) struct Stored {
    /// Refcount table index → block offset.
    blocks: BTreeMap<u64, u64>,
    /// Block contents by offset.
    data: HashMap<u64, Vec<u8>>,
    pub(super) per_block: u64,
    pub(super) order: u32,
}

impl Stored {
    /// The block covering refcount table index `rt`: (offset, contents).
    pub(super) fn block(&self, rt: u64) -> Option<(u64, &[u8])> {
        let off = *self.blocks.get(&rt)?;
        Some((off, self.data.get(&off)?))
    }

    fn get(&self, cluster: u64) -> u64 {
        match self.block(cluster / self.per_block) {
            Some((_, data)) => get_entry(data, self.order, cluster % self.per_block),
            None => 0,
        }
    }
}

/// Reads the refcount table and the blocks covering clusters below the end of the file and
/// of every reference (the only ones compared); counts the references they make.
async fn read_stored(c: &mut Checker<'_>) -> Result<Stored> {
    let h = &c.h;
    let table_len = (u64::from(h.refcount_table_clusters) * c.cs) as usize;
    let raw = read_at(c.file, h.refcount_table_offset, table_len).await?;
    let table: Vec<u64> = raw.chunks_exact(8).map(|b| get_u64(b, 0)).collect();
    let per_block = c.cs * 8 / u64::from(h.refcount_bits());
    let order = h.refcount_order;
    let (rt_off, rt_len) = (h.refcount_table_offset, table_len as u64);
    c.inc(rt_off, rt_len, "refcount table");
    let end = compare_end(c);
    let mut blocks = BTreeMap::new();
    let mut data = HashMap::new();
    for (i, &e) in table.iter().enumerate() {
        let off = e & REFT_OFFSET_MASK;
        if off == 0 {
            continue;
        }
        if off % c.cs != 0 {
            c.error(format!(
                "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
            ));
            continue;
        }
        if off >= c.file.size() {
            c.error(format!(
                "ERROR refcount block {i} is outside image (offset {off:#x})"
            ));
            continue;
        }
        c.inc(off, c.cs, "refcount block");
        if (i as u64) * per_block >= end {
            continue;
        }
        if let std::collections::hash_map::Entry::Vacant(slot) = data.entry(off) {
            slot.insert(read_at(c.file, off, c.cs as usize).await?);
        }
        blocks.insert(i as u64, off);
    }
    Ok(Stored {
        blocks,
        data,
        per_block,
        order,
    })
}

/// Where the comparison of refcounts ends: as qemu-img, refcounts past the end of the file
/// and of every reference are not compared (they waste no space).
fn compare_end(c: &Checker<'_>) -> u64 {
    let file_clusters = c.file_size.div_ceil(c.cs);
    file_clusters.max(c.refs.keys().next_back().map_or(0, |&k| k + 1))
}

/// Checks the image on `file`, repairing what `repair` allows.
pub async fn check(file: &Node, repair: Repair) -> Result<CheckResult> {
    let first = check_once(file, repair).await?;
    if repair == Repair::None || (first.leaks_fixed == 0 && first.corruptions_fixed == 0) {
        return Ok(first);
    }
    // Report the state after repair, with what was fixed.
    let mut after = check_once(file, Repair::None).await?;
    after.leaks_fixed = first.leaks_fixed;
    after.corruptions_fixed = first.corruptions_fixed;
    Ok(after)
}

pub(super) async fn read_header(file: &Node) -> Result<Header> {
    let head = read_at(file, 0, 4096).await?;
    let bits = get_u32(&head, 20).clamp(9, 21);
    let buf = read_at(file, 0, 1 << bits).await?;
    Header::parse(&buf)
}

async fn check_once(file: &Node, repair: Repair) -> Result<CheckResult> {
    let h = read_header(file).await?;
    let cs = h.cluster_size();
    let file_clusters = file.size().div_ceil(cs);
    let mut c = Checker {
        file,
        cs,
        refs: BTreeMap::new(),
        res: CheckResult {
            total_clusters: h.size.div_ceil(cs),
            ..CheckResult::default()
        },
        limit: file_clusters + (1 << 20),
        file_size: file.size(),
        table_bytes: 0,
        h,
    };
    c.inc(0, cs, "header");
    let mut copied = Vec::new();
    let (l1_offset, l1_size) = (c.h.l1_table_offset, u64::from(c.h.l1_size));
    let mut tables = L2Tables::default();
    c.count_l1(l1_offset, l1_size, true, &mut copied, &mut tables)
        .await?;
    c.count_l2_tables(&tables, true, &mut copied).await?;
    drop(tables);
    c.count_snapshots().await?;
    c.count_bitmaps().await?;
    let refs_without_refcounts = c.refs.clone();
    let stored = read_stored(&mut c).await?;

    // Compare every cluster that is referenced or has a stored refcount, up to the end.
    let end = compare_end(&c);
    let mut clusters: Vec<u64> = c.refs.keys().copied().collect();
    for &rt in stored.blocks.keys() {
        let Some((_, data)) = stored.block(rt) else {
            continue;
        };
        let first = rt * stored.per_block;
        for k in 0..stored.per_block.min(end.saturating_sub(first)) {
            if get_entry(data, stored.order, k) != 0 {
                clusters.push(first + k);
            }
        }
    }
    clusters.sort_unstable();
    clusters.dedup();
    clusters.retain(|&cl| cl < end);
    let mut leaked = Vec::new();
    let mut errors = 0u64;
    let mut highest = 0u64;
    for &cl in &clusters {
        let stored_rc = stored.get(cl);
        let reference = c.refs.get(&cl).copied().unwrap_or(0);
        if stored_rc > 0 || reference > 0 {
            highest = highest.max(cl + 1);
        }
        if stored_rc < reference {
            errors += 1;
            c.error(format!(
                "ERROR cluster {cl} refcount={stored_rc} reference={reference}"
            ));
        } else if stored_rc > reference {
            c.res.leaks += 1;
            leaked.push((cl, reference));
            c.note(format!(
                "Leaked cluster {cl} refcount={stored_rc} reference={reference}"
            ));
        }
    }
    c.res.image_end_offset = highest * cs;

    let dirty = c.h.incompatible_features & INCOMPAT_DIRTY != 0;
    let rebuild = repair == Repair::All && (errors > 0 || dirty);
    let mut overrides: BTreeMap<u64, u64> = BTreeMap::new();
    let mut rebuilt: Option<BTreeMap<u64, u64>> = None;
    if rebuild {
        rebuilt = Some(rebuild_refcounts(&c, refs_without_refcounts).await?);
        c.res.corruptions_fixed += errors;
        c.res.leaks_fixed += c.res.leaks;
    } else if repair != Repair::None && !leaked.is_empty() {
        fix_leaks(&c, &stored, &leaked).await?;
        c.res.leaks_fixed += leaked.len() as u64;
        overrides.extend(leaked.iter().copied());
    }
    let final_rc = |cl: u64| -> u64 {
        match &rebuilt {
            Some(r) => r.get(&cl).copied().unwrap_or(0),
            None => overrides
                .get(&cl)
                .copied()
                .unwrap_or_else(|| stored.get(cl)),
        }
    };

    // OFLAG_COPIED must match refcount == 1.
    let mut l1_fixes = Vec::new();
    let mut l2_fixes: BTreeMap<u64, Vec<(u64, u64)>> = BTreeMap::new();
    for check in copied {
        match check {
            CopiedCheck::L1 { index, entry } => {
                let rc = final_rc((entry & L1E_OFFSET_MASK) / cs);
                if (rc == 1) != (entry & OFLAG_COPIED != 0) {
                    c.error(format!(
                        "ERROR OFLAG_COPIED L2 cluster: l1_index={index} l1_entry={entry:x} \
                         refcount={rc}"
                    ));
                    l1_fixes.push((index, entry ^ OFLAG_COPIED));
                }
            }
            CopiedCheck::L2 {
                l2_offset,
                index,
                entry,
            } => {
                let rc = final_rc((entry & L2E_OFFSET_MASK) / cs);
                if (rc == 1) != (entry & OFLAG_COPIED != 0) {
                    c.error(format!(
                        "ERROR OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={rc}"
                    ));
                    l2_fixes
                        .entry(l2_offset)
                        .or_default()
                        .push((index, entry ^ OFLAG_COPIED));
                }
            }
        }
    }
    if repair == Repair::All && (!l1_fixes.is_empty() || !l2_fixes.is_empty()) {
        let entry_size = c.h.l2_entry_size();
        for (l2_offset, fixes) in &l2_fixes {
            for &(index, entry) in fixes {
                write_at(file, l2_offset + index * entry_size, &entry.to_be_bytes()).await?;
            }
        }
        for &(index, entry) in &l1_fixes {
            write_at(file, c.h.l1_table_offset + index * 8, &entry.to_be_bytes()).await?;
        }
        file.flush().await?;
        c.res.corruptions_fixed +=
            (l1_fixes.len() + l2_fixes.values().map(Vec::len).sum::<usize>()) as u64;
    }
    Ok(c.res)
}
