//! Opening nodes through the Graph: option syntax, `json:` filenames, references, node names,
//! per-role inheritance, driver selection and probing, null-co.

mod common;

use std::sync::Arc;

use common::{err, image, image_with, open, open_flags_of, path_str, read, try_open, write};
use strata_backend::{ChildRole, DiscardMode, Graph, Options};

#[test]
fn dotted_keys_build_a_raw_over_file_graph() {
    let img = image(64 * 1024, 1);
    let p = path_str(&img);
    let g = Graph::new();
    let top = open(
        &g,
        &format!("driver=raw,node-name=top,file.driver=file,file.filename={p},file.node-name=proto,file.aio=io_uring"),
    );
    assert_eq!(top.name(), "top");
    assert_eq!(top.driver_name(), "raw");
    assert_eq!(top.size(), 64 * 1024);
    let file = top.child(ChildRole::File).expect("file child");
    assert_eq!(file.name(), "proto");
    assert_eq!(file.driver_name(), "file");
    assert_eq!(file.filename(), p);
    assert_eq!(
        top.filename(),
        p,
        "a format shows its file child's filename"
    );
    assert!(Arc::ptr_eq(&g.find("proto").unwrap(), file));
    assert_eq!(file.parents(), vec![(ChildRole::File, "top".to_string())]);

    let infos = g.query();
    let names: Vec<&str> = infos.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["proto", "top"]);
    assert_eq!(
        infos[1].children,
        vec![("file".to_string(), "proto".to_string())]
    );

    // The node reads the file's bytes.
    assert_eq!(
        read(&top, 1000, 300).unwrap(),
        common::pattern(1, 64 * 1024)[1000..1300]
    );

    // Nodes the caller opened leave the graph with their last reference.
    drop(top);
    assert!(g.find("top").is_none());
    assert!(g.find("proto").is_none());
    assert!(g.query().is_empty());
}

#[test]
fn commas_in_filenames_are_doubled() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a,b.img");
    std::fs::write(&path, common::pattern(2, 4096)).unwrap();
    let escaped = path.to_str().unwrap().replace(',', ",,");
    let g = Graph::new();
    let n = open(&g, &format!("driver=raw,file.filename={escaped}"));
    assert_eq!(n.filename(), path.to_str().unwrap());
    assert_eq!(read(&n, 0, 4096).unwrap(), common::pattern(2, 4096));
}

#[test]
fn json_options_string_is_flattened() {
    let img = image(8192, 3);
    let g = Graph::new();
    let json = serde_json::json!({
        "driver": "raw",
        "node-name": "j0",
        "read-only": true,
        "file": {"driver": "file", "filename": path_str(&img), "cache": {"direct": true}},
    });
    let n = g
        .open(Options::parse(&json.to_string(), None).unwrap())
        .unwrap();
    assert_eq!(n.name(), "j0");
    assert!(n.is_read_only());
    let file = n.child(ChildRole::File).unwrap();
    assert!(file.flags().cache_direct);
    assert!(file.is_read_only());
}

#[test]
fn json_filename_is_merged_below_explicit_options() {
    let real = image(8192, 4);
    let decoy = image(4096, 5);
    let json = serde_json::json!({
        "driver": "raw",
        "read-only": false,
        "file": {"driver": "file", "filename": path_str(&decoy)},
    });
    let g = Graph::new();

    // json: alone opens what it describes.
    let mut o = Options::new();
    o.set("filename", format!("json:{json}"));
    let n = g.open(o).unwrap();
    assert_eq!(n.driver_name(), "raw");
    assert_eq!(n.filename(), path_str(&decoy));
    assert!(!n.is_read_only());
    drop(n);

    // Explicit options win over the json: ones, key by key.
    let mut o = Options::new();
    o.set("filename", format!("json:{json}"));
    o.set("read-only", "on");
    o.set("file.filename", path_str(&real));
    let n = g.open(o).unwrap();
    assert_eq!(n.filename(), path_str(&real));
    assert_eq!(n.size(), 8192);
    assert!(n.is_read_only(), "explicit read-only=on beats json's false");
    assert!(n.child(ChildRole::File).unwrap().is_read_only());
    assert_eq!(n.explicit_options().get("read-only"), Some("on"));
    assert_eq!(
        n.explicit_options().get("file.filename"),
        Some(path_str(&real))
    );
    drop(n);

    // A json: filename of a file child, written in keyval syntax (commas doubled).
    let child_json = serde_json::json!({"driver": "file", "filename": path_str(&real)});
    let text = format!(
        "driver=raw,file.filename=json:{}",
        child_json.to_string().replace(',', ",,")
    );
    let n = open(&g, &text);
    assert_eq!(n.child(ChildRole::File).unwrap().driver_name(), "file");
    assert_eq!(n.size(), 8192);

    // Broken JSON is an error, not a file name.
    let mut o = Options::new();
    o.set("filename", "json:{\"driver\":");
    let e = err(g.open(o));
    assert!(e.message().contains("JSON"), "{e}");
}

