//! The I/O engine: opens a target through libblkio, runs one workload on one or more queues
//! (one client thread per queue) and verifies data.
//!
//! Every target goes through the same code: the same memory regions (allocated with
//! `alloc_mem_region` and mapped with `map_mem_region`, as vhost-user needs), the same
//! completion-queue loop (`do_io`) and the same seeded request stream.

use std::mem::MaybeUninit;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use blkio::{Blkioq, Completion, ReqFlags};

use crate::data_pattern::{check_pattern, check_source, fill_pattern, fill_source};
use crate::device::{completion_error, io_batch, Device, Driver, IO_TIMEOUT};
use crate::error::Result;
use crate::procstat;
use crate::rng::Rng;
use crate::workload::Workload;

/// What one client thread measured.
struct WorkerStats {
    /// Latencies (ns) of requests completed inside the measurement window.
    lat_ns: Vec<u32>,
    ios: u64,
    bytes: u64,
}

/// Result of one workload run on one target.
pub struct RunResult {
    pub ios: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub mean_us: f64,
    pub daemon_cpu_s: Option<f64>,
    pub client_cpu_s: f64,
    /// Busy CPU seconds of everything else on the machine in the window (other processes,
    /// interrupts, kernel threads): a measure of interference.
    pub other_cpu_s: f64,
    pub capacity: u64,
}

/// Sends a raw pointer to a worker thread. The region outlives the workers (they are joined
/// before the `Device` is dropped) and each worker uses a disjoint slice of it.
struct SendPtr(*mut u8);
// SAFETY: see the type's comment; the pointer is only dereferenced by libblkio for requests.
unsafe impl Send for SendPtr {}

/// How to run one workload.
#[derive(Clone, Copy)]
pub struct RunSpec<'a> {
    pub driver: Driver,
    /// Socket (vhost-user) or file (io_uring).
    pub path: &'a str,
    pub workload: Workload,
    /// Unmeasured warm-up.
    pub ramp: Duration,
    /// Measured window.
    pub duration: Duration,
    /// Seed of the offset stream.
    pub seed: u64,
    /// Daemon whose CPU time is sampled at the window edges.
    pub daemon_pid: Option<u32>,
    /// Limit offsets to the first `span` bytes.
    pub span: Option<u64>,
    /// Writes carry the source pattern of their offset (see [`fill_source`]) instead of
    /// random data, so they leave an image made from that pattern unchanged.
    pub write_source: bool,
}

/// Runs a workload for `ramp + duration`, measuring only the last `duration`.
pub fn run_workload(spec: &RunSpec) -> Result<RunResult> {
    let RunSpec {
        driver,
        path,
        workload,
        ramp,
        duration,
        seed,
        daemon_pid,
        span,
        write_source,
    } = *spec;
    let per_queue = workload.block_size * workload.queue_depth;
    let mut dev = Device::open(driver, path, workload.queues, per_queue * workload.queues)?;
    let capacity = dev.capacity;
    let span = span.unwrap_or(capacity).min(capacity);
    if span < (workload.block_size * workload.queue_depth * workload.queues) as u64 {
        return Err(format!(
            "target too small: {span} bytes for {workload} (capacity {capacity})"
        ));
    }
    // Non-zero, non-repeating data for writes (reads overwrite it).
    let mut rng = Rng::new(seed ^ 0xB10C);
    for chunk in dev.buf_slice().chunks_mut(8) {
        let v = rng.next().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }

    let nq = workload.queues;
    // Start barrier: all workers and the main thread (which samples CPU times).
    let barrier = Arc::new(Barrier::new(nq + 1));
    let start_holder: Arc<std::sync::OnceLock<Instant>> = Arc::new(std::sync::OnceLock::new());
    let base = dev.buf();
    let mut handles = Vec::with_capacity(nq);
    let queues = dev.take_queues();
    for (idx, q) in queues.into_iter().enumerate() {
        let barrier = Arc::clone(&barrier);
        let start_holder = Arc::clone(&start_holder);
        // SAFETY: idx * per_queue + per_queue <= region length.
        let buf = SendPtr(unsafe { base.add(idx * per_queue) });
        let wseed = seed.wrapping_add(idx as u64 * 0x1000_0001);
        let first_seq = span / nq as u64 * idx as u64;
        handles.push(
            thread::Builder::new()
                .name(format!("bench-q{idx}"))
                .spawn(move || {
                    let buf = buf;
                    barrier.wait();
                    let t0 = *start_holder.get().expect("start time set before barrier");
                    worker(
                        q,
                        buf.0,
                        workload,
                        span,
                        wseed,
                        first_seq,
                        write_source,
                        t0 + ramp,
                        t0 + ramp + duration,
                    )
                })
                .map_err(|e| format!("spawn worker: {e}"))?,
        );
    }
    let t0 = Instant::now();
    start_holder.set(t0).expect("start time set once");
    barrier.wait();

    // Sample CPU times at the window edges.
    sleep_until(t0 + ramp);
    let d0 = daemon_pid.map(procstat::cpu_seconds).transpose()?;
    let c0 = procstat::self_cpu_seconds()?;
    let m0 = procstat::machine_busy_seconds()?;
    sleep_until(t0 + ramp + duration);
    let d1 = daemon_pid.map(procstat::cpu_seconds).transpose()?;
    let c1 = procstat::self_cpu_seconds()?;
    let m1 = procstat::machine_busy_seconds()?;

    let mut lat: Vec<u32> = Vec::new();
    let mut ios = 0;
    let mut bytes = 0;
    let mut errors = Vec::new();
    for h in handles {
        match h.join() {
            Ok(Ok(s)) => {
                if lat.is_empty() {
                    lat = s.lat_ns;
                } else {
                    lat.extend_from_slice(&s.lat_ns);
                }
                ios += s.ios;
                bytes += s.bytes;
            }
            Ok(Err(e)) => errors.push(e),
            Err(_) => errors.push("worker thread panicked".to_string()),
        }
    }
    drop(dev);
    if !errors.is_empty() {
        return Err(errors.join("; "));
    }
    if ios == 0 {
        return Err(format!("no I/O completed in the window for {workload}"));
    }
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[i] as f64 / 1000.0
    };
    let mean_us = lat.iter().map(|&x| x as f64).sum::<f64>() / lat.len() as f64 / 1000.0;
    Ok(RunResult {
        ios,
        bytes,
        seconds: duration.as_secs_f64(),
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        p999_us: pct(0.999),
        mean_us,
        daemon_cpu_s: match (d0, d1) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        },
        client_cpu_s: c1 - c0,
        other_cpu_s: ((m1 - m0) - (c1 - c0) - d1.unwrap_or(0.0) + d0.unwrap_or(0.0)).max(0.0),
        capacity,
    })
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        thread::sleep(t - now);
    }
}

