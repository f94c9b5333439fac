//! Commands about the monitor itself: version, the command list, the schema.

use serde_json::{json, Value};

use crate::qmp::args::Args;
use crate::qmp::dispatch::{Context, COMMANDS};
use crate::qmp::protocol::{self, QmpError};

/// Events strata emits.
const EVENTS: &[&str] = &["BLOCK_EXPORT_DELETED", "JOB_STATUS_CHANGE"];

/// `query-version`.
pub fn query_version(_: &Context<'_>, args: Args) -> Result<Value, QmpError> {
    args.finish()?;
    Ok(protocol::version())
}

/// `query-commands`: every command strata has.
pub fn query_commands(_: &Context<'_>, args: Args) -> Result<Value, QmpError> {
    args.finish()?;
    Ok(Value::Array(
        COMMANDS
            .iter()
            .map(|(name, _)| json!({"name": name}))
            .collect(),
    ))
}

/// `query-qmp-schema`, minimal: every command and event by name, their arguments and return
/// values typed as `any` (member-by-member types are not described yet).
pub fn query_qmp_schema(_: &Context<'_>, args: Args) -> Result<Value, QmpError> {
    args.finish()?;
    let mut schema: Vec<Value> = COMMANDS
        .iter()
        .map(|(name, _)| {
            json!({"name": name, "meta-type": "command", "arg-type": "any", "ret-type": "any"})
        })
        .collect();
    schema.extend(
        EVENTS
            .iter()
            .map(|name| json!({"name": name, "meta-type": "event", "arg-type": "any"})),
    );
    schema.push(json!({"name": "any", "meta-type": "builtin", "json-type": "value"}));
    Ok(Value::Array(schema))
}
