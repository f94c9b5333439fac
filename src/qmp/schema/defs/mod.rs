//! strata's commands, events and types in QEMU 7.2's terms: a type keeps QEMU's name and
//! lists the members strata accepts (QEMU's that strata implements, plus strata's own, which
//! the README lists); a union's tag lists only the cases strata has.

mod block;
mod control;
mod exports;
mod jobs;
mod stats;

use super::{CommandDef, EventDef, TypeDef, EMPTY};

/// Every named type, by family.
pub const TYPES: &[&[TypeDef]] = &[
    &[TypeDef::object(EMPTY, &[])],
    control::TYPES,
    block::TYPES,
    exports::TYPES,
    jobs::TYPES,
    stats::TYPES,
];

const fn command(name: &'static str, args: &'static str, ret: &'static str) -> CommandDef {
    CommandDef { name, args, ret }
}

/// Every command (`dispatch::COMMANDS` has the handlers).
pub const COMMANDS: &[CommandDef] = &[
    command("qmp_capabilities", "q_obj_qmp_capabilities-arg", EMPTY),
    command("query-version", EMPTY, "VersionInfo"),
    command("query-commands", EMPTY, "[CommandInfo]"),
    command("query-qmp-schema", EMPTY, "[SchemaInfo]"),
    command("blockdev-add", "BlockdevOptions", EMPTY),
    command("blockdev-del", "q_obj_blockdev-del-arg", EMPTY),
    command(
        "query-named-block-nodes",
        "q_obj_query-named-block-nodes-arg",
        "[BlockDeviceInfo]",
    ),
    command("blockdev-reopen", "q_obj_blockdev-reopen-arg", EMPTY),
    command(
        "x-blockdev-set-iothread",
        "q_obj_x-blockdev-set-iothread-arg",
        EMPTY,
    ),
    command("block_resize", "q_obj_block_resize-arg", EMPTY),
    command("block-export-add", "BlockExportOptions", EMPTY),
    command("block-export-del", "q_obj_block-export-del-arg", EMPTY),
    command("query-block-exports", EMPTY, "[BlockExportInfo]"),
    command("blockdev-create", "q_obj_blockdev-create-arg", EMPTY),
    command("query-jobs", EMPTY, "[JobInfo]"),
    command("job-cancel", "q_obj_job-cancel-arg", EMPTY),
    command("job-pause", "q_obj_job-pause-arg", EMPTY),
    command("job-resume", "q_obj_job-resume-arg", EMPTY),
    command("job-complete", "q_obj_job-complete-arg", EMPTY),
    command("job-finalize", "q_obj_job-finalize-arg", EMPTY),
    command("job-dismiss", "q_obj_job-dismiss-arg", EMPTY),
    command(
        "query-blockstats",
        "q_obj_query-blockstats-arg",
        "[BlockStats]",
    ),
    command(
        "block-latency-histogram-set",
        "q_obj_block-latency-histogram-set-arg",
        EMPTY,
    ),
];

/// Every event strata emits.
pub const EVENTS: &[EventDef] = &[
    EventDef {
        name: "BLOCK_EXPORT_DELETED",
        data: "q_obj_BLOCK_EXPORT_DELETED-arg",
    },
    EventDef {
        name: "JOB_STATUS_CHANGE",
        data: "q_obj_JOB_STATUS_CHANGE-arg",
    },
];
