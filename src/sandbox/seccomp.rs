//! The seccomp half of the sandbox: the system calls the serving threads make, and no other.
//!
//! The list comes from tracing the daemon (strace -f) through libblkio and QEMU guest sessions:
//! connect, every kind of request, disconnect, reconnect, SIGTERM. A call outside it traps
//! (SIGSYS): the handler names it on stderr and makes it fail with EPERM (see `sigsys.rs`).
//! What is left out on purpose: starting programs (execve), new processes (fork, clone
//! without CLONE_THREAD), sockets other than Unix ones, new listening sockets, executable
//! memory, tracing other processes (ptrace, process_vm_*), mounts, credentials, signals to
//! other processes.
//!
//! With rbd nodes, librbd's own threads make a few more calls, also found with strace (a
//! libblkio client's I/O, an OSD and a monitor killed and restarted, SIGTERM): TCP sockets
//! to the cluster and their options, the admin socket's accept, `uname`.
//!
//! Only x86_64 has a filter; elsewhere [`apply`] warns that system calls are not restricted.

/// Installs the filter on every thread of the process (TSYNC); threads started later inherit
/// it. A kernel without seccomp filters is a warning, any other failure an error.
/// With `qmp`, the calls that QMP commands make at run time are allowed too: listening on new
/// Unix sockets (block-export-add), making directories, setting a socket's mode and group,
/// and sizing block devices (blockdev-add, block_resize). With `librbd`, what librbd's
/// threads do: TCP connections to the cluster (IPv4 or IPv6).
#[cfg(target_arch = "x86_64")]
pub fn apply(qmp: bool, librbd: bool) -> Result<(), String> {
    use seccompiler::{apply_filter_all_threads, BpfProgram, Error};

    let allowlist: BpfProgram = x86_64::allowlist(qmp, librbd)?;
    let no_clone3: BpfProgram = x86_64::clone3_unavailable()?;
    super::sigsys::install()?;
    for filter in [&no_clone3, &allowlist] {
        match apply_filter_all_threads(filter) {
            Ok(()) => {}
            Err(Error::Seccomp(e) | Error::Prctl(e))
                if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) =>
            {
                log::warn!(
                    "sandbox: this kernel lacks seccomp filters ({e}): system calls are not \
                     restricted"
                );
                return Ok(());
            }
            Err(e) => return Err(format!("Could not install the seccomp filter: {e}")),
        }
    }
    log::info!("sandbox: seccomp allows only the system calls serving needs, on every thread");
    Ok(())
}

/// No filter for this architecture: says so.
#[cfg(not(target_arch = "x86_64"))]
pub fn apply(_qmp: bool, _librbd: bool) -> Result<(), String> {
    log::warn!(
        "sandbox: no seccomp filter for {}: system calls are not restricted",
        std::env::consts::ARCH
    );
    Ok(())
}

#[cfg(target_arch = "x86_64")]
mod x86_64 {
    use std::collections::BTreeMap;

    use seccompiler::{
        BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
        SeccompRule, TargetArch,
    };

    /// BLKDISCARD (the file driver on block devices); libc lacks it.
    const BLKDISCARD: u64 = 0x1277;

    /// BLKGETSIZE64 and BLKSSZGET: a block device's size and logical block size, read when
    /// QMP opens or resizes one.
    const BLKGETSIZE64: u64 = 0x8008_1272;
    const BLKSSZGET: u64 = 0x1268;

    /// What QMP commands add at run time (Landlock still confines the paths): new listening
    /// sockets and the directories, modes and groups of export sockets; writing back files
    /// a new node opened.
    const QMP_RUNTIME: &[i64] = &[
        libc::SYS_bind,
        libc::SYS_listen,
        // The monitor's write timeout on each client (SO_SNDTIMEO).
        libc::SYS_setsockopt,
        // Export sockets are created owner-only (umask) before they get their mode.
        libc::SYS_umask,
        libc::SYS_mkdir,
        libc::SYS_mkdirat,
        libc::SYS_chmod,
        libc::SYS_fchmod,
        libc::SYS_fchmodat,
        libc::SYS_fchown,
        libc::SYS_fchownat,
        libc::SYS_lseek,
        libc::SYS_pread64,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_fstat,
        libc::SYS_lstat,
        libc::SYS_stat,
        // A qcow2 node added at run time resolves its image's path for the backing policy
        // (realpath).
        libc::SYS_readlink,
        libc::SYS_readlinkat,
        // blockdev-create's preallocation of a new file (falloc, full).
        libc::SYS_fallocate,
        libc::SYS_pwrite64,
    ];

