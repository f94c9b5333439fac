//! The job framework against QEMU's job model: each verb applied in each state a client can
//! see, with QEMU's refusals and texts, and the event sequences QEMU sends, on real threads.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::status::{JobStatus, JobVerb, ALL_STATUSES, ALL_VERBS};
use super::{Job, JobContext, JobOptions, Jobs, RunError};

/// How the test job behaves.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Runs until `release` is set, then succeeds.
    UntilReleased,
    /// Becomes ready at once and runs until completed (a mirror).
    Mirror,
    /// Fails at once.
    Fail,
    /// Succeeds, then fails in prepare.
    FailPrepare,
}

struct TestJob {
    mode: Mode,
    release: Arc<AtomicBool>,
    hooks: Arc<Mutex<Vec<&'static str>>>,
}

impl Job for TestJob {
    fn job_type(&self) -> &'static str {
        "test"
    }

    fn run(&mut self, ctx: &JobContext) -> Result<(), RunError> {
        ctx.set_remaining(10);
        match self.mode {
            Mode::Fail => return Err(RunError::Failed("it broke".into())),
            Mode::Mirror => {
                ctx.set_ready();
                while !ctx.should_complete() {
                    ctx.pause_point()?;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            Mode::UntilReleased | Mode::FailPrepare => {
                while !self.release.load(Ordering::Acquire) {
                    ctx.pause_point()?;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        ctx.add_progress(10);
        Ok(())
    }

    fn can_complete(&self) -> bool {
        self.mode == Mode::Mirror
    }

    fn prepare(&mut self) -> Result<(), String> {
        self.hooks.lock().unwrap().push("prepare");
        match self.mode {
            Mode::FailPrepare => Err("prepare failed".into()),
            _ => Ok(()),
        }
    }

    fn commit(&mut self) {
        self.hooks.lock().unwrap().push("commit");
    }

    fn abort(&mut self) {
        self.hooks.lock().unwrap().push("abort");
    }
}

/// A daemon's jobs with the events recorded.
struct Rig {
    jobs: Jobs,
    events: Arc<Mutex<Vec<(String, JobStatus)>>>,
    release: Arc<AtomicBool>,
    hooks: Arc<Mutex<Vec<&'static str>>>,
}

impl Rig {
    fn new() -> Self {
        let jobs = Jobs::default();
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        jobs.set_listener(Arc::new(move |id: &str, status| {
            sink.lock().unwrap().push((id.to_string(), status));
        }));
        Rig {
            jobs,
            events,
            release: Arc::new(AtomicBool::new(false)),
            hooks: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn start(&self, id: &str, mode: Mode, auto_finalize: bool, auto_dismiss: bool) {
        let job = TestJob {
            mode,
            release: self.release.clone(),
            hooks: self.hooks.clone(),
        };
        let options = JobOptions {
            id: id.into(),
            auto_finalize,
            auto_dismiss,
        };
        self.jobs.start(options, Box::new(job)).unwrap();
    }

    fn status(&self, id: &str) -> Option<JobStatus> {
        self.jobs
            .query()
            .into_iter()
            .find(|j| j.id == id)
            .map(|j| j.status)
    }

    fn wait_for(&self, id: &str, want: Option<JobStatus>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.status(id) != want {
            assert!(
                Instant::now() < deadline,
                "job {id}: {:?}, expected {want:?}",
                self.status(id)
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The statuses sent for `id` so far.
    fn sent(&self, id: &str) -> Vec<&'static str> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|(j, _)| j == id)
            .map(|(_, s)| s.name())
            .collect()
    }

    /// A job in `state`, as a client can see it, made through the commands.
    fn job_in(&self, id: &str, state: JobStatus) {
        match state {
            JobStatus::Running => self.start(id, Mode::UntilReleased, true, false),
            JobStatus::Paused => {
                self.start(id, Mode::UntilReleased, true, false);
                self.jobs.pause(id).unwrap();
            }
            JobStatus::Ready => self.start(id, Mode::Mirror, true, false),
            JobStatus::Standby => {
                self.start(id, Mode::Mirror, true, false);
                self.wait_for(id, Some(JobStatus::Ready));
                self.jobs.pause(id).unwrap();
            }
            JobStatus::Pending => {
                self.start(id, Mode::Mirror, false, false);
                self.wait_for(id, Some(JobStatus::Ready));
                self.jobs.complete(id).unwrap();
            }
            JobStatus::Concluded => self.start(id, Mode::Fail, true, false),
            other => unreachable!("{other:?} is not visible to clients"),
        }
        self.wait_for(id, Some(state));
    }
}

fn apply(jobs: &Jobs, verb: JobVerb, id: &str) -> Result<(), String> {
    match verb {
        JobVerb::Cancel => jobs.cancel(id),
        JobVerb::Pause => jobs.pause(id),
        JobVerb::Resume => jobs.resume(id),
        JobVerb::Complete => jobs.complete(id),
        JobVerb::Finalize => jobs.finalize(id),
        JobVerb::Dismiss => jobs.dismiss(id),
        JobVerb::SetSpeed => unreachable!("no command applies set-speed"),
    }
}

/// The states a client sees a job in (the others pass within one step of the job thread).
const VISIBLE: [JobStatus; 6] = [
    JobStatus::Running,
    JobStatus::Paused,
    JobStatus::Ready,
    JobStatus::Standby,
    JobStatus::Pending,
    JobStatus::Concluded,
];

#[test]
fn every_verb_in_every_visible_state_is_accepted_or_refused_as_in_qemu() {
    let rig = Rig::new();
    for state in VISIBLE {
        for verb in ALL_VERBS {
            if verb == JobVerb::SetSpeed {
                continue;
            }
            let id = format!("{}-{}", state.name(), verb.name());
            rig.job_in(&id, state);
            let result = apply(&rig.jobs, verb, &id);
            let refused = format!(
                "Job '{id}' in state '{}' cannot accept command verb '{}'",
                state.name(),
                verb.name()
            );
            // What QEMU 7.2 does with each pair (job.c, job-qmp.c).
            let (want, after): (Result<(), String>, Option<JobStatus>) = match (verb, state) {
                // Resume checks for a user pause before the table.
                (JobVerb::Resume, JobStatus::Paused | JobStatus::Standby) => (
                    Ok(()),
                    Some(if state == JobStatus::Paused {
                        JobStatus::Running
                    } else {
                        JobStatus::Ready
                    }),
                ),
                (JobVerb::Resume, _) => (
                    Err("Can't resume a job that was not paused".into()),
                    Some(state),
                ),
                (JobVerb::Pause, JobStatus::Paused | JobStatus::Standby) => {
                    (Err("Job is already paused".into()), Some(state))
                }
                (JobVerb::Pause, JobStatus::Running) => (Ok(()), Some(JobStatus::Paused)),
                (JobVerb::Pause, JobStatus::Ready) => (Ok(()), Some(JobStatus::Standby)),
                (JobVerb::Cancel, s) if s != JobStatus::Concluded => {
                    (Ok(()), Some(JobStatus::Concluded))
                }
                (JobVerb::Complete, JobStatus::Ready) => (Ok(()), Some(JobStatus::Concluded)),
                (JobVerb::Finalize, JobStatus::Pending) => (Ok(()), Some(JobStatus::Concluded)),
                (JobVerb::Dismiss, JobStatus::Concluded) => (Ok(()), None),
                _ => (Err(refused), Some(state)),
            };
            assert_eq!(result, want, "{} in {}", verb.name(), state.name());
            assert_eq!(
                result.is_ok() || want.as_ref().is_err_and(|e| !e.contains("verb")),
                verb.allowed_in(state) || verb == JobVerb::Resume,
                "{} in {}: the outcome follows QEMU's verb table",
                verb.name(),
                state.name()
            );
            rig.wait_for(&id, after);
            // Leave nothing running.
            if let Some(status) = rig.status(&id) {
                if status != JobStatus::Concluded {
                    if matches!(status, JobStatus::Paused | JobStatus::Standby) {
                        rig.jobs.resume(&id).unwrap();
                    }
                    rig.jobs.cancel(&id).unwrap();
                    rig.wait_for(&id, Some(JobStatus::Concluded));
                }
                rig.jobs.dismiss(&id).unwrap();
            }
        }
    }
    // Every event sent followed QEMU's transition table.
    let events = rig.events.lock().unwrap().clone();
    for id in events.iter().map(|(id, _)| id.clone()) {
        let mut from = JobStatus::Undefined;
        for (_, to) in events.iter().filter(|(j, _)| *j == id) {
            assert!(from.may_become(*to), "{id}: {from:?} -> {to:?}");
            from = *to;
        }
        assert_eq!(from, JobStatus::Null, "{id} ends dismissed");
    }
}

/// The events QEMU sends for a job that completes and is then dismissed.
const COMPLETED_AND_DISMISSED: [&str; 6] = [
    "created",
    "running",
    "waiting",
    "pending",
    "concluded",
    "null",
];

#[test]
fn event_sequences_are_qemus() {
    let rig = Rig::new();
    rig.release.store(true, Ordering::Release);
    rig.start("auto", Mode::UntilReleased, true, true);
    rig.wait_for("auto", None);
    assert_eq!(rig.sent("auto"), COMPLETED_AND_DISMISSED);
    assert_eq!(*rig.hooks.lock().unwrap(), ["prepare", "commit"]);

    rig.hooks.lock().unwrap().clear();
    rig.start("manual", Mode::UntilReleased, false, false);
    rig.wait_for("manual", Some(JobStatus::Pending));
    assert_eq!(
        rig.hooks.lock().unwrap().len(),
        0,
        "no hook before finalize"
    );
    rig.jobs.finalize("manual").unwrap();
    assert_eq!(rig.status("manual"), Some(JobStatus::Concluded));
    let info = rig.jobs.query().into_iter().find(|j| j.id == "manual");
    let info = info.unwrap();
    assert_eq!((info.current_progress, info.total_progress), (10, 10));
    assert_eq!(info.error, None);
    rig.jobs.dismiss("manual").unwrap();
    assert_eq!(rig.sent("manual"), COMPLETED_AND_DISMISSED);
    assert_eq!(*rig.hooks.lock().unwrap(), ["prepare", "commit"]);

    rig.hooks.lock().unwrap().clear();
    rig.start("broken", Mode::Fail, true, false);
    rig.wait_for("broken", Some(JobStatus::Concluded));
    assert_eq!(
        rig.sent("broken"),
        ["created", "running", "aborting", "concluded"]
    );
    let info = rig.jobs.query().into_iter().find(|j| j.id == "broken");
    assert_eq!(info.unwrap().error.as_deref(), Some("it broke"));
    assert_eq!(*rig.hooks.lock().unwrap(), ["abort"]);

    rig.hooks.lock().unwrap().clear();
    rig.start("late", Mode::FailPrepare, true, true);
    rig.wait_for("late", None);
    assert_eq!(
        rig.sent("late"),
        [
            "created",
            "running",
            "waiting",
            "pending",
            "aborting",
            "concluded",
            "null"
        ]
    );
    assert_eq!(*rig.hooks.lock().unwrap(), ["prepare", "abort"]);
}

#[test]
fn a_paused_job_stops_at_its_pause_point_and_a_cancel_resumes_it_to_abort() {
    let rig = Rig::new();
    rig.job_in("p", JobStatus::Paused);
    // Paused: it makes no progress even once its work could finish.
    rig.release.store(true, Ordering::Release);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(rig.status("p"), Some(JobStatus::Paused));
    rig.jobs.cancel("p").unwrap();
    rig.wait_for("p", Some(JobStatus::Concluded));
    let info = rig.jobs.query().into_iter().find(|j| j.id == "p").unwrap();
    assert_eq!(info.error.as_deref(), Some("Operation canceled"));
    // The cancel took back the user's pause, as QEMU's does.
    assert_eq!(
        rig.jobs.resume("p"),
        Err("Can't resume a job that was not paused".into())
    );
    assert_eq!(
        rig.sent("p"),
        [
            "created",
            "running",
            "paused",
            "running",
            "aborting",
            "concluded"
        ]
    );
}

#[test]
fn ids_are_checked_and_unknown_ids_are_not_found() {
    let rig = Rig::new();
    for verb in ALL_VERBS {
        if verb != JobVerb::SetSpeed {
            assert_eq!(apply(&rig.jobs, verb, "nope"), Err("Job not found".into()));
        }
    }
    rig.start("a", Mode::Fail, true, false);
    let again = TestJob {
        mode: Mode::Fail,
        release: rig.release.clone(),
        hooks: rig.hooks.clone(),
    };
    let options = |id: &str| JobOptions {
        id: id.into(),
        auto_finalize: true,
        auto_dismiss: false,
    };
    assert_eq!(
        rig.jobs.start(options("a"), Box::new(again)),
        Err("Job ID 'a' already in use".into())
    );
    for bad in ["", "1a", "a b", "-x"] {
        let job = TestJob {
            mode: Mode::Fail,
            release: rig.release.clone(),
            hooks: rig.hooks.clone(),
        };
        assert_eq!(
            rig.jobs.start(options(bad), Box::new(job)),
            Err(format!("Invalid job ID '{bad}'"))
        );
    }
}

#[test]
fn the_tables_are_qemus() {
    // Spot checks of JobSTT and JobVerbTable read from QEMU's job.c, beyond what the
    // commands above reach: states a client never sees.
    use JobStatus::*;
    assert!(Undefined.may_become(Created));
    assert!(Created.may_become(Running) && Created.may_become(Aborting));
    assert!(Created.may_become(Null) && !Created.may_become(Concluded));
    assert!(Waiting.may_become(Pending) && Waiting.may_become(Aborting));
    assert!(!Paused.may_become(Aborting) && !Standby.may_become(Aborting));
    assert!(ALL_STATUSES.iter().all(|s| !Null.may_become(*s)));
    assert!(JobVerb::Cancel.allowed_in(Created) && JobVerb::Cancel.allowed_in(Waiting));
    assert!(!JobVerb::Cancel.allowed_in(Aborting));
    assert!(JobVerb::SetSpeed.allowed_in(Standby) && !JobVerb::SetSpeed.allowed_in(Waiting));
    let accepting: usize = ALL_VERBS
        .iter()
        .map(|v| ALL_STATUSES.iter().filter(|s| v.allowed_in(**s)).count())
        .sum();
    assert_eq!(accepting, 7 + 5 + 5 + 5 + 1 + 1 + 1);
}

#[test]
fn at_exit_every_job_is_cancelled_concluded_and_dismissed_before_the_call_returns() {
    let rig = Rig::new();
    rig.job_in("run", JobStatus::Running);
    rig.job_in("pause", JobStatus::Paused);
    rig.job_in("ready", JobStatus::Ready);
    rig.job_in("pend", JobStatus::Pending);
    rig.job_in("done", JobStatus::Concluded);
    rig.jobs.cancel_all_sync();
    assert!(rig.jobs.query().is_empty());
    for id in ["run", "pause", "ready", "pend"] {
        let sent = rig.sent(id);
        assert_eq!(
            sent[sent.len() - 3..],
            ["aborting", "concluded", "null"],
            "{id}"
        );
        // Only the one waiting for job-finalize had finished its run.
        assert_eq!(sent.contains(&"waiting"), id == "pend", "{id}: {sent:?}");
    }
    // A job concluded before is only dismissed.
    assert_eq!(
        rig.sent("done"),
        ["created", "running", "aborting", "concluded", "null"]
    );
    assert_eq!(
        rig.hooks
            .lock()
            .unwrap()
            .iter()
            .filter(|h| **h == "abort")
            .count(),
        5
    );
    assert!(!rig.hooks.lock().unwrap().contains(&"commit"));
}
