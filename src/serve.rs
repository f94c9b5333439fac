//! Running the daemon: qemu-storage-daemon style, or `strata serve IMAGE`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use strata::sandbox;
use strata_backend::driver::BackingPolicy;
use strata_backend::probe::{probe_format, PROBE_BUF_SIZE};
use strata_backend::{Graph, Options};
use strata_vhost::{BlkExport, BlkExportConfig, Listen, ListeningExport};

use crate::cli::{BackingArgs, DaemonArgs, Sandbox, ServeArgs};
use crate::daemon::Daemon;
use crate::export_options;
use crate::exports::Exports;
use crate::iothreads::IoThreads;
use crate::jobs::Jobs;
use crate::pidfile::{self, PidFile};
use crate::qmp::{self, Clients, ListeningMonitor};

/// Size of the image `strata serve` creates when none exists.
const DEFAULT_IMAGE_SIZE: u64 = 1 << 30;

/// `strata --blockdev ... --export ...`.
pub fn serve_qsd(args: DaemonArgs) -> Result<(), String> {
    let monitors = qmp::config::parse(&args.chardev, &args.monitor)?;
    if args.export.is_empty() && monitors.is_empty() {
        return Err("nothing to serve: give --export (with --blockdev) or --monitor, or use 'strata serve IMAGE'; see --help".into());
    }
    if !args.sandbox_allow_dir.is_empty() && (monitors.is_empty() || args.sandbox == Sandbox::Off) {
        return Err(
            "--sandbox-allow-dir is for QMP under the sandbox: give a --monitor, with --sandbox on"
                .into(),
        );
    }
    if let Some(path) = &args.pidfile {
        pidfile::check(path)?;
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
    export_options::check_distinct(&exports)?;
    let sandboxed_qmp = !monitors.is_empty() && args.sandbox == Sandbox::On;
    let daemon = Daemon {
        graph,
        iothreads,
        exports: Exports::default(),
        jobs: Jobs::default(),
        runtime_dir: if sandboxed_qmp {
            Some(RuntimeDir::create()?)
        } else {
            None
        },
        sandbox_dirs: sandboxed_qmp.then(|| args.sandbox_allow_dir.clone()),
    };
    let runtime_dir = daemon.runtime_dir.clone().map(RuntimeDir);
    let result = run(
        Arc::new(daemon),
        exports,
        monitors,
        args.pidfile.as_deref(),
        args.sandbox,
    );
    drop(runtime_dir);
    result
}

/// The directory where exports added by QMP make their private directories, so that the
/// sandbox can allow that there and nowhere else; removed at exit.
struct RuntimeDir(PathBuf);

impl RuntimeDir {
    fn create() -> Result<PathBuf, String> {
        use std::os::unix::fs::DirBuilderExt;
        let path = std::env::temp_dir().join(format!("strata-qmp-{}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| format!("Could not create {}: {e}", path.display()))?;
        Ok(path)
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            log::warn!("Could not remove {}: {e}", self.0.display());
        }
    }
}

/// `strata serve IMAGE --socket PATH`: the image is raw unless `--format` says otherwise, never
/// probed (its guest may have written any format's header into it).
pub fn serve_image(args: ServeArgs) -> Result<(), String> {
    if !args.image.exists() {
        if args.format != "raw" {
            return Err(format!(
                "{} does not exist ('serve' creates raw images only; see 'strata img create')",
                args.image.display()
            ));
        }
        create_default_image(&args.image)?;
        log::info!("created {} (1 GiB sparse raw image)", args.image.display());
    }
    let image = args.image.to_str().ok_or("image path is not valid UTF-8")?;
    let graph = Graph::with_backing_policy(backing_policy(&args.backing));
    let mut options = Options::new();
    options.set("node-name", "disk");
    options.set("driver", args.format.as_str());
    options.set("file.filename", image);
    options.set("cache.direct", if args.cached { "off" } else { "on" });
    if args.read_only {
        options.set("read-only", "on");
    }
    let node = graph
        .blockdev_add(options)
        .map_err(|e| format!("{image}: {e}"))?;
    if args.format == "raw" {
        warn_if_disguised(&args.image);
    }
    let mut config = BlkExportConfig::new("disk", node);
    config.writable = !args.read_only;
    config.num_queues = args.queues;
    config.logical_block_size = args.logical_block_size;
    print_qemu_hint(&args.socket, args.queues);
    let daemon = Daemon {
        graph,
        iothreads: IoThreads::default(),
        exports: Exports::default(),
        jobs: Jobs::default(),
        runtime_dir: None,
        sandbox_dirs: None,
    };
    run(
        Arc::new(daemon),
        vec![(config, Listen::UnixPath(args.socket.clone()))],
        Vec::new(),
        None,
        args.sandbox,
    )
}

/// Warns when a raw image starts like another format's image. It is still served as raw, its
/// bytes as they are (as QEMU does with an explicit `driver=raw`): its guest may have written
/// them, and opening them as that format could open the host files they name.
fn warn_if_disguised(image: &Path) {
    let mut head = Vec::with_capacity(PROBE_BUF_SIZE);
    let read = std::fs::File::open(image)
        .and_then(|f| f.take(PROBE_BUF_SIZE as u64).read_to_end(&mut head));
    if let Err(e) = read {
        log::debug!("could not read the start of {}: {e}", image.display());
        return;
    }
    if let Some(format) = probe_format(&head) {
        log::warn!(
            "{} looks like a {format} image; it is served as raw (its guest may have written \
             that header). Use --format {format} only for an image you trust",
            image.display()
        );
    }
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
         -chardev socket,id=c0,path={},reconnect=1 \
         -device vhost-user-blk-pci,chardev=c0,num-queues={queues} ...\n\
         (reconnect=1: QEMU reconnects after a restart of strata, and the guest sees a pause)",
        socket.display()
    );
}

/// Starts every export and monitor listening, writes the pidfile once they all do, enters the
/// sandbox (unless `--sandbox off`), starts serving and the monitors, then waits for
/// SIGTERM/SIGINT: cancel the jobs (waiting for them), stop, drain, flush, remove the sockets
/// and pidfile, exit.
fn run(
    daemon: Arc<Daemon>,
    configs: Vec<(BlkExportConfig, Listen)>,
    monitors: Vec<qmp::MonitorConfig>,
    pidfile: Option<&Path>,
    sandbox: Sandbox,
) -> Result<(), String> {
    let mut signals = Signals::new([SIGTERM, SIGINT])
        .map_err(|e| format!("Could not install signal handlers: {e}"))?;
    let mut listening = Vec::new();
    for (config, listen) in configs {
        let id = config.id.clone();
        let export =
            BlkExport::listen(config, listen).map_err(|e| format!("export '{id}': {e}"))?;
        listening.push(export);
    }
    let mut monitor_sockets = MonitorSockets(Vec::new());
    let mut listening_monitors = Vec::new();
    for config in monitors {
        let monitor = ListeningMonitor::listen(config)?;
        monitor_sockets
            .0
            .extend(monitor.socket_path().map(Path::to_path_buf));
        listening_monitors.push(monitor);
    }
    let pidfile = pidfile.map(PidFile::write).transpose()?;
    match sandbox {
        Sandbox::On => {
            let mut policy = sandbox_policy(&daemon.graph, &listening, pidfile.as_ref());
            policy
                .removed_files
                .extend(monitor_sockets.0.iter().cloned());
            if !listening_monitors.is_empty() {
                policy.qmp = Some(sandbox::QmpPolicy {
                    allowed_dirs: daemon.sandbox_dirs.clone().unwrap_or_default(),
                    runtime_dir: daemon.runtime_dir.clone(),
                });
            }
            // Connecting to a cluster needs files and calls the sandbox does not allow
            // (Landlock and the seccomp filter are fixed now): an rbd node added later, by
            // blockdev-add, must say so rather than fail on its configuration file.
            strata_backend::driver::refuse_rbd_opens(
                "new rbd nodes cannot connect once the sandbox is on (its rules are fixed at \
                 start): give the rbd node on the command line, or run with --sandbox off",
            );
            sandbox::enter(&policy)
                .map_err(|e| format!("sandbox: {e} (--sandbox off serves without it)"))?
        }
        Sandbox::Off => log::info!("sandbox: off"),
    }
    for export in listening {
        let id = export.id().to_string();
        let export = export.serve().map_err(|e| format!("export '{id}': {e}"))?;
        if daemon.exports.add(export).is_err() {
            return Err(format!("export '{id}': the id is used twice"));
        }
    }
    let clients = Arc::new(Clients::default());
    daemon
        .jobs
        .set_listener(qmp::commands::jobs::status_events(clients.clone()));
    for monitor in listening_monitors {
        monitor.serve(daemon.clone(), clients.clone())?;
    }
    if let Some(signal) = signals.forever().next() {
        log::info!("signal {signal}: stopping");
    }
    daemon.jobs.cancel_all_sync();
    let result = daemon.exports.stop_all();
    drop(monitor_sockets);
    drop(pidfile);
    close_nodes(daemon);
    result
}

/// How long closing the nodes at exit may take. librbd's close talks to the cluster (it
/// writes back its cache, releases the image's exclusive lock and watch), and with the
/// cluster down each of those waits for the request timeout (`rados_osd_op_timeout`).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Closes the nodes (drops the daemon's graph) on a thread of its own, waiting at most
/// [`CLOSE_TIMEOUT`]; past it, the daemon exits without them. By then every request has
/// completed (the exports drained, and librbd fails a request after its timeout), so only
/// the goodbyes are lost: the cluster drops this client's watch and lock when they time out.
fn close_nodes(daemon: Arc<Daemon>) {
    let (closed, wait) = mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("strata-close".into())
        .spawn(move || {
            drop(daemon);
            let _ = closed.send(());
        });
    if let Err(e) = spawned {
        // The closure, and the daemon with it, was dropped here.
        log::debug!("closed the nodes on the main thread: {e}");
        return;
    }
    if wait.recv_timeout(CLOSE_TIMEOUT).is_err() {
        log::warn!(
            "the nodes are still closing after {}s (an rbd cluster that does not answer?): \
             exiting without them",
            CLOSE_TIMEOUT.as_secs()
        );
    }
}

/// The monitors' socket files, removed at exit.
struct MonitorSockets(Vec<PathBuf>);

impl Drop for MonitorSockets {
    fn drop(&mut self) {
        for path in &self.0 {
            if let Err(e) = std::fs::remove_file(path) {
                log::warn!("Could not remove {}: {e}", path.display());
            }
        }
    }
}

/// What the sandboxed daemon may still reach: the files its nodes opened, and what it removes
/// at exit (sockets, private directories, the pidfile).
fn sandbox_policy(
    graph: &Graph,
    exports: &[ListeningExport],
    pidfile: Option<&PidFile>,
) -> sandbox::Policy {
    let images = graph
        .query()
        .into_iter()
        .filter(|node| FILE_DRIVERS.contains(&node.driver.as_str()))
        .map(|node| (PathBuf::from(node.filename), !node.read_only))
        .collect();
    let mut removed_files: Vec<PathBuf> = exports
        .iter()
        .filter_map(|e| e.socket_path().map(Path::to_path_buf))
        .collect();
    removed_files.extend(pidfile.map(|p| p.path().to_path_buf()));
    sandbox::Policy {
        images,
        removed_files,
        removed_dirs: exports
            .iter()
            .map(|e| e.private_dir().to_path_buf())
            .collect(),
        qmp: None,
        librbd: graph.query().iter().any(|node| node.driver == "rbd"),
    }
}

/// Drivers whose nodes open a file or device by name.
const FILE_DRIVERS: [&str; 2] = ["file", "host_device"];
