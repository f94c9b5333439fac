//! The adaptive busy-poll window in a running export: a queue whose requests come further
//! apart than `poll-max-ns` must cost no polling. This file holds one test, so the process's
//! CPU time is the export's and this client's only.

mod common;

use std::thread;
use std::time::Duration;

use common::*;

/// Requests per run, and the pause between two (longer than the poll bound below).
const REQUESTS: u32 = 150;
const GAP: Duration = Duration::from_millis(2);
/// The poll bound: a fixed window this long would burn it after every request.
const POLL_MAX_NS: u64 = 1_000_000;

/// CPU seconds (user + system) this process has used, finished threads included.
fn process_cpu() -> f64 {
    // SAFETY: an all-zero rusage is a valid value for getrusage to overwrite.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a live rusage the call writes.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    assert_eq!(rc, 0, "getrusage: {}", std::io::Error::last_os_error());
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}

/// CPU seconds used while an export with `poll_max_ns` serves REQUESTS reads, GAP apart.
fn cpu_for_spaced_reads(poll_max_ns: u64) -> f64 {
    let disk = Disk::new(16 * MIB as u64, "");
    let export = disk.export(|c| c.poll_max_ns = poll_max_ns);
    let mut c = Client::connect(&disk.socket(), 1, MIB).expect("connect");
    let p = c.ptr(0);
    // Warm up: connection set-up and first-touch costs stay out of the measure.
    assert_eq!(read(&mut c.queues[0], 0, p, 4096), 0);
    thread::sleep(GAP);
    let before = process_cpu();
    for i in 0..REQUESTS {
        assert_eq!(read(&mut c.queues[0], u64::from(i) * 4096, p, 4096), 0);
        thread::sleep(GAP);
    }
    let used = process_cpu() - before;
    drop(c);
    export.stop();
    export.join().expect("join");
    used
}

#[test]
fn requests_further_apart_than_the_bound_cost_no_polling() {
    let sleeping = cpu_for_spaced_reads(0);
    let adaptive = cpu_for_spaced_reads(POLL_MAX_NS);
    // A fixed window would add about REQUESTS x POLL_MAX_NS (0.15 s) of polling, or half of
    // it if the poller shares its CPU; the adaptive one closes after the first wait.
    let polled_for = REQUESTS as f64 * POLL_MAX_NS as f64 / 1e9;
    assert!(
        adaptive < sleeping + polled_for / 4.0,
        "CPU with an adaptive window {adaptive:.4} s, without polling {sleeping:.4} s: \
         the worker polled for requests {GAP:?} apart (bound {POLL_MAX_NS} ns)"
    );
}
