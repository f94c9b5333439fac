//! Creating a new qcow2 image file: header (with backing file, backing format and feature
//! name table), refcount table and blocks, and an empty L1 table.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

use super::feature_names::default_feature_table;
use super::header::{
    Extension, Header, COMPAT_LAZY_REFCOUNTS, COMPRESSION_ZLIB, EXT_BACKING_FORMAT,
    EXT_FEATURE_TABLE, INCOMPAT_COMPRESSION, INCOMPAT_EXTL2,
};
use super::refcount::set_entry;
use crate::error::{BlockError, Result};
use crate::io::executor::block_on;
use crate::io::iovec::IoVec;
use crate::node::Node;

/// What a new image looks like (QEMU's `-o` options).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual size in bytes (rounded up to 512).
    pub size: u64,
    /// Cluster size (`cluster_size`, default 64 KiB).
    pub cluster_size: u64,
    /// 2 (`compat=0.10`) or 3 (`compat=1.1`, the default).
    pub version: u32,
    /// `lazy_refcounts`.
    pub lazy_refcounts: bool,
    /// `compression_type` (0 zlib, 1 zstd).
    pub compression_type: u8,
    /// `refcount_bits` (default 16).
    pub refcount_bits: u32,
    /// `extended_l2`.
    pub extended_l2: bool,
    /// Backing file name, stored as given.
    pub backing_file: Option<String>,
    /// Backing file format.
    pub backing_format: Option<String>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        Self {
            size: 0,
            cluster_size: 65536,
            version: 3,
            lazy_refcounts: false,
            compression_type: COMPRESSION_ZLIB,
            refcount_bits: 16,
            extended_l2: false,
            backing_file: None,
            backing_format: None,
        }
    }
}

impl CreateOptions {
    /// Parses `compat` (`0.10`, `v2`, `1.1`, `v3`).
    pub fn parse_compat(value: &str) -> Result<u32> {
        match value {
            "0.10" | "v2" => Ok(2),
            "1.1" | "v3" => Ok(3),
            other => Err(BlockError::invalid(format!(
                "Invalid compatibility level: '{other}' (use 0.10 or 1.1)"
            ))),
        }
    }

    /// Parses `compression_type` (`zlib`, `zstd`).
    pub fn parse_compression(value: &str) -> Result<u8> {
        match value {
            "zlib" => Ok(0),
            "zstd" => Ok(1),
            other => Err(BlockError::invalid(format!(
                "Invalid compression type '{other}' (use zlib or zstd)"
            ))),
        }
    }

    fn validate(&self) -> Result<()> {
        let cs = self.cluster_size;
        if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
            return Err(BlockError::invalid(
                "Cluster size must be a power of two between 512 and 2048k",
            ));
        }
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return Err(BlockError::invalid(
                "Refcount width must be a power of two and may not exceed 64 bits",
            ));
        }
        if self.version < 3 {
            let need = |what: &str| {
                Err(BlockError::invalid(format!(
                    "{what} only supported with compatibility level 1.1 and above (use \
                     compat=1.1 or greater)"
                )))
            };
            if self.lazy_refcounts {
                return need("Lazy refcounts");
            }
            if self.refcount_bits != 16 {
                return need("Different refcount widths than 16 bits are");
            }
            if self.compression_type != COMPRESSION_ZLIB {
                return need("Non-zlib compression type is");
            }
            if self.extended_l2 {
                return need("Extended L2 entries are");
            }
        }
        if self.extended_l2 && cs < 16384 {
            return Err(BlockError::invalid(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            ));
        }
        if self.backing_format.is_some() && self.backing_file.is_none() {
            return Err(BlockError::invalid(
                "Backing format cannot be used without backing file",
            ));
        }
        Ok(())
    }
}

