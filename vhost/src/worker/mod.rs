//! The event loop of one vhost-user-backend worker thread: the virtqueues it runs, its
//! executor on the thread's own io_uring, batches of requests, used-ring entries and guest
//! notifications, and busy polling.
//!
//! A kick drains the available ring, spawns one task per request, submits their I/O as it
//! goes, and completes whatever finished at once; the io_uring's completion eventfd, an extra
//! listener of the thread's epoll, delivers the rest. Used entries are pushed in batches with
//! one notification. No lock is shared between queues: each virtqueue has its own vring lock,
//! taken only by its worker (and briefly by control messages).

use std::cell::RefCell;
use std::os::fd::BorrowedFd;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};

use strata_backend::accounting::clock;
use strata_backend::LocalExecutor;
use vhost_user_backend::{VringMutex, VringState, VringT};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::accounting::{refusal_counts, RefusalCount};
use crate::device::Device;
use crate::inflight::Tracker;
use crate::memory_faults;
use crate::regions::RegionCache;
use crate::request::{self, Desc, DescTable, Outcome, TableView};
use crate::request_task::{request_task, Origin};
use crate::split_ring::SplitRing;
use crate::task_ctx::{Done, HeldMem, TaskCtx};

mod busy_poll;
mod event;
mod poll_window;

use poll_window::PollWindow;

thread_local! {
    static WORKER: RefCell<Option<Worker>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's worker for `dev`, creating it on first use; None (logged once
/// per device) when the worker cannot be set up.
pub(crate) fn with_worker<R>(
    dev: &Device,
    thread_id: usize,
    f: impl FnOnce(&mut Worker) -> R,
) -> Option<R> {
    WORKER.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|w| w.device != dev.instance()) {
            *slot = None;
            match Worker::new(dev, thread_id) {
                Ok(w) => *slot = Some(w),
                Err(e) => {
                    if dev.first_worker_failure() {
                        log::error!(
                            "vhost-user-blk export '{}': could not start worker \
                             {thread_id}, its queues are not served: {e}",
                            dev.cfg.id
                        );
                    }
                    return None;
                }
            }
        }
        slot.as_mut().map(f)
    })
}

/// The state of one vhost-user-backend worker thread.
pub(crate) struct Worker {
    /// The device ([`Device::instance`]) this worker serves.
    device: u64,
    exec: LocalExecutor<'static>,
    ctx: Rc<TaskCtx>,
    /// Global virtqueue index of each slot.
    queues: Vec<usize>,
    /// Whether the driver may use indirect descriptor tables.
    indirect: bool,
    /// The chain being parsed.
    descs: Vec<Desc>,
    /// The chain heads of the batch being started.
    heads: Vec<u16>,
    /// The finished requests being published.
    spare: Vec<Done>,
    /// Busy-poll window after the last activity, adapted to how long the worker waits.
    poll: PollWindow,
    /// When the worker last found work (a [`clock::read`] reading; 0: not known), from which
    /// the next event measures how long it waited for work.
    last_work: u64,
    /// Slots of the rings a busy-poll stint watches.
    active: Vec<usize>,
    /// The memory table the requests started during this event hold (see [`HeldMem`]).
    held: Option<Rc<HeldMem>>,
    /// Slots of the virtqueues whose budget ran out with requests left (see
    /// [`Self::come_back_to`]).
    backlog: Vec<usize>,
    /// The backlog being run.
    backlog_run: Vec<usize>,
    /// Slots of the virtqueues with requests left because a queue's worth was in flight; they
    /// go on the backlog when some of theirs complete.
    out_of_room: Vec<usize>,
    /// [`memory_faults::faults`] when this worker last looked.
    faults_seen: u64,
    /// In-flight tracking in the frontend's buffer ([`crate::inflight`]).
    tracker: Tracker,
    /// Slots of the virtqueues left alone while the export was paused; they go on the
    /// backlog when the pause ends ([`Device::wake_workers`]).
    paused: Vec<usize>,
}

