//! The qcow2 header: parsing and validating it (every error names the field), its extensions
//! (backing format, feature names, external data file, bitmaps, unknown ones kept as bytes),
//! and writing a new one for image creation. The feature name table is read and built in
//! [`feature_names`](super::feature_names).
//!
//! All numbers are big-endian. Version 2 (compat 0.10) has a 72-byte header; version 3
//! (compat 1.1) at least 104 bytes, with feature bitmaps, the refcount width and, from 112
//! bytes on, the compression type.

use crate::error::{BlockError, Result};

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;

/// Incompatible feature: the image was not closed cleanly (refcounts may be stale).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature: metadata is known to be corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature: the compression type field is not zlib.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature: L2 entries are 128 bits with subcluster bitmaps.
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Every incompatible feature strata knows (it may still refuse some of them).
pub const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

/// Compatible feature: refcounts may be updated lazily (the dirty bit guards them).
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

/// Autoclear feature: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;

/// Header extension types.
pub const EXT_END: u32 = 0;
/// Backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Persistent bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// External data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Compression types (header byte 104).
pub const COMPRESSION_ZLIB: u8 = 0;
/// zstd.
pub const COMPRESSION_ZSTD: u8 = 1;

/// Smallest and largest cluster sizes (as bits).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// 2 MiB.
pub const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU's limit on the active L1 table (32 MiB).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's limit on the refcount table (8 MiB).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// QEMU's limit on the number of internal snapshots.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Longest backing file name.
pub const MAX_BACKING_NAME: u32 = 1023;

/// Byte offsets of header fields that strata updates in place.
pub mod field {
    /// `refcount_table_offset` (u64), followed by `refcount_table_clusters` (u32).
    pub const REFCOUNT_TABLE_OFFSET: u64 = 48;
    /// `incompatible_features` (u64).
    pub const INCOMPATIBLE_FEATURES: u64 = 72;
    /// `autoclear_features` (u64).
    pub const AUTOCLEAR_FEATURES: u64 = 88;
}

/// One header extension as found in the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    /// Extension type.
    pub kind: u32,
    /// Its data (without padding).
    pub data: Vec<u8>,
}

/// The persistent bitmaps extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    /// Number of bitmaps.
    pub nb_bitmaps: u32,
    /// Size of the bitmap directory in bytes.
    pub directory_size: u64,
    /// Offset of the bitmap directory.
    pub directory_offset: u64,
}

/// A parsed and validated qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Offset of the backing file name (0: none).
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0: none; 1: AES; 2: LUKS.
    pub crypt_method: u32,
    /// Entries of the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits (4: 16 bits).
    pub refcount_order: u32,
    /// Length of the header structure (72 for version 2).
    pub header_length: u32,
    /// Compression type (0 zlib, 1 zstd).
    pub compression_type: u8,
    /// Every header extension, in order, except the end marker.
    pub extensions: Vec<Extension>,
    /// The backing file name, as stored.
    pub backing_file: Option<String>,
}

/// Reads big-endian fields from a buffer, naming the field when the buffer is too short.
struct Reader<'a> {
    buf: &'a [u8],
}

impl Reader<'_> {
    fn bytes(&self, off: usize, len: usize, what: &str) -> Result<&[u8]> {
        off.checked_add(len)
            .and_then(|end| self.buf.get(off..end))
            .ok_or_else(|| {
                BlockError::invalid(format!(
                    "qcow2 header is truncated: field '{what}' at byte {off} ({len} bytes) lies \
                     past the {} bytes read",
                    self.buf.len()
                ))
            })
    }

    fn u8(&self, off: usize, what: &str) -> Result<u8> {
        Ok(self.bytes(off, 1, what)?[0])
    }

    fn u32(&self, off: usize, what: &str) -> Result<u32> {
        let b = self.bytes(off, 4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&self, off: usize, what: &str) -> Result<u64> {
        let b = self.bytes(off, 8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
}

/// Reads a big-endian u16 at `off` of `buf` (caller checked the length).
pub fn get_u16(buf: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([buf[off], buf[off + 1]])
}

/// Reads a big-endian u32 at `off` of `buf` (caller checked the length).
pub fn get_u32(buf: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]])
}

