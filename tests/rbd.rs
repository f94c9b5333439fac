//! The rbd driver (issue 16) against a real Ceph cluster: the one `scripts/ceph-test-cluster.sh`
//! starts (scripts/test.sh brings it up and exports CEPH_CONF and STRATA_CEPH_DIR). A libblkio
//! client writes through strata's vhost-user-blk export and reads back; `rbd export` shows what
//! reached the cluster; qcow2 on rbd, a read-only snapshot, the open errors, an OSD killed
//! and restarted under I/O, an OSD that stays down, and which thread hands requests to librbd.
//!
//! Every daemon here runs under the sandbox (on by default), and none may log a refused
//! system call.
//!
//! Without a cluster the tests say so and pass, except under CI=true, where they fail.

mod common;

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use blkio::{Completion, ReqFlags};
use common::client::{pattern, Client, ClientConfig};
use common::daemon::{status_field, Daemon};
use common::path_str;

const TIMEOUT: Duration = Duration::from_secs(20);
/// A request may wait this long while an OSD restarts.
const IO_TIMEOUT: Duration = Duration::from_secs(90);
const IMAGE_SIZE: u64 = 64 << 20;
const LEN: usize = 64 << 10;

/// The test cluster for the length of one test: its configuration file and this test's turn.
/// Most tests share the cluster; a test that stops the OSD has it alone, since any other
/// test's open or I/O would wait on the missing OSD past its own timeouts.
struct Cluster {
    conf: String,
    _shared: Option<RwLockReadGuard<'static, ()>>,
    _alone: Option<RwLockWriteGuard<'static, ()>>,
}

static TURNS: RwLock<()> = RwLock::new(());

/// The test cluster, shared with other tests, or None (a skip, or a failure under CI).
fn cluster() -> Option<Cluster> {
    let conf = cluster_conf()?;
    let turn = TURNS.read().unwrap_or_else(|p| p.into_inner());
    Some(Cluster {
        conf,
        _shared: Some(turn),
        _alone: None,
    })
}

/// The test cluster with no other test running on it, for the tests that stop the OSD.
fn cluster_alone() -> Option<Cluster> {
    let conf = cluster_conf()?;
    let turn = TURNS.write().unwrap_or_else(|p| p.into_inner());
    Some(Cluster {
        conf,
        _shared: None,
        _alone: Some(turn),
    })
}

/// The test cluster's configuration file, or None (a skip, or a failure under CI).
fn cluster_conf() -> Option<String> {
    match std::env::var("CEPH_CONF") {
        Ok(conf) if Path::new(&conf).exists() => Some(conf),
        _ if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("no Ceph cluster under CI: scripts/test.sh starts one (CEPH_CONF unset)")
        }
        _ => {
            eprintln!(
                "skipped: no Ceph cluster (eval \"$(scripts/ceph-test-cluster.sh start)\" first)"
            );
            None
        }
    }
}

