//! The QAPI schema of what strata implements: every command's arguments and return value,
//! every event's data, and the types they use, named as QEMU 7.2's schema names them.
//!
//! It is the one description both of what `query-qmp-schema` reports ([`introspect`]) and of
//! what a command accepts: [`check_arguments`] checks a request against its command's
//! argument type before the handler runs ([`check`], with QEMU's error texts), so a member the
//! schema does not list is refused and one it lists has the type it says.
//!
//! - [`defs`]: the definitions, one file per command family;
//! - [`check`]: a JSON value checked against a type;
//! - [`introspect`]: the `SchemaInfo` list, type names masked into numbers as QEMU does.

pub mod check;
pub mod defs;
pub mod introspect;

use serde_json::{Map, Value};

use super::protocol::QmpError;

/// A member of an object type.
#[derive(Debug)]
pub struct Member {
    /// Its name in JSON.
    pub name: &'static str,
    /// Its type: a builtin (`str`, `bool`, `int`, `uint16`, `uint32`, `uint64`, `size`,
    /// `number`, `null`, `any`), a type of the schema, or `[T]`, an array of `T`.
    pub ty: &'static str,
    /// Whether it may be left out.
    pub optional: bool,
}

/// A required member.
pub const fn req(name: &'static str, ty: &'static str) -> Member {
    Member {
        name,
        ty,
        optional: false,
    }
}

/// An optional member.
pub const fn opt(name: &'static str, ty: &'static str) -> Member {
    Member {
        name,
        ty,
        optional: true,
    }
}

/// What a named type is.
#[derive(Debug)]
pub enum Kind {
    /// A struct, or a flat union: the members, then (for a union) those of the variant that the
    /// value of member `tag` (an enum) selects.
    Object {
        members: &'static [Member],
        tag: Option<&'static str>,
        variants: &'static [(&'static str, &'static str)],
    },
    /// One of the listed strings.
    Enum(&'static [&'static str]),
    /// One of the listed types, chosen by the JSON type of the value.
    Alternate(&'static [&'static str]),
}

/// A named type of the schema.
#[derive(Debug)]
pub struct TypeDef {
    /// QEMU's name for it (shown in error texts; masked in `query-qmp-schema`).
    pub name: &'static str,
    /// Its definition.
    pub kind: Kind,
}

impl TypeDef {
    /// A struct.
    pub const fn object(name: &'static str, members: &'static [Member]) -> Self {
        TypeDef {
            name,
            kind: Kind::Object {
                members,
                tag: None,
                variants: &[],
            },
        }
    }

    /// A flat union: `members` (with `tag` among them), then the variant's.
    pub const fn union(
        name: &'static str,
        members: &'static [Member],
        tag: &'static str,
        variants: &'static [(&'static str, &'static str)],
    ) -> Self {
        TypeDef {
            name,
            kind: Kind::Object {
                members,
                tag: Some(tag),
                variants,
            },
        }
    }

    /// An enum.
    pub const fn enumeration(name: &'static str, values: &'static [&'static str]) -> Self {
        TypeDef {
            name,
            kind: Kind::Enum(values),
        }
    }

    /// An alternate.
    pub const fn alternate(name: &'static str, types: &'static [&'static str]) -> Self {
        TypeDef {
            name,
            kind: Kind::Alternate(types),
        }
    }
}

/// A command: its argument type (an object type) and return type.
#[derive(Debug)]
pub struct CommandDef {
    pub name: &'static str,
    pub args: &'static str,
    pub ret: &'static str,
}

/// An event: the type of its `data`.
#[derive(Debug)]
pub struct EventDef {
    pub name: &'static str,
    pub data: &'static str,
}

/// The object type with no members, for commands without arguments or return value (QEMU's
/// `q_empty`).
pub const EMPTY: &str = "q_empty";

/// Builtin types, with the JSON type `query-qmp-schema` gives for each; the integer types all
/// show as `int`, as in QEMU's introspection.
pub const BUILTINS: &[(&str, &str)] = &[
    ("str", "string"),
    ("any", "value"),
    ("bool", "boolean"),
    ("int", "int"),
    ("null", "null"),
    ("number", "number"),
];

/// The name `query-qmp-schema` shows for builtin `ty` (the integer kinds are all `int`).
pub fn builtin_name(ty: &str) -> Option<&'static str> {
    match ty {
        "int" | "uint16" | "uint32" | "uint64" | "size" => Some("int"),
        _ => BUILTINS.iter().find(|(n, _)| *n == ty).map(|(n, _)| *n),
    }
}

/// Every named type.
pub fn types() -> impl Iterator<Item = &'static TypeDef> {
    defs::TYPES.iter().flat_map(|t| t.iter())
}

/// The named type `name`.
pub fn find_type(name: &str) -> Option<&'static TypeDef> {
    types().find(|t| t.name == name)
}

/// The command `name`.
pub fn find_command(name: &str) -> Option<&'static CommandDef> {
    defs::COMMANDS.iter().find(|c| c.name == name)
}

/// Checks `arguments` against command `name`'s argument type, with QEMU's texts naming the
/// first bad member. A command the schema lacks is left to its handler (a unit test requires
/// every command of the table to be in the schema).
pub fn check_arguments(name: &str, arguments: &Map<String, Value>) -> Result<(), QmpError> {
    match find_command(name) {
        Some(command) => check::object_members(command.args, arguments, ""),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests;
