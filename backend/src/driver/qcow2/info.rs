//! What `img info` shows about a qcow2 image, read from its header.

use std::io::Read;
use std::path::Path;

use super::header::{
    Header, COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, MAX_CLUSTER_BITS,
};
use crate::error::{BlockError, Result};

/// The header facts of a qcow2 image that `img info` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// The image was not closed cleanly (its refcounts may be stale).
    pub dirty: bool,
    /// `"1.1"` (version 3) or `"0.10"` (version 2).
    pub compat: &'static str,
    /// `"zlib"` or `"zstd"`.
    pub compression_type: &'static str,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// Lazy refcounts (`None` for version 2, which has no feature bits).
    pub lazy_refcounts: Option<bool>,
    /// The metadata is marked corrupt (`None` for version 2).
    pub corrupt: Option<bool>,
    /// L2 entries have subcluster bitmaps (`None` for version 2).
    pub extended_l2: Option<bool>,
    /// The backing file name, as stored.
    pub backing_file: Option<String>,
    /// The backing file's format, from the header extension.
    pub backing_format: Option<String>,
    /// Number of internal snapshots.
    pub snapshots: u32,
}

impl ImageInfo {
    fn from_header(h: &Header) -> Self {
        let v3 = h.version >= 3;
        let v3_only = |set: bool| v3.then_some(set);
        Self {
            cluster_size: h.cluster_size(),
            dirty: h.incompatible_features & INCOMPAT_DIRTY != 0,
            compat: if v3 { "1.1" } else { "0.10" },
            compression_type: if h.compression_type == 0 {
                "zlib"
            } else {
                "zstd"
            },
            refcount_bits: h.refcount_bits(),
            lazy_refcounts: v3_only(h.compatible_features & COMPAT_LAZY_REFCOUNTS != 0),
            corrupt: v3_only(h.incompatible_features & INCOMPAT_CORRUPT != 0),
            extended_l2: v3_only(h.extended_l2()),
            backing_file: h.backing_file.clone(),
            backing_format: h.backing_format(),
            snapshots: h.nb_snapshots,
        }
    }
}

/// Reads and validates the header of the qcow2 image at `path`.
pub fn read_info(path: &Path) -> Result<ImageInfo> {
    let name = path.display();
    let file = std::fs::File::open(path)
        .map_err(|e| BlockError::io(&e, format!("Could not open '{name}'")))?;
    // The header lies in the first cluster, whatever the cluster size.
    let mut buf = Vec::new();
    file.take(1 << MAX_CLUSTER_BITS)
        .read_to_end(&mut buf)
        .map_err(|e| BlockError::io(&e, format!("Could not read '{name}'")))?;
    let header = Header::parse(&buf).map_err(|e| e.context(&name))?;
    Ok(ImageInfo::from_header(&header))
}
