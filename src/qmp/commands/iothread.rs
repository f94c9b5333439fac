//! `x-blockdev-set-iothread`: accepted where qemu-storage-daemon 7.2 accepts it. In QEMU it
//! moves a node (and the nodes around it) to another iothread's AioContext. strata has no
//! AioContexts: every export runs one worker thread per queue, which serves the nodes below
//! it whatever iothread they were given, so the command checks what QEMU checks (the node and
//! the iothread exist; a node an export serves is moved only with `force`) and changes
//! nothing: requests keep running on the export's workers, with the `poll-max-ns` the export
//! took when it was added.

use serde_json::{json, Value};

use crate::qmp::args::{wrong_type, Args};
use crate::qmp::dispatch::Context;
use crate::qmp::protocol::QmpError;

/// `x-blockdev-set-iothread`: `node-name`, `iothread` (an id, or null for the main loop),
/// `force`.
pub fn x_blockdev_set_iothread(ctx: &Context<'_>, mut args: Args) -> Result<Value, QmpError> {
    let name = args.str("node-name")?;
    let force = args.opt_bool("force")?.unwrap_or(false);
    let mut rest = args.take_rest();
    let iothread = match rest.remove("iothread") {
        None => return Err(crate::qmp::args::missing("iothread")),
        Some(Value::Null) => None,
        Some(Value::String(id)) => Some(id),
        Some(_) => return Err(wrong_type("iothread", "StrOrNull")),
    };
    Args::new(rest).finish()?;
    let node =
        ctx.daemon.graph.find(&name).ok_or_else(|| {
            QmpError::generic(format!("Failed to find node with node-name='{name}'"))
        })?;
    if let Some(id) = &iothread {
        ctx.daemon
            .iothreads
            .poll_max_ns(id)
            .map_err(|_| QmpError::generic(format!("Cannot find iothread {id}")))?;
    }
    // QEMU refuses a node a block backend (here: an export) is attached to, unless forced.
    let mut exported = false;
    ctx.daemon
        .exports
        .for_each(|e| exported |= std::sync::Arc::ptr_eq(e.node(), &node));
    if exported && !force {
        return Err(QmpError::generic(format!(
            "Node {name} is associated with a BlockBackend and could be in use (use \
             force=true to override this check)"
        )));
    }
    log::info!(
        "x-blockdev-set-iothread: node '{name}' to {}: strata's exports serve it on their own \
         workers, nothing moves",
        iothread.as_deref().unwrap_or("the main loop")
    );
    Ok(json!({}))
}
