//! qcow2 in the node graph: probing, explicit `driver=qcow2`, `snapshot=on` temporary
//! overlays, backing options.

mod qcow2_util;

use qcow2_util::*;
use strata_backend::{ChildRole, Graph, Options};

#[test]
fn snapshot_on_takes_writes_in_a_deleted_temp_overlay() {
    let dir = tempdir();
    let base = path(&dir, "base.raw");
    let data = pattern(3, 3 << 20);
    std::fs::write(&base, &data).unwrap();
    let g = Graph::new();
    let node = g
        .blockdev_add(
            Options::parse(
                &format!(
                    "driver=raw,node-name=disk,file.filename={},snapshot=on,discard=unmap",
                    s(&base)
                ),
                None,
            )
            .unwrap(),
        )
        .expect("open with snapshot=on");
    assert_eq!(node.name(), "disk");
    assert_eq!(node.driver_name(), "qcow2");
    assert!(!node.is_read_only());
    assert!(g
        .find("disk")
        .is_some_and(|n| std::sync::Arc::ptr_eq(&n, &node)));
    let below = node
        .child(ChildRole::Backing)
        .expect("the original is the backing node");
    assert_eq!(below.driver_name(), "raw");
    assert!(below.is_read_only());
    // The overlay file (in $TMPDIR, named after this process) is already unlinked.
    let prefix = format!("strata-snapshot.{}.", std::process::id());
    let leftovers: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .collect();
    assert!(
        leftovers.is_empty(),
        "temp overlay still linked: {leftovers:?}"
    );
    write(&node, 4096, &[0xab; 10000]);
    run(node.discard(1 << 20, 1 << 20));
    run(node.flush());
    let mut want = data.clone();
    want[4096..14096].fill(0xab);
    want[1 << 20..2 << 20].fill(0);
    assert_same(&read_all(&node), &want, "through the overlay");
    drop(node);
    g.blockdev_del("disk").unwrap();
    assert_same(
        &std::fs::read(&base).unwrap(),
        &data,
        "the base image is untouched",
    );
}

