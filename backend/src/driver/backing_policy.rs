//! Which backing files an image may name. A backing file name read from an image header is
//! data the image's author (or a guest that wrote the image) controls: followed blindly, it
//! opens host files (`/etc/shadow`), devices (`host_device:`), other protocols, or other
//! nodes of the daemon (`json:{"driver": ..., "file": "other-vm-disk"}`).
//!
//! By default a name from an image must be a plain file path (relative or absolute), with a
//! backing format given in the image, resolving (symlinks included) to a file under the
//! directory of the top image of the chain or under a directory the user allowed. Backing
//! files the user names in options are not limited.

use std::path::{Path, PathBuf};

use crate::error::{BlockError, Result};
use crate::filename::{full_backing_filename, path_has_protocol};

/// The backing-file policy of a graph.
#[derive(Debug, Clone, Default)]
pub struct BackingPolicy {
    /// Follow image-named backing files as QEMU does (any path, protocol prefixes, `json:`,
    /// probing a missing format): only for images the user trusts.
    pub trust_images: bool,
    /// Directories that image-named backing files may lie under, besides the directory of
    /// the chain's top image.
    pub allowed_dirs: Vec<PathBuf>,
}

/// Where an allowed backing file is: its canonical path.
pub(crate) struct AllowedBacking {
    /// The canonical path of the backing file.
    pub path: PathBuf,
}

impl BackingPolicy {
    /// Checks the backing file `name` that image `image` names (with `format`, if it names
    /// one; `is_format` says whether a driver name is a format), in a chain whose top image
    /// lies in `root`.
    pub(crate) fn check(
        &self,
        image: &str,
        name: &str,
        format: Option<&str>,
        root: &Path,
        is_format: impl Fn(&str) -> bool,
    ) -> Result<AllowedBacking> {
        let refuse = |why: String| {
            BlockError::new(
                libc::EACCES,
                format!(
                    "Image '{image}' names backing file '{name}', which is refused: {why} \
                     (give the backing file in the node's options, or allow it with \
                     --allow-backing-dir DIR or --trust-backing-names)"
                ),
            )
        };
        if name.starts_with("json:") || path_has_protocol(name) {
            return Err(refuse(
                "only plain file names are followed, not protocols or json: options".into(),
            ));
        }
        match format {
            None => {
                return Err(refuse(
                    "the image gives no backing format, and backing files named by images \
                     are never probed"
                        .into(),
                ))
            }
            Some(f) if !is_format(f) => {
                return Err(refuse(format!(
                    "backing format '{f}' is not an image format"
                )))
            }
            Some(_) => {}
        }
        let full = full_backing_filename(image, name)?;
        let path = std::fs::canonicalize(&full).map_err(|e| {
            BlockError::io(
                &e,
                format!("Could not open backing file '{full}' of image '{image}'"),
            )
        })?;
        let allowed = std::iter::once(root.to_path_buf())
            .chain(
                self.allowed_dirs
                    .iter()
                    .filter_map(|d| std::fs::canonicalize(d).ok()),
            )
            .any(|dir| path.starts_with(dir));
        if !allowed {
            return Err(refuse(format!(
                "'{}' is outside '{}' (the top image's directory) and the allowed directories",
                path.display(),
                root.display()
            )));
        }
        Ok(AllowedBacking { path })
    }
}

/// The directory a chain whose top image is `image` may take backing files from.
pub(crate) fn chain_root(image: &str) -> Result<PathBuf> {
    let canonical = std::fs::canonicalize(image)
        .map_err(|e| BlockError::io(&e, format!("Could not resolve image path '{image}'")))?;
    Ok(canonical
        .parent()
        .map_or_else(|| PathBuf::from("/"), Path::to_path_buf))
}