/// The requests taken from one virtqueue's available ring under one hold of its vring lock.
struct Batch<'m> {
    /// Global index of the virtqueue.
    queue: usize,
    /// The virtqueue's slot on this thread.
    slot: usize,
    desc_table: TableView<'m>,
    regions: RegionCache<'m>,
    ring: SplitRing<'m>,
    /// The used index at the last notification check.
    since: u16,
    /// Requests of the batch already in the used ring.
    published: usize,
    /// The queue's epoch ([`crate::device::DevState::epoch`]) its requests are taken in.
    epoch: u32,
    /// When the batch was taken (the accounting clock's time): its requests' start.
    started: u64,
}

impl Worker {
    /// Sets up worker thread `thread_id` of `dev`: its executor, whose completion eventfd joins
    /// the thread's epoll, and its virtqueues.
    fn new(dev: &Device, thread_id: usize) -> Result<Worker, String> {
        let exec = LocalExecutor::in_event_loop().map_err(|e| e.to_string())?;
        let handler = dev
            .epoll_handler(thread_id)
            .ok_or("its epoll handler is gone")?;
        handler
            .register_listener(exec.reactor().eventfd(), EventSet::IN, dev.eventfd_token())
            .map_err(|e| format!("could not watch the io_uring eventfd: {e}"))?;
        // SAFETY: the reactor's eventfd stays open while `exec` lives; the device keeps its
        // own duplicate.
        let eventfd = unsafe { BorrowedFd::borrow_raw(exec.reactor().eventfd()) };
        dev.add_waker(eventfd)
            .map_err(|e| format!("could not duplicate the io_uring eventfd: {e}"))?;
        let queues = dev
            .thread_queues(thread_id)
            .ok_or("unknown worker thread")?
            .to_vec();
        log::debug!(
            "vhost-user-blk export '{}': worker {thread_id} runs queues {queues:?}",
            dev.cfg.id
        );
        let slots = queues.len();
        Ok(Worker {
            device: dev.instance(),
            exec,
            ctx: Rc::new(TaskCtx::new(
                dev.cfg.clone(),
                dev.state.clone(),
                queues.len(),
            )),
            queues,
            indirect: dev.indirect_desc(),
            descs: Vec::new(),
            heads: Vec::new(),
            spare: Vec::new(),
            poll: PollWindow::new(dev.cfg.poll_max_ns),
            last_work: 0,
            active: Vec::new(),
            held: None,
            backlog: Vec::new(),
            backlog_run: Vec::new(),
            out_of_room: Vec::new(),
            faults_seen: memory_faults::faults(),
            tracker: Tracker::new(slots),
            paused: Vec::new(),
        })
    }

    /// Takes the available requests of the virtqueue in `slot` and starts them, then turns
    /// guest notifications (kicks) back on.
    ///
    /// At most a queue's worth of requests per call: a driver that keeps publishing would
    /// otherwise hold the worker here and starve its other queues. When the budget runs out
    /// with requests left, the queue goes on the backlog ([`Self::come_back_to`]).
    fn process_queue(&mut self, dev: &Device, slot: usize, vring: &VringMutex) {
        if dev.paused() {
            self.leave_while_paused(slot);
            return;
        }
        self.indirect = dev.indirect_desc();
        let mem = dev.mem.memory().into_inner();
        let mut budget = usize::from(dev.cfg.queue_size);
        loop {
            // A round costs at least one unit of the budget even when it takes nothing, so the
            // worker gets back to its epoll loop (other queues, exit events) whatever the ring
            // says.
            let taken = self.run_batch(dev, &mem, slot, vring);
            if self.out_of_room.contains(&slot) {
                // Nothing more can start until some complete; notifications stay off.
                return;
            }
            budget = budget.saturating_sub(taken.max(1));
            let more = {
                let mut state = vring.get_mut();
                let enabled = state.is_enabled();
                let q = state.get_queue_mut();
                enabled && q.ready() && q.enable_notification(&*mem).unwrap_or(false)
            };
            // A request made available while notifications were off: go round again, or come
            // back after the other queues.
            if !more {
                return;
            }
            if budget == 0 {
                self.come_back_to(dev, slot);
                return;
            }
        }
    }

