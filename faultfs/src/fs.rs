//! The FUSE file system: the regular files of a backing directory, each behind an
//! [`Overlay`], plus the control file.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use crate::control::{Command, Faults, Op};
use crate::overlay::Overlay;

/// The control file's name in the mount's root.
pub const CONTROL_FILE: &str = ".faultfs-ctl";

const CONTROL_INO: u64 = 2;
const FIRST_FILE_INO: u64 = 3;
/// Attributes change behind the kernel's back (a power loss shrinks files): never cache them.
const TTL: Duration = Duration::ZERO;

struct DataFile {
    name: OsString,
    overlay: Overlay,
}

/// Everything the file system knows, shared with the [`crate::Mount`] handle.
pub struct State {
    backing_dir: PathBuf,
    /// File `i` has inode `FIRST_FILE_INO + i`.
    files: Vec<DataFile>,
    faults: Faults,
    /// After a power loss every I/O fails.
    dead: bool,
    fsyncs: u64,
    writes: u64,
}

/// A snapshot of the counters, also what reading the control file returns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Status {
    /// A power loss happened.
    pub dead: bool,
    /// Pages written and not yet synced, over all files.
    pub dirty_pages: usize,
    /// fsync and fdatasync calls (failed ones included).
    pub fsyncs: u64,
    /// Write calls (failed ones included).
    pub writes: u64,
    /// Operations a `fail` rule failed.
    pub faults_fired: u64,
}

impl State {
    pub fn new(backing_dir: PathBuf) -> State {
        State {
            backing_dir,
            files: Vec::new(),
            faults: Faults::default(),
            dead: false,
            fsyncs: 0,
            writes: 0,
        }
    }

    pub fn status(&self) -> Status {
        Status {
            dead: self.dead,
            dirty_pages: self.files.iter().map(|f| f.overlay.dirty_pages()).sum(),
            fsyncs: self.fsyncs,
            writes: self.writes,
            faults_fired: self.faults.fired,
        }
    }

    /// Carries out one control command line.
    pub fn command(&mut self, line: &str) -> Result<(), String> {
        match Command::parse(line).map_err(|e| e.to_string())? {
            Command::PowerLoss { keep_percent, seed } => {
                let mut rng = seed;
                let mut keep = || splitmix64(&mut rng) % 100 < u64::from(keep_percent);
                for f in &mut self.files {
                    f.overlay
                        .power_loss(&mut keep)
                        .map_err(|e| format!("power-loss on {:?}: {e}", f.name))?;
                }
                self.dead = true;
            }
            Command::Fail(fault) => self.faults.add(fault),
            Command::Clear => self.faults.clear(),
        }
        Ok(())
    }

    /// The inode of a regular file of the backing directory, opening it on first use.
    fn lookup_file(&mut self, name: &OsStr) -> Result<u64, Errno> {
        if let Some(i) = self.files.iter().position(|f| f.name == name) {
            return Ok(FIRST_FILE_INO + i as u64);
        }
        if name.as_encoded_bytes().contains(&b'/') {
            return Err(Errno::ENOENT);
        }
        let path = self.backing_dir.join(name);
        let meta = std::fs::symlink_metadata(&path).map_err(Errno::from)?;
        if !meta.is_file() {
            return Err(Errno::ENOENT);
        }
        let backing = File::options()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(Errno::from)?;
        let overlay = Overlay::new(backing).map_err(Errno::from)?;
        self.files.push(DataFile {
            name: name.to_owned(),
            overlay,
        });
        Ok(FIRST_FILE_INO + self.files.len() as u64 - 1)
    }

    fn file(&mut self, ino: INodeNo) -> Result<&mut Overlay, Errno> {
        let i = ino.0.checked_sub(FIRST_FILE_INO).ok_or(Errno::ENOENT)?;
        self.files
            .get_mut(i as usize)
            .map(|f| &mut f.overlay)
            .ok_or(Errno::ENOENT)
    }

    /// The file for an I/O: EIO once the power is gone, or the error a rule injects.
    fn io_file(
        &mut self,
        ino: INodeNo,
        op: Op,
        offset: u64,
        len: u64,
    ) -> Result<&mut Overlay, Errno> {
        if self.dead {
            return Err(Errno::EIO);
        }
        if let Some(errno) = self.faults.check(op, offset, len) {
            if op == Op::Fsync {
                self.file(ino)?.lose_dirty_state();
            }
            return Err(Errno::from_i32(errno));
        }
        self.file(ino)
    }

