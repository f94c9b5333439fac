//! The `rbd` protocol driver: a Ceph RBD image through librbd, with QEMU 7.2's options
//! (BlockdevOptionsRbd): `pool`, `image`, `namespace`, `snapshot`, `conf`, `user`,
//! `key-secret`, `auth-client-required`, `server`.

mod connect;
mod ffi;
mod image;

use std::sync::{Arc, OnceLock};

use connect::{Cluster, ConnectOptions};
use image::Image;

use super::{BlockDriver, DriverInfo, DriverKind, IoFuture, OpenContext, OpenFuture};
use crate::error::{BlockError, Result};
use crate::io::blocking::run_blocking;
use crate::io::iovec::{self, IoVec};
use crate::options::Options;

/// The `rbd` driver.
pub const DRIVER: DriverInfo = DriverInfo {
    name: "rbd",
    kind: DriverKind::Protocol,
    protocol_prefix: None,
    probe_device: None,
    open,
    create: None,
};

/// Why new rbd nodes are refused, once something made connecting impossible (the sandbox).
static REFUSAL: OnceLock<&'static str> = OnceLock::new();

/// From now on, opening an rbd node fails at once with `reason` instead of connecting.
/// The daemon calls this as it enters its sandbox: librados would then be refused reading
/// its configuration and keyring, and its threads the calls they need, so an open would fail
/// with a misleading "No such file or directory" on a file that exists. The first reason
/// given stays.
pub fn refuse_opens(reason: &'static str) {
    let _ = REFUSAL.set(reason);
}

/// An open rbd node.
pub struct RbdDriver {
    image: Arc<Image>,
    filename: String,
}

fn open<'a>(ctx: &'a mut OpenContext<'_>) -> OpenFuture<'a> {
    Box::pin(async move {
        if let Some(reason) = REFUSAL.get() {
            return Err(BlockError::new(libc::ENOTSUP, format!("rbd: {reason}")));
        }
        let (mut connect, name, snapshot) = take_options(&mut ctx.options)?;
        connect.rbd_cache = !ctx.flags.cache_direct;
        if snapshot.is_some() && !ctx.flags.read_only {
            // QEMU's bdrv_apply_auto_read_only: snapshots are read-only.
            if !ctx.flags.auto_read_only {
                return Err(BlockError::new(
                    libc::EINVAL,
                    "rbd snapshots are always read-only (give read-only=on)",
                ));
            }
            ctx.flags.read_only = true;
        }
        let mut filename = format!("rbd:{}/", connect.pool);
        if let Some(ns) = &connect.namespace {
            filename.push_str(&format!("{ns}/"));
        }
        filename.push_str(&name);
        if let Some(s) = &snapshot {
            filename.push_str(&format!("@{s}"));
        }
        let read_only = ctx.flags.read_only;
        let describe = filename.clone();
        // librados connects and librbd opens with blocking calls (bounded by the timeouts):
        // on a helper thread, so the caller's thread keeps serving.
        let image = run_blocking(move || {
            let cluster = Cluster::connect(&connect)?;
            Image::open(cluster, &name, snapshot.as_deref(), read_only, &describe)
        })
        .await??;
        Ok(Box::new(RbdDriver { image, filename }) as Box<dyn BlockDriver>)
    })
}

/// Takes the rbd options: the connection's, the image name and the snapshot.
fn take_options(o: &mut Options) -> Result<(ConnectOptions, String, Option<String>)> {
    // QEMU ignores a filename on a blockdev-add with the structured options.
    if o.take("filename").is_some() {
        return Err(BlockError::invalid(
            "rbd: give pool= and image= (the rbd: filename syntax is not supported)",
        ));
    }
    let pool = o
        .take("pool")
        .ok_or_else(|| BlockError::invalid("Parameter 'pool' is missing"))?;
    let name = o
        .take("image")
        .ok_or_else(|| BlockError::invalid("Parameter 'image' is missing"))?;
    let key = o
        .take("key-secret")
        .map(|id| crate::secret::lookup(&id))
        .transpose()?;
    Ok((
        ConnectOptions {
            conf: o.take("conf"),
            user: o.take("user"),
            key,
            auth_client_required: take_list(o, "auth-client-required", |item| {
                let mode = item
                    .take("")
                    .ok_or_else(|| BlockError::invalid("auth-client-required: empty entry"))?;
                match mode.as_str() {
                    "cephx" | "none" => Ok(mode),
                    other => Err(BlockError::invalid(format!(
                        "auth-client-required: '{other}' is not cephx or none"
                    ))),
                }
            })?
            .map(|modes| modes.join(";")),
            mon_host: take_list(o, "server", |item| {
                let host = item
                    .take("host")
                    .ok_or_else(|| BlockError::invalid("server: an entry has no host"))?;
                let port = item
                    .take("port")
                    .ok_or_else(|| BlockError::invalid("server: an entry has no port"))?;
                // An IPv6 address is written in brackets, as Ceph reads it.
                Ok(if host.contains(':') {
                    format!("[{host}]:{port}")
                } else {
                    format!("{host}:{port}")
                })
            })?
            .map(|hosts| hosts.join(";")),
            pool,
            namespace: o.take("namespace").filter(|n| !n.is_empty()),
            rbd_cache: true,
        },
        name,
        o.take("snapshot"),
    ))
}