/// Reads a big-endian u64 at `off` of `buf` (caller checked the length).
pub fn get_u64(buf: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&buf[off..off + 8]);
    u64::from_be_bytes(a)
}

fn corrupt(msg: impl Into<String>) -> BlockError {
    BlockError::invalid(msg)
}

/// Checks a table offset and size as QEMU's `qcow2_validate_table` does.
pub fn validate_table(
    offset: u64,
    entries: u64,
    entry_len: u64,
    max_bytes: u64,
    cluster_size: u64,
    what: &str,
) -> Result<()> {
    let bytes = entries.saturating_mul(entry_len);
    if bytes > max_bytes {
        return Err(corrupt(format!("{what} too large ({bytes} bytes)")));
    }
    // The table must be cluster aligned and not overflow the offset range.
    if offset % cluster_size != 0
        || offset
            .checked_add(bytes)
            .is_none_or(|e| e > i64::MAX as u64)
    {
        return Err(corrupt(format!("Invalid {what} offset {offset:#x}")));
    }
    Ok(())
}

impl Header {
    /// Parses the header in `buf` (the image's first cluster, or as much of it as exists).
    pub fn parse(buf: &[u8]) -> Result<Self> {
        let r = Reader { buf };
        let magic = r.u32(0, "magic")?;
        if magic != MAGIC {
            return Err(corrupt(format!(
                "Image is not in qcow2 format (magic {magic:#010x} at byte 0)"
            )));
        }
        let version = r.u32(4, "version")?;
        if !(2..=3).contains(&version) {
            return Err(BlockError::new(
                libc::ENOTSUP,
                format!("Unsupported qcow2 version {version} (field 'version' at byte 4)"),
            ));
        }
        let cluster_bits = r.u32(20, "cluster_bits")?;
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(corrupt(format!(
                "Unsupported cluster size: 2^{cluster_bits} (field 'cluster_bits' at byte 20 must \
                 be between {MIN_CLUSTER_BITS} and {MAX_CLUSTER_BITS})"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: r.u64(8, "backing_file_offset")?,
            backing_file_size: r.u32(16, "backing_file_size")?,
            cluster_bits,
            size: r.u64(24, "size")?,
            crypt_method: r.u32(32, "crypt_method")?,
            l1_size: r.u32(36, "l1_size")?,
            l1_table_offset: r.u64(40, "l1_table_offset")?,
            refcount_table_offset: r.u64(48, "refcount_table_offset")?,
            refcount_table_clusters: r.u32(56, "refcount_table_clusters")?,
            nb_snapshots: r.u32(60, "nb_snapshots")?,
            snapshots_offset: r.u64(64, "snapshots_offset")?,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: 72,
            compression_type: COMPRESSION_ZLIB,
            extensions: Vec::new(),
            backing_file: None,
        };
        if version >= 3 {
            h.incompatible_features = r.u64(72, "incompatible_features")?;
            h.compatible_features = r.u64(80, "compatible_features")?;
            h.autoclear_features = r.u64(88, "autoclear_features")?;
            h.refcount_order = r.u32(96, "refcount_order")?;
            h.header_length = r.u32(100, "header_length")?;
            if h.header_length < 104 {
                return Err(corrupt(format!(
                    "qcow2 header too short (field 'header_length' at byte 100 is {}, at least \
                     104 needed)",
                    h.header_length
                )));
            }
            if u64::from(h.header_length) > cluster_size {
                return Err(corrupt(format!(
                    "qcow2 header exceeds cluster size (field 'header_length' at byte 100 is {})",
                    h.header_length
                )));
            }
            if h.header_length > 104 {
                h.compression_type = r.u8(104, "compression_type")?;
            }
        }
        h.validate()?;
        h.parse_extensions(buf)?;
        let unknown = h.incompatible_features & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(BlockError::new(
                libc::ENOTSUP,
                format!(
                    "Unsupported qcow2 feature(s): {} (field 'incompatible_features' at byte 72)",
                    h.describe_features(0, unknown)
                ),
            ));
        }
        if h.backing_file_offset != 0 {
            let off = h.backing_file_offset as usize;
            let len = h.backing_file_size as usize;
            let name = r.bytes(off, len, "backing file name")?;
            h.backing_file = Some(String::from_utf8(name.to_vec()).map_err(|_| {
                corrupt(format!(
                    "qcow2 backing file name at byte {off} is not valid UTF-8"
                ))
            })?);
        }
        Ok(h)
    }

    fn validate(&self) -> Result<()> {
        let cluster_size = self.cluster_size();
        if self.backing_file_offset > cluster_size {
            return Err(corrupt(format!(
                "Invalid backing file offset {} (field 'backing_file_offset' at byte 8 lies \
                 outside the first cluster)",
                self.backing_file_offset
            )));
        }
        if self.backing_file_size > MAX_BACKING_NAME
            || self.backing_file_offset + u64::from(self.backing_file_size) > cluster_size
        {
            return Err(corrupt(format!(
                "Backing file name too long (field 'backing_file_size' at byte 16 is {})",
                self.backing_file_size
            )));
        }
        if self.version == 2 && self.refcount_order != 4 {
            return Err(corrupt("version 2 images have 16-bit refcounts"));
        }
        if self.refcount_order > 6 {
            return Err(corrupt(format!(
                "Reference count entry width too large; may not exceed 64 bits (field \
                 'refcount_order' at byte 96 is {})",
                self.refcount_order
            )));
        }
        if self.crypt_method != 0 {
            return Err(BlockError::new(
                libc::ENOTSUP,
                format!(
                    "qcow2 encryption (field 'crypt_method' at byte 32 is {}) is not supported",
                    self.crypt_method
                ),
            ));
        }
        match self.compression_type {
            COMPRESSION_ZLIB => {
                if self.incompatible_features & INCOMPAT_COMPRESSION != 0 {
                    return Err(corrupt(
                        "qcow2: Compression type incompatible feature bit must not be set \
                         (compression type zlib)",
                    ));
                }
            }
            COMPRESSION_ZSTD => {
                if self.incompatible_features & INCOMPAT_COMPRESSION == 0 {
                    return Err(corrupt(
                        "qcow2: Compression type incompatible feature bit must be set \
                         (compression type zstd)",
                    ));
                }
            }
            other => {
                return Err(BlockError::new(
                    libc::ENOTSUP,
                    format!(
                        "qcow2: unknown compression type: {other} (field 'compression_type' at \
                         byte 104)"
                    ),
                ))
            }
        }
        if self.extended_l2() && self.cluster_bits < 14 {
            return Err(corrupt(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            ));
        }
        if self.size > i64::MAX as u64 {
            return Err(corrupt(format!(
                "Image size {} is too large (field 'size' at byte 24)",
                self.size
            )));
        }
        validate_table(
            self.l1_table_offset,
            u64::from(self.l1_size),
            8,
            MAX_L1_BYTES,
            cluster_size,
            "L1 table",
        )
        .map_err(|e| e.context("field 'l1_table_offset'/'l1_size' at bytes 36-47"))?;
        if u64::from(self.l1_size) < self.l1_entries_needed(self.size) {
            return Err(corrupt(format!(
                "L1 table is too small (field 'l1_size' at byte 36 is {}, the virtual size needs \
                 {})",
                self.l1_size,
                self.l1_entries_needed(self.size)
            )));
        }
        validate_table(
            self.refcount_table_offset,
            u64::from(self.refcount_table_clusters) * cluster_size / 8,
            8,
            MAX_REFTABLE_BYTES,
            cluster_size,
            "reference count table",
        )
        .map_err(|e| e.context("field 'refcount_table_offset' at byte 48"))?;
        if self.refcount_table_clusters == 0 {
            return Err(corrupt(
                "Image does not contain a reference count table (field \
                 'refcount_table_clusters' at byte 56 is 0)",
            ));
        }
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(corrupt(format!(
                "Too many snapshots (field 'nb_snapshots' at byte 60 is {})",
                self.nb_snapshots
            )));
        }
        if self.nb_snapshots > 0 {
            validate_table(
                self.snapshots_offset,
                1,
                1,
                u64::MAX,
                cluster_size,
                "snapshot table",
            )
            .map_err(|e| e.context("field 'snapshots_offset' at byte 64"))?;
        }
        Ok(())
    }

