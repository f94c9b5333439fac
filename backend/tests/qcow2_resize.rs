//! qcow2 resize (QMP's `block_resize` reaches `Node::truncate`): growing past the L1 table
//! (which moves it), growing within it, shrinking, and what QEMU refuses; each result judged
//! by `qemu-img check`, `qemu-img info` and `qemu-io` reading the image afterwards.

mod qcow2_util;

use std::path::Path;

use qcow2_util::*;
use strata_backend::{block_on, Node};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn resize(node: &Node, size: u64) -> strata_backend::Result<()> {
    block_on(node.truncate(size)).expect("reactor")
}

fn open_rw(g: &strata_backend::Graph, path: &Path) -> std::sync::Arc<Node> {
    open(
        g,
        &format!(
            "driver=qcow2,node-name=q,file.driver=file,file.filename={}",
            s(path)
        ),
    )
}

/// `l1_size` and `l1_table_offset` from the image's header.
fn l1_fields(path: &Path) -> (u32, u64) {
    let h = std::fs::read(path).expect("read image");
    (
        u32::from_be_bytes(h[36..40].try_into().unwrap()),
        u64::from_be_bytes(h[40..48].try_into().unwrap()),
    )
}

fn virtual_size(path: &Path) -> u64 {
    let info = qemu_img(&["info", "-U", "--output=json", s(path)]);
    let v: serde_json::Value = serde_json::from_str(&info).expect("qemu-img info JSON");
    v["virtual-size"].as_u64().expect("virtual-size")
}

/// `clusters` clusters of `cluster` bytes, each filled with its own byte from `first`, so
/// that qemu-io can check each with `read -P` and a cluster in the wrong place shows.
fn stripes(first: u8, clusters: u8, cluster: u64) -> Vec<u8> {
    (0..clusters)
        .flat_map(|i| std::iter::repeat_n(first.wrapping_add(i), cluster as usize))
        .collect()
}

/// qemu-io commands checking that `data` (made by [`stripes`]) lies at `offset`.
fn stripe_reads(offset: u64, data: &[u8], cluster: u64) -> Vec<String> {
    data.chunks(cluster as usize)
        .enumerate()
        .map(|(i, c)| {
            format!(
                "read -P {:#x} {} {cluster}",
                c[0],
                offset + i as u64 * cluster
            )
        })
        .collect()
}

/// Grows an image whose L1 table must grow (and move), with data in it before, and checks
/// the image, the size, the old data and writes to the new area, with strata and qemu-io.
fn grow_moves_l1(cluster: u64, old: u64, new: u64) {
    let dir = tempdir();
    let img = path(&dir, "grow.qcow2");
    create_qcow2(&img, &format!("cluster_size={cluster}"), None, old);
    let (l1_before, l1_off_before) = l1_fields(&img);
    let g = qemu_like_graph();
    let node = open_rw(&g, &img);
    let head = stripes(0x10, 3, cluster);
    let tail = stripes(0x20, 2, cluster);
    let tail_at = old - tail.len() as u64;
    write(&node, 0, &head);
    write(&node, tail_at, &tail);
    // Metadata of these writes stays cached: the resize must write it back first.
    resize(&node, new).unwrap_or_else(|e| panic!("resize to {new}: {e}"));
    assert_eq!(node.size(), new);
    let far = stripes(0x30, 2, cluster);
    let far_at = new - far.len() as u64;
    let next = stripes(0x40, 2, cluster);
    write(&node, far_at, &far);
    write(&node, old, &next);
    assert_same(
        &read(&node, 0, head.len()),
        &head,
        "old data after the resize",
    );
    assert_same(
        &read(&node, tail_at, tail.len()),
        &tail,
        "old data at the old end",
    );
    assert_same(
        &read(&node, far_at, far.len()),
        &far,
        "write at the new end",
    );
    run(node.flush());
    drop(node);
    drop(g);
    let (l1_after, l1_off_after) = l1_fields(&img);
    let per_l1 = cluster * (cluster / 8);
    assert_eq!(u64::from(l1_before), old.div_ceil(per_l1));
    assert_eq!(
        u64::from(l1_after),
        new.div_ceil(per_l1),
        "QEMU's exact L1 size"
    );
    assert_ne!(l1_off_after, l1_off_before, "the L1 table moved");
    assert_check_clean(&img, true);
    assert_eq!(virtual_size(&img), new);
    // qemu-io reads back what strata wrote, before and after the resize, and zeroes between.
    let mut reads = stripe_reads(0, &head, cluster);
    reads.extend(stripe_reads(tail_at, &tail, cluster));
    reads.extend(stripe_reads(old, &next, cluster));
    reads.extend(stripe_reads(far_at, &far, cluster));
    reads.push(format!(
        "read -P 0 {} {}",
        old + next.len() as u64,
        4 * cluster
    ));
    qemu_io(&img, "qcow2", &reads);
}