#[test]
fn references_to_existing_nodes() {
    let img = image(16384, 6);
    let p = path_str(&img);
    let g = Graph::new();
    let f0 = g
        .blockdev_add(
            Options::parse(&format!("driver=file,filename={p},node-name=f0"), None).unwrap(),
        )
        .unwrap();
    let r0 = open(&g, "driver=raw,file=f0,node-name=r0");
    assert!(Arc::ptr_eq(r0.child(ChildRole::File).unwrap(), &f0));
    assert_eq!(f0.parents(), vec![(ChildRole::File, "r0".to_string())]);
    assert_eq!(read(&r0, 0, 16384).unwrap(), read(&f0, 0, 16384).unwrap());
    // Without a driver, the referenced node is probed (and used, not opened again).
    let probed = open(&g, "file=f0");
    assert_eq!(probed.driver_name(), "raw");
    assert!(Arc::ptr_eq(probed.child(ChildRole::File).unwrap(), &f0));
    drop(probed);
    drop(f0);

    // The referenced node is in use: blockdev-del refuses, naming the user.
    let e = err(g.blockdev_del("f0"));
    assert_eq!(e.errno(), libc::EBUSY);
    assert!(e.message().contains("r0"), "{e}");
    drop(r0);
    g.blockdev_del("f0").unwrap();
    assert!(g.find("f0").is_none());
    let e = err(g.blockdev_del("f0"));
    assert!(
        e.message()
            .contains("Failed to find node with node-name='f0'"),
        "{e}"
    );

    // Unknown reference.
    let e = err(try_open(&g, "driver=raw,file=nope"));
    assert_eq!(e.errno(), libc::ENODEV);
    assert_eq!(e.message(), "Cannot find device=nope nor node-name=nope");

    // A reference cannot take options of its own.
    let f1 = g
        .blockdev_add(
            Options::parse(&format!("driver=file,filename={p},node-name=f1"), None).unwrap(),
        )
        .unwrap();
    let e = err(Options::parse("driver=raw,file=f1,file.aio=threads", None));
    assert!(e.message().contains("'file'"), "{e}");
    let mut o = Options::new();
    o.set("driver", "raw");
    o.set("file", "f1");
    o.set("file.aio", "threads");
    let e = err(g.open(o));
    assert!(
        e.message()
            .contains("Cannot reference an existing block device"),
        "{e}"
    );
    drop(f1);
    // Closed, so that the read-only node below may open the image (a writer locks it).
    g.blockdev_del("f1").unwrap();

    // A read-only node cannot be the writable file of a read-write parent; a read-only parent
    // can use it.
    g.blockdev_add(
        Options::parse(
            &format!("driver=file,filename={p},node-name=ro,read-only=on"),
            None,
        )
        .unwrap(),
    )
    .unwrap();
    let e = err(try_open(&g, "driver=raw,file=ro"));
    assert_eq!(e.errno(), libc::EROFS);
    let n = open(&g, "driver=raw,file=ro,read-only=on");
    assert!(n.is_read_only());
    drop(n);
    g.blockdev_del("ro").unwrap();

    // User-added nodes need a name and are not owned by the caller; opened ones are.
    let e =
        err(g.blockdev_add(Options::parse(&format!("driver=file,filename={p}"), None).unwrap()));
    assert!(e.message().contains("node-name"), "{e}");
    let _named = open(&g, &format!("driver=file,filename={p},node-name=mine"));
    let e = err(g.blockdev_del("mine"));
    assert!(e.message().contains("not owned"), "{e}");
}

