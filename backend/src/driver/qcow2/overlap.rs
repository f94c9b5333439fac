//! Metadata overlap checks (QEMU's `overlap-check`): no write of guest data or of one
//! metadata structure may land on a host cluster holding metadata of another kind. A write
//! that would is refused with EIO naming the structure, and the image is marked corrupt (the
//! header's corrupt bit, as QEMU does) and refuses every later write.
//!
//! Where metadata lies is a [`ClusterMap`] built at a read-write open from the header, the
//! L1 table and the refcount table, which validates them on the way: every L2 table and
//! refcount block inside the file, cluster aligned, and on no other metadata. The metadata
//! code updates the map when it allocates or moves metadata. A write consults the map with
//! a few loads; only a hit (a corrupt image) takes the slow path here.
//!
//! Images with internal snapshots are only opened read-only, and a read-write open clears
//! the persistent bitmaps' autoclear bit, so a writable image has no snapshot table,
//! inactive L1/L2 tables or bitmap directory to protect: their options are accepted.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use super::cluster_map::{self, ClusterMap};
use super::header::{field, Header, INCOMPAT_CORRUPT};
use super::refcount::{write_bytes, REFT_OFFSET_MASK};
use super::L1E_OFFSET_MASK;
use crate::error::{BlockError, Result};
use crate::node::Node;
use crate::options::Options;

/// The image header (QEMU's `QCOW2_OL_MAIN_HEADER`).
pub const MAIN_HEADER: u32 = 1 << 0;
/// The active L1 table.
pub const ACTIVE_L1: u32 = 1 << 1;
/// The active L2 tables.
pub const ACTIVE_L2: u32 = 1 << 2;
/// The refcount table.
pub const REFCOUNT_TABLE: u32 = 1 << 3;
/// The refcount blocks.
pub const REFCOUNT_BLOCK: u32 = 1 << 4;
const SNAPSHOT_TABLE: u32 = 1 << 5;
const INACTIVE_L1: u32 = 1 << 6;
const INACTIVE_L2: u32 = 1 << 7;
const BITMAP_DIRECTORY: u32 = 1 << 8;

/// Each kind: its bit, its `overlap-check.*` option, and its name in errors (QEMU's).
const KINDS: [(u32, &str, &str); 9] = [
    (MAIN_HEADER, "main-header", "qcow2_header"),
    (ACTIVE_L1, "active-l1", "active L1 table"),
    (ACTIVE_L2, "active-l2", "active L2 table"),
    (REFCOUNT_TABLE, "refcount-table", "refcount table"),
    (REFCOUNT_BLOCK, "refcount-block", "refcount block"),
    (SNAPSHOT_TABLE, "snapshot-table", "snapshot table"),
    (INACTIVE_L1, "inactive-l1", "inactive L1 table"),
    (INACTIVE_L2, "inactive-l2", "inactive L2 table"),
    (BITMAP_DIRECTORY, "bitmap-directory", "bitmap directory"),
];

const CONSTANT: u32 = MAIN_HEADER | ACTIVE_L1 | REFCOUNT_TABLE | SNAPSHOT_TABLE | BITMAP_DIRECTORY;
const CACHED: u32 = CONSTANT | ACTIVE_L2 | REFCOUNT_BLOCK | INACTIVE_L1;
const ALL: u32 = CACHED | INACTIVE_L2;

fn kind_name(kind: u32) -> &'static str {
    KINDS
        .iter()
        .find(|k| k.0 == kind)
        .map_or("metadata", |k| k.2)
}

