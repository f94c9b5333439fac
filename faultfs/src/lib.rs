//! strata-faultfs: a FUSE file system for durability and fault tests.
//!
//! It passes the regular files of a backing directory through, but keeps every write in
//! memory (a disk's volatile cache) until an fsync or fdatasync of that file writes it to the
//! backing file and syncs it there. A `power-loss` command drops what was not synced (as
//! LazyFS does) and fails all I/O afterwards, as a dead disk; `fail` commands make reads,
//! writes, fsyncs or fallocates fail with EIO or ENOSPC. The language is in [`control`].
//! Commands come from the [`Mount`] handle in the same process, or are written to the
//! control file `.faultfs-ctl` in the mount's root (reading it gives the [`Status`]).
//!
//! The root directory holds the backing directory's regular files (created beforehand: the
//! file system creates no files) and the control file.

pub mod control;
mod fs;
mod overlay;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub use fs::{Status, CONTROL_FILE};

/// A mounted faultfs, served by a thread of this process; unmounted when dropped.
pub struct Mount {
    session: Option<fuser::BackgroundSession>,
    state: Arc<Mutex<fs::State>>,
    path: PathBuf,
}

impl Mount {
    /// Mounts the files of `backing` at `mountpoint` (needs root, or fusermount3).
    pub fn new(backing: &Path, mountpoint: &Path) -> io::Result<Mount> {
        let (session, state) = session(backing, mountpoint)?;
        Ok(Mount {
            session: Some(session.spawn()?),
            state,
            path: mountpoint.to_path_buf(),
        })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Carries out one command line (see [`control`]).
    pub fn command(&self, line: &str) -> Result<(), String> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .command(line)
    }

    /// The counters.
    pub fn status(&self) -> Status {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .status()
    }

    /// Unmounts and waits for the serving thread to end.
    pub fn unmount(mut self) -> io::Result<()> {
        match self.session.take() {
            Some(s) => s.umount_and_join(),
            None => Ok(()),
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            if let Err(e) = s.umount_and_join() {
                log::warn!("faultfs: unmounting {}: {e}", self.path.display());
            }
        }
    }
}

/// A mounted session (not yet serving) and its state.
fn session(
    backing: &Path,
    mountpoint: &Path,
) -> io::Result<(fuser::Session<fs::FaultFs>, Arc<Mutex<fs::State>>)> {
    let state = Arc::new(Mutex::new(fs::State::new(backing.canonicalize()?)));
    let fs = fs::FaultFs {
        state: state.clone(),
    };
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName("strata-faultfs".into()),
        fuser::MountOption::Subtype("faultfs".into()),
    ];
    Ok((fuser::Session::new(fs, mountpoint, &config)?, state))
}

/// Serves `backing` at `mountpoint` in this thread until it is unmounted or the process
/// gets SIGINT or SIGTERM (then it unmounts).
pub fn serve(backing: &Path, mountpoint: &Path) -> io::Result<()> {
    let (mut session, _state) = session(backing, mountpoint)?;
    let mut unmounter = session.unmount_callable();
    let mut signals = signal_hook::iterator::Signals::new([libc::SIGINT, libc::SIGTERM])?;
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            if let Err(e) = unmounter.unmount() {
                eprintln!("strata-faultfs: unmount: {e}");
            }
        }
    });
    session.run()
}
