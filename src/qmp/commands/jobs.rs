//! Commands on jobs: `query-jobs`, `job-cancel`, `job-pause`, `job-resume`, `job-complete`,
//! `job-finalize`, `job-dismiss`, the `JOB_STATUS_CHANGE` event, and `blockdev-create`
//! (BlockdevCreateOptions of QEMU 7.2 for `file` and `qcow2`, and strata's own for `raw`,
//! checked here and created by the driver registry's hooks on the job's thread).

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{json, Value};
use strata_backend::Options;

use crate::jobs::control::Listener;
use crate::jobs::create::{CreateJob, Target};
use crate::jobs::{JobOptions, Jobs};
use crate::qmp::args::{missing, wrong_type, Args};
use crate::qmp::dispatch::Context;
use crate::qmp::protocol::QmpError;
use crate::qmp::server::Clients;

/// Sends every job's state changes to every negotiated client as `JOB_STATUS_CHANGE`.
pub fn status_events(clients: Arc<Clients>) -> Listener {
    Arc::new(move |id, status| {
        clients.emit(
            "JOB_STATUS_CHANGE",
            json!({"id": id, "status": status.name()}),
        )
    })
}

/// `query-jobs`: every job, newest first.
pub fn query_jobs(ctx: &Context<'_>, args: Args) -> Result<Value, QmpError> {
    args.finish()?;
    let jobs = ctx.daemon.jobs.query().into_iter().map(|j| {
        let mut info = json!({
            "id": j.id,
            "type": j.job_type,
            "status": j.status.name(),
            "current-progress": j.current_progress,
            "total-progress": j.total_progress,
        });
        if let Some(error) = j.error {
            info["error"] = json!(error);
        }
        info
    });
    Ok(Value::Array(jobs.collect()))
}

/// A verb command: `{"id": ...}` applied with `verb`.
fn verb(
    ctx: &Context<'_>,
    mut args: Args,
    verb: fn(&Jobs, &str) -> Result<(), String>,
) -> Result<Value, QmpError> {
    let id = args.str("id")?;
    args.finish()?;
    verb(&ctx.daemon.jobs, &id).map_err(QmpError::generic)?;
    Ok(json!({}))
}

/// `job-cancel`.
pub fn job_cancel(ctx: &Context<'_>, args: Args) -> Result<Value, QmpError> {
    verb(ctx, args, Jobs::cancel)
}

/// `job-pause`.
pub fn job_pause(ctx: &Context<'_>, args: Args) -> Result<Value, QmpError> {
    verb(ctx, args, Jobs::pause)
}

/// `job-resume`.
pub fn job_resume(ctx: &Context<'_>, args: Args) -> Result<Value, QmpError> {
    verb(ctx, args, Jobs::resume)
}

/// `job-complete`.
pub fn job_complete(ctx: &Context<'_>, args: Args) -> Result<Value, QmpError> {
    verb(ctx, args, Jobs::complete)
}

/// `job-finalize`.
pub fn job_finalize(ctx: &Context<'_>, args: Args) -> Result<Value, QmpError> {
    verb(ctx, args, Jobs::finalize)
}

/// `job-dismiss`.
pub fn job_dismiss(ctx: &Context<'_>, args: Args) -> Result<Value, QmpError> {
    verb(ctx, args, Jobs::dismiss)
}

/// `blockdev-create`: `options` (checked against the schema before this runs) now, and creates the image in a job of type `create`
/// (created and dismissed as QEMU's are: auto-finalize, manual dismiss).
pub fn blockdev_create(ctx: &Context<'_>, mut args: Args) -> Result<Value, QmpError> {
    let mut rest = args.take_rest();
    args.finish()?;
    let options = rest.remove("options");
    let mut args = Args::new(rest);
    let job_id = args.str("job-id")?;
    args.finish()?;
    let options = match options {
        None => return Err(missing("options")),
        Some(Value::Object(map)) => map,
        Some(_) => return Err(wrong_type("options", "object")),
    };
    // Members are named as QEMU names them: `options.size`.
    let mut opts = Args::new(
        options
            .into_iter()
            .map(|(k, v)| (format!("options.{k}"), v))
            .collect(),
    );
    let driver = opts.str("options.driver")?;
    let job = match driver.as_str() {
        "file" => file_job(ctx, opts)?,
        "qcow2" => qcow2_job(ctx, opts)?,
        "raw" => raw_job(ctx, opts)?,
        "rbd" => {
            return Err(QmpError::generic(
                "strata's blockdev-create does not support driver 'rbd' (it creates file, \
                 qcow2 and raw)",
            ))
        }
        // The schema's other cases have no members: QEMU has no creation for them either.
        _ => return Err(QmpError::generic("Driver does not support blockdev-create")),
    };
    let options = JobOptions {
        id: job_id,
        auto_finalize: true,
        auto_dismiss: false,
    };
    ctx.daemon
        .jobs
        .start(options, Box::new(job))
        .map_err(QmpError::generic)?;
    Ok(json!({}))
}

/// An enum member: QEMU names it without the `options.` prefix when its value is unknown.
fn enum_member(opts: &mut Args, key: &str, values: &[&str]) -> Result<Option<String>, QmpError> {
    match opts.opt_str(&format!("options.{key}"))? {
        Some(v) if !values.contains(&v.as_str()) => Err(QmpError::generic(format!(
            "Parameter '{key}' does not accept value '{v}'"
        ))),
        other => Ok(other),
    }
}

const PREALLOCATION: &[&str] = &["off", "metadata", "falloc", "full"];

