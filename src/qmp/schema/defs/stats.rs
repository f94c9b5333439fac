//! Statistics: `query-blockstats` (QAPI's block-core.json) and `block-latency-histogram-set`
//! (QAPI's block.json: QEMU's system emulator has it, qemu-storage-daemon 7.2 does not).

use crate::qmp::schema::{opt, req, TypeDef, EMPTY};

pub const TYPES: &[TypeDef] = &[
    TypeDef::object("q_obj_query-blockstats-arg", &[opt("query-nodes", "bool")]),
    TypeDef::object(
        "BlockStats",
        &[
            opt("device", "str"),
            opt("qdev", "str"),
            opt("node-name", "str"),
            req("stats", "BlockDeviceStats"),
            opt("driver-specific", "BlockStatsSpecific"),
            opt("parent", "BlockStats"),
            opt("backing", "BlockStats"),
        ],
    ),
    // Every member of QEMU 7.2's: `*_merged` are 0 and `timed_stats` is [] (strata merges no
    // requests and has no timed intervals).
    TypeDef::object(
        "BlockDeviceStats",
        &[
            req("rd_bytes", "int"),
            req("wr_bytes", "int"),
            req("unmap_bytes", "int"),
            req("rd_operations", "int"),
            req("wr_operations", "int"),
            req("flush_operations", "int"),
            req("unmap_operations", "int"),
            req("rd_total_time_ns", "int"),
            req("wr_total_time_ns", "int"),
            req("flush_total_time_ns", "int"),
            req("unmap_total_time_ns", "int"),
            req("wr_highest_offset", "int"),
            req("rd_merged", "int"),
            req("wr_merged", "int"),
            req("unmap_merged", "int"),
            opt("idle_time_ns", "int"),
            req("failed_rd_operations", "int"),
            req("failed_wr_operations", "int"),
            req("failed_flush_operations", "int"),
            req("failed_unmap_operations", "int"),
            req("invalid_rd_operations", "int"),
            req("invalid_wr_operations", "int"),
            req("invalid_flush_operations", "int"),
            req("invalid_unmap_operations", "int"),
            req("account_invalid", "bool"),
            req("account_failed", "bool"),
            req("timed_stats", "[BlockDeviceTimedStats]"),
            opt("rd_latency_histogram", "BlockLatencyHistogramInfo"),
            opt("wr_latency_histogram", "BlockLatencyHistogramInfo"),
            opt("flush_latency_histogram", "BlockLatencyHistogramInfo"),
        ],
    ),
    TypeDef::object(
        "BlockDeviceTimedStats",
        &[
            req("interval_length", "int"),
            req("min_rd_latency_ns", "int"),
            req("max_rd_latency_ns", "int"),
            req("avg_rd_latency_ns", "int"),
            req("min_wr_latency_ns", "int"),
            req("max_wr_latency_ns", "int"),
            req("avg_wr_latency_ns", "int"),
            req("min_flush_latency_ns", "int"),
            req("max_flush_latency_ns", "int"),
            req("avg_flush_latency_ns", "int"),
            req("avg_rd_queue_depth", "number"),
            req("avg_wr_queue_depth", "number"),
        ],
    ),
    TypeDef::object(
        "BlockLatencyHistogramInfo",
        &[req("boundaries", "[uint64]"), req("bins", "[uint64]")],
    ),
    // file and host_device carry QEMU's discard counters; strata's other drivers nothing (as
    // in QEMU, where only nvme, which strata lacks, has more).
    TypeDef::union(
        "BlockStatsSpecific",
        &[req("driver", "BlockdevDriver")],
        "driver",
        &[
            ("file", "BlockStatsSpecificFile"),
            ("host_device", "BlockStatsSpecificFile"),
            ("null-co", EMPTY),
            ("qcow2", EMPTY),
            ("raw", EMPTY),
            ("rbd", EMPTY),
        ],
    ),
    TypeDef::object(
        "BlockStatsSpecificFile",
        &[
            req("discard-nb-ok", "uint64"),
            req("discard-nb-failed", "uint64"),
            req("discard-bytes-ok", "uint64"),
        ],
    ),
    // QEMU 7.2's members (`boundaries-zap` came with QEMU 8.1). `id` is an export id or, which
    // QEMU does not take, a node name.
    TypeDef::object(
        "q_obj_block-latency-histogram-set-arg",
        &[
            req("id", "str"),
            opt("boundaries", "[uint64]"),
            opt("boundaries-read", "[uint64]"),
            opt("boundaries-write", "[uint64]"),
            opt("boundaries-flush", "[uint64]"),
        ],
    ),
];
