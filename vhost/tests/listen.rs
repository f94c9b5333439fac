//! Where an export listens: a path (replacing a stale socket), or an inherited socket.

mod common;

use std::os::fd::{AsRawFd, IntoRawFd};
use std::os::unix::net::UnixListener;

use common::*;
use strata_vhost::{BlkExport, BlkExportConfig, Listen};

#[test]
fn inherited_listening_socket() {
    let disk = Disk::new(1 << 20, "");
    let path = disk.dir.path().join("inherited.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let mut cfg = BlkExportConfig::new("fd", disk.node.clone());
    cfg.writable = true;
    let export = BlkExport::start(cfg, Listen::Fd(listener.into_raw_fd())).expect("start");
    let mut c = Client::connect(&path, 1, 1 << 20).expect("connect");
    let p = c.ptr(0);
    assert_eq!(read(&mut c.queues[0], 0, p, 4096), 0);
    drop(c);
    export.stop();
    export.join().expect("join");
}

#[test]
fn unusable_descriptors_are_refused() {
    let disk = Disk::new(1 << 20, "");
    let file = std::fs::File::open(&disk.image).expect("open");
    let cfg = BlkExportConfig::new("fd", disk.node.clone());
    let err = BlkExport::start(cfg.clone(), Listen::Fd(file.as_raw_fd()))
        .err()
        .expect("a file is not a socket");
    assert!(err.to_string().contains("not"), "{err}");
    // A bound but not listening socket.
    let sock = std::os::unix::net::UnixDatagram::unbound().expect("socket");
    let err = BlkExport::start(cfg, Listen::Fd(sock.as_raw_fd()))
        .err()
        .expect("a datagram socket is not a listener");
    assert!(err.to_string().contains("not a listening"), "{err}");
}

#[test]
fn stale_socket_is_replaced_other_files_are_not() {
    let disk = Disk::new(1 << 20, "");
    // A socket left behind by a previous run.
    drop(UnixListener::bind(disk.socket()).expect("bind"));
    assert!(disk.socket().exists());
    let export = disk.export(|_| {});
    let c = Client::connect(&disk.socket(), 1, 1 << 20).expect("connect");
    drop(c);
    drop(export);
    assert!(!disk.socket().exists(), "socket removed at stop");
    // Not a socket: refused, and left alone.
    std::fs::write(disk.socket(), b"precious").expect("write");
    let cfg = BlkExportConfig::new("p", disk.node.clone());
    let err = BlkExport::start(cfg, Listen::UnixPath(disk.socket()))
        .err()
        .expect("refused");
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(disk.socket()).expect("read"), b"precious");
}