#[test]
fn unknown_options_are_named_like_qemu() {
    let img = image(4096, 7);
    let p = path_str(&img);
    let g = Graph::new();
    let cases = [
        (
            format!("driver=raw,file.filename={p},foo=1"),
            "Block format 'raw' does not support the option 'foo'",
        ),
        (
            format!("driver=raw,file.filename={p},file.foo=1"),
            "Block protocol 'file' doesn't support the option 'foo'",
        ),
        (
            format!("driver=file,filename={p},foo=bar"),
            "Block protocol 'file' doesn't support the option 'foo'",
        ),
        (
            "driver=null-co,foo=1".to_string(),
            "Block protocol 'null-co' doesn't support the option 'foo'",
        ),
        (
            format!("driver=raw,file.filename={p},cache.foo=1"),
            "Block format 'raw' does not support the option 'cache.foo'",
        ),
    ];
    for (opts, want) in cases {
        let e = err(try_open(&g, &opts));
        assert_eq!(e.message(), want, "for {opts}");
        assert_eq!(e.errno(), libc::EINVAL);
    }
    // A failed open leaves nothing behind: the child it opened is gone too.
    assert!(g.query().is_empty(), "{:?}", g.query());

    let e = err(try_open(&g, "driver=qcow3,file.filename=x"));
    assert!(e.message().contains("Unknown driver 'qcow3'"), "{e}");
    let e = err(try_open(&g, "driver=raw"));
    assert_eq!(e.message(), "A block device must be specified for \"file\"");
    let e = err(try_open(
        &g,
        &format!("driver=raw,file.filename={p},file.aio=bogus"),
    ));
    assert!(e.message().contains("'aio'"), "{e}");
    let e = err(try_open(
        &g,
        &format!("driver=raw,file.filename={p},read-only=maybe"),
    ));
    assert!(e.message().contains("'read-only'"), "{e}");
    let e = err(try_open(
        &g,
        &format!("driver=raw,file.filename={p},detect-zeroes=unmap"),
    ));
    assert!(e.message().contains("discard"), "{e}");
    let e = err(try_open(
        &g,
        "driver=raw,file.filename=/nonexistent/strata.img",
    ));
    assert_eq!(e.errno(), libc::ENOENT);
    assert!(e.message().contains("/nonexistent/strata.img"), "{e}");
}

#[test]
fn node_name_rules() {
    let img = image(4096, 8);
    let p = path_str(&img);
    let g = Graph::new();
    for bad in ["0disk", "-x", "a b", "a+b", "#block0", "é", &"a".repeat(32)] {
        let mut o = Options::parse(&format!("driver=file,filename={p}"), None).unwrap();
        o.set("node-name", bad);
        let e = err(g.open(o));
        assert_eq!(e.errno(), libc::EINVAL, "{bad:?}");
        assert!(e.message().contains("node-name"), "{bad:?}: {e}");
    }
    let longest = format!("A{}", "b-._9".repeat(6));
    assert_eq!(longest.len(), 31);
    let n = open(&g, &format!("driver=file,filename={p},node-name={longest}"));
    assert_eq!(n.name(), longest);
    drop(n);

    // Unnamed nodes get generated names that users cannot type.
    let anon = open(&g, &format!("driver=raw,file.filename={p}"));
    assert!(anon.name().starts_with('#'), "{}", anon.name());
    let child = anon.child(ChildRole::File).unwrap();
    assert!(child.name().starts_with('#'));
    assert_ne!(anon.name(), child.name());
}