/// Builds the bytes of a new image (everything up to the end of its L1 table).
pub fn image_bytes(opts: &CreateOptions) -> Result<Vec<u8>> {
    opts.validate()?;
    let cs = opts.cluster_size;
    let cluster_bits = cs.trailing_zeros();
    let size = opts.size.div_ceil(512) * 512;
    let refcount_order = opts.refcount_bits.trailing_zeros();
    let mut incompatible = 0;
    if opts.compression_type != COMPRESSION_ZLIB {
        incompatible |= INCOMPAT_COMPRESSION;
    }
    if opts.extended_l2 {
        incompatible |= INCOMPAT_EXTL2;
    }
    let mut extensions = Vec::new();
    if let Some(fmt) = &opts.backing_format {
        extensions.push(Extension {
            kind: EXT_BACKING_FORMAT,
            data: fmt.as_bytes().to_vec(),
        });
    }
    if opts.version >= 3 {
        extensions.push(Extension {
            kind: EXT_FEATURE_TABLE,
            data: default_feature_table(),
        });
    }
    let mut h = Header {
        version: opts.version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits,
        size,
        crypt_method: 0,
        l1_size: 0,
        l1_table_offset: 0,
        refcount_table_offset: cs,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: incompatible,
        compatible_features: if opts.lazy_refcounts {
            COMPAT_LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear_features: 0,
        refcount_order,
        header_length: if opts.version >= 3 { 112 } else { 72 },
        compression_type: opts.compression_type,
        extensions,
        backing_file: opts.backing_file.clone(),
    };
    let l1_entries = h.l1_entries_needed(size);
    if l1_entries * 8 > super::header::MAX_L1_BYTES {
        return Err(BlockError::new(
            libc::EFBIG,
            "The image size is too large for file format 'qcow2' (try using a larger cluster size)",
        ));
    }
    h.l1_size = l1_entries as u32;
    let l1_clusters = (l1_entries * 8).div_ceil(cs);
    // Header, refcount table, refcount blocks, L1 table: find how many blocks count them all.
    let per_block = cs * 8 / u64::from(opts.refcount_bits);
    let (mut rt_clusters, mut blocks) = (1u64, 1u64);
    loop {
        let total = 1 + rt_clusters + blocks + l1_clusters;
        let need_blocks = total.div_ceil(per_block);
        let need_rt = (need_blocks * 8).div_ceil(cs);
        if need_blocks <= blocks && need_rt <= rt_clusters {
            break;
        }
        blocks = blocks.max(need_blocks);
        rt_clusters = rt_clusters.max(need_rt);
    }
    let total = 1 + rt_clusters + blocks + l1_clusters;
    h.refcount_table_clusters = rt_clusters as u32;
    h.l1_table_offset = (1 + rt_clusters + blocks) * cs;
    let mut out = h.to_bytes()?;
    out.resize((total * cs) as usize, 0);
    for b in 0..blocks {
        let at = ((1 + rt_clusters + b) * cs) as usize;
        out[(cs as usize) + (b as usize) * 8..(cs as usize) + (b as usize) * 8 + 8]
            .copy_from_slice(&(at as u64).to_be_bytes());
        let block = &mut out[at..at + cs as usize];
        for c in (b * per_block)..((b + 1) * per_block).min(total) {
            set_entry(block, refcount_order, c - b * per_block, 1);
        }
    }
    // QEMU leaves the unused part of the last L1 cluster out of the file.
    let end = h.l1_table_offset + (l1_entries * 8).max(if l1_entries == 0 { 0 } else { 8 });
    out.truncate(end.max(h.l1_table_offset) as usize);
    Ok(out)
}

/// Creates (or truncates) `path` as a new qcow2 image.
pub fn create_file(path: &Path, opts: &CreateOptions) -> Result<()> {
    let bytes = image_bytes(opts)?;
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| BlockError::io(&e, format!("Could not create '{}'", path.display())))?;
    f.write_all(&bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| BlockError::io(&e, format!("Could not write '{}'", path.display())))
}

/// Writes a new qcow2 image onto `node` from its start (QMP's `blockdev-create` on a file
/// node). A node that can grow is emptied first, so nothing it held before lies beyond the
/// image; the image is padded to the node's request alignment (zeroes, past the L1 table).
pub fn create_on_node(node: &Node, opts: &CreateOptions) -> Result<()> {
    let mut bytes = image_bytes(opts)?;
    let align = u64::from(node.limits().request_alignment).max(1);
    let padded = (bytes.len() as u64).div_ceil(align) * align;
    bytes.resize(
        usize::try_from(padded).map_err(|_| BlockError::invalid("image too large"))?,
        0,
    );
    let len = bytes.len() as u64;
    if !node.can_grow() && node.size() < len {
        return Err(BlockError::new(
            libc::ENOSPC,
            format!(
                "Node '{}' ({} bytes) is too small for the image's {len} bytes of metadata",
                node.name(),
                node.size()
            ),
        ));
    }
    block_on(async {
        if node.can_grow() {
            node.truncate(0).await?;
        }
        node.write_growing(0, &[IoVec::new(&mut bytes)]).await?;
        node.flush().await
    })?
    .map_err(|e| {
        e.context(format!(
            "Could not write the image onto node '{}'",
            node.name()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_consistent() {
        for (cs, bits, size) in [
            (65536u64, 16u32, 1u64 << 30),
            (512, 64, 1 << 30),
            (512, 1, 100 << 20),
            (2 << 20, 16, 1 << 40),
        ] {
            let opts = CreateOptions {
                size,
                cluster_size: cs,
                refcount_bits: bits,
                ..CreateOptions::default()
            };
            let bytes = image_bytes(&opts).unwrap();
            let h = Header::parse(&bytes).unwrap();
            assert_eq!(h.size, size);
            assert_eq!(h.refcount_bits(), bits);
            assert!(u64::from(h.l1_size) >= h.l1_entries_needed(size));
        }
        let e = image_bytes(&CreateOptions {
            version: 2,
            lazy_refcounts: true,
            ..CreateOptions::default()
        })
        .unwrap_err();
        assert!(e.message().contains("compat=1.1"), "{e}");
    }
}