/// Runs a ceph tool (rbd, ceph, ceph-authtool) and returns its output, which must succeed.
fn tool(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A fresh image name (tests run in parallel on one pool).
fn image_name(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "t-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// An image in pool rbd, removed with its snapshots when dropped.
struct RbdImage(String);

impl RbdImage {
    fn create(tag: &str) -> RbdImage {
        let name = image_name(tag);
        tool("rbd", &["create", "--size", "64M", &format!("rbd/{name}")]);
        RbdImage(name)
    }

    fn import(tag: &str, file: &Path) -> RbdImage {
        let name = image_name(tag);
        tool("rbd", &["import", path_str(file), &format!("rbd/{name}")]);
        RbdImage(name)
    }

    /// The image's bytes, as `rbd export` reads them from the cluster.
    fn export(&self, dir: &Path) -> Vec<u8> {
        let out = dir.join(format!("{}.export", self.0));
        tool(
            "rbd",
            &["export", &format!("rbd/{}", self.0), path_str(&out)],
        );
        let data = std::fs::read(&out).expect("read export");
        let _ = std::fs::remove_file(&out);
        data
    }
}

impl Drop for RbdImage {
    fn drop(&mut self) {
        let spec = format!("rbd/{}", self.0);
        let _ = Command::new("rbd").args(["snap", "purge", &spec]).output();
        let _ = Command::new("rbd").args(["rm", &spec]).output();
    }
}

/// What a daemon logs when the sandbox refuses a system call: no daemon here may.
const REFUSED: &str = "which the sandbox refuses";

/// Runs strata with `args`; its exit fails the test if the sandbox refused a call.
fn spawn(args: &[String]) -> Daemon {
    Daemon::spawn(args, TIMEOUT).forbidding(REFUSED)
}

/// Starts strata exporting `node` (the last of `blockdevs`) on `socket`.
fn start(blockdevs: &[String], socket: &Path, writable: bool) -> Daemon {
    let mut args = Vec::new();
    for b in blockdevs {
        args.push("--blockdev".to_string());
        args.push(b.clone());
    }
    args.push("--export".into());
    args.push(format!(
        "type=vhost-user-blk,id=e0,node-name=top,addr.type=unix,addr.path={},\
         writable={},num-queues=2",
        path_str(socket),
        if writable { "on" } else { "off" }
    ));
    let mut d = spawn(&args);
    d.wait_for_sockets(&[socket]);
    d
}

/// Every thread, strata's and librbd's, runs under the seccomp filter.
fn assert_sandboxed(daemon: &Daemon) {
    let modes = daemon.thread_modes();
    assert!(modes.len() > 10, "librbd's threads are missing: {modes:?}");
    assert!(
        modes.iter().all(|(_, mode)| *mode == 2),
        "threads without the seccomp filter: {modes:?}"
    );
}

/// A client of the export on `socket` (read-only if `read_only`).
fn connect(socket: &Path, read_only: bool) -> Client {
    let config = ClientConfig {
        region_len: LEN,
        read_only,
        timeout: IO_TIMEOUT,
    };
    Client::connect(socket, config)
}

/// The poll window the export logged when it started serving.
fn logged_poll_max_ns(log: &str) -> &str {
    log.lines()
        .find(|l| l.contains("serving node 'top'"))
        .and_then(|l| l.rsplit_once("poll-max-ns="))
        .map_or_else(
            || panic!("no serving line in the log:\n{log}"),
            |(_, ns)| ns,
        )
}

fn rbd_node(image: &str, extra: &str) -> String {
    format!("driver=rbd,node-name=top,pool=rbd,image={image}{extra}")
}

/// The arguments of a read-only export of node `top` on `socket`.
fn export_args(socket: &Path) -> [String; 2] {
    [
        "--export".into(),
        format!(
            "type=vhost-user-blk,id=e0,node-name=top,addr.type=unix,addr.path={}",
            path_str(socket)
        ),
    ]
}

/// Writes, zeroes and discards through the export on both queues, across librbd's 4 MiB
/// object boundaries, and keeps `model` as what the image must now hold.
fn exercise(c: &mut Client, model: &mut [u8]) {
    let mut apply = |c: &mut Client, q: usize, offset: u64, data: Vec<u8>| {
        c.write(q, offset, &data);
        model[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
    };
    apply(c, 0, 0, pattern(1, LEN));
    apply(c, 1, (4 << 20) - 4096, pattern(2, 8192)); // across an object boundary
    apply(c, 0, (8 << 20) + 512, pattern(3, 3 * 512)); // sector-sized, unaligned to 4k
    apply(c, 1, IMAGE_SIZE - LEN as u64, pattern(4, LEN)); // the last bytes
    apply(c, 0, 20 << 20, pattern(5, LEN));
    apply(c, 1, 24 << 20, pattern(6, LEN));
    c.flush();
    let r = c.run(1, |q, _| {
        q.write_zeroes(20 << 20, 8192, 0, ReqFlags::empty())
    });
    assert_eq!(r, 0, "write zeroes");
    model[20 << 20..(20 << 20) + 8192].fill(0);
    let r = c.run(0, |q, _| {
        q.discard(24 << 20, LEN as u64, 0, ReqFlags::empty())
    });
    assert_eq!(r, 0, "discard");
    // A discarded range of an rbd image reads as zeroes.
    model[24 << 20..(24 << 20) + LEN].fill(0);
    c.flush();
    for (offset, len) in [
        (0u64, LEN),
        ((4 << 20) - 4096, 8192),
        ((8 << 20) + 512, 3 * 512),
        (IMAGE_SIZE - LEN as u64, LEN),
        (20 << 20, LEN),
        (24 << 20, LEN),
    ] {
        for q in 0..2 {
            let o = offset as usize;
            assert!(
                c.read(q, offset, len) == model[o..o + len],
                "read back at {offset} on queue {q}"
            );
        }
    }
}

/// Serves `blockdevs` (the last one exported, as `what`) on `socket`, has a libblkio client
/// [`exercise`] the disk, stops the daemon and checks that the export kept the rbd default of
/// no polling; returns the bytes the client left on the disk.
fn serve_exercise_and_stop(blockdevs: &[String], socket: &Path, what: &str) -> Vec<u8> {
    let daemon = start(blockdevs, socket, true);
    let mut client = connect(socket, false);
    assert_eq!(
        client.blkio.get_u64("capacity").expect("capacity"),
        IMAGE_SIZE,
        "{what}'s capacity"
    );
    let mut model = vec![0u8; IMAGE_SIZE as usize];
    exercise(&mut client, &mut model);
    drop(client);
    let (ok, log) = daemon.terminate();
    assert!(ok, "exit after SIGTERM:\n{log}");
    // Polling 50 µs after each completion of a network round trip only burns CPU.
    assert_eq!(
        logged_poll_max_ns(&log),
        "0",
        "{what}'s default poll window"
    );
    model
}

#[test]
fn an_rbd_export_serves_a_libblkio_client_and_the_cluster_holds_its_bytes() {
    let Some(_cluster) = cluster() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let image = RbdImage::create("raw");
    let socket = dir.path().join("vm.sock");
    let blockdevs = [rbd_node(&image.0, ",discard=unmap")];
    let model = serve_exercise_and_stop(&blockdevs, &socket, "rbd export");
    let exported = image.export(dir.path());
    assert_eq!(exported.len(), model.len(), "exported size");
    let first_diff = exported.iter().zip(&model).position(|(a, b)| a != b);
    assert_eq!(
        first_diff, None,
        "rbd export differs from what the client wrote"
    );
}

#[test]
fn qcow2_on_rbd_reads_back_and_checks_clean() {
    let Some(_cluster) = cluster() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let local = dir.path().join("fresh.qcow2");
    tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", path_str(&local), "64M"],
    );
    let image = RbdImage::import("qcow2", &local);
    let socket = dir.path().join("vm.sock");
    let blockdevs = [
        format!(
            "driver=rbd,node-name=r0,pool=rbd,image={},discard=unmap",
            image.0
        ),
        "driver=qcow2,node-name=top,file=r0,discard=unmap".to_string(),
    ];
    // The rbd node below the qcow2 node decides the poll window too.
    let model = serve_exercise_and_stop(&blockdevs, &socket, "qcow2-on-rbd export");
    // The image as the cluster holds it: a clean qcow2 with the client's bytes.
    let exported = dir.path().join("back.qcow2");
    std::fs::write(&exported, image.export(dir.path())).expect("write export");
    tool("qemu-img", &["check", "-q", path_str(&exported)]);
    let raw = dir.path().join("back.raw");
    tool(
        "qemu-img",
        &["convert", "-O", "raw", path_str(&exported), path_str(&raw)],
    );
    let data = std::fs::read(&raw).expect("read raw");
    assert!(
        data == model,
        "the qcow2 image's data differs from what was written"
    );
}

#[test]
fn a_snapshot_opens_read_only_with_the_snapshot_data() {
    let Some(_cluster) = cluster() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let before = pattern(7, IMAGE_SIZE as usize);
    let file = dir.path().join("before.raw");
    std::fs::write(&file, &before).expect("write");
    let image = RbdImage::import("snap", &file);
    tool("rbd", &["snap", "create", &format!("rbd/{}@s1", image.0)]);
    // The head changes after the snapshot.
    let socket = dir.path().join("head.sock");
    let daemon = start(&[rbd_node(&image.0, "")], &socket, true);
    let mut client = connect(&socket, false);
    client.write(0, 0, &pattern(8, LEN));
    drop(client);
    assert!(daemon.terminate().0);

    // Without read-only=on (and no auto-read-only), QEMU's error.
    let (log, _) = open_failure(rbd_node(&image.0, ",snapshot=s1"), &[]);
    assert!(log.contains("rbd snapshots are always read-only"), "{log}");
    let socket = dir.path().join("snap.sock");
    let snapshot = rbd_node(&image.0, ",snapshot=s1,read-only=on");
    // The node is read-only: a writable export of it is refused.
    let mut args = vec!["--blockdev".to_string(), snapshot.clone()];
    args.extend(export_args(&socket));
    args[3].push_str(",writable=on");
    let (ok, log, _) = spawn(&args).wait_exit(TIMEOUT);
    assert!(!ok, "a writable export of a snapshot started:\n{log}");
    let daemon = start(&[snapshot], &socket, false);
    let mut client = connect(&socket, true);
    assert!(client.read(0, 0, LEN) == before[..LEN], "snapshot data");
    assert!(client.read(1, 32 << 20, LEN) == before[32 << 20..(32 << 20) + LEN]);
    drop(client);
    let (ok, log) = daemon.terminate();
    assert!(ok, "{log}");
    // The head kept its own write.
    assert!(image.export(dir.path())[..LEN] == pattern(8, LEN)[..]);
}

/// Opens `blockdev` alone (no export) and returns the daemon's failure message and how long
/// it took to fail.
fn open_failure(blockdev: String, extra: &[String]) -> (String, Duration) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut args = extra.to_vec();
    args.extend(["--blockdev".to_string(), blockdev]);
    args.extend(export_args(&dir.path().join("never.sock")));
    let (ok, log, took) = spawn(&args).wait_exit(Duration::from_secs(60));
    assert!(!ok, "the open succeeded:\n{log}");
    (log, took)
}

#[test]
fn open_errors_name_the_missing_pool_image_bad_key_and_unreachable_cluster() {
    let Some(cluster) = cluster() else { return };
    let conf = &cluster.conf;
    let dir = tempfile::tempdir().expect("tempdir");
    let image = RbdImage::create("err");

    let (log, _) = open_failure("driver=rbd,node-name=r,pool=nosuchpool,image=x".into(), &[]);
    assert!(log.contains("pool 'nosuchpool' does not exist"), "{log}");

    let (log, _) = open_failure(
        "driver=rbd,node-name=r,pool=rbd,image=nosuchimage".into(),
        &[],
    );
    assert!(
        log.contains("image 'rbd:rbd/nosuchimage' does not exist"),
        "{log}"
    );

    // A well-formed key that is not client.admin's.
    let key = tool("ceph-authtool", &["--gen-print-key"]).stdout;
    let key = String::from_utf8(key).expect("key").trim().to_string();
    let (log, _) = open_failure(
        rbd_node(&image.0, ",key-secret=k0"),
        &["--object".into(), format!("secret,id=k0,data={key}")],
    );
    assert!(log.contains("authentication failed"), "{log}");

    // The right key through a secret file works (and the keyring is not needed for it).
    let admin_key = tool("ceph", &["auth", "get-key", "client.admin"]).stdout;
    let key_file = dir.path().join("admin.key");
    std::fs::write(&key_file, admin_key).expect("key file");
    let args = [
        "--object".to_string(),
        format!("secret,id=k1,file={}", path_str(&key_file)),
    ];
    let socket2 = dir.path().join("key2.sock");
    let mut full = args.to_vec();
    full.extend([
        "--blockdev".into(),
        rbd_node(&image.0, ",key-secret=k1"),
        "--export".into(),
        format!(
            "type=vhost-user-blk,id=e0,node-name=top,addr.type=unix,addr.path={}",
            path_str(&socket2)
        ),
    ]);
    let mut d = spawn(&full);
    d.wait_for_sockets(&[&socket2]);
    drop(d);

    // A monitor that is not there (a closed port): the open fails after the connect timeout
    // instead of hanging.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let (log, took) = open_failure(
        rbd_node(
            &image.0,
            &format!(",conf={conf},server.0.host=127.0.0.1,server.0.port={port}"),
        ),
        &[],
    );
    assert!(log.contains("no monitor answered in time"), "{log}");
    assert!(took < Duration::from_secs(30), "took {took:?}");
}

