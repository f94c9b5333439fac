//! Format probing: recognising an image format from its first bytes.

/// Bytes read from the start of an image for probing.
pub const PROBE_BUF_SIZE: usize = 2048;

/// Image formats recognised by their magic, as (format, offset, magic).
const MAGICS: &[(&str, usize, &[u8])] = &[
    ("qcow2", 0, b"QFI\xfb\x00\x00\x00\x02"),
    ("qcow2", 0, b"QFI\xfb\x00\x00\x00\x03"),
    ("qcow", 0, b"QFI\xfb\x00\x00\x00\x01"),
    ("qed", 0, b"QED\x00"),
    ("vmdk", 0, b"KDMV"),
    ("vmdk", 0, b"# Disk DescriptorFile"),
    ("vdi", 0x40, b"\x7f\x10\xda\xbe"),
    ("vhdx", 0, b"vhdxfile"),
    ("vpc", 0, b"conectix"),
    ("luks", 0, b"LUKS\xba\xbe"),
    ("parallels", 0, b"WithoutFreeSpace"),
    ("parallels", 0, b"WithouFreSpacExt"),
    ("bochs", 0, b"Bochs Virtual HD Image"),
    ("cloop", 0, b"#!/bin/sh\n#V2.0 Format\n"),
];

/// The non-raw format whose magic starts `buf`, if any. Raw is what matches nothing.
pub fn probe_format(buf: &[u8]) -> Option<&'static str> {
    MAGICS
        .iter()
        .find(|(_, offset, magic)| buf.get(*offset..offset + magic.len()) == Some(*magic))
        .map(|(format, _, _)| *format)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magics() {
        assert_eq!(probe_format(b"QFI\xfb\x00\x00\x00\x03rest"), Some("qcow2"));
        assert_eq!(
            probe_format(b"QFI\xfb"),
            None,
            "a truncated header is not qcow2"
        );
        let mut vdi = vec![0u8; 0x50];
        vdi[0x40..0x44].copy_from_slice(b"\x7f\x10\xda\xbe");
        assert_eq!(probe_format(&vdi), Some("vdi"));
        assert_eq!(probe_format(&[0u8; 512]), None);
        assert_eq!(probe_format(b""), None);
    }
}