#[test]
fn duplicate_node_names_are_refused() {
    let img = image(4096, 9);
    let p = path_str(&img);
    let g = Graph::new();
    let first = open(&g, &format!("driver=file,filename={p},node-name=d0"));
    let e = err(try_open(
        &g,
        &format!("driver=file,filename={p},node-name=d0"),
    ));
    assert_eq!(e.message(), "Duplicate node name 'd0'");
    let e = err(try_open(
        &g,
        &format!("driver=raw,node-name=d0,file.filename={p}"),
    ));
    assert_eq!(e.message(), "Duplicate node name 'd0'");
    let e = err(try_open(
        &g,
        &format!("driver=raw,node-name=d1,file.filename={p},file.node-name=d0"),
    ));
    assert_eq!(e.message(), "Duplicate node name 'd0'");
    // Parent and child of one open cannot share a name either (on another image: the child
    // opens its file before the parent's name is checked, and `first` holds this one).
    let other = image(4096, 9);
    let e = err(try_open(
        &g,
        &format!(
            "driver=raw,node-name=same,file.filename={},file.node-name=same",
            path_str(&other)
        ),
    ));
    assert_eq!(e.message(), "Duplicate node name 'same'");
    assert!(g.find("same").is_none());
    assert!(g.find("d1").is_none());
    // Once the node is closed, its name is free again.
    drop(first);
    open(&g, &format!("driver=file,filename={p},node-name=d0"));
}

#[test]
fn cache_direct_is_inherited_by_the_file_child_unless_explicit() {
    let img = image(65536, 10);
    let p = path_str(&img);
    let g = Graph::new();

    let n = open(&g, &format!("driver=raw,cache.direct=on,file.filename={p}"));
    let file = n.child(ChildRole::File).unwrap();
    assert!(file.flags().cache_direct, "inherited cache.direct");
    assert!(file.limits().request_alignment > 1, "{:?}", file.limits());
    let flags = open_flags_of(&img);
    assert_eq!(flags.len(), 1, "{flags:?}");
    assert_ne!(flags[0] & libc::O_DIRECT, 0, "opened without O_DIRECT");
    assert_eq!(flags[0] & libc::O_ACCMODE, libc::O_RDWR);
    drop(n);

    let n = open(
        &g,
        &format!("driver=raw,cache.direct=on,file.filename={p},file.cache.direct=off"),
    );
    let file = n.child(ChildRole::File).unwrap();
    assert!(
        !file.flags().cache_direct,
        "the child's explicit value wins"
    );
    assert_eq!(file.limits().request_alignment, 1);
    let flags = open_flags_of(&img);
    assert_eq!(flags.len(), 1, "{flags:?}");
    assert_eq!(flags[0] & libc::O_DIRECT, 0);
    drop(n);

    let n = open(
        &g,
        &format!("driver=raw,file.filename={p},file.cache.direct=on"),
    );
    assert!(n.child(ChildRole::File).unwrap().flags().cache_direct);
    drop(n);

    let n = open(
        &g,
        &format!("driver=raw,cache.no-flush=on,file.filename={p}"),
    );
    assert!(n.child(ChildRole::File).unwrap().flags().cache_no_flush);
    drop(n);

    // The file child always may unmap; the format decides (default: ignore).
    let n = open(&g, &format!("driver=raw,file.filename={p}"));
    assert_eq!(n.flags().discard, DiscardMode::Ignore);
    assert_eq!(
        n.child(ChildRole::File).unwrap().flags().discard,
        DiscardMode::Unmap
    );
    assert!(!n.discard_enabled());
    drop(n);
    let n = open(
        &g,
        &format!("driver=raw,file.filename={p},file.discard=ignore"),
    );
    assert_eq!(
        n.child(ChildRole::File).unwrap().flags().discard,
        DiscardMode::Ignore
    );
}

#[test]
fn cache_options_reach_grandchildren() {
    // raw over raw over file: what the middle node inherited, it passes on (QEMU copies from
    // the parent's full options, inherited ones included).
    let img = image(65536, 18);
    let p = path_str(&img);
    let g = Graph::new();
    let n = open(
        &g,
        &format!("driver=raw,cache.direct=on,read-only=on,file.driver=raw,file.offset=4096,file.file.filename={p}"),
    );
    let middle = n.child(ChildRole::File).unwrap();
    assert_eq!(middle.driver_name(), "raw");
    assert!(middle.flags().cache_direct);
    assert_eq!(middle.options().get("cache.direct"), Some("on"));
    let file = middle.child(ChildRole::File).unwrap();
    assert!(
        file.flags().cache_direct,
        "cache.direct did not reach the grandchild"
    );
    assert!(file.is_read_only());
    let flags = open_flags_of(&img);
    assert_eq!(flags.len(), 1, "{flags:?}");
    assert_ne!(flags[0] & libc::O_DIRECT, 0);
    assert_eq!(n.size(), 65536 - 4096);
    assert_eq!(
        read(&n, 1, 100).unwrap(),
        common::pattern(18, 65536)[4097..4197]
    );
}

