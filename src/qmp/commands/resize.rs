//! `block_resize`: a node changes size while only the exports that use it pause, and those
//! whose disk changed size tell their frontend at once.

use std::sync::Arc;

use serde_json::{json, Value};
use strata_backend::{block_on, Node};
use strata_vhost::{BlkExport, ExportPause};

use crate::qmp::args::Args;
use crate::qmp::dispatch::Context;
use crate::qmp::protocol::QmpError;

/// Whether `node` is `target` or lies below it (as its file, its backing image, ...).
pub(crate) fn uses(node: &Node, target: &Node) -> bool {
    std::ptr::eq(node, target) || node.children().iter().any(|c| uses(&c.node, target))
}

/// Pauses `exports` while their node changes (see [`BlkExport::pause`]); one still busy when
/// the drain timeout passes is warned about, and the `change` (a verb in -ing) goes on anyway.
pub(crate) fn pause_exports<'a>(exports: &[&'a BlkExport], change: &str) -> Vec<ExportPause<'a>> {
    exports
        .iter()
        .map(|e| {
            let (pause, drained) = e.pause();
            if !drained {
                log::warn!(
                    "export '{}': requests still in flight after the drain timeout; {change} \
                     anyway",
                    e.id()
                );
            }
            pause
        })
        .collect()
}

/// `block_resize` by `node-name` (strata has no named block backends, so `device` names
/// none). The exports whose node is the resized one or lies above it pause while it changes
/// (no new requests; those in flight complete first), as QEMU drains the node; the others go
/// on. The exports whose size changed then send a config-change notice, which
/// qemu-storage-daemon 7.2 does not do.
pub fn block_resize(ctx: &Context<'_>, mut args: Args) -> Result<Value, QmpError> {
    let device = args.opt_str("device")?;
    let node_name = args.opt_str("node-name")?;
    let size = args.int("size")?;
    args.finish()?;
    // QEMU's check and text.
    let size =
        u64::try_from(size).map_err(|_| QmpError::generic("Parameter 'size' expects a >0 size"))?;
    let node: Arc<Node> = node_name
        .as_deref()
        .and_then(|name| ctx.daemon.graph.find(name))
        .ok_or_else(|| {
            QmpError::generic(format!(
                "Cannot find device='{}' nor node-name='{}'",
                device.as_deref().unwrap_or(""),
                node_name.as_deref().unwrap_or("")
            ))
        })?;
    let mut result = Ok(());
    ctx.daemon.exports.with_each(|exports| {
        let affected: Vec<_> = exports.iter().filter(|e| uses(e.node(), &node)).collect();
        let before: Vec<u64> = affected.iter().map(|e| e.node().size()).collect();
        let pauses = pause_exports(&affected, "resizing");
        result = block_on(node.truncate(size)).and_then(|r| r);
        drop(pauses);
        for (e, old) in affected.iter().zip(before) {
            if e.node().size() != old {
                e.notify_resize();
            }
        }
    });
    result.map_err(|e| ctx.daemon.explain_refusal(e))?;
    Ok(json!({}))
}
