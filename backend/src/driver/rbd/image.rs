//! An open rbd image and its asynchronous requests.
//!
//! Completions reach the workers through librbd's completion callback, as in QEMU: librbd
//! calls it on one of its own threads, and it stores the result and wakes the request's task,
//! which writes that worker's eventfd (the one its epoll already watches). That is one hop
//! fewer than librbd's image event notification, which a worker would have to poll, read and
//! re-arm before taking the completions.
//!
//! The worker calls librbd's `rbd_aio_*` functions itself, and with strata's inline dispatch
//! (`rbd_non_blocking_aio` off, see `connect`) librbd may call back a request it fails at once
//! before that call returns: the request is then done before its future is first polled.

use std::ffi::CString;
use std::future::Future;
use std::os::raw::{c_int, c_void};
use std::pin::Pin;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::task::AtomicWaker;

use super::connect::Cluster;
use super::ffi;
use crate::error::{BlockError, Result};

/// An open image; closed (and its cluster connection shut down) when the last reference goes.
pub struct Image {
    handle: ffi::Image,
    size: AtomicU64,
    /// Held while the image grows for a write past its end (rare: not the hot path).
    growing: Mutex<()>,
    /// Dropped after the image is closed (field order is irrelevant: Drop closes first).
    _cluster: Cluster,
}

// SAFETY: librbd image handles are thread-safe; the handle is closed only in Drop.
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

/// One request's result, shared by its future and librbd (through the completion's argument).
#[derive(Default)]
struct Request {
    done: AtomicBool,
    result: AtomicIsize,
    waker: AtomicWaker,
}

impl Image {
    /// Opens image `name` (at snapshot `snap`, read-only then) on `cluster`'s pool.
    pub fn open(
        cluster: Cluster,
        name: &str,
        snap: Option<&str>,
        read_only: bool,
        describe: &str,
    ) -> Result<Arc<Self>> {
        let c_name = CString::new(name)
            .map_err(|_| BlockError::invalid("rbd: the image name contains a NUL byte"))?;
        let c_snap = snap
            .map(CString::new)
            .transpose()
            .map_err(|_| BlockError::invalid("rbd: the snapshot name contains a NUL byte"))?;
        let snap_ptr = c_snap.as_ref().map_or(ptr::null(), |s| s.as_ptr());
        let mut handle = ptr::null_mut();
        // SAFETY: a live I/O context, NUL-terminated names (or NULL), an out-pointer to a local.
        let r = unsafe {
            if read_only {
                ffi::rbd_open_read_only(cluster.ioctx(), c_name.as_ptr(), &mut handle, snap_ptr)
            } else {
                ffi::rbd_open(cluster.ioctx(), c_name.as_ptr(), &mut handle, snap_ptr)
            }
        };
        if r < 0 {
            let what = match (-r, snap) {
                (libc::ENOENT, Some(s)) => {
                    format!("rbd: image or snapshot '{describe}' does not exist (snapshot '{s}')")
                }
                (libc::ENOENT, None) => format!("rbd: image '{describe}' does not exist"),
                _ => format!("rbd: cannot open image '{describe}'"),
            };
            return Err(BlockError::from_errno(-r, what));
        }
        // From here on, `image`'s Drop closes the handle on every error path.
        let image = Self {
            handle,
            size: AtomicU64::new(0),
            growing: Mutex::new(()),
            _cluster: cluster,
        };
        let mut size = 0;
        // SAFETY: a live image and an out-pointer to a local.
        let r = unsafe { ffi::rbd_get_size(image.handle, &mut size) };
        if r < 0 {
            return Err(BlockError::from_errno(
                -r,
                format!("rbd: cannot get the size of '{describe}'"),
            ));
        }
        image.size.store(size, Ordering::Relaxed);
        Ok(Arc::new(image))
    }

