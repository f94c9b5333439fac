//! The files behind the guest memory a frontend shares (SET_MEM_TABLE, ADD_MEM_REG), checked
//! before vhost-user-backend maps them.
//!
//! A mapping that reaches past the end of its file maps fine, but the first access to that
//! part raises SIGBUS, which kills the whole daemon with every export in it. So a region whose
//! `mmap_offset + memory_size` lies beyond the end of its (regular) file is refused, and the
//! connection that sent it is closed.
//!
//! A frontend can still shrink the file later. A memfd sealed against shrinking
//! (`F_SEAL_SHRINK`, which QEMU's memory-backend-memfd sets by default) cannot be shrunk; other
//! files (memory-backend-file on /dev/shm or hugetlbfs) cannot be sealed, and refusing them
//! would refuse common setups, so a later shrink is contained instead: the fault costs that
//! connection, not the process ([`crate::memory_faults`]).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use vhost::vhost_user::message::FrontendReq;

/// Bytes before the regions of SET_MEM_TABLE (`num_regions`, padding).
const TABLE_HEADER: usize = 8;
/// Bytes before the region of ADD_MEM_REG (padding).
const SINGLE_HEADER: usize = 8;
/// Bytes of one region: guest address, `memory_size`, user address, `mmap_offset` (u64 each).
const REGION_LEN: usize = 32;
const SIZE_AT: usize = 8;
const OFFSET_AT: usize = 24;

/// Checks the regions a SET_MEM_TABLE or ADD_MEM_REG message (`request` with `payload` and
/// its descriptors `fds`, one per region) shares against the size of their files; other
/// messages pass. The error names the region and its fields.
pub(crate) fn check(request: u32, payload: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
    let regions = if request == u32::from(FrontendReq::SET_MEM_TABLE) {
        payload.get(TABLE_HEADER..)
    } else if request == u32::from(FrontendReq::ADD_MEM_REG) {
        payload.get(SINGLE_HEADER..)
    } else {
        return Ok(());
    };
    // vhost-user-backend maps region i from descriptor i; a malformed message (too short, a
    // descriptor count that does not match) is refused by its parser.
    let regions = regions.unwrap_or_default().chunks_exact(REGION_LEN);
    for (i, (region, fd)) in regions.zip(fds).enumerate() {
        check_region(i, u64_at(region, SIZE_AT), u64_at(region, OFFSET_AT), fd)?;
    }
    Ok(())
}

/// Checks that region `i`, `size` bytes at `offset` in the file `fd`, lies inside the file.
fn check_region(i: usize, size: u64, offset: u64, fd: &OwnedFd) -> io::Result<()> {
    let meta = File::from(fd.try_clone()?).metadata()?;
    if !meta.file_type().is_file() {
        // A device (DAX): fstat does not tell its size, and it cannot be truncated.
        return Ok(());
    }
    let file_len = meta.len();
    if offset.checked_add(size).is_none_or(|end| end > file_len) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "memory region {i}: mmap_offset {offset:#x} + memory_size {size:#x} lies \
                 beyond the end of its {file_len}-byte file (an access there would raise \
                 SIGBUS)"
            ),
        ));
    }
    if !sealed_against_shrinking(fd) {
        log::debug!(
            "memory region {i}: its file is not sealed against shrinking; a truncation while \
             it is shared would cost the connection"
        );
    }
    Ok(())
}

/// Whether the file has the `F_SEAL_SHRINK` seal (a memfd that can never get shorter).
fn sealed_against_shrinking(fd: &OwnedFd) -> bool {
    // SAFETY: F_GET_SEALS only reads the seals of a descriptor we hold open; no memory is
    // passed. Files that support no seals return an error, taken as "not sealed".
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    seals >= 0 && seals & libc::F_SEAL_SHRINK != 0
}

/// The little-endian u64 at `at` in `bytes` (0 when out of range).
fn u64_at(bytes: &[u8], at: usize) -> u64 {
    bytes
        .get(at..at + 8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

#[cfg(test)]
mod tests {
    use std::os::fd::FromRawFd;

    use super::*;

    fn memfd(len: u64) -> OwnedFd {
        // SAFETY: memfd_create takes a NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"region".as_ptr(), 0) };
        assert!(fd >= 0, "memfd_create");
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        File::from(fd.try_clone().expect("dup"))
            .set_len(len)
            .expect("size memfd");
        fd
    }

    /// A region's bytes: guest address 0, `size`, user address 0, `offset`.
    fn region(size: u64, offset: u64) -> Vec<u8> {
        [0, size, 0, offset]
            .iter()
            .flat_map(|v: &u64| v.to_le_bytes())
            .collect()
    }

    fn table(regions: &[(u64, u64)]) -> Vec<u8> {
        let mut p = (regions.len() as u64).to_le_bytes().to_vec();
        for &(size, offset) in regions {
            p.extend(region(size, offset));
        }
        p
    }

    #[test]
    fn regions_beyond_their_file_are_refused() {
        let set = u32::from(FrontendReq::SET_MEM_TABLE);
        let add = u32::from(FrontendReq::ADD_MEM_REG);
        let fds = [memfd(1 << 20), memfd(64 << 10)];
        let ok = table(&[(1 << 20, 0), (32 << 10, 32 << 10)]);
        check(set, &ok, &fds).expect("regions inside their files");
        for (regions, what) in [
            (vec![(1 << 20, 0), (1 << 20, 0)], "memory region 1"),
            (vec![(1 << 20, 4096), (4096, 0)], "memory region 0"),
            (vec![(1 << 20, 0), (16, u64::MAX)], "memory region 1"),
        ] {
            let e = check(set, &table(&regions), &fds).expect_err("beyond the file");
            assert!(e.to_string().starts_with(what), "{e}");
            assert!(e.to_string().contains("mmap_offset"), "{e}");
        }
        let mut single = 0u64.to_le_bytes().to_vec();
        single.extend(region(128 << 10, 0));
        let e = check(add, &single, &fds[1..]).expect_err("beyond the file");
        assert!(e.to_string().contains("65536-byte file"), "{e}");
        single.truncate(8);
        single.extend(region(64 << 10, 0));
        check(add, &single, &fds[1..]).expect("inside the file");
        // Other messages pass whatever they carry.
        check(u32::from(FrontendReq::SET_VRING_KICK), &ok, &fds).expect("not a region");
    }
}