    /// Puts the virtqueue in `slot`, which has requests left after its budget ran out, on the
    /// backlog, and raises the worker's own eventfd: its epoll loop comes back to the queue
    /// after the events already pending (the other queues' kicks). The worker's eventfd, not
    /// the queue's kick eventfd, which the frontend owns and could leave unwritable.
    fn come_back_to(&mut self, dev: &Device, slot: usize) {
        if !self.backlog.contains(&slot) {
            self.backlog.push(slot);
        }
        self.raise_eventfd(dev);
    }

    /// Requests of the virtqueue in `slot` were published: if it had requests left for want of
    /// room, come back to it.
    fn room_made(&mut self, dev: &Device, slot: usize) {
        if let Some(i) = self.out_of_room.iter().position(|&s| s == slot) {
            self.out_of_room.swap_remove(i);
            self.come_back_to(dev, slot);
        }
    }

    /// Leaves the virtqueue in `slot` until the pause ends.
    fn leave_while_paused(&mut self, slot: usize) {
        if !self.paused.contains(&slot) {
            self.paused.push(slot);
        }
    }

    /// Runs the virtqueues on the backlog (each with a new budget).
    fn run_backlog(&mut self, dev: &Device, vrings: &[VringMutex]) {
        if self.backlog.is_empty() {
            return;
        }
        std::mem::swap(&mut self.backlog, &mut self.backlog_run);
        for i in 0..self.backlog_run.len() {
            let slot = self.backlog_run[i];
            if let Some(vring) = vrings.get(slot) {
                self.process_queue(dev, slot, vring);
            }
        }
        self.backlog_run.clear();
        self.submit();
    }

    /// Starts every request made available on the virtqueue in `slot`, publishing and
    /// notifying as they finish; returns how many it took. Guest notifications stay off: the
    /// caller turns them back on (`process_queue`).
    fn run_batch(
        &mut self,
        dev: &Device,
        mem: &Arc<GuestMemoryMmap>,
        slot: usize,
        vring: &VringMutex,
    ) -> usize {
        let Some(&queue) = self.queues.get(slot) else {
            return 0;
        };
        // The vring stays locked for the whole batch: one lock instead of one per request,
        // whose atomic operations would each wait for the used-ring stores before them.
        let mut state = vring.get_mut();
        let Some(mut batch) = self.open_batch(dev, mem, queue, slot, &mut state) else {
            return 0;
        };
        let held = self.hold(mem);
        request::prefetch_chains(&mut batch.regions, &batch.desc_table, &self.heads);
        for i in 0..self.heads.len() {
            let head = self.heads[i];
            self.start_request(dev, &held, &mut batch, head);
            // Each request goes to the kernel as soon as it is parsed, as QSD does: the disk
            // starts on the first while the rest are parsed. Requests that queue no I/O
            // (null-co, bad chains) cost no system call.
            self.submit();
            self.publish_finished(dev, &mut batch, &mut state);
        }
        let published = batch.published;
        close_batch(dev, batch, state);
        if published > 0 {
            self.room_made(dev, slot);
        }
        self.heads.len()
    }

