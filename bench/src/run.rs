//! One workload run on one target: a client thread per queue, each keeping the queue depth
//! in flight on its own slice of the device's buffer with the same seeded request stream on
//! every target; latency percentiles and CPU time over the measured window.

use std::mem::MaybeUninit;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use blkio::{Blkioq, Completion, Errno, ReqFlags};

use crate::data_pattern::fill_source;
use crate::device::{completion_error, Device, Driver, IO_TIMEOUT};
use crate::error::Result;
use crate::procstat;
use crate::rng::Rng;
use crate::workload::Workload;

/// How to run one workload.
#[derive(Clone, Copy)]
pub struct RunSpec<'a> {
    /// How the target is reached.
    pub driver: Driver,
    /// Socket (vhost-user) or file (io_uring).
    pub path: &'a str,
    /// What to run.
    pub workload: Workload,
    /// Unmeasured warm-up.
    pub ramp: Duration,
    /// Measured window.
    pub duration: Duration,
    /// Seed of the offset stream.
    pub seed: u64,
    /// Daemon whose CPU time is sampled at the window edges.
    pub daemon_pid: Option<u32>,
    /// The storage cluster's OSD (rbd backend), sampled the same way: on one machine it
    /// shares the CPUs with the daemon and the client.
    pub osd_pid: Option<u32>,
    /// Limit offsets to the first `span` bytes.
    pub span: Option<u64>,
    /// Writes carry the source pattern of their offset (see [`fill_source`]) instead of
    /// random data, so they leave an image made from that pattern unchanged.
    pub write_source: bool,
}

/// Result of one workload run on one target.
pub struct RunResult {
    /// Requests completed in the measured window.
    pub ios: u64,
    /// Bytes transferred by those requests.
    pub bytes: u64,
    /// Length of the measured window.
    pub seconds: f64,
    /// Median latency (µs).
    pub p50_us: f64,
    /// 99th percentile latency (µs).
    pub p99_us: f64,
    /// 99.9th percentile latency (µs).
    pub p999_us: f64,
    /// Mean latency (µs).
    pub mean_us: f64,
    /// CPU seconds the daemon used in the window, when its pid was given.
    pub daemon_cpu_s: Option<f64>,
    /// CPU seconds the OSD used in the window, when its pid was given.
    pub osd_cpu_s: Option<f64>,
    /// CPU seconds this client used in the window.
    pub client_cpu_s: f64,
    /// Busy CPU seconds of everything else on the machine in the window (other processes,
    /// interrupts, kernel threads; not the daemon, client or OSD): a measure of interference.
    pub other_cpu_s: f64,
    /// CPU seconds the hypervisor took from this VM in the window (steal, all CPUs): on a
    /// shared host, the other interference, which no process here shows.
    pub steal_s: f64,
    /// Size of the target in bytes.
    pub capacity: u64,
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
        osd_pid,
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
        // SAFETY: the buffer holds per_queue bytes for each of the nq queues and idx < nq, so
        // idx * per_queue + per_queue <= region length.
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
    let o0 = osd_pid.map(procstat::cpu_seconds).transpose()?;
    let c0 = procstat::self_cpu_seconds()?;
    let m0 = procstat::machine_cpu_seconds()?;
    sleep_until(t0 + ramp + duration);
    let d1 = daemon_pid.map(procstat::cpu_seconds).transpose()?;
    let o1 = osd_pid.map(procstat::cpu_seconds).transpose()?;
    let c1 = procstat::self_cpu_seconds()?;
    let m1 = procstat::machine_cpu_seconds()?;

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
    let delta = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let daemon_cpu_s = delta(d0, d1);
    let osd_cpu_s = delta(o0, o1);
    Ok(RunResult {
        ios,
        bytes,
        seconds: duration.as_secs_f64(),
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        p999_us: pct(0.999),
        mean_us,
        daemon_cpu_s,
        osd_cpu_s,
        client_cpu_s: c1 - c0,
        other_cpu_s: ((m1.busy - m0.busy)
            - (c1 - c0)
            - daemon_cpu_s.unwrap_or(0.0)
            - osd_cpu_s.unwrap_or(0.0))
        .max(0.0),
        steal_s: m1.steal - m0.steal,
        capacity,
    })
}

