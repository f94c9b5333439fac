//! The rig of the durability and fault tests: an image in a backing directory, served
//! through strata-faultfs (in this process), a strata daemon (a child process) exporting it,
//! and a libblkio client.
#![allow(dead_code)]

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use strata_faultfs::Mount;

pub const SECTOR: u64 = 512;

/// Waits (up to 10 s) until nothing holds a file on the mount at `path`. A thread's io_uring
/// goes away after the thread, in the kernel's own time: its finished requests keep their
/// files open until then, and unmounting fails with EBUSY (seen on a loaded machine).
fn wait_until_unused(path: &Path) {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("no NUL");
    let start = Instant::now();
    loop {
        // MNT_EXPIRE on a mount in use fails with EBUSY; on one not in use it fails with
        // EAGAIN and only marks it, which the unmount that follows does not mind.
        // SAFETY: c_path is a valid NUL-terminated string for the call.
        let r = unsafe { libc::umount2(c_path.as_ptr(), libc::MNT_EXPIRE) };
        let busy = r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EBUSY);
        if !busy || start.elapsed() > Duration::from_secs(10) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The image format under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

/// Whether FUSE tests can run here (root, /dev/fuse); says why not, and under CI fails.
pub fn require_fuse() -> bool {
    // SAFETY: geteuid touches no memory and cannot fail.
    let reason = if unsafe { libc::geteuid() } != 0 {
        Some("not running as root (mounting FUSE)")
    } else if !Path::new("/dev/fuse").exists() {
        Some("/dev/fuse is missing")
    } else {
        None
    };
    match reason {
        None => true,
        Some(r) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("cannot run under CI: {r}")
        }
        Some(r) => {
            eprintln!("SKIPPED: {r}");
            false
        }
    }
}

/// A directory with `backing/` (the image, as stable storage holds it) and `mnt/` (the
/// faultfs mount strata opens it through).
pub struct Rig {
    pub dir: tempfile::TempDir,
    pub format: Format,
    pub size: u64,
    pub mount: Option<Mount>,
    /// Extra options of the format node (`key=value,...`).
    pub format_options: String,
}