    /// What librbd's threads add (messenger, admin socket, context): the name of the host
    /// (`uname`), the local address of a connection, the admin socket's clients (accept, and
    /// its replies with writev). Their sockets, options and flags are checked below.
    const LIBRBD: &[i64] = &[
        libc::SYS_uname,
        libc::SYS_getsockname,
        libc::SYS_getpeername,
        libc::SYS_accept,
        libc::SYS_writev,
    ];

    /// The socket options Ceph's messenger sets on its TCP connections (net_handler.cc):
    /// TCP_NODELAY, and the receive buffer and priority where the configuration asks.
    const LIBRBD_SOCKOPTS: &[(i32, i32)] = &[
        (libc::IPPROTO_TCP, libc::TCP_NODELAY),
        (libc::SOL_SOCKET, libc::SO_RCVBUF),
        (libc::SOL_SOCKET, libc::SO_PRIORITY),
        (libc::IPPROTO_IP, libc::IP_TOS),
        (libc::IPPROTO_IPV6, libc::IPV6_TCLASS),
    ];

    /// The type bits of socket()'s second argument (the rest are SOCK_CLOEXEC/NONBLOCK).
    const SOCK_TYPE_MASK: u64 = 0xf;

    /// PROT_EXEC: never asked for, so never granted.
    const PROT_EXEC: u64 = libc::PROT_EXEC as u64;

    /// The allowlist: a call not in it traps.
    pub(super) fn allowlist(qmp: bool, librbd: bool) -> Result<BpfProgram, String> {
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
        for &call in UNCONDITIONAL {
            rules.insert(call, Vec::new());
        }
        if librbd {
            for &call in LIBRBD {
                rules.insert(call, Vec::new());
            }
            let sockopts = LIBRBD_SOCKOPTS
                .iter()
                .map(|&(level, name)| {
                    rule(&[
                        condition(1, SeccompCmpOp::Eq, level as u64),
                        condition(2, SeccompCmpOp::Eq, name as u64),
                    ])
                })
                .collect::<Result<_, _>>()?;
            rules.insert(libc::SYS_setsockopt, sockopts);
        }
        // (QMP's setsockopt, unconditional, replaces librbd's checked one.)
        if qmp {
            for &call in QMP_RUNTIME {
                rules.insert(call, Vec::new());
            }
        }
        // Allowed here so that the other filter's ENOSYS decides: a trap would win over it.
        rules.insert(libc::SYS_clone3, Vec::new());
        // Threads only: vhost-user-backend starts its workers for every frontend.
        rules.insert(
            libc::SYS_clone,
            vec![rule(&[masked_eq(
                0,
                libc::CLONE_THREAD as u64,
                libc::CLONE_THREAD as u64,
            )])?],
        );
        // Memory, never executable (no code is loaded after start-up).
        for call in [libc::SYS_mmap, libc::SYS_mprotect] {
            rules.insert(call, vec![rule(&[masked_eq(2, PROT_EXEC, 0)])?]);
        }
        // Unix sockets only: the relay connects to its private socket on each connection.
        // librbd: TCP (stream sockets over IPv4 or IPv6) to the cluster, nothing else.
        let mut sockets = any_of(0, &[libc::AF_UNIX as u64])?;
        if librbd {
            for family in [libc::AF_INET, libc::AF_INET6] {
                sockets.push(rule(&[
                    condition(0, SeccompCmpOp::Eq, family as u64),
                    masked_eq(1, SOCK_TYPE_MASK, libc::SOCK_STREAM as u64),
                ])?);
            }
        }
        rules.insert(libc::SYS_socket, sockets);
        // Duplicated descriptors, the memory files' and in-flight buffer's seals, the images' locks (QEMU's OFD locks),
        // directories read at exit (fdopendir).
        // librbd's messenger makes its sockets non-blocking (F_SETFL).
        // Rust's standard library, built with debug assertions, checks that a descriptor is
        // open (F_GETFD, which only reads its close-on-exec flag) before it closes it.
        let mut fcntls = vec![
            libc::F_GETFD,
            libc::F_DUPFD_CLOEXEC,
            libc::F_GETFL,
            libc::F_SETFD,
            libc::F_GET_SEALS,
            libc::F_ADD_SEALS,
            libc::F_OFD_GETLK,
            libc::F_OFD_SETLK,
        ];
        if librbd {
            fcntls.push(libc::F_SETFL);
        }
        rules.insert(
            libc::SYS_fcntl,
            any_of(1, &fcntls.iter().map(|&c| c as u64).collect::<Vec<_>>())?,
        );
        // Blocking sockets again after accept; discards on block devices (helper threads).
        let mut ioctls = vec![libc::FIONBIO, BLKDISCARD];
        if qmp {
            ioctls.extend([BLKGETSIZE64, BLKSSZGET]);
        }
        rules.insert(libc::SYS_ioctl, any_of(1, &ioctls)?);
        // Thread names (set by each new thread, read by the SIGSYS report).
        rules.insert(
            libc::SYS_prctl,
            any_of(0, &[libc::PR_SET_NAME as u64, libc::PR_GET_NAME as u64])?,
        );
        // Signals to the daemon's own threads only (abort, a panic's raise).
        rules.insert(
            libc::SYS_tgkill,
            any_of(0, &[u64::from(std::process::id())])?,
        );
        compile(rules, SeccompAction::Trap, SeccompAction::Allow)
    }

