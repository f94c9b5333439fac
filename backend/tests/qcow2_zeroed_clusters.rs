//! Allocating writes that fill part of a new cluster: where the rest reads as zeroes, a file
//! has the cluster zeroed without zero data being written (fallocate), as QEMU's qcow2 does,
//! and only the guest's data is written. The rest of the cluster must read as zeroes whatever
//! the storage held there before.

mod qcow2_util;

use std::os::fd::AsRawFd;
use std::path::Path;

use qcow2_util::{
    assert_check_clean, common, create_qcow2, open, pattern, qemu_img, read, s, tempdir, write,
};
use strata_backend::Graph;

const CLUSTER: u64 = 65536;

/// Where `needle` starts in the file at `path`, looking at 512-byte boundaries.
fn host_offset_of(path: &Path, needle: &[u8]) -> u64 {
    let bytes = std::fs::read(path).expect("read image");
    (0..bytes.len().saturating_sub(needle.len()))
        .step_by(512)
        .find(|&o| &bytes[o..o + needle.len()] == needle)
        .unwrap_or_else(|| panic!("data not found in {}", path.display())) as u64
}

/// `struct fiemap_extent` (linux/fiemap.h).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

/// `struct fiemap` with room for up to 64 extents.
#[repr(C)]
struct Fiemap {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    reserved: u32,
    extents: [FiemapExtent; 64],
}

const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
const FIEMAP_FLAG_SYNC: u32 = 1;
const FIEMAP_EXTENT_UNWRITTEN: u32 = 0x800;

/// The parts of `start..end` of the file that hold written data: neither holes nor
/// allocated-but-unwritten extents (which read as zeroes), as FIEMAP reports them.
fn written_ranges(path: &Path, start: u64, end: u64) -> Vec<(u64, u64)> {
    let f = std::fs::File::open(path).expect("open image");
    let mut map = Fiemap {
        start,
        length: end - start,
        flags: FIEMAP_FLAG_SYNC,
        mapped_extents: 0,
        extent_count: 64,
        reserved: 0,
        extents: [FiemapExtent::default(); 64],
    };
    // SAFETY: FS_IOC_FIEMAP reads the header and writes up to `extent_count` extents into
    // `map`, which lives until the call returns; `f` is an open descriptor this owns.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_FIEMAP, &mut map as *mut Fiemap) };
    assert!(r == 0, "FIEMAP: {}", std::io::Error::last_os_error());
    let n = map.mapped_extents as usize;
    assert!(n < 64, "too many extents to look at");
    map.extents[..n]
        .iter()
        .filter(|e| e.flags & FIEMAP_EXTENT_UNWRITTEN == 0)
        .map(|e| (e.logical.max(start), (e.logical + e.length).min(end)))
        .filter(|(a, b)| a < b)
        .collect()
}

/// Why this directory's file system cannot zero a range without writing zeroes, if it cannot.
fn no_zero_range(dir: &Path) -> Option<String> {
    let probe = dir.join("probe");
    let f = std::fs::File::create(&probe).expect("create probe file");
    // SAFETY: fallocate on a descriptor `f` owns; no memory is passed.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_ZERO_RANGE, 0, 65536) };
    let e = std::io::Error::last_os_error();
    drop(f);
    std::fs::remove_file(&probe).expect("remove probe file");
    (r != 0).then(|| format!("fallocate(FALLOC_FL_ZERO_RANGE) in {}: {e}", dir.display()))
}

#[test]
fn new_clusters_in_a_file_are_zeroed_without_writing_zeroes() {
    let dir = tempdir();
    if let Some(reason) = no_zero_range(dir.path()) {
        // tmpfs, for one: the zeroes are written as before (the other tests cover that path).
        eprintln!("SKIPPED: {reason}");
        return;
    }
    let img = dir.path().join("a.qcow2");
    create_qcow2(&img, "cluster_size=65536", None, 8 << 20);
    let data = pattern(7, 4096);
    // 8 KiB into cluster 1 (zeroes before and after it), and a whole cluster 3 (none).
    let at = CLUSTER + 8192;
    let whole = pattern(8, CLUSTER as usize);
    {
        let g = Graph::new();
        let node = open(&g, &format!("file.filename={},cache.direct=on", s(&img)));
        write(&node, at, &data);
        write(&node, 3 * CLUSTER, &whole);
        let mut want = vec![0u8; CLUSTER as usize];
        want[8192..8192 + 4096].copy_from_slice(&data);
        assert_eq!(read(&node, CLUSTER, CLUSTER as usize), want, "cluster 1");
        assert_eq!(
            read(&node, 3 * CLUSTER, CLUSTER as usize),
            whole,
            "cluster 3"
        );
    }
    assert_check_clean(&img, true);

    // On the file, the cluster holds the data and nothing else written: the rest is a hole
    // or unwritten extents (writing zeroes there would make it data).
    let host = host_offset_of(&img, &data);
    let cluster_host = host - 8192;
    assert_eq!(cluster_host % CLUSTER, 0, "data at {host:#x}");
    assert_eq!(
        written_ranges(&img, cluster_host, cluster_host + CLUSTER),
        vec![(host, host + 4096)],
        "written parts of the cluster at {cluster_host:#x}"
    );
    // QEMU reads the same content.
    let raw = dir.path().join("a.raw");
    qemu_img(&["convert", "-q", "-O", "raw", s(&img), s(&raw)]);
    let raw = std::fs::read(&raw).expect("read converted image");
    assert!(raw[CLUSTER as usize..at as usize].iter().all(|&b| b == 0));
    assert_eq!(&raw[at as usize..at as usize + 4096], &data[..]);
    assert!(raw[at as usize + 4096..2 * CLUSTER as usize]
        .iter()
        .all(|&b| b == 0));
}

#[test]
fn new_clusters_on_a_block_device_read_as_zeroes_over_old_data() {
    require_loop!();
    let dir = tempdir();
    // A 4k-sector device full of old data, with a qcow2 image created on it: what the device
    // held where a new cluster goes must never reach the guest.
    let backing = dir.path().join("device.img");
    std::fs::write(&backing, vec![0xAAu8; 16 << 20]).expect("write device file");
    let dev = common::LoopDevice::attach(&backing, 4096);
    create_qcow2(
        Path::new(dev.path_str()),
        "cluster_size=65536",
        None,
        8 << 20,
    );
    let data = pattern(9, 4096);
    let mut want = vec![0u8; CLUSTER as usize];
    want[4096..8192].copy_from_slice(&data);
    for discard in ["ignore", "unmap"] {
        let guest = if discard == "ignore" {
            CLUSTER
        } else {
            3 * CLUSTER
        };
        let g = Graph::new();
        let node = open(
            &g,
            &format!(
                "driver=qcow2,file.driver=host_device,file.filename={},\
                 file.cache.direct=on,discard={discard}",
                dev.path_str()
            ),
        );
        write(&node, guest + 4096, &data);
        assert_eq!(
            read(&node, guest, CLUSTER as usize),
            want,
            "discard={discard}: the new cluster"
        );
    }
    let out = qemu_img(&["check", "-f", "qcow2", dev.path_str()]);
    assert!(out.contains("No errors were found"), "{out}");
}