impl Rig {
    /// A new zeroed image of `size` bytes (qcow2: `cluster_size` clusters), mounted.
    pub fn new(format: Format, size: u64, cluster_size: u64) -> Rig {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("backing")).expect("mkdir backing");
        std::fs::create_dir(dir.path().join("mnt")).expect("mkdir mnt");
        let rig = Rig {
            dir,
            format,
            size,
            mount: None,
            format_options: String::new(),
        };
        match format {
            Format::Raw => std::fs::File::create(rig.backing_image())
                .and_then(|f| f.set_len(size))
                .expect("create raw image"),
            Format::Qcow2 => qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("cluster_size={cluster_size}"),
                rig.backing_image().to_str().expect("path"),
                &size.to_string(),
            ]),
        }
        let mut rig = rig;
        rig.remount();
        rig
    }

    pub fn backing_image(&self) -> PathBuf {
        self.dir.path().join("backing/disk.img")
    }

    pub fn mounted_image(&self) -> PathBuf {
        self.dir.path().join("mnt/disk.img")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("vhost.sock")
    }

    pub fn mount(&self) -> &Mount {
        self.mount.as_ref().expect("mounted")
    }

    /// Mounts the backing directory anew (power back on), unmounting first if mounted.
    pub fn remount(&mut self) {
        self.unmount();
        self.mount = Some(
            Mount::new(
                &self.dir.path().join("backing"),
                &self.dir.path().join("mnt"),
            )
            .expect("mount strata-faultfs"),
        );
    }

    pub fn unmount(&mut self) {
        if let Some(m) = self.mount.take() {
            wait_until_unused(m.path());
            m.unmount().expect("unmount strata-faultfs");
        }
    }

    /// Starts strata exporting the mounted image.
    pub fn start_strata(&self, writethrough: bool, direct: bool) -> Daemon {
        let pidfile = self.dir.path().join("strata.pid");
        let _ = std::fs::remove_file(&pidfile);
        let fmt = match self.format {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        };
        let onoff = |b: bool| if b { "on" } else { "off" };
        let child = Command::new(env!("CARGO_BIN_EXE_strata"))
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f0,filename={},aio=io_uring,cache.direct={}",
                self.mounted_image().display(),
                onoff(direct)
            ))
            .arg("--blockdev")
            .arg(format!(
                "driver={fmt},node-name=d0,file=f0{}{}",
                if self.format_options.is_empty() {
                    ""
                } else {
                    ","
                },
                self.format_options
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={},\
                 writable=on,writethrough={},num-queues=1",
                self.socket().display(),
                onoff(writethrough)
            ))
            .arg("--pidfile")
            .arg(&pidfile)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run strata");
        let mut d = Daemon { child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !pidfile.exists() {
            if let Ok(Some(status)) = d.child.try_wait() {
                panic!("strata exited at start ({status}): {}", d.stderr());
            }
            assert!(Instant::now() < deadline, "strata did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        d
    }

    /// The guest-visible bytes of the image on stable storage (the backing file; for qcow2,
    /// as qemu-img reads it).
    pub fn stable_content(&self) -> Vec<u8> {
        match self.format {
            Format::Raw => {
                let mut b = std::fs::read(self.backing_image()).expect("read backing image");
                b.resize(self.size as usize, 0);
                b
            }
            Format::Qcow2 => {
                let out = self.dir.path().join("converted.raw");
                qemu_img(&[
                    "convert",
                    "-U",
                    "-O",
                    "raw",
                    self.backing_image().to_str().expect("path"),
                    out.to_str().expect("path"),
                ]);
                let b = std::fs::read(&out).expect("read converted image");
                std::fs::remove_file(&out).expect("remove converted image");
                b
            }
        }
    }

    /// `qemu-img check` on the backing qcow2 image: corruption fails, leaks are fine.
    pub fn check_qcow2(&self, when: &str) {
        if self.format != Format::Qcow2 {
            return;
        }
        let o = Command::new("qemu-img")
            .args(["check", "-U"])
            .arg(self.backing_image())
            .output()
            .expect("run qemu-img check");
        let code = o.status.code();
        assert!(
            code == Some(0) || code == Some(3),
            "{when}: qemu-img check found corruption ({code:?}):\n{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        // Unmount even when a test panics, so the temporary directory can go.
        if let Some(m) = self.mount.take() {
            let _ = m.unmount();
        }
    }
}

pub fn qemu_img(args: &[&str]) {
    let o = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("run qemu-img (scripts/install-deps.sh installs it)");
    assert!(o.status.success(), "qemu-img {args:?}: {o:?}");
}

/// A strata child process; killed when dropped.
pub struct Daemon {
    pub child: Child,
}

impl Daemon {
    /// SIGKILL, and wait for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM (drain, flush, exit); returns whether it exited 0.
    pub fn stop(&mut self) -> bool {
        // SAFETY: kill with a child's pid that we have not reaped yet.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            assert!(Instant::now() < deadline, "strata did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// What it logged (once it has exited).
    pub fn stderr(&mut self) -> String {
        use std::io::Read;
        let mut s = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

fn blkio_err(e: blkio::Error) -> String {
    format!("{e} (errno {})", e.errno().raw_os_error())
}

/// A libblkio virtio-blk-vhost-user client with one queue and one mapped memory region.
pub struct Client {
    pub queue: Blkioq,
    pub blkio: Blkio,
    pub region: MemoryRegion,
}

impl Client {
    pub fn connect(socket: &Path, region_len: usize) -> Client {
        let try_connect = || -> Result<Client, String> {
            let mut b = Blkio::new("virtio-blk-vhost-user").map_err(blkio_err)?;
            b.set_str("path", socket.to_str().ok_or("path")?)
                .map_err(blkio_err)?;
            b.connect().map_err(blkio_err)?;
            b.set_i32("num-queues", 1).map_err(blkio_err)?;
            let mut outcome = b.start().map_err(blkio_err)?;
            let region = b.alloc_mem_region(region_len).map_err(blkio_err)?;
            b.map_mem_region(&region).map_err(blkio_err)?;
            Ok(Client {
                queue: outcome.queues.remove(0),
                blkio: b,
                region,
            })
        };
        try_connect().unwrap_or_else(|e| panic!("libblkio connect: {e}"))
    }

    /// The mapped region as bytes.
    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the region is a live read/write mapping of `len` bytes owned by the client;
        // callers touch only the parts no request in flight uses.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    pub fn ptr(&self, offset: usize) -> *mut u8 {
        assert!(offset <= self.region.len);
        (self.region.addr + offset) as *mut u8
    }

    /// Waits for at least one completion (at most `max`): (user_data, result) pairs.
    pub fn complete(&mut self, max: usize) -> Vec<(usize, i32)> {
        let mut comps: Vec<MaybeUninit<Completion>> =
            (0..max).map(|_| MaybeUninit::uninit()).collect();
        let mut timeout = Duration::from_secs(30);
        let got = self
            .queue
            .do_io(&mut comps, 1, Some(&mut timeout), None)
            .unwrap_or_else(|e| panic!("do_io: {}", blkio_err(e)));
        comps[..got]
            .iter()
            .map(|c| {
                // SAFETY: do_io initialised the first `got` completions.
                let c = unsafe { c.assume_init_ref() };
                (c.user_data, c.ret)
            })
            .collect()
    }

    /// Runs one request to completion; returns its result (0 or -errno).
    fn run1(&mut self, submit: impl FnOnce(&mut Blkioq)) -> i32 {
        submit(&mut self.queue);
        let c = self.complete(1);
        assert_eq!(c.len(), 1);
        c[0].1
    }

    /// Writes `data` at `offset` (through the start of the region).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> i32 {
        self.buf()[..data.len()].copy_from_slice(data);
        let p = self.ptr(0);
        self.run1(|q| q.write(offset, p, data.len(), 0, ReqFlags::empty()))
    }

    /// Reads `len` bytes at `offset`: Ok(bytes) or Err(-errno).
    pub fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, i32> {
        let p = self.ptr(0);
        match self.run1(|q| q.read(offset, p, len, 0, ReqFlags::empty())) {
            0 => Ok(self.buf()[..len].to_vec()),
            e => Err(e),
        }
    }

    pub fn flush(&mut self) -> i32 {
        self.run1(|q| q.flush(0, ReqFlags::empty()))
    }

    pub fn discard(&mut self, offset: u64, len: u64) -> i32 {
        self.run1(|q| q.discard(offset, len, 0, ReqFlags::empty()))
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> i32 {
        self.run1(|q| q.write_zeroes(offset, len, 0, ReqFlags::empty()))
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.blkio.unmap_mem_region(&self.region);
    }
}

/// The stamp of sector `lba` written by write `seq`: its sequence number, its address, and
/// filler that depends on both, so a sector from any other write or place is recognised.
pub fn stamp(seq: u64, lba: u64) -> [u8; SECTOR as usize] {
    let mut s = [0u8; SECTOR as usize];
    s[..8].copy_from_slice(&seq.to_le_bytes());
    s[8..16].copy_from_slice(&lba.to_le_bytes());
    let mut x = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ lba.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    for chunk in s[16..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    s
}

/// The sequence number in sector `lba`'s bytes: Some(0) for zeroes, None for anything that
/// is not a stamp of this sector.
pub fn read_stamp(lba: u64, bytes: &[u8]) -> Option<u64> {
    if bytes.iter().all(|&b| b == 0) {
        return Some(0);
    }
    let seq = u64::from_le_bytes(bytes[..8].try_into().ok()?);
    (stamp(seq, lba)[..] == *bytes).then_some(seq)
}

/// The stamped data of write `seq` over `sectors` sectors from `lba`.
pub fn stamped(seq: u64, lba: u64, sectors: u64) -> Vec<u8> {
    (lba..lba + sectors).flat_map(|l| stamp(seq, l)).collect()
}