#[test]
fn read_only_is_inherited_by_the_file_child() {
    let img = image(8192, 11);
    let p = path_str(&img);
    let g = Graph::new();
    let n = open(&g, &format!("driver=raw,read-only=on,file.filename={p}"));
    assert!(n.is_read_only());
    let file = n.child(ChildRole::File).unwrap();
    assert!(file.flags().read_only);
    let flags = open_flags_of(&img);
    assert_eq!(flags.len(), 1, "{flags:?}");
    assert_eq!(flags[0] & libc::O_ACCMODE, libc::O_RDONLY);
    assert_eq!(err(write(file, 0, b"x")).errno(), libc::EROFS);
    assert_eq!(err(write(&n, 0, b"x")).errno(), libc::EROFS);
    drop(n);

    let n = open(&g, &format!("driver=raw,file.filename={p}"));
    assert!(!n.child(ChildRole::File).unwrap().is_read_only());
    drop(n);

    // auto-read-only falls back to read-only when the file is not writable.
    let ro = image(4096, 12);
    let mut perms = std::fs::metadata(&ro).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o444);
    std::fs::set_permissions(&ro, perms).unwrap();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        // root can write anything, so only check the fallback as a normal user.
        let e = err(try_open(
            &g,
            &format!("driver=raw,file.filename={}", path_str(&ro)),
        ));
        assert_eq!(e.errno(), libc::EACCES);
        let n = open(
            &g,
            &format!(
                "driver=raw,auto-read-only=on,file.filename={}",
                path_str(&ro)
            ),
        );
        assert!(n.child(ChildRole::File).unwrap().is_read_only());
    }
}

#[test]
fn explicit_raw_over_file_filename() {
    let img = image(12288, 13);
    let p = path_str(&img);
    let g = Graph::new();
    let n = open(&g, &format!("driver=raw,file.filename={p}"));
    assert_eq!(n.driver_name(), "raw");
    assert_eq!(n.child(ChildRole::File).unwrap().driver_name(), "file");
    drop(n);
    // `filename` on a format means the same.
    let n = open(&g, &format!("driver=raw,filename={p}"));
    assert_eq!(n.child(ChildRole::File).unwrap().driver_name(), "file");
    assert_eq!(n.size(), 12288);
    drop(n);
    let e = err(try_open(
        &g,
        &format!("driver=raw,filename={p},file.filename={p}"),
    ));
    assert!(e.message().contains("'file' and 'filename'"), "{e}");
    // file: protocol prefix.
    let n = open(&g, &format!("driver=raw,file.filename=file:{p}"));
    assert_eq!(n.child(ChildRole::File).unwrap().driver_name(), "file");
    assert_eq!(n.filename(), p);
    drop(n);
    // open_image with an explicit format.
    let n = g.open_image(p, Some("raw"), true).unwrap();
    assert!(n.is_read_only());
    assert_eq!(
        read(&n, 100, 10).unwrap(),
        common::pattern(13, 12288)[100..110]
    );
}

#[test]
fn raw_offset_and_size_window() {
    let data = common::pattern(14, 32768);
    let img = image_with(&data);
    let p = path_str(&img);
    let g = Graph::new();
    let n = open(
        &g,
        &format!("driver=raw,offset=4096,size=8K,file.filename={p}"),
    );
    assert_eq!(n.size(), 8192);
    assert_eq!(read(&n, 0, 8192).unwrap(), data[4096..12288]);
    write(&n, 8000, &[0xAB; 192]).unwrap();
    let on_disk = common::file_bytes(&img);
    assert_eq!(on_disk[12096..12288], [0xAB; 192]);
    assert_eq!(on_disk[12288..], data[12288..]);
    assert_eq!(err(read(&n, 8000, 193)).errno(), libc::EIO);
    drop(n);
    let e = err(try_open(
        &g,
        &format!("driver=raw,offset=30K,size=4K,file.filename={p}"),
    ));
    assert!(e.message().contains("The sum of offset"), "{e}");
}

