//! One job's shared state and its life on its own thread: the run, the pause points, and the
//! steps after it (waiting, pending, finalizing, concluding), each a transition QEMU's table
//! allows, each sent as an event in the order it happened.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};

use super::status::JobStatus;
use super::{Job, JobInfo, JobOptions, RunError};

/// What is told of every change of state: the job's id and its new state.
pub type Listener = Arc<dyn Fn(&str, JobStatus) + Send + Sync>;

/// QEMU's text for a job that was cancelled (strerror(ECANCELED)).
pub const CANCELLED: &str = "Operation canceled";

/// Where a job's events go, shared by every job of a daemon.
#[derive(Default)]
pub(super) struct Events {
    /// Set once the monitors start; before that there is nobody to tell.
    pub listener: std::sync::OnceLock<Listener>,
    /// Held while events are taken from a job and sent, so that they leave in the order
    /// their transitions were made, whichever thread made them.
    order: Mutex<()>,
}

/// What the job thread and the monitors share about one job.
pub(super) struct Shared {
    pub options: JobOptions,
    pub job_type: &'static str,
    pub can_complete: bool,
    state: Mutex<State>,
    /// Signalled on every change the job thread or a waiting command must see.
    changed: Condvar,
    events: Arc<Events>,
    /// The registry's list, from which the job removes itself when dismissed.
    list: Weak<Mutex<Vec<Arc<Shared>>>>,
}

/// The mutable part of a job, under its lock.
pub(super) struct State {
    pub status: JobStatus,
    /// Reasons to pause: user pauses (QEMU's pause_count).
    pub pause_count: u32,
    /// Whether `job-pause` paused it (and `job-resume` may resume it).
    pub user_paused: bool,
    pub cancelled: bool,
    pub complete_requested: bool,
    pub finalize_requested: bool,
    pub progress_current: u64,
    pub progress_total: u64,
    pub error: Option<String>,
    /// Transitions made and not yet sent as events.
    unsent: Vec<JobStatus>,
}

impl Shared {
    pub(super) fn new(
        options: JobOptions,
        job: &dyn Job,
        events: Arc<Events>,
        list: Weak<Mutex<Vec<Arc<Shared>>>>,
    ) -> Self {
        Shared {
            options,
            job_type: job.job_type(),
            can_complete: job.can_complete(),
            state: Mutex::new(State {
                status: JobStatus::Undefined,
                pause_count: 0,
                user_paused: false,
                cancelled: false,
                complete_requested: false,
                finalize_requested: false,
                progress_current: 0,
                progress_total: 0,
                error: None,
                unsent: Vec::new(),
            }),
            changed: Condvar::new(),
            events,
            list,
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        // Every change under the lock leaves the state consistent, so a poisoned lock is too.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for a change while `blocked` holds.
    pub(super) fn wait_while<'a>(
        &self,
        guard: MutexGuard<'a, State>,
        blocked: impl FnMut(&mut State) -> bool,
    ) -> MutexGuard<'a, State> {
        self.changed
            .wait_while(guard, blocked)
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes the job thread and every command waiting on this job.
    pub(super) fn notify(&self) {
        self.changed.notify_all();
    }

    /// Moves the job to `to` (an event follows with [`deliver`](Self::deliver)).
    pub(super) fn transition(&self, state: &mut State, to: JobStatus) {
        let from = state.status;
        if !from.may_become(to) {
            // QEMU asserts here; a job that breaks the table is a bug in strata.
            log::error!(
                "job '{}': transition from {} to {} is not in QEMU's table",
                self.options.id,
                from.name(),
                to.name()
            );
            debug_assert!(false, "job transition {} -> {}", from.name(), to.name());
        }
        state.status = to;
        if to != from {
            state.unsent.push(to);
        }
        self.changed.notify_all();
    }

    /// Sends the events of the transitions made so far, in order. Call without the state
    /// lock held.
    pub(super) fn deliver(&self) {
        let _order = self.events.order.lock().unwrap_or_else(|p| p.into_inner());
        let unsent = std::mem::take(&mut self.lock().unsent);
        if let Some(listener) = self.events.listener.get() {
            for status in unsent {
                listener(&self.options.id, status);
            }
        }
    }

    /// Moves a concluded job to `null` and out of the registry.
    pub(super) fn dismiss(self: &Arc<Self>, state: &mut State) {
        self.transition(state, JobStatus::Null);
        if let Some(list) = self.list.upgrade() {
            list.lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|j| !Arc::ptr_eq(j, self));
        }
    }

    pub(super) fn info(&self) -> JobInfo {
        let state = self.lock();
        JobInfo {
            id: self.options.id.clone(),
            job_type: self.job_type,
            status: state.status,
            current_progress: state.progress_current,
            total_progress: state.progress_total,
            error: state.error.clone(),
        }
    }
}

/// A job's view of itself while it runs: pause points, cancellation, progress, readiness.
pub struct JobContext {
    shared: Arc<Shared>,
}

