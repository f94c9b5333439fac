//! Opening a node from options, as QEMU's `bdrv_open_inherit` does: `json:` filenames are
//! merged under the explicit options, a child inherits cache options per role, a missing
//! format is probed from the file child's first bytes, `snapshot=on` puts a temporary overlay
//! on top, and any option no one consumed is an error naming it.

use std::sync::{Arc, Weak};

use super::Graph;
use crate::driver::{
    BackingPolicy, ChildOpener, CreateRequest, CreateTarget, DriverKind, NodeFuture, OpenContext,
    ParentOptions,
};
use crate::error::{BlockError, Result};
use crate::flags::{keys, NodeFlags};
use crate::io::iovec::IoVec;
use crate::node::{ChildRole, Node, NodeParts};
use crate::node_name;
use crate::options::Options;
use crate::{probe, registry};

impl ChildOpener for Graph {
    fn find(&self, name: &str) -> Option<Arc<Node>> {
        Graph::find(self, name)
    }

    fn open_child_node(&self, options: Options, parent: ParentOptions) -> NodeFuture<'_> {
        self.open_node(options, Some(parent))
    }

    fn backing_policy(&self) -> &BackingPolicy {
        &self.backing_policy
    }

    fn is_format(&self, driver: &str) -> bool {
        registry::find(driver).is_ok_and(|d| d.kind == DriverKind::Format)
    }
}

impl Graph {
    /// Opens a node (boxed: opening recurses into children).
    pub(super) fn open_node(
        &self,
        options: Options,
        parent: Option<ParentOptions>,
    ) -> NodeFuture<'_> {
        Box::pin(self.open_node_inner(options, parent))
    }

    async fn open_node_inner(
        &self,
        mut options: Options,
        parent: Option<ParentOptions>,
    ) -> Result<Arc<Node>> {
        // json: in a filename counts as explicit options, below the ones given directly.
        if let Some(json) = options
            .get("filename")
            .and_then(|f| f.strip_prefix("json:"))
        {
            let from_json = Options::from_json_str(json)?;
            options.take("filename");
            options.join_defaults(from_json);
        }
        // snapshot=on: the node opens read-only below a temporary qcow2 overlay. For rbd,
        // `snapshot` is the driver's own option: the image snapshot to open (QEMU's too).
        let driver_snapshot = options.get(keys::DRIVER) == Some(crate::driver::rbd::DRIVER.name);
        if !driver_snapshot && options.take_bool(SNAPSHOT)? == Some(true) {
            return self.open_temp_overlay(options, parent).await;
        }
        let explicit_options = options.clone();
        if let Some(parent) = &parent {
            inherit(&mut options, parent);
        }
        let protocol_expected = parent.as_ref().is_some_and(|p| p.role == ChildRole::File);
        let backing_chain = parent.map(|p| p.backing_chain).unwrap_or_default();

        let mut driver_info = match options.get(keys::DRIVER) {
            Some(name) => Some(registry::find(name)?),
            None if protocol_expected => {
                let filename = options.get("filename").ok_or_else(|| {
                    BlockError::invalid("Must specify either driver or filename for a 'file' child")
                })?;
                Some(registry::find_protocol(filename)?)
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
            opener: self,
            node_name: name.clone(),
            children: Vec::new(),
            all_options: effective.clone(),
            backing_chain,
        };
        if driver_info.is_none() {
            // No format given: open the file child and guess from its first bytes.
            let file = ctx.open_child(ChildRole::File).await?;
            let format = probe_file(&file).await?;
            ctx.probed = format == "raw";
            driver_info = Some(registry::find(format).map_err(|_| {
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
        let driver = (info.open)(&mut ctx).await?;
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
    async fn open_temp_overlay(
        &self,
        mut options: Options,
        parent: Option<ParentOptions>,
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
        let base = self.open_node(options, parent).await?;
        let size = base.size().div_ceil(512) * 512;
        let path = temp_overlay_path()?;
        let request = CreateRequest {
            target: CreateTarget::File(&path),
            size,
            options: Options::new(),
        };
        registry::create(TEMP_OVERLAY_FORMAT, request).map_err(|e| {
            e.context(format!(
                "Could not create temporary overlay '{}'",
                path.display()
            ))
        })?;
        overlay.set(keys::DRIVER, TEMP_OVERLAY_FORMAT);
        overlay.set("file.driver", "file");
        overlay.set("file.filename", path.to_string_lossy());
        overlay.set("backing", base.name());
        // For a temporary file, cache=unsafe is fine (QEMU's bdrv_temp_snapshot_options).
        overlay.set(keys::CACHE_DIRECT, "off");
        overlay.set(keys::CACHE_NO_FLUSH, "on");
        if let Some(name) = name {
            overlay.set(keys::NODE_NAME, name);
        }
        let result = self.open_node(overlay, None).await;
        if let Err(e) = std::fs::remove_file(&path) {
            log::warn!(
                "could not remove temporary overlay '{}': {e}",
                path.display()
            );
        }
        result
    }
}

/// The node option that puts a temporary overlay on top (`snapshot=on`).
pub const SNAPSHOT: &str = "snapshot";

/// The format of `snapshot=on` overlays (QEMU's too): it has backing files.
const TEMP_OVERLAY_FORMAT: &str = "qcow2";

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

/// Applies what a child inherits in its role (QEMU's `bdrv_inherited_options` and
/// `bdrv_backing_options`): cache options unless set explicitly; the read-only state.
fn inherit(options: &mut Options, parent: &ParentOptions) {
    options.copy_default(&parent.options, keys::CACHE_DIRECT);
    options.copy_default(&parent.options, keys::CACHE_NO_FLUSH);
    options.copy_default(&parent.options, keys::AUTO_READ_ONLY);
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
async fn probe_file(file: &Node) -> Result<&'static str> {
    let len = file.size().min(probe::PROBE_BUF_SIZE as u64) as usize;
    let mut buf = vec![0u8; len];
    file.read(0, &[IoVec::new(&mut buf)])
        .await
        .map_err(|e| e.context("Could not read image for determining its format"))?;
    Ok(probe::probe_format(&buf).unwrap_or("raw"))
}