#[test]
fn no_driver_probes_raw_and_guards_sector_zero() {
    let img = image(65536, 15);
    let p = path_str(&img);
    let g = Graph::new();
    let qcow2_magic = b"QFI\xfb\x00\x00\x00\x03";

    for opts in [format!("file.filename={p}"), format!("filename={p}")] {
        let n = open(&g, &opts);
        assert_eq!(n.driver_name(), "raw", "probed format for {opts}");
        assert_eq!(n.child(ChildRole::File).unwrap().driver_name(), "file");
        assert_eq!(n.options().get("driver"), Some("raw"));

        // A qcow2 header in sector 0 is refused; the image stays as it was.
        let mut header = qcow2_magic.to_vec();
        header.extend_from_slice(&[0u8; 504]);
        let e = err(write(&n, 0, &header));
        assert_eq!(e.errno(), libc::EPERM, "{e}");
        let e = err(write(&n, 0, qcow2_magic));
        assert_eq!(e.errno(), libc::EPERM, "{e}");
        // ... also when written in pieces (the magic alone is fine while the version after it
        // is 0, which no QEMU probe takes for qcow2; any other version would be refused).
        write(&n, 0, &[0; 512]).unwrap();
        write(&n, 0, &qcow2_magic[..4]).unwrap();
        let e = err(write(&n, 4, &qcow2_magic[4..]));
        assert_eq!(e.errno(), libc::EPERM, "split magic: {e}");
        // Other data in sector 0, and the magic elsewhere, are fine.
        write(&n, 0, &[0x11; 512]).unwrap();
        write(&n, 512, qcow2_magic).unwrap();
        let on_disk = common::file_bytes(&img);
        assert_eq!(on_disk[..512], [0x11; 512]);
        assert_eq!(&on_disk[512..520], qcow2_magic);
    }

    // open_image without a format probes as well.
    let n = g.open_image(p, None, false).unwrap();
    assert_eq!(n.driver_name(), "raw");
    assert_eq!(err(write(&n, 0, qcow2_magic)).errno(), libc::EPERM);
    drop(n);

    // With driver=raw given, the same write is allowed ...
    let n = open(&g, &format!("driver=raw,file.filename={p}"));
    write(&n, 0, qcow2_magic).unwrap();
    drop(n);
    assert_eq!(&common::file_bytes(&img)[..8], qcow2_magic);

    // ... and the image now probes as qcow2, which strata cannot open: the error names it.
    let e = err(try_open(&g, &format!("file.filename={p}")));
    assert!(e.message().contains("qcow2"), "{e}");
    assert!(e.message().contains(p), "{e}");
    assert!(g.query().is_empty());
}

#[test]
fn qcow2_file_is_reported_as_qcow2() {
    let mut header = b"QFI\xfb\x00\x00\x00\x02".to_vec();
    header.resize(4096, 0);
    let img = image_with(&header);
    let g = Graph::new();
    for opts in [
        format!("file.filename={}", path_str(&img)),
        format!("filename={},cache.direct=on", path_str(&img)),
    ] {
        let e = err(try_open(&g, &opts));
        assert_eq!(e.errno(), libc::EINVAL);
        assert!(e.message().contains("qcow2"), "{e}");
    }
    // An explicit raw driver opens it as bytes.
    let n = open(&g, &format!("driver=raw,file.filename={}", path_str(&img)));
    assert_eq!(read(&n, 0, 4).unwrap(), b"QFI\xfb");
}

