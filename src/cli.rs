//! Command-line syntax: qemu-storage-daemon's options, plus `serve` and `img` subcommands.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// A vhost-user-blk storage daemon: QEMU's block layer command line, served to VMs.
#[derive(Parser, Debug)]
#[command(
    name = "strata",
    version,
    args_conflicts_with_subcommands = true,
    after_help = "Examples:\n  \
        strata serve disk.img --socket /run/vm.sock --queues 4\n  \
        strata --blockdev driver=file,node-name=f0,filename=disk.img,cache.direct=on \\\n         \
        --blockdev driver=raw,node-name=d0,file=f0 \\\n         \
        --export type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path=/run/vm.sock,writable=on\n  \
        strata img create -f raw disk.img 10G"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

/// qemu-storage-daemon's options.
#[derive(Args, Debug, Default)]
pub struct DaemonArgs {
    /// A block node: driver=...,node-name=...[,...] or a JSON object (repeatable).
    #[arg(long, value_name = "OPTIONS")]
    pub blockdev: Vec<String>,
    /// An export: type=vhost-user-blk,id=...,node-name=...,addr.type=unix,addr.path=... (repeatable).
    #[arg(long, value_name = "OPTIONS")]
    pub export: Vec<String>,
    /// An object: `iothread,id=...[,poll-max-ns=...]`; an export with `iothread=ID` polls as it
    /// says (strata runs a worker per queue whatever the iothread).
    #[arg(long, value_name = "OPTIONS")]
    pub object: Vec<String>,
    /// A QMP monitor: chardev=ID[,pretty=on] (repeatable).
    #[arg(long, value_name = "OPTIONS")]
    pub monitor: Vec<String>,
    /// A monitor's socket: socket,id=ID,path=PATH,server=on,wait=off (or fd=N for an
    /// inherited listening socket) (repeatable).
    #[arg(long, value_name = "OPTIONS")]
    pub chardev: Vec<String>,
    /// With a monitor and the sandbox on: a directory where QMP commands may open images and
    /// create export sockets at run time (repeatable; without it they can use none).
    #[arg(long, value_name = "DIR")]
    pub sandbox_allow_dir: Vec<PathBuf>,
    /// Write the daemon's PID to this file once every export listens; the file is locked while
    /// the daemon runs (a second daemon with it refuses to start), never written through a
    /// symbolic link, and removed at exit.
    #[arg(long, value_name = "FILE")]
    pub pidfile: Option<PathBuf>,
    #[command(flatten)]
    pub backing: BackingArgs,
    /// Confine the daemon once its exports listen: Landlock and a seccomp filter.
    #[arg(long, value_enum, default_value_t = Sandbox::On)]
    pub sandbox: Sandbox,
}

/// `--sandbox on|off`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Sandbox {
    /// Landlock limits the filesystem to the images and what the daemon removes at exit, and
    /// a seccomp filter allows only the system calls serving needs.
    #[default]
    On,
    /// No confinement beyond the user's own permissions.
    Off,
}

