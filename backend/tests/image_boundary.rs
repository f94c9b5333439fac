//! Image files are untrusted: what their bytes name or contain must not make the block layer
//! loop, exhaust memory or reach host data (the image and host boundary).

mod common;

use std::path::Path;

use common::*;
use strata_backend::driver::BackingPolicy;
use strata_backend::driver::{CreateRequest, CreateTarget};
use strata_backend::{registry, Graph, Options};

/// Creates a qcow2 image at `path` whose header names `backing` (not opened) as a qcow2 file.
fn qcow2_with_backing(path: &Path, backing: Option<&str>) {
    let mut options = Options::new();
    if let Some(b) = backing {
        options.set("backing_file", b);
        options.set("backing_fmt", "qcow2");
    }
    let request = CreateRequest {
        target: CreateTarget::File(path),
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

/// Sector 0 contents that QEMU's probes take for another format, each naming a host file.
fn disguised_sector0s() -> Vec<(&'static str, Vec<u8>)> {
    let sector = |head: &[u8]| {
        let mut s = head.to_vec();
        s.resize(512, 0);
        s
    };
    let mut qcow2_v4 = b"QFI\xfb\x00\x00\x00\x04".to_vec();
    // backing_file_offset 512, size 11: "/etc/passwd" (not read: probing decides first).
    qcow2_v4.extend_from_slice(&512u64.to_be_bytes());
    qcow2_v4.extend_from_slice(&11u32.to_be_bytes());
    vec![
        ("qcow2 version 4", sector(&qcow2_v4)),
        ("vmdk3 (COWD)", sector(b"COWD\x00\x00\x00\x01")),
        (
            "vmdk descriptor",
            sector(
                b"# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
                  createType=\"monolithicFlat\"\nRW 2048 FLAT \"/etc/passwd\" 0\n",
            ),
        ),
    ]
}

#[test]
fn qemu_probes_agree_that_the_disguises_are_not_raw() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (what, sector) in disguised_sector0s() {
        let path = dir.path().join("disguised.img");
        let mut content = sector.clone();
        content.resize(1 << 20, 0);
        std::fs::write(&path, &content).expect("write image");
        let out = std::process::Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&path)
            .output()
            .expect("qemu-img");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            !text.contains("\"format\": \"raw\""),
            "{what}: qemu-img says raw, so the guard need not refuse it: {text}"
        );
        assert!(
            strata_backend::probe::probe_format(&sector).is_some(),
            "{what}: strata's probe does not recognise what QEMU's does"
        );
    }
}

#[test]
fn a_probed_raw_image_refuses_every_disguise_in_sector0() {
    for (what, sector) in disguised_sector0s() {
        let img = image(1 << 20, 7);
        let node = open(&Graph::new(), &format!("file.filename={}", path_str(&img)));
        assert_eq!(node.driver_name(), "raw");
        let e = err(write(&node, 0, &sector));
        assert_eq!(e.errno(), libc::EPERM, "{what}: {e}");
        assert_eq!(
            file_bytes(&img)[..512],
            pattern(7, 1 << 20)[..512],
            "{what}"
        );
    }
}

/// A buffer that another thread keeps changing, as a guest's second vCPU can.
struct Flipping(*mut u8);

// SAFETY: the pointer is only used for volatile byte writes to a buffer that outlives the
// thread (joined before the buffer is dropped); racing with the block layer's reads of plain
// bytes is the situation under test, like DMA from guest memory.
unsafe impl Send for Flipping {}

#[test]
fn sector0_is_written_as_it_was_checked() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    let img = image(1 << 20, 3);
    let node = open(&Graph::new(), &format!("file.filename={}", path_str(&img)));
    let mut buf = vec![0u8; 512];
    let magic = *b"QFI\xfb\x00\x00\x00\x03";
    let stop = AtomicBool::new(false);
    let flipper = Flipping(buf.as_mut_ptr());
    std::thread::scope(|s| {
        s.spawn(|| {
            let f = flipper;
            let mut on = false;
            while !stop.load(Ordering::Relaxed) {
                on = !on;
                for (i, b) in magic.iter().enumerate() {
                    // SAFETY: see `Flipping`; i < 8 <= the buffer's 512 bytes.
                    unsafe { std::ptr::write_volatile(f.0.add(i), if on { *b } else { 0 }) };
                }
            }
        });
        // Stops the flipper however this thread leaves the scope (a failed assertion too).
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop = StopOnDrop(&stop);
        let start = Instant::now();
        let mut writes = 0;
        while writes < 20_000 && start.elapsed() < Duration::from_secs(3) {
            let iov = [strata_backend::IoVec::new(&mut buf[..])];
            // Refused or written: both are fine, as long as what lands is what was checked.
            let _ = run(node.write(0, &iov));
            writes += 1;
            let on_disk = file_bytes(&img);
            assert_eq!(
                strata_backend::probe::probe_format(&on_disk[..512]),
                None,
                "after {writes} writes, sector 0 of a probed raw image looks like another format"
            );
        }
    });
}

