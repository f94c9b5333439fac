//! QEMU's job states and verbs (qapi/job.json) and the two tables of QEMU's job.c that govern
//! them: which state may follow which (`JobSTT`), and which verb a state accepts
//! (`JobVerbTable`).

/// A job's state, as `query-jobs` and `JOB_STATUS_CHANGE` name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStatus {
    /// Before creation (never seen by a client).
    Undefined,
    /// Created, not started.
    Created,
    /// Working.
    Running,
    /// Paused by a user while running.
    Paused,
    /// Work done as far as it goes until `job-complete` (mirror-like jobs).
    Ready,
    /// Paused while ready.
    Standby,
    /// Done, waiting for the other jobs of its transaction.
    Waiting,
    /// Done, waiting to be finalized (`job-finalize` unless auto-finalize).
    Pending,
    /// Failed or cancelled, being undone.
    Aborting,
    /// Finished; stays until dismissed (`job-dismiss` unless auto-dismiss).
    Concluded,
    /// Gone.
    Null,
}

/// Every state, in QEMU's order (the tables' columns).
#[cfg(test)]
pub const ALL_STATUSES: [JobStatus; 11] = [
    JobStatus::Undefined,
    JobStatus::Created,
    JobStatus::Running,
    JobStatus::Paused,
    JobStatus::Ready,
    JobStatus::Standby,
    JobStatus::Waiting,
    JobStatus::Pending,
    JobStatus::Aborting,
    JobStatus::Concluded,
    JobStatus::Null,
];

impl JobStatus {
    /// The QAPI name.
    pub fn name(self) -> &'static str {
        match self {
            JobStatus::Undefined => "undefined",
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Standby => "standby",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// Whether QEMU's `JobSTT` lets a job go from this state to `to`.
    pub fn may_become(self, to: JobStatus) -> bool {
        TRANSITIONS[self.index()][to.index()] == 1
    }
}

/// A command a job may accept, depending on its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobVerb {
    /// `job-cancel`.
    Cancel,
    /// `job-pause`.
    Pause,
    /// `job-resume`.
    Resume,
    /// `block-job-set-speed` (its row of QEMU's table is kept for the block jobs to come,
    /// which take a speed; no command applies it yet).
    #[cfg_attr(not(test), allow(dead_code))]
    SetSpeed,
    /// `job-complete`.
    Complete,
    /// `job-finalize`.
    Finalize,
    /// `job-dismiss`.
    Dismiss,
}

/// Every verb, in QEMU's order (the verb table's rows).
#[cfg(test)]
pub const ALL_VERBS: [JobVerb; 7] = [
    JobVerb::Cancel,
    JobVerb::Pause,
    JobVerb::Resume,
    JobVerb::SetSpeed,
    JobVerb::Complete,
    JobVerb::Finalize,
    JobVerb::Dismiss,
];

impl JobVerb {
    /// The QAPI name, as errors quote it.
    pub fn name(self) -> &'static str {
        match self {
            JobVerb::Cancel => "cancel",
            JobVerb::Pause => "pause",
            JobVerb::Resume => "resume",
            JobVerb::SetSpeed => "set-speed",
            JobVerb::Complete => "complete",
            JobVerb::Finalize => "finalize",
            JobVerb::Dismiss => "dismiss",
        }
    }

    /// Whether a job in `status` accepts this verb (QEMU's `JobVerbTable`).
    pub fn allowed_in(self, status: JobStatus) -> bool {
        VERBS[self as usize][status.index()] == 1
    }
}

/// QEMU's `JobSTT`: row the state a job is in, column the state it may go to.
#[rustfmt::skip]
const TRANSITIONS: [[u8; 11]; 11] = [
    //  U  C  R  P  Y  S  W  D  X  E  N
    [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0], // U: undefined
    [0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1], // C: created
    [0, 0, 0, 1, 1, 0, 1, 0, 1, 0, 0], // R: running
    [0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0], // P: paused
    [0, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0], // Y: ready
    [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0], // S: standby
    [0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0], // W: waiting
    [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0], // D: pending
    [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0], // X: aborting
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], // E: concluded
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], // N: null
];

/// QEMU's `JobVerbTable`: row the verb, column the state.
#[rustfmt::skip]
const VERBS: [[u8; 11]; 7] = [
    //  U  C  R  P  Y  S  W  D  X  E  N
    [0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], // cancel
    [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0], // pause
    [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0], // resume
    [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0], // set-speed
    [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0], // complete
    [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], // finalize
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0], // dismiss
];
