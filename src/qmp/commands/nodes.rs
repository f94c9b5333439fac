//! Commands on block nodes: `blockdev-add`, `blockdev-del`, `query-named-block-nodes`.

use std::os::unix::fs::MetadataExt;

use serde_json::{json, Value};
use strata_backend::{BlockError, ChildRole, DetectZeroes, Node, Options};

use crate::qmp::args::Args;
use crate::qmp::dispatch::Context;
use crate::qmp::protocol::QmpError;

/// `blockdev-add`: the options `--blockdev` takes, as a JSON object (BlockdevOptions, checked
/// against the schema before this runs).
pub fn blockdev_add(ctx: &Context<'_>, mut args: Args) -> Result<Value, QmpError> {
    let options = args.take_rest();
    args.finish()?;
    // The schema makes it optional (a child's may be generated); a node added by QMP needs it.
    if !options.contains_key("node-name") {
        return Err(crate::qmp::args::missing("node-name"));
    }
    let flat = Options::from_json(&Value::Object(options)).map_err(block_error)?;
    ctx.daemon
        .graph
        .blockdev_add(flat)
        .map_err(|e| ctx.daemon.explain_refusal(e))?;
    Ok(json!({}))
}

/// `blockdev-del`: removes a node added by `--blockdev` or `blockdev-add`, refused while an
/// export or another node uses it.
pub fn blockdev_del(ctx: &Context<'_>, mut args: Args) -> Result<Value, QmpError> {
    let name = args.str("node-name")?;
    args.finish()?;
    if ctx.daemon.exports.uses_node(&name) {
        return Err(QmpError::generic(format!("Node {name} is in use")));
    }
    ctx.daemon.graph.blockdev_del(&name).map_err(block_error)?;
    Ok(json!({}))
}

/// `query-named-block-nodes`: QEMU's BlockDeviceInfo of every node; with `flat=false` (the
/// default) each image also shows its backing image.
pub fn query_named_block_nodes(ctx: &Context<'_>, mut args: Args) -> Result<Value, QmpError> {
    let flat = args.opt_bool("flat")?.unwrap_or(false);
    args.finish()?;
    let nodes: Vec<Value> = ctx
        .daemon
        .graph
        .query()
        .into_iter()
        .filter_map(|info| ctx.daemon.graph.find(&info.name))
        .map(|node| device_info(&node, flat))
        .collect();
    Ok(Value::Array(nodes))
}

fn device_info(node: &Node, flat: bool) -> Value {
    let flags = node.flags();
    let mut depth = 0;
    let mut below = node.child(ChildRole::Backing).cloned();
    while let Some(b) = below {
        depth += 1;
        below = b.child(ChildRole::Backing).cloned();
    }
    let mut info = json!({
        "file": node.filename(),
        "node-name": node.name(),
        "ro": node.is_read_only(),
        "drv": node.driver_name(),
        "backing_file_depth": depth,
        "encrypted": false,
        "detect_zeroes": match flags.detect_zeroes {
            DetectZeroes::Off => "off",
            DetectZeroes::On => "on",
            DetectZeroes::Unmap => "unmap",
        },
        "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
        "write_threshold": 0,
        "cache": {
            "writeback": true,
            "direct": flags.cache_direct,
            "no-flush": flags.cache_no_flush,
        },
        "image": image_info(node, flat),
    });
    if let Some(backing) = node.child(ChildRole::Backing) {
        info["backing_file"] = json!(backing.filename());
    }
    info
}

/// QEMU's ImageInfo of `node` (and its backing chain unless `flat`).
fn image_info(node: &Node, flat: bool) -> Value {
    let filename = node.filename();
    let mut image = json!({
        "filename": filename,
        "format": node.driver_name(),
        "virtual-size": node.size(),
        "dirty-flag": false,
    });
    if let Ok(meta) = std::fs::metadata(&filename) {
        image["actual-size"] = json!(meta.blocks() * 512);
    }
    if let Some(backing) = node.child(ChildRole::Backing) {
        image["backing-filename"] = json!(backing.filename());
        if !flat {
            image["backing-image"] = image_info(backing, flat);
        }
    }
    image
}

/// A block-layer error as a `GenericError` with its message.
pub fn block_error(e: BlockError) -> QmpError {
    QmpError::generic(e.to_string())
}
