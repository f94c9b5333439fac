//! `--sandbox` (issue 12) with the real daemon and a libblkio client: with the sandbox on (the
//! default) every thread of a serving daemon runs under the seccomp filter and the daemon
//! still serves every kind of request, across a reconnect, and stops cleanly on SIGTERM;
//! with `--sandbox off` no thread has a filter.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use blkio::ReqFlags;
use common::client::{pattern, Client, ClientConfig};
use common::daemon::Daemon;
use common::path_str;

const TIMEOUT: Duration = Duration::from_secs(20);
const IMAGE_SIZE: u64 = 64 << 20;
const LEN: usize = 64 << 10;

/// Starts strata with `args`, serving once `socket` exists.
fn start(args: &[String], socket: &Path) -> Daemon {
    let mut d = Daemon::spawn(args, TIMEOUT);
    d.wait_for_sockets(&[socket]);
    d
}

/// Creates a sparse image of `IMAGE_SIZE` bytes in `dir`; returns its path and the path of a
/// socket beside it.
fn disk_and_socket(dir: &Path) -> (PathBuf, PathBuf) {
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(IMAGE_SIZE))
        .expect("image");
    (image, dir.join("vm.sock"))
}

fn connect(socket: &Path) -> Client {
    let config = ClientConfig {
        region_len: 2 * LEN,
        read_only: false,
        timeout: TIMEOUT,
    };
    Client::connect(socket, config)
}

/// Every kind of request on both queues (discard where the node has `discard=unmap`); the
/// data written survives `check_previous`.
fn session(socket: &Path, tag: u32, check_previous: Option<u32>, discard: bool) -> Client {
    let mut c = connect(socket);
    assert_eq!(c.blkio.get_u64("capacity").expect("capacity"), IMAGE_SIZE);
    if let Some(previous) = check_previous {
        assert_eq!(
            c.read(1, 0, LEN),
            pattern(previous, LEN),
            "data of the last session"
        );
    }
    c.write(0, 0, &pattern(tag, LEN));
    assert_eq!(c.read(1, 0, LEN), pattern(tag, LEN));
    c.write(1, 1 << 20, &pattern(tag ^ 1, LEN));
    c.write(0, 2 << 20, &pattern(tag ^ 2, LEN));
    c.flush();
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
    assert_eq!(c.read(0, 1 << 20, LEN), vec![0; LEN], "zeroed range");
    c
}

#[test]
fn every_thread_of_a_serving_daemon_is_sandboxed_and_it_still_serves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (image, socket) = disk_and_socket(dir.path());
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
        path_str(&pidfile).into(),
    ];
    let mut daemon = start(&args, &socket);
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
    let (image, socket) = disk_and_socket(dir.path());
    let args = [
        "serve",
        path_str(&image),
        "--socket",
        path_str(&socket),
        "--queues",
        "2",
        "--sandbox",
        "off",
    ]
    .map(String::from);
    let daemon = start(&args, &socket);
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
