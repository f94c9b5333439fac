//! QMP conformance: tests/qmp/conformance.py (the protocol, nodes, exports),
//! tests/qmp/jobs.py (blockdev-create and jobs), tests/qmp/jobs_exit.py (jobs at SIGTERM) and
//! tests/qmp/schema.py (query-qmp-schema and the argument checks it describes), QEMU's own
//! client library (qemu.qmp) driving
//! the monitor, run against strata (with the sandbox on) and against qemu-storage-daemon, so
//! that every check not marked strata-only holds for both.

mod faultfs_rig;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use faultfs_rig::Client;
use strata_faultfs::Mount;

/// Whether `python3` has qemu.qmp and qemu-storage-daemon exists; under CI a missing one fails
/// the test (scripts/install-deps.sh installs both).
fn prerequisites() -> bool {
    let qmp = Command::new("python3")
        .args(["-c", "import qemu.qmp"])
        .status()
        .is_ok_and(|s| s.success());
    let qsd = Command::new("qemu-storage-daemon")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let missing = match (qmp, qsd) {
        (true, true) => return true,
        (false, _) => "python3 module qemu.qmp (pip install qemu.qmp)",
        (_, false) => "qemu-storage-daemon",
    };
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("cannot run under CI: {missing} is missing (scripts/install-deps.sh)");
    }
    eprintln!("SKIPPED: {missing} is missing (scripts/install-deps.sh installs it)");
    false
}

/// Runs the script tests/qmp/NAME.py against `daemon` (its label and binary, then `extra`
/// arguments) and asserts that every check passed.
fn run_script(name: &str, daemon: &str, binary: &str, extra: &[&std::ffi::OsStr]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/qmp/{name}.py"));
    let out = Command::new("python3")
        .arg(&script)
        .args([daemon, binary])
        .args(extra)
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{name} against {daemon} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
}

fn conformance(daemon: &str, binary: &str) {
    run_script("conformance", daemon, binary, &[]);
}

#[test]
fn qmp_conformance_strata() {
    if prerequisites() {
        conformance("strata", env!("CARGO_BIN_EXE_strata"));
    }
}

#[test]
fn qmp_conformance_qemu_storage_daemon() {
    if prerequisites() {
        conformance("qsd", "qemu-storage-daemon");
    }
}

/// strata-bench, the libblkio client, built beside the strata binary (scripts/test.sh builds
/// the workspace first); under CI a missing one fails the test.
fn bench_binary() -> Option<std::path::PathBuf> {
    let bench = Path::new(env!("CARGO_BIN_EXE_strata")).with_file_name("strata-bench");
    if bench.exists() {
        return Some(bench);
    }
    let missing = format!(
        "{} is missing (cargo build --release -p strata-bench)",
        bench.display()
    );
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("cannot run under CI: {missing}");
    }
    eprintln!("SKIPPED: {missing}");
    None
}

/// tests/qmp/jobs.py: blockdev-create and the job commands, against `daemon`.
fn jobs(daemon: &str, binary: &str) {
    if let Some(bench) = bench_binary() {
        run_script("jobs", daemon, binary, &[bench.as_os_str()]);
    }
}

#[test]
fn qmp_jobs_strata() {
    if prerequisites() {
        jobs("strata", env!("CARGO_BIN_EXE_strata"));
    }
}

#[test]
fn qmp_jobs_qemu_storage_daemon() {
    if prerequisites() {
        jobs("qsd", "qemu-storage-daemon");
    }
}

/// Does the libblkio request `IO SOCKET OP OFFSET LEN` of tests/qmp/stats.py (OP: read,
/// write, flush, discard, write-zeroes) and returns its result (0 or -errno); `CLOSE SOCKET`
/// disconnects, `FAULT COMMAND` gives the faultfs mount a command (0 or -1).
fn serve_request(line: &str, clients: &mut HashMap<String, Client>, mount: Option<&Mount>) -> i32 {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["IO", socket, op, offset, len] => {
            let (offset, len): (u64, u64) = (
                offset.parse().expect("IO offset"),
                len.parse().expect("IO length"),
            );
            let c = clients
                .entry(socket.to_string())
                .or_insert_with(|| Client::connect(Path::new(socket), 1 << 20));
            match *op {
                "read" => c.read(offset, len as usize).err().unwrap_or(0),
                "write" => c.write(offset, &vec![0x5a; len as usize]),
                "flush" => c.flush(),
                "discard" => c.discard(offset, len),
                "write-zeroes" => c.write_zeroes(offset, len),
                other => panic!("stats.py asked for {other}"),
            }
        }
        ["CLOSE", socket] => {
            clients.remove(*socket);
            0
        }
        ["FAULT", command @ ..] => {
            let mount = mount.expect("stats.py asked for a fault without a faultfs mount");
            mount.command(&command.join(" ")).map_or(-1, |()| 0)
        }
        _ => panic!("stats.py sent {line:?}"),
    }
}