/// BlockdevCreateOptionsFile.
fn file_job(ctx: &Context<'_>, mut opts: Args) -> Result<CreateJob, QmpError> {
    let filename = opts.str("options.filename")?;
    let size = opts.u64("options.size")?;
    let mut hook = Options::new();
    if let Some(p) = enum_member(&mut opts, "preallocation", PREALLOCATION)? {
        hook.set("preallocation", p);
    }
    if let Some(nocow) = opts.opt_bool("options.nocow")? {
        hook.set("nocow", on_off(nocow));
    }
    if let Some(hint) = opts.opt_u64("options.extent-size-hint")? {
        hook.set("extent_size_hint", hint.to_string());
    }
    opts.finish()?;
    Ok(CreateJob {
        format: "file",
        target: Ok(Target::File(PathBuf::from(filename))),
        size,
        options: hook,
        sandbox_dirs: ctx.daemon.sandbox_dirs.clone(),
    })
}

/// BlockdevCreateOptionsQcow2, as qemu-img's `-o` keys for the qcow2 hook.
fn qcow2_job(ctx: &Context<'_>, mut opts: Args) -> Result<CreateJob, QmpError> {
    // data-file, data-file-raw and encrypt are not in strata's schema: refused as unexpected.
    let mut rest = opts.take_rest();
    let file = rest.remove("options.file");
    let mut opts = Args::new(rest);
    let size = opts.u64("options.size")?;
    let mut hook = Options::new();
    if let Some(v) = enum_member(&mut opts, "version", &["v2", "v3"])? {
        hook.set("compat", if v == "v2" { "0.10" } else { "1.1" });
    }
    for (member, key) in [
        ("cluster-size", "cluster_size"),
        ("refcount-bits", "refcount_bits"),
    ] {
        if let Some(n) = opts.opt_u64(&format!("options.{member}"))? {
            hook.set(key, n.to_string());
        }
    }
    for (member, key) in [
        ("lazy-refcounts", "lazy_refcounts"),
        ("extended-l2", "extended_l2"),
    ] {
        if let Some(b) = opts.opt_bool(&format!("options.{member}"))? {
            hook.set(key, on_off(b));
        }
    }
    if let Some(c) = enum_member(&mut opts, "compression-type", &["zlib", "zstd"])? {
        hook.set("compression_type", c);
    }
    if let Some(b) = opts.opt_str("options.backing-file")? {
        hook.set("backing_file", b);
    }
    if let Some(f) = opts.opt_str("options.backing-fmt")? {
        hook.set("backing_fmt", f);
    }
    if let Some(p) = enum_member(&mut opts, "preallocation", PREALLOCATION)? {
        hook.set("preallocation", p);
    }
    opts.finish()?;
    let target = match file {
        None => return Err(missing("options.file")),
        Some(file) => node_target(ctx, file)?,
    };
    let target = if size % 512 != 0 {
        Err("Image size must be a multiple of 512 bytes".to_string())
    } else {
        target
    };
    Ok(CreateJob {
        format: "qcow2",
        target,
        size,
        options: hook,
        sandbox_dirs: ctx.daemon.sandbox_dirs.clone(),
    })
}

/// BlockdevCreateOptionsRaw (strata's: QEMU 7.2 has no raw case): the `file` node becomes a
/// raw image of `size` bytes, so that a management tool creates raw images as it creates
/// qcow2 ones.
fn raw_job(ctx: &Context<'_>, mut opts: Args) -> Result<CreateJob, QmpError> {
    let mut rest = opts.take_rest();
    let file = rest.remove("options.file");
    let mut opts = Args::new(rest);
    let size = opts.u64("options.size")?;
    opts.finish()?;
    let target = match file {
        None => return Err(missing("options.file")),
        Some(file) => node_target(ctx, file)?,
    };
    Ok(CreateJob {
        format: "raw",
        target,
        size,
        options: Options::new(),
        sandbox_dirs: ctx.daemon.sandbox_dirs.clone(),
    })
}

/// The node an image is written onto: a node name, or a node defined inline (opened now,
/// closed when the job ends). A node that cannot be found, is used by another node or an
/// export, or cannot be opened fails the job (QEMU reports the first and last in the job).
fn node_target(ctx: &Context<'_>, file: Value) -> Result<Result<Target, String>, QmpError> {
    let node = match file {
        Value::String(name) => match ctx.daemon.graph.find(&name) {
            Some(node) => node,
            None => {
                return Ok(Err(format!(
                    "Cannot find device='{name}' nor node-name='{name}'"
                )))
            }
        },
        Value::Object(inline) => {
            let options = Options::from_json(&Value::Object(inline))
                .map_err(|e| QmpError::generic(e.to_string()))?;
            match ctx.daemon.graph.open(options) {
                Ok(node) => node,
                Err(e) => return Ok(Err(ctx.daemon.explain_text(e.to_string()))),
            }
        }
        _ => return Err(wrong_type("options.file", "BlockdevRef")),
    };
    let parents = node.parents();
    if !parents.is_empty() {
        let names: Vec<String> = parents.into_iter().map(|(_, p)| p).collect();
        return Ok(Err(format!(
            "Node '{}' is in use by node(s) {}; blockdev-create writes only onto a node nothing \
             else uses",
            node.name(),
            names.join(", ")
        )));
    }
    if ctx.daemon.exports.uses_node(node.name()) {
        return Ok(Err(format!(
            "Node '{}' is in use by an export; blockdev-create writes only onto a node nothing \
             else uses",
            node.name()
        )));
    }
    Ok(Ok(Target::Node(node)))
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}
