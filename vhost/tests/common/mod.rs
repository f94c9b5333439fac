//! Shared helpers: image files, block nodes, exports, and a libblkio client.
#![allow(dead_code)]

pub mod daemon;
pub mod frontend;

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Once};
use std::time::Duration;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use strata_backend::{Graph, Node, Options};
use strata_vhost::{BlkExport, BlkExportConfig, Listen};

pub const MIB: usize = 1 << 20;

/// Sends test logs to stderr when RUST_LOG-style output is wanted (`STRATA_TEST_LOG=1`).
pub fn init_log() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("STRATA_TEST_LOG").is_some() {
            log::set_logger(&StderrLogger).ok();
            log::set_max_level(log::LevelFilter::Debug);
        }
    });
}

struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, r: &log::Record<'_>) {
        eprintln!("[{} {}] {}", r.level(), r.target(), r.args());
    }
    fn flush(&self) {}
}

/// A temporary directory with an image file, a graph, and the node opened on it.
pub struct Disk {
    pub dir: tempfile::TempDir,
    pub image: PathBuf,
    pub graph: Graph,
    pub node: Arc<Node>,
}

impl Disk {
    /// A zero-filled image of `size` bytes opened as `raw` over `file`, with extra options.
    pub fn new(size: u64, extra: &str) -> Disk {
        Self::try_new(size, extra).expect("open node")
    }

    /// Like `new`, but returns the block layer's error when the node cannot be opened.
    pub fn try_new(size: u64, extra: &str) -> Result<Disk, strata_backend::BlockError> {
        init_log();
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("disk.img");
        let f = std::fs::File::create(&image).expect("create image");
        f.set_len(size).expect("size image");
        drop(f);
        let graph = Graph::new();
        let mut text = format!(
            "driver=raw,node-name=disk,file.driver=file,file.filename={}",
            image.display()
        );
        if !extra.is_empty() {
            text.push(',');
            text.push_str(extra);
        }
        let opts = Options::parse(&text, None).expect("options");
        let node = graph.open(opts)?;
        Ok(Disk {
            dir,
            image,
            graph,
            node,
        })
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("vhost.sock")
    }

    /// Starts an export of the node on `socket()`, configured by `f`.
    pub fn export(&self, f: impl FnOnce(&mut BlkExportConfig)) -> BlkExport {
        let mut cfg = BlkExportConfig::new("test", self.node.clone());
        cfg.writable = true;
        f(&mut cfg);
        BlkExport::start(cfg, Listen::UnixPath(self.socket())).expect("start export")
    }

    /// The image's bytes, read directly from the file.
    pub fn file_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(&self.image).expect("open image");
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, offset).expect("read image");
        buf
    }
}

/// Deterministic, position- and tag-dependent bytes.
pub fn pattern(tag: u64, offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let x = (offset + i).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ tag.wrapping_mul(0xD6E8_FEB8_6659_FD93);
            (x >> 29) as u8
        })
        .collect()
}

/// A connected libblkio virtio-blk-vhost-user client with one mapped memory region.
pub struct Client {
    pub queues: Vec<Blkioq>,
    pub blkio: Blkio,
    pub region: MemoryRegion,
}

pub fn blkio_err(e: blkio::Error) -> String {
    format!("{e} (errno {})", e.errno().raw_os_error())
}

impl Client {
    pub fn connect(socket: &Path, num_queues: i32, region_len: usize) -> Result<Client, String> {
        Self::connect_with(socket, num_queues, region_len, |_| Ok(()))
    }

    pub fn connect_with(
        socket: &Path,
        num_queues: i32,
        region_len: usize,
        before_connect: impl FnOnce(&mut Blkio) -> blkio::Result<()>,
    ) -> Result<Client, String> {
        let mut b = Blkio::new("virtio-blk-vhost-user").map_err(blkio_err)?;
        b.set_str("path", socket.to_str().ok_or("path")?)
            .map_err(blkio_err)?;
        before_connect(&mut b).map_err(blkio_err)?;
        b.connect().map_err(blkio_err)?;
        b.set_i32("num-queues", num_queues).map_err(blkio_err)?;
        let outcome = b.start().map_err(blkio_err)?;
        let region = b.alloc_mem_region(region_len).map_err(blkio_err)?;
        b.map_mem_region(&region).map_err(blkio_err)?;
        Ok(Client {
            queues: outcome.queues,
            blkio: b,
            region,
        })
    }

    /// The mapped region as bytes.
    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the region is a live read/write shared mapping of `len` bytes owned by the
        // client, and no request is in flight while the slice is borrowed (`io` waits).
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    pub fn ptr(&self, offset: usize) -> *mut u8 {
        assert!(offset <= self.region.len);
        (self.region.addr + offset) as *mut u8
    }

    pub fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").expect("capacity")
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.queues.clear();
        self.blkio.unmap_mem_region(&self.region);
    }
}

/// Waits for `n` completions on `q` and returns their results in user_data order.
pub fn wait(q: &mut Blkioq, n: usize) -> Vec<(usize, i32)> {
    let mut out = Vec::with_capacity(n);
    let mut comps: Vec<MaybeUninit<Completion>> = (0..n).map(|_| MaybeUninit::uninit()).collect();
    while out.len() < n {
        let mut timeout = Duration::from_secs(20);
        let want = n - out.len();
        let got = q
            .do_io(&mut comps[..want], want, Some(&mut timeout), None)
            .unwrap_or_else(|e| panic!("do_io: {}", blkio_err(e)));
        for c in &comps[..got] {
            // SAFETY: do_io initialised the first `got` completions.
            let c = unsafe { c.assume_init_ref() };
            out.push((c.user_data, c.ret));
        }
    }
    out.sort_unstable();
    out
}

/// Runs one request (submitted by `submit`) to completion and returns its result.
pub fn run1(q: &mut Blkioq, submit: impl FnOnce(&mut Blkioq)) -> i32 {
    submit(q);
    wait(q, 1)[0].1
}

pub fn read(q: &mut Blkioq, offset: u64, buf: *mut u8, len: usize) -> i32 {
    run1(q, |q| q.read(offset, buf, len, 0, ReqFlags::empty()))
}

pub fn write(q: &mut Blkioq, offset: u64, buf: *const u8, len: usize) -> i32 {
    run1(q, |q| q.write(offset, buf, len, 0, ReqFlags::empty()))
}

/// A loop device with 4096-byte logical sectors over `image`; detached when dropped.
pub struct Loop4k(pub String);

impl Loop4k {
    pub fn attach(image: &Path) -> Loop4k {
        let out = Command::new("losetup")
            .args(["--sector-size", "4096", "-f", "--show"])
            .arg(image)
            .output()
            .expect("losetup");
        assert!(out.status.success(), "losetup: {out:?}");
        Loop4k(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// A raw node over the device, opened with O_DIRECT (so 512-byte writes need
    /// read-modify-write).
    pub fn open_raw(&self, graph: &Graph) -> Arc<Node> {
        let opts = Options::parse(
            &format!(
                "driver=raw,file.driver=host_device,file.filename={},cache.direct=on",
                self.0
            ),
            None,
        )
        .expect("options");
        graph.open(opts).expect("open the loop device")
    }
}

impl Drop for Loop4k {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}