/// The test cluster's OSD: killed with SIGKILL, and started again.
struct Osd {
    dir: PathBuf,
}

impl Osd {
    fn of_test_cluster() -> Osd {
        let Ok(dir) = std::env::var("STRATA_CEPH_DIR") else {
            panic!("STRATA_CEPH_DIR is unset: the OSD tests need the test cluster's directory");
        };
        Osd {
            dir: PathBuf::from(dir),
        }
    }

    fn pid(&self) -> i32 {
        let text = std::fs::read_to_string(self.dir.join("run/osd.0.pid")).expect("osd pid file");
        text.trim().parse().expect("pid")
    }

    fn kill(&self) {
        let pid = self.pid();
        // SAFETY: kill references no memory.
        let r = unsafe { libc::kill(pid, libc::SIGKILL) };
        assert_eq!(r, 0, "kill osd {pid}");
        while Path::new(&format!("/proc/{pid}")).exists() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn start(&self) {
        let conf = self.dir.join("ceph.conf");
        // CEPH_KEYRING (client.admin's, exported for the tools) would replace the OSD's own
        // keyring, and the monitor would refuse it.
        let out = Command::new("ceph-osd")
            .args(["-c", path_str(&conf), "-i", "0"])
            .env_remove("CEPH_KEYRING")
            .output()
            .expect("run ceph-osd");
        assert!(
            out.status.success(),
            "ceph-osd: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn io_resumes_after_the_osd_is_killed_and_restarted() {
    let Some(_cluster) = cluster_alone() else {
        return;
    };
    let osd = Osd::of_test_cluster();
    let tmp = tempfile::tempdir().expect("tempdir");
    let image = RbdImage::create("osd");
    let socket = tmp.path().join("vm.sock");
    // No librbd cache: every write goes to the OSD.
    let daemon = start(&[rbd_node(&image.0, ",cache.direct=on")], &socket, true);
    let mut client = connect(&socket, false);
    client.write(0, 0, &pattern(99, LEN));
    // The sandbox is on (the default): every thread, librbd's included, has the filter.
    assert_sandboxed(&daemon);
    let blocks = 96u64;
    // The OSD goes down first and comes back 2 s later: the writes issued meanwhile wait in
    // librbd and complete once it is back.
    osd.kill();
    let restarter = {
        let osd_dir = osd.dir.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(2));
            Osd { dir: osd_dir }.start();
        })
    };
    let start = Instant::now();
    for i in 0..blocks {
        client.write(
            (i % 2) as usize,
            i * LEN as u64 * 8,
            &pattern(100 + i as u32, LEN),
        );
        if i == 0 {
            assert!(
                start.elapsed() >= Duration::from_millis(1500),
                "the first write did not wait for the OSD ({:?})",
                start.elapsed()
            );
        }
    }
    restarter.join().expect("restarter");
    client.flush();
    // librbd reconnected under the filter (a refused call would be in the log at exit).
    assert_sandboxed(&daemon);
    for i in 0..blocks {
        assert!(
            client.read((i % 2) as usize, i * LEN as u64 * 8, LEN) == pattern(100 + i as u32, LEN),
            "block {i} after the OSD restart"
        );
    }
    drop(client);
    let (ok, log) = daemon.terminate();
    assert!(ok, "{log}");
    let exported = image.export(tmp.path());
    for i in 0..blocks {
        let o = (i * LEN as u64 * 8) as usize;
        assert!(
            exported[o..o + LEN] == pattern(100 + i as u32, LEN),
            "exported block {i}"
        );
    }
    eprintln!("writes across the OSD restart took {:?}", start.elapsed());
}

