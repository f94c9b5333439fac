//! Helper threads for the few system calls io_uring cannot issue (BLKDISCARD): the call blocks
//! a helper, and the request's future waits for it, so a queue's worker thread never blocks.
//!
//! A small pool, started on first use: a job goes to an idle helper, or to a new one while
//! fewer than [`MAX_HELPERS`] exist; otherwise it waits in the queue.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};

use futures::channel::oneshot;

use crate::error::{BlockError, Result};

/// Most helper threads (QEMU's thread pool allows 64; these calls are rare).
const MAX_HELPERS: usize = 8;

type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    helpers: usize,
    idle: usize,
}

#[derive(Default)]
struct Pool {
    queue: Mutex<Queue>,
    ready: Condvar,
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Jobs run outside the lock, so a panic cannot leave the queue half-updated.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn submit(&'static self, job: Job) -> Result<()> {
        let mut q = self.lock();
        q.jobs.push_back(job);
        if q.idle > 0 || q.helpers >= MAX_HELPERS {
            self.ready.notify_one();
            return Ok(());
        }
        q.helpers += 1;
        drop(q);
        let spawned = std::thread::Builder::new()
            .name("strata-blocking".into())
            .spawn(move || self.serve());
        if let Err(e) = spawned {
            let mut q = self.lock();
            q.helpers -= 1;
            // Nobody will run it: take the job back (dropping it tells the waiter).
            q.jobs.pop_back();
            return Err(BlockError::io(&e, "Could not start a helper thread"));
        }
        Ok(())
    }

    fn serve(&self) {
        let mut q = self.lock();
        loop {
            if let Some(job) = q.jobs.pop_front() {
                drop(q);
                job();
                q = self.lock();
                continue;
            }
            q.idle += 1;
            q = self.ready.wait(q).unwrap_or_else(|p| p.into_inner());
            q.idle -= 1;
        }
    }
}

static POOL: OnceLock<Pool> = OnceLock::new();

/// Runs `f` on a helper thread; the future resolves to its result. Dropping the future does
/// not stop `f`, which should own what it uses (e.g. a duplicated file descriptor).
pub async fn run_blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let (tx, rx) = oneshot::channel();
    let job: Job = Box::new(move || {
        // The receiver may be gone (the request was dropped): nothing to tell then.
        let _ = tx.send(f());
    });
    POOL.get_or_init(Pool::default).submit(job)?;
    rx.await
        .map_err(|_| BlockError::new(libc::EIO, "a helper thread dropped its job"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::executor::block_on;

    #[test]
    fn runs_jobs_off_the_calling_thread() {
        let me = std::thread::current().id();
        let other = block_on(run_blocking(move || std::thread::current().id() != me))
            .expect("executor")
            .expect("job");
        assert!(other);
    }

    #[test]
    fn more_jobs_than_helpers_all_finish() {
        let results = block_on(async {
            let jobs: Vec<_> = (0..3 * MAX_HELPERS as u64)
                .map(|i| {
                    run_blocking(move || {
                        std::thread::sleep(std::time::Duration::from_millis(5));
                        i * 2
                    })
                })
                .collect();
            futures::future::join_all(jobs).await
        })
        .expect("executor");
        let want: Vec<u64> = (0..3 * MAX_HELPERS as u64).map(|i| i * 2).collect();
        let got: Vec<u64> = results.into_iter().map(|r| r.expect("job")).collect();
        assert_eq!(got, want);
    }
}