    fn parse_extensions(&mut self, buf: &[u8]) -> Result<()> {
        let r = Reader { buf };
        let end = if self.backing_file_offset != 0 {
            self.backing_file_offset as usize
        } else {
            self.cluster_size() as usize
        };
        let mut off = self.header_length as usize;
        while off < end {
            if end - off < 8 {
                return Err(corrupt(format!(
                    "qcow2 header extension at byte {off} is truncated"
                )));
            }
            let kind = r.u32(off, "header extension type")?;
            let len = r.u32(off + 4, "header extension length")? as usize;
            off += 8;
            if kind == EXT_END {
                break;
            }
            if len > end - off {
                return Err(corrupt(format!(
                    "Header extension {kind:#010x} at byte {} is too large ({len} bytes)",
                    off - 8
                )));
            }
            let data = r.bytes(off, len, "header extension data")?.to_vec();
            match kind {
                EXT_BACKING_FORMAT if len > 1023 => {
                    return Err(corrupt(format!(
                        "ERROR: ext_backing_format: len={len} too large (>=1023)"
                    )))
                }
                EXT_BITMAPS if len != 24 => {
                    return Err(corrupt(format!(
                        "bitmaps_ext: Invalid extension length {len} (24 expected)"
                    )))
                }
                _ => {}
            }
            self.extensions.push(Extension { kind, data });
            off += len.div_ceil(8) * 8;
        }
        Ok(())
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Whether L2 entries have subcluster bitmaps.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTL2 != 0
    }

