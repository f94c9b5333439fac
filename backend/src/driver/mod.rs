//! Block drivers: the trait a node's driver implements, and the registry that finds them.

pub mod file;
pub mod null;
pub mod qcow2;
pub mod raw;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::error::{BlockError, Result};
use crate::flags::NodeFlags;
use crate::graph::Graph;
use crate::io::iovec::IoVec;
use crate::node::{ChildRole, Node};
use crate::options::Options;

/// A boxed future of a driver operation, borrowing the driver and the request's buffers.
pub type IoFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + 'a>>;

/// Alignment and size limits of a node's requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Offsets and lengths must be multiples of this (O_DIRECT's logical block size), else the
    /// node widens the request (and read-modify-writes).
    pub request_alignment: u32,
    /// Every buffer's address and length must be a multiple of this, else the node bounces.
    pub min_mem_alignment: usize,
    /// Preferred buffer alignment.
    pub opt_mem_alignment: usize,
    /// Largest request in bytes the driver takes at once (0: no limit).
    pub max_transfer: u64,
    /// Most buffers in one request.
    pub max_iov: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            request_alignment: 1,
            min_mem_alignment: 1,
            opt_mem_alignment: 1,
            max_transfer: 0,
            max_iov: libc::UIO_MAXIOV as usize,
        }
    }
}

/// Whether a range holds data, reads as zeroes, or is not allocated in this layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatus {
    /// Data is present (in this node or below).
    pub data: bool,
    /// The range reads as zeroes.
    pub zero: bool,
    /// Length of the range this status applies to, from the queried offset.
    pub len: u64,
}

/// The operations of an open driver instance. The node around it checks bounds, read-only,
/// alignment and the discard policy before calling these, so drivers see only valid requests.
pub trait BlockDriver: Send + Sync {
    /// Size of the node in bytes.
    fn size(&self) -> u64;

    /// Request limits.
    fn limits(&self) -> Limits {
        Limits::default()
    }

    /// The filename shown in queries.
    fn filename(&self) -> String {
        String::new()
    }

    /// Whether discard reaches storage (else the node completes discards itself).
    fn supports_discard(&self) -> bool {
        false
    }

    /// Whether writes past the end extend the node (a regular file under a format driver).
    fn can_grow(&self) -> bool {
        false
    }

    /// Reads into `iov` from `offset`.
    fn read<'a>(&'a self, offset: u64, iov: &'a [IoVec<'a>]) -> IoFuture<'a, ()>;

    /// Writes `iov` at `offset`.
    fn write<'a>(&'a self, offset: u64, iov: &'a [IoVec<'a>]) -> IoFuture<'a, ()>;

    /// Makes completed writes durable.
    fn flush(&self) -> IoFuture<'_, ()>;

    /// Frees a range; afterwards it reads as zeroes or as before (the caller may not rely).
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()>;

    /// Makes a range read as zeroes; with `may_unmap` it may free the space.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> IoFuture<'_, ()>;

    /// Allocation status at `offset` (up to `len` bytes).
    fn block_status(&self, _offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        Box::pin(async move {
            Ok(BlockStatus {
                data: true,
                zero: false,
                len,
            })
        })
    }
}

/// Whether a driver is a format (interprets a child's bytes) or a protocol (reaches storage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverKind {
    /// Reads and writes an image format on its `file` child.
    Format,
    /// Talks to storage: files, devices, nothing.
    Protocol,
}

/// Everything a driver's `open` gets: its options to consume, flags, and child opening.
pub struct OpenContext<'g> {
    /// The driver's remaining options; consume what you understand.
    pub options: Options,
    /// The node's flags.
    pub flags: NodeFlags,
    /// Whether the format was found by probing (raw then guards sector 0).
    pub probed: bool,
    pub(crate) graph: &'g Graph,
    pub(crate) node_name: String,
    pub(crate) children: Vec<(ChildRole, Arc<Node>)>,
    pub(crate) all_options: Options,
}

