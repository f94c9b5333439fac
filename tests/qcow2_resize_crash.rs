//! A power loss at every step of a qcow2 resize (issue 15): the image is served through
//! strata-faultfs, the k-th fsync of the resize fails and power is lost right after (unsynced
//! writes vanish, or only some of them reach the disk), for k = 0, 1, ... until the resize
//! gets through. Every time, `qemu-img check` finds at most leaks, the image has the old size
//! or the new one, and the data flushed before the resize reads back.

mod faultfs_rig;

use std::process::Command;

use faultfs_rig::*;
use strata_backend::{block_on, Graph, IoVec, Node, Options};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

fn open(rig: &Rig) -> (Graph, std::sync::Arc<Node>) {
    let g = Graph::new();
    let node = g
        .open(
            Options::parse(
                &format!(
                    "driver=qcow2,node-name=q,file.driver=file,file.filename={}",
                    rig.mounted_image().display()
                ),
                None,
            )
            .expect("options"),
        )
        .expect("open the image");
    (g, node)
}

fn io<T>(
    f: impl std::future::Future<Output = strata_backend::Result<T>>,
) -> strata_backend::Result<T> {
    block_on(f).expect("reactor")
}

/// The virtual size qemu-img sees in the image on stable storage.
fn stable_size(rig: &Rig) -> u64 {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(rig.backing_image())
        .output()
        .expect("qemu-img info");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("info JSON");
    v["virtual-size"].as_u64().expect("virtual-size")
}

/// One configuration: `old` -> `new` bytes with `cluster`-byte clusters; each power loss
/// keeps `keep` percent of the unsynced pages.
fn crash_at_every_step(cluster: u64, old: u64, new: u64, keep: u8) {
    if !require_fuse() {
        return;
    }
    let mut completed = false;
    for k in 0..64 {
        let mut rig = Rig::new(Format::Qcow2, old, cluster);
        // On a thread of its own, whose io_uring (thread-local) goes away with it: nothing
        // of the daemon side holds the mounted file when it is unmounted.
        let (data, resized) = std::thread::scope(|s| {
            s.spawn(|| {
                let (g, node) = open(&rig);
                // Data all over the image, flushed: it must survive whatever comes next.
                let mut data = Vec::new();
                for i in 0..8u64 {
                    let at = i * (old / 8) + (i % 3) * cluster;
                    let mut buf = vec![0x41 + i as u8; (4 * KIB) as usize];
                    io(node.write(at, &[IoVec::new(&mut buf)])).expect("write");
                    data.push((at, buf));
                }
                io(node.flush()).expect("flush");
                rig.mount()
                    .command(&format!("fail fsync EIO once after {k}"))
                    .expect("fault");
                let resized = io(node.truncate(new));
                rig.mount()
                    .command(&format!("power-loss keep {keep} seed {k}"))
                    .expect("power loss");
                drop(node);
                drop(g);
                (data, resized)
            })
            .join()
            .expect("the resize thread")
        });
        rig.unmount();
        let when = format!("power lost at fsync {k} of the resize ({resized:?})");
        rig.check_qcow2(&when);
        let size = stable_size(&rig);
        assert!(size == old || size == new, "{when}: size {size}");
        if resized.is_ok() {
            assert_eq!(
                size, new,
                "{when}: the resize completed, so its size is on disk"
            );
        }
        for (at, buf) in &data {
            let out = Command::new("qemu-io")
                .args(["-f", "qcow2", "-r", "-U", "-c"])
                .arg(format!("read -P {:#x} {at} {}", buf[0], buf.len()))
                .arg(rig.backing_image())
                .output()
                .expect("qemu-io");
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && !text.contains("fail") && text.contains("read "),
                "{when}: data at {at:#x} lost: {text}"
            );
        }
        if resized.is_ok() {
            completed = true;
            break;
        }
    }
    assert!(completed, "the resize never got through its fsyncs");
}

#[test]
fn power_loss_during_an_l1_growth() {
    // 64 KiB clusters: one L1 entry covers 512 MiB, so 16 MiB -> 8 GiB moves the table.
    crash_at_every_step(64 * KIB, 16 * MIB, 8 << 30, 0);
    crash_at_every_step(64 * KIB, 16 * MIB, 8 << 30, 50);
}

#[test]
fn power_loss_during_a_multi_cluster_l1_growth() {
    // 512-byte clusters: the new L1 table spans many clusters and refcount blocks.
    crash_at_every_step(512, 4 * MIB, 128 * MIB, 50);
}