#[test]
fn probing_an_empty_or_tiny_file() {
    let g = Graph::new();
    let empty = image_with(&[]);
    let n = open(&g, &format!("file.filename={}", path_str(&empty)));
    assert_eq!(n.driver_name(), "raw");
    assert_eq!(n.size(), 0);
    let tiny = image_with(b"hello");
    let n = open(
        &g,
        &format!("file.filename={},cache.direct=on", path_str(&tiny)),
    );
    assert_eq!(n.driver_name(), "raw");
    assert_eq!(read(&n, 0, 5).unwrap(), b"hello");

    // A probed raw node works in whole sectors; a size that is not a multiple of 512 still
    // reads and writes right up to its end, and nothing past it.
    let data = common::pattern(17, 1000);
    let odd = image_with(&data);
    let n = open(&g, &format!("file.filename={}", path_str(&odd)));
    assert_eq!(n.size(), 1000);
    assert_eq!(read(&n, 0, 1000).unwrap(), data);
    assert_eq!(read(&n, 990, 10).unwrap(), data[990..]);
    write(&n, 995, b"12345").unwrap();
    write(&n, 3, b"abc").unwrap();
    assert_eq!(err(write(&n, 996, b"12345")).errno(), libc::EIO);
    drop(n);
    let mut want = data.clone();
    want[995..].copy_from_slice(b"12345");
    want[3..6].copy_from_slice(b"abc");
    assert_eq!(common::file_bytes(&odd), want);
}

#[test]
fn null_co_size_and_read_zeroes() {
    let g = Graph::new();
    let n = open(&g, "driver=null-co,size=1M,read-zeroes=on");
    assert_eq!(n.driver_name(), "null-co");
    assert_eq!(n.size(), 1 << 20);
    let mut buf = vec![0xAAu8; 4096];
    common::run(n.read(4096, &[strata_backend::IoVec::new(&mut buf)])).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    write(&n, 0, &[1u8; 4096]).unwrap();
    assert!(read(&n, 0, 4096).unwrap().iter().all(|&b| b == 0));
    common::run(n.flush()).unwrap();
    assert_eq!(err(read(&n, (1 << 20) - 1, 2)).errno(), libc::EIO);

    // Without read-zeroes the buffer is left as it was (QEMU's default).
    let n = open(&g, "driver=null-co,size=64K");
    let mut buf = vec![0xAAu8; 512];
    common::run(n.read(0, &[strata_backend::IoVec::new(&mut buf)])).unwrap();
    assert!(buf.iter().all(|&b| b == 0xAA));

    // Defaults: 1 GiB; filename null-co:// accepted and shown.
    let n = open(&g, "driver=null-co");
    assert_eq!(n.size(), 1 << 30);
    assert_eq!(n.filename(), "null-co://");
    let n = open(&g, "driver=null-co,filename=null-co://");
    assert_eq!(n.size(), 1 << 30);

    // As the file of a raw node, by protocol prefix or driver.
    let n = open(
        &g,
        "driver=raw,file.filename=null-co://,file.size=8K,file.read-zeroes=on",
    );
    assert_eq!(n.child(ChildRole::File).unwrap().driver_name(), "null-co");
    assert_eq!(n.size(), 8192);
    assert_eq!(read(&n, 100, 100).unwrap(), vec![0u8; 100]);
    let n = open(&g, "driver=raw,file.driver=null-co,file.size=16K");
    assert_eq!(n.size(), 16384);

    let e = err(try_open(&g, "driver=null-co,size=lots"));
    assert!(e.message().contains("'size'"), "{e}");
    let e = err(try_open(&g, "driver=null-co,read-zeroes=perhaps"));
    assert!(e.message().contains("'read-zeroes'"), "{e}");
}

#[test]
fn file_driver_refuses_non_regular_files() {
    let dir = tempfile::tempdir().unwrap();
    let g = Graph::new();
    let e = err(try_open(
        &g,
        &format!("driver=file,filename={},read-only=on", dir.path().display()),
    ));
    assert!(e.message().contains("regular file"), "{e}");
    let e = err(try_open(
        &g,
        &format!("driver=file,filename={}", dir.path().display()),
    ));
    assert_eq!(e.errno(), libc::EISDIR, "{e}");
    let img = image(4096, 16);
    let e = err(try_open(
        &g,
        &format!("driver=host_device,filename={}", path_str(&img)),
    ));
    assert!(e.message().contains("block device"), "{e}");
    let e = err(try_open(&g, "driver=raw,file.filename=nosuch:thing"));
    assert!(e.message().contains("Unknown protocol 'nosuch'"), "{e}");
}