    /// The image's size as of its open or last resize here.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    /// Resizes the image (a blocking call: run it on a helper thread).
    pub fn resize(&self, size: u64) -> Result<()> {
        // SAFETY: a live image.
        let r = unsafe { ffi::rbd_resize(self.handle, size) };
        if r < 0 {
            return Err(BlockError::from_errno(
                -r,
                format!("rbd: cannot resize to {size} bytes"),
            ));
        }
        self.size.store(size, Ordering::Relaxed);
        Ok(())
    }

    /// Grows the image to at least `end` bytes, for a write past its end (blocking: run it
    /// on a helper thread). Concurrent growers take turns, and none shrinks the image.
    pub fn grow_to(&self, end: u64) -> Result<()> {
        let _turn = self.growing.lock().unwrap_or_else(|p| p.into_inner());
        if self.size() >= end {
            return Ok(());
        }
        self.resize(end)
    }

    /// Runs one asynchronous request: `start` is given the image and a completion and
    /// returns librbd's submission result. Resolves to the request's return value.
    ///
    /// # Safety
    /// Every buffer `start` hands librbd must stay valid until the returned future completes
    /// or is dropped (a drop waits for librbd to finish with it).
    pub unsafe fn run<'a>(
        self: &'a Arc<Self>,
        start: impl FnOnce(ffi::Image, ffi::Completion) -> c_int,
    ) -> Result<InFlight<'a>> {
        let request = Arc::new(Request::default());
        let arg = Arc::into_raw(request.clone()) as *mut c_void;
        let mut comp = ptr::null_mut();
        // SAFETY: an out-pointer to a local; the callback takes back the reference in `arg`.
        let r = unsafe { ffi::rbd_aio_create_completion(arg, Some(request_finished), &mut comp) };
        if r < 0 {
            // SAFETY: librbd did not take the reference made for it above.
            drop(unsafe { Arc::from_raw(arg as *const Request) });
            return Err(BlockError::from_errno(
                -r,
                "rbd: cannot create a completion",
            ));
        }
        let r = start(self.handle, comp);
        if r < 0 {
            // SAFETY: a completion that was not submitted, and the reference it would have
            // carried, both still ours.
            unsafe {
                ffi::rbd_aio_release(comp);
                drop(Arc::from_raw(arg as *const Request));
            }
            return Err(BlockError::from_errno(-r, "rbd: request refused"));
        }
        Ok(InFlight {
            _image: self,
            request,
        })
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: no request is in flight (each future waits for its own), and nothing else
        // uses the handle.
        let r = unsafe { ffi::rbd_close(self.handle) };
        if r < 0 {
            log::error!(
                "rbd: closing the image failed: {}",
                std::io::Error::from_raw_os_error(-r)
            );
        }
    }
}

/// librbd's completion callback, called once per submitted request on one of librbd's
/// threads: stores the result and wakes the request's task.
unsafe extern "C" fn request_finished(comp: ffi::Completion, arg: *mut c_void) {
    // SAFETY: `comp` is the finished completion `Image::run` created with `arg`, the reference
    // to a Request made for it there; librbd calls this once, so the reference is taken back
    // once, and the completion is released once (as QEMU's callback does).
    let request = unsafe {
        let result = ffi::rbd_aio_get_return_value(comp);
        ffi::rbd_aio_release(comp);
        let request = Arc::from_raw(arg as *const Request);
        request.result.store(result, Ordering::Relaxed);
        request
    };
    request.done.store(true, Ordering::Release);
    request.waker.wake();
}

/// A submitted request; resolves to librbd's return value (bytes, or a negative errno).
pub struct InFlight<'a> {
    /// The image outlives the request.
    _image: &'a Arc<Image>,
    request: Arc<Request>,
}

impl Future for InFlight<'_> {
    type Output = isize;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<isize> {
        let request = &self.request;
        if !request.done.load(Ordering::Acquire) {
            request.waker.register(cx.waker());
            if !request.done.load(Ordering::Acquire) {
                return Poll::Pending;
            }
        }
        Poll::Ready(request.result.load(Ordering::Relaxed))
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        // librbd may still write into the request's buffers: wait for it (a request dropped
        // before it finished is rare: a cancelled task at shutdown).
        while !self.request.done.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
