//! Commands about the monitor itself: version, the command list, the schema.

use serde_json::{json, Value};

use crate::qmp::args::Args;
use crate::qmp::dispatch::{Context, COMMANDS};
use crate::qmp::protocol::{self, QmpError};
use crate::qmp::schema;

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

/// `query-qmp-schema`: QEMU's SchemaInfo of every command, event and type strata has.
pub fn query_qmp_schema(_: &Context<'_>, args: Args) -> Result<Value, QmpError> {
    args.finish()?;
    Ok(Value::Array(schema::introspect::schema_info()))
}