#[test]
fn grow_64k_clusters_1g_to_100g() {
    grow_moves_l1(65536, GIB, 100 * GIB);
}

#[test]
fn grow_512_byte_clusters_l1_spanning_many_clusters() {
    // 64 MiB needs 2048 L1 entries (32 clusters of 512 bytes); 1 GiB needs 32768 (512).
    grow_moves_l1(512, 64 * MIB, GIB);
}

#[test]
fn grow_within_the_l1_table_keeps_it() {
    let dir = tempdir();
    let img = path(&dir, "small.qcow2");
    create_qcow2(&img, "cluster_size=65536", None, 10 * MIB);
    let before = l1_fields(&img);
    let g = qemu_like_graph();
    let node = open_rw(&g, &img);
    write(&node, 0, &pattern(4, 4096));
    resize(&node, 20 * MIB).expect("resize");
    drop(node);
    drop(g);
    assert_eq!(l1_fields(&img), before, "one L1 entry covers 512 MiB");
    assert_check_clean(&img, true);
    assert_eq!(virtual_size(&img), 20 * MIB);
}

#[test]
fn shrink_drops_the_data_past_the_end_as_qemu_does() {
    let dir = tempdir();
    let img = path(&dir, "shrink.qcow2");
    create_qcow2(&img, "cluster_size=65536", None, 64 * MIB);
    let g = qemu_like_graph();
    let node = open_rw(&g, &img);
    let keep = pattern(5, 65536);
    write(&node, 0, &keep);
    write(&node, 60 * MIB, &pattern(6, 2 * 65536));
    resize(&node, 32 * MIB).expect("shrink");
    assert_eq!(node.size(), 32 * MIB);
    // Growing again shows zeroes where the dropped data was (as QEMU 7.2 does).
    resize(&node, 64 * MIB).expect("grow back");
    assert!(read(&node, 60 * MIB, 2 * 65536).iter().all(|&b| b == 0));
    assert_same(&read(&node, 0, keep.len()), &keep, "data below the new end");
    drop(node);
    drop(g);
    assert_check_clean(&img, true);
    qemu_io(
        &img,
        "qcow2",
        &[format!("read -P 0 {} {}", 60 * MIB, 2 * 65536)],
    );
}

#[test]
fn refusals_match_qemu() {
    let dir = tempdir();
    let img = path(&dir, "r.qcow2");
    create_qcow2(&img, "cluster_size=65536", None, 16 * MIB);
    let g = qemu_like_graph();
    let node = open_rw(&g, &img);
    let e = resize(&node, 16 * MIB + 1).unwrap_err();
    assert!(
        e.to_string()
            .contains("The new size must be a multiple of 512"),
        "{e}"
    );
    // A 512-byte-cluster image past QEMU's 32 MiB L1 limit (4 Mi entries of 32 KiB).
    let small = path(&dir, "s.qcow2");
    create_qcow2(&small, "cluster_size=512", None, MIB);
    let n2 = open(
        &g,
        &format!(
            "driver=qcow2,node-name=s,file.driver=file,file.filename={}",
            s(&small)
        ),
    );
    let e = resize(&n2, 256 * GIB).unwrap_err();
    assert!(e.to_string().contains("Failed to grow the L1 table"), "{e}");
    assert_eq!(n2.size(), MIB);
    drop((node, n2, g));
    assert_check_clean(&small, true);
    assert_check_clean(&img, true);
    assert_eq!(virtual_size(&small), MIB);
}

#[test]
fn grow_over_a_longer_backing_file_reads_zeroes() {
    let dir = tempdir();
    let base = path(&dir, "base.qcow2");
    create_qcow2(&base, "cluster_size=65536", None, 8 * MIB);
    qemu_io(&base, "qcow2", &["write -P 0x77 0 8M".to_string()]);
    let top = path(&dir, "top.qcow2");
    create_qcow2(&top, "", Some((s(&base), "qcow2")), "4M");
    let g = qemu_like_graph();
    let node = open_rw(&g, &top);
    resize(&node, 8 * MIB).expect("resize");
    assert!(read(&node, 4 * MIB, 4 * MIB as usize)
        .iter()
        .all(|&b| b == 0));
    assert!(read(&node, 0, 4096).iter().all(|&b| b == 0x77));
    drop(node);
    drop(g);
    assert_check_clean(&top, true);
    qemu_io(
        &top,
        "qcow2",
        &[format!("read -P 0 {} {}", 4 * MIB, 4 * MIB)],
    );
}
