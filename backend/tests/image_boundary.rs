//! Image files are untrusted: what their bytes name or contain must not make the block layer
//! loop, exhaust memory or reach host data (the image and host boundary).

mod common;

use std::path::Path;

use common::*;
use strata_backend::driver::CreateRequest;
use strata_backend::{registry, Graph, Options};

/// Creates a qcow2 image at `path` whose header names `backing` (not opened) as a qcow2 file.
fn qcow2_with_backing(path: &Path, backing: Option<&str>) {
    let mut options = Options::new();
    if let Some(b) = backing {
        options.set("backing_file", b);
        options.set("backing_fmt", "qcow2");
    }
    let request = CreateRequest {
        path,
        size: 1 << 20,
        options,
    };
    registry::create("qcow2", request).expect("create qcow2");
}

fn open_qcow2(path: &Path) -> strata_backend::Result<std::sync::Arc<strata_backend::Node>> {
    let opts = format!(
        "driver=qcow2,read-only=on,file.filename={}",
        path.to_str().expect("utf-8 path")
    );
    try_open(&Graph::new(), &opts)
}

#[test]
fn a_backing_chain_loop_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    // a -> b -> a: each header names the other.
    qcow2_with_backing(&a, Some("b.qcow2"));
    qcow2_with_backing(&b, Some("a.qcow2"));
    let e = err(open_qcow2(&a));
    assert!(e.to_string().contains("loop"), "{e}");
    // An image that names itself, directly and through a hard link (another name, one file).
    let c = dir.path().join("c.qcow2");
    qcow2_with_backing(&c, Some("c.qcow2"));
    let e = err(open_qcow2(&c));
    assert!(e.to_string().contains("loop"), "{e}");
    let d = dir.path().join("d.qcow2");
    qcow2_with_backing(&d, Some("d-link.qcow2"));
    std::fs::hard_link(&d, dir.path().join("d-link.qcow2")).expect("hard link");
    let e = err(open_qcow2(&d));
    assert!(e.to_string().contains("loop"), "{e}");
}

#[test]
fn backing_chains_are_bounded_in_depth() {
    let dir = tempfile::tempdir().expect("tempdir");
    let depth = strata_backend::driver::MAX_BACKING_CHAIN;
    let name = |i: usize| format!("img{i}.qcow2");
    qcow2_with_backing(&dir.path().join(name(0)), None);
    for i in 1..=depth {
        qcow2_with_backing(&dir.path().join(name(i)), Some(&name(i - 1)));
    }
    // A chain of exactly the limit opens, and reads through every layer.
    let top = open_qcow2(&dir.path().join(name(depth - 1))).expect("chain at the limit");
    assert_eq!(read(&top, 0, 512).expect("read"), vec![0u8; 512]);
    drop(top);
    // One image more is refused with a clear error.
    let e = err(open_qcow2(&dir.path().join(name(depth))));
    assert!(e.to_string().contains("deeper than"), "{e}");
}
