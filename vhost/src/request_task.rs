//! One request's life after parsing: its I/O on the node, then its status byte and its
//! used-ring entry.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};

use strata_backend::accounting::IoKind;
use strata_backend::io::iovec;
use strata_backend::{BlockError, IoVec, Node};

use crate::accounting::counted_as;
use crate::device_config::DeviceConfig;
use crate::request::{Op, Parsed, Segment, StatusByte, S_IOERR, S_OK};
use crate::task_ctx::{Done, HeldMem, TaskCtx};

/// Bytes per virtio sector.
const SECTOR: u64 = 512;

/// A request in flight: its I/O future, then the status write and completion.
///
/// The I/O future is stored inline (the executor boxes the whole task once).
/// Field order matters: `io` is dropped before `_mem`, so an abandoned request waits for the
/// kernel to finish with the guest buffers while their mapping is still held.
pub(crate) struct RequestTask<F> {
    io: F,
    /// Keeps the guest memory that `io` and `status` point into mapped.
    _mem: Rc<HeldMem>,
    ctx: Rc<TaskCtx>,
    status: StatusByte,
    in_len: u32,
    slot: usize,
    head: u16,
    /// The queue's epoch when the request was taken.
    epoch: u32,
    /// What the request counts as in the export's statistics, and when it was taken (the
    /// accounting clock's time).
    counted_as: Option<(IoKind, u64)>,
    started: u64,
}

/// Where a request came from: the chain at `head` of the virtqueue in `slot`, taken in its
/// `epoch` at `started` (the accounting clock's time).
#[derive(Clone, Copy)]
pub(crate) struct Origin {
    pub slot: usize,
    pub head: u16,
    pub epoch: u32,
    pub started: u64,
}

/// The task that runs `parsed`, from `origin`, whose buffers lie in `mem`.
#[inline]
pub(crate) fn request_task(
    ctx: Rc<TaskCtx>,
    mem: Rc<HeldMem>,
    parsed: Parsed,
    origin: Origin,
) -> RequestTask<impl Future<Output = u8>> {
    let Parsed { op, status, in_len } = parsed;
    let Origin {
        slot,
        head,
        epoch,
        started,
    } = origin;
    RequestTask {
        counted_as: counted_as(&op),
        started,
        io: execute(ctx.clone(), op),
        _mem: mem,
        ctx,
        status,
        in_len,
        slot,
        head,
        epoch,
    }
}

impl<F: Future<Output = u8>> Future for RequestTask<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // SAFETY: a pin projection: `io` is never moved out of the task nor accessed other
        // than through this pinned reference, and RequestTask has no Drop impl that could move
        // it; the other fields are not structurally pinned.
        let this = unsafe { self.get_unchecked_mut() };
        // SAFETY: see above; `this.io` stays where it is until the task is dropped.
        let io = unsafe { Pin::new_unchecked(&mut this.io) };
        let code = match io.poll(cx) {
            Poll::Ready(code) => code,
            Poll::Pending => return Poll::Pending,
        };
        // SAFETY: `this._mem` is the map parse found the byte in, held as long as the task.
        unsafe { this.status.write(code) };
        if let Some((kind, bytes)) = this.counted_as {
            this.ctx
                .cfg
                .stats
                .done(kind, bytes, this.started, code == S_OK);
        }
        let len = if code == S_OK { this.in_len + 1 } else { 1 };
        let done = Done {
            head: this.head,
            len,
            epoch: this.epoch,
        };
        this.ctx.finish(this.slot, done, &this._mem);
        Poll::Ready(())
    }
}

