//! Jobs: `query-jobs`, the `job-*` verbs, `JOB_STATUS_CHANGE` (QAPI's job.json).

use crate::qmp::schema::{opt, req, TypeDef};

pub const TYPES: &[TypeDef] = &[
    TypeDef::object(
        "JobInfo",
        &[
            req("id", "str"),
            req("type", "JobType"),
            req("status", "JobStatus"),
            req("current-progress", "int"),
            req("total-progress", "int"),
            opt("error", "str"),
        ],
    ),
    // The job types strata runs.
    TypeDef::enumeration("JobType", &["create"]),
    TypeDef::enumeration(
        "JobStatus",
        &[
            "undefined",
            "created",
            "running",
            "paused",
            "ready",
            "standby",
            "waiting",
            "pending",
            "aborting",
            "concluded",
            "null",
        ],
    ),
    TypeDef::object("q_obj_job-cancel-arg", &[req("id", "str")]),
    TypeDef::object("q_obj_job-pause-arg", &[req("id", "str")]),
    TypeDef::object("q_obj_job-resume-arg", &[req("id", "str")]),
    TypeDef::object("q_obj_job-complete-arg", &[req("id", "str")]),
    TypeDef::object("q_obj_job-finalize-arg", &[req("id", "str")]),
    TypeDef::object("q_obj_job-dismiss-arg", &[req("id", "str")]),
    TypeDef::object(
        "q_obj_JOB_STATUS_CHANGE-arg",
        &[req("id", "str"), req("status", "JobStatus")],
    ),
];