/// Sleeps until `t` (returns at once if it has passed).
fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        thread::sleep(t - now);
    }
}

/// Takes the completions `q` has without waiting for any: `do_io` with `min_completions` 0.
/// On the vhost-user driver that reads the used ring (and kicks the device for new requests);
/// on the io_uring driver it submits what is queued and reads the completion ring, which the
/// kernel fills from task work it runs when it interrupts the spinning thread (libblkio's
/// rings are set up without COOP_TASKRUN or DEFER_TASKRUN, so a completion signals the
/// task). An error when nothing has completed for [`IO_TIMEOUT`] since `last_progress`.
fn poll_completions(
    q: &mut Blkioq,
    completions: &mut [MaybeUninit<Completion>],
    last_progress: Instant,
) -> Result<usize> {
    let n = q
        .do_io(completions, 0, None, None)
        .map_err(|e| format!("do_io: {e}"))?;
    if n == 0 && last_progress.elapsed() >= IO_TIMEOUT {
        return Err(format!(
            "do_io: no completion for {} s while polling",
            IO_TIMEOUT.as_secs()
        ));
    }
    Ok(n)
}

/// Sends a raw pointer to a worker thread. The region outlives the workers (they are joined
/// before the `Device` is dropped) and each worker uses a disjoint slice of it.
struct SendPtr(*mut u8);
// SAFETY: see the type's comment; the pointer is only used by the one worker it is sent to,
// for requests and their data in that worker's own slice of the region.
unsafe impl Send for SendPtr {}

/// What one client thread measured.
struct WorkerStats {
    /// Latencies (ns) of requests completed inside the measurement window.
    lat_ns: Vec<u32>,
    ios: u64,
    bytes: u64,
}