/// Runs tests/qmp/stats.py against `daemon` (with, for strata, a strata-faultfs mount at
/// `mnt` for injected I/O errors), answering its requests for libblkio I/O.
fn stats(daemon: &str, binary: &str, mount: Option<&Mount>) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/qmp/stats.py");
    let err_log = tempfile::NamedTempFile::new().expect("stderr file");
    let mnt = mount.map_or_else(|| "-".to_string(), |m| m.path().display().to_string());
    let mut child = Command::new("python3")
        .arg(&script)
        .args([daemon, binary, &mnt])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(err_log.reopen().expect("stderr file"))
        .spawn()
        .expect("run python3");
    let mut to_script = child.stdin.take().expect("stdin");
    let from_script = BufReader::new(child.stdout.take().expect("stdout"));
    let mut clients = HashMap::new();
    let mut output = String::new();
    for line in from_script.lines() {
        let line = line.expect("read stats.py output");
        if line.starts_with("IO ") || line.starts_with("CLOSE ") || line.starts_with("FAULT ") {
            let result = serve_request(&line, &mut clients, mount);
            writeln!(to_script, "{result}").expect("answer stats.py");
            to_script.flush().expect("answer stats.py");
        } else {
            output.push_str(&line);
            output.push('\n');
        }
    }
    drop(clients);
    let status = child.wait().expect("wait for python3");
    let stderr = std::fs::read_to_string(err_log.path()).unwrap_or_default();
    assert!(
        status.success(),
        "stats against {daemon} failed:\n{output}\n{stderr}"
    );
    assert!(output.contains(" passed, 0 failed"), "{output}");
}

/// A strata-faultfs mount of a directory holding `faulty.img`; None (skipped) where FUSE cannot run.
fn faultfs() -> Option<(tempfile::TempDir, Mount)> {
    if !faultfs_rig::require_fuse() {
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("backing")).expect("mkdir");
    std::fs::create_dir(dir.path().join("mnt")).expect("mkdir");
    // The image stats.py serves as `faulty.img` (16 MiB, its SIZE).
    std::fs::File::create(dir.path().join("backing/faulty.img"))
        .and_then(|f| f.set_len(16 << 20))
        .expect("create the faulty image");
    let mount = Mount::new(&dir.path().join("backing"), &dir.path().join("mnt"))
        .expect("mount strata-faultfs");
    Some((dir, mount))
}

#[test]
fn qmp_stats_strata() {
    if !prerequisites() {
        return;
    }
    let Some((_dir, mount)) = faultfs() else {
        return;
    };
    stats("strata", env!("CARGO_BIN_EXE_strata"), Some(&mount));
    mount.unmount().expect("unmount");
}

#[test]
fn qmp_stats_qemu_storage_daemon() {
    if prerequisites() {
        stats("qsd", "qemu-storage-daemon", None);
    }
}

/// tests/qmp/schema.py against `daemon`: every command's arguments as its query-qmp-schema
/// describes them (against strata, also compared with qemu-storage-daemon's schema).
fn schema(daemon: &str, binary: &str) {
    run_script("schema", daemon, binary, &[]);
}

#[test]
fn qmp_schema_strata() {
    if prerequisites() {
        schema("strata", env!("CARGO_BIN_EXE_strata"));
    }
}

#[test]
fn qmp_schema_qemu_storage_daemon() {
    if prerequisites() {
        schema("qsd", "qemu-storage-daemon");
    }
}

/// tests/qmp/jobs_exit.py against `daemon`: a create running at SIGTERM is cancelled and
/// waited for, every job dismissed, no half image left, nothing else removed.
fn jobs_exit(daemon: &str, binary: &str) {
    run_script("jobs_exit", daemon, binary, &[]);
}

#[test]
fn qmp_jobs_exit_strata() {
    if prerequisites() {
        jobs_exit("strata", env!("CARGO_BIN_EXE_strata"));
    }
}

#[test]
fn qmp_jobs_exit_qemu_storage_daemon() {
    if prerequisites() {
        jobs_exit("qsd", "qemu-storage-daemon");
    }
}

/// The libblkio client tests/qmp/reopen.py asks for: "write SOCKET OFFSET TAG" writes one
/// block of `pattern(TAG)` ("ok" or "error TEXT"), "read SOCKET OFFSET" reads one and names
/// the tag whose pattern it holds ("ok TAG", "ok other" or "error TEXT"). Each request on a
/// new connection, as the script adds and removes exports between them.
mod blkio_client {
    use std::mem::MaybeUninit;
    use std::time::Duration;

    use blkio::{Blkio, Completion, ReqFlags};

    const BLOCK: usize = 4096;

    fn pattern(tag: u8) -> Vec<u8> {
        (0..BLOCK).map(|i| (i % 251) as u8 ^ tag).collect()
    }

    fn err(e: blkio::Error) -> String {
        format!("{e} (errno {})", e.errno().raw_os_error())
    }

