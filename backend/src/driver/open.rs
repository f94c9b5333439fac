//! How a driver is described to the registry and opened: [`DriverInfo`] (name, kind, open and
//! create hooks) and [`OpenContext`], which hands a driver its options and opens its children
//! through the small [`ChildOpener`] interface that the graph implements.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use super::api::{BlockDriver, FileId};
use super::backing_policy::{chain_root, BackingPolicy};
use crate::error::{BlockError, Result};
use crate::filename::full_backing_filename;
use crate::flags::{keys, NodeFlags};
use crate::node::{ChildRole, Node};
use crate::options::Options;

/// Most images in one backing chain, the top included.
pub const MAX_BACKING_CHAIN: usize = 128;

/// The future of a driver's open.
pub type OpenFuture<'a> = Pin<Box<dyn Future<Output = Result<Box<dyn BlockDriver>>> + 'a>>;

/// The future of opening a node.
pub type NodeFuture<'a> = Pin<Box<dyn Future<Output = Result<Arc<Node>>> + 'a>>;

/// Whether a driver is a format (interprets a child's bytes) or a protocol (reaches storage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverKind {
    /// Reads and writes an image format on its `file` child.
    Format,
    /// Talks to storage: files, devices, nothing.
    Protocol,
}

/// Where a new image is written.
pub enum CreateTarget<'a> {
    /// A file: created if missing, truncated if present (as qemu-img does).
    File(&'a Path),
    /// An open node (QMP's `blockdev-create` on a `file` node, as QEMU's qcow2 does): the image
    /// is written from its start, and a file that can shrink is cut to the image's length.
    Node(&'a Node),
}

/// What a new image is made of (`img create`, temporary overlays, `blockdev-create`).
pub struct CreateRequest<'a> {
    /// Where the image goes.
    pub target: CreateTarget<'a>,
    /// Virtual size in bytes.
    pub size: u64,
    /// Format options, qemu-img's `-o` keys (`cluster_size`, `backing_file`, `backing_fmt`,
    /// ...); the hook consumes what it understands, and a key left over is an error.
    pub options: Options,
}

/// Creates an image; returns the effective format options in qemu-img's order, for its
/// `Formatting '...', fmt=... key=value ...` line.
pub type CreateFn = fn(CreateRequest<'_>) -> Result<Vec<(&'static str, String)>>;

/// A driver in the registry.
pub struct DriverInfo {
    /// Name used in `driver=`.
    pub name: &'static str,
    /// Format or protocol.
    pub kind: DriverKind,
    /// The `proto:` filename prefix selecting this protocol, if any.
    pub protocol_prefix: Option<&'static str>,
    /// Scores a filename as a host device (highest wins; 0: not mine).
    pub probe_device: Option<fn(&str) -> u32>,
    /// Opens an instance.
    pub open: for<'a> fn(&'a mut OpenContext<'_>) -> OpenFuture<'a>,
    /// Creates an image of this format, for formats that can.
    pub create: Option<CreateFn>,
}

/// What a child inherits from the parent being opened (QEMU's per-role inheritance).
#[derive(Clone)]
pub struct ParentOptions {
    /// The parent's effective options.
    pub options: Options,
    /// The parent's flags.
    pub flags: NodeFlags,
    /// The role the child plays for the parent.
    pub role: ChildRole,
    /// For a backing child: the chain of images above it.
    pub backing_chain: BackingChain,
}

/// The images above a backing file in its chain.
#[derive(Debug, Clone, Default)]
pub struct BackingChain {
    /// Their files, top first (a repeated one is a loop).
    pub files: Vec<FileId>,
    /// The directory image-named backing files of this chain may lie under (see
    /// [`BackingPolicy`]); None for the top image, whose own directory it becomes.
    pub root: Option<PathBuf>,
}

/// What a driver's open may ask of the graph: existing nodes, and new child nodes.
pub trait ChildOpener {
    /// The live node with this name.
    fn find(&self, name: &str) -> Option<Arc<Node>>;

    /// Opens a new node from `options` as the child of `parent`.
    fn open_child_node(&self, options: Options, parent: ParentOptions) -> NodeFuture<'_>;

    /// Which backing files images may name.
    fn backing_policy(&self) -> &BackingPolicy;

    /// Whether `driver` is an image format (not a protocol).
    fn is_format(&self, driver: &str) -> bool;
}

/// Everything a driver's `open` gets: its options to consume, flags, and child opening.
pub struct OpenContext<'g> {
    /// The driver's remaining options; consume what you understand.
    pub options: Options,
    /// The node's flags.
    pub flags: NodeFlags,
    /// Whether the format was found by probing (raw then guards sector 0).
    pub probed: bool,
    pub(crate) opener: &'g dyn ChildOpener,
    pub(crate) node_name: String,
    pub(crate) children: Vec<(ChildRole, Arc<Node>)>,
    /// The node's effective options, which its children inherit from.
    pub(crate) all_options: Options,
    /// The images above this one in a backing chain.
    pub(crate) backing_chain: BackingChain,
}