impl OpenContext<'_> {
    /// Opens (or references) the child in `role`, from the `role` / `role.*` options.
    pub fn open_child(&mut self, role: ChildRole) -> Result<Arc<Node>> {
        // Probing opens the file child before the driver does: the driver gets that one.
        if let Some((_, child)) = self.children.iter().find(|(r, _)| *r == role) {
            return Ok(child.clone());
        }
        let child =
            self.graph
                .open_child(&mut self.options, &self.all_options, self.flags, role)?;
        self.children.push((role, child.clone()));
        Ok(child)
    }

    /// Opens the backing child of a format with backing files (QEMU's
    /// `bdrv_open_backing_file`): `backing=null` (or empty) means none, `backing=NODE`
    /// references a node, `backing.*` options define it; otherwise the image's own backing
    /// file name (relative names are resolved against the image's filename) and format
    /// (probed, with a warning, when the image does not name it) are used.
    pub fn open_backing(
        &mut self,
        backing_file: Option<&str>,
        backing_format: Option<&str>,
    ) -> Result<Option<Arc<Node>>> {
        let role = ChildRole::Backing;
        if let Some((_, child)) = self.children.iter().find(|(r, _)| *r == role) {
            return Ok(Some(child.clone()));
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
            Some(_) => return self.open_child(role).map(Some),
            None => {}
        }
        let mut child = self.options.extract_child(role.key());
        let file_given =
            child.contains("filename") || child.contains("file") || child.has_prefix("file");
        if !file_given {
            match backing_file {
                Some(name) => {
                    let image = self
                        .children
                        .iter()
                        .find(|(r, _)| *r == ChildRole::File)
                        .map(|(_, n)| n.filename())
                        .unwrap_or_default();
                    child.set(
                        "filename",
                        crate::graph::full_backing_filename(&image, name)?,
                    );
                }
                None if child.is_empty() => return Ok(None),
                None => {}
            }
        }
        let probed = backing_format.is_none() && !child.contains(crate::flags::keys::DRIVER);
        if let Some(format) = backing_format {
            child.set_default(crate::flags::keys::DRIVER, format);
        }
        let node = self
            .graph
            .open_child_options(child, &self.all_options, self.flags, role)?;
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

    /// The name of the node being opened.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }
}

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
    pub open: fn(&mut OpenContext<'_>) -> Result<Box<dyn BlockDriver>>,
}

/// Every driver strata has.
pub static DRIVERS: &[DriverInfo] = &[
    raw::DRIVER,
    qcow2::DRIVER,
    file::FILE_DRIVER,
    file::HOST_DEVICE_DRIVER,
    null::DRIVER,
];

/// Finds a driver by name.
pub fn find(name: &str) -> Result<&'static DriverInfo> {
    DRIVERS.iter().find(|d| d.name == name).ok_or_else(|| {
        let known: Vec<&str> = DRIVERS.iter().map(|d| d.name).collect();
        BlockError::invalid(format!(
            "Unknown driver '{name}' (strata has: {})",
            known.join(", ")
        ))
    })
}

/// Picks the protocol for a filename: a block device gets `host_device`, a `proto:` prefix names
/// its protocol, anything else is a `file`.
pub fn find_protocol(filename: &str) -> Result<&'static DriverInfo> {
    let best = DRIVERS
        .iter()
        .filter_map(|d| Some((d.probe_device?(filename), d)))
        .filter(|(score, _)| *score > 0)
        .max_by_key(|(score, _)| *score);
    if let Some((_, d)) = best {
        return Ok(d);
    }
    if let Some((prefix, _)) = filename.split_once(':') {
        // QEMU's path_has_protocol: a colon before any slash.
        if !prefix.contains('/') && !prefix.is_empty() {
            return DRIVERS
                .iter()
                .find(|d| d.protocol_prefix == Some(prefix))
                .ok_or_else(|| BlockError::invalid(format!("Unknown protocol '{prefix}'")));
        }
    }
    find("file")
}
