//! `--sandbox`: what confines the daemon once its exports listen and its nodes are open.
//!
//! Two layers, both on by default:
//! - [Landlock](landlock) limits the filesystem to the images the daemon opened and the few
//!   removals it makes at exit (its sockets, private directories and pidfile), and forbids
//!   TCP, abstract sockets and signals to other processes;
//! - a [seccomp filter](seccomp) allows only the system calls the serving threads make.
//!
//! The daemon calls [`enter`] on its main thread while it is the only thread: Landlock covers
//! the calling thread and the threads it starts later, and seccomp is installed on every
//! thread there is (TSYNC) and inherited by the rest. io_uring rings restrict their own
//! opcodes when they are set up (backend's `io/reactor.rs`).

use std::path::PathBuf;

pub mod landlock;
pub mod seccomp;
#[cfg(target_arch = "x86_64")]
mod sigsys;

/// What the sandboxed daemon may still reach in the filesystem.
#[derive(Debug, Default, Clone)]
pub struct Policy {
    /// Image files, backing files and devices the nodes opened, and whether they are written:
    /// the daemon reads them through descriptors it holds, but may open them again.
    pub images: Vec<(PathBuf, bool)>,
    /// Files (sockets, the pidfile) the daemon removes at exit.
    pub removed_files: Vec<PathBuf>,
    /// Directories the daemon removes at exit, with the files in them.
    pub removed_dirs: Vec<PathBuf>,
    /// What QMP may still do at run time, when a monitor is configured.
    pub qmp: Option<QmpPolicy>,
}

/// What a daemon with a QMP monitor does at run time besides serving: open images, create
/// export sockets and their private directories, resize files.
#[derive(Debug, Default, Clone)]
pub struct QmpPolicy {
    /// `--sandbox-allow-dir`: images may be opened (read, written, resized) and sockets
    /// created and removed anywhere beneath these.
    pub allowed_dirs: Vec<PathBuf>,
    /// Where new exports make (and remove) their private directories.
    pub runtime_dir: Option<PathBuf>,
}

/// Confines the process: Landlock as `policy` says, then the seccomp filter. A kernel that
/// lacks either feature (or part of Landlock) is logged as a warning naming what is missing,
/// and the daemon goes on without it; any other failure is an error.
pub fn enter(policy: &Policy) -> Result<(), String> {
    landlock::restrict(policy)?;
    seccomp::apply(policy.qmp.is_some())
}
