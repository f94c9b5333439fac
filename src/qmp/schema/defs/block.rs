//! Block nodes: `blockdev-add` (BlockdevOptions for strata's drivers), `blockdev-del`,
//! `query-named-block-nodes`, `block_resize`, `blockdev-create` (QAPI's block-core.json).

use crate::qmp::schema::{opt, req, TypeDef};

pub const TYPES: &[TypeDef] = &[
    TypeDef::union(
        "BlockdevOptions",
        &[
            req("driver", "BlockdevDriver"),
            opt("node-name", "str"),
            opt("discard", "BlockdevDiscardOptions"),
            opt("cache", "BlockdevCacheOptions"),
            opt("read-only", "bool"),
            opt("auto-read-only", "bool"),
            opt("detect-zeroes", "BlockdevDetectZeroesOptions"),
        ],
        "driver",
        &[
            ("file", "BlockdevOptionsFile"),
            ("host_device", "BlockdevOptionsFile"),
            ("null-co", "BlockdevOptionsNull"),
            ("qcow2", "BlockdevOptionsQcow2"),
            ("raw", "BlockdevOptionsRaw"),
            ("rbd", "BlockdevOptionsRbd"),
        ],
    ),
    // The drivers strata has.
    TypeDef::enumeration(
        "BlockdevDriver",
        &["file", "host_device", "null-co", "qcow2", "raw", "rbd"],
    ),
    TypeDef::enumeration("BlockdevDiscardOptions", &["ignore", "unmap"]),
    TypeDef::object(
        "BlockdevCacheOptions",
        &[opt("direct", "bool"), opt("no-flush", "bool")],
    ),
    TypeDef::enumeration("BlockdevDetectZeroesOptions", &["off", "on", "unmap"]),
    TypeDef::object(
        "BlockdevOptionsFile",
        &[
            req("filename", "str"),
            opt("locking", "OnOffAuto"),
            // threads and native are accepted and served by io_uring.
            opt("aio", "BlockdevAioOptions"),
            // strata's own (README): share the image lock for writes.
            opt("share-rw", "bool"),
        ],
    ),
    TypeDef::enumeration("OnOffAuto", &["auto", "on", "off"]),
    TypeDef::enumeration("BlockdevAioOptions", &["threads", "native", "io_uring"]),
    TypeDef::object(
        "BlockdevOptionsNull",
        &[
            opt("size", "int"),
            opt("latency-ns", "uint64"),
            opt("read-zeroes", "bool"),
        ],
    ),
    TypeDef::object(
        "BlockdevOptionsRaw",
        &[
            req("file", "BlockdevRef"),
            opt("offset", "int"),
            opt("size", "int"),
        ],
    ),
    TypeDef::object(
        "BlockdevOptionsQcow2",
        &[
            req("file", "BlockdevRef"),
            opt("backing", "BlockdevRefOrNull"),
            opt("lazy-refcounts", "bool"),
            opt("pass-discard-request", "bool"),
            opt("pass-discard-snapshot", "bool"),
            opt("pass-discard-other", "bool"),
            // strata's own here (QEMU 8.1's): strata never keeps a discarded cluster.
            opt("discard-no-unref", "bool"),
            opt("overlap-check", "Qcow2OverlapChecks"),
            opt("cache-size", "int"),
            opt("l2-cache-size", "int"),
            opt("l2-cache-entry-size", "int"),
            opt("refcount-cache-size", "int"),
            opt("cache-clean-interval", "int"),
        ],
    ),
    TypeDef::alternate(
        "Qcow2OverlapChecks",
        &["Qcow2OverlapCheckFlags", "Qcow2OverlapCheckMode"],
    ),
    TypeDef::object(
        "Qcow2OverlapCheckFlags",
        &[
            opt("template", "Qcow2OverlapCheckMode"),
            opt("main-header", "bool"),
            opt("active-l1", "bool"),
            opt("active-l2", "bool"),
            opt("refcount-table", "bool"),
            opt("refcount-block", "bool"),
            opt("snapshot-table", "bool"),
            opt("inactive-l1", "bool"),
            opt("inactive-l2", "bool"),
            opt("bitmap-directory", "bool"),
        ],
    ),
    TypeDef::enumeration(
        "Qcow2OverlapCheckMode",
        &["none", "constant", "cached", "all"],
    ),
    TypeDef::object(
        "BlockdevOptionsRbd",
        &[
            req("pool", "str"),
            opt("namespace", "str"),
            req("image", "str"),
            opt("conf", "str"),
            opt("snapshot", "str"),
            opt("user", "str"),
            opt("auth-client-required", "[RbdAuthMode]"),
            opt("key-secret", "str"),
            opt("server", "[InetSocketAddressBase]"),
        ],
    ),
    TypeDef::enumeration("RbdAuthMode", &["cephx", "none"]),
    TypeDef::object(
        "InetSocketAddressBase",
        &[req("host", "str"), req("port", "str")],
    ),
    TypeDef::alternate("BlockdevRef", &["BlockdevOptions", "str"]),
    TypeDef::alternate("BlockdevRefOrNull", &["BlockdevOptions", "str", "null"]),
    TypeDef::object("q_obj_blockdev-del-arg", &[req("node-name", "str")]),
    TypeDef::object("q_obj_query-named-block-nodes-arg", &[opt("flat", "bool")]),
    // The members strata fills in (QEMU's throttling and bitmap ones are never set).
    TypeDef::object(
        "BlockDeviceInfo",
        &[
            req("file", "str"),
            opt("node-name", "str"),
            req("ro", "bool"),
            req("drv", "str"),
            opt("backing_file", "str"),
            req("backing_file_depth", "int"),
            req("encrypted", "bool"),
            req("detect_zeroes", "BlockdevDetectZeroesOptions"),
            req("bps", "int"),
            req("bps_rd", "int"),
            req("bps_wr", "int"),
            req("iops", "int"),
            req("iops_rd", "int"),
            req("iops_wr", "int"),
            req("image", "ImageInfo"),
            req("cache", "BlockdevCacheInfo"),
            req("write_threshold", "int"),
        ],
    ),
    TypeDef::object(
        "ImageInfo",
        &[
            req("filename", "str"),
            req("format", "str"),
            opt("dirty-flag", "bool"),
            opt("actual-size", "int"),
            req("virtual-size", "int"),
            opt("backing-filename", "str"),
            opt("backing-image", "ImageInfo"),
        ],
    ),
    TypeDef::object(
        "BlockdevCacheInfo",
        &[
            req("writeback", "bool"),
            req("direct", "bool"),
            req("no-flush", "bool"),
        ],
    ),
    TypeDef::object(
        "q_obj_block_resize-arg",
        &[
            opt("device", "str"),
            opt("node-name", "str"),
            req("size", "int"),
        ],
    ),
    TypeDef::object(
        "q_obj_blockdev-reopen-arg",
        &[req("options", "[BlockdevOptions]")],
    ),
    TypeDef::object(
        "q_obj_x-blockdev-set-iothread-arg",
        &[
            req("node-name", "str"),
            req("iothread", "StrOrNull"),
            opt("force", "bool"),
        ],
    ),
    TypeDef::alternate("StrOrNull", &["str", "null"]),
    TypeDef::object(
        "q_obj_blockdev-create-arg",
        &[
            req("job-id", "str"),
            req("options", "BlockdevCreateOptions"),
        ],
    ),
    // Every driver is a case, as in QEMU; those strata does not create have no members and
    // are refused by the command ("Driver does not support blockdev-create").
    TypeDef::union(
        "BlockdevCreateOptions",
        &[req("driver", "BlockdevDriver")],
        "driver",
        &[
            ("file", "BlockdevCreateOptionsFile"),
            ("host_device", crate::qmp::schema::EMPTY),
            ("null-co", crate::qmp::schema::EMPTY),
            ("qcow2", "BlockdevCreateOptionsQcow2"),
            ("raw", "BlockdevCreateOptionsRaw"),
            ("rbd", crate::qmp::schema::EMPTY),
        ],
    ),
    TypeDef::object(
        "BlockdevCreateOptionsFile",
        &[
            req("filename", "str"),
            req("size", "size"),
            opt("preallocation", "PreallocMode"),
            opt("nocow", "bool"),
            opt("extent-size-hint", "size"),
        ],
    ),
    TypeDef::enumeration("PreallocMode", &["off", "metadata", "falloc", "full"]),
    // Without QEMU's data-file, data-file-raw and encrypt: strata's qcow2 has neither.
    TypeDef::object(
        "BlockdevCreateOptionsQcow2",
        &[
            req("file", "BlockdevRef"),
            opt("extended-l2", "bool"),
            req("size", "size"),
            opt("version", "BlockdevQcow2Version"),
            opt("backing-file", "str"),
            opt("backing-fmt", "BlockdevDriver"),
            opt("cluster-size", "size"),
            opt("preallocation", "PreallocMode"),
            opt("lazy-refcounts", "bool"),
            opt("refcount-bits", "int"),
            opt("compression-type", "Qcow2CompressionType"),
        ],
    ),
    // strata's own (QEMU 7.2 has no raw case): the `file` node becomes a raw image of `size`
    // bytes.
    TypeDef::object(
        "BlockdevCreateOptionsRaw",
        &[req("file", "BlockdevRef"), req("size", "size")],
    ),
    TypeDef::enumeration("BlockdevQcow2Version", &["v2", "v3"]),
    TypeDef::enumeration("Qcow2CompressionType", &["zlib", "zstd"]),
];
