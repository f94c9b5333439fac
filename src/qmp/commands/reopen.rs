//! `blockdev-reopen`: nodes take a new set of options while they serve. Each entry is the
//! full option set of an existing node (an option left out goes back to its default, as in
//! QEMU); the flags `read-only`, `auto-read-only`, `cache.direct`, `cache.no-flush`,
//! `discard` and `detect-zeroes` may change, any other option must stay as it was. Every
//! listed node changes, or none (with the file children opened inline with a listed node,
//! which follow it as in QEMU): each is prepared (a node becoming read-only flushed, a file
//! opened again read-write or with O_DIRECT, its lock permissions taken) while the exports
//! above the nodes are paused, and only when all are ready are the changes applied.

use std::sync::Arc;

use serde_json::{json, Value};
use strata_backend::flags::keys;
use strata_backend::{block_on, ChildRole, Node, NodeFlags, Options};
use strata_vhost::BlkExport;

use super::nodes::block_error;
use super::resize::{pause_exports, uses};
use crate::qmp::args::{missing, wrong_type, Args};
use crate::qmp::dispatch::Context;
use crate::qmp::protocol::QmpError;

/// The options a reopen may change: the node's flags.
const CHANGEABLE: &[&str] = &[
    keys::READ_ONLY,
    keys::AUTO_READ_ONLY,
    keys::CACHE_DIRECT,
    keys::CACHE_NO_FLUSH,
    keys::DISCARD,
    keys::DETECT_ZEROES,
];

/// One node and the flags it is to take.
struct Change {
    node: Arc<Node>,
    flags: NodeFlags,
}

/// `blockdev-reopen`: `options` is a list of BlockdevOptions, one per node.
pub fn blockdev_reopen(ctx: &Context<'_>, mut args: Args) -> Result<Value, QmpError> {
    let mut rest = args.take_rest();
    args.finish()?;
    let options = rest.remove("options").ok_or_else(|| missing("options"))?;
    Args::new(rest).finish()?;
    let Value::Array(entries) = options else {
        return Err(wrong_type("options", "array"));
    };
    let mut changes: Vec<Change> = Vec::new();
    for (i, entry) in entries.into_iter().enumerate() {
        let change = parse_entry(ctx, i, entry)?;
        // A node listed twice takes its last entry (QSD 7.2 accepts a repeated node too).
        changes.retain(|c| !Arc::ptr_eq(&c.node, &change.node));
        changes.push(change);
    }
    add_inline_children(&mut changes);
    let mut result = Ok(());
    ctx.daemon
        .exports
        .with_each(|exports| result = reopen(exports, &changes));
    result.map_err(|e| QmpError::generic(explain(ctx, e)))?;
    Ok(json!({}))
}

/// The file child of a listed node that was opened with it (`file.filename=...`, not
/// `file=NODE`) and is not listed itself follows its parent, as QEMU's reopen queue takes it
/// along: read-only, cache.direct and cache.no-flush, unless the child sets them itself.
fn add_inline_children(changes: &mut Vec<Change>) {
    let mut i = 0;
    while i < changes.len() {
        let (parent, parent_flags) = (changes[i].node.clone(), changes[i].flags);
        i += 1;
        if parent.explicit_options().contains(ChildRole::File.key()) {
            continue;
        }
        let Some(child) = parent.child(ChildRole::File) else {
            continue;
        };
        if changes.iter().any(|c| Arc::ptr_eq(&c.node, child)) {
            continue;
        }
        let own = child.explicit_options();
        let mut flags = child.flags();
        if !own.contains(keys::READ_ONLY) {
            flags.read_only = parent_flags.read_only;
        }
        if !own.contains(keys::CACHE_DIRECT) {
            flags.cache_direct = parent_flags.cache_direct;
        }
        if !own.contains(keys::CACHE_NO_FLUSH) {
            flags.cache_no_flush = parent_flags.cache_no_flush;
        }
        changes.push(Change {
            node: child.clone(),
            flags,
        });
    }
}

/// A failed reopen's text; when the sandbox refused to open a file again, it says so.
fn explain(ctx: &Context<'_>, text: String) -> String {
    match &ctx.daemon.sandbox_dirs {
        Some(dirs) if text.contains("Permission denied") => {
            let dirs: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
            format!(
                "{text} (the sandbox lets the daemon write only the images it opened writable at \
                 start and those under --sandbox-allow-dir directories: {}; or run with \
                 --sandbox off)",
                if dirs.is_empty() {
                    "none given".to_string()
                } else {
                    dirs.join(", ")
                }
            )
        }
        _ => text,
    }
}

