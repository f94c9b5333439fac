//! Data verification of a target: a seeded pattern written and read back through it (and,
//! optionally, directly from its file), or reads compared with the raw source file of the
//! image it serves.

use crate::data_pattern::{check_pattern, check_source, fill_pattern, fill_source};
use crate::device::{io_batch, Device, Driver};
use crate::error::Result;
use crate::rng::Rng;

/// What `verify` or `verify_source` checked.
pub struct VerifyReport {
    /// Requests issued.
    pub requests: usize,
    /// Bytes transferred.
    pub bytes: u64,
    /// Size of the target in bytes.
    pub capacity: u64,
    /// Data read back was compared (not only the completion status).
    pub data_checked: bool,
    /// The data was also read back directly from the image file.
    pub cross_checked: bool,
    /// Data was written through the target and read back.
    pub write_checked: bool,
}

/// Writes a seeded pattern to scattered offsets (4k and 128k requests) through the target,
/// reads it back through the target, and, with `check_file`, once more through io_uring
/// directly on the file (so the data really reached the image). With `check_data == false`
/// (the null driver) only completion status is checked.
pub fn verify(
    driver: Driver,
    path: &str,
    seed: u64,
    expect_size: Option<u64>,
    check_data: bool,
    check_file: Option<&str>,
) -> Result<VerifyReport> {
    const COUNT: usize = 32;
    let mut requests = 0;
    let mut bytes = 0;
    let mut capacity = 0;
    // Pass 1: 4k requests, pass 2: 128k requests (the sizes the benchmark uses).
    for (pass, bs) in [(0u64, 4096usize), (1, 128 * 1024)] {
        let mut dev = Device::open(driver, path, 1, COUNT * bs)?;
        capacity = dev.capacity;
        if let Some(want) = expect_size {
            if capacity != want {
                return Err(format!(
                    "capacity is {capacity} bytes, expected {want} bytes"
                ));
            }
        }
        let blocks = capacity / bs as u64;
        if blocks < COUNT as u64 {
            return Err(format!("target too small for verify: {capacity} bytes"));
        }
        // Distinct offsets: a stride through the device plus a seeded jitter.
        let stride = blocks / COUNT as u64;
        let mut rng = Rng::new(seed.wrapping_add(pass));
        let offsets: Vec<u64> = (0..COUNT as u64)
            .map(|i| (i * stride + rng.next() % stride) * bs as u64)
            .collect();
        let pseed = seed.wrapping_add(pass.wrapping_mul(0x5151));
        write_then_read_back(&mut dev, pseed, &offsets, bs)?;
        if check_data {
            check_pattern(
                dev.buf_slice(),
                &offsets,
                bs,
                pseed,
                "read back through the target",
            )?;
        }
        requests += 2 * COUNT;
        bytes += 2 * (COUNT * bs) as u64;
        drop(dev);

        if let Some(file) = check_file {
            let mut fdev = Device::open(Driver::IoUring, file, 1, COUNT * bs)?;
            fdev.buf_slice().fill(0x5A);
            io_batch(&mut fdev, false, &offsets, bs)?;
            check_pattern(
                fdev.buf_slice(),
                &offsets,
                bs,
                pseed,
                &format!("read back directly from {file}"),
            )?;
            requests += COUNT;
            bytes += (COUNT * bs) as u64;
        }
    }
    Ok(VerifyReport {
        requests,
        bytes,
        capacity,
        data_checked: check_data,
        cross_checked: check_file.is_some(),
        write_checked: true,
    })
}