/// Which backing files images may name (strata's own options; QEMU follows any name).
#[derive(Args, Debug, Default)]
pub struct BackingArgs {
    /// Let images name backing files under DIR too (besides their top image's directory).
    #[arg(long, value_name = "DIR")]
    pub allow_backing_dir: Vec<PathBuf>,
    /// Follow backing file names in images as QEMU does (any path, protocols, json:, probed
    /// formats). Only for images you trust.
    #[arg(long)]
    pub trust_backing_names: bool,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve one image over vhost-user-blk, as raw unless --format says otherwise (creates a
    /// 1 GiB raw image if it does not exist).
    Serve(ServeArgs),
    /// Image tools.
    #[command(subcommand)]
    Img(ImgCommand),
}

/// `strata serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Image to serve; created as a 1 GiB sparse raw image if missing.
    #[arg(default_value = "strata-disk.img")]
    pub image: PathBuf,
    /// vhost-user socket path.
    #[arg(long, default_value = "strata.sock")]
    pub socket: PathBuf,
    /// Number of virtqueues (one worker thread each).
    #[arg(long, default_value_t = 1)]
    pub queues: u16,
    /// Export read-only.
    #[arg(long)]
    pub read_only: bool,
    /// Image format. Never probed: a guest can write any format's header into its disk, so
    /// give `--format qcow2` only for an image you trust.
    #[arg(long, default_value = "raw")]
    pub format: String,
    /// Logical block size reported to the guest.
    #[arg(long, default_value_t = 512)]
    pub logical_block_size: u32,
    /// Use the host page cache instead of O_DIRECT.
    #[arg(long)]
    pub cached: bool,
    #[command(flatten)]
    pub backing: BackingArgs,
    /// Confine the daemon once it listens: Landlock and a seccomp filter.
    #[arg(long, value_enum, default_value_t = Sandbox::On)]
    pub sandbox: Sandbox,
}

/// `strata img ...`.
#[derive(Subcommand, Debug)]
pub enum ImgCommand {
    /// Create an image: strata img create -f qcow2 [-b BACKING -F FMT] [-o OPTS] FILE [SIZE].
    Create(ImgCreateArgs),
    /// Show an image's format, sizes and backing chain.
    Info(ImgInfoArgs),
    /// Check a qcow2 image's metadata for consistency (and repair it with -r).
    Check(ImgCheckArgs),
}

/// `strata img create`.
#[derive(Args, Debug)]
pub struct ImgCreateArgs {
    /// Image format (raw or qcow2).
    #[arg(short = 'f', long = "format", default_value = "raw")]
    pub format: String,
    /// Backing file (qcow2); a relative name is relative to the new image's directory.
    #[arg(short = 'b', long = "backing")]
    pub backing: Option<String>,
    /// Format of the backing file.
    #[arg(short = 'F', long = "backing-format")]
    pub backing_format: Option<String>,
    /// Format options: cluster_size=, compat=0.10|1.1, lazy_refcounts=on|off,
    /// compression_type=zlib|zstd, refcount_bits=, extended_l2=on|off (repeatable).
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Do not open the backing file (the size must then be given).
    #[arg(short = 'u')]
    pub unsafe_backing: bool,
    /// Quiet: print nothing on success.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// File to create (an existing file is truncated, as qemu-img does).
    pub file: PathBuf,
    /// Virtual size, with an optional K/M/G/T/P/E suffix (default: the backing file's size).
    pub size: Option<String>,
}

/// Output formats of `img info` and `img check`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OutputFormat {
    /// Text for people.
    #[default]
    Human,
    /// JSON, as qemu-img prints it.
    Json,
}

/// `strata img info`.
#[derive(Args, Debug)]
pub struct ImgInfoArgs {
    /// Image format (probed when omitted).
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Output format.
    #[arg(long = "output", value_enum, default_value_t = OutputFormat::Human)]
    pub output: OutputFormat,
    /// Show every image of the backing chain, not only the top one.
    #[arg(long = "backing-chain")]
    pub backing_chain: bool,
    /// Image file.
    pub file: PathBuf,
}

/// What `img check -r` repairs.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepairMode {
    /// Leaked clusters only.
    Leaks,
    /// Leaks and errors.
    All,
}

/// `strata img check`.
#[derive(Args, Debug)]
pub struct ImgCheckArgs {
    /// Image format (probed when omitted; only qcow2 has checks).
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Repair: leaks or all.
    #[arg(short = 'r', value_enum)]
    pub repair: Option<RepairMode>,
    /// Output format.
    #[arg(long = "output", value_enum, default_value_t = OutputFormat::Human)]
    pub output: OutputFormat,
    /// Quiet: print nothing (the exit code tells).
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Image file.
    pub file: PathBuf,
}
