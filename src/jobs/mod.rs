//! Background jobs, as QEMU models them (qapi/job.json, job.c): a job is created, runs on a
//! thread of its own, may be paused, resumed and cancelled, concludes with or without an error,
//! and is finalized and dismissed, automatically or by command. Every change of state is a
//! `JOB_STATUS_CHANGE` event.
//!
//! - [`status`]: the states, the verbs, and QEMU's tables of what may follow what;
//! - [`control`]: one job's shared state, its thread, and [`JobContext`], the job's view of it;
//! - [`registry`]: [`Jobs`], the daemon's jobs by id, and the verbs QMP applies to them;
//! - [`create`]: the `blockdev-create` job.
//!
//! A new job type implements [`Job`]: its `run` does the work on the job's thread, calling
//! [`JobContext::pause_point`] between steps (where a pause takes effect and a cancel ends
//! the run) and reporting progress; the framework does the rest.

pub mod control;
pub mod create;
pub mod registry;
pub mod status;

pub use control::JobContext;
pub use registry::Jobs;
pub use status::JobStatus;

/// Why a job's run ended without success.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunError {
    /// A `job-cancel` was seen at a pause point.
    Cancelled,
    /// The work failed; the text is what `query-jobs` reports as `error`.
    Failed(String),
}

/// What a job type does; the framework runs it on a thread of its own.
pub trait Job: Send + 'static {
    /// The QAPI `JobType` (`create`, `commit`, `stream`, `mirror`, `backup`, ...).
    fn job_type(&self) -> &'static str;

    /// The work. Call `ctx.pause_point()?` between steps, and report progress through `ctx`.
    /// A mirror-like job calls `ctx.set_ready()` once it can complete and then runs until
    /// `ctx.should_complete()`.
    fn run(&mut self, ctx: &JobContext) -> Result<(), RunError>;

    /// Whether `job-complete` applies to this job (once ready).
    fn can_complete(&self) -> bool {
        false
    }

    /// After a successful run, the last step that may still fail (QEMU's `prepare`); an
    /// error aborts the job.
    fn prepare(&mut self) -> Result<(), String> {
        Ok(())
    }

    /// The job succeeded: make its result take effect (QEMU's `commit`).
    fn commit(&mut self) {}

    /// The job failed or was cancelled: undo what it did (QEMU's `abort`).
    fn abort(&mut self) {}
}

/// What every job is created with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobOptions {
    /// The job's id, unique among the daemon's jobs.
    pub id: String,
    /// Finalize as soon as the run succeeded (else wait in `pending` for `job-finalize`).
    pub auto_finalize: bool,
    /// Dismiss once concluded (else wait in `concluded` for `job-dismiss`).
    pub auto_dismiss: bool,
}

/// One job as `query-jobs` shows it (QAPI `JobInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobInfo {
    /// The id.
    pub id: String,
    /// The job type.
    pub job_type: &'static str,
    /// Its state.
    pub status: JobStatus,
    /// Progress so far, in the job's own unit.
    pub current_progress: u64,
    /// Estimated total, in the same unit.
    pub total_progress: u64,
    /// Why it failed, once it did.
    pub error: Option<String>,
}

#[cfg(test)]
mod tests;