/// Verifies a target that serves the content of `source` (a raw file holding the source
/// pattern, e.g. the qcow2 image converted from it): scattered 4k reads and 128k reads at
/// 4k-aligned offsets (so they cross cluster boundaries) through the target must return what
/// `source` holds; `source` itself is read directly with io_uring (O_DIRECT) and checked against
/// the pattern. With `write_check`, a different pattern is then written through the target and
/// read back, and the source data is written back and read back, leaving the image as it was.
pub fn verify_source(
    driver: Driver,
    path: &str,
    source: &str,
    seed: u64,
    expect_size: Option<u64>,
    write_check: bool,
) -> Result<VerifyReport> {
    let mut requests = 0;
    let mut bytes = 0;
    let mut capacity = 0;
    for (pass, bs, count) in [(0u64, 4096usize, 128usize), (1, 128 * 1024, 32)] {
        let mut dev = Device::open(driver, path, 1, count * bs)?;
        capacity = dev.capacity;
        if let Some(want) = expect_size {
            if capacity != want {
                return Err(format!(
                    "capacity is {capacity} bytes, expected {want} bytes"
                ));
            }
        }
        // Distinct, non-overlapping, 4k-aligned offsets: a stride plus a seeded jitter.
        let units = capacity.saturating_sub(bs as u64) / 4096 + 1;
        let stride = units / count as u64;
        if stride * 4096 < bs as u64 {
            return Err(format!("target too small for verify: {capacity} bytes"));
        }
        let mut rng = Rng::new(seed.wrapping_add(pass));
        let offsets: Vec<u64> = (0..count as u64)
            .map(|i| (i * stride + rng.next() % (stride - bs as u64 / 4096 + 1)) * 4096)
            .collect();
        let n = offsets.len() as u64;

        let mut src = Device::open(Driver::IoUring, source, 1, count * bs)?;
        if src.capacity != capacity {
            return Err(format!(
                "source {source} has {} bytes, the target {capacity}",
                src.capacity
            ));
        }
        src.buf_slice().fill(0x5A);
        io_batch(&mut src, false, &offsets, bs)?;
        check_source(
            src.buf_slice(),
            &offsets,
            bs,
            &format!(
                "source file {source} does not hold the source pattern; delete it to regenerate"
            ),
        )?;
        drop(src);
        requests += n;
        bytes += n * bs as u64;

        let how = format!("read through the target differs from the source file {source}");
        dev.buf_slice().fill(0xA5);
        io_batch(&mut dev, false, &offsets, bs)?;
        check_source(dev.buf_slice(), &offsets, bs, &how)?;
        requests += n;
        bytes += n * bs as u64;

        if write_check {
            let pseed = seed.wrapping_add(pass.wrapping_mul(0x5151));
            write_then_read_back(&mut dev, pseed, &offsets, bs)?;
            check_pattern(
                dev.buf_slice(),
                &offsets,
                bs,
                pseed,
                "written and read back through the target",
            )?;
            {
                let buf = dev.buf_slice();
                for (i, &off) in offsets.iter().enumerate() {
                    fill_source(&mut buf[i * bs..(i + 1) * bs], off);
                }
            }
            io_batch(&mut dev, true, &offsets, bs)?;
            dev.buf_slice().fill(0xA5);
            io_batch(&mut dev, false, &offsets, bs)?;
            check_source(
                dev.buf_slice(),
                &offsets,
                bs,
                "source data written back and read back through the target",
            )?;
            requests += 4 * n;
            bytes += 4 * n * bs as u64;
        }
    }
    Ok(VerifyReport {
        requests: requests as usize,
        bytes,
        capacity,
        data_checked: true,
        cross_checked: false,
        write_checked: write_check,
    })
}

/// Writes a pattern (seeded by `seed`, keyed by offset) at `offsets`, poisons the buffers so a
/// read that transfers nothing cannot pass, and reads the same offsets back into them.
fn write_then_read_back(dev: &mut Device, seed: u64, offsets: &[u64], bs: usize) -> Result<()> {
    {
        let buf = dev.buf_slice();
        for (i, &off) in offsets.iter().enumerate() {
            fill_pattern(&mut buf[i * bs..(i + 1) * bs], seed, off);
        }
    }
    io_batch(dev, true, offsets, bs)?;
    dev.buf_slice().fill(0xA5);
    io_batch(dev, false, offsets, bs)
}
