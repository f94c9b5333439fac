//! The `raw` format: the bytes of its `file` child, optionally a window (`offset`, `size`).
//!
//! When raw was chosen by probing, a write that would make sector 0 look like another format
//! is refused: otherwise a guest could turn its disk into, say, a qcow2 image naming a host
//! file as backing file, which the next probing open would follow (CVE-2008-2004).

use std::sync::Arc;

use super::{
    accept_any_reopen, BlockDriver, BlockStatus, CreateRequest, CreateTarget, DriverInfo,
    DriverKind, IoFuture, Limits, OpenContext, OpenFuture,
};
use crate::error::{BlockError, Result};
use crate::flags::NodeFlags;
use crate::io::bounce::BounceBuffer;
use crate::io::executor::block_on;
use crate::io::iovec::{self, IoVec};
use crate::node::{ChildRole, Node};
use crate::probe;

/// The `raw` driver.
pub const DRIVER: DriverInfo = DriverInfo {
    name: "raw",
    kind: DriverKind::Format,
    protocol_prefix: None,
    probe_device: None,
    open,
    create: Some(create),
};

/// Creates a sparse raw image of `size` bytes, on a new file or on an open node. Takes no
/// options.
fn create(req: CreateRequest<'_>) -> Result<Vec<(&'static str, String)>> {
    if let Some(key) = req.options.first_key() {
        return Err(BlockError::invalid(format!(
            "Invalid parameter '{key}' for file format 'raw'"
        )));
    }
    match req.target {
        CreateTarget::File(path) => create_file(path, req.size)?,
        CreateTarget::Node(node) => create_on_node(node, req.size)?,
    }
    Ok(vec![("size", req.size.to_string())])
}

/// The file, truncated to `size` bytes.
fn create_file(path: &std::path::Path, size: u64) -> Result<()> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| BlockError::io(&e, format!("Could not create '{}'", path.display())))?;
    file.set_len(size).map_err(|e| {
        BlockError::io(
            &e,
            format!("Could not resize '{}' to {size} bytes", path.display()),
        )
    })
}

/// A raw image on a node is the node's bytes: the node is emptied, then resized to `size`,
/// so that the new image reads as zeros, as a new file does. Only a node that can grow (a
/// file node on a regular file) can be resized so; a device or null-co node is refused.
fn create_on_node(node: &Node, size: u64) -> Result<()> {
    if !node.can_grow() {
        return Err(BlockError::new(
            libc::ENOTSUP,
            format!(
                "Node '{}' cannot be resized: a raw image is created only on a node that can \
                 grow (a file node on a regular file)",
                node.name()
            ),
        ));
    }
    block_on(async {
        node.truncate(0).await?;
        node.truncate(size).await
    })?
    .map_err(|e| {
        e.context(format!(
            "Could not make node '{}' a raw image of {size} bytes",
            node.name()
        ))
    })
}

/// Bytes of sector 0 checked against the format probes.
const SECTOR: u64 = 512;

/// A window on the file child.
pub struct RawDriver {
    file: Arc<Node>,
    offset: u64,
    /// The window's size when `size` was given; else the window runs to the file's end and
    /// follows it when the file is resized.
    fixed_size: Option<u64>,
    guard_sector0: bool,
}

fn open<'a>(ctx: &'a mut OpenContext<'_>) -> OpenFuture<'a> {
    Box::pin(open_raw(ctx))
}

async fn open_raw(ctx: &mut OpenContext<'_>) -> Result<Box<dyn BlockDriver>> {
    let offset = ctx.options.take_size("offset")?.unwrap_or(0);
    let size = ctx.options.take_size("size")?;
    let file = ctx.open_child(ChildRole::File).await?;
    let file_size = file.size();
    if offset > file_size {
        return Err(BlockError::invalid(format!(
            "The sum of offset ({offset}) and size (0) has to be smaller or equal to the actual \
             size of the containing file ({file_size})"
        )));
    }
    let fixed_size = match size {
        Some(size) if offset.checked_add(size).is_some_and(|end| end <= file_size) => Some(size),
        Some(size) => {
            return Err(BlockError::invalid(format!(
                "The sum of offset ({offset}) and size ({size}) has to be smaller or equal to the \
                 actual size of the containing file ({file_size})"
            )))
        }
        None => None,
    };
    if ctx.probed {
        log::warn!(
            "Image format was not specified for '{}' and probing guessed raw. Automatically \
             detecting the format is dangerous for raw images, write operations on block 0 will \
             be restricted. Specify the 'raw' format explicitly to remove the restrictions.",
            file.filename()
        );
    }
    Ok(Box::new(RawDriver {
        file,
        offset,
        fixed_size,
        guard_sector0: ctx.probed,
    }))
}

