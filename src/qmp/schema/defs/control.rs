//! The monitor's own commands: `qmp_capabilities`, `query-version`, `query-commands`,
//! `query-qmp-schema` (QEMU's `SchemaInfo`, which describes this very schema).

use crate::qmp::schema::{opt, req, TypeDef};

pub const TYPES: &[TypeDef] = &[
    TypeDef::object(
        "q_obj_qmp_capabilities-arg",
        &[opt("enable", "[QMPCapability]")],
    ),
    TypeDef::enumeration("QMPCapability", &["oob"]),
    TypeDef::object(
        "VersionInfo",
        &[req("qemu", "VersionTriple"), req("package", "str")],
    ),
    TypeDef::object(
        "VersionTriple",
        &[
            req("major", "int"),
            req("minor", "int"),
            req("micro", "int"),
        ],
    ),
    TypeDef::object("CommandInfo", &[req("name", "str")]),
    TypeDef::union(
        "SchemaInfo",
        &[
            req("name", "str"),
            req("meta-type", "SchemaMetaType"),
            opt("features", "[str]"),
        ],
        "meta-type",
        &[
            ("builtin", "SchemaInfoBuiltin"),
            ("enum", "SchemaInfoEnum"),
            ("array", "SchemaInfoArray"),
            ("object", "SchemaInfoObject"),
            ("alternate", "SchemaInfoAlternate"),
            ("command", "SchemaInfoCommand"),
            ("event", "SchemaInfoEvent"),
        ],
    ),
    TypeDef::enumeration(
        "SchemaMetaType",
        &[
            "builtin",
            "enum",
            "array",
            "object",
            "alternate",
            "command",
            "event",
        ],
    ),
    TypeDef::object("SchemaInfoBuiltin", &[req("json-type", "JSONType")]),
    TypeDef::enumeration(
        "JSONType",
        &[
            "string", "number", "int", "boolean", "null", "object", "array", "value",
        ],
    ),
    TypeDef::object(
        "SchemaInfoEnum",
        &[
            req("members", "[SchemaInfoEnumMember]"),
            req("values", "[str]"),
        ],
    ),
    TypeDef::object(
        "SchemaInfoEnumMember",
        &[req("name", "str"), opt("features", "[str]")],
    ),
    TypeDef::object("SchemaInfoArray", &[req("element-type", "str")]),
    TypeDef::object(
        "SchemaInfoObject",
        &[
            req("members", "[SchemaInfoObjectMember]"),
            opt("tag", "str"),
            opt("variants", "[SchemaInfoObjectVariant]"),
        ],
    ),
    TypeDef::object(
        "SchemaInfoObjectMember",
        &[
            req("name", "str"),
            req("type", "str"),
            opt("default", "any"),
            opt("features", "[str]"),
        ],
    ),
    TypeDef::object(
        "SchemaInfoObjectVariant",
        &[req("case", "str"), req("type", "str")],
    ),
    TypeDef::object(
        "SchemaInfoAlternate",
        &[req("members", "[SchemaInfoAlternateMember]")],
    ),
    TypeDef::object("SchemaInfoAlternateMember", &[req("type", "str")]),
    TypeDef::object(
        "SchemaInfoCommand",
        &[
            req("arg-type", "str"),
            req("ret-type", "str"),
            opt("allow-oob", "bool"),
        ],
    ),
    TypeDef::object("SchemaInfoEvent", &[req("arg-type", "str")]),
];
