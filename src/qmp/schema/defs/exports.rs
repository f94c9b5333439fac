//! Exports: `block-export-add`, `block-export-del`, `query-block-exports`,
//! `BLOCK_EXPORT_DELETED` (QAPI's block-export.json, vhost-user-blk only).

use crate::qmp::schema::{opt, req, TypeDef};

pub const TYPES: &[TypeDef] = &[
    TypeDef::union(
        "BlockExportOptions",
        &[
            req("type", "BlockExportType"),
            req("id", "str"),
            opt("fixed-iothread", "bool"),
            opt("iothread", "str"),
            req("node-name", "str"),
            opt("writable", "bool"),
            opt("writethrough", "bool"),
        ],
        "type",
        &[("vhost-user-blk", "BlockExportOptionsVhostUserBlk")],
    ),
    TypeDef::enumeration("BlockExportType", &["vhost-user-blk"]),
    TypeDef::object(
        "BlockExportOptionsVhostUserBlk",
        &[
            req("addr", "SocketAddress"),
            opt("logical-block-size", "size"),
            opt("num-queues", "uint16"),
            // strata's own (README): the virtio-blk serial, the socket's mode and group, and
            // the workers' busy polling.
            opt("serial", "str"),
            opt("socket-mode", "str"),
            opt("socket-group", "str"),
            opt("poll-max-ns", "uint64"),
        ],
    ),
    TypeDef::union(
        "SocketAddress",
        &[req("type", "SocketAddressType")],
        "type",
        &[("unix", "UnixSocketAddress"), ("fd", "String")],
    ),
    // The address types strata listens on.
    TypeDef::enumeration("SocketAddressType", &["unix", "fd"]),
    TypeDef::object("UnixSocketAddress", &[req("path", "str")]),
    TypeDef::object("String", &[req("str", "str")]),
    TypeDef::object(
        "q_obj_block-export-del-arg",
        &[req("id", "str"), opt("mode", "BlockExportRemoveMode")],
    ),
    TypeDef::enumeration("BlockExportRemoveMode", &["safe", "hard"]),
    TypeDef::object(
        "BlockExportInfo",
        &[
            req("id", "str"),
            req("type", "BlockExportType"),
            req("node-name", "str"),
            req("shutting-down", "bool"),
        ],
    ),
    TypeDef::object("q_obj_BLOCK_EXPORT_DELETED-arg", &[req("id", "str")]),
];
