//! Reading qcow2 images made by qemu-img/qemu-io: every byte must match what
//! `qemu-img convert -O raw` shows (versions 2 and 3, cluster sizes, zero clusters, discards,
//! compressed clusters with zlib and zstd, extended L2 subclusters, backing chains).

mod qcow2_util;

use qcow2_util::*;
use rand::{rngs::SmallRng, Rng, SeedableRng};
use strata_backend::Graph;

/// qemu-io commands writing patterns at offsets that cross cluster boundaries, zeroing and
/// discarding some of it.
fn fill_commands(size: u64, cluster: u64, seed: u64) -> Vec<String> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut cmds = Vec::new();
    for i in 0..24 {
        let len = rng.gen_range(1..=4 * cluster.min(65536) / 512) * 512;
        let off = rng.gen_range(0..(size - len) / 512) * 512;
        let pat = (i * 37 + 1) % 255 + 1;
        cmds.push(format!("write -P {pat} {off} {len}"));
    }
    // A cluster-aligned write, zero writes (with and without unmap) and a discard.
    cmds.push(format!("write -P 0x5a {} {}", cluster, 2 * cluster));
    cmds.push(format!("write -z {} {}", cluster, cluster));
    cmds.push(format!("write -z -u {} {}", 2 * cluster, cluster));
    cmds.push(format!(
        "write -P 0x77 {} {}",
        size - 2 * cluster,
        2 * cluster
    ));
    cmds.push(format!("discard {} {}", size - cluster, cluster));
    cmds
}

fn compare_random_reads(node: &strata_backend::Node, want: &[u8], seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    for _ in 0..200 {
        let len = rng.gen_range(1..200_000usize).min(want.len());
        let off = rng.gen_range(0..=(want.len() - len));
        let got = read(node, off as u64, len);
        assert_same(
            &got,
            &want[off..off + len],
            &format!("read at {off} of {len}"),
        );
    }
}

fn check_image(img: &std::path::Path, seed: u64) {
    let want = qemu_raw(img);
    let g = qemu_like_graph();
    let node = open_ro(&g, img);
    assert_eq!(node.driver_name(), "qcow2", "probing finds qcow2");
    assert_same(&read_all(&node), &want, &format!("{}", img.display()));
    compare_random_reads(&node, &want, seed);
}

#[test]
fn versions_and_cluster_sizes() {
    let dir = tempdir();
    let size: u64 = 8 << 20;
    for (compat, cluster) in [
        ("1.1", 65536u64),
        ("0.10", 65536),
        ("1.1", 512),
        ("0.10", 4096),
        ("1.1", 2 << 20),
        ("1.1", 16384),
    ] {
        let img = path(&dir, &format!("v{compat}-{cluster}.qcow2"));
        create_qcow2(
            &img,
            &format!("compat={compat},cluster_size={cluster}"),
            None,
            size,
        );
        qemu_io(
            &img,
            "qcow2",
            &fill_commands(size, cluster, cluster + compat.len() as u64),
        );
        check_image(&img, cluster);
    }
}

#[test]
fn refcount_widths() {
    let dir = tempdir();
    for bits in [1, 2, 4, 8, 32, 64] {
        let img = path(&dir, &format!("rc{bits}.qcow2"));
        create_qcow2(
            &img,
            &format!("refcount_bits={bits},cluster_size=4096"),
            None,
            "4M",
        );
        qemu_io(&img, "qcow2", &fill_commands(4 << 20, 4096, bits));
        check_image(&img, bits);
    }
}

#[test]
fn compressed_clusters_zlib_and_zstd() {
    let dir = tempdir();
    let size = 6usize << 20;
    // Compressible data: patterns with runs, some zero areas, some random.
    let mut raw = vec![0u8; size];
    for (i, chunk) in raw.chunks_mut(65536).enumerate() {
        match i % 4 {
            0 => chunk.fill((i % 251) as u8),
            1 => chunk.copy_from_slice(&pattern(i as u64, 65536)),
            2 => {}
            _ => {
                for (j, b) in chunk.iter_mut().enumerate() {
                    *b = ((j / 100) % 7) as u8 + i as u8;
                }
            }
        }
    }
    let src = path(&dir, "src.raw");
    std::fs::write(&src, &raw).unwrap();
    for (ctype, cluster) in [
        ("zlib", 65536),
        ("zstd", 65536),
        ("zlib", 4096),
        ("zstd", 2 << 20),
    ] {
        let img = path(&dir, &format!("c-{ctype}-{cluster}.qcow2"));
        qemu_img(&[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            &format!("compression_type={ctype},cluster_size={cluster}"),
            s(&src),
            s(&img),
        ]);
        let g = Graph::new();
        let node = open_ro(&g, &img);
        assert_same(&read_all(&node), &raw, &format!("{ctype} {cluster}"));
        compare_random_reads(&node, &raw, cluster);
        // Partly overwritten compressed image: mixed compressed and normal clusters.
        drop(node);
        qemu_io(&img, "qcow2", &fill_commands(size as u64, cluster, 3));
        check_image(&img, 4);
    }
}

