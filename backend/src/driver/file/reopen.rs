//! Reopening the file with other flags (QMP's `blockdev-reopen`), in two steps: prepare (a
//! new descriptor when the file must become writable or change O_DIRECT, the new lock
//! permissions taken), then commit (the descriptor swapped in) or abort (the permissions given
//! back), so that a reopen of several nodes changes all of them or none.

use std::os::unix::fs::MetadataExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::dio_alignment::io_limits;
use super::open::open_for;
use super::{FileDriver, IoFile};
use crate::driver::image_lock::{self, Permissions};
use crate::error::{BlockError, Result};
use crate::flags::NodeFlags;

/// A prepared reopen: the new descriptor (when one is needed), the lock permissions before
/// and after (already taken), and whether the node flushes at close afterwards.
pub(super) struct StagedReopen {
    io: Option<Arc<IoFile>>,
    permissions: (Permissions, Permissions),
    flush_on_close: bool,
}

impl FileDriver {
    /// A reopen's first step: a new descriptor when the file must become writable or change
    /// O_DIRECT (the same file: its device and inode are checked), and the lock permissions of
    /// the new flags (a conflict with another user is an error, as in QEMU).
    pub(super) fn prepare_reopen(&self, old: &NodeFlags, new: &NodeFlags) -> Result<()> {
        let current = self.io.load_full();
        let write = !new.read_only;
        let io = if (write && !current.writable) || new.cache_direct != current.direct {
            let file = open_for(&self.filename, write, new.cache_direct)
                .map_err(|e| BlockError::io(&e, format!("Could not reopen '{}'", self.filename)))?;
            let meta = file
                .metadata()
                .map_err(|e| BlockError::io(&e, format!("Could not stat '{}'", self.filename)))?;
            if (meta.dev(), meta.ino()) != (self.id.dev, self.id.ino) {
                return Err(BlockError::invalid(format!(
                    "Could not reopen '{}': it is no longer the file the node opened",
                    self.filename
                )));
            }
            let limits = io_limits(&file, &self.filename, self.block_device, new.cache_direct)?;
            Some(Arc::new(IoFile {
                file,
                writable: write,
                direct: new.cache_direct,
                limits,
            }))
        } else {
            None
        };
        let permissions = (
            Permissions::for_device(!old.read_only, self.share_writes),
            Permissions::for_device(!new.read_only, self.share_writes),
        );
        if self.locking && permissions.0 != permissions.1 {
            let holder = self.lock_holder();
            image_lock::change(&holder.file, &self.filename, permissions.0, permissions.1)?;
        }
        *self.lock_staged() = Some(StagedReopen {
            io,
            permissions,
            flush_on_close: !new.read_only && !new.cache_no_flush,
        });
        Ok(())
    }

    /// The descriptor whose open file description holds the image locks: the first one.
    fn lock_holder(&self) -> Arc<IoFile> {
        let first = self.first.lock().unwrap_or_else(|p| p.into_inner());
        first.clone().unwrap_or_else(|| self.io.load_full())
    }

    fn lock_staged(&self) -> std::sync::MutexGuard<'_, Option<StagedReopen>> {
        // Each change is one assignment, so a poisoned lock is still consistent.
        self.staged.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies what [`prepare_reopen`](Self::prepare_reopen) prepared.
    pub(super) fn commit_reopen(&self) {
        if let Some(staged) = self.lock_staged().take() {
            if let Some(io) = staged.io {
                // No request is in flight: the old descriptor closes here, unused, unless it
                // is the first one, which keeps the locks.
                let old = self.io.swap(io);
                let mut first = self.first.lock().unwrap_or_else(|p| p.into_inner());
                first.get_or_insert(old);
            }
            self.flush_on_close
                .store(staged.flush_on_close, Ordering::Relaxed);
        }
    }

    /// Gives back the lock permissions [`prepare_reopen`](Self::prepare_reopen) took.
    pub(super) fn abort_reopen(&self) {
        let Some(staged) = self.lock_staged().take() else {
            return;
        };
        let (before, after) = staged.permissions;
        if self.locking && before != after {
            // Giving back what was taken; taking back what was given up may meet a new user.
            let holder = self.lock_holder();
            if let Err(e) = image_lock::change(&holder.file, &self.filename, after, before) {
                log::warn!(
                    "{}: could not restore its lock permissions: {e}",
                    self.filename
                );
            }
        }
    }
}
