//! The image tools the tests check strata against, and strata's own `img` that mirrors them.

use std::path::Path;
use std::process::{Command, Output};

use super::path_str;

/// A tool that takes `qemu-img`'s subcommands.
#[derive(Clone, Copy, Debug)]
pub enum ImgTool {
    /// QEMU's `qemu-img`.
    QemuImg,
    /// `strata img`, of the binary under test.
    Strata,
}

impl ImgTool {
    /// Runs the tool's `args` subcommand and returns its output, whatever its exit.
    pub fn run(self, args: &[&str]) -> Output {
        let mut cmd = match self {
            ImgTool::QemuImg => Command::new("qemu-img"),
            ImgTool::Strata => {
                let mut cmd = Command::new(env!("CARGO_BIN_EXE_strata"));
                cmd.arg("img");
                cmd
            }
        };
        cmd.args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {self:?}: {e}"))
    }
}

/// Creates with `tool` an 8 MiB qcow2 image with 4 KiB clusters at `image` (small clusters
/// put many tables and refcount blocks in a small file), which must succeed.
pub fn create_small_qcow2(tool: ImgTool, image: &Path) {
    let args = [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        path_str(image),
        "8M",
    ];
    let out = tool.run(&args);
    assert!(out.status.success(), "{tool:?} {args:?}: {out:?}");
}

/// Runs qemu-io's `commands` (`write -P 7 0 64k`, ...) on the qcow2 `image`, which must
/// succeed.
pub fn qemu_io(image: &Path, commands: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "qcow2"]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    let out = cmd
        .arg(image)
        .output()
        .unwrap_or_else(|e| panic!("run qemu-io: {e}"));
    assert!(out.status.success(), "qemu-io {commands:?}: {out:?}");
}