/// Starts the OSD again when dropped (also when the test fails).
struct OsdDown(Osd);

impl Drop for OsdDown {
    fn drop(&mut self) {
        self.0.start();
    }
}

/// A copy of the test cluster's configuration with `rados osd op timeout = 5`.
fn conf_with_op_timeout(conf: &str, dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(conf).expect("read ceph.conf");
    let ours = text.replacen("[global]\n", "[global]\nrados osd op timeout = 5\n", 1);
    assert_ne!(ours, text, "no [global] section in {conf}");
    let path = dir.join("ceph.conf");
    std::fs::write(&path, ours).expect("write ceph.conf");
    path
}

#[test]
fn an_osd_that_stays_down_fails_requests_after_the_timeout_and_the_daemon_exits() {
    let Some(cluster) = cluster_alone() else {
        return;
    };
    let conf = &cluster.conf;
    let tmp = tempfile::tempdir().expect("tempdir");
    let conf = conf_with_op_timeout(conf, tmp.path());
    let image = RbdImage::create("down");
    let (rbd_socket, null_socket) = (tmp.path().join("rbd.sock"), tmp.path().join("null.sock"));
    let export = |id: &str, node: &str, socket: &Path| {
        format!(
            "type=vhost-user-blk,id={id},node-name={node},addr.type=unix,addr.path={},\
             writable=on,num-queues=2",
            path_str(socket)
        )
    };
    let args = [
        "--blockdev".to_string(),
        rbd_node(
            &image.0,
            &format!(",conf={},cache.direct=on", path_str(&conf)),
        ),
        "--blockdev".into(),
        "driver=null-co,node-name=n0,size=67108864,read-zeroes=on".into(),
        "--export".into(),
        export("e0", "top", &rbd_socket),
        "--export".into(),
        export("e1", "n0", &null_socket),
    ];
    let mut daemon = spawn(&args);
    daemon.wait_for_sockets(&[&rbd_socket, &null_socket]);
    let mut client = connect(&rbd_socket, false);
    client.write(0, 0, &pattern(200, LEN));

    let osd = Osd::of_test_cluster();
    osd.kill();
    let down = OsdDown(osd);
    // The write waits for the OSD, then fails with the configured timeout (5 s), not Ceph's
    // default (none) or strata's (60 s).
    let start = Instant::now();
    let r = client.try_write(1, 8 << 20, &pattern(201, LEN));
    let waited = start.elapsed();
    assert!(r < 0, "a write with the OSD down succeeded ({r})");
    assert!(
        waited >= Duration::from_secs(4) && waited < Duration::from_secs(30),
        "the write failed after {waited:?}, not after the 5 s timeout"
    );
    // Meanwhile the other export serves.
    let mut other = connect(&null_socket, false);
    other.write(0, 4096, &pattern(202, LEN));
    assert!(
        other.read(1, 0, LEN).iter().all(|&b| b == 0),
        "null-co reads"
    );
    // A request still waiting for the OSD when SIGTERM comes: the daemon exits anyway, in
    // bounded time and with success.
    client.buf()[..LEN].copy_from_slice(&pattern(203, LEN));
    let addr = client.region.addr as *mut u8;
    client.queues[0].write(16 << 20, addr, LEN, 0, ReqFlags::empty());
    let mut none = [MaybeUninit::<Completion>::uninit()];
    let mut zero = Duration::ZERO;
    let _ = client.queues[0].do_io(&mut none, 0, Some(&mut zero), None);
    std::thread::sleep(Duration::from_millis(500));
    drop(other);
    daemon.sigterm();
    let (ok, log, took) = daemon.wait_exit(Duration::from_secs(60));
    drop(client);
    assert!(ok, "exit status after SIGTERM with the OSD down:\n{log}");
    assert!(log.contains("failed: Connection timed out"), "{log}");
    // The close (librbd's goodbyes to a cluster that does not answer) is cut short.
    assert!(
        log.contains("the nodes are still closing after 10s"),
        "{log}"
    );
    assert!(took < Duration::from_secs(40), "exit took {took:?}:\n{log}");
    eprintln!("exit with the OSD down took {took:?}");
    drop(down);
    // Removing the image would wait for the dead client's watch to time out (about 45 s):
    // it stays, and goes with the test cluster.
    std::mem::forget(image);
}

