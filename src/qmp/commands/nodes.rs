//! Commands on block nodes: `blockdev-add`, `blockdev-del`, `query-named-block-nodes`.

use std::os::unix::fs::MetadataExt;

use serde_json::{json, Map, Value};
use strata_backend::{BlockError, ChildRole, DetectZeroes, Node, Options};

use crate::qmp::args::{wrong_type, Args};
use crate::qmp::dispatch::Context;
use crate::qmp::protocol::QmpError;

/// The JSON type each option of every driver takes (the same options as `--blockdev`); an
/// option not listed here is left for the driver, which refuses what it does not know.
fn option_type(key: &str) -> Option<&'static str> {
    Some(match key {
        "read-only" | "auto-read-only" | "direct" | "no-flush" | "share-rw" | "read-zeroes"
        | "force-share" => "boolean",
        "size"
        | "offset"
        | "latency-ns"
        | "l2-cache-size"
        | "refcount-cache-size"
        | "cache-size"
        | "l2-cache-entry-size" => "integer",
        "driver" | "node-name" | "filename" | "aio" | "locking" | "discard" | "detect-zeroes" => {
            "string"
        }
        "cache" => "object",
        _ => return None,
    })
}

/// Checks the JSON types of `options` (recursing into inline children), naming the member by
/// its dotted path as QEMU does.
fn check_option_types(prefix: &str, options: &Map<String, Value>) -> Result<(), QmpError> {
    for (key, value) in options {
        let path = format!("{prefix}{key}");
        if matches!(key.as_str(), "file" | "backing") {
            match value {
                Value::Object(child) => check_option_types(&format!("{path}."), child)?,
                Value::String(_) => {}
                Value::Null if key == "backing" => {}
                _ => return Err(wrong_type(&path, "BlockdevRef")),
            }
            continue;
        }
        let matches = match option_type(key) {
            Some("boolean") => value.is_boolean(),
            Some("integer") => value.is_u64(),
            Some("string") => value.is_string(),
            Some(_) => match value {
                Value::Object(inner) => {
                    check_option_types(&format!("{path}."), inner)?;
                    true
                }
                _ => false,
            },
            None => true,
        };
        if !matches {
            return Err(wrong_type(&path, option_type(key).unwrap_or("value")));
        }
    }
    Ok(())
}

/// `blockdev-add`: the options `--blockdev` takes, as a JSON object.
pub fn blockdev_add(ctx: &Context<'_>, mut args: Args) -> Result<Value, QmpError> {
    let options = args.take_rest();
    args.finish()?;
    if !options.contains_key("driver") {
        return Err(crate::qmp::args::missing("driver"));
    }
    if !options.contains_key("node-name") {
        return Err(crate::qmp::args::missing("node-name"));
    }
    check_option_types("", &options)?;
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
