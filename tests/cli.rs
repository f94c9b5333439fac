//! The command line: usage, errors that name the wrong option, `img create`.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::daemon::Daemon;

fn strata(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(args)
        .output()
        .expect("run strata")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn help_prints_usage() {
    let o = strata(&["--help"]);
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    for word in ["--blockdev", "--export", "serve", "img"] {
        assert!(out.contains(word), "--help lacks {word}: {out}");
    }
}

#[test]
fn unknown_flag_is_named() {
    let o = strata(&["--blockdevv", "x"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--blockdevv"), "{}", stderr(&o));
}

#[test]
fn nothing_to_serve_is_an_error() {
    let o = strata(&[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--export"), "{}", stderr(&o));
}

#[test]
fn blockdev_errors_name_the_option() {
    let o = strata(&[
        "--blockdev",
        "driver=null-co,node-name=n0,bogus=1",
        "--export",
        "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=/tmp/x.sock",
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("Block protocol 'null-co' doesn't support the option 'bogus'"),
        "{}",
        stderr(&o)
    );
    let o = strata(&[
        "--blockdev",
        "driver=nope,node-name=n0",
        "--export",
        "type=vhost-user-blk",
    ]);
    assert!(
        stderr(&o).contains("Unknown driver 'nope'"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn export_errors_name_the_option() {
    let cases: &[(&str, &str)] = &[
        ("type=nbd,id=e0,node-name=n0", "Export type 'nbd'"),
        ("type=vhost-user-blk,id=e0,node-name=zz,addr.type=unix,addr.path=/tmp/y.sock", "'zz'"),
        ("type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=/tmp/y.sock,colour=red", "'colour'"),
        ("type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=/tmp/y.sock,num-queues=0", "num-queues"),
        ("type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=/tmp/y.sock,num-queues=70000", "num-queues"),
        ("type=vhost-user-blk,id=e0,node-name=ro,addr.type=unix,addr.path=/tmp/y.sock,writable=on", "writable"),
        ("type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=/tmp/y.sock,logical-block-size=1000", "logical-block-size"),
        ("type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=/tmp/y.sock,writable=maybe", "'writable'"),
        ("type=vhost-user-blk,id=e0,node-name=n0,addr.type=tcp", "addr.type 'tcp'"),
        ("type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=/tmp/y.sock,poll-max-ns=-1", "'poll-max-ns'"),
        ("type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=/tmp/y.sock,socket-mode=0888", "socket-mode must be an octal mode such as 0660, got '0888'"),
        ("type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=/tmp/y.sock,socket-mode=4660", "socket-mode takes permission bits only"),
        ("type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=/tmp/y.sock,socket-group=no-such-strata-group", "socket-group 'no-such-strata-group': no such group"),
        ("type=vhost-user-blk,id=e0,node-name=n0,addr.type=fd,addr.str=9,socket-mode=0600", "socket-mode and socket-group apply to addr.type=unix only"),
    ];
    for (export, expected) in cases {
        let o = strata(&[
            "--blockdev",
            "driver=null-co,node-name=n0",
            "--blockdev",
            "driver=null-co,node-name=ro,read-only=on",
            "--export",
            export,
        ]);
        assert!(!o.status.success(), "{export} accepted");
        assert!(stderr(&o).contains(expected), "{export}: {}", stderr(&o));
    }
}

#[test]
fn img_create_raw_makes_a_sparse_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let o = strata(&["img", "create", "-f", "raw", path.to_str().unwrap(), "3G"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), 3 << 30);
    use std::os::unix::fs::MetadataExt;
    assert!(meta.blocks() * 512 < 1 << 20, "image is not sparse");

    let o = strata(&["img", "create", "-f", "raw", path.to_str().unwrap(), "12Q"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("12Q"), "{}", stderr(&o));
    assert!(Path::new(&path).exists());
}

/// Starts the daemon with `args`, returns its log up to the line saying `n` exports serve.
fn startup_log(args: &[&str], n: usize) -> String {
    let mut daemon = Daemon::spawn(args, Duration::from_secs(20));
    for _ in 0..n {
        daemon.wait_for("serving node");
    }
    std::mem::take(&mut daemon.log)
}

#[test]
fn exports_poll_as_their_iothread_says() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sock = |name: &str| dir.path().join(name).display().to_string();
    let export = |id: &str, extra: &str| {
        format!(
            "type=vhost-user-blk,id={id},node-name=n0,addr.type=unix,addr.path={}{extra}",
            sock(id)
        )
    };
    let log = startup_log(
        &[
            "--object",
            "iothread,id=quiet,poll-max-ns=0,poll-grow=2",
            "--object",
            "iothread,id=plain",
            "--blockdev",
            "driver=null-co,node-name=n0",
            "--export",
            &export("a", ",iothread=quiet"),
            "--export",
            &export("b", ",iothread=quiet,poll-max-ns=7000"),
            "--export",
            &export("c", ",iothread=plain"),
            "--export",
            &export("d", ""),
        ],
        4,
    );
    for (id, ns) in [("a", 0), ("b", 7000), ("c", 50000), ("d", 50000)] {
        let line = log
            .lines()
            .find(|l| l.contains(&format!("export '{id}': serving")))
            .unwrap_or_else(|| panic!("no start line for {id}: {log}"));
        assert!(line.ends_with(&format!("poll-max-ns={ns}")), "{line}");
    }
}

#[test]
fn an_unknown_iothread_is_an_error() {
    let o = strata(&[
        "--blockdev",
        "driver=null-co,node-name=n0",
        "--export",
        "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=/tmp/z.sock,iothread=iot9",
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("iothread \"iot9\" not found"),
        "{}",
        stderr(&o)
    );
}
