//! Format probing: recognising an image format from its first bytes, as QEMU's format probes
//! do. Anything QEMU would open as another format must be recognised here: a probed raw image
//! refuses writes that would make it look like one (see the `raw` driver), and `serve` never
//! probes at all.

/// Bytes read from the start of an image for probing.
pub const PROBE_BUF_SIZE: usize = 2048;

/// Image formats recognised by a magic, as (format, offset, magic).
const MAGICS: &[(&str, usize, &[u8])] = &[
    ("qed", 0, b"QED\x00"),
    // VMDK4 and VMDK3 (vmdk_probe).
    ("vmdk", 0, b"KDMV"),
    ("vmdk", 0, b"COWD"),
    ("vdi", 0x40, b"\x7f\x10\xda\xbe"),
    ("vhdx", 0, b"vhdxfile"),
    ("vpc", 0, b"conectix"),
    ("luks", 0, b"LUKS\xba\xbe"),
    ("parallels", 0, b"WithoutFreeSpace"),
    ("parallels", 0, b"WithouFreSpacExt"),
    ("bochs", 0, b"Bochs Virtual HD Image"),
    ("cloop", 0, b"#!/bin/sh\n#V2.0 Format\n"),
];

/// The qcow family's magic, followed by a big-endian version.
const QCOW_MAGIC: &[u8] = b"QFI\xfb";

/// The non-raw format that `buf` (the start of an image) looks like to QEMU, if any. Raw is
/// what matches nothing.
pub fn probe_format(buf: &[u8]) -> Option<&'static str> {
    if let Some(format) = probe_qcow(buf) {
        return Some(format);
    }
    if let Some((format, _, _)) = MAGICS
        .iter()
        .find(|(_, offset, magic)| buf.get(*offset..offset + magic.len()) == Some(*magic))
    {
        return Some(format);
    }
    vmdk_descriptor(buf).then_some("vmdk")
}

/// qcow2_probe and qcow_probe: the magic, then version 1 (qcow) or any later one (qcow2,
/// which then refuses versions it does not know, but only after it was chosen).
fn probe_qcow(buf: &[u8]) -> Option<&'static str> {
    if buf.get(..4) != Some(QCOW_MAGIC) {
        return None;
    }
    let version = u32::from_be_bytes(buf.get(4..8)?.try_into().ok()?);
    match version {
        0 => None,
        1 => Some("qcow"),
        _ => Some("qcow2"),
    }
}

/// vmdk_probe's text descriptor: comment lines (`#...`) and lines of spaces, then a
/// `version=1`, `2` or `3` line (with `\n` or `\r\n`). A descriptor names extent files, which
/// is why it must never be mistaken for raw data.
fn vmdk_descriptor(buf: &[u8]) -> bool {
    let mut p = 0;
    while p < buf.len() {
        match buf[p] {
            b'#' => {
                while p < buf.len() && buf[p] != b'\n' {
                    p += 1;
                }
                p += 1;
            }
            b' ' => {
                while p < buf.len() && buf[p] == b' ' {
                    p += 1;
                }
                if p < buf.len() && buf[p] == b'\r' {
                    p += 1;
                }
                if p == buf.len() || buf[p] != b'\n' {
                    return false;
                }
                p += 1;
            }
            _ => {
                let rest = &buf[p..];
                return [b'1', b'2', b'3'].iter().any(|v| {
                    let line = [b"version=".as_slice(), &[*v]].concat();
                    rest.starts_with(&[line.as_slice(), b"\n"].concat())
                        || rest.starts_with(&[line.as_slice(), b"\r\n"].concat())
                });
            }
        }
    }
    false
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

    #[test]
    fn every_qcow_version_qemu_would_probe() {
        assert_eq!(probe_format(b"QFI\xfb\x00\x00\x00\x01"), Some("qcow"));
        assert_eq!(probe_format(b"QFI\xfb\x00\x00\x00\x02"), Some("qcow2"));
        assert_eq!(probe_format(b"QFI\xfb\x00\x00\x00\x04"), Some("qcow2"));
        assert_eq!(probe_format(b"QFI\xfb\xff\xff\xff\xff"), Some("qcow2"));
        assert_eq!(probe_format(b"QFI\xfb\x00\x00\x00\x00"), None);
    }

    #[test]
    fn vmdk_shapes() {
        assert_eq!(probe_format(b"COWD\x00\x00\x00\x01"), Some("vmdk"));
        let desc =
            b"# Disk DescriptorFile\nversion=1\nCID=fffffffe\nRW 2048 FLAT \"/etc/shadow\" 0\n";
        assert_eq!(probe_format(desc), Some("vmdk"));
        assert_eq!(probe_format(b"version=2\r\n"), Some("vmdk"));
        assert_eq!(probe_format(b"   \n# c\nversion=3\n"), Some("vmdk"));
        // What vmdk_probe rejects: another first line, an empty line, another version.
        assert_eq!(probe_format(b"# Disk DescriptorFile\nCID=1\n"), None);
        assert_eq!(probe_format(b"\nversion=1\n"), None);
        assert_eq!(probe_format(b"version=4\n"), None);
        assert_eq!(probe_format(b"  x\nversion=1\n"), None);
    }
}