impl RawDriver {
    /// For a write into sector 0 of a guarded image: a copy of the bytes written into the
    /// first block (of the file's alignment), refused if sector 0 would probe as another
    /// format. The caller writes this copy, not the caller's buffer, which the guest may
    /// change between the check and the write. The copy is aligned for the file, so the file
    /// node does not bounce it again.
    fn checked_sector0(&self, offset: u64, iov: &[IoVec<'_>]) -> Result<Option<BounceBuffer>> {
        if !self.guard_sector0 || offset >= SECTOR {
            return Ok(None);
        }
        let block = u64::from(self.file.limits().request_alignment).max(SECTOR);
        let n = (block - offset).min(iovec::total_len(iov)) as usize;
        let mut head = BounceBuffer::new(n)?;
        iovec::copy_from_iov(iov, 0, head.as_mut_slice());
        // Only the written part of sector 0 is known here; checking it alone is what QEMU does
        // too, since every image magic sits in the first bytes.
        let mut sector0 = vec![0u8; offset as usize];
        sector0.extend_from_slice(&head.as_slice()[..n.min((SECTOR - offset) as usize)]);
        if let Some(format) = probe::probe_format(&sector0) {
            return Err(BlockError::new(
                libc::EPERM,
                format!(
                    "write to sector 0 refused: it would make the probed raw image look like \
                     {format}; give driver=raw explicitly to allow it"
                ),
            ));
        }
        Ok(Some(head))
    }

    /// Of a request of `iov` at `offset`, its length and how many of its bytes lie inside the
    /// window (before the node's end).
    fn inside(&self, offset: u64, iov: &[IoVec<'_>]) -> (u64, u64) {
        let len = iovec::total_len(iov);
        (len, self.size().saturating_sub(offset).min(len))
    }

    /// Writes `iov` at `offset` of the window, dropping what lies past its end.
    async fn write_window(&self, offset: u64, iov: &[IoVec<'_>]) -> Result<()> {
        let (len, keep) = self.inside(offset, iov);
        if keep == len {
            return self.file.write(self.offset + offset, iov).await;
        }
        let part = iovec::sub_iov(iov, 0, keep as usize);
        self.file.write(self.offset + offset, &part).await
    }
}

impl BlockDriver for RawDriver {
    fn size(&self) -> u64 {
        self.fixed_size
            .unwrap_or_else(|| self.file.size().saturating_sub(self.offset))
    }

    fn truncate(&self, size: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.fixed_size.is_some() {
                return Err(BlockError::new(
                    libc::ENOTSUP,
                    "Cannot resize fixed-size raw disks",
                ));
            }
            let file_size = self.offset.checked_add(size).ok_or_else(|| {
                BlockError::invalid(format!(
                    "size {size} is too large at offset {}",
                    self.offset
                ))
            })?;
            self.file.truncate(file_size).await
        })
    }

    fn limits(&self) -> Limits {
        Limits {
            // As in QEMU's raw_refresh_limits: a probed image works in whole sectors, so a write
            // into sector 0 always shows check_sector0 the complete new sector (the node
            // read-modify-writes partial ones, serialised), and the magic cannot be assembled
            // from several small writes. In whole blocks of the file, with its memory
            // alignment: what this node bounces then goes down as it is, never bounced twice
            // (which would copy again and hold two buffers of the thread's budget at once).
            request_alignment: if self.guard_sector0 {
                self.file.limits().request_alignment.max(SECTOR as u32)
            } else {
                1
            },
            min_mem_alignment: if self.guard_sector0 {
                self.file.limits().min_mem_alignment
            } else {
                1
            },
            max_transfer: self.file.limits().max_transfer,
            max_iov: self.file.limits().max_iov,
            ..Limits::default()
        }
    }

    // raw holds no file of its own: read-only and cache.direct are its file child's to
    // apply (a reopen lists that node too), so any change is fine here.
    fn reopen_prepare<'a>(&'a self, _old: &NodeFlags, _new: &NodeFlags) -> IoFuture<'a, ()> {
        accept_any_reopen()
    }

    fn supports_discard(&self) -> bool {
        self.file.discard_enabled()
    }

    fn read<'a>(&'a self, offset: u64, iov: &'a [IoVec<'a>]) -> IoFuture<'a, ()> {
        Box::pin(async move {
            // Sector-widened requests may reach past a size that is not a multiple of 512:
            // that part reads as zeroes.
            let (len, keep) = self.inside(offset, iov);
            if keep == len {
                return self.file.read(self.offset + offset, iov).await;
            }
            iovec::zero_iov(iov, keep as usize);
            let part = iovec::sub_iov(iov, 0, keep as usize);
            self.file.read(self.offset + offset, &part).await
        })
    }

    fn write<'a>(&'a self, offset: u64, iov: &'a [IoVec<'a>]) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let Some(mut head) = self.checked_sector0(offset, iov)? else {
                return self.write_window(offset, iov).await;
            };
            // The checked copy of sector 0 first, then the rest from the caller's buffers.
            let n = head.as_slice().len();
            self.write_window(offset, &[head.iovec()]).await?;
            let len = iovec::total_len(iov);
            if len > n as u64 {
                let rest = iovec::sub_iov(iov, n, (len - n as u64) as usize);
                self.write_window(offset + n as u64, &rest).await?;
            }
            Ok(())
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(self.file.flush())
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(self.file.discard(self.offset + offset, len))
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> IoFuture<'_, ()> {
        Box::pin(self.file.write_zeroes(self.offset + offset, len, may_unmap))
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        Box::pin(self.file.block_status(self.offset + offset, len))
    }
}
