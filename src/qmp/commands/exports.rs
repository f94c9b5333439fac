//! Commands on exports: `block-export-add`, `block-export-del`, `query-block-exports`.

use serde_json::{json, Value};
use strata_backend::Options;
use strata_vhost::BlkExport;

use crate::export_options;
use crate::exports::{RemoveError, RemoveMode};
use crate::qmp::args::Args;
use crate::qmp::dispatch::Context;
use crate::qmp::protocol::QmpError;

/// `block-export-add`: a vhost-user-blk export with every option `--export` takes
/// (BlockExportOptions, checked against the schema before this runs).
pub fn block_export_add(ctx: &Context<'_>, mut args: Args) -> Result<Value, QmpError> {
    let mut options = args.take_rest();
    args.finish()?;
    // QEMU's fixed-iothread only matters with several iothreads; strata's workers are per queue.
    options.remove("fixed-iothread");
    let id = options["id"].as_str().unwrap_or_default().to_string();
    if ctx.daemon.exports.contains(&id) {
        return Err(QmpError::generic(format!(
            "Block export id '{id}' is already in use"
        )));
    }
    let flat = Options::from_json(&Value::Object(options))
        .map_err(|e| QmpError::generic(e.to_string()))?;
    let (mut config, listen) =
        export_options::from_options(flat, &ctx.daemon.graph, &ctx.daemon.iothreads)
            .map_err(QmpError::generic)?;
    config.private_dir_parent = ctx.daemon.runtime_dir.clone();
    let export = BlkExport::start(config, listen)
        .map_err(|e| QmpError::generic(ctx.daemon.explain_text(e.to_string())))?;
    if let Err(export) = ctx.daemon.exports.add(export) {
        // Added by another monitor meanwhile.
        drop(export);
        return Err(QmpError::generic(format!(
            "Block export id '{id}' is already in use"
        )));
    }
    Ok(json!({}))
}

/// `block-export-del`: stops an export (`mode=safe`, the default, refuses while a frontend is
/// connected; `hard` disconnects it), then emits `BLOCK_EXPORT_DELETED`. strata's export is
/// gone when this returns (its requests drained, its node flushed).
pub fn block_export_del(ctx: &Context<'_>, mut args: Args) -> Result<Value, QmpError> {
    let id = args.str("id")?;
    let mode = match args.opt_enum("mode", &["safe", "hard"])?.as_deref() {
        Some("hard") => RemoveMode::Hard,
        _ => RemoveMode::Safe,
    };
    args.finish()?;
    let result = ctx.daemon.exports.remove(&id, mode);
    match result {
        Err(RemoveError::NotFound) => {
            return Err(QmpError::generic(format!("Export '{id}' is not found")))
        }
        Err(RemoveError::InUse) => {
            return Err(QmpError::generic(format!(
                "export '{id}' still in use (a frontend is connected; mode=hard disconnects it)"
            )))
        }
        Err(RemoveError::Stopped(e)) => log::error!("export '{id}' stopped with an error: {e}"),
        Ok(()) => {}
    }
    ctx.clients.emit("BLOCK_EXPORT_DELETED", json!({"id": id}));
    Ok(json!({}))
}

/// `query-block-exports`.
pub fn query_block_exports(ctx: &Context<'_>, args: Args) -> Result<Value, QmpError> {
    args.finish()?;
    let mut list = Vec::new();
    ctx.daemon.exports.for_each(|e| {
        list.push(json!({
            "type": "vhost-user-blk",
            "id": e.id(),
            "node-name": e.node().name(),
            "shutting-down": false,
        }));
    });
    Ok(Value::Array(list))
}
