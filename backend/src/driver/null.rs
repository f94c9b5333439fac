//! The `null-co` protocol driver: no storage, for benchmarks (QEMU's names and options).

use io_uring::{opcode, types};

use super::{
    accept_any_reopen, BlockDriver, DriverInfo, DriverKind, IoFuture, OpenContext, OpenFuture,
};
use crate::error::{BlockError, Result};
use crate::flags::NodeFlags;
use crate::io::iovec::{self, IoVec};
use crate::io::reactor::Reactor;

/// The `null-co` driver.
pub const DRIVER: DriverInfo = DriverInfo {
    name: "null-co",
    kind: DriverKind::Protocol,
    protocol_prefix: Some("null-co"),
    probe_device: None,
    open,
    create: None,
};

/// A future that is done at once with `Ok(())`. It has no fields, so boxing it as an
/// [`IoFuture`] allocates nothing (a boxed `std::future::ready` would, per request).
struct Done;

impl std::future::Future for Done {
    type Output = Result<()>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// QEMU's default size of a null node: 1 GiB.
const DEFAULT_SIZE: u64 = 1 << 30;

/// A node that stores nothing: writes vanish, reads return zeroes or leave buffers as they are.
pub struct NullDriver {
    size: u64,
    read_zeroes: bool,
    /// How long each request takes (QEMU's `latency-ns`; zero: done at once).
    latency_ns: u64,
}

fn open<'a>(ctx: &'a mut OpenContext<'_>) -> OpenFuture<'a> {
    Box::pin(std::future::ready(open_null(ctx)))
}

fn open_null(ctx: &mut OpenContext<'_>) -> Result<Box<dyn BlockDriver>> {
    // QEMU accepts a filename such as "null-co://" and ignores it.
    ctx.options.take("filename");
    Ok(Box::new(NullDriver {
        size: ctx.options.take_size("size")?.unwrap_or(DEFAULT_SIZE),
        read_zeroes: ctx.options.take_bool("read-zeroes")?.unwrap_or(false),
        latency_ns: ctx.options.take_u64("latency-ns")?.unwrap_or(0),
    }))
}

impl NullDriver {
    /// A request's completion: at once, or after `latency_ns` on an io_uring timeout (the
    /// worker's thread goes on with other requests meanwhile, as QEMU's timer does).
    fn done(&self) -> IoFuture<'_, ()> {
        if self.latency_ns == 0 {
            return Box::pin(Done);
        }
        let latency = self.latency_ns;
        Box::pin(async move {
            let ts = types::Timespec::new()
                .sec(latency / 1_000_000_000)
                .nsec((latency % 1_000_000_000) as u32);
            let reactor = Reactor::current()?;
            // SAFETY: the entry points at `ts`, a local of this future that lives until the
            // operation completes: the `.await` below, or the operation's drop, which waits
            // for the kernel.
            let res = unsafe { reactor.op(opcode::Timeout::new(&ts).build()) }.await?;
            // A timeout that expires completes with ETIME.
            if res < 0 && res != -libc::ETIME {
                let e = std::io::Error::from_raw_os_error(-res);
                return Err(BlockError::io(&e, "null-co latency timer failed"));
            }
            Ok(())
        })
    }
}

impl BlockDriver for NullDriver {
    fn size(&self) -> u64 {
        self.size
    }

    fn filename(&self) -> String {
        "null-co://".to_string()
    }

    // Nothing is opened: any flag can change.
    fn reopen_prepare<'a>(&'a self, _old: &NodeFlags, _new: &NodeFlags) -> IoFuture<'a, ()> {
        accept_any_reopen()
    }

    fn supports_discard(&self) -> bool {
        true
    }

    fn read<'a>(&'a self, _offset: u64, iov: &'a [IoVec<'a>]) -> IoFuture<'a, ()> {
        if self.read_zeroes {
            iovec::zero_iov(iov, 0);
        }
        self.done()
    }

    fn write<'a>(&'a self, _offset: u64, _iov: &'a [IoVec<'a>]) -> IoFuture<'a, ()> {
        self.done()
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        self.done()
    }

    fn discard(&self, _offset: u64, _len: u64) -> IoFuture<'_, ()> {
        self.done()
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _may_unmap: bool) -> IoFuture<'_, ()> {
        self.done()
    }
}
