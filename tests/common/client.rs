//! A libblkio virtio-blk-vhost-user client with two queues and one memory region, running
//! one request at a time.

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::Duration;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

/// How a [`Client`] connects.
#[derive(Clone, Copy, Debug)]
pub struct ClientConfig {
    /// The length of its memory region: the most one request moves.
    pub region_len: usize,
    /// Whether it asks for a read-only device.
    pub read_only: bool,
    /// How long a request may take.
    pub timeout: Duration,
}

/// A connected libblkio client with two queues and one memory region.
pub struct Client {
    pub queues: Vec<Blkioq>,
    pub blkio: Blkio,
    pub region: MemoryRegion,
    timeout: Duration,
}

fn err(e: blkio::Error) -> String {
    format!("{e} (errno {})", e.errno().raw_os_error())
}

impl Client {
    /// Connects to the vhost-user-blk socket `socket` and starts two queues.
    pub fn connect(socket: &Path, config: ClientConfig) -> Client {
        let connect = || -> Result<Client, String> {
            let mut b = Blkio::new("virtio-blk-vhost-user").map_err(err)?;
            b.set_str("path", socket.to_str().ok_or("path")?)
                .map_err(err)?;
            b.set_bool("read-only", config.read_only).map_err(err)?;
            b.connect().map_err(err)?;
            b.set_i32("num-queues", 2).map_err(err)?;
            let outcome = b.start().map_err(err)?;
            let region = b.alloc_mem_region(config.region_len).map_err(err)?;
            b.map_mem_region(&region).map_err(err)?;
            Ok(Client {
                queues: outcome.queues,
                blkio: b,
                region,
                timeout: config.timeout,
            })
        };
        connect().unwrap_or_else(|e| panic!("connect to {}: {e}", socket.display()))
    }

    /// The memory region as bytes.
    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the region is a live read/write mapping of `len` bytes owned by the client,
        // and no request is in flight while the slice is borrowed (`run` waits).
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    /// Submits one request on queue `q` (given the region's address) and returns its result.
    pub fn run(&mut self, q: usize, submit: impl FnOnce(&mut Blkioq, *mut u8)) -> i32 {
        let addr = self.region.addr as *mut u8;
        let queue = &mut self.queues[q];
        submit(queue, addr);
        let mut done = [MaybeUninit::<Completion>::uninit()];
        let mut timeout = self.timeout;
        let n = queue
            .do_io(&mut done, 1, Some(&mut timeout), None)
            .unwrap_or_else(|e| panic!("do_io: {}", err(e)));
        assert_eq!(n, 1, "no completion within {:?}", self.timeout);
        // SAFETY: do_io initialised the one completion it returned.
        unsafe { done[0].assume_init_ref() }.ret
    }

    /// Reads `len` bytes at `offset` on queue `q`, which must succeed.
    pub fn read(&mut self, q: usize, offset: u64, len: usize) -> Vec<u8> {
        let r = self.run(q, |queue, buf| {
            queue.read(offset, buf, len, 0, ReqFlags::empty())
        });
        assert_eq!(r, 0, "read at {offset}");
        self.buf()[..len].to_vec()
    }

    /// Writes `data` at `offset` on queue `q`; returns the result (0 or -errno).
    pub fn try_write(&mut self, q: usize, offset: u64, data: &[u8]) -> i32 {
        self.buf()[..data.len()].copy_from_slice(data);
        self.run(q, |queue, buf| {
            queue.write(offset, buf, data.len(), 0, ReqFlags::empty())
        })
    }

    /// Writes `data` at `offset` on queue `q`, which must succeed.
    pub fn write(&mut self, q: usize, offset: u64, data: &[u8]) {
        assert_eq!(self.try_write(q, offset, data), 0, "write at {offset}");
    }

    /// Flushes on queue 0, which must succeed.
    pub fn flush(&mut self) {
        assert_eq!(
            self.run(0, |q, _| q.flush(0, ReqFlags::empty())),
            0,
            "flush"
        );
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.queues.clear();
        self.blkio.unmap_mem_region(&self.region);
    }
}

/// `len` bytes of test data whose every byte depends on `tag`.
pub fn pattern(tag: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u32).wrapping_mul(31) ^ tag.wrapping_mul(0x9e37_79b9) >> 5) as u8)
        .collect()
}
