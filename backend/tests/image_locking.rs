//! Image locking is QEMU's (OFD locks on bytes 100+ and 200+): strata, qemu-img and
//! qemu-storage-daemon exclude each other from writing one image, and a reader is told when
//! the image is in use.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use strata_backend::driver::{CreateRequest, CreateTarget};
use strata_backend::{registry, Graph};

fn qemu_img_info(img: &str, force_share: bool) -> (bool, String) {
    let mut cmd = Command::new("qemu-img");
    cmd.arg("info");
    if force_share {
        cmd.arg("-U");
    }
    let out = cmd.arg(img).output().expect("run qemu-img");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// A qemu-storage-daemon exporting `img` writable, as a QEMU user runs it; killed on drop.
struct Qsd {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Qsd {
    /// Starts it; Err with its error output if it exits instead of serving.
    fn start(img: &str) -> Result<Qsd, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("qsd.sock");
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!("driver=file,node-name=f0,filename={img}"))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable=on",
                sock.display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start qemu-storage-daemon");
        let mut qsd = Qsd { child, _dir: dir };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(status)) = qsd.child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = qsd.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                return Err(format!("{status}: {err}"));
            }
            if sock.exists() {
                return Ok(qsd);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err("qemu-storage-daemon neither served nor exited within 10 s".into())
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A 1 MiB qcow2 image (qemu-img info locks qcow2 images, not raw ones).
fn qcow2_image(dir: &Path) -> String {
    let path = dir.join("img.qcow2");
    let request = CreateRequest {
        target: CreateTarget::File(&path),
        size: 1 << 20,
        options: strata_backend::Options::new(),
    };
    registry::create("qcow2", request).expect("create qcow2");
    path.to_str().expect("utf-8 path").to_string()
}

#[test]
fn a_writable_node_makes_qemu_img_report_the_image_in_use() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = qcow2_image(dir.path());
    let p = p.as_str();
    let node = open(&Graph::new(), &format!("driver=qcow2,file.filename={p}"));
    let (ok, text) = qemu_img_info(p, false);
    assert!(!ok && text.contains("lock"), "qemu-img info: {text}");
    // Force-share still reads it, as for a running VM.
    let (ok, text) = qemu_img_info(p, true);
    assert!(ok, "qemu-img info -U: {text}");
    drop(node);
    let (ok, text) = qemu_img_info(p, false);
    assert!(ok, "after close: {text}");
    // A read-only node lets qemu-img read.
    let _ro = open(
        &Graph::new(),
        &format!("driver=qcow2,read-only=on,file.filename={p}"),
    );
    let (ok, text) = qemu_img_info(p, false);
    assert!(ok, "beside a reader: {text}");
}

#[test]
fn two_writers_exclude_each_other_unless_locking_is_off() {
    let img = image(1 << 20, 2);
    let p = path_str(&img);
    let _first = open(&Graph::new(), &format!("driver=raw,file.filename={p}"));
    let e = err(try_open(
        &Graph::new(),
        &format!("driver=raw,file.filename={p}"),
    ));
    assert!(e.to_string().contains("lock"), "{e}");
    assert!(e.to_string().contains(p), "names the image: {e}");
    // A reader is refused too: what it reads may change under it.
    let e = err(try_open(
        &Graph::new(),
        &format!("driver=raw,read-only=on,file.filename={p}"),
    ));
    assert!(e.to_string().contains("lock"), "{e}");
    // share-rw=on on both sides lets two writers in (the user's choice, as QEMU's share-rw).
    drop(_first);
    let a = open(
        &Graph::new(),
        &format!("driver=raw,file.filename={p},file.share-rw=on"),
    );
    let b = open(
        &Graph::new(),
        &format!("driver=raw,file.filename={p},file.share-rw=on"),
    );
    drop((a, b));
    // locking=off takes no locks and checks none.
    let _c = open(&Graph::new(), &format!("driver=raw,file.filename={p}"));
    let _d = open(
        &Graph::new(),
        &format!("driver=raw,file.filename={p},file.locking=off"),
    );
}

#[test]
fn strata_and_qemu_storage_daemon_exclude_each_other() {
    let img = image(1 << 20, 3);
    let p = path_str(&img);
    // strata holds the image: QSD's writable export is refused.
    let node = open(&Graph::new(), &format!("driver=raw,file.filename={p}"));
    match Qsd::start(p) {
        Ok(_) => panic!("qemu-storage-daemon started on an image strata writes"),
        Err(e) => assert!(e.contains("lock"), "{e}"),
    }
    drop(node);
    // QSD holds the image: strata refuses to open it for writing.
    let qsd = Qsd::start(p).expect("qemu-storage-daemon serves the image");
    let e = err(try_open(
        &Graph::new(),
        &format!("driver=raw,file.filename={p}"),
    ));
    assert!(e.to_string().contains("lock"), "{e}");
    drop(qsd);
}

