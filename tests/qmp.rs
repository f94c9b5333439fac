//! QMP conformance: tests/qmp/conformance.py (the protocol, nodes, exports) and
//! tests/qmp/jobs.py (blockdev-create and jobs), QEMU's own client library (qemu.qmp) driving
//! the monitor, run against strata (with the sandbox on) and against qemu-storage-daemon, so
//! that every check not marked strata-only holds for both.

use std::path::Path;
use std::process::Command;

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

fn conformance(daemon: &str, binary: &str) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/qmp/conformance.py");
    let out = Command::new("python3")
        .arg(&script)
        .args([daemon, binary])
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "conformance against {daemon} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
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
    let Some(bench) = bench_binary() else {
        return;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/qmp/jobs.py");
    let out = Command::new("python3")
        .arg(&script)
        .args([daemon, binary])
        .arg(&bench)
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "jobs against {daemon} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
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
