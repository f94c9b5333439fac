//! Running the daemon: qemu-storage-daemon style, or `strata serve IMAGE`.

use std::path::Path;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use strata_backend::driver::BackingPolicy;
use strata_backend::{Graph, Options};
use strata_vhost::{BlkExport, BlkExportConfig, Listen};

use crate::cli::{BackingArgs, DaemonArgs, ServeArgs};
use crate::export_options;
use crate::iothreads::IoThreads;

/// Size of the image `strata serve` creates when none exists.
const DEFAULT_IMAGE_SIZE: u64 = 1 << 30;

/// `strata --blockdev ... --export ...`.
pub fn serve_qsd(args: DaemonArgs) -> Result<(), String> {
    if !args.monitor.is_empty() || !args.chardev.is_empty() {
        return Err("--monitor/--chardev (QMP) are not available yet".into());
    }
    if args.export.is_empty() {
        return Err("nothing to serve: give --export (with --blockdev), or use 'strata serve IMAGE'; see --help".into());
    }
    let mut iothreads = IoThreads::default();
    for text in &args.object {
        iothreads
            .add(text)
            .map_err(|e| format!("--object {text}: {e}"))?;
    }
    let graph = Graph::with_backing_policy(backing_policy(&args.backing));
    for text in &args.blockdev {
        let options =
            Options::parse(text, Some("driver")).map_err(|e| format!("--blockdev {text}: {e}"))?;
        graph
            .blockdev_add(options)
            .map_err(|e| format!("--blockdev {text}: {e}"))?;
    }
    let mut exports = Vec::new();
    for text in &args.export {
        exports.push(
            export_options::parse(text, &graph, &iothreads)
                .map_err(|e| format!("--export {text}: {e}"))?,
        );
    }
    if let Some(pidfile) = &args.pidfile {
        std::fs::write(pidfile, format!("{}\n", std::process::id()))
            .map_err(|e| format!("Could not write pidfile '{}': {e}", pidfile.display()))?;
    }
    run(exports)
}

/// `strata serve IMAGE --socket PATH`.
pub fn serve_image(args: ServeArgs) -> Result<(), String> {
    let mut format = args.format.clone();
    if !args.image.exists() {
        create_default_image(&args.image)?;
        format.get_or_insert_with(|| "raw".to_string());
        log::info!("created {} (1 GiB sparse raw image)", args.image.display());
    }
    let image = args.image.to_str().ok_or("image path is not valid UTF-8")?;
    let graph = Graph::with_backing_policy(backing_policy(&args.backing));
    let mut options = Options::new();
    options.set("node-name", "disk");
    options.set("file.filename", image);
    options.set("cache.direct", if args.cached { "off" } else { "on" });
    if let Some(format) = &format {
        options.set("driver", format.as_str());
    }
    if args.read_only {
        options.set("read-only", "on");
    }
    let node = graph
        .blockdev_add(options)
        .map_err(|e| format!("{image}: {e}"))?;
    let mut config = BlkExportConfig::new("disk", node);
    config.writable = !args.read_only;
    config.num_queues = args.queues;
    config.logical_block_size = args.logical_block_size;
    print_qemu_hint(&args.socket, args.queues);
    run(vec![(config, Listen::UnixPath(args.socket.clone()))])
}

/// Creates the sparse raw image `serve` uses when none exists; never replaces a file that
/// appeared meanwhile (create-new).
fn create_default_image(path: &Path) -> Result<(), String> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| format!("Could not create '{}': {e}", path.display()))?;
    file.set_len(DEFAULT_IMAGE_SIZE)
        .map_err(|e| format!("Could not resize '{}': {e}", path.display()))
}

/// The backing-file policy the command line asks for.
fn backing_policy(args: &BackingArgs) -> BackingPolicy {
    BackingPolicy {
        trust_images: args.trust_backing_names,
        allowed_dirs: args.allow_backing_dir.clone(),
    }
}

fn print_qemu_hint(socket: &Path, queues: u16) {
    let socket = std::fs::canonicalize(
        socket
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new(".")),
    )
    .map(|dir| dir.join(socket.file_name().unwrap_or_default()))
    .unwrap_or_else(|_| socket.to_path_buf());
    println!(
        "Attach a VM with:\n  qemu-system-x86_64 -m 1G \
         -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \
         -chardev socket,id=c0,path={} \
         -device vhost-user-blk-pci,chardev=c0,num-queues={queues} ...",
        socket.display()
    );
}

/// Starts every export, then waits for SIGTERM/SIGINT: stop, drain, flush, exit 0.
fn run(configs: Vec<(BlkExportConfig, Listen)>) -> Result<(), String> {
    let mut signals = Signals::new([SIGTERM, SIGINT])
        .map_err(|e| format!("Could not install signal handlers: {e}"))?;
    let mut exports = Vec::new();
    for (config, listen) in configs {
        let id = config.id.clone();
        let export = BlkExport::start(config, listen).map_err(|e| format!("export '{id}': {e}"))?;
        exports.push(export);
    }
    if let Some(signal) = signals.forever().next() {
        log::info!("signal {signal}: stopping");
    }
    for export in &exports {
        export.stop();
    }
    let mut result = Ok(());
    for export in exports {
        let id = export.id().to_string();
        if let Err(e) = export.join() {
            result = Err(format!("export '{id}': {e}"));
        }
    }
    result
}