#[test]
fn two_daemons_on_one_image_see_each_others_flushed_writes() {
    let Some(_cluster) = cluster() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    // Ceph's default features include exclusive-lock: librbd hands the lock to whichever
    // client writes (it asks the holder to release it), as QEMU's rbd driver lets it.
    let image = RbdImage::create("lock");
    let info = String::from_utf8(tool("rbd", &["info", &format!("rbd/{}", image.0)]).stdout)
        .expect("rbd info");
    assert!(info.contains("exclusive-lock"), "{info}");
    let (sa, sb) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let node = rbd_node(&image.0, ",cache.direct=on");
    let (da, db) = (
        start(std::slice::from_ref(&node), &sa, true),
        start(&[node], &sb, true),
    );
    let (mut a, mut b) = (connect(&sa, false), connect(&sb, false));
    for round in 0..3u32 {
        let (x, y) = (pattern(300 + round, LEN), pattern(400 + round, LEN));
        a.write(0, 0, &x);
        a.flush();
        b.write(1, LEN as u64, &y);
        b.flush();
        assert!(b.read(0, 0, LEN) == x, "round {round}: b reads a's write");
        assert!(
            a.read(1, LEN as u64, LEN) == y,
            "round {round}: a reads b's write"
        );
    }
    drop((a, b));
    assert!(da.terminate().0);
    assert!(db.terminate().0);
}

