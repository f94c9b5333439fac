//! What a running daemon holds: its nodes, exports and iothreads, and what QMP commands need
//! to know of the sandbox.

use std::path::PathBuf;

use strata_backend::{BlockError, Graph};

use crate::exports::Exports;
use crate::iothreads::IoThreads;
use crate::jobs::Jobs;
use crate::qmp::protocol::QmpError;

/// The daemon's state, shared by the main thread and the monitors.
pub struct Daemon {
    /// The nodes.
    pub graph: Graph,
    /// The `--object iothread`s.
    pub iothreads: IoThreads,
    /// The running exports.
    pub exports: Exports,
    /// The background jobs (`blockdev-create`, ...).
    pub jobs: Jobs,
    /// Where exports added at run time make their private directory (a directory the sandbox
    /// lets the daemon write); None: the temporary directory.
    pub runtime_dir: Option<PathBuf>,
    /// When sandboxed: the directories where QMP may still open images and create sockets
    /// (`--sandbox-allow-dir`).
    pub sandbox_dirs: Option<Vec<PathBuf>>,
}

impl Daemon {
    /// A block-layer error as QMP reports it, naming the sandbox when it is what refused.
    pub fn explain_refusal(&self, e: BlockError) -> QmpError {
        let refused = matches!(e.errno(), libc::EACCES | libc::EPERM);
        let text = e.to_string();
        QmpError::generic(if refused {
            self.explain_text(text)
        } else {
            text
        })
    }

    /// `text`, with a note on the sandbox when one is on and the text says access was refused.
    pub fn explain_text(&self, text: String) -> String {
        explain_sandbox(self.sandbox_dirs.as_deref(), text)
    }
}

/// `text`, with a note on the sandbox when `dirs` says one is on (the directories QMP may
/// use) and the text says access was refused; for work done away from the daemon (jobs).
pub fn explain_sandbox(dirs: Option<&[PathBuf]>, text: String) -> String {
    let Some(dirs) = dirs else {
        return text;
    };
    if !(text.contains("Permission denied") || text.contains("not permitted")) {
        return text;
    }
    let allowed: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    format!(
        "{text} (the sandbox allows new files only under --sandbox-allow-dir directories: {}; \
         or run with --sandbox off)",
        if allowed.is_empty() {
            "none given".to_string()
        } else {
            allowed.join(", ")
        }
    )
}
