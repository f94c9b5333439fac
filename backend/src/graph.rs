//! The node graph: opening nodes from options, naming them, finding them, listing them.
//!
//! Opening follows QEMU's `bdrv_open_inherit`: `json:` filenames are merged under the explicit
//! options, a child inherits cache options per role, a missing format is probed from the
//! file child's first bytes, and any option no one consumed is an error naming it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use crate::driver::{self, DriverKind, OpenContext};
use crate::error::{BlockError, Result};
use crate::flags::{keys, NodeFlags};
use crate::io::executor::block_on;
use crate::io::iovec::IoVec;
use crate::node::{ChildRole, Node, NodeInfo, NodeParts};
use crate::node_name;
use crate::options::Options;
use crate::probe;

/// The set of nodes of one daemon.
#[derive(Default)]
pub struct Graph {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Every live node by name; a node leaves when its last holder drops it.
    nodes: BTreeMap<String, Weak<Node>>,
    /// Nodes added by the user (`--blockdev`, blockdev-add), kept until `blockdev_del`.
    owned: BTreeMap<String, Arc<Node>>,
}

/// What a child inherits from its parent while it is being opened.
struct Parent<'a> {
    options: &'a Options,
    flags: NodeFlags,
    role: ChildRole,
}

impl Graph {
    /// An empty graph.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every change under this lock is a single map operation, so a poisoned lock is
        // still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a node the user defined (QSD's `--blockdev`, QMP's `blockdev-add`). It needs a
    /// node-name, and lives until [`blockdev_del`](Self::blockdev_del).
    pub fn blockdev_add(&self, options: Options) -> Result<Arc<Node>> {
        if !options.contains(keys::NODE_NAME) {
            return Err(BlockError::invalid("--blockdev needs a 'node-name'"));
        }
        let node = self.open_node(options, None)?;
        self.lock()
            .owned
            .insert(node.name().to_string(), node.clone());
        Ok(node)
    }

    /// Opens a node the caller holds; it is closed when the last reference goes.
    pub fn open(&self, options: Options) -> Result<Arc<Node>> {
        self.open_node(options, None)
    }

    /// Opens an image file: the format is given, or probed (with a warning for raw).
    pub fn open_image(
        &self,
        filename: &str,
        format: Option<&str>,
        read_only: bool,
    ) -> Result<Arc<Node>> {
        let mut options = Options::new();
        options.set("file.filename", filename);
        if let Some(format) = format {
            options.set(keys::DRIVER, format);
        }
        if read_only {
            options.set(keys::READ_ONLY, "on");
        }
        self.open(options)
    }

    /// The live node with this name.
    pub fn find(&self, name: &str) -> Option<Arc<Node>> {
        self.lock().nodes.get(name).and_then(Weak::upgrade)
    }

    /// Removes a user-added node that nothing else uses (QMP's `blockdev-del`).
    pub fn blockdev_del(&self, name: &str) -> Result<()> {
        let mut inner = self.lock();
        let Some(node) = inner.owned.get(name) else {
            return Err(BlockError::invalid(
                match inner.nodes.get(name).and_then(Weak::upgrade) {
                    Some(_) => format!("Node '{name}' is not owned by the monitor"),
                    None => format!("Failed to find node with node-name='{name}'"),
                },
            ));
        };
        // One reference is `owned`'s own.
        if Arc::strong_count(node) > 1 {
            let parents = node.parents();
            return Err(BlockError::new(
                libc::EBUSY,
                if parents.is_empty() {
                    format!("Node '{name}' is in use (by an export)")
                } else {
                    let names: Vec<String> = parents.into_iter().map(|(_, p)| p).collect();
                    format!("Node '{name}' is in use by node(s) {}", names.join(", "))
                },
            ));
        }
        inner.owned.remove(name);
        inner.nodes.remove(name);
        Ok(())
    }

    /// Every live node, sorted by name.
    pub fn query(&self) -> Vec<NodeInfo> {
        let nodes: Vec<Arc<Node>> = self
            .lock()
            .nodes
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        nodes.iter().map(|n| n.info()).collect()
    }