#[test]
fn a_namespace_and_server_options_reach_the_image() {
    let Some(cluster) = cluster() else { return };
    let conf = &cluster.conf;
    let dir = tempfile::tempdir().expect("tempdir");
    let ns = image_name("ns");
    tool("rbd", &["namespace", "create", &format!("rbd/{ns}")]);
    let spec = format!("rbd/{ns}/img");
    tool("rbd", &["create", "--size", "64M", &spec]);
    // The monitor named by server= (its address from the conf), not by the conf's mon_host.
    let text = std::fs::read_to_string(conf).expect("conf");
    let port = text
        .lines()
        .find_map(|l| l.strip_prefix("mon host = v2:127.0.0.1:"))
        .expect("mon host line")
        .trim()
        .to_string();
    // A conf without the monitor: only server= names it.
    let no_mon: String = text
        .lines()
        .filter(|l| !l.starts_with("mon host"))
        .map(|l| format!("{l}\n"))
        .collect();
    let own_conf = dir.path().join("ceph.conf");
    std::fs::write(&own_conf, no_mon).expect("write conf");
    let socket = dir.path().join("ns.sock");
    let node = format!(
        "driver=rbd,node-name=top,pool=rbd,namespace={ns},image=img,conf={},\
         server.0.host=127.0.0.1,server.0.port={port}",
        path_str(&own_conf)
    );
    let daemon = start(&[node], &socket, true);
    let mut client = connect(&socket, false);
    client.write(0, 4096, &pattern(500, LEN));
    client.flush();
    drop(client);
    assert!(daemon.terminate().0);
    let out = dir.path().join("ns.raw");
    tool("rbd", &["export", "--no-progress", &spec, path_str(&out)]);
    let data = std::fs::read(&out).expect("export");
    assert!(
        data[4096..4096 + LEN] == pattern(500, LEN)[..],
        "the namespace's image"
    );
    tool("rbd", &["rm", "--no-progress", &spec]);
    tool("rbd", &["namespace", "remove", &format!("rbd/{ns}")]);
}

