//! `strata img create/info/check` for qcow2, checked against qemu-img.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::img_tools::{create_small_qcow2, qemu_io, ImgTool};
use serde_json::Value;

fn strata(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(args)
        .output()
        .expect("run strata")
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn create_matches_qemu_img_info_and_passes_check() {
    let dir = tempfile::tempdir().unwrap();
    for (opts, compat, ctype, bits, lazy) in [
        ("", "1.1", "zlib", 16, false),
        ("compat=0.10,cluster_size=4k", "0.10", "zlib", 16, false),
        (
            "cluster_size=512,refcount_bits=1,lazy_refcounts=on",
            "1.1",
            "zlib",
            1,
            true,
        ),
        (
            "cluster_size=2M,compression_type=zstd,refcount_bits=64",
            "1.1",
            "zstd",
            64,
            false,
        ),
        ("extended_l2=on,cluster_size=128k", "1.1", "zlib", 16, false),
    ] {
        let img = dir.path().join("a.qcow2");
        let mut args = vec!["img", "create", "-q", "-f", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([p(&img), "100M"]);
        ok(&strata(&args));
        let o = ImgTool::QemuImg.run(&["check", p(&img)]);
        assert!(
            o.status.success(),
            "{opts}: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        let info: Value = serde_json::from_slice(
            &ImgTool::QemuImg
                .run(&["info", "--output", "json", p(&img)])
                .stdout,
        )
        .unwrap();
        assert_eq!(info["virtual-size"], 100 << 20, "{opts}");
        let data = &info["format-specific"]["data"];
        assert_eq!(data["compat"], compat, "{opts}");
        assert_eq!(data["refcount-bits"], bits, "{opts}");
        if compat == "1.1" {
            assert_eq!(data["compression-type"], ctype, "{opts}");
            assert_eq!(data["lazy-refcounts"], lazy, "{opts}");
        }
        // strata's own info agrees with qemu-img's on what both show.
        let mine: Value =
            serde_json::from_str(&ok(&strata(&["img", "info", "--output", "json", p(&img)])))
                .unwrap();
        for key in ["virtual-size", "cluster-size", "format", "dirty-flag"] {
            assert_eq!(mine[key], info[key], "{opts}: {key}");
        }
        assert_eq!(mine["format-specific"]["data"]["compat"], data["compat"]);
        // qemu-io can write it and qemu-img still finds it consistent.
        qemu_io(&img, &["write -P 9 1M 3M"]);
        assert!(
            ImgTool::QemuImg.run(&["check", p(&img)]).status.success(),
            "{opts}"
        );
        std::fs::remove_file(&img).unwrap();
    }
}

#[test]
fn backing_files_size_and_chain() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![7u8; 3 << 20]).unwrap();
    let top = dir.path().join("sub/top.qcow2");
    // No size: the backing file's; the relative name is relative to the new image.
    let out = ok(&strata(&[
        "img",
        "create",
        "-f",
        "qcow2",
        "-b",
        "../base.raw",
        "-F",
        "raw",
        p(&top),
    ]));
    assert!(out.contains("backing_file=../base.raw"), "{out}");
    let info: Value = serde_json::from_slice(
        &ImgTool::QemuImg
            .run(&["info", "--output", "json", p(&top)])
            .stdout,
    )
    .unwrap();
    assert_eq!(info["virtual-size"], 3 << 20);
    assert_eq!(info["backing-filename"], "../base.raw");
    assert_eq!(info["backing-filename-format"], "raw");
    let out = ok(&strata(&["img", "info", "--backing-chain", p(&top)]));
    assert!(
        out.contains("backing file: ../base.raw (actual path: "),
        "{out}"
    );
    assert!(out.contains("file format: raw"), "{out}");
    let chain: Value = serde_json::from_str(&ok(&strata(&[
        "img",
        "info",
        "--backing-chain",
        "--output",
        "json",
        p(&top),
    ])))
    .unwrap();
    assert_eq!(chain.as_array().map(Vec::len), Some(2));
    // Refused: the image as its own backing file, a backing file without a format.
    let o = strata(&["img", "create", "-f", "qcow2", "-b", p(&top), p(&top)]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("same filename"));
    let o = strata(&[
        "img",
        "create",
        "-f",
        "qcow2",
        "-b",
        "top.qcow2",
        "-F",
        "qcow2",
        p(&top),
    ]);
    assert!(!o.status.success(), "a relative name equal to the image");
    let other = dir.path().join("other.qcow2");
    let o = strata(&["img", "create", "-f", "qcow2", "-b", p(&base), p(&other)]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("backing format"));
    let o = strata(&["img", "create", "-f", "qcow2", p(&other)]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("needs a size"));
}

#[test]
fn check_exit_codes_and_repair() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("c.qcow2");
    create_small_qcow2(ImgTool::Strata, &img);
    let out = ok(&strata(&["img", "check", p(&img)]));
    assert!(out.contains("No errors were found on the image."), "{out}");
    qemu_io(&img, &["write -P 1 0 1M", "write 6M 64k", "discard 6M 64k"]);
    // Leak the last cluster of the file (16-bit refcounts in the block at cluster 2).
    let mut bytes = std::fs::read(&img).unwrap();
    let last = bytes.len() / 4096 - 1;
    bytes[2 * 4096 + 2 * last + 1] = 1;
    std::fs::write(&img, &bytes).unwrap();
    let o = strata(&["img", "check", p(&img)]);
    assert_eq!(o.status.code(), Some(3));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("1 leaked clusters were found"), "{out}");
    let json: Value =
        serde_json::from_slice(&strata(&["img", "check", "--output", "json", p(&img)]).stdout)
            .unwrap();
    assert_eq!(json["leaks"], 1);
    let out = ok(&strata(&["img", "check", "-r", "leaks", p(&img)]));
    assert!(out.contains("1 leaked clusters\n"), "{out}");
    assert!(out.contains("No errors were found"), "{out}");
    assert!(ImgTool::QemuImg.run(&["check", p(&img)]).status.success());
    let raw = dir.path().join("r.raw");
    std::fs::write(&raw, b"plain").unwrap();
    let o = strata(&["img", "check", p(&raw)]);
    assert!(!o.status.success());
}

#[path = "../backend/tests/crafted/mod.rs"]
mod crafted;

/// `strata img check` (and `-r all`, which writes) on every crafted image: a report or a
/// clear error, never a panic or an abort, within 512 MiB of address space and a time
/// limit (the refcount table whose entries all name one block once took ~64 GiB).
#[test]
fn img_check_survives_crafted_images() {
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for (name, img) in crafted::all(dir.path()) {
        for repair in [&[][..], &["-r", "all"][..]] {
            let mut child = Command::new("prlimit")
                .args(["--as=536870912", "--", env!("CARGO_BIN_EXE_strata")])
                .args(["img", "check"])
                .args(repair)
                .arg(p(&img))
                .env("MALLOC_ARENA_MAX", "2")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("run strata");
            let t = Instant::now();
            while child.try_wait().unwrap().is_none() && t.elapsed() < Duration::from_secs(120) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            let out = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            // 0 clean, 1 error message, 2 corruptions, 3 leaks; a panic exits 101.
            let fine = matches!(o.status.code(), Some(0..=3)) && !out.contains("panicked");
            let clear = o.status.code() != Some(1) || out.trim().len() > 20;
            if !fine || !clear {
                failures.push(format!("{name} {repair:?}: {:?}\n{out}", o.status));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