#[allow(clippy::too_many_arguments)]
fn worker(
    mut q: Blkioq,
    buf: *mut u8,
    w: Workload,
    span: u64,
    seed: u64,
    first_seq: u64,
    write_source: bool,
    t_ramp: Instant,
    t_end: Instant,
) -> Result<WorkerStats> {
    let bs = w.block_size;
    let qd = w.queue_depth;
    let blocks = span / bs as u64;
    let mut rng = Rng::new(seed);
    let mut seq = first_seq / bs as u64;
    let mut next_offset = move || -> u64 {
        if w.pattern.is_random() {
            (rng.next() % blocks) * bs as u64
        } else {
            let off = (seq % blocks) * bs as u64;
            seq += 1;
            off
        }
    };
    let submit = |q: &mut Blkioq, slot: usize, off: u64| {
        // SAFETY: slot < qd, so the slice lies inside this worker's part of the region.
        let p = unsafe { buf.add(slot * bs) };
        if w.pattern.is_write() {
            if write_source {
                // SAFETY: as above; the slot's previous request has completed, so nothing
                // else reads or writes these bytes until this request is submitted.
                fill_source(unsafe { std::slice::from_raw_parts_mut(p, bs) }, off);
            }
            q.write(off, p, bs, slot, ReqFlags::empty());
        } else {
            q.read(off, p, bs, slot, ReqFlags::empty());
        }
    };

    let mut stats = WorkerStats {
        lat_ns: Vec::with_capacity(1 << 16),
        ios: 0,
        bytes: 0,
    };
    let mut submitted_at = vec![Instant::now(); qd];
    let mut completions: Vec<MaybeUninit<Completion>> = Vec::with_capacity(qd);
    completions.resize_with(qd, MaybeUninit::uninit);

    let now = Instant::now();
    for (slot, at) in submitted_at.iter_mut().enumerate() {
        *at = now;
        submit(&mut q, slot, next_offset());
    }
    let mut in_flight = qd;
    let mut error: Option<String> = None;
    while in_flight > 0 {
        let mut timeout = IO_TIMEOUT;
        let n = match q.do_io(&mut completions, 1, Some(&mut timeout), None) {
            Ok(n) => n,
            Err(e) => return Err(format!("do_io: {e} ({} requests in flight)", in_flight)),
        };
        let now = Instant::now();
        let in_window = now >= t_ramp && now < t_end;
        for c in &completions[..n] {
            // SAFETY: do_io initialised the first n entries.
            let c = unsafe { c.assume_init_ref() };
            let slot = c.user_data;
            in_flight -= 1;
            if c.ret != 0 {
                error.get_or_insert_with(|| completion_error(c));
                continue;
            }
            if in_window {
                let ns = now.duration_since(submitted_at[slot]).as_nanos();
                stats.lat_ns.push(ns.min(u32::MAX as u128) as u32);
                stats.ios += 1;
                stats.bytes += bs as u64;
            }
            if now < t_end && error.is_none() {
                submitted_at[slot] = now;
                submit(&mut q, slot, next_offset());
                in_flight += 1;
            }
        }
    }
    match error {
        Some(e) => Err(e),
        None => Ok(stats),
    }
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

/// What `verify` checked.
pub struct VerifyReport {
    pub requests: usize,
    pub bytes: u64,
    pub capacity: u64,
    pub data_checked: bool,
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
