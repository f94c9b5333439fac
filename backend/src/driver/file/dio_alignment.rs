//! O_DIRECT alignment of a file: what offsets, lengths and buffer addresses the kernel takes
//! with `cache.direct=on`. It is asked of the kernel (`statx(STATX_DIOALIGN)`, a device's
//! logical block size) and probed by trial reads where the kernel does not say, never assumed:
//! a wrong guess fails every request with EINVAL. The node above widens and bounces requests
//! that do not meet it.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;

use crate::driver::Limits;
use crate::error::{BlockError, Result};
use crate::io::bounce::BounceBuffer;

/// The limits of requests on `file`: O_DIRECT's alignment when `direct`.
pub(super) fn io_limits(
    file: &File,
    filename: &str,
    block_device: bool,
    direct: bool,
) -> Result<Limits> {
    let mut limits = Limits::default();
    if direct {
        let (request, memory) = dio_alignment(file, block_device)
            .map_err(|e| e.context(format!("'{filename}' with cache.direct=on")))?;
        limits.request_alignment = request;
        limits.min_mem_alignment = memory;
        limits.opt_mem_alignment = memory.max(4096);
        log::debug!("{filename}: O_DIRECT alignment: requests {request}, memory {memory}");
    }
    Ok(limits)
}

/// O_DIRECT alignment (request, memory): statx(STATX_DIOALIGN), the logical block size of a
/// device, or trial reads when the kernel reports neither.
fn dio_alignment(file: &File, block_device: bool) -> Result<(u32, usize)> {
    let fd = file.as_raw_fd();
    // SAFETY: an all-zero statx is a valid value of this plain C struct.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let empty = CString::default();
    // SAFETY: statx with AT_EMPTY_PATH reads `fd` and writes into `stx`, a valid local.
    let r = unsafe {
        libc::statx(
            fd,
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    let (mut request, mut memory) = (0u32, 0usize);
    if r == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_offset_align != 0 {
        request = stx.stx_dio_offset_align;
        memory = stx.stx_dio_mem_align as usize;
    }
    if block_device {
        let mut lbs: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int into `lbs`, a valid local.
        if unsafe { libc::ioctl(fd, libc::BLKSSZGET, &mut lbs) } == 0 && lbs > 0 {
            request = request.max(lbs as u32);
        }
    }
    if request == 0 {
        request = probe_request_alignment(fd)?;
    }
    if memory == 0 {
        memory = probe_memory_alignment(fd, request);
    }
    if !request.is_power_of_two() || !memory.is_power_of_two() {
        return Err(BlockError::invalid(format!(
            "unusable O_DIRECT alignment: offsets {request}, memory {memory}"
        )));
    }
    Ok((request, memory))
}

const PROBE_SIZES: [u32; 8] = [1, 512, 1024, 2048, 4096, 8192, 16384, 65536];

fn probe_request_alignment(fd: i32) -> Result<u32> {
    let mut buf = BounceBuffer::new(65536)?;
    for size in PROBE_SIZES {
        // SAFETY: reads at most `size` <= 65536 bytes into our own buffer of that capacity.
        let r =
            unsafe { libc::pread(fd, buf.as_mut_slice().as_mut_ptr().cast(), size as usize, 0) };
        if r >= 0 {
            return Ok(size);
        }
    }
    Err(BlockError::invalid(
        "Could not find a working O_DIRECT alignment; try cache.direct=off",
    ))
}

fn probe_memory_alignment(fd: i32, request: u32) -> usize {
    let Ok(mut buf) = BounceBuffer::new(65536 + 8192) else {
        return 4096;
    };
    for align in [1usize, 512, 1024, 2048, 4096] {
        let slice = &mut buf.as_mut_slice()[align..];
        // SAFETY: reads `request` <= 65536 bytes into the buffer past `align` <= 4096 bytes.
        let r = unsafe { libc::pread(fd, slice.as_mut_ptr().cast(), request as usize, 0) };
        if r >= 0 {
            return align;
        }
    }
    4096
}