impl JobContext {
    /// Where a pause takes effect: while the job is paused this blocks (the job shows
    /// `paused`, or `standby` when ready). Returns `Err(Cancelled)` once the job is cancelled.
    pub fn pause_point(&self) -> Result<(), RunError> {
        let shared = &self.shared;
        let mut state = shared.lock();
        if !state.cancelled && state.pause_count > 0 {
            let back = state.status;
            let paused = if back == JobStatus::Ready {
                JobStatus::Standby
            } else {
                JobStatus::Paused
            };
            shared.transition(&mut state, paused);
            drop(state);
            shared.deliver();
            state = shared.lock();
            state = shared.wait_while(state, |s| s.pause_count > 0 && !s.cancelled);
            shared.transition(&mut state, back);
            drop(state);
            shared.deliver();
            state = shared.lock();
        }
        if state.cancelled {
            return Err(RunError::Cancelled);
        }
        Ok(())
    }

    /// Sets how much work remains, in the job's unit of progress.
    pub fn set_remaining(&self, remaining: u64) {
        let mut state = self.shared.lock();
        state.progress_total = state.progress_current + remaining;
    }

    /// Counts `done` units of work as done.
    pub fn add_progress(&self, done: u64) {
        self.shared.lock().progress_current += done;
    }

    /// The job can complete now: it shows `ready` until completed. For mirror-like jobs
    /// (none yet; the unit tests drive it).
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn set_ready(&self) {
        let mut state = self.shared.lock();
        if state.status == JobStatus::Running {
            self.shared.transition(&mut state, JobStatus::Ready);
        }
        drop(state);
        self.shared.deliver();
    }

    /// Whether `job-complete` was given (for mirror-like jobs, as `set_ready`).
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn should_complete(&self) -> bool {
        self.shared.lock().complete_requested
    }
}

/// The job's thread: the run, then the steps to `concluded` (and `null` with auto-dismiss).
pub(super) fn run_job(shared: Arc<Shared>, mut job: Box<dyn Job>) {
    let ctx = JobContext {
        shared: shared.clone(),
    };
    // QEMU's jobs pass a pause point before they start their work.
    let result = ctx.pause_point().and_then(|()| job.run(&ctx));
    finish(&shared, job.as_mut(), result);
}

/// What follows a run (QEMU's job_completed, job_do_finalize and job_conclude for a job alone
/// in its transaction). The job's hooks run on the caller's thread, without the lock.
pub(super) fn finish(shared: &Arc<Shared>, job: &mut dyn Job, result: Result<(), RunError>) {
    let mut state = shared.lock();
    let mut error = match result {
        Ok(()) if state.cancelled => Some(CANCELLED.to_string()),
        Ok(()) => None,
        Err(RunError::Cancelled) => Some(CANCELLED.to_string()),
        Err(RunError::Failed(text)) => Some(text),
    };
    if error.is_none() {
        shared.transition(&mut state, JobStatus::Waiting);
        shared.transition(&mut state, JobStatus::Pending);
        if !shared.options.auto_finalize {
            drop(state);
            shared.deliver();
            state = shared.lock();
            state = shared.wait_while(state, |s| !s.finalize_requested && !s.cancelled);
        }
        if state.cancelled {
            error = Some(CANCELLED.to_string());
        } else {
            drop(state);
            error = job.prepare().err();
            state = shared.lock();
        }
    }
    match error {
        Some(text) => {
            state.error = Some(text);
            shared.transition(&mut state, JobStatus::Aborting);
            drop(state);
            shared.deliver();
            job.abort();
        }
        None => {
            drop(state);
            job.commit();
        }
    }
    let mut state = shared.lock();
    shared.transition(&mut state, JobStatus::Concluded);
    if shared.options.auto_dismiss {
        shared.dismiss(&mut state);
    }
    drop(state);
    shared.deliver();
}

/// Starts `shared`'s job: `created`, then `running` on a thread of its own.
pub(super) fn start(shared: Arc<Shared>, mut job: Box<dyn Job>) {
    let mut state = shared.lock();
    shared.transition(&mut state, JobStatus::Created);
    shared.transition(&mut state, JobStatus::Running);
    drop(state);
    shared.deliver();
    let name = thread_name(&shared.options.id);
    let thread_shared = shared.clone();
    let (tx, rx) = std::sync::mpsc::channel::<Box<dyn Job>>();
    let spawned = std::thread::Builder::new().name(name).spawn(move || {
        if let Ok(job) = rx.recv() {
            run_job(thread_shared, job);
        }
    });
    match spawned {
        Ok(_) => {
            // The thread owns the job from here (a send to a live receiver cannot fail).
            let _ = tx.send(job);
        }
        Err(e) => finish(
            &shared,
            job.as_mut(),
            Err(RunError::Failed(format!(
                "Could not start a thread for the job: {e}"
            ))),
        ),
    }
}

/// `job-ID`, cut to the 15 bytes Linux keeps of a thread's name.
fn thread_name(id: &str) -> String {
    let name = format!("job-{id}");
    let mut end = name.len().min(15);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_string()
}
