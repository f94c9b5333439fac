//! Serves one image file over vhost-user-blk, for trying the device by hand (with QEMU or a
//! benchmark) without the daemon's command line:
//!
//!     cargo run --release -p strata-vhost --example serve -- IMAGE SOCKET [QUEUES] [LBS] [ro]
//!
//! The image is opened raw with cache.direct=on; Ctrl-C stops the export.

use std::sync::Arc;

use strata_backend::{Graph, Options};
use strata_vhost::{BlkExport, BlkExportConfig, Listen};

struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Info
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            eprintln!("[{}] {}", r.level(), r.args());
        }
    }
    fn flush(&self) {}
}

fn main() -> Result<(), String> {
    log::set_logger(&StderrLogger).map_err(|e| e.to_string())?;
    log::set_max_level(log::LevelFilter::Info);
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [image, socket, rest @ ..] = args.as_slice() else {
        return Err("usage: serve IMAGE SOCKET [QUEUES] [LBS] [ro]".into());
    };
    let queues = rest
        .first()
        .map_or(Ok(1), |q| q.parse())
        .map_err(|e| format!("{e}"))?;
    let lbs = rest
        .get(1)
        .map_or(Ok(512), |q| q.parse())
        .map_err(|e| format!("{e}"))?;
    let writable = rest.get(2).is_none_or(|s| s != "ro");
    let opts = Options::parse(
        &format!("driver=raw,file.driver=file,file.filename={image},cache.direct=on,discard=unmap"),
        None,
    )
    .map_err(|e| e.to_string())?;
    let node = Graph::new().open(opts).map_err(|e| e.to_string())?;
    let mut config = BlkExportConfig::new("serve", node);
    config.writable = writable;
    config.num_queues = queues;
    config.logical_block_size = lbs;
    // Block SIGINT/SIGTERM before any thread starts (threads inherit the mask), then wait for
    // one with sigwait.
    // SAFETY: plain libc signal-set calls on a local, initialised sigset_t.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let export = Arc::new(
        BlkExport::start(config, Listen::UnixPath(socket.into())).map_err(|e| e.to_string())?,
    );
    let mut sig = 0;
    // SAFETY: `set` is an initialised signal set and `sig` a local int for the result.
    unsafe { libc::sigwait(&set, &mut sig) };
    eprintln!("signal {sig}: stopping");
    export.stop();
    Arc::try_unwrap(export)
        .map_err(|_| "export still shared".to_string())?
        .join()
        .map_err(|e| e.to_string())
}