    fn attr(&mut self, ino: INodeNo) -> Result<FileAttr, Errno> {
        let (kind, size, perm) = match ino.0 {
            1 => (FileType::Directory, 0, 0o755),
            CONTROL_INO => (FileType::RegularFile, 0, 0o600),
            _ => (FileType::RegularFile, self.file(ino)?.size(), 0o644),
        };
        let now = SystemTime::now();
        Ok(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: now,
            mtime: now,
            ctime: now,
            crtime: UNIX_EPOCH,
            kind,
            perm,
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            // SAFETY: getuid/getgid cannot fail and touch no memory.
            uid: unsafe { libc::getuid() },
            // SAFETY: as above.
            gid: unsafe { libc::getgid() },
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    fn status_text(&self) -> String {
        let s = self.status();
        format!(
            "dead={} dirty_pages={} fsyncs={} writes={} faults_fired={}\n",
            u8::from(s.dead),
            s.dirty_pages,
            s.fsyncs,
            s.writes,
            s.faults_fired
        )
    }
}

/// A small deterministic generator for the pages a power loss keeps.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The `fuser` file system over the shared state.
pub struct FaultFs {
    pub state: Arc<Mutex<State>>,
}

impl FaultFs {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent-enough state for a test tool.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Filesystem for FaultFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Large writes arrive whole; the kernel lowers this to what it allows.
        let _ = config.set_max_write(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent != INodeNo::ROOT {
            return reply.error(Errno::ENOENT);
        }
        let mut s = self.state();
        let ino = if name == CONTROL_FILE {
            Ok(CONTROL_INO)
        } else {
            s.lookup_file(name)
        };
        match ino.and_then(|ino| s.attr(INodeNo(ino))) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.state().attr(ino) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut s = self.state();
        if let Some(size) = size.filter(|_| ino.0 >= FIRST_FILE_INO) {
            if s.dead {
                return reply.error(Errno::EIO);
            }
            if let Err(e) = s
                .file(ino)
                .and_then(|f| f.set_size(size).map_err(Errno::from))
            {
                return reply.error(e);
            }
        }
        match s.attr(ino) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino.0 != CONTROL_INO {
            if let Err(e) = self.state().file(ino) {
                return reply.error(e);
            }
        }
        // O_DIRECT (and the control file) bypass the kernel's page cache.
        let direct = ino.0 == CONTROL_INO || flags.0 & libc::O_DIRECT != 0;
        let fopen = if direct {
            FopenFlags::FOPEN_DIRECT_IO
        } else {
            FopenFlags::empty()
        };
        reply.opened(FileHandle(ino.0), fopen);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let mut s = self.state();
        if ino.0 == CONTROL_INO {
            let text = s.status_text().into_bytes();
            let from = (offset as usize).min(text.len());
            let to = (from + size as usize).min(text.len());
            return reply.data(&text[from..to]);
        }
        match s
            .io_file(ino, Op::Read, offset, u64::from(size))
            .and_then(|f| f.read(offset, size as usize).map_err(Errno::from))
        {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut s = self.state();
        let len = data.len() as u32;
        if ino.0 == CONTROL_INO {
            let text = String::from_utf8_lossy(data);
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                if let Err(e) = s.command(line) {
                    log::warn!("faultfs: {e}");
                    return reply.error(Errno::EINVAL);
                }
            }
            return reply.written(len);
        }
        s.writes += 1;
        let sync = flags.0 & (libc::O_SYNC | libc::O_DSYNC) != 0;
        let r = s
            .io_file(ino, Op::Write, offset, data.len() as u64)
            .and_then(|f| {
                f.write(offset, data).map_err(Errno::from)?;
                if sync {
                    f.sync(flags.0 & libc::O_SYNC != libc::O_SYNC)
                        .map_err(Errno::from)?;
                }
                Ok(())
            });
        match r {
            Ok(()) => reply.written(len),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close() makes nothing durable.
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut s = self.state();
        if ino.0 < FIRST_FILE_INO {
            return reply.ok();
        }
        s.fsyncs += 1;
        let r = s.io_file(ino, Op::Fsync, 0, 0).and_then(|f| {
            f.sync(datasync).map_err(|e| {
                f.lose_dirty_state();
                Errno::from(e)
            })
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let mut s = self.state();
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let r = s.io_file(ino, Op::Fallocate, offset, length).and_then(|f| {
            let size = f.size();
            let end = offset.saturating_add(length);
            let zero_end = if keep_size { end.min(size) } else { end };
            match mode & !libc::FALLOC_FL_KEEP_SIZE {
                0 => {}
                libc::FALLOC_FL_PUNCH_HOLE if keep_size => {
                    if zero_end > offset {
                        f.zero(offset, zero_end - offset).map_err(Errno::from)?;
                    }
                }
                libc::FALLOC_FL_ZERO_RANGE => {
                    if zero_end > offset {
                        f.zero(offset, zero_end - offset).map_err(Errno::from)?;
                    }
                }
                _ => return Err(Errno::EOPNOTSUPP),
            }
            if !keep_size && end > f.size() {
                f.set_size(end).map_err(Errno::from)?;
            }
            Ok(())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let mut s = self.state();
        let mut entries = vec![
            (1, FileType::Directory, OsString::from(".")),
            (1, FileType::Directory, OsString::from("..")),
            (
                CONTROL_INO,
                FileType::RegularFile,
                OsString::from(CONTROL_FILE),
            ),
        ];
        let names: Vec<OsString> = match std::fs::read_dir(&s.backing_dir) {
            Ok(dir) => dir
                .filter_map(Result::ok)
                .filter(|e| e.metadata().is_ok_and(|m| m.is_file()))
                .map(|e| e.file_name())
                .collect(),
            Err(e) => return reply.error(Errno::from(e)),
        };
        for name in names {
            if let Ok(ino) = s.lookup_file(&name) {
                entries.push((ino, FileType::RegularFile, name));
            }
        }
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: fuser::ReplyStatfs) {
        let dir = self.state().backing_dir.clone();
        match backing_statvfs(&dir) {
            Ok(v) => reply.statfs(
                v.f_blocks,
                v.f_bfree,
                v.f_bavail,
                v.f_files,
                v.f_ffree,
                v.f_bsize as u32,
                255,
                v.f_frsize as u32,
            ),
            Err(e) => reply.error(Errno::from(e)),
        }
    }
}

/// statvfs of the backing directory (what `df` on the mount shows).
fn backing_statvfs(dir: &std::path::Path) -> std::io::Result<libc::statvfs> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    let mut v = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a NUL-terminated string and `v` a writable statvfs.
    if unsafe { libc::statvfs(path.as_ptr(), v.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs succeeded, so it filled `v`.
    Ok(unsafe { v.assume_init() })
}
