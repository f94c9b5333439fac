//! A JSON value checked against a schema type, with the texts of QEMU's QObject input visitor:
//! members are visited in the schema's order, so the first bad one is the one QEMU names.
//! Most texts name a member by its full path (`file.cache.direct`, `server[0].port`); an
//! enum's unknown value, an integer out of range and an alternate of the wrong type name only
//! the member, as QEMU does.

use serde_json::{Map, Value};

use super::{find_type, Kind, Member};
use crate::qmp::args::{missing, wrong_type};
use crate::qmp::protocol::QmpError;

/// Checks `value`, found at `full` (its own member name: `bare`), against type `ty`.
pub fn check(ty: &str, value: &Value, full: &str, bare: &str) -> Result<(), QmpError> {
    if let Some(element) = ty.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
        let Value::Array(items) = value else {
            return Err(wrong_type(full, "array"));
        };
        for (i, item) in items.iter().enumerate() {
            let at = format!("{full}[{i}]");
            check(element, item, &at, &at)?;
        }
        return Ok(());
    }
    let (ok, expected) = match ty {
        "str" => (value.is_string(), "string"),
        "bool" => (value.is_boolean(), "boolean"),
        "number" => (value.is_number(), "number"),
        "null" => (value.is_null(), "null"),
        "any" => (true, "value"),
        // QEMU's signed integers take what fits an int64.
        "int" => (value.is_i64(), "integer"),
        // Its unsigned ones also take a negative int64, as the two's complement (QEMU keeps
        // that for compatibility), then check the width; their text differs.
        "uint64" | "size" | "uint16" | "uint32" => {
            if !(value.is_i64() || value.is_u64()) {
                return Err(QmpError::generic(format!(
                    "Parameter '{full}' expects uint64"
                )));
            }
            (true, "integer")
        }
        name => return check_named(name, value, full, bare),
    };
    if !ok {
        return Err(wrong_type(full, expected));
    }
    let limit = match ty {
        "uint16" => Some((u64::from(u16::MAX), "uint16_t")),
        "uint32" => Some((u64::from(u32::MAX), "uint32_t")),
        _ => None,
    };
    if let Some((max, c_type)) = limit {
        let n = value
            .as_u64()
            .or_else(|| value.as_i64().map(|n| n as u64))
            .unwrap_or(u64::MAX);
        if n > max {
            return Err(QmpError::generic(format!(
                "Parameter '{bare}' expects {c_type}"
            )));
        }
    }
    Ok(())
}

fn check_named(name: &str, value: &Value, full: &str, bare: &str) -> Result<(), QmpError> {
    let def = find_type(name).ok_or_else(|| schema_bug(name))?;
    match def.kind {
        Kind::Object { .. } => match value {
            Value::Object(map) => object_members(name, map, &format!("{full}.")),
            _ => Err(wrong_type(full, "object")),
        },
        Kind::Enum(values) => match value {
            Value::String(v) if values.contains(&v.as_str()) => Ok(()),
            Value::String(v) => Err(QmpError::generic(format!(
                "Parameter '{bare}' does not accept value '{v}'"
            ))),
            _ => Err(wrong_type(full, "string")),
        },
        Kind::Alternate(branches) => match branches.iter().find(|b| takes(b, value)) {
            Some(branch) => check(branch, value, full, bare),
            None => Err(wrong_type(bare, def.name)),
        },
    }
}

/// Whether an alternate's branch `ty` is the one for `value`'s JSON type.
fn takes(ty: &str, value: &Value) -> bool {
    match value {
        Value::Object(_) => find_type(ty).is_some_and(|d| matches!(d.kind, Kind::Object { .. })),
        Value::String(_) => {
            ty == "str" || find_type(ty).is_some_and(|d| matches!(d.kind, Kind::Enum(_)))
        }
        Value::Bool(_) => ty == "bool",
        Value::Number(_) => matches!(
            ty,
            "int" | "uint16" | "uint32" | "uint64" | "size" | "number"
        ),
        Value::Null => ty == "null",
        Value::Array(_) => ty.starts_with('['),
    }
}

/// Checks the members of `map` against object type `ty` (a struct or a flat union), each
/// named `prefix` + its name; any member the type lacks is refused.
pub fn object_members(ty: &str, map: &Map<String, Value>, prefix: &str) -> Result<(), QmpError> {
    let mut known = Vec::new();
    members_of(ty, map, prefix, &mut known)?;
    match map.keys().find(|k| !known.contains(&k.as_str())) {
        Some(key) => Err(QmpError::generic(format!(
            "Parameter '{prefix}{key}' is unexpected"
        ))),
        None => Ok(()),
    }
}

fn members_of(
    ty: &str,
    map: &Map<String, Value>,
    prefix: &str,
    known: &mut Vec<&'static str>,
) -> Result<(), QmpError> {
    let def = find_type(ty).ok_or_else(|| schema_bug(ty))?;
    let Kind::Object {
        members,
        tag,
        variants,
    } = &def.kind
    else {
        return Err(schema_bug(ty));
    };
    for Member { name, ty, optional } in members.iter() {
        known.push(name);
        match map.get(*name) {
            Some(value) => check(ty, value, &format!("{prefix}{name}"), name)?,
            None if *optional => {}
            None => return Err(missing(&format!("{prefix}{name}"))),
        }
    }
    let case = tag.and_then(|tag| map.get(tag)).and_then(Value::as_str);
    if let Some((_, variant)) = variants.iter().find(|(c, _)| Some(*c) == case) {
        members_of(variant, map, prefix, known)?;
    }
    Ok(())
}

/// A type the schema names but does not define (the unit tests rule it out).
fn schema_bug(ty: &str) -> QmpError {
    QmpError::generic(format!(
        "internal error: type '{ty}' is not in strata's schema"
    ))
}
