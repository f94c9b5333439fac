//! Filenames as QEMU reads them: `protocol:` prefixes, and backing file names relative to the
//! image that names them.

use crate::error::{BlockError, Result};

/// Whether a filename starts with `protocol:` (QEMU's `path_has_protocol`: a colon before
/// any slash).
pub fn path_has_protocol(path: &str) -> bool {
    path.find([':', '/'])
        .is_some_and(|i| path.as_bytes()[i] == b':')
}

/// QEMU's `path_combine`: `filename` relative to the directory of `base` (after any
/// `protocol:` prefix); absolute names are kept.
pub fn path_combine(base: &str, filename: &str) -> String {
    if filename.starts_with('/') {
        return filename.to_string();
    }
    let after_protocol = base.find(':').map_or(0, |i| i + 1);
    let after_slash = base.rfind('/').map_or(0, |i| i + 1);
    format!("{}{filename}", &base[..after_protocol.max(after_slash)])
}

/// QEMU's `bdrv_get_full_backing_filename_from_filename`: the backing file name of an image
/// named `backed`, resolved relative to the image's directory. Absolute names, protocol
/// prefixes and `json:` names are used as given.
pub fn full_backing_filename(backed: &str, backing: &str) -> Result<String> {
    if backing.is_empty() || path_has_protocol(backing) || backing.starts_with('/') {
        return Ok(backing.to_string());
    }
    if backed.is_empty() || backed.starts_with("json:") {
        return Err(BlockError::invalid(format!(
            "Cannot use relative backing file names for '{backed}'"
        )));
    }
    Ok(path_combine(backed, backing))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backing_file_names() {
        assert_eq!(path_combine("/a/b/top.qcow2", "base.img"), "/a/b/base.img");
        assert_eq!(path_combine("top.qcow2", "base.img"), "base.img");
        assert_eq!(
            path_combine("dir/top.qcow2", "../base.img"),
            "dir/../base.img"
        );
        assert_eq!(path_combine("file:dir/top", "b"), "file:dir/b");
        assert_eq!(path_combine("/x/top", "/abs/b"), "/abs/b");
        assert!(path_has_protocol("nbd:localhost:10809"));
        assert!(path_has_protocol("json:{\"driver\": \"raw\"}"));
        assert!(!path_has_protocol("dir/a:b"));
        assert_eq!(
            full_backing_filename("/img/top.qcow2", "json:{}").unwrap(),
            "json:{}"
        );
        assert_eq!(
            full_backing_filename("/img/top.qcow2", "/abs.img").unwrap(),
            "/abs.img"
        );
        assert_eq!(
            full_backing_filename("/img/top.qcow2", "sub/b.img").unwrap(),
            "/img/sub/b.img"
        );
        assert!(full_backing_filename("", "b.img")
            .unwrap_err()
            .message()
            .contains("relative"));
    }
}
