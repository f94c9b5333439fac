//! A guest decides what the daemon bounces: 1 GiB reads from misaligned buffers on every
//! queue, several in flight, must not make the daemon allocate more than a few MiB.

mod common;

use blkio::ReqFlags;
use common::*;
use strata_backend::{ChildRole, Graph};
use strata_vhost::{BlkExport, BlkExportConfig, Listen};

const GIB: usize = 1 << 30;
const QUEUES: usize = 2;
const IN_FLIGHT: usize = 4;

/// This process's anonymous resident memory in KiB: what it allocated, not the guest memory
/// it maps (shared, counted as RssShmem).
fn anon_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn gigabyte_misaligned_reads_on_every_queue_stay_within_a_few_mib() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "loop devices need root"
        );
        eprintln!("SKIPPED: loop devices need root");
        return;
    }
    init_log();
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(2 * GIB as u64))
        .expect("sparse image");
    let dev = Loop4k::attach(&image);
    let graph = Graph::new();
    let node = dev.open_raw(&graph);
    let socket = dir.path().join("vhost.sock");
    let mut cfg = BlkExportConfig::new("mem", node.clone());
    cfg.writable = true;
    cfg.num_queues = QUEUES as u16;
    // 512-byte blocks on 4 KiB sectors: a read starting at 512 is widened and bounced.
    cfg.logical_block_size = 512;
    let export = BlkExport::start(cfg, Listen::UnixPath(socket.clone())).expect("export");

    // One buffer for every request.
    let mut client = Client::connect(&socket, QUEUES as i32, GIB + 4096).expect("connect");
    client.buf().fill(1);
    let buf = client.ptr(0);
    let before = anon_kib();
    // Samples the peak while the reads run (each takes far longer than a sample).
    let done = std::sync::atomic::AtomicBool::new(false);
    let peak = std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut peak = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(anon_kib());
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            peak.max(anon_kib())
        });
        for q in client.queues.iter_mut() {
            for i in 0..IN_FLIGHT {
                q.read(512, buf, GIB, i, ReqFlags::empty());
            }
        }
        for q in client.queues.iter_mut() {
            for (i, ret) in wait(q, IN_FLIGHT) {
                assert_eq!(ret, 0, "read {i}");
            }
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        sampler.join().expect("sampler")
    });
    let grown = peak.saturating_sub(before) / 1024;
    eprintln!(
        "anonymous memory grew by {grown} MiB at most during {} 1 GiB reads",
        QUEUES * IN_FLIGHT
    );
    assert!(
        grown < 64,
        "the daemon's memory grew by {grown} MiB while bouncing 1 GiB reads"
    );
    assert!(
        node.child(ChildRole::File)
            .map_or(0, |f| f.stats().bounced.get())
            >= (QUEUES * IN_FLIGHT) as u64,
        "the reads were not bounced"
    );
    // The data arrived (the image is sparse: zeroes over the 1s written before).
    assert!(client.buf()[..GIB].iter().all(|&b| b == 0));
    drop(client);
    drop(export);
}