/// Reopens `nodes` (QMP's blockdev-reopen) with `read_only`, all or none.
fn reopen(nodes: &[&std::sync::Arc<strata_backend::Node>], read_only: bool) -> Result<(), String> {
    let mut prepared = Vec::new();
    for node in nodes {
        let flags = strata_backend::NodeFlags {
            read_only,
            ..node.flags()
        };
        match strata_backend::block_on(node.reopen_prepare(&flags)).and_then(|r| r) {
            Ok(()) => prepared.push((node, flags)),
            Err(e) => {
                prepared.iter().for_each(|(n, _)| n.reopen_abort());
                return Err(e.to_string());
            }
        }
    }
    prepared
        .iter()
        .for_each(|(n, flags)| n.reopen_commit(flags));
    Ok(())
}

#[test]
fn a_reopen_takes_and_gives_up_the_write_locks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = qcow2_image(dir.path());
    let p = p.as_str();
    let node = open(&Graph::new(), &format!("driver=qcow2,file.filename={p}"));
    let file = node
        .child(strata_backend::ChildRole::File)
        .expect("file child")
        .clone();
    assert!(!qemu_img_info(p, false).0, "in use while read-write");
    reopen(&[&node, &file], true).expect("reopen read-only");
    let (ok, text) = qemu_img_info(p, false);
    assert!(ok, "qemu-img reads once the node is read-only: {text}");
    // Another reader is let in now; while it reads, the node cannot become writable again,
    // and stays read-only with the reader's locks intact.
    let reader = open(
        &Graph::new(),
        &format!("driver=qcow2,read-only=on,file.filename={p}"),
    );
    let e = reopen(&[&node, &file], false).expect_err("read-write beside a reader");
    assert!(e.contains("lock"), "{e}");
    assert!(node.is_read_only() && file.is_read_only());
    assert!(
        qemu_img_info(p, false).0,
        "the failed reopen gave its write locks up"
    );
    drop(reader);
    reopen(&[&node, &file], false).expect("reopen read-write");
    assert!(!node.is_read_only() && !file.is_read_only());
    assert!(!qemu_img_info(p, false).0, "in use again once read-write");
    let e = err(try_open(
        &Graph::new(),
        &format!("driver=qcow2,read-only=on,file.filename={p}"),
    ));
    assert!(
        e.to_string().contains("lock"),
        "a reader is refused again: {e}"
    );
}

/// Image locks held on `path`'s inode, as /proc/locks lists them.
fn locks_on(path: &str) -> usize {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(path).expect("stat image").ino();
    let locks = std::fs::read_to_string("/proc/locks").expect("/proc/locks");
    let needle = format!(":{ino} ");
    locks.lines().filter(|l| l.contains(&needle)).count()
}

/// A node that did I/O on a thread and was closed gives its image locks up at once, so the
/// image can be opened again (by strata, QSD or qemu-img) right away. With deferred task
/// running on such a thread, the kernel kept the finished read's file referenced until the
/// thread's next io_uring enter (for ever, on a thread that did no more I/O), and the locks
/// with it.
#[test]
fn a_closed_node_gives_up_its_locks_at_once() {
    let threads: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(|| {
                let mut kept = 0;
                for _ in 0..300 {
                    // Buffered, so that some of the opening's reads (format probing) go to
                    // io_uring's workers.
                    let img = image(12288, 10);
                    let p = path_str(&img);
                    drop(open(
                        &Graph::new(),
                        &format!("driver=raw,file.filename={p}"),
                    ));
                    // The last reference to the file may be a request that io_uring's
                    // worker drops just after the close; it goes at the thread's next
                    // system call.
                    let closed = Instant::now();
                    while locks_on(p) > 0 && closed.elapsed() < Duration::from_millis(200) {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    if locks_on(p) > 0 {
                        kept += 1;
                    }
                }
                kept
            })
        })
        .collect();
    let kept: usize = threads.into_iter().map(|t| t.join().expect("thread")).sum();
    assert_eq!(kept, 0, "closed nodes whose image stayed locked, of 600");
}