    /// Opens a batch on the virtqueue whose vring `state` the caller holds locked: turns guest
    /// notifications off, takes the heads of the chains made available into `self.heads`, and
    /// counts them in flight. None when the queue is not running or has nothing new.
    fn open_batch<'m>(
        &mut self,
        dev: &Device,
        mem: &'m GuestMemoryMmap,
        queue: usize,
        slot: usize,
        state: &mut VringState,
    ) -> Option<Batch<'m>> {
        if !state.is_enabled() || !state.get_queue().ready() {
            self.tracker.stopped(slot);
            return None;
        }
        if dev.quiescing() {
            return None;
        }
        if dev.paused() {
            self.leave_while_paused(slot);
            return None;
        }
        let q = state.get_queue_mut();
        let _ = q.disable_notification(mem);
        self.tracker.refresh(&dev.inflight);
        let in_flight = dev.state.inflight[queue].load(Ordering::Acquire);
        let resubmitted = self.tracker.start(slot, queue, q, mem, in_flight);
        if resubmitted > 0 {
            log::info!(
                "vhost-user-blk export '{}': queue {queue}: resubmitting {resubmitted} \
                 requests that were in flight at the last disconnect",
                dev.cfg.id
            );
        }
        // The common busy-poll round finds nothing new: one load, no region lookups.
        match q.avail_idx(mem, Ordering::Acquire) {
            Ok(idx) if idx.0 == q.next_avail() && !self.tracker.has_resubmit(slot) => return None,
            Ok(_) => {}
            Err(e) => {
                stop_broken_queue(dev, queue, q, &e);
                return None;
            }
        }
        let desc_table = DescTable {
            addr: GuestAddress(q.desc_table()),
            size: q.size(),
        };
        let mut regions = RegionCache::new(mem);
        let ring = SplitRing::new(&mut regions, q);
        // Entries published before this batch were all checked for a notification.
        let since = q.next_used();
        self.heads.clear();
        // Never more requests in flight than the queue has entries: a driver that re-publishes
        // entries before their requests complete (only a broken or hostile one can) waits for
        // completions ([`Self::complete`] comes back to the queue).
        let room = u16::try_from(usize::from(q.size()).saturating_sub(in_flight)).unwrap_or(0);
        // Requests resubmitted after a reconnect go first, in their original order.
        let room = room - self.tracker.take_resubmit(slot, room, &mut self.heads);
        match ring.take_available(q, &mut self.heads, room) {
            Ok(true) => {
                if !self.out_of_room.contains(&slot) {
                    self.out_of_room.push(slot);
                }
            }
            Ok(false) => {}
            Err(e) => {
                stop_broken_queue(dev, queue, q, &e);
                return None;
            }
        }
        if self.heads.is_empty() {
            return None;
        }
        self.tracker.mark(slot, queue, q.size(), &self.heads);
        // Counted under the vring lock: GET_VRING_BASE marks the ring stopped under it too, so
        // its drain sees every request taken before.
        dev.state.inflight[queue].fetch_add(self.heads.len(), Ordering::AcqRel);
        let desc_table = desc_table.view(&mut regions);
        Some(Batch {
            queue,
            slot,
            desc_table,
            regions,
            ring,
            since,
            published: 0,
            epoch: dev.state.epoch[queue].load(Ordering::Acquire),
            // One clock reading for the batch (the only one when its requests complete at
            // once); the requests it starts take it as their start too.
            started: clock::refresh(),
        })
    }

    /// The worker's hold on `mem` for the requests it starts now.
    fn hold(&mut self, mem: &Arc<GuestMemoryMmap>) -> Rc<HeldMem> {
        match &self.held {
            Some(held) if Arc::ptr_eq(&held.0, mem) => held.clone(),
            _ => {
                let held = Rc::new(HeldMem(mem.clone()));
                self.held = Some(held.clone());
                held
            }
        }
    }

    /// Walks and parses the chain at `head` and spawns its task; a refused request gets its
    /// status at once, a chain without one is returned untouched.
    fn start_request(
        &mut self,
        dev: &Device,
        held: &Rc<HeldMem>,
        batch: &mut Batch<'_>,
        head: u16,
    ) {
        let ctx = &self.ctx;
        let (queue, slot, epoch) = (batch.queue, batch.slot, batch.epoch);
        let origin = Origin {
            slot,
            head,
            epoch,
            started: batch.started,
        };
        let size = batch.desc_table.table.size;
        if head >= size {
            // Not a descriptor: there is nothing to complete. Forget it.
            ctx.log_failure(
                &format!("queue {queue}: skipped available entry"),
                &format!("head index {head} outside the {size}-entry queue"),
            );
            dev.state.inflight[queue].fetch_sub(1, Ordering::AcqRel);
            return;
        }
        let walked = request::walk_chain(
            &mut batch.regions,
            &batch.desc_table,
            head,
            self.indirect,
            &mut self.descs,
        );
        let outcome = match walked {
            Ok(()) => {
                let mut spare = ctx.take_iov();
                let outcome = request::parse(&mut batch.regions, &self.descs, &ctx.cfg, &mut spare);
                ctx.recycle_iov(spare);
                outcome
            }
            Err(why) => Outcome::Drop(why),
        };
        match outcome {
            Outcome::Request(parsed) => {
                self.exec
                    .spawn_with(|| request_task(ctx.clone(), held.clone(), parsed, origin));
            }
            Outcome::Refused(status, why, kind) => {
                ctx.log_failure(&format!("queue {queue}: refused request"), &why);
                match refusal_counts(kind, &why) {
                    Some(RefusalCount::Invalid(kind)) => ctx.cfg.stats.invalid(kind),
                    Some(RefusalCount::Failed(kind)) => {
                        ctx.cfg.stats.done(kind, 0, batch.started, false);
                    }
                    None => {}
                }
                // SAFETY: `held`, the map parse found the byte in, is held for this call.
                unsafe { status.write(why.status()) };
                let done = Done {
                    head,
                    len: 1,
                    epoch,
                };
                ctx.finish(slot, done, held);
            }
            Outcome::Drop(why) => {
                ctx.log_failure(
                    &format!("queue {queue}: dropped descriptor chain {head}"),
                    &why,
                );
                // Nothing to write a status into; return the chain so the ring does not leak.
                let done = Done {
                    head,
                    len: 0,
                    epoch,
                };
                ctx.finish(slot, done, held);
            }
        }
    }

    /// Puts the requests of the batch that finished at once (null-co, refused, or served from
    /// a cache) in the used ring now, not after the whole batch: the driver, about to sleep
    /// when it finds no completion, finds one instead and keeps submitting.
    ///
    /// The first entries published notify the driver at once (if it asked), so a driver that
    /// went to sleep starts on them while the rest are parsed; the later ones share one
    /// notification when the batch closes: a driver that polls its used ring has seen them
    /// already. Notifying per request would
    /// cost the driver's CPU an eventfd wake-up for many of them; notifying only when the batch
    /// closes would leave a sleeping driver idle while a whole batch of large requests is
    /// parsed.
    fn publish_finished(&mut self, dev: &Device, batch: &mut Batch<'_>, state: &mut VringState) {
        let n = self.publish(dev, &batch.ring, batch.queue, batch.slot, state);
        if n > 0 && batch.published == 0 {
            notify_if_asked(dev, &batch.ring, batch.queue, state, &mut batch.since);
        }
        batch.published += n;
    }

    /// Runs ready tasks and submits their I/O in one system call.
    fn submit(&mut self) {
        if let Err(e) = self.exec.poll() {
            log::error!("vhost-user-blk export '{}': {e}", self.ctx.cfg.id);
        }
    }

    /// Puts finished requests in their used rings, one notification per ring. Returns whether
    /// there were any.
    fn complete(&mut self, dev: &Device, vrings: &[VringMutex]) -> bool {
        if !self.ctx.take_any_done() {
            return false;
        }
        let mem = dev.mem.memory().into_inner();
        for (slot, vring) in vrings.iter().enumerate() {
            let Some(&queue) = self.queues.get(slot) else {
                continue;
            };
            if !self.ctx.has_done(slot) {
                continue;
            }
            let mut state = vring.get_mut();
            let mut regions = RegionCache::new(&mem);
            let ring = SplitRing::new(&mut regions, state.get_queue());
            let mut since = state.get_queue().next_used();
            let n = self.publish(dev, &ring, queue, slot, &mut state);
            notify_if_asked(dev, &ring, queue, &mut state, &mut since);
            drop(state);
            dev.state.inflight[queue].fetch_sub(n, Ordering::AcqRel);
            if n > 0 {
                self.room_made(dev, slot);
            }
        }
        self.ctx.all_published();
        true
    }

    /// Puts the finished requests of the virtqueue in `slot` (queue `queue`, whose vring the
    /// caller has locked and whose rings are `ring`) in its used ring; returns how many. The
    /// caller notifies the driver and takes them off the in-flight count.
    fn publish(
        &mut self,
        dev: &Device,
        ring: &SplitRing<'_>,
        queue: usize,
        slot: usize,
        state: &mut VringState,
    ) -> usize {
        if !self.ctx.take_done(slot, &mut self.spare) {
            return 0;
        }
        let n = self.spare.len();
        // Requests of an epoch the device gave up on when the queue stopped: the ring is the
        // frontend's again (and may be another one now); they stay marked in the in-flight
        // buffer for the next daemon.
        let epoch = dev.state.epoch[queue].load(Ordering::Acquire);
        self.spare.retain(|d| d.epoch == epoch);
        if self.spare.len() < n {
            self.ctx.log_failure(
                &format!(
                    "queue {queue}: dropped {} late completions",
                    n - self.spare.len()
                ),
                &"the queue was stopped without them",
            );
            if self.spare.is_empty() {
                return n;
            }
        }
        let size = state.get_queue().size();
        let heads = || self.spare.iter().map(|d| d.head);
        self.tracker.begin_publish(queue, size, heads());
        let entries = self.spare.iter().map(|d| (d.head, d.len));
        let added = ring.add_used(state.get_queue_mut(), entries);
        if added.is_ok() {
            let used = state.get_queue().next_used();
            self.tracker.end_publish(queue, size, heads(), used);
        }
        if let Err(e) = added {
            self.ctx.log_failure(
                &format!(
                    "queue {queue}: could not complete {} requests",
                    self.spare.len()
                ),
                &e,
            );
        }
        self.spare.clear();
        n
    }
}

