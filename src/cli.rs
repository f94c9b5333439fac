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
    /// A QMP monitor (not available yet; strata refuses it rather than ignoring it).
    #[arg(long, value_name = "OPTIONS")]
    pub monitor: Vec<String>,
    /// A chardev for the monitor (not available yet).
    #[arg(long, value_name = "OPTIONS")]
    pub chardev: Vec<String>,
    /// Write the daemon's PID to this file.
    #[arg(long, value_name = "FILE")]
    pub pidfile: Option<PathBuf>,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve one image over vhost-user-blk (creates a 1 GiB raw image if it does not exist).
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
    /// Image format (probed when omitted).
    #[arg(long)]
    pub format: Option<String>,
    /// Logical block size reported to the guest.
    #[arg(long, default_value_t = 512)]
    pub logical_block_size: u32,
    /// Use the host page cache instead of O_DIRECT.
    #[arg(long)]
    pub cached: bool,
}

/// `strata img ...`.
#[derive(Subcommand, Debug)]
pub enum ImgCommand {
    /// Create an image: strata img create -f raw FILE SIZE.
    Create(ImgCreateArgs),
}

/// `strata img create`.
#[derive(Args, Debug)]
pub struct ImgCreateArgs {
    /// Image format.
    #[arg(short = 'f', long = "format", default_value = "raw")]
    pub format: String,
    /// File to create (an existing file is truncated, as qemu-img does).
    pub file: PathBuf,
    /// Virtual size, with an optional K/M/G/T/P/E suffix.
    pub size: String,
}