    fn request(op: &str, socket: &str, offset: u64, tag: u8) -> Result<String, String> {
        let mut b = Blkio::new("virtio-blk-vhost-user").map_err(err)?;
        b.set_str("path", socket).map_err(err)?;
        // A read asks for a read-only connection, which a read-only device accepts; a write
        // does not, and libblkio refuses it then, as the device offers VIRTIO_BLK_F_RO.
        b.set_bool("read-only", op != "write").map_err(err)?;
        b.connect().map_err(err)?;
        b.set_i32("num-queues", 1).map_err(err)?;
        let mut started = b.start().map_err(err)?;
        let region = b.alloc_mem_region(BLOCK).map_err(err)?;
        b.map_mem_region(&region).map_err(err)?;
        let addr = region.addr as *mut u8;
        // SAFETY: the region is a live read/write mapping of BLOCK bytes owned here, and no
        // request is in flight while the slice is used.
        let buf = unsafe { std::slice::from_raw_parts_mut(addr, BLOCK) };
        let queue = &mut started.queues[0];
        if op == "write" {
            buf.copy_from_slice(&pattern(tag));
            queue.write(offset, addr, BLOCK, 0, ReqFlags::empty());
        } else {
            queue.read(offset, addr, BLOCK, 0, ReqFlags::empty());
        }
        let mut done = [MaybeUninit::<Completion>::uninit()];
        let mut timeout = Duration::from_secs(30);
        let n = queue
            .do_io(&mut done, 1, Some(&mut timeout), None)
            .map_err(err)?;
        let result = if n != 1 {
            Err("no completion".to_string())
        } else {
            // SAFETY: do_io initialised the one completion it returned.
            match unsafe { done[0].assume_init_ref() }.ret {
                0 if op == "write" => Ok("ok".to_string()),
                0 => Ok(match (0..=255u8).find(|t| buf[..] == pattern(*t)[..]) {
                    Some(t) => format!("ok {t}"),
                    None => "ok other".to_string(),
                }),
                r => Err(format!("request failed: {r}")),
            }
        };
        started.queues.clear();
        b.unmap_mem_region(&region);
        result
    }

    /// How long one request may take, connection included, before it is reported as an
    /// error: libblkio's connect has no timeout of its own, and a daemon that never answers
    /// must fail the test, not hang it.
    const REQUEST_LIMIT: Duration = Duration::from_secs(60);

    /// Answers one "BLKIO ..." line.
    pub fn answer(line: &str) -> String {
        let words: Vec<&str> = line.split_whitespace().collect();
        let (op, socket, offset, tag) = match words[..] {
            ["BLKIO", op, socket, offset, tag] => (op, socket, offset, tag),
            _ => panic!("not a request: {line}"),
        };
        let offset: u64 = offset.parse().expect("offset");
        let tag: u8 = tag.parse().expect("tag");
        let (op, socket) = (op.to_string(), socket.to_string());
        let (done, result) = std::sync::mpsc::channel();
        // A request that never ends leaves its thread behind; the test fails anyway.
        std::thread::spawn(move || done.send(request(&op, &socket, offset, tag)));
        match result.recv_timeout(REQUEST_LIMIT) {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => format!("error {e}"),
            Err(_) => format!("error no answer in {} s", REQUEST_LIMIT.as_secs()),
        }
    }
}

/// tests/qmp/reopen.py against `daemon`, answering its requests for libblkio I/O.
fn reopen(daemon: &str, binary: &str) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/qmp/reopen.py");
    // stderr to a file, as the script writes to it while this side only reads stdout.
    let err_log = tempfile::NamedTempFile::new().expect("stderr file");
    let mut child = Command::new("python3")
        .arg(&script)
        .args([daemon, binary])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(err_log.reopen().expect("stderr file"))
        .spawn()
        .expect("run python3");
    let mut to_script = child.stdin.take().expect("stdin");
    let from_script = BufReader::new(child.stdout.take().expect("stdout"));
    let mut other = Vec::new();
    for line in from_script.lines() {
        let line = line.expect("read the script's output");
        if line.starts_with("BLKIO ") {
            let answer = blkio_client::answer(&line);
            // The script may have failed meanwhile; its status tells.
            let _ = writeln!(to_script, "{answer}");
        } else {
            other.push(line);
        }
    }
    let status = child.wait().expect("wait for python3");
    let stderr = std::fs::read_to_string(err_log.path()).unwrap_or_default();
    assert!(
        status.success(),
        "reopen checks against {daemon} failed:\n{}\n{stderr}",
        other.join("\n")
    );
    assert!(stderr.contains(" passed, 0 failed"), "{stderr}");
}

#[test]
fn qmp_reopen_strata() {
    if prerequisites() {
        reopen("strata", env!("CARGO_BIN_EXE_strata"));
    }
}

#[test]
fn qmp_reopen_qemu_storage_daemon() {
    if prerequisites() {
        reopen("qsd", "qemu-storage-daemon");
    }
}