/// Stops a virtqueue whose available ring is broken (an index more than a queue size ahead,
/// a ring outside guest memory): nothing more is taken from it, and the failure is logged once,
/// as the queue stays stopped. Its requests in flight still complete; the other queues and the
/// connection go on. The frontend restarts the queue (GET_VRING_BASE, then SET_VRING_KICK) or
/// reconnects. The frontend hears of it through the vring's error eventfd (SET_VRING_ERR) when
/// it gave one, vhost-user's signal of a failed virtqueue; the device status and its
/// NEEDS_RESET bit travel only with the STATUS protocol feature, which vhost-user-backend
/// does not offer.
fn stop_broken_queue(dev: &Device, queue: usize, q: &mut Queue, why: &dyn std::fmt::Display) {
    q.set_ready(false);
    dev.signal_queue_error(queue);
    log::error!(
        "vhost-user-blk export '{}': queue {queue}: bad available ring: {why}; the queue is \
         stopped until the frontend restarts it",
        dev.cfg.id
    );
}

/// Closes a batch: notifies the driver of the entries published since the last check (if it
/// asked), releases the vring, and takes the published requests off the in-flight count.
fn close_batch(dev: &Device, mut batch: Batch<'_>, mut state: MutexGuard<'_, VringState>) {
    notify_if_asked(dev, &batch.ring, batch.queue, &mut state, &mut batch.since);
    drop(state);
    dev.state.inflight[batch.queue].fetch_sub(batch.published, Ordering::AcqRel);
}

/// Writes the call eventfd of `queue` if the driver asked to hear of the used entries added
/// since `since` (the used index at the previous check), which moves to the current one.
fn notify_if_asked(
    dev: &Device,
    ring: &SplitRing<'_>,
    queue: usize,
    state: &mut VringState,
    since: &mut u16,
) {
    let asked = ring.needs_notification(state.get_queue(), *since);
    *since = state.get_queue().next_used();
    if asked {
        if let Err(e) = state.signal_used_queue() {
            log::error!(
                "vhost-user-blk export '{}': queue {queue}: could not notify the guest: {e}",
                dev.cfg.id
            );
        }
    }
}
