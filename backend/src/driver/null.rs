//! The `null-co` protocol driver: no storage, for benchmarks (QEMU's names and options).

use super::{BlockDriver, DriverInfo, DriverKind, IoFuture, OpenContext, OpenFuture};
use crate::error::Result;
use crate::io::iovec::{self, IoVec};

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
    }))
}

impl BlockDriver for NullDriver {
    fn size(&self) -> u64 {
        self.size
    }

    fn filename(&self) -> String {
        "null-co://".to_string()
    }

    fn supports_discard(&self) -> bool {
        true
    }

    fn read<'a>(&'a self, _offset: u64, iov: &'a [IoVec<'a>]) -> IoFuture<'a, ()> {
        if self.read_zeroes {
            iovec::zero_iov(iov, 0);
        }
        Box::pin(Done)
    }

    fn write<'a>(&'a self, _offset: u64, _iov: &'a [IoVec<'a>]) -> IoFuture<'a, ()> {
        Box::pin(Done)
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(Done)
    }

    fn discard(&self, _offset: u64, _len: u64) -> IoFuture<'_, ()> {
        Box::pin(Done)
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _may_unmap: bool) -> IoFuture<'_, ()> {
        Box::pin(Done)
    }
}