impl OpenContext<'_> {
    /// The name of the node being opened.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    fn existing_child(&self, role: ChildRole) -> Option<Arc<Node>> {
        self.children
            .iter()
            .find(|(r, _)| *r == role)
            .map(|(_, n)| n.clone())
    }

    fn inherited(&self, role: ChildRole) -> ParentOptions {
        ParentOptions {
            options: self.all_options.clone(),
            flags: self.flags,
            role,
            backing_chain: BackingChain::default(),
        }
    }

    /// The backing chain a backing child of this image continues: refuses a file that is
    /// already in it (a loop, which would open images without end) and chains deeper than
    /// [`MAX_BACKING_CHAIN`].
    fn backing_chain_below(&self) -> Result<Vec<FileId>> {
        let image = self.existing_child(ChildRole::File);
        let mut chain = self.backing_chain.files.clone();
        if let Some(id) = image.as_ref().and_then(|f| f.file_id()) {
            if chain.contains(&id) {
                return Err(BlockError::invalid(format!(
                    "Backing chain loop: image '{}' is its own backing file (directly or \
                     through other images)",
                    image.map(|f| f.filename()).unwrap_or_default()
                )));
            }
            chain.push(id);
        }
        if chain.len() >= MAX_BACKING_CHAIN {
            return Err(BlockError::invalid(format!(
                "Backing chain of '{}' is deeper than {MAX_BACKING_CHAIN} images",
                image.map(|f| f.filename()).unwrap_or_default()
            )));
        }
        Ok(chain)
    }

    /// The options of the backing file `name` that this image names, as the graph's
    /// [`BackingPolicy`] allows them; also the chain root for the images below.
    fn image_named_backing(
        &self,
        child: &mut Options,
        name: &str,
        format: Option<&str>,
    ) -> Result<Option<PathBuf>> {
        let image = self
            .existing_child(ChildRole::File)
            .map(|n| n.filename())
            .unwrap_or_default();
        let policy = self.opener.backing_policy();
        if policy.trust_images {
            child.set("filename", full_backing_filename(&image, name)?);
            return Ok(None);
        }
        let root = match &self.backing_chain.root {
            Some(root) => root.clone(),
            None => chain_root(&image)?,
        };
        let allowed = policy.check(&image, name, format, &root, |d| self.opener.is_format(d))?;
        // A plain file, by its resolved path: never a device or protocol the name could pick.
        child.set("file.driver", "file");
        child.set("file.filename", allowed.path.to_string_lossy());
        Ok(Some(root))
    }

    /// Opens (or references) the child in `role`, from the `role` / `role.*` options.
    pub async fn open_child(&mut self, role: ChildRole) -> Result<Arc<Node>> {
        // Probing opens the file child before the driver does: the driver gets that one.
        if let Some(child) = self.existing_child(role) {
            return Ok(child);
        }
        let key = role.key();
        let child = match self.options.take(key) {
            Some(reference) => self.reference(role, &reference)?,
            None => {
                let child_options = self.options.extract_child(key);
                if child_options.is_empty() {
                    return Err(BlockError::invalid(format!(
                        "A block device must be specified for \"{key}\""
                    )));
                }
                let parent = self.inherited(role);
                self.opener.open_child_node(child_options, parent).await?
            }
        };
        self.children.push((role, child.clone()));
        Ok(child)
    }

    /// The existing node `reference` as the child in `role` (`file=NODE`).
    fn reference(&self, role: ChildRole, reference: &str) -> Result<Arc<Node>> {
        let key = role.key();
        if self.options.has_prefix(key) {
            return Err(BlockError::invalid(format!(
                "Cannot reference an existing block device ('{key}={reference}') with \
                 additional options"
            )));
        }
        let child = self.opener.find(reference).ok_or_else(|| {
            BlockError::new(
                libc::ENODEV,
                format!("Cannot find device={reference} nor node-name={reference}"),
            )
        })?;
        if role == ChildRole::File && !self.flags.read_only && child.is_read_only() {
            return Err(BlockError::new(
                libc::EROFS,
                format!(
                    "Block node '{reference}' is read-only; it cannot be the writable '{key}' child"
                ),
            ));
        }
        Ok(child)
    }

    /// Opens the backing child of a format with backing files (QEMU's
    /// `bdrv_open_backing_file`): `backing=null` (or empty) means none, `backing=NODE`
    /// references a node, `backing.*` options define it; otherwise the image's own backing
    /// file name (relative names are resolved against the image's filename) and format
    /// (probed, with a warning, when the image does not name it) are used.
    pub async fn open_backing(
        &mut self,
        backing_file: Option<&str>,
        backing_format: Option<&str>,
    ) -> Result<Option<Arc<Node>>> {
        let role = ChildRole::Backing;
        if let Some(child) = self.existing_child(role) {
            return Ok(Some(child));
        }
        match self.options.get(role.key()) {
            Some("" | "null") => {
                if self.options.has_prefix(role.key()) {
                    return Err(BlockError::invalid(
                        "Cannot give 'backing=null' together with 'backing.*' options",
                    ));
                }
                self.options.take(role.key());
                return Ok(None);
            }
            Some(_) => return self.open_child(role).await.map(Some),
            None => {}
        }
        let mut child = self.options.extract_child(role.key());
        let file_given =
            child.contains("filename") || child.contains("file") || child.has_prefix("file");
        let mut root = None;
        if !file_given {
            match backing_file {
                Some(name) => root = self.image_named_backing(&mut child, name, backing_format)?,
                None if child.is_empty() => return Ok(None),
                None => {}
            }
        }
        let probed = backing_format.is_none() && !child.contains(keys::DRIVER);
        if let Some(format) = backing_format {
            child.set_default(keys::DRIVER, format);
        }
        let mut parent = self.inherited(role);
        parent.backing_chain = BackingChain {
            files: self.backing_chain_below()?,
            root,
        };
        let node = self.opener.open_child_node(child, parent).await?;
        if probed && backing_file.is_some() {
            log::warn!(
                "Backing file format of '{}' not specified; probed as '{}'. Give the format \
                 (qemu-img rebase -F, or strata img create -F) to avoid probing",
                node.filename(),
                node.driver_name()
            );
        }
        self.children.push((role, node.clone()));
        Ok(Some(node))
    }
}
