//! The daemon's running exports: those of the command line and those QMP adds, found by id,
//! removed one by one (QMP) or stopped all together (at exit).

use std::sync::{Mutex, MutexGuard};

use strata_vhost::BlkExport;

/// The running exports, by id.
#[derive(Default)]
pub struct Exports {
    list: Mutex<Vec<BlkExport>>,
}

/// How `block-export-del` treats a connected frontend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoveMode {
    /// Refuse while a frontend is connected.
    Safe,
    /// Disconnect it.
    Hard,
}

/// Why an export could not be removed.
#[derive(Debug, PartialEq, Eq)]
pub enum RemoveError {
    /// No export has this id.
    NotFound,
    /// Safe mode, and a frontend is connected.
    InUse,
    /// The export stopped with this error (it is gone all the same).
    Stopped(String),
}

impl Exports {
    fn lock(&self) -> MutexGuard<'_, Vec<BlkExport>> {
        // Each change is one push or remove, so a poisoned list is still consistent.
        self.list.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a started export; refused (and handed back) if its id is taken.
    pub fn add(&self, export: BlkExport) -> Result<(), BlkExport> {
        let mut list = self.lock();
        if list.iter().any(|e| e.id() == export.id()) {
            return Err(export);
        }
        list.push(export);
        Ok(())
    }

    /// Whether an export has this id.
    pub fn contains(&self, id: &str) -> bool {
        self.lock().iter().any(|e| e.id() == id)
    }

    /// Runs `f` on each export, in the order they were added.
    pub fn for_each(&self, mut f: impl FnMut(&BlkExport)) {
        self.lock().iter().for_each(&mut f);
    }

    /// Runs `f` on the list of exports, which stays as it is meanwhile (no export is added
    /// or removed until `f` returns).
    pub fn with_each(&self, f: impl FnOnce(&[BlkExport])) {
        f(&self.lock());
    }

    /// Whether any export serves node `name`.
    pub fn uses_node(&self, name: &str) -> bool {
        self.lock().iter().any(|e| e.node().name() == name)
    }

    /// Stops and removes export `id`: its requests drain and its node is flushed before this
    /// returns.
    pub fn remove(&self, id: &str, mode: RemoveMode) -> Result<(), RemoveError> {
        let export = {
            let mut list = self.lock();
            let at = list
                .iter()
                .position(|e| e.id() == id)
                .ok_or(RemoveError::NotFound)?;
            if mode == RemoveMode::Safe && list[at].has_frontend() {
                return Err(RemoveError::InUse);
            }
            list.remove(at)
        };
        export.stop();
        export
            .join()
            .map_err(|e| RemoveError::Stopped(e.to_string()))
    }

    /// Stops every export (at exit): each drains and flushes; the first error is returned.
    pub fn stop_all(&self) -> Result<(), String> {
        let exports = std::mem::take(&mut *self.lock());
        for export in &exports {
            export.stop();
        }
        let mut result = Ok(());
        for export in exports {
            let id = export.id().to_string();
            if let Err(e) = export.join() {
                result = Err(format!("export '{id}': {e}"));
            }
        }
        result
    }
}
