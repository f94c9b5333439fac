//! Host hygiene (issue 13, items 1 and 10), with the real binary: the pidfile, the sockets'
//! permissions, a live socket never taken over, an inherited socket used once, and `serve`
//! never probing an image its guest could have written.

mod common;

use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{symlink, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::path_str;

/// How long a daemon gets to start, log or exit.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Starts strata with `args`, without waiting for it to serve.
fn start<S: AsRef<OsStr>>(args: &[S]) -> Daemon {
    Daemon::spawn(args, TIMEOUT)
}

/// A daemon that is expected to refuse to start: its log, after checking it exited with an
/// error (rather than serving).
fn refused<S: AsRef<OsStr>>(args: &[S], stdin: Stdio) -> String {
    let mut d = Daemon::spawn_with_stdin(args, stdin, TIMEOUT);
    match d.exit_within(TIMEOUT) {
        Some(status) => {
            assert!(!status.success(), "strata succeeded:\n{}", d.log);
            std::mem::take(&mut d.log)
        }
        None => panic!("strata started instead of refusing:\n{}", d.log),
    }
}

/// `--export` of node n0 (a null-co node) on the socket `sock`, plus `extra` options.
fn export(id: &str, sock: &Path, extra: &str) -> String {
    format!(
        "type=vhost-user-blk,id={id},node-name=n0,addr.type=unix,addr.path={}{extra}",
        sock.display()
    )
}

/// A daemon command line: node n0, then each export, then `extra` arguments.
fn daemon_args(exports: &[String], extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--blockdev".to_string(),
        "driver=null-co,node-name=n0".into(),
    ];
    for e in exports {
        args.push("--export".into());
        args.push(e.clone());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Waits until `path` holds `content`.
fn wait_for_content(path: &Path, content: &str) {
    let deadline = Instant::now() + TIMEOUT;
    while std::fs::read_to_string(path).ok().as_deref() != Some(content) {
        assert!(
            Instant::now() < deadline,
            "{} never held {content:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn the_pidfile_is_written_once_the_exports_listen_and_removed_at_exit() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pidfile = dir.path().join("strata.pid");
    let socks: Vec<PathBuf> = (0..8)
        .map(|i| dir.path().join(format!("e{i}.sock")))
        .collect();
    let exports: Vec<String> = socks
        .iter()
        .enumerate()
        .map(|(i, s)| export(&format!("e{i}"), s, ""))
        .collect();
    let mut d = start(&daemon_args(&exports, &["--pidfile", path_str(&pidfile)]));
    // A client that waits for the pidfile to exist can connect at once, to every export.
    let deadline = Instant::now() + TIMEOUT;
    while !pidfile.exists() {
        assert!(
            Instant::now() < deadline,
            "no pidfile: {:?}\n{}",
            d.exit_within(TIMEOUT),
            d.log
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    for s in &socks {
        if let Err(e) = UnixStream::connect(s) {
            panic!("{}: {e}, though the pidfile exists", s.display());
        }
    }
    wait_for_content(&pidfile, &format!("{}\n", d.pid()));
    let (ok, log) = d.terminate();
    assert!(ok, "{log}");
    assert!(!pidfile.exists(), "the pidfile is left behind:\n{log}");
}

#[test]
fn a_daemon_that_fails_to_start_leaves_no_pidfile() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pidfile = dir.path().join("strata.pid");
    let unreachable = dir.path().join("no-such-dir").join("e0.sock");
    let log = refused(
        &daemon_args(
            &[export("e0", &unreachable, "")],
            &["--pidfile", path_str(&pidfile)],
        ),
        Stdio::null(),
    );
    assert!(log.contains("Could not listen"), "{log}");
    assert!(!pidfile.exists(), "a pidfile of a daemon that never served");
}

#[test]
fn a_second_daemon_with_the_same_pidfile_refuses_to_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pidfile = dir.path().join("strata.pid");
    let (a, b) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let first = start(&daemon_args(
        &[export("a", &a, "")],
        &["--pidfile", path_str(&pidfile)],
    ));
    let content = format!("{}\n", first.pid());
    wait_for_content(&pidfile, &content);
    let log = refused(
        &daemon_args(&[export("b", &b, "")], &["--pidfile", path_str(&pidfile)]),
        Stdio::null(),
    );
    assert!(
        log.contains(&format!("is locked by process {}", first.pid())),
        "{log}"
    );
    assert_eq!(std::fs::read_to_string(&pidfile).expect("pidfile"), content);
    assert!(!b.exists(), "the refused daemon listened");
    let (ok, log) = first.terminate();
    assert!(ok, "{log}");
}

#[test]
fn the_pidfile_is_never_written_through_a_symlink() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sock = dir.path().join("e0.sock");
    let target = dir.path().join("precious");
    std::fs::write(&target, b"precious").expect("write");
    let link = dir.path().join("strata.pid");
    symlink(&target, &link).expect("symlink");
    let args = daemon_args(&[export("e0", &sock, "")], &["--pidfile", path_str(&link)]);
    let log = refused(&args, Stdio::null());
    assert!(log.contains("is a symbolic link"), "{log}");
    assert_eq!(std::fs::read(&target).expect("read"), b"precious");
    // A dangling link: its target is not created either.
    let missing = dir.path().join("missing");
    std::fs::remove_file(&link).expect("remove link");
    symlink(&missing, &link).expect("symlink");
    let log = refused(&args, Stdio::null());
    assert!(log.contains("is a symbolic link"), "{log}");
    assert!(!missing.exists(), "created through a dangling link");
}

/// A group other than this process's, as (name, gid): one it may give files to.
fn other_group(own_gid: u32) -> (String, u32) {
    let groups = std::fs::read_to_string("/etc/group").expect("/etc/group");
    let mine = Command::new("id").arg("-G").output().expect("id -G");
    let mine: Vec<u32> = String::from_utf8_lossy(&mine.stdout)
        .split_whitespace()
        .filter_map(|g| g.parse().ok())
        .collect();
    let root = mine.contains(&0);
    groups
        .lines()
        .filter_map(|l| {
            let mut fields = l.split(':');
            let name = fields.next()?.to_string();
            let gid: u32 = fields.nth(1)?.parse().ok()?;
            Some((name, gid))
        })
        .find(|(_, gid)| *gid != own_gid && (root || mine.contains(gid)))
        .expect("a second group to give the socket to")
}

#[test]
fn sockets_are_0660_by_default_or_as_socket_mode_and_group_say() {
    let dir = tempfile::tempdir().expect("temp dir");
    let probe = dir.path().join("probe");
    std::fs::write(&probe, b"").expect("write");
    let own_gid = std::fs::metadata(&probe).expect("stat").gid();
    let (group, gid) = other_group(own_gid);
    let (a, b) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let mut d = start(&daemon_args(
        &[
            export("a", &a, ""),
            export("b", &b, &format!(",socket-mode=0640,socket-group={group}")),
        ],
        &[],
    ));
    d.wait_for("export 'b': serving");
    let mode = |p: &Path| std::fs::symlink_metadata(p).expect("stat socket").mode() & 0o7777;
    assert_eq!(mode(&a), 0o660, "default mode");
    assert_eq!(mode(&b), 0o640, "socket-mode");
    let meta = std::fs::symlink_metadata(&b).expect("stat socket");
    assert_eq!(meta.gid(), gid, "socket-group={group}");
    assert_eq!(
        std::fs::symlink_metadata(&a).expect("stat").gid(),
        own_gid,
        "no socket-group"
    );
}

#[test]
fn a_socket_in_use_is_not_taken_over() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sock = dir.path().join("vm.sock");
    let mut first = start(&daemon_args(&[export("first", &sock, "")], &[]));
    first.wait_for("serving node");
    let log = refused(
        &daemon_args(&[export("second", &sock, "")], &[]),
        Stdio::null(),
    );
    assert!(
        log.contains(&format!(
            "socket {} is in use by a running daemon",
            sock.display()
        )),
        "{log}"
    );
    // The first daemon still serves on the path.
    let _client = UnixStream::connect(&sock).expect("connect to the first daemon");
    first.wait_for(&format!("frontend connected (pid {}", std::process::id()));
    let (ok, log) = first.terminate();
    assert!(ok, "{log}");
}

#[test]
fn an_address_serves_one_export_only() {
    let dir = tempfile::tempdir().expect("temp dir");
    // One inherited listening socket (as stdin, descriptor 0) named by two exports.
    let listener = UnixListener::bind(dir.path().join("inherited.sock")).expect("bind");
    let fd_export =
        |id: &str| format!("type=vhost-user-blk,id={id},node-name=n0,addr.type=fd,addr.str=0");
    let log = refused(
        &daemon_args(&[fd_export("e0"), fd_export("e1")], &[]),
        Stdio::from(OwnedFd::from(listener)),
    );
    assert!(
        log.contains("export 'e1': addr.str=0 is already used by export 'e0'"),
        "{log}"
    );
    // One path named by two exports.
    let sock = dir.path().join("vm.sock");
    let log = refused(
        &daemon_args(&[export("e0", &sock, ""), export("e1", &sock, "")], &[]),
        Stdio::null(),
    );
    assert!(
        log.contains(&format!(
            "export 'e1': addr.path={} is already used by export 'e0'",
            sock.display()
        )),
        "{log}"
    );
}

fn qemu_img(args: &[&str]) {
    let o = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("run qemu-img");
    assert!(
        o.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `strata serve IMAGE --socket ... EXTRA`, running once its export serves; returns the line.
fn serve(image: &Path, dir: &Path, extra: &[&str]) -> (Daemon, String) {
    let sock = dir.join("serve.sock");
    let mut args = vec![
        "serve",
        path_str(image),
        "--socket",
        path_str(&sock),
        "--cached",
    ];
    args.extend_from_slice(extra);
    let mut d = start(&args);
    let line = d.wait_for("serving node");
    (d, line)
}

#[test]
fn serve_never_probes_an_image_its_guest_could_have_written() {
    let dir = tempfile::tempdir().expect("temp dir");
    // What a guest of a raw image can write into its sector 0 onwards: a qcow2 image of
    // 64 MiB whose backing file is a host file.
    let header = dir.path().join("header.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "/etc/passwd",
        "-F",
        "raw",
        path_str(&header),
        "64M",
    ]);
    let image = dir.path().join("disk.img");
    std::fs::write(&image, std::fs::read(&header).expect("read header")).expect("write");
    let raw_size = 4 << 20;
    std::fs::File::options()
        .write(true)
        .open(&image)
        .and_then(|f| f.set_len(raw_size))
        .expect("size the raw image");
    let (d, line) = serve(&image, dir.path(), &[]);
    // The guest sees its raw disk (4 MiB, starting with the header it wrote), not a 64 MiB
    // qcow2 disk over /etc/passwd.
    assert!(line.contains(&format!("({raw_size} bytes")), "{line}");
    assert!(
        d.log
            .contains("looks like a qcow2 image; it is served as raw"),
        "{}",
        d.log
    );
    let fds = std::fs::read_dir(format!("/proc/{}/fd", d.pid())).expect("list fds");
    for fd in fds.map_while(Result::ok) {
        let target = std::fs::read_link(fd.path()).unwrap_or_default();
        assert_ne!(
            target,
            Path::new("/etc/passwd"),
            "strata opened the backing file"
        );
    }
    let (ok, log) = d.terminate();
    assert!(ok, "{log}");
}

#[test]
fn serve_opens_qcow2_when_told() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&image), "32M"]);
    let (d, line) = serve(&image, dir.path(), &["--format", "qcow2"]);
    assert!(line.contains(&format!("({} bytes", 32 << 20)), "{line}");
    assert!(!d.log.contains("looks like"), "{}", d.log);
    let (ok, log) = d.terminate();
    assert!(ok, "{log}");
}

#[test]
fn serve_creates_its_image_new_never_through_a_symlink() {
    let dir = tempfile::tempdir().expect("temp dir");
    let elsewhere = dir.path().join("elsewhere.img");
    let image = dir.path().join("disk.img");
    symlink(&elsewhere, &image).expect("symlink");
    let sock = dir.path().join("serve.sock");
    let log = refused(
        &["serve", path_str(&image), "--socket", path_str(&sock)],
        Stdio::null(),
    );
    assert!(log.contains("Could not create"), "{log}");
    assert!(!elsewhere.exists(), "created through a dangling symlink");
}