/// Checks entry `i` and finds its node: the same driver, no option changed but the flags.
fn parse_entry(ctx: &Context<'_>, i: usize, entry: Value) -> Result<Change, QmpError> {
    let Value::Object(map) = entry else {
        return Err(wrong_type(&format!("options[{i}]"), "object"));
    };
    if !map.contains_key(keys::DRIVER) {
        return Err(missing(&format!("options[{i}].driver")));
    }
    let mut new = Options::from_json(&Value::Object(map)).map_err(block_error)?;
    let name = new
        .take(keys::NODE_NAME)
        .ok_or_else(|| QmpError::generic("node-name not specified"))?;
    let node =
        ctx.daemon.graph.find(&name).ok_or_else(|| {
            QmpError::generic(format!("Failed to find node with node-name='{name}'"))
        })?;
    if new.get(keys::DRIVER) != Some(node.driver_name()) {
        return Err(cannot_change(keys::DRIVER));
    }
    let mut flag_options = Options::new();
    for key in CHANGEABLE {
        if let Some(value) = new.take(key) {
            flag_options.set(*key, value);
        }
    }
    let old = node.explicit_options();
    let old_keys = old
        .iter()
        .map(|(k, _)| k)
        .filter(|k| *k != keys::NODE_NAME && !CHANGEABLE.contains(k));
    for key in new.iter().map(|(k, _)| k).chain(old_keys) {
        if normalise(new.get(key)) != normalise(old.get(key)) {
            return Err(cannot_change(key));
        }
    }
    let flags = NodeFlags::take_from(&mut flag_options).map_err(block_error)?;
    Ok(Change { node, flags })
}

/// QEMU's text for an option a reopen cannot change.
fn cannot_change(key: &str) -> QmpError {
    QmpError::generic(format!("Cannot change the option '{key}'"))
}

/// An option's value with QEMU's boolean spellings made one (`on`, `true` and `yes` alike).
fn normalise(value: Option<&str>) -> Option<&str> {
    value.map(|v| match v {
        "on" | "true" | "yes" => "on",
        "off" | "false" | "no" => "off",
        other => other,
    })
}

/// Whether writes to `node` reach `target`: it is `target` or stores itself on it.
fn writes_to(node: &Node, target: &Node) -> bool {
    std::ptr::eq(node, target)
        || node
            .child(ChildRole::File)
            .is_some_and(|file| writes_to(file, target))
}

/// Pauses the exports above the nodes, prepares every node, then commits all (or aborts the
/// prepared ones when one fails).
fn reopen(exports: &[BlkExport], changes: &[Change]) -> Result<(), String> {
    let to_read_only = changes
        .iter()
        .filter(|c| c.flags.read_only && !c.node.is_read_only());
    for change in to_read_only {
        // QEMU's permission check: a writable export writes to its node and the file nodes
        // below (not to backing images, which it only reads).
        if let Some(e) = exports
            .iter()
            .find(|e| e.is_writable() && writes_to(e.node(), &change.node))
        {
            log::info!(
                "blockdev-reopen: node '{}' stays writable: export '{}' writes to it",
                change.node.name(),
                e.id()
            );
            return Err(format!(
                "Read-only block node '{}' cannot support read-write users",
                change.node.name()
            ));
        }
    }
    let affected: Vec<&BlkExport> = exports
        .iter()
        .filter(|e| changes.iter().any(|c| uses(e.node(), &c.node)))
        .collect();
    let pauses = pause_exports(&affected, "reopening");
    let mut prepared = 0;
    let mut failure = None;
    for change in changes {
        match block_on(change.node.reopen_prepare(&change.flags)).and_then(|r| r) {
            Ok(()) => prepared += 1,
            Err(e) => {
                failure = Some(e.to_string());
                break;
            }
        }
    }
    if failure.is_some() {
        changes[..prepared]
            .iter()
            .for_each(|c| c.node.reopen_abort());
    } else {
        changes.iter().for_each(|c| c.node.reopen_commit(&c.flags));
    }
    drop(pauses);
    failure.map_or(Ok(()), Err)
}
