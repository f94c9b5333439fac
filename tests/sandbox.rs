//! `--sandbox` (issue 12) with the real daemon and a libblkio client: with the sandbox on (the
//! default) every thread of a serving daemon runs under the seccomp filter and the daemon
//! still serves every kind of request, across a reconnect, and stops cleanly on SIGTERM;
//! with `--sandbox off` no thread has a filter.

use std::io::{BufRead, BufReader};
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

const TIMEOUT: Duration = Duration::from_secs(20);
const IMAGE_SIZE: u64 = 64 << 20;
const LEN: usize = 64 << 10;

/// A running strata, killed if still running when dropped; its stderr lines on a channel.
struct Daemon {
    child: Child,
    lines: Receiver<String>,
    log: String,
}

impl Daemon {
    fn start(args: &[String], socket: &Path) -> Daemon {
        let mut child = Command::new(env!("CARGO_BIN_EXE_strata"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run strata");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut d = Daemon {
            child,
            lines,
            log: String::new(),
        };
        let deadline = Instant::now() + TIMEOUT;
        while !socket.exists() {
            d.drain();
            assert!(
                Instant::now() < deadline && d.child.try_wait().expect("wait").is_none(),
                "strata did not start:\n{}",
                d.log
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    fn drain(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.log.push_str(&line);
            self.log.push('\n');
        }
    }

    /// Seccomp mode (0 none, 2 filter) and name of every thread.
    fn thread_modes(&self) -> Vec<(String, u32)> {
        let tasks = PathBuf::from(format!("/proc/{}/task", self.child.id()));
        let mut modes = Vec::new();
        for task in std::fs::read_dir(tasks)
            .expect("list threads")
            .map_while(Result::ok)
        {
            let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
                continue; // the thread ended meanwhile
            };
            let field = |key: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(key))
                    .map(str::trim)
                    .unwrap_or_default()
                    .to_string()
            };
            let mode = field("Seccomp:").parse().expect("Seccomp: field");
            modes.push((field("Name:"), mode));
        }
        modes
    }

