//! Names of the header's feature bits: the feature name table extension, read for error
//! messages and written into new images.

use super::header::{trim_nul, Header, EXT_FEATURE_TABLE};

/// Feature bits QEMU knows, as (kind, bit, name): the table it writes into new version 3
/// images, and the names used when an image has no table.
const KNOWN_FEATURES: [(u8, u8, &str); 8] = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

/// Bytes of one feature name table entry.
const ENTRY_BYTES: usize = 48;

/// One entry of the feature name table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    /// Bit number.
    pub bit: u8,
    /// Name.
    pub name: String,
}

impl Header {
    /// The feature name table.
    pub fn feature_names(&self) -> Vec<FeatureName> {
        let Some(ext) = self.extension(EXT_FEATURE_TABLE) else {
            return Vec::new();
        };
        ext.data
            .chunks_exact(ENTRY_BYTES)
            .map(|c| FeatureName {
                kind: c[0],
                bit: c[1],
                name: String::from_utf8_lossy(trim_nul(&c[2..])).into_owned(),
            })
            .collect()
    }

    /// Names the bits of a feature bitmap of one kind, from the table or as "bit N".
    pub fn describe_features(&self, kind: u8, bits: u64) -> String {
        let table = self.feature_names();
        let mut names = Vec::new();
        for bit in 0..64u8 {
            if bits & (1 << bit) == 0 {
                continue;
            }
            let name = table
                .iter()
                .find(|f| f.kind == kind && f.bit == bit)
                .map(|f| format!("{} (bit {bit})", f.name))
                .or_else(|| {
                    KNOWN_FEATURES
                        .iter()
                        .find(|&&(k, b, _)| k == kind && b == bit)
                        .map(|(_, _, n)| format!("{n} (bit {bit})"))
                })
                .unwrap_or_else(|| format!("unknown feature bit {bit}"));
            names.push(name);
        }
        names.join(", ")
    }
}

/// The feature name table QEMU writes into new version 3 images.
pub fn default_feature_table() -> Vec<u8> {
    let mut out = Vec::with_capacity(KNOWN_FEATURES.len() * ENTRY_BYTES);
    for &(kind, bit, name) in &KNOWN_FEATURES {
        let mut entry = [0u8; ENTRY_BYTES];
        entry[0] = kind;
        entry[1] = bit;
        entry[2..2 + name.len()].copy_from_slice(name.as_bytes());
        out.extend_from_slice(&entry);
    }
    out
}
