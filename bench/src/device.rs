//! A target opened through libblkio: the driver that reaches it, its queues and one mapped
//! memory region for request buffers.
//!
//! Every target goes through the same code: the same memory regions (allocated with
//! `alloc_mem_region` and mapped with `map_mem_region`, as vhost-user needs) and the same
//! completion-queue loop (`do_io`).

use std::ffi::CStr;
use std::mem::MaybeUninit;
use std::thread;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, Errno, MemoryRegion, ReqFlags};

use crate::error::Result;

/// How long one `do_io` call may wait for a completion before the run is declared hung.
pub const IO_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a refused vhost-user connection is retried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Which libblkio driver talks to the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    /// `virtio-blk-vhost-user`: `path` is the daemon's vhost-user socket.
    VhostUser,
    /// `io_uring` with `direct=true`: `path` is the file itself (the limit).
    IoUring,
}

impl Driver {
    /// The driver's name in libblkio.
    fn libblkio_name(self) -> &'static str {
        match self {
            Driver::VhostUser => "virtio-blk-vhost-user",
            Driver::IoUring => "io_uring",
        }
    }
}

/// A connected, started libblkio instance with one mapped memory region.
pub struct Device {
    // Field order matters for drop: queues before the instance that owns the regions.
    queues: Vec<Blkioq>,
    blkio: Blkio,
    region: MemoryRegion,
    /// Size of the target in bytes.
    pub capacity: u64,
}

/// Turns a libblkio error into a message saying `what` failed, with the errno.
fn blkio_err(what: &str) -> impl Fn(blkio::Error) -> String + '_ {
    move |e| format!("{what}: {e} (errno {})", e.errno().raw_os_error())
}

impl Device {
    /// Connects to `path` with `num_queues` queues and a mapped buffer of at least `buf_len`
    /// bytes.
    pub fn open(driver: Driver, path: &str, num_queues: usize, buf_len: usize) -> Result<Device> {
        let name = driver.libblkio_name();
        // A daemon binds its socket a moment before it listens: retry a refused connection
        // for a few seconds.
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let mut blkio = loop {
            let mut blkio = Blkio::new(name).map_err(blkio_err("blkio_new"))?;
            blkio.set_str("path", path).map_err(blkio_err("set path"))?;
            if driver == Driver::IoUring {
                blkio
                    .set_bool("direct", true)
                    .map_err(blkio_err("set direct=true"))?;
            }
            match blkio.connect() {
                Ok(()) => break blkio,
                Err(e)
                    if driver == Driver::VhostUser
                        && (e.errno() == Errno::CONNREFUSED || e.errno() == Errno::NOENT)
                        && Instant::now() < deadline =>
                {
                    thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(blkio_err(&format!("connect to {path} ({name})"))(e)),
            }
        };
        blkio
            .set_i32("num-queues", num_queues as i32)
            .map_err(blkio_err("set num-queues"))?;
        let outcome = blkio.start().map_err(blkio_err("start"))?;
        if outcome.queues.len() != num_queues {
            return Err(format!(
                "asked for {num_queues} queues, libblkio started {}",
                outcome.queues.len()
            ));
        }
        let capacity = blkio
            .get_u64("capacity")
            .map_err(blkio_err("get capacity"))?;
        let align = blkio
            .get_u64("mem-region-alignment")
            .map_err(blkio_err("get mem-region-alignment"))?
            .max(4096) as usize;
        let len = buf_len.max(1).div_ceil(align) * align;
        let region = blkio
            .alloc_mem_region(len)
            .map_err(blkio_err("alloc_mem_region"))?;
        blkio
            .map_mem_region(&region)
            .map_err(blkio_err("map_mem_region"))?;
        Ok(Device {
            queues: outcome.queues,
            blkio,
            region,
            capacity,
        })
    }

    /// The start of the mapped buffer that requests read into and write from.
    pub fn buf(&self) -> *mut u8 {
        self.region.addr as *mut u8
    }

    /// The mapped buffer, to fill or check while no request is in flight.
    pub fn buf_slice(&mut self) -> &mut [u8] {
        // No request is in flight while the slice is borrowed: requests are issued only
        // through `&mut Device` (`io_batch` waits for them all) or by a run's workers on the
        // queues from `take_queues`, which start after the run's last use of the slice.
        // SAFETY: the region is a read/write shared mapping of `len` bytes owned by `self`,
        // not written by any request while borrowed (above).
        unsafe { std::slice::from_raw_parts_mut(self.buf(), self.region.len) }
    }

    /// Hands the queues over to the caller (a run's worker threads). The device keeps the
    /// connection and the buffer; it must outlive every request issued on the queues.
    pub fn take_queues(&mut self) -> Vec<Blkioq> {
        std::mem::take(&mut self.queues)
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.queues.clear();
        self.blkio.unmap_mem_region(&self.region);
    }
}

/// The error message of a failed request.
pub fn completion_error(c: &Completion) -> String {
    let msg = if c.error_msg.is_null() {
        String::new()
    } else {
        // SAFETY: libblkio sets error_msg to a static NUL-terminated string or null.
        unsafe { CStr::from_ptr(c.error_msg) }
            .to_string_lossy()
            .into_owned()
    };
    format!(
        "request failed: {} ({})",
        std::io::Error::from_raw_os_error(-c.ret),
        msg
    )
}

/// Submits all `reqs` (offset, buffer slot) as reads or writes of `bs` bytes and waits for
/// them all.
pub fn io_batch(dev: &mut Device, write: bool, reqs: &[u64], bs: usize) -> Result<()> {
    if reqs.len().saturating_mul(bs) > dev.region.len {
        return Err(format!(
            "{} requests of {bs} bytes do not fit the {}-byte buffer",
            reqs.len(),
            dev.region.len
        ));
    }
    let buf = dev.buf();
    let q = &mut dev.queues[0];
    for (i, &off) in reqs.iter().enumerate() {
        // SAFETY: i < reqs.len() and reqs.len() * bs fits the region (checked above), so
        // request i's bytes lie inside it.
        let p = unsafe { buf.add(i * bs) };
        if write {
            q.write(off, p, bs, i, ReqFlags::empty());
        } else {
            q.read(off, p, bs, i, ReqFlags::empty());
        }
    }
    let mut completions: Vec<MaybeUninit<Completion>> = Vec::with_capacity(reqs.len());
    completions.resize_with(reqs.len(), MaybeUninit::uninit);
    let mut done = 0;
    while done < reqs.len() {
        let mut timeout = IO_TIMEOUT;
        let n = q
            .do_io(&mut completions, 1, Some(&mut timeout), None)
            .map_err(|e| format!("do_io: {e}"))?;
        for c in &completions[..n] {
            // SAFETY: do_io initialised the first n entries.
            let c = unsafe { c.assume_init_ref() };
            if c.ret != 0 {
                return Err(format!(
                    "{} at offset {}: {}",
                    if write { "write" } else { "read" },
                    reqs[c.user_data],
                    completion_error(c)
                ));
            }
        }
        done += n;
    }
    Ok(())
}
