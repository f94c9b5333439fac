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
/// The I/O future is stored inline (the executor keeps the whole task in a slot of its own).
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
        // The node's future is awaited here, not inside a helper's: one state machine less to
        // step through per request.
        Op::Read { offset, len, iov } => {
            let r = if fits(iov, *len, cfg) {
                node.read(*offset, iov).await
            } else {
                Box::pin(read_write_split(node, false, *offset, iov, *len, cfg)).await
            };
            ("read", r)
        }
        Op::Write { offset, len, iov } => {
            let mut r = if fits(iov, *len, cfg) {
                node.write(*offset, iov).await
            } else {
                Box::pin(read_write_split(node, true, *offset, iov, *len, cfg)).await
            };
            if r.is_ok() && ctx.writethrough() {
                // Boxed, like the other rare operations below: a task is as big as its
                // largest state, so inline states of these would make every task bigger.
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

/// Whether the node takes `iov` (`total` bytes) at once: no more buffers than `cfg.max_iov`,
/// no more bytes than `cfg.max_transfer`.
#[inline]
fn fits(iov: &[IoVec<'_>], total: u64, cfg: &DeviceConfig) -> bool {
    iov.len() <= cfg.max_iov && (cfg.max_transfer == 0 || total <= cfg.max_transfer)
}

/// Reads or writes `iov` (`total` bytes) at `offset` for a node that cannot take it at once
/// (see [`fits`]), in parts it can take. Boxed by its callers: rare, and kept out of the size
/// of every request's future.
async fn read_write_split(
    node: &Arc<Node>,
    write: bool,
    offset: u64,
    iov: &[IoVec<'_>],
    total: u64,
    cfg: &DeviceConfig,
) -> Result<(), BlockError> {
    let (max_iov, max_transfer) = (cfg.max_iov, cfg.max_transfer);
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