/// Takes the list `key.0...`, `key.1...`: each entry's options (a plain `key.N=value` entry
/// is under the empty key) mapped by `item`; None when the list is absent.
fn take_list(
    o: &mut Options,
    key: &str,
    item: impl Fn(&mut Options) -> Result<String>,
) -> Result<Option<Vec<String>>> {
    let mut list = o.extract_child(key);
    if list.is_empty() {
        return Ok(None);
    }
    let mut out = Vec::new();
    for i in 0.. {
        let index = i.to_string();
        let mut entry = list.extract_child(&index);
        if let Some(value) = list.take(&index) {
            entry.set("", value);
        }
        if entry.is_empty() {
            break;
        }
        out.push(item(&mut entry)?);
        if let Some(extra) = entry.first_key() {
            return Err(BlockError::invalid(format!(
                "{key}.{i}: Invalid parameter '{extra}'"
            )));
        }
    }
    if let Some(extra) = list.first_key() {
        return Err(BlockError::invalid(format!(
            "{key}: Invalid parameter '{extra}'"
        )));
    }
    Ok(Some(out))
}

impl RbdDriver {
    /// Runs one request and maps a failure to an error saying what failed.
    async fn request(
        &self,
        what: &'static str,
        offset: u64,
        start: impl FnOnce(ffi::Image, ffi::Completion) -> i32,
    ) -> Result<()> {
        // SAFETY: `start` hands librbd only buffers borrowed by the caller's future, which
        // awaits (or, dropped, waits for) the request.
        let r = unsafe { self.image.run(start) }?.await;
        if r < 0 {
            return Err(BlockError::from_errno(
                -(r as i32),
                format!(
                    "rbd: {what} at offset {offset} of '{}' failed",
                    self.filename
                ),
            ));
        }
        Ok(())
    }
}

impl BlockDriver for RbdDriver {
    fn size(&self) -> u64 {
        self.image.size()
    }

    fn remote(&self) -> bool {
        true
    }

    fn filename(&self) -> String {
        self.filename.clone()
    }

    fn supports_discard(&self) -> bool {
        true
    }

    fn can_grow(&self) -> bool {
        // A format on rbd allocates past the image's end (qcow2's clusters): the image grows
        // for such writes, as QEMU's rbd driver does.
        true
    }

    fn truncate(&self, size: u64) -> IoFuture<'_, ()> {
        let image = self.image.clone();
        Box::pin(async move { run_blocking(move || image.resize(size)).await? })
    }

    fn read<'a>(&'a self, offset: u64, iov: &'a [IoVec<'a>]) -> IoFuture<'a, ()> {
        Box::pin(self.request("read", offset, move |image, comp| {
            let raw = iovec::as_raw(iov);
            // SAFETY: the iovecs and their buffers are borrowed for the request (see run).
            unsafe { ffi::rbd_aio_readv(image, raw.as_ptr(), raw.len() as i32, offset, comp) }
        }))
    }

    fn write<'a>(&'a self, offset: u64, iov: &'a [IoVec<'a>]) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let end = offset.saturating_add(iovec::total_len(iov));
            if end > self.image.size() {
                let image = self.image.clone();
                run_blocking(move || image.grow_to(end)).await??;
            }
            self.request("write", offset, move |image, comp| {
                let raw = iovec::as_raw(iov);
                // SAFETY: as in read.
                unsafe { ffi::rbd_aio_writev(image, raw.as_ptr(), raw.len() as i32, offset, comp) }
            })
            .await
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(self.request("flush", 0, |image, comp| {
            // SAFETY: a flush references no memory.
            unsafe { ffi::rbd_aio_flush(image, comp) }
        }))
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(self.request("discard", offset, move |image, comp| {
            // SAFETY: a discard references no memory.
            unsafe { ffi::rbd_aio_discard(image, offset, len, comp) }
        }))
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> IoFuture<'_, ()> {
        // librbd's write-zeroes deallocates whole objects and zeroes the rest, whatever the
        // caller allows: reads return zeroes either way.
        Box::pin(self.request("write-zeroes", offset, move |image, comp| {
            // SAFETY: a zero write references no memory.
            unsafe { ffi::rbd_aio_write_zeroes(image, offset, len, comp, 0, 0) }
        }))
    }
}