    /// Bytes per L2 entry.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }

    /// Entries per L2 table (one cluster).
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }

    /// L1 entries needed for a virtual size.
    pub fn l1_entries_needed(&self, size: u64) -> u64 {
        let per_l1 = self.l2_entries() * self.cluster_size();
        size.div_ceil(per_l1)
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// The first extension of a type.
    pub fn extension(&self, kind: u32) -> Option<&Extension> {
        self.extensions.iter().find(|e| e.kind == kind)
    }

    /// The backing format from its extension.
    pub fn backing_format(&self) -> Option<String> {
        self.extension(EXT_BACKING_FORMAT)
            .map(|e| String::from_utf8_lossy(trim_nul(&e.data)).into_owned())
            .filter(|s| !s.is_empty())
    }

    /// The external data file name from its extension.
    pub fn data_file(&self) -> Option<String> {
        self.extension(EXT_DATA_FILE)
            .map(|e| String::from_utf8_lossy(trim_nul(&e.data)).into_owned())
    }

    /// The persistent bitmaps extension, if valid.
    pub fn bitmaps(&self) -> Option<BitmapsExt> {
        let e = self.extension(EXT_BITMAPS)?;
        if e.data.len() != 24 {
            return None;
        }
        Some(BitmapsExt {
            nb_bitmaps: get_u32(&e.data, 0),
            directory_size: get_u64(&e.data, 8),
            directory_offset: get_u64(&e.data, 16),
        })
    }

    /// Serialises the header, its extensions and the backing file name into the first
    /// cluster of a new image. `backing_file_offset`/`size` and `header_length` are computed.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let cluster_size = self.cluster_size() as usize;
        let mut buf = vec![0u8; cluster_size];
        let header_length: usize = if self.version >= 3 { 112 } else { 72 };
        let mut off = header_length;
        let put_ext = |buf: &mut Vec<u8>, off: &mut usize, kind: u32, data: &[u8]| {
            let padded = data.len().div_ceil(8) * 8;
            if *off + 8 + padded > cluster_size {
                return Err(BlockError::invalid(
                    "qcow2 header extensions do not fit in one cluster",
                ));
            }
            buf[*off..*off + 4].copy_from_slice(&kind.to_be_bytes());
            buf[*off + 4..*off + 8].copy_from_slice(&(data.len() as u32).to_be_bytes());
            buf[*off + 8..*off + 8 + data.len()].copy_from_slice(data);
            *off += 8 + padded;
            Ok(())
        };
        for ext in &self.extensions {
            put_ext(&mut buf, &mut off, ext.kind, &ext.data)?;
        }
        put_ext(&mut buf, &mut off, EXT_END, &[])?;
        let (backing_offset, backing_size) = match &self.backing_file {
            Some(name) => {
                let bytes = name.as_bytes();
                if bytes.len() > MAX_BACKING_NAME as usize {
                    return Err(BlockError::invalid(format!(
                        "Backing file name too long ({} bytes, at most {MAX_BACKING_NAME})",
                        bytes.len()
                    )));
                }
                if off + bytes.len() > cluster_size {
                    return Err(BlockError::invalid(
                        "The backing file name does not fit in the header cluster",
                    ));
                }
                buf[off..off + bytes.len()].copy_from_slice(bytes);
                (off as u64, bytes.len() as u32)
            }
            None => (0, 0),
        };
        let mut put64 = |at: usize, v: u64| buf[at..at + 8].copy_from_slice(&v.to_be_bytes());
        put64(8, backing_offset);
        put64(24, self.size);
        put64(40, self.l1_table_offset);
        put64(48, self.refcount_table_offset);
        put64(64, self.snapshots_offset);
        if self.version >= 3 {
            put64(72, self.incompatible_features);
            put64(80, self.compatible_features);
            put64(88, self.autoclear_features);
        }
        let mut put32 = |at: usize, v: u32| buf[at..at + 4].copy_from_slice(&v.to_be_bytes());
        put32(0, MAGIC);
        put32(4, self.version);
        put32(16, backing_size);
        put32(20, self.cluster_bits);
        put32(32, self.crypt_method);
        put32(36, self.l1_size);
        put32(56, self.refcount_table_clusters);
        put32(60, self.nb_snapshots);
        if self.version >= 3 {
            put32(96, self.refcount_order);
            put32(100, header_length as u32);
            buf[104] = self.compression_type;
        }
        Ok(buf)
    }
}