    /// Opens or references the child in `role` for a parent being opened.
    pub(crate) fn open_child(
        &self,
        parent_remaining: &mut Options,
        parent_options: &Options,
        parent_flags: NodeFlags,
        role: ChildRole,
    ) -> Result<Arc<Node>> {
        let key = role.key();
        if let Some(reference) = parent_remaining.take(key) {
            if parent_remaining.has_prefix(key) {
                return Err(BlockError::invalid(format!(
                    "Cannot reference an existing block device ('{key}={reference}') with \
                     additional options"
                )));
            }
            let child = self.find(&reference).ok_or_else(|| {
                BlockError::new(
                    libc::ENODEV,
                    format!("Cannot find device={reference} nor node-name={reference}"),
                )
            })?;
            if role == ChildRole::File && !parent_flags.read_only && child.is_read_only() {
                return Err(BlockError::new(
                    libc::EROFS,
                    format!("Block node '{reference}' is read-only; it cannot be the writable '{key}' child"),
                ));
            }
            return Ok(child);
        }
        let child_options = parent_remaining.extract_child(key);
        if child_options.is_empty() {
            return Err(BlockError::invalid(format!(
                "A block device must be specified for \"{key}\""
            )));
        }
        self.open_node(
            child_options,
            Some(Parent {
                options: parent_options,
                flags: parent_flags,
                role,
            }),
        )
    }

    /// Opens a child from options already extracted from the parent's (a backing file).
    pub(crate) fn open_child_options(
        &self,
        child_options: Options,
        parent_options: &Options,
        parent_flags: NodeFlags,
        role: ChildRole,
    ) -> Result<Arc<Node>> {
        self.open_node(
            child_options,
            Some(Parent {
                options: parent_options,
                flags: parent_flags,
                role,
            }),
        )
    }

    fn open_node(&self, mut options: Options, parent: Option<Parent<'_>>) -> Result<Arc<Node>> {
        // json: in a filename counts as explicit options, below the ones given directly.
        if let Some(json) = options
            .get("filename")
            .and_then(|f| f.strip_prefix("json:"))
        {
            let from_json = Options::from_json_str(json)?;
            options.take("filename");
            options.join_defaults(from_json);
        }
        // snapshot=on: the node opens read-only below a temporary qcow2 overlay.
        if options.take_bool(SNAPSHOT)? == Some(true) {
            return self.open_temp_overlay(options, parent);
        }
        let explicit_options = options.clone();
        if let Some(parent) = &parent {
            inherit(&mut options, parent);
        }
        let protocol_expected = parent.as_ref().is_some_and(|p| p.role == ChildRole::File);

        let mut driver_info = match options.get(keys::DRIVER) {
            Some(name) => Some(driver::find(name)?),
            None if protocol_expected => {
                let filename = options.get("filename").ok_or_else(|| {
                    BlockError::invalid("Must specify either driver or filename for a 'file' child")
                })?;
                Some(driver::find_protocol(filename)?)
            }
            None => None,
        };
        let is_protocol = driver_info.is_some_and(|d| d.kind == DriverKind::Protocol);
        let format_filename = if is_protocol {
            None
        } else {
            options.take("filename")
        };
        if let Some(filename) = format_filename {
            // A format (or an image to probe) reads its filename through its file child.
            if options.contains("file") || options.has_prefix("file") {
                return Err(BlockError::invalid(
                    "Can't specify 'file' and 'filename' options at the same time",
                ));
            }
            options.set("file.filename", filename);
        }

        let name = match options.take(keys::NODE_NAME) {
            Some(name) => {
                node_name::validate(&name)?;
                self.check_unused(&name)?;
                name
            }
            None => node_name::generate(),
        };
        // Taken before the flags are consumed, so inherited ones (cache.direct ...) stay in the
        // node's options and reach its own children.
        let mut effective = explicit_options.clone();
        effective.join_defaults(options.clone());
        let flags = NodeFlags::take_from(&mut options)?;
        options.take(keys::DRIVER);
        let mut ctx = OpenContext {
            options,
            flags,
            probed: false,
            graph: self,
            node_name: name.clone(),
            children: Vec::new(),
            all_options: effective.clone(),
        };
        if driver_info.is_none() {
            // No format given: open the file child and guess from its first bytes.
            let file = ctx.open_child(ChildRole::File)?;
            let format = probe_file(&file)?;
            ctx.probed = format == "raw";
            driver_info = Some(driver::find(format).map_err(|_| {
                BlockError::invalid(format!(
                    "'{}' looks like a {format} image, which strata cannot open",
                    file.filename()
                ))
            })?);
            effective.set(keys::DRIVER, format);
        }
        let Some(info) = driver_info else {
            unreachable!("the driver was found or probed above")
        };
        effective.set(keys::DRIVER, info.name);
        let driver = (info.open)(&mut ctx)?;
        if let Some(key) = ctx.options.first_key() {
            return Err(BlockError::invalid(match info.kind {
                DriverKind::Protocol => {
                    format!(
                        "Block protocol '{}' doesn't support the option '{key}'",
                        info.name
                    )
                }
                DriverKind::Format => {
                    format!(
                        "Block format '{}' does not support the option '{key}'",
                        info.name
                    )
                }
            }));
        }
        let node = Node::new(NodeParts {
            name: name.clone(),
            driver_name: info.name,
            driver,
            flags: ctx.flags,
            options: effective,
            explicit_options,
            children: ctx.children,
        })?;
        let mut inner = self.lock();
        if inner.nodes.get(&name).and_then(Weak::upgrade).is_some() {
            return Err(BlockError::invalid(format!("Duplicate node name '{name}'")));
        }
        inner.nodes.insert(name, Arc::downgrade(&node));
        Ok(node)
    }

