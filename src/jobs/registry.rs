//! The daemon's jobs by id, and the verbs QMP applies to them, with QEMU's checks and texts:
//! "Job not found", "Job 'x' in state 'y' cannot accept command verb 'z'", and the few
//! verb-specific refusals of job.c.

use std::sync::{Arc, Mutex, MutexGuard};

use super::control::{self, Events, Listener, Shared, State};
use super::status::{JobStatus, JobVerb};
use super::{Job, JobInfo, JobOptions};

/// The daemon's jobs: running, and concluded ones not yet dismissed.
#[derive(Default)]
pub struct Jobs {
    /// Newest first, as QEMU lists them.
    list: Arc<Mutex<Vec<Arc<Shared>>>>,
    events: Arc<Events>,
}

impl Jobs {
    fn lock(&self) -> MutexGuard<'_, Vec<Arc<Shared>>> {
        // Each change is one insert or removal, so a poisoned list is still consistent.
        self.list.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where every job's state changes go from now on (the monitors' event broadcast); the
    /// first listener set stays.
    pub fn set_listener(&self, listener: Listener) {
        // A second call (there is none) would change nothing: events keep one destination.
        let _ = self.events.listener.set(listener);
    }

    /// Creates and starts a job: `created` and `running` are sent before this returns, the
    /// rest as the job's thread gets there.
    pub fn start(&self, options: JobOptions, job: Box<dyn Job>) -> Result<(), String> {
        if !id_wellformed(&options.id) {
            return Err(format!("Invalid job ID '{}'", options.id));
        }
        let shared = {
            let mut list = self.lock();
            if list.iter().any(|j| j.options.id == options.id) {
                return Err(format!("Job ID '{}' already in use", options.id));
            }
            let shared = Arc::new(Shared::new(
                options,
                job.as_ref(),
                self.events.clone(),
                Arc::downgrade(&self.list),
            ));
            list.insert(0, shared.clone());
            shared
        };
        control::start(shared, job);
        Ok(())
    }

    /// Every job, newest first.
    pub fn query(&self) -> Vec<JobInfo> {
        let jobs: Vec<Arc<Shared>> = self.lock().clone();
        jobs.iter().map(|j| j.info()).collect()
    }

    fn find(&self, id: &str) -> Result<Arc<Shared>, String> {
        self.lock()
            .iter()
            .find(|j| j.options.id == id)
            .cloned()
            .ok_or_else(|| "Job not found".to_string())
    }

    /// `job-cancel`: the run stops at its next pause point (a paused job is resumed for it);
    /// a job pending finalization is aborted before this returns.
    pub fn cancel(&self, id: &str) -> Result<(), String> {
        let job = self.find(id)?;
        let mut state = job.lock();
        apply_verb(&job, &state, JobVerb::Cancel)?;
        if state.user_paused {
            state.user_paused = false;
            state.pause_count -= 1;
        }
        state.cancelled = true;
        job.notify();
        let state = job.wait_while(state, |s| s.status == JobStatus::Pending);
        drop(state);
        Ok(())
    }

    /// At daemon exit, as QEMU's `job_cancel_sync_all`: every job not yet concluded is
    /// cancelled (a paused one too) and this waits until it has concluded; then every job is
    /// dismissed (`null`), as qemu-storage-daemon does. A step in progress (an image being
    /// written) ends first, so the daemon leaves no half-written image behind, and a cancelled
    /// job reports `Operation canceled`, never success; nothing is removed. The events go out
    /// before the monitors close.
    pub fn cancel_all_sync(&self) {
        let jobs: Vec<Arc<Shared>> = self.lock().clone();
        for job in jobs {
            let mut state = job.lock();
            if !matches!(state.status, JobStatus::Concluded | JobStatus::Null) {
                log::info!("job '{}': cancelled at exit", job.options.id);
                if state.user_paused {
                    state.user_paused = false;
                    state.pause_count -= 1;
                }
                state.cancelled = true;
                job.notify();
                state = job.wait_while(state, |s| {
                    !matches!(s.status, JobStatus::Concluded | JobStatus::Null)
                });
            }
            if state.status == JobStatus::Concluded {
                job.dismiss(&mut state);
            }
            drop(state);
            job.deliver();
        }
    }

    /// `job-pause`: takes effect at the job's next pause point.
    pub fn pause(&self, id: &str) -> Result<(), String> {
        let job = self.find(id)?;
        let mut state = job.lock();
        apply_verb(&job, &state, JobVerb::Pause)?;
        if state.user_paused {
            return Err("Job is already paused".into());
        }
        state.user_paused = true;
        state.pause_count += 1;
        Ok(())
    }

    /// `job-resume`.
    pub fn resume(&self, id: &str) -> Result<(), String> {
        let job = self.find(id)?;
        let mut state = job.lock();
        if !state.user_paused || state.pause_count == 0 {
            return Err("Can't resume a job that was not paused".into());
        }
        apply_verb(&job, &state, JobVerb::Resume)?;
        state.user_paused = false;
        state.pause_count -= 1;
        job.notify();
        Ok(())
    }

    /// `job-complete`: for a ready job of a type that completes.
    pub fn complete(&self, id: &str) -> Result<(), String> {
        let job = self.find(id)?;
        let mut state = job.lock();
        apply_verb(&job, &state, JobVerb::Complete)?;
        if state.pause_count > 0 || state.cancelled || !job.can_complete {
            return Err(format!(
                "The active block job '{}' cannot be completed",
                job.options.id
            ));
        }
        state.complete_requested = true;
        job.notify();
        Ok(())
    }

    /// `job-finalize`: a pending job commits (or aborts) and concludes before this returns.
    pub fn finalize(&self, id: &str) -> Result<(), String> {
        let job = self.find(id)?;
        let mut state = job.lock();
        apply_verb(&job, &state, JobVerb::Finalize)?;
        state.finalize_requested = true;
        job.notify();
        let state = job.wait_while(state, |s| s.status == JobStatus::Pending);
        drop(state);
        Ok(())
    }

    /// `job-dismiss`: a concluded job goes.
    pub fn dismiss(&self, id: &str) -> Result<(), String> {
        let job = self.find(id)?;
        let mut state = job.lock();
        apply_verb(&job, &state, JobVerb::Dismiss)?;
        job.dismiss(&mut state);
        drop(state);
        job.deliver();
        Ok(())
    }
}

/// QEMU's refusal of a verb the job's state does not take.
fn apply_verb(job: &Shared, state: &State, verb: JobVerb) -> Result<(), String> {
    if verb.allowed_in(state.status) {
        return Ok(());
    }
    Err(format!(
        "Job '{}' in state '{}' cannot accept command verb '{}'",
        job.options.id,
        state.status.name(),
        verb.name()
    ))
}

/// QEMU's id_wellformed: a letter, then letters, digits, '-', '.' and '_'.
fn id_wellformed(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}
