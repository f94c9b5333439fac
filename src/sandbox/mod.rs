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
//!
//! With rbd nodes ([`Policy::librbd`]) the main thread is not alone: librados and librbd
//! started their threads (messenger, timers, work queues, admin socket, log) when the nodes
//! opened, and strata's blocking helper that opened them still waits for work. seccomp still
//! covers them (TSYNC), with librbd's network calls added; Landlock, which this kernel cannot
//! apply to running threads (ABI 7 has no TSYNC), covers strata's own serving threads only
//! (they start after it): the threads that parse the guest's requests cannot open files or
//! TCP connections, while librbd's threads can open files (seccomp allows `openat`, as it
//! does for everyone) and connect to the cluster. All share one address space, so Landlock
//! there is a limit on what the serving threads' own calls reach, not a wall between them
//! and librbd. Opening the images after Landlock instead would not help: librbd's threads
//! would then need the configuration, keyring and log files and TCP to any OSD port in the
//! ruleset, which is most of what Landlock forbids.

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
    /// rbd nodes are open: librbd's threads already run (outside Landlock) and its network
    /// calls (TCP sockets to the cluster) are allowed.
    pub librbd: bool,
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
    seccomp::apply(policy.qmp.is_some(), policy.librbd)
}
