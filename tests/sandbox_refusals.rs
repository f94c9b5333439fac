//! `--sandbox` (issue 12): a forbidden call from a serving thread is refused.
//!
//! The test runs itself again as a child that calls `strata::sandbox::enter`, the function
//! the daemon calls, on its main thread while it is alone (as the daemon does), then starts a
//! thread, as the daemon's serving threads are started after the sandbox, and tries calls
//! from it: each prints one line, which the parent checks. A call the sandbox wrongly lets
//! through changes its line (or, for execve, replaces the child, whose lines then stop).

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use strata::sandbox::{self, Policy};

/// Set in the child: the directory with the files to try.
const PROBE_DIR: &str = "STRATA_SANDBOX_PROBE_DIR";

fn main() -> ExitCode {
    match std::env::var_os(PROBE_DIR) {
        Some(dir) => probe(Path::new(&dir)),
        None => {
            forbidden_calls_from_a_serving_thread_are_refused();
            println!("test forbidden_calls_from_a_serving_thread_are_refused ... ok");
            ExitCode::SUCCESS
        }
    }
}

fn forbidden_calls_from_a_serving_thread_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("image"), vec![7u8; 4096]).expect("image");
    std::fs::write(dir.path().join("outside"), b"secret").expect("outside file");
    let (status, stdout, stderr) = run_probe(dir.path());
    let context = format!("status {status}\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(status.success(), "{context}");
    for line in [
        // Allowed: what serving needs.
        "open the image read-write: ok",
        "write to an eventfd: ok",
        "unix socket: ok",
        // Landlock: no file outside the policy, no new file.
        "open a file beside the image: refused (errno 13)",
        "create a file: refused (errno 13)",
        // seccomp: no programs, processes, network sockets, other processes' memory or
        // executable memory.
        "execve /bin/true: refused (errno 1)",
        "fork: refused (errno 1)",
        "inet socket: refused (errno 1)",
        "process_vm_readv: refused (errno 1)",
        "executable mapping: refused (errno 1)",
        "probe done",
    ] {
        assert!(stdout.lines().any(|l| l == line), "no '{line}': {context}");
    }
    // The refusals are reported, naming the thread and the call (execve is 59 on x86_64).
    #[cfg(target_arch = "x86_64")]
    assert!(
        stderr.contains(
            "thread 'probe-worker' made system call 59 (x86_64), which the sandbox refuses"
        ),
        "{context}"
    );
    assert!(stderr.contains("sandbox: Landlock (ABI"), "{context}");
}

/// Runs the probe child; a child that does not finish in time (a broken sandbox may let it
/// do anything) is killed and fails the test.
fn run_probe(dir: &Path) -> (ExitStatus, String, String) {
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .env(PROBE_DIR, dir)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the probe");
    let read_all = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = read_all(Box::new(child.stdout.take().expect("piped stdout")));
    let stderr = read_all(Box::new(child.stderr.take().expect("piped stderr")));
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the probe") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the probe did not finish in 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = |t: std::thread::JoinHandle<String>| t.join().expect("pipe reader");
    (status, text(stdout), text(stderr))
}

/// The child: enters the sandbox, then tries calls from a new thread.
fn probe(dir: &Path) -> ExitCode {
    env_logger::init();
    let policy = Policy {
        images: vec![(dir.join("image"), true)],
        removed_files: vec![dir.join("socket")],
        removed_dirs: Vec::new(),
        qmp: None,
        librbd: false,
    };
    if let Err(e) = sandbox::enter(&policy) {
        eprintln!("enter: {e}");
        return ExitCode::FAILURE;
    }
    let dir = dir.to_path_buf();
    let worker = std::thread::Builder::new()
        .name("probe-worker".into())
        .spawn(move || try_calls(&dir))
        .expect("start a thread in the sandbox");
    if worker.join().is_err() {
        return ExitCode::FAILURE;
    }
    println!("probe done");
    ExitCode::SUCCESS
}

fn try_calls(dir: &Path) {
    let open = |path: PathBuf, create: bool| {
        OpenOptions::new()
            .read(true)
            .write(create)
            .create_new(create)
            .open(path)
            .map(drop)
    };
    report(
        "open the image read-write",
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join("image"))
            .map(drop),
    );
    report(
        "open a file beside the image",
        open(dir.join("outside"), false),
    );
    report("create a file", open(dir.join("new"), true));
    report("write to an eventfd", eventfd_write());
    report("unix socket", socket(libc::AF_UNIX));
    report("inet socket", socket(libc::AF_INET));
    report("execve /bin/true", execve());
    report("fork", fork());
    report("process_vm_readv", process_vm_readv());
    report("executable mapping", exec_mapping());
}

fn report(what: &str, result: io::Result<()>) {
    match result {
        Ok(()) => println!("{what}: ok"),
        Err(e) => println!("{what}: refused (errno {})", e.raw_os_error().unwrap_or(0)),
    }
}

fn cvt<T: Default + PartialOrd>(r: T) -> io::Result<T> {
    if r < T::default() {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn eventfd_write() -> io::Result<()> {
    // SAFETY: eventfd references no memory.
    let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) })?;
    let one = 1u64;
    // SAFETY: writes 8 bytes from a local to the eventfd just created.
    let r = cvt(unsafe { libc::write(fd, (&one as *const u64).cast(), 8) });
    // SAFETY: closes the eventfd this function created.
    unsafe { libc::close(fd) };
    r.map(drop)
}

fn socket(domain: libc::c_int) -> io::Result<()> {
    // SAFETY: socket references no memory.
    let fd = cvt(unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: closes the socket just created.
    unsafe { libc::close(fd) };
    Ok(())
}

fn execve() -> io::Result<()> {
    let path = CString::new("/bin/true").expect("no NUL");
    let argv = [path.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null()];
    // SAFETY: NUL-terminated path and NULL-terminated argv and envp, alive for the call; on
    // success the process becomes /bin/true (and the parent sees the missing lines).
    cvt(unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) }).map(drop)
}

fn fork() -> io::Result<()> {
    // SAFETY: if the fork happened, the child only exits at once (no allocation, no locks).
    match cvt(unsafe { libc::fork() })? {
        // SAFETY: _exit ends the forked child without touching its copy of the parent's state.
        0 => unsafe { libc::_exit(0) },
        pid => {
            let mut status = 0;
            // SAFETY: reaps the child just forked into a local.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            Ok(())
        }
    }
}

/// Reads 8 bytes of this process's own memory the way a debugger reads another's.
fn process_vm_readv() -> io::Result<()> {
    let source = 42u64;
    let mut copy = 0u64;
    let local = libc::iovec {
        iov_base: (&mut copy as *mut u64).cast(),
        iov_len: 8,
    };
    let remote = libc::iovec {
        iov_base: (&source as *const u64).cast_mut().cast(),
        iov_len: 8,
    };
    // SAFETY: both iovecs describe 8-byte locals of this process, alive for the call.
    cvt(unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) }).map(drop)
}

fn exec_mapping() -> io::Result<()> {
    // SAFETY: an anonymous private mapping, unmapped at once if it was made.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_EXEC,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `p` is the 4096-byte mapping made above.
    unsafe { libc::munmap(p, 4096) };
    Ok(())
}