/// Sends each QMP command of `commands` (after the capabilities handshake) to the monitor on
/// `socket` and returns their replies.
fn qmp(socket: &Path, commands: &[serde_json::Value]) -> Vec<serde_json::Value> {
    use std::io::{BufRead, BufReader, Write};
    let stream = std::os::unix::net::UnixStream::connect(socket).expect("connect to the monitor");
    stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut writer = stream;
    let mut next = || -> serde_json::Value {
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).expect("read a reply");
            let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON reply");
            // Events come in between; the replies are what the test wants.
            if v.get("event").is_none() {
                return v;
            }
        }
    };
    assert!(next().get("QMP").is_some(), "the greeting");
    let mut send = |c: &serde_json::Value| {
        writeln!(writer, "{c}").expect("send");
    };
    send(&serde_json::json!({"execute": "qmp_capabilities"}));
    assert!(next().get("return").is_some(), "capabilities accepted");
    commands
        .iter()
        .map(|c| {
            send(c);
            next()
        })
        .collect()
}

/// blockdev-add of an rbd node on a running daemon: under the sandbox it is refused with the
/// reason and what to do (before, librados failed to read its configuration, which exists,
/// with "No such file or directory"), and the daemon keeps serving; with `--sandbox off` the
/// same command adds the node.
#[test]
fn an_rbd_node_added_over_qmp_says_when_the_sandbox_refuses_it() {
    let Some(cluster) = cluster() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let image = RbdImage::create("qmpadd");
    let add = serde_json::json!({"execute": "blockdev-add", "arguments": {
        "driver": "rbd", "node-name": "r0", "pool": "rbd", "image": image.0,
        "conf": cluster.conf}});
    let listed = serde_json::json!({"execute": "query-named-block-nodes",
        "arguments": {"flat": true}});
    for sandbox in ["on", "off"] {
        let socket = dir.path().join(format!("{sandbox}.sock"));
        let monitor = dir.path().join(format!("{sandbox}.qmp"));
        let mut args: Vec<String> = [
            "--sandbox",
            sandbox,
            "--blockdev",
            "driver=null-co,node-name=top,size=1048576",
            "--chardev",
        ]
        .map(String::from)
        .to_vec();
        args.push(format!(
            "socket,id=m0,path={},server=on,wait=off",
            path_str(&monitor)
        ));
        args.extend([
            "--monitor".into(),
            "chardev=m0".into(),
            "--export".into(),
            format!(
                "type=vhost-user-blk,id=e0,node-name=top,addr.type=unix,addr.path={},\
                 num-queues=2",
                path_str(&socket)
            ),
        ]);
        let mut daemon = spawn(&args);
        daemon.wait_for_sockets(&[&socket, &monitor]);
        let replies = qmp(&monitor, &[add.clone(), listed.clone()]);
        let names: Vec<&str> = replies[1]["return"]
            .as_array()
            .expect("a node list")
            .iter()
            .filter_map(|n| n["node-name"].as_str())
            .collect();
        if sandbox == "on" {
            let error = replies[0]["error"]["desc"].as_str().unwrap_or_else(|| {
                panic!("blockdev-add under the sandbox succeeded: {}", replies[0])
            });
            assert!(
                error.contains("sandbox") && error.contains("--sandbox off"),
                "the refusal names the sandbox and the way out: {error}"
            );
            assert_eq!(names, ["top"], "the daemon serves on, without the node");
            // The export still answers.
            let mut client = connect(&socket, true);
            client.read(0, 0, 4096);
            drop(client);
        } else {
            assert_eq!(
                replies[0]["return"],
                serde_json::json!({}),
                "{}",
                replies[0]
            );
            assert!(names.contains(&"r0"), "the node is added: {names:?}");
        }
        assert!(daemon.terminate().0);
    }
}