    /// QEMU's `bdrv_append_temp_snapshot`: opens the node described by `options` read-only
    /// and returns a temporary qcow2 overlay on top of it, which takes the writes. The overlay
    /// file lives in $TMPDIR and is unlinked as soon as it is open, so it disappears when the
    /// node is closed (or the process dies). The overlay takes the node-name given by the
    /// user, so exports and references find the writable node.
    fn open_temp_overlay(
        &self,
        mut options: Options,
        parent: Option<Parent<'_>>,
    ) -> Result<Arc<Node>> {
        let name = options.take(keys::NODE_NAME);
        if let Some(name) = &name {
            node_name::validate(name)?;
            self.check_unused(name)?;
        }
        let mut overlay = Options::new();
        for key in [keys::DISCARD, keys::DETECT_ZEROES] {
            if let Some(v) = options.get(key) {
                overlay.set(key, v);
            }
        }
        options.set(keys::READ_ONLY, "on");
        let base = self.open_node(options, parent)?;
        let size = base.size().div_ceil(512) * 512;
        let path = temp_overlay_path()?;
        let create = crate::driver::qcow2::create::CreateOptions {
            size,
            ..Default::default()
        };
        crate::driver::qcow2::create::create_file(&path, &create).map_err(|e| {
            e.context(format!(
                "Could not create temporary overlay '{}'",
                path.display()
            ))
        })?;
        overlay.set(keys::DRIVER, "qcow2");
        overlay.set("file.driver", "file");
        overlay.set("file.filename", path.to_string_lossy());
        overlay.set("backing", base.name());
        // For a temporary file, cache=unsafe is fine (QEMU's bdrv_temp_snapshot_options).
        overlay.set(keys::CACHE_DIRECT, "off");
        overlay.set(keys::CACHE_NO_FLUSH, "on");
        if let Some(name) = name {
            overlay.set(keys::NODE_NAME, name);
        }
        let result = self.open_node(overlay, None);
        if let Err(e) = std::fs::remove_file(&path) {
            log::warn!(
                "could not remove temporary overlay '{}': {e}",
                path.display()
            );
        }
        result
    }

    fn check_unused(&self, name: &str) -> Result<()> {
        if self.find(name).is_some() {
            return Err(BlockError::invalid(format!("Duplicate node name '{name}'")));
        }
        Ok(())
    }
}

/// The node option that puts a temporary overlay on top (`snapshot=on`).
pub const SNAPSHOT: &str = "snapshot";

/// A fresh path for a temporary overlay in $TMPDIR (QEMU's `get_tmp_filename`).
fn temp_overlay_path() -> Result<std::path::PathBuf> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir();
    for _ in 0..100 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!(
            "strata-snapshot.{}.{n}.{nanos:08x}.qcow2",
            std::process::id()
        ));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(_) => return Ok(path),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(BlockError::io(
                    &e,
                    format!("Could not get temporary filename in '{}'", dir.display()),
                ))
            }
        }
    }
    Err(BlockError::invalid("Could not get temporary filename"))
}

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

/// Applies what a child inherits in its role (QEMU's `bdrv_inherited_options` and
/// `bdrv_backing_options`): cache options unless set explicitly; the read-only state.
fn inherit(options: &mut Options, parent: &Parent<'_>) {
    options.copy_default(parent.options, keys::CACHE_DIRECT);
    options.copy_default(parent.options, keys::CACHE_NO_FLUSH);
    options.copy_default(parent.options, keys::AUTO_READ_ONLY);
    match parent.role {
        ChildRole::File => {
            options.set_default(
                keys::READ_ONLY,
                if parent.flags.read_only { "on" } else { "off" },
            );
            // The format above decides what to discard; its storage may always free space.
            options.set_default(keys::DISCARD, "unmap");
        }
        ChildRole::Backing => {
            options.set(keys::READ_ONLY, "on");
        }
    }
}

/// Reads the first bytes of a file node and names the format they look like (`raw` if none).
fn probe_file(file: &Node) -> Result<&'static str> {
    let len = file.size().min(probe::PROBE_BUF_SIZE as u64) as usize;
    let mut buf = vec![0u8; len];
    block_on(file.read(0, &[IoVec::new(&mut buf)]))?
        .map_err(|e| e.context("Could not read image for determining its format"))?;
    Ok(probe::probe_format(&buf).unwrap_or("raw"))
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