/// The kinds `overlap-check` (a template name, or `overlap-check.template` with per-kind
/// `overlap-check.KIND=on|off`) selects; QEMU's default is `cached`.
pub fn parse_options(options: &mut Options) -> Result<u32> {
    let plain = options.take("overlap-check");
    let template = options.take("overlap-check.template");
    if plain.is_some() && template.is_some() {
        return Err(BlockError::invalid(
            "'overlap-check' and 'overlap-check.template' may not both be set",
        ));
    }
    let mut mask = match plain.or(template).as_deref() {
        None | Some("cached") => CACHED,
        Some("none") => 0,
        Some("constant") => CONSTANT,
        Some("all") => ALL,
        Some(v) => {
            return Err(BlockError::invalid(format!(
                "Parameter 'overlap-check' expects 'none', 'constant', 'cached' or 'all', got \
                 '{v}'"
            )))
        }
    };
    for (bit, key, _) in KINDS {
        match options.take_bool(&format!("overlap-check.{key}"))? {
            Some(true) => mask |= bit,
            Some(false) => mask &= !bit,
            None => {}
        }
    }
    Ok(mask)
}

/// The overlap checks of a read-write image.
pub struct Overlap {
    mask: u32,
    cluster_bits: u32,
    map: ClusterMap,
    /// The metadata of class `OTHER`: (kind, first cluster, end cluster).
    others: Mutex<Vec<(u32, u64, u64)>>,
    corrupt: AtomicBool,
    /// `incompatible_features` to write with the corrupt bit (`None`: version 2, no bit).
    features: Option<u64>,
    filename: String,
}

/// An error about the metadata found at open.
fn bad(filename: &str, msg: String) -> BlockError {
    BlockError::invalid(format!(
        "qcow2 image '{filename}' is corrupt: {msg} (repair it with 'strata img check -r all' or \
         open it read-only)"
    ))
}

impl Overlap {
    /// Maps the metadata of an image opened read-write, refusing metadata that starts past the
    /// end of the file, unaligned, or overlapping other metadata (`reftable`: the refcount
    /// table's entries).
    pub fn build(
        h: &Header,
        l1: &[AtomicU64],
        reftable: &[u64],
        file_size: u64,
        filename: String,
        mask: u32,
    ) -> Result<Self> {
        let cs = h.cluster_size();
        let bits = h.cluster_bits;
        let o = Self {
            mask,
            cluster_bits: bits,
            map: ClusterMap::default(),
            others: Mutex::new(Vec::new()),
            corrupt: AtomicBool::new(false),
            features: (h.version >= 3).then_some(h.incompatible_features),
            filename,
        };
        let fname = o.filename.clone();
        let add_fixed = |kind: u32, offset: u64, len: u64, what: &str| -> Result<()> {
            if len == 0 {
                return Ok(());
            }
            // Written there, it would make the file that long (1 TiB for an offset of 1 TiB).
            if offset >= file_size {
                return Err(bad(
                    &fname,
                    format!("the {what} at {offset:#x} lies past the end of the file ({file_size} bytes)"),
                ));
            }
            let (c0, c1) = (offset >> bits, (offset + len).div_ceil(cs));
            if let Some(&(k, _, _)) = o.lock_others().iter().find(|&&(_, s, e)| s < c1 && c0 < e) {
                return Err(bad(
                    &fname,
                    format!("the {what} at {offset:#x} overlaps the {}", kind_name(k)),
                ));
            }
            o.add(kind, offset, len)
                .map_err(|e| e.context(format!("qcow2 image '{fname}': {what}")))
        };
        add_fixed(MAIN_HEADER, 0, cs, "header")?;
        add_fixed(
            ACTIVE_L1,
            h.l1_table_offset,
            u64::from(h.l1_size) * 8,
            "L1 table (field 'l1_table_offset' at byte 40)",
        )?;
        add_fixed(
            REFCOUNT_TABLE,
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * cs,
            "refcount table (field 'refcount_table_offset' at byte 48)",
        )?;
        let in_file = |what: String, off: u64| -> Result<()> {
            if off & (cs - 1) != 0 {
                return Err(bad(
                    &fname,
                    format!("{what} {off:#x} is not cluster aligned"),
                ));
            }
            if off >= file_size {
                return Err(bad(
                    &fname,
                    format!("{what} {off:#x} lies past the end of the file ({file_size} bytes)"),
                ));
            }
            Ok(())
        };
        for (i, e) in l1.iter().enumerate() {
            let off = e.load(Ordering::Relaxed) & L1E_OFFSET_MASK;
            if off == 0 {
                continue;
            }
            let what = || format!("L2 table offset of L1 entry {i}");
            in_file(what(), off)?;
            match o.map.class(off >> bits) {
                cluster_map::NONE => o
                    .map
                    .set(off >> bits, (off >> bits) + 1, cluster_map::L2)
                    .map_err(|e| e.context(format!("qcow2 image '{fname}'")))?,
                class => {
                    let other = o.describe(class, off >> bits, |at| {
                        l1.iter()
                            .position(|x| x.load(Ordering::Relaxed) & L1E_OFFSET_MASK == at)
                    });
                    return Err(bad(&fname, format!("{} {off:#x} is also {other}", what())));
                }
            }
        }
        for (i, &e) in reftable.iter().enumerate() {
            let off = e & REFT_OFFSET_MASK;
            if off == 0 {
                continue;
            }
            let what = || format!("refcount block offset of refcount table entry {i}");
            in_file(what(), off)?;
            match o.map.class(off >> bits) {
                cluster_map::NONE => o
                    .map
                    .set(off >> bits, (off >> bits) + 1, cluster_map::REFBLOCK)
                    .map_err(|e| e.context(format!("qcow2 image '{fname}'")))?,
                class => {
                    let other = o.describe(class, off >> bits, |at| match class {
                        cluster_map::L2 => l1
                            .iter()
                            .position(|x| x.load(Ordering::Relaxed) & L1E_OFFSET_MASK == at),
                        _ => reftable.iter().position(|&x| x & REFT_OFFSET_MASK == at),
                    });
                    return Err(bad(&fname, format!("{} {off:#x} is also {other}", what())));
                }
            }
        }
        Ok(o)
    }