/// A qcow2 image at `path` whose header names `backing` with format `format`, both as given.
fn qcow2_naming(path: &Path, backing: &str, format: Option<&str>) {
    let mut options = Options::new();
    options.set("backing_file", backing);
    if let Some(f) = format {
        options.set("backing_fmt", f);
    }
    let request = CreateRequest {
        target: CreateTarget::File(path),
        size: 1 << 20,
        options,
    };
    registry::create("qcow2", request).expect("create qcow2");
}

fn open_with(
    graph: &Graph,
    path: &Path,
) -> strata_backend::Result<std::sync::Arc<strata_backend::Node>> {
    let opts = format!(
        "driver=qcow2,read-only=on,file.filename={}",
        path.to_str().expect("utf-8 path")
    );
    try_open(graph, &opts)
}

#[test]
fn backing_names_from_images_reach_only_allowed_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let secret = elsewhere.path().join("secret.raw");
    std::fs::write(&secret, pattern(5, 65536)).expect("write secret");
    let secret_name = secret.to_str().expect("utf-8").to_string();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, pattern(6, 1 << 20)).expect("write base");
    std::os::unix::fs::symlink(&secret, dir.path().join("link.raw")).expect("symlink");

    let refused: Vec<(&str, String, Option<&str>)> = vec![
        ("absolute path elsewhere", secret_name.clone(), Some("raw")),
        ("symlink out of the directory", "link.raw".into(), Some("raw")),
        ("dot-dot out of the directory", format!("../{}/secret.raw", elsewhere.path().file_name().unwrap().to_str().unwrap()), Some("raw")),
        ("no backing format", "base.raw".into(), None),
        ("protocol format", "base.raw".into(), Some("file")),
        ("json: name", format!("json:{{\"driver\": \"raw\", \"file\": {{\"driver\": \"file\", \"filename\": \"{secret_name}\"}}}}"), Some("raw")),
        ("json: node reference", "json:{\"driver\": \"raw\", \"file\": \"other-vm\"}".into(), Some("raw")),
        ("host_device: prefix", "host_device:/dev/null".into(), Some("raw")),
        ("file: prefix", format!("file:{secret_name}"), Some("raw")),
    ];
    for (what, name, format) in &refused {
        let top = dir.path().join("top.qcow2");
        qcow2_naming(&top, name, *format);
        let e = err(open_with(&Graph::new(), &top));
        assert_eq!(e.errno(), libc::EACCES, "{what}: {e}");
        assert!(
            e.to_string().contains("top.qcow2"),
            "{what}: names the image: {e}"
        );
    }

    // A plain relative name in the directory, with its format, is followed.
    let top = dir.path().join("top.qcow2");
    qcow2_naming(&top, "base.raw", Some("raw"));
    let node = open_with(&Graph::new(), &top).expect("allowed backing file");
    assert_eq!(
        read(&node, 0, 4096).expect("read"),
        pattern(6, 1 << 20)[..4096]
    );
    drop(node);

    // The user can widen the policy: another directory, or trust (QEMU's behaviour).
    qcow2_naming(&top, &secret_name, Some("raw"));
    let widened = Graph::with_backing_policy(BackingPolicy {
        allowed_dirs: vec![elsewhere.path().to_path_buf()],
        ..BackingPolicy::default()
    });
    let node = open_with(&widened, &top).expect("allowed directory");
    assert_eq!(read(&node, 0, 512).expect("read"), pattern(5, 65536)[..512]);
    drop(node);
    qcow2_naming(&top, "base.raw", None);
    let trusting = Graph::with_backing_policy(BackingPolicy {
        trust_images: true,
        ..BackingPolicy::default()
    });
    open_with(&trusting, &top).expect("trusted image, probed backing format");

    // Backing files the user names in options are the user's choice.
    qcow2_naming(&top, "base.raw", None);
    let opts = format!(
        "driver=qcow2,read-only=on,file.filename={},backing.driver=raw,backing.file.filename={secret_name}",
        top.display()
    );
    open(&Graph::new(), &opts);
}
