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

/// A command whose arguments are QEMU's implicit object type for it, `q_obj_<name>-arg`.
macro_rules! with_implicit_args {
    ($name:literal, $ret:expr) => {
        command($name, concat!("q_obj_", $name, "-arg"), $ret)
    };
}

/// Every command (`dispatch::COMMANDS` has the handlers).
pub const COMMANDS: &[CommandDef] = &[
    with_implicit_args!("qmp_capabilities", EMPTY),
    command("query-version", EMPTY, "VersionInfo"),
    command("query-commands", EMPTY, "[CommandInfo]"),
    command("query-qmp-schema", EMPTY, "[SchemaInfo]"),
    command("blockdev-add", "BlockdevOptions", EMPTY),
    with_implicit_args!("blockdev-del", EMPTY),
    with_implicit_args!("query-named-block-nodes", "[BlockDeviceInfo]"),
    with_implicit_args!("blockdev-reopen", EMPTY),
    with_implicit_args!("x-blockdev-set-iothread", EMPTY),
    with_implicit_args!("block_resize", EMPTY),
    command("block-export-add", "BlockExportOptions", EMPTY),
    with_implicit_args!("block-export-del", EMPTY),
    command("query-block-exports", EMPTY, "[BlockExportInfo]"),
    with_implicit_args!("blockdev-create", EMPTY),
    command("query-jobs", EMPTY, "[JobInfo]"),
    with_implicit_args!("job-cancel", EMPTY),
    with_implicit_args!("job-pause", EMPTY),
    with_implicit_args!("job-resume", EMPTY),
    with_implicit_args!("job-complete", EMPTY),
    with_implicit_args!("job-finalize", EMPTY),
    with_implicit_args!("job-dismiss", EMPTY),
    with_implicit_args!("query-blockstats", "[BlockStats]"),
    with_implicit_args!("block-latency-histogram-set", EMPTY),
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