#[test]
fn explicit_driver_probe_and_options() {
    let dir = tempdir();
    let img = path(&dir, "a.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "8M"]);
    qemu_io(&img, "qcow2", &["write -P 0x42 0 1M".into()]);
    let g = Graph::new();
    for opts in [
        format!("driver=qcow2,file.filename={}", s(&img)),
        format!("file.filename={}", s(&img)),
        format!("driver=qcow2,file.driver=file,file.filename={},l2-cache-size=128K,refcount-cache-size=256K", s(&img)),
        format!("driver=qcow2,file.filename={},cache-size=1M,l2-cache-entry-size=4096", s(&img)),
        format!(r#"json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{}"}}}}"#, s(&img)),
    ] {
        let opts = if let Some(j) = opts.strip_prefix("json:") {
            let mut o = Options::new();
            o.set("filename", format!("json:{j}"));
            o
        } else {
            Options::parse(&opts, None).unwrap()
        };
        let node = g.open(opts).expect("open");
        assert_eq!(node.driver_name(), "qcow2");
        assert_eq!(node.size(), 8 << 20);
        assert_eq!(read(&node, 0, 4096), vec![0x42; 4096]);
    }
    let e = g
        .open(
            Options::parse(
                &format!(
                    "driver=qcow2,file.filename={},cache-size=1M,l2-cache-size=2M",
                    s(&img)
                ),
                None,
            )
            .unwrap(),
        )
        .unwrap_err();
    assert!(
        e.message()
            .contains("l2-cache-size may not exceed cache-size"),
        "{e}"
    );
    let e = g
        .open(
            Options::parse(
                &format!("driver=qcow2,file.filename={},bogus=1", s(&img)),
                None,
            )
            .unwrap(),
        )
        .unwrap_err();
    assert!(e.message().contains("'bogus'"), "{e}");
    // backing.* options override the header's backing file.
    let base = path(&dir, "b.raw");
    std::fs::write(&base, pattern(1, 8 << 20)).unwrap();
    let top = path(&dir, "top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&top), "8M"]);
    let node = g
        .open(
            Options::parse(
                &format!(
                    "driver=qcow2,file.filename={},backing.driver=raw,backing.file.filename={}",
                    s(&top),
                    s(&base)
                ),
                None,
            )
            .unwrap(),
        )
        .expect("backing.* options");
    assert_eq!(
        read(&node, 8 << 19, 512),
        pattern(1, 8 << 20)[8 << 19..(8 << 19) + 512].to_vec()
    );
}

#[test]
fn dirty_image_is_repaired_on_open() {
    let dir = tempdir();
    let img = path(&dir, "dirty.qcow2");
    create_qcow2(&img, "lazy_refcounts=on", None, "8M");
    // qemu-io's abort leaves the dirty bit set with refcounts not updated.
    let out = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x21 0 1M",
            "-c",
            "write -P 0x22 3M 100k",
            "-c",
            "abort",
            s(&img),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "qemu-io abort should kill qemu-io");
    let header = std::fs::read(&img).unwrap();
    assert_eq!(header[79] & 1, 1, "the dirty bit is set");
    let (code, _) = qemu_check(&img);
    assert_ne!(code, 0, "qemu-img check sees the stale refcounts");
    {
        let g = Graph::new();
        let node = open(&g, &format!("driver=qcow2,file.filename={}", s(&img)));
        assert_eq!(read(&node, 0, 4096), vec![0x21; 4096]);
        write(&node, 5 << 20, &[0x23; 70000]);
    }
    let header = std::fs::read(&img).unwrap();
    assert_eq!(header[79] & 1, 0, "the dirty bit is cleared");
    assert_check_clean(&img, true);
    let raw = qemu_raw(&img);
    assert_eq!(&raw[0..1 << 20], &vec![0x21; 1 << 20][..]);
    assert_eq!(
        &raw[3 << 20..(3 << 20) + 100 * 1024],
        &vec![0x22; 100 * 1024][..]
    );
    assert_eq!(&raw[5 << 20..(5 << 20) + 70000], &vec![0x23; 70000][..]);
}

#[test]
fn check_agrees_with_qemu_img_and_repairs() {
    use strata_backend::driver::qcow2::{check, Repair};
    let dir = tempdir();
    let img = path(&dir, "leaky.qcow2");
    create_qcow2(&img, "cluster_size=4096", None, "8M");
    qemu_io(
        &img,
        "qcow2",
        &[
            "write -P 1 0 1M".into(),
            "write -P 2 6M 64k".into(),
            "discard 6M 64k".into(),
        ],
    );
    // Leak three free clusters at the end of the file: raise their refcounts behind qemu's
    // back (refcount block at cluster 2, 16-bit entries).
    let mut bytes = std::fs::read(&img).unwrap();
    let n = bytes.len() / 4096;
    for c in [n - 3, n - 2, n - 1] {
        bytes[2 * 4096 + 2 * c + 1] = 1;
    }
    // And an error: drop the refcount of a data cluster that is in use (its OFLAG_COPIED
    // is then wrong too).
    let data_cluster = 10usize;
    bytes[2 * 4096 + 2 * data_cluster + 1] = 0;
    std::fs::write(&img, &bytes).unwrap();
    let (code, out) = qemu_check(&img);
    assert_eq!(code, 2, "{out}");
    let g = Graph::new();
    let file = open(&g, &format!("driver=file,filename={}", s(&img)));
    let r = run(check(&file, Repair::None));
    assert_eq!((r.leaks, r.corruptions), (3, 2), "{:?}", r.messages);
    assert!(
        out.contains("3 leaked clusters") && out.contains("2 errors"),
        "{out}"
    );
    assert!(
        r.messages
            .iter()
            .any(|m| m == "ERROR cluster 10 refcount=0 reference=1"),
        "{:?}",
        r.messages
    );
    let r = run(check(&file, Repair::Leaks));
    assert_eq!((r.leaks_fixed, r.leaks, r.corruptions), (3, 0, 2));
    let r = run(check(&file, Repair::All));
    assert!(r.corruptions_fixed > 0, "{r:?}");
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
    drop(file);
    assert_check_clean(&img, true);
    assert_eq!(&qemu_raw(&img)[..1 << 20], &vec![1u8; 1 << 20][..]);
}
