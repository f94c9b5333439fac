//! QMP conformance: tests/qmp/conformance.py, QEMU's own client library (qemu.qmp) driving
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