/// Runs one request on the node; returns its virtio status.
async fn execute(ctx: Rc<TaskCtx>, op: Op) -> u8 {
    let cfg = &ctx.cfg;
    let node = &cfg.node;
    let (what, result): (&str, Result<(), BlockError>) = match &op {
        Op::Read { offset, len, iov } => (
            "read",
            read_write(node, false, *offset, iov, *len, cfg).await,
        ),
        Op::Write { offset, len, iov } => {
            let mut r = read_write(node, true, *offset, iov, *len, cfg).await;
            if r.is_ok() && ctx.writethrough() {
                // Boxed, like the other rare operations below: the request task is moved into
                // its box when it starts, and inline states of these would make every task
                // (and that copy) bigger.
                r = Box::pin(node.flush()).await;
            }
            ("write", r)
        }
        Op::Flush => ("flush", Box::pin(node.flush()).await),
        Op::GetId { iov } => {
            let n = (iovec::total_len(iov) as usize).min(cfg.serial.len());
            iovec::copy_to_iov(iov, 0, &cfg.serial[..n]);
            ("get-id", Ok(()))
        }
        Op::Discard(segs) => (
            "discard",
            Box::pin(discard(node, segs, ctx.writethrough())).await,
        ),
        Op::WriteZeroes(segs) => (
            "write-zeroes",
            Box::pin(write_zeroes(node, segs, ctx.writethrough())).await,
        ),
    };
    if let Op::Read { iov, .. } | Op::Write { iov, .. } = op {
        ctx.recycle_iov(iov);
    }
    match result {
        Ok(()) => S_OK,
        Err(e) => {
            ctx.log_failure(&format!("{what} failed"), &e);
            S_IOERR
        }
    }
}

/// Discards the segments, then flushes if the device is writethrough.
async fn discard(node: &Node, segs: &[Segment], writethrough: bool) -> Result<(), BlockError> {
    for s in segs {
        node.discard(s.offset, s.len).await?;
    }
    if writethrough {
        node.flush().await?;
    }
    Ok(())
}

/// Zeroes the segments, then flushes if the device is writethrough.
async fn write_zeroes(node: &Node, segs: &[Segment], writethrough: bool) -> Result<(), BlockError> {
    for s in segs {
        node.write_zeroes(s.offset, s.len, s.unmap).await?;
    }
    if writethrough {
        node.flush().await?;
    }
    Ok(())
}

/// Reads or writes `iov` (`total` bytes) at `offset`, splitting requests the node cannot take
/// at once (more buffers than `cfg.max_iov`, more bytes than `cfg.max_transfer`).
async fn read_write(
    node: &Arc<Node>,
    write: bool,
    offset: u64,
    iov: &[IoVec<'_>],
    total: u64,
    cfg: &DeviceConfig,
) -> Result<(), BlockError> {
    let (max_iov, max_transfer) = (cfg.max_iov, cfg.max_transfer);
    let fits_bytes = max_transfer == 0 || total <= max_transfer;
    if iov.len() <= max_iov && fits_bytes {
        return if write {
            node.write(offset, iov).await
        } else {
            node.read(offset, iov).await
        };
    }
    // Boxed: rare, and kept out of the size of every request's future.
    Box::pin(read_write_split(
        node,
        write,
        offset,
        iov,
        max_iov,
        max_transfer,
    ))
    .await
}

/// The part of [`read_write`] for requests the node cannot take at once.
async fn read_write_split(
    node: &Arc<Node>,
    write: bool,
    offset: u64,
    iov: &[IoVec<'_>],
    max_iov: usize,
    max_transfer: u64,
) -> Result<(), BlockError> {
    let total = iovec::total_len(iov);
    let chunk = if max_transfer == 0 {
        total
    } else {
        (max_transfer / SECTOR * SECTOR).max(SECTOR)
    };
    let mut done = 0u64;
    while done < total {
        let n = chunk.min(total - done);
        let part = iovec::sub_iov(iov, done as usize, n as usize);
        let mut pos = offset + done;
        for group in part.chunks(max_iov) {
            if write {
                node.write(pos, group).await?;
            } else {
                node.read(pos, group).await?;
            }
            pos += iovec::total_len(group);
        }
        done += n;
    }
    Ok(())
}