    /// SIGTERM, then the exit status and the whole log.
    fn terminate(mut self) -> (bool, String) {
        // SAFETY: kill references no memory; the pid is our own child's.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + TIMEOUT;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "no exit after SIGTERM:\n{}",
                self.log
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        // The stderr thread ends at EOF; take every line it read.
        std::thread::sleep(Duration::from_millis(50));
        self.drain();
        (status.success(), std::mem::take(&mut self.log))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A connected libblkio client with one memory region.
struct Client {
    queues: Vec<Blkioq>,
    blkio: Blkio,
    region: MemoryRegion,
}

fn err(e: blkio::Error) -> String {
    format!("{e} (errno {})", e.errno().raw_os_error())
}

impl Client {
    fn connect(socket: &Path) -> Client {
        let connect = || -> Result<Client, String> {
            let mut b = Blkio::new("virtio-blk-vhost-user").map_err(err)?;
            b.set_str("path", socket.to_str().ok_or("path")?)
                .map_err(err)?;
            b.connect().map_err(err)?;
            b.set_i32("num-queues", 2).map_err(err)?;
            let outcome = b.start().map_err(err)?;
            let region = b.alloc_mem_region(2 * LEN).map_err(err)?;
            b.map_mem_region(&region).map_err(err)?;
            Ok(Client {
                queues: outcome.queues,
                blkio: b,
                region,
            })
        };
        connect().unwrap_or_else(|e| panic!("connect to {}: {e}", socket.display()))
    }

    fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the region is a live read/write mapping of `len` bytes owned by the client,
        // and no request is in flight while the slice is borrowed (`run` waits).
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    /// Submits one request on queue `q` and returns its result.
    fn run(&mut self, q: usize, submit: impl FnOnce(&mut Blkioq, *mut u8)) -> i32 {
        let addr = self.region.addr as *mut u8;
        let queue = &mut self.queues[q];
        submit(queue, addr);
        let mut done = [MaybeUninit::<Completion>::uninit()];
        let mut timeout = TIMEOUT;
        let n = queue
            .do_io(&mut done, 1, Some(&mut timeout), None)
            .unwrap_or_else(|e| panic!("do_io: {}", err(e)));
        assert_eq!(n, 1, "no completion");
        // SAFETY: do_io initialised the one completion it returned.
        unsafe { done[0].assume_init_ref() }.ret
    }

    fn read(&mut self, q: usize, offset: u64) -> Vec<u8> {
        let r = self.run(q, |queue, buf| {
            queue.read(offset, buf, LEN, 0, ReqFlags::empty())
        });
        assert_eq!(r, 0, "read at {offset}");
        self.buf()[..LEN].to_vec()
    }

    fn write(&mut self, q: usize, offset: u64, data: &[u8]) {
        self.buf()[..LEN].copy_from_slice(data);
        let r = self.run(q, |queue, buf| {
            queue.write(offset, buf, LEN, 0, ReqFlags::empty())
        });
        assert_eq!(r, 0, "write at {offset}");
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.queues.clear();
        self.blkio.unmap_mem_region(&self.region);
    }
}

fn pattern(tag: u8) -> Vec<u8> {
    (0..LEN).map(|i| (i % 251) as u8 ^ tag).collect()
}

/// Every kind of request on both queues (discard where the node has `discard=unmap`); the
/// data written survives `check_previous`.
fn session(socket: &Path, tag: u8, check_previous: Option<u8>, discard: bool) -> Client {
    let mut c = Client::connect(socket);
    assert_eq!(c.blkio.get_u64("capacity").expect("capacity"), IMAGE_SIZE);
    if let Some(previous) = check_previous {
        assert_eq!(c.read(1, 0), pattern(previous), "data of the last session");
    }
    c.write(0, 0, &pattern(tag));
    assert_eq!(c.read(1, 0), pattern(tag));
    c.write(1, 1 << 20, &pattern(tag ^ 1));
    c.write(0, 2 << 20, &pattern(tag ^ 2));
    assert_eq!(c.run(0, |q, _| q.flush(0, ReqFlags::empty())), 0, "flush");
    let zeroes = c.run(1, |q, _| {
        q.write_zeroes(1 << 20, LEN as u64, 0, ReqFlags::empty())
    });
    assert_eq!(zeroes, 0, "write zeroes");
    if discard {
        let r = c.run(0, |q, _| {
            q.discard(2 << 20, LEN as u64, 0, ReqFlags::empty())
        });
        assert_eq!(r, 0, "discard");
    }
    assert_eq!(c.read(0, 1 << 20), vec![0; LEN], "zeroed range");
    c
}

fn path_str(p: &Path) -> String {
    p.to_str().expect("UTF-8 path").to_string()
}

#[test]
fn every_thread_of_a_serving_daemon_is_sandboxed_and_it_still_serves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(IMAGE_SIZE))
        .expect("image");
    let socket = dir.path().join("vm.sock");
    let pidfile = dir.path().join("strata.pid");
    let args = vec![
        "--blockdev".into(),
        format!(
            "driver=file,node-name=f0,filename={},cache.direct=on,discard=unmap",
            path_str(&image)
        ),
        "--blockdev".into(),
        "driver=raw,node-name=d0,file=f0,discard=unmap".into(),
        "--export".into(),
        format!(
            "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={},writable=on,num-queues=2",
            path_str(&socket)
        ),
        "--pidfile".into(),
        path_str(&pidfile),
    ];
    let mut daemon = Daemon::start(&args, &socket);
    let client = session(&socket, 0x5a, None, true);
    let modes = daemon.thread_modes();
    // The export's thread, vhost-user-backend's, the relays and the queues' workers.
    assert!(modes.len() >= 4, "threads: {modes:?}");
    assert!(
        modes.iter().all(|(_, mode)| *mode == 2),
        "threads: {modes:?}"
    );
    drop(client);
    // A reconnect starts new threads, under the filter too.
    let client = session(&socket, 0xa5, Some(0x5a), true);
    let modes = daemon.thread_modes();
    assert!(
        modes.iter().all(|(_, mode)| *mode == 2),
        "threads: {modes:?}"
    );
    drop(client);
    daemon.drain();
    let (ok, log) = daemon.terminate();
    assert!(ok, "exit status after SIGTERM:\n{log}");
    for line in ["sandbox: Landlock (ABI", "sandbox: seccomp allows"] {
        assert!(log.contains(line), "no '{line}' in the log:\n{log}");
    }
    assert!(!log.contains("refuses"), "a call was refused:\n{log}");
    // What the daemon removes at exit, the sandbox let it remove.
    assert!(!socket.exists() && !pidfile.exists(), "left behind:\n{log}");
}

#[test]
fn sandbox_off_serves_without_a_filter() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(IMAGE_SIZE))
        .expect("image");
    let socket = dir.path().join("vm.sock");
    let args = [
        "serve",
        &path_str(&image),
        "--socket",
        &path_str(&socket),
        "--queues",
        "2",
        "--sandbox",
        "off",
    ]
    .map(String::from);
    let daemon = Daemon::start(&args, &socket);
    let client = session(&socket, 0x33, None, false);
    let modes = daemon.thread_modes();
    assert!(
        modes.iter().all(|(_, mode)| *mode == 0),
        "threads: {modes:?}"
    );
    drop(client);
    let (ok, log) = daemon.terminate();
    assert!(ok, "exit status after SIGTERM:\n{log}");
    assert!(log.contains("sandbox: off"), "{log}");
}