#[test]
fn extended_l2_subclusters() {
    let dir = tempdir();
    let base = path(&dir, "base.qcow2");
    let img = path(&dir, "ext.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "4M"]);
    qemu_io(&base, "qcow2", &["write -P 0x11 0 4M".to_string()]);
    create_qcow2(
        &img,
        "extended_l2=on,cluster_size=65536",
        Some(("base.qcow2", "qcow2")),
        "4M",
    );
    // 2 KiB subclusters: small writes allocate single subclusters, zero writes set zero bits.
    qemu_io(
        &img,
        "qcow2",
        &[
            "write -P 0x22 4096 2048".into(),
            "write -P 0x33 70000 5000".into(),
            "write -z 131072 8192".into(),
            "write -P 0x44 196608 65536".into(),
            "write -z 200704 4096".into(),
            "discard 262144 65536".into(),
        ],
    );
    check_image(&img, 7);
    // Writing is refused with a message naming the feature.
    let g = Graph::new();
    let e = g
        .open(strata_backend::Options::parse(&format!("file.filename={}", s(&img)), None).unwrap())
        .unwrap_err();
    assert!(e.message().contains("extended L2"), "{e}");
}

#[test]
fn backing_chains_relative_names_and_short_backing() {
    let dir = tempdir();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let base = path(&dir, "base.raw");
    std::fs::write(&base, pattern(1, 1 << 20)).unwrap();
    // mid names its backing relative to its own directory; top lives in sub/ and names mid
    // as ../mid.qcow2; top is larger than the chain below (reads past it are zeroes).
    let mid = path(&dir, "mid.qcow2");
    create_qcow2(&mid, "", Some(("base.raw", "raw")), "2M");
    qemu_io(
        &mid,
        "qcow2",
        &["write -P 0x61 512k 64k".into(), "write -z 0 4096".into()],
    );
    let top = dir.path().join("sub/top.qcow2");
    create_qcow2(
        &top,
        "cluster_size=4096",
        Some(("../mid.qcow2", "qcow2")),
        "3M",
    );
    qemu_io(
        &top,
        "qcow2",
        &[
            "write -P 0x62 1000 3000".into(),
            "write -P 0x63 1536k 8k".into(),
            "write -z 600k 4k".into(),
        ],
    );
    check_image(&top, 9);
    // The chain is visible in the graph.
    // QEMU's name resolution reaches out of the top image's directory ('../mid').
    let g = qemu_like_graph();
    let node = open_ro(&g, &top);
    let backing = node
        .child(strata_backend::ChildRole::Backing)
        .expect("top has a backing child");
    assert_eq!(backing.driver_name(), "qcow2");
    assert!(backing.is_read_only());
    let below = backing
        .child(strata_backend::ChildRole::Backing)
        .expect("mid has a backing child");
    assert_eq!(below.driver_name(), "raw");
    // backing=null hides the chain; backing=NODE replaces it.
    let g2 = Graph::new();
    let alone = open(
        &g2,
        &format!(
            "driver=qcow2,file.filename={},backing=null,read-only=on",
            s(&top)
        ),
    );
    assert!(alone.child(strata_backend::ChildRole::Backing).is_none());
    assert_eq!(read(&alone, 8192, 4096), vec![0u8; 4096]);
    let other = open(
        &g2,
        &format!(
            "driver=raw,node-name=other,file.filename={},read-only=on",
            s(&base)
        ),
    );
    let over = open(
        &g2,
        &format!(
            "driver=qcow2,file.filename={},backing=other,read-only=on",
            s(&top)
        ),
    );
    assert_eq!(read(&over, 8192, 4096), read(&other, 8192, 4096));
}

#[test]
fn unsupported_features_are_named() {
    let dir = tempdir();
    let img = path(&dir, "a.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "1M"]);
    let orig = std::fs::read(&img).unwrap();
    let g = Graph::new();
    let try_open = |bytes: &[u8], opts: &str| {
        std::fs::write(&img, bytes).unwrap();
        g.open(
            strata_backend::Options::parse(
                &format!("driver=qcow2,file.filename={}{opts}", s(&img)),
                None,
            )
            .unwrap(),
        )
        .map(|_| ())
    };
    let mut b = orig.clone();
    b[79] |= 1 << 2; // external data file
    let e = try_open(&b, "").unwrap_err();
    assert!(e.message().contains("external data file"), "{e}");
    let mut b = orig.clone();
    b[78] |= 1; // unknown incompatible bit 8
    let e = try_open(&b, ",read-only=on").unwrap_err();
    assert!(e.message().contains("Unsupported qcow2 feature"), "{e}");
    let mut b = orig.clone();
    b[79] |= 1 << 1; // corrupt: read-only is fine, read-write is refused
    try_open(&b, ",read-only=on").expect("corrupt images open read-only");
    let e = try_open(&b, "").unwrap_err();
    assert!(e.message().contains("corrupt"), "{e}");
    let mut b = orig.clone();
    b[32..36].copy_from_slice(&1u32.to_be_bytes());
    let e = try_open(&b, ",read-only=on").unwrap_err();
    assert!(e.message().contains("crypt_method"), "{e}");
    let mut b = orig.clone();
    b[20..24].copy_from_slice(&8u32.to_be_bytes());
    let e = try_open(&b, ",read-only=on").unwrap_err();
    assert!(e.message().contains("cluster_bits"), "{e}");
    let e = try_open(&orig[..60], ",read-only=on").unwrap_err();
    assert!(e.message().contains("truncated"), "{e}");
}