/// Voluntary context switches of the daemon's threads named `name` so far: each is a sleep
/// the thread was woken from.
fn switches_of_threads_named(daemon: &Daemon, name: &str) -> u64 {
    daemon
        .thread_statuses()
        .iter()
        .filter(|status| status_field(status, "Name:") == name)
        .map(|status| {
            status_field(status, "voluntary_ctxt_switches:")
                .parse::<u64>()
                .expect("voluntary_ctxt_switches field")
        })
        .sum()
}

/// Serves `image` and reads it 4 KiB at a time, one request after the other; returns how
/// often per request librbd's dispatch threads (`io_context_pool`) were woken.
fn dispatch_wakes_per_read(image: &str, socket: &Path) -> f64 {
    const READS: u64 = 600;
    let daemon = start(&[rbd_node(image, "")], socket, false);
    let mut client = connect(socket, true);
    for i in 0..50 {
        client.read(0, i * 4096, 4096);
    }
    let before = switches_of_threads_named(&daemon, "io_context_pool");
    for i in 0..READS {
        client.read(0, (i * 7919 % 16384) * 4096, 4096);
    }
    let wakes = switches_of_threads_named(&daemon, "io_context_pool") - before;
    drop(client);
    let (ok, log) = daemon.terminate();
    assert!(ok, "exit after SIGTERM:\n{log}");
    wakes as f64 / READS as f64
}

#[test]
fn workers_hand_requests_to_librbd_without_its_dispatch_thread() {
    let Some(_cluster) = cluster() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let image = RbdImage::create("inline");
    let socket = dir.path().join("vm.sock");
    // strata's default: the worker builds and sends each request itself (rbd_non_blocking_aio
    // off), so librbd's dispatch thread is woken for some completions only.
    let inline = dispatch_wakes_per_read(&image.0, &socket);
    // The image's own configuration, which librbd applies over the client's, turns the
    // dispatch thread back on: it is woken for every request.
    let spec = format!("rbd/{}", image.0);
    tool(
        "rbd",
        &[
            "config",
            "image",
            "set",
            &spec,
            "rbd_non_blocking_aio",
            "true",
        ],
    );
    let queued = dispatch_wakes_per_read(&image.0, &socket);
    eprintln!("dispatch thread wakes per read: inline {inline:.2}, queued {queued:.2}");
    assert!(
        queued >= 1.0 && inline + 0.3 < queued,
        "librbd's dispatch thread woke {inline:.2} times per read by default and {queued:.2} \
         times with rbd_non_blocking_aio=true"
    );
}