/// One client thread: keeps `w.queue_depth` requests in flight on `q` (or, at a fixed rate,
/// issues its share of the rate with at most that many in flight), each in its own slot of
/// `buf`, until `t_end`, and records the requests that complete between `t_ramp` and `t_end`.
/// Latency runs from a request's submission, not from when it was due: a target that cannot
/// keep the rate shows it in the IOPS. With `w.poll` the thread never sleeps: it calls
/// `do_io` without waiting (see [`poll_completions`]) until completions come, and spins
/// rather than sleeps until a fixed-rate request is due.
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
    // At a fixed rate: this queue's share of it, one request every `interval`, the next due
    // at `due` (a request that finds no free slot goes as soon as one frees).
    let interval = w
        .rate
        .map(|r| Duration::from_secs_f64(w.queues as f64 / r as f64));
    if interval.is_some() {
        // Sleeps between requests are short: the kernel's default timer slack (50 µs) would
        // stretch each of them and lower the rate.
        // SAFETY: PR_SET_TIMERSLACK takes an integer and touches no memory.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    }
    let mut free: Vec<usize> = (0..qd).rev().collect();
    let mut in_flight = 0;
    let mut error: Option<String> = None;
    let mut now = Instant::now();
    let mut due = now;
    // The last submission or completion: polling that finds nothing for IO_TIMEOUT after it
    // is a hang, as a sleeping wait that long is.
    let mut last_progress = now;
    loop {
        while now < t_end && error.is_none() {
            if let Some(interval) = interval {
                if now < due {
                    break;
                }
                due += interval;
            }
            let Some(slot) = free.pop() else { break };
            submitted_at[slot] = now;
            last_progress = now;
            submit(&mut q, slot, next_offset());
            in_flight += 1;
        }
        if in_flight == 0 {
            if now >= t_end || error.is_some() || interval.is_none() {
                break;
            }
            if !w.poll {
                sleep_until(due);
            }
            now = Instant::now();
            continue;
        }
        let n = if w.poll {
            poll_completions(&mut q, &mut completions, last_progress)
                .map_err(|e| format!("{e} ({in_flight} requests in flight)"))?
        } else {
            // At a fixed rate with a free slot, wait for a completion only until the next
            // request is due.
            let wait = match interval {
                Some(_) if !free.is_empty() && due < t_end => due.saturating_duration_since(now),
                _ => IO_TIMEOUT,
            };
            let mut timeout = wait;
            match q.do_io(&mut completions, 1, Some(&mut timeout), None) {
                Ok(n) => n,
                Err(e) if e.errno() == Errno::TIME && wait < IO_TIMEOUT => 0,
                Err(e) => return Err(format!("do_io: {e} ({} requests in flight)", in_flight)),
            }
        };
        now = Instant::now();
        if n > 0 {
            last_progress = now;
        }
        let in_window = now >= t_ramp && now < t_end;
        for c in &completions[..n] {
            // SAFETY: do_io initialised the first n entries.
            let c = unsafe { c.assume_init_ref() };
            let slot = c.user_data;
            in_flight -= 1;
            free.push(slot);
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
        }
    }
    match error {
        Some(e) => Err(e),
        None => Ok(stats),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Runs one workload at a time: a run's client CPU is the whole test process's.
    static ONE_RUN: Mutex<()> = Mutex::new(());

    /// A zero-filled file of `len` bytes for the io_uring driver (O_DIRECT), removed on drop.
    struct TempImage(std::path::PathBuf);

    impl TempImage {
        fn new(name: &str, len: u64) -> TempImage {
            let path = std::env::temp_dir()
                .join(format!("strata-bench-{name}-{}.img", std::process::id()));
            let f = std::fs::File::create(&path).unwrap();
            f.set_len(len).unwrap();
            TempImage(path)
        }
        fn path(&self) -> &str {
            self.0.to_str().unwrap()
        }
    }

    impl Drop for TempImage {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn run(path: &str, workload: &str, seconds: f64, write_source: bool) -> RunResult {
        let _one = ONE_RUN.lock().unwrap_or_else(|e| e.into_inner());
        run_workload(&RunSpec {
            driver: Driver::IoUring,
            path,
            workload: Workload::parse(workload).unwrap(),
            ramp: Duration::from_millis(50),
            duration: Duration::from_secs_f64(seconds),
            seed: 1,
            daemon_pid: None,
            osd_pid: None,
            span: None,
            write_source,
        })
        .unwrap()
    }

    #[test]
    fn polling_client_completes_writes_that_land() {
        let img = TempImage::new("poll-writes", 8 << 20);
        let r = run(img.path(), "randwrite-4k-qd4-poll", 0.3, true);
        assert!(r.ios > 0);
        // Every 4k block is untouched (zeroes) or holds the source pattern of its offset.
        let data = std::fs::read(img.path()).unwrap();
        let mut want = vec![0u8; 4096];
        let mut written = 0;
        for (i, block) in data.chunks_exact(4096).enumerate() {
            if block.iter().all(|&b| b == 0) {
                continue;
            }
            fill_source(&mut want, i as u64 * 4096);
            assert_eq!(block, &want[..], "block {i}");
            written += 1;
        }
        assert!(written > 0, "no write reached the file");
    }

    #[test]
    fn polling_client_spins_where_the_sleeping_one_sleeps() {
        // At 1000 requests per second a sleeping client is idle between requests; a polling
        // one keeps its CPU busy (less than all of it on a loaded machine).
        let img = TempImage::new("poll-cpu", 4 << 20);
        let busy = |w: &str| {
            let r = run(img.path(), w, 0.5, false);
            assert!(r.ios > 0, "{w}");
            r.client_cpu_s / r.seconds
        };
        let sleeping = busy("randread-4k-qd1-r1k");
        let polling = busy("randread-4k-qd1-r1k-poll");
        assert!(
            polling > 0.2 && polling > 4.0 * sleeping,
            "client CPU: polling {polling:.3}, sleeping {sleeping:.3} of one CPU"
        );
    }
}