    /// A second filter that makes clone3 fail with ENOSYS, so that glibc creates threads with
    /// clone, whose flags (unlike clone3's, in memory) a filter can check. Of two filters'
    /// verdicts the kernel takes the stricter, and this one's ENOSYS is stricter than the
    /// allowlist's Allow.
    pub(super) fn clone3_unavailable() -> Result<BpfProgram, String> {
        let rules = BTreeMap::from([(libc::SYS_clone3, Vec::new())]);
        compile(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
        )
    }

    /// Calls allowed whatever their arguments (Landlock confines the paths). Block I/O,
    /// flushes, fallocate and the memory table's checks go through io_uring or these.
    const UNCONDITIONAL: &[i64] = &[
        // Requests (io_uring), the frontend's messages and memory tables, notifications.
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_close,
        libc::SYS_statx,
        libc::SYS_newfstatat,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        libc::SYS_eventfd2,
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_poll,
        libc::SYS_accept4,
        libc::SYS_connect,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_shutdown,
        libc::SYS_getsockopt,
        // Removing the sockets, private directories and pidfile at exit.
        libc::SYS_openat,
        libc::SYS_getdents64,
        libc::SYS_unlink,
        libc::SYS_unlinkat,
        // The in-flight buffer a frontend asks for (GET_INFLIGHT_FD): a sealed memfd.
        libc::SYS_memfd_create,
        libc::SYS_ftruncate,
        // Memory and threads.
        libc::SYS_munmap,
        libc::SYS_madvise,
        libc::SYS_mremap,
        libc::SYS_brk,
        libc::SYS_futex,
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_sigaltstack,
        libc::SYS_sched_yield,
        libc::SYS_sched_getaffinity,
        libc::SYS_gettid,
        libc::SYS_getpid,
        libc::SYS_getrandom,
        // Waiting (retries, draining) and clocks (when the vDSO cannot answer).
        libc::SYS_clock_nanosleep,
        libc::SYS_clock_gettime,
        // Signals (SIGTERM through signal-hook, glibc's own handlers) and exits.
        libc::SYS_rt_sigaction,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_restart_syscall,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ];

    fn compile(
        rules: BTreeMap<i64, Vec<SeccompRule>>,
        mismatch: SeccompAction,
        matched: SeccompAction,
    ) -> Result<BpfProgram, String> {
        SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64)
            .and_then(BpfProgram::try_from)
            .map_err(|e| format!("Could not build the seccomp filter: {e}"))
    }

    fn rule(conditions: &[Result<SeccompCondition, String>]) -> Result<SeccompRule, String> {
        let conditions = conditions.iter().cloned().collect::<Result<Vec<_>, _>>()?;
        SeccompRule::new(conditions).map_err(|e| format!("Could not build a seccomp rule: {e}"))
    }

    /// One rule per value: argument `arg` equals one of `values`.
    fn any_of(arg: u8, values: &[u64]) -> Result<Vec<SeccompRule>, String> {
        values
            .iter()
            .map(|&v| rule(&[condition(arg, SeccompCmpOp::Eq, v)]))
            .collect()
    }

    fn masked_eq(arg: u8, mask: u64, value: u64) -> Result<SeccompCondition, String> {
        condition(arg, SeccompCmpOp::MaskedEq(mask), value)
    }

    /// A condition on the low 32 bits of argument `arg`: every argument checked here is an
    /// int or the low flags of one, and the kernel ignores the upper bits of an int.
    fn condition(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, String> {
        SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
            .map_err(|e| format!("Could not build a seccomp condition: {e}"))
    }
}