    fn lock_others(&self) -> std::sync::MutexGuard<'_, Vec<(u32, u64, u64)>> {
        // Pushes and retains only: a panic cannot leave the list half-changed.
        self.others.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What holds cluster `c` of class `class`, for an error at open (`index` finds the
    /// table entry pointing at an offset).
    fn describe(&self, class: u64, c: u64, index: impl Fn(u64) -> Option<usize>) -> String {
        let at = c << self.cluster_bits;
        match class {
            cluster_map::L2 => format!(
                "the L2 table of L1 entry {}",
                index(at).map_or("?".into(), |i| i.to_string())
            ),
            cluster_map::REFBLOCK => format!(
                "the refcount block of refcount table entry {}",
                index(at).map_or("?".into(), |i| i.to_string())
            ),
            _ => format!("in the {}", self.other_kinds(c, c + 1).1),
        }
    }

    /// The kinds of class-`OTHER` metadata on clusters `c0..c1`, and a name for the first.
    fn other_kinds(&self, c0: u64, c1: u64) -> (u32, &'static str) {
        let mut kinds = 0;
        let mut name = "metadata";
        for &(k, s, e) in self.lock_others().iter() {
            if s < c1 && c0 < e {
                if kinds == 0 {
                    name = kind_name(k);
                }
                kinds |= k;
            }
        }
        (kinds, name)
    }

    /// Records metadata of `kind` at `offset..offset+len` (metadata lock held).
    pub fn add(&self, kind: u32, offset: u64, len: u64) -> Result<()> {
        let c0 = offset >> self.cluster_bits;
        let c1 = (offset + len).div_ceil(1 << self.cluster_bits);
        let class = match kind {
            ACTIVE_L2 => cluster_map::L2,
            REFCOUNT_BLOCK => cluster_map::REFBLOCK,
            _ => {
                self.lock_others().push((kind, c0, c1));
                cluster_map::OTHER
            }
        };
        self.map.set(c0, c1, class)
    }

    /// Forgets metadata of `kind` at `offset..offset+len` (metadata lock held).
    pub fn remove(&self, kind: u32, offset: u64, len: u64) {
        let c0 = offset >> self.cluster_bits;
        let c1 = (offset + len).div_ceil(1 << self.cluster_bits);
        let mut others = self.lock_others();
        others.retain(|&(k, s, e)| !(k == kind && s == c0 && e == c1));
        // Clusters another structure still claims keep their class.
        for c in c0..c1 {
            if !others.iter().any(|&(_, s, e)| s <= c && c < e) {
                // Clearing allocates nothing, so it cannot fail.
                let _ = self.map.set(c, c + 1, cluster_map::NONE);
            }
        }
    }

    /// Whether the image was marked corrupt (every write is refused).
    #[inline]
    pub fn is_corrupt(&self) -> bool {
        self.corrupt.load(Ordering::Relaxed)
    }

    /// The error for writes after the image was marked corrupt.
    pub fn corrupt_error(&self) -> BlockError {
        BlockError::new(
            libc::EIO,
            format!(
                "qcow2 image '{}' was marked corrupt after an invalid metadata write; it refuses \
                 writes until repaired ('strata img check -r all')",
                self.filename
            ),
        )
    }

    /// Whether `offset..offset+len` might hit metadata (the fast test; a hit goes to
    /// [`check`](Self::check)).
    #[inline]
    pub fn may_hit(&self, offset: u64, len: u64) -> bool {
        self.mask != 0
            && len != 0
            && self
                .map
                .first_hit(
                    offset >> self.cluster_bits,
                    ((offset + len - 1) >> self.cluster_bits) + 1,
                )
                .is_some()
    }

    /// Refuses a write to `offset..offset+len` that overlaps checked metadata of a kind not
    /// in `ignore`: marks the image corrupt and returns EIO naming the structure.
    pub async fn check(&self, file: &Node, offset: u64, len: u64, ignore: u32) -> Result<()> {
        if self.is_corrupt() {
            return Err(self.corrupt_error());
        }
        if !self.may_hit(offset, len) {
            return Ok(());
        }
        let (c0, c1) = (
            offset >> self.cluster_bits,
            ((offset + len - 1) >> self.cluster_bits) + 1,
        );
        let mut c = c0;
        while let Some((hit, class)) = self.map.first_hit(c, c1) {
            let (kinds, name) = match class {
                cluster_map::L2 => (ACTIVE_L2, kind_name(ACTIVE_L2)),
                cluster_map::REFBLOCK => (REFCOUNT_BLOCK, kind_name(REFCOUNT_BLOCK)),
                _ => self.other_kinds(hit, hit + 1),
            };
            let bad = kinds & self.mask & !ignore;
            if bad != 0 {
                let name = if kinds == bad {
                    name
                } else {
                    kind_name(bad & bad.wrapping_neg())
                };
                return Err(self
                    .mark_corrupt(file, name, hit << self.cluster_bits)
                    .await);
            }
            c = hit + 1;
        }
        Ok(())
    }

    /// Marks the image corrupt (in memory at once, then the header's bit) and returns the
    /// error for the write that was refused.
    async fn mark_corrupt(&self, file: &Node, what: &str, at: u64) -> BlockError {
        let msg = format!(
            "qcow2 image '{}': Preventing invalid write on metadata (overlaps with {what} at \
             {at:#x}); image marked as corrupt",
            self.filename
        );
        if !self.corrupt.swap(true, Ordering::AcqRel) {
            log::error!("{msg}");
            if let Some(features) = self.features {
                let bytes = (features | INCOMPAT_CORRUPT).to_be_bytes();
                let written = async {
                    write_bytes(file, field::INCOMPATIBLE_FEATURES, &bytes, "header").await?;
                    file.flush().await
                };
                if let Err(e) = written.await {
                    log::error!(
                        "qcow2 image '{}': could not set the corrupt bit: {e}",
                        self.filename
                    );
                }
            }
        }
        BlockError::new(libc::EIO, msg)
    }
}