/// `b` up to its first NUL byte.
pub(super) fn trim_nul(b: &[u8]) -> &[u8] {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    &b[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::qcow2::feature_names::default_feature_table;

    fn sample() -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: 0,
            l1_size: 2,
            l1_table_offset: 3 << 16,
            refcount_table_offset: 1 << 16,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: 112,
            compression_type: 0,
            extensions: vec![
                Extension {
                    kind: EXT_BACKING_FORMAT,
                    data: b"raw".to_vec(),
                },
                Extension {
                    kind: EXT_FEATURE_TABLE,
                    data: default_feature_table(),
                },
                Extension {
                    kind: 0x1234_5678,
                    data: vec![1, 2, 3],
                },
            ],
            backing_file: Some("base.img".into()),
        }
    }

    #[test]
    fn round_trip() {
        let h = sample();
        let bytes = h.to_bytes().unwrap();
        let mut p = Header::parse(&bytes).unwrap();
        assert_eq!(p.backing_file.as_deref(), Some("base.img"));
        assert_eq!(p.backing_format().as_deref(), Some("raw"));
        assert_eq!(p.extensions.len(), 3);
        assert_eq!(p.extensions[2].data, vec![1, 2, 3]);
        assert_eq!(p.feature_names().len(), 8);
        p.backing_file_offset = 0;
        p.backing_file_size = 0;
        assert_eq!(p.size, h.size);
        assert_eq!(p.l1_size, 2);
    }

    #[test]
    fn errors_name_the_field() {
        let mut bytes = sample().to_bytes().unwrap();
        bytes[20..24].copy_from_slice(&30u32.to_be_bytes());
        let e = Header::parse(&bytes).unwrap_err();
        assert!(e.message().contains("cluster_bits"), "{e}");

        let mut bytes = sample().to_bytes().unwrap();
        bytes[72..80].copy_from_slice(&(1u64 << 40).to_be_bytes());
        let e = Header::parse(&bytes).unwrap_err();
        assert!(e.message().contains("Unsupported qcow2 feature"), "{e}");

        let mut bytes = sample().to_bytes().unwrap();
        bytes[36..40].copy_from_slice(&1u32.to_be_bytes());
        let e = Header::parse(&bytes).unwrap_err();
        assert!(e.message().contains("L1 table is too small"), "{e}");

        let e = Header::parse(&bytes[..50]).unwrap_err();
        assert!(e.message().contains("truncated"), "{e}");

        let mut bytes = sample().to_bytes().unwrap();
        bytes[104] = 7;
        let e = Header::parse(&bytes).unwrap_err();
        assert!(e.message().contains("compression type"), "{e}");
    }

    #[test]
    fn describes_features_by_name() {
        let h = sample();
        assert_eq!(
            h.describe_features(0, INCOMPAT_DATA_FILE),
            "external data file (bit 2)"
        );
        assert!(h
            .describe_features(0, 1 << 9)
            .contains("unknown feature bit 9"));
    }
}
