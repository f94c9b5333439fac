//! An open rbd image and its asynchronous requests.
//!
//! Completions reach the workers through librbd's image event notification: librbd queues
//! each finished request and signals the image's eventfd, which every worker thread that
//! submitted to the image watches with its io_uring (a poll, see [`Reactor::watch`]). The
//! thread whose poll fires takes the finished requests with `rbd_poll_io_events` and wakes
//! their tasks, on its own thread or another's. Nothing but librbd's lock-free completion
//! queue and atomics stands between a completion and its task.

use std::cell::RefCell;
use std::collections::HashSet;
use std::ffi::CString;
use std::future::Future;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::raw::{c_int, c_void};
use std::pin::Pin;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};

use futures::task::AtomicWaker;

use super::connect::Cluster;
use super::ffi;
use crate::error::{BlockError, Result};
use crate::io::reactor::Reactor;

/// Completions taken from librbd at once.
const POLL_BATCH: usize = 32;

/// An open image; closed (and its cluster connection shut down) when the last reference goes.
pub struct Image {
    handle: ffi::Image,
    /// librbd signals it when requests finish; watch handlers hold it open too.
    eventfd: Arc<OwnedFd>,
    /// Identifies the image in the threads' watch sets (an address could be reused).
    id: u64,
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

thread_local! {
    /// The images this thread's reactor watches.
    static WATCHED: RefCell<HashSet<u64>> = RefCell::new(HashSet::new());
}

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
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        let fd = if fd < 0 {
            let e = BlockError::last_os_error("rbd: cannot create an eventfd");
            // SAFETY: the handle was just opened and is used by nothing else.
            unsafe { ffi::rbd_close(handle) };
            return Err(e);
        } else {
            // SAFETY: a fresh descriptor that nothing else owns.
            unsafe { OwnedFd::from_raw_fd(fd) }
        };
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        let image = Self {
            handle,
            eventfd: Arc::new(fd),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            size: AtomicU64::new(0),
            growing: Mutex::new(()),
            _cluster: cluster,
        };
        // SAFETY: a live image and our own eventfd, which outlives the image's handle.
        let r = unsafe {
            ffi::rbd_set_image_notification(
                image.handle,
                image.eventfd.as_raw_fd(),
                ffi::EVENT_TYPE_EVENTFD,
            )
        };
        if r < 0 {
            return Err(BlockError::from_errno(
                -r,
                "rbd: cannot set the image's completion eventfd",
            ));
        }
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

    /// Makes this thread's reactor watch the image's eventfd, once per thread.
    fn watch_here(self: &Arc<Self>) -> Result<()> {
        let id = self.id;
        if WATCHED.with(|w| w.borrow().contains(&id)) {
            return Ok(());
        }
        let image = Arc::downgrade(self);
        let eventfd = self.eventfd.clone();
        let fd = eventfd.as_raw_fd();
        let handler = move || match Weak::upgrade(&image) {
            Some(image) => {
                image.take_completions();
                true
            }
            None => {
                // The image closed (its drop signals the eventfd to get here): stop watching.
                let _ = &eventfd;
                WATCHED.with(|w| w.borrow_mut().remove(&id));
                false
            }
        };
        Reactor::current()?.watch(fd, Box::new(handler))?;
        WATCHED.with(|w| w.borrow_mut().insert(id));
        Ok(())
    }

    /// Takes every finished request from librbd and wakes its task.
    fn take_completions(&self) {
        let mut value: u64 = 0;
        // Cleared before polling: a completion queued after this read signals again.
        // SAFETY: reads 8 bytes into a local from our own non-blocking eventfd.
        let _ = unsafe { libc::read(self.eventfd.as_raw_fd(), (&mut value as *mut u64).cast(), 8) };
        let mut comps = [ptr::null_mut(); POLL_BATCH];
        loop {
            // SAFETY: a live image and an array of POLL_BATCH completion slots.
            let n = unsafe {
                ffi::rbd_poll_io_events(self.handle, comps.as_mut_ptr(), POLL_BATCH as c_int)
            };
            let n = n.clamp(0, POLL_BATCH as c_int) as usize;
            for &comp in &comps[..n] {
                // SAFETY: a finished completion librbd handed over; its argument is the
                // reference to a Request that `run` gave it, taken back here exactly once.
                let request = unsafe {
                    let result = ffi::rbd_aio_get_return_value(comp);
                    let arg = ffi::rbd_aio_get_arg(comp);
                    ffi::rbd_aio_release(comp);
                    let request = Arc::from_raw(arg as *const Request);
                    request.result.store(result, Ordering::Relaxed);
                    request
                };
                request.done.store(true, Ordering::Release);
                request.waker.wake();
            }
            if n < POLL_BATCH {
                return;
            }
        }
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
        self.watch_here()?;
        let request = Arc::new(Request::default());
        let arg = Arc::into_raw(request.clone()) as *mut c_void;
        let mut comp = ptr::null_mut();
        // SAFETY: an out-pointer to a local; no callback (the eventfd delivers completions).
        let r = unsafe { ffi::rbd_aio_create_completion(arg, None, &mut comp) };
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
            image: self,
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
        // Wake the threads that watch the eventfd, so they stop.
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a local to our own eventfd.
        let _ = unsafe { libc::write(self.eventfd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

/// A submitted request; resolves to librbd's return value (bytes, or a negative errno).
pub struct InFlight<'a> {
    image: &'a Arc<Image>,
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
        // librbd may still write into the request's buffers: wait for it, taking completions
        // here (another thread may take this one first, hence the short poll).
        while !self.request.done.load(Ordering::Acquire) {
            let mut pfd = libc::pollfd {
                fd: self.image.eventfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, 10) };
            self.image.take_completions();
        }
    }
}
