//! The command table: each command's name and handler, run on the monitor's thread.

use serde_json::{json, Map, Value};

use super::args::Args;
use super::commands::{control, exports, iothread, jobs, nodes, reopen, resize, stats};
use super::protocol::QmpError;
use super::server::Clients;
use crate::daemon::Daemon;

/// What a command works on: the daemon, and the clients its events go to.
pub struct Context<'a> {
    /// The daemon's nodes, exports and settings.
    pub daemon: &'a Daemon,
    /// Every client that receives events.
    pub clients: &'a Clients,
}

/// A command: its arguments have been checked against its schema ([`super::schema`]); it
/// takes each (ending with [`Args::finish`]) before it acts.
type Handler = fn(&Context<'_>, Args) -> Result<Value, QmpError>;

/// Every command after negotiation, in the order `query-commands` lists them.
pub const COMMANDS: &[(&str, Handler)] = &[
    // Listed for query-commands; the server answers it (see `negotiate`).
    ("qmp_capabilities", |_, args| {
        args.finish().map(|()| json!({}))
    }),
    ("query-version", control::query_version),
    ("query-commands", control::query_commands),
    ("query-qmp-schema", control::query_qmp_schema),
    ("blockdev-add", nodes::blockdev_add),
    ("blockdev-del", nodes::blockdev_del),
    ("query-named-block-nodes", nodes::query_named_block_nodes),
    ("blockdev-reopen", reopen::blockdev_reopen),
    ("x-blockdev-set-iothread", iothread::x_blockdev_set_iothread),
    ("block_resize", resize::block_resize),
    ("block-export-add", exports::block_export_add),
    ("block-export-del", exports::block_export_del),
    ("query-block-exports", exports::query_block_exports),
    ("blockdev-create", jobs::blockdev_create),
    ("query-jobs", jobs::query_jobs),
    ("job-cancel", jobs::job_cancel),
    ("job-pause", jobs::job_pause),
    ("job-resume", jobs::job_resume),
    ("job-complete", jobs::job_complete),
    ("job-finalize", jobs::job_finalize),
    ("job-dismiss", jobs::job_dismiss),
    ("query-blockstats", stats::query_blockstats),
    (
        "block-latency-histogram-set",
        stats::block_latency_histogram_set,
    ),
];

/// `qmp_capabilities` before negotiation: strata offers no capability to enable.
pub fn negotiate(mut arguments: Map<String, Value>) -> Result<Value, QmpError> {
    if let Some(enable) = arguments.remove("enable") {
        let Value::Array(caps) = enable else {
            return Err(super::args::wrong_type("enable", "array"));
        };
        if let Some(cap) = caps.first() {
            return Err(QmpError::generic(format!(
                "Parameter 'enable' does not accept value {cap}"
            )));
        }
    }
    Args::new(arguments).finish()?;
    Ok(json!({}))
}

/// Runs command `name` with `arguments`, once they match the command's schema.
pub fn execute(
    ctx: &Context<'_>,
    name: &str,
    arguments: Map<String, Value>,
) -> Result<Value, QmpError> {
    let (_, handler) = COMMANDS.iter().find(|(n, _)| *n == name).ok_or_else(|| {
        QmpError::command_not_found(format!("The command {name} has not been found"))
    })?;
    super::schema::check_arguments(name, &arguments)?;
    handler(ctx, Args::new(arguments))
}
