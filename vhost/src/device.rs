//! The vhost-user-blk device of one frontend connection: the control plane that
//! vhost-user-backend drives (features, config space, memory table, vring start and stop), and
//! the state it shares with the worker threads that run the virtqueues ([`crate::worker`]).
//!
//! vhost-user-backend runs one epoll worker thread per entry of `queues_per_thread`; each
//! event of such a thread goes to that thread's [`Worker`](crate::worker::Worker).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::Backend;
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringMutex};
use virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::device_config::{DeviceConfig, WCE_OFFSET};
use crate::inflight;
use crate::memory_faults;
use crate::relay::Connection;
use crate::worker;

/// Guest memory as vhost-user-backend shares it.
pub(crate) type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

/// How long GET_VRING_BASE, a memory table change or a disconnect wait for in-flight requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// DRAIN_TIMEOUT, or the milliseconds in `STRATA_DRAIN_TIMEOUT_MS` (for tests that need a
/// request to outlast it).
fn drain_timeout() -> Duration {
    static TIMEOUT: OnceLock<Duration> = OnceLock::new();
    *TIMEOUT.get_or_init(|| {
        std::env::var("STRATA_DRAIN_TIMEOUT_MS")
            .ok()
            .and_then(|ms| ms.parse().ok())
            .map_or(DRAIN_TIMEOUT, Duration::from_millis)
    })
}

/// Device state shared by the control thread and the workers of one connection.
pub(crate) struct DevState {
    /// The guest's write cache enable (config-space `writeback`); false means every write is
    /// flushed before it completes.
    pub writeback: AtomicBool,
    /// Requests taken from each virtqueue and not yet put in its used ring.
    pub inflight: Box<[AtomicUsize]>,
    /// Per virtqueue, how many times the device gave up waiting for its requests when it
    /// stopped (GET_VRING_BASE): a request taken in an earlier epoch is never put in the used
    /// ring, which by then belongs to the frontend again.
    pub epoch: Box<[AtomicU32]>,
}

static NEXT_DEVICE_ID: AtomicU64 = AtomicU64::new(1);

/// The device of one connection.
pub(crate) struct Device {
    /// Tells this device from the others of the process (see [`Device::instance`]).
    instance: u64,
    /// The export's settings.
    pub cfg: Arc<DeviceConfig>,
    /// What the workers share with the control thread.
    pub state: Arc<DevState>,
    /// The guest's memory table, replaced by SET_MEM_TABLE.
    pub mem: Mem,
    /// The memory table published last; update_memory waits until nothing uses the one before.
    mem_current: Mutex<Weak<GuestMemoryMmap>>,
    acked_features: AtomicU64,
    /// Per worker thread, the virtqueue indices it runs, in the order vhost-user-backend
    /// numbers them for that thread.
    thread_queues: Vec<Vec<usize>>,
    epoll: OnceLock<Vec<Weak<VringEpollHandler<Arc<Device>>>>>,
    exit_events: Vec<(EventConsumer, EventNotifier)>,
    /// Exit-event consumers vhost-user-backend registers in its epoll and never closes.
    handed_out_fds: Mutex<Vec<RawFd>>,
    /// A worker could not be set up (logged once).
    worker_failed: AtomicBool,
    /// The frontend connection, once relayed (see [`Device::lose_connection`]).
    conn: OnceLock<Arc<Connection>>,
    /// The frontend shrank a memory file under the guest ([`memory_faults`]).
    memory_lost: AtomicBool,
    /// The in-flight buffer the frontend keeps across reconnects ([`inflight`]).
    pub inflight: Arc<inflight::Shared>,
    /// The export is stopping: workers take no new requests ([`Device::quiesce`]).
    quiescing: AtomicBool,
    /// Pauses held on the export ([`crate::BlkExport::pause`]): while there are any, workers
    /// take no new requests. Shared by the export's devices, so that one connected during a
    /// pause starts paused.
    pauses: Arc<AtomicUsize>,
    /// Duplicates of the workers' own eventfds, raised when a pause ends so that each worker
    /// goes back to the queues it left.
    wakers: Mutex<Vec<OwnedFd>>,
}

impl Device {
    pub(crate) fn new(
        cfg: Arc<DeviceConfig>,
        mem: Mem,
        pauses: Arc<AtomicUsize>,
    ) -> io::Result<Self> {
        // One worker per queue, but no more workers than CPUs this process may run on: two
        // workers sharing a CPU only take it from each other (a busy-polling one for a whole
        // scheduler slice), while one worker serving both queues batches them.
        let cpus = cfg.cpus;
        let threads = usize::from(cfg.num_queues).min(cpus).max(1);
        if threads < usize::from(cfg.num_queues) {
            log::info!(
                "vhost-user-blk export '{}': {} queues on {threads} worker thread(s), as this \
                 process may run on {cpus} CPU(s) only",
                cfg.id,
                cfg.num_queues
            );
        }
        memory_faults::install();
        let queues = usize::from(cfg.max_queues);
        let thread_queues = (0..threads)
            .map(|t| (0..queues).filter(|q| q % threads == t).collect())
            .collect();
        let exit_events = (0..threads)
            .map(|_| new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Device {
            instance: NEXT_DEVICE_ID.fetch_add(1, Ordering::Relaxed),
            state: Arc::new(DevState {
                writeback: AtomicBool::new(!cfg.writethrough),
                inflight: (0..queues).map(|_| AtomicUsize::new(0)).collect(),
                epoch: (0..queues).map(|_| AtomicU32::new(0)).collect(),
            }),
            cfg,
            mem,
            mem_current: Mutex::new(Weak::new()),
            acked_features: AtomicU64::new(0),
            thread_queues,
            epoll: OnceLock::new(),
            exit_events,
            handed_out_fds: Mutex::new(Vec::new()),
            worker_failed: AtomicBool::new(false),
            conn: OnceLock::new(),
            memory_lost: AtomicBool::new(false),
            inflight: Arc::default(),
            quiescing: AtomicBool::new(false),
            pauses,
            wakers: Mutex::new(Vec::new()),
        })
    }

    /// Gives the device its frontend connection, which it closes when the guest's memory is
    /// lost.
    pub(crate) fn set_connection(&self, conn: Arc<Connection>) {
        let _ = self.conn.set(conn);
        if self.memory_lost.load(Ordering::Acquire) {
            self.lose_connection();
        }
    }

    /// Whether a shrunk memory file of this device's frontend was contained (see
    /// [`memory_faults`]): if so, logs it (once) and closes the connection.
    pub(crate) fn check_memory_faults(&self) {
        if !memory_faults::faulted(self.instance) || self.memory_lost.swap(true, Ordering::AcqRel) {
            return;
        }
        log::error!(
            "vhost-user-blk export '{}': the frontend shrank the file behind a guest memory              region while it was shared; the connection is closed",
            self.cfg.id
        );
        self.lose_connection();
    }

    /// Tells the frontend that `queue` failed, through the vring's error eventfd when it gave
    /// one (SET_VRING_ERR).
    pub(crate) fn signal_queue_error(&self, queue: usize) {
        let Some(conn) = self.conn.get() else {
            return;
        };
        if let Err(e) = conn.signal_vring_error(queue) {
            log::warn!(
                "vhost-user-blk export '{}': queue {queue}: could not signal its error                  eventfd: {e}",
                self.cfg.id
            );
        }
    }

    fn lose_connection(&self) {
        if let Some(conn) = self.conn.get() {
            conn.shutdown();
        }
    }

    /// Remembers the epoll handlers, so workers can add their io_uring eventfd to them.
    pub(crate) fn set_epoll_handlers(&self, handlers: &[Arc<VringEpollHandler<Arc<Device>>>]) {
        let _ = self
            .epoll
            .set(handlers.iter().map(Arc::downgrade).collect());
    }

    /// Which device of the process this is: a worker thread of an earlier connection may
    /// still hold the worker it made for that connection's device.
    #[inline]
    pub(crate) fn instance(&self) -> u64 {
        self.instance
    }

    /// The epoll data of a worker's io_uring eventfd (past the queues and the exit event).
    #[inline]
    pub(crate) fn eventfd_token(&self) -> u64 {
        u64::from(self.cfg.max_queues) + 1
    }

    /// The epoll handler of worker thread `thread_id`, while vhost-user-backend runs it.
    pub(crate) fn epoll_handler(
        &self,
        thread_id: usize,
    ) -> Option<Arc<VringEpollHandler<Arc<Device>>>> {
        self.epoll
            .get()
            .and_then(|h| h.get(thread_id))
            .and_then(Weak::upgrade)
    }

    /// The virtqueues worker thread `thread_id` runs, in the order vhost-user-backend numbers
    /// them for that thread.
    pub(crate) fn thread_queues(&self, thread_id: usize) -> Option<&[usize]> {
        self.thread_queues.get(thread_id).map(Vec::as_slice)
    }

    /// Whether the driver acked VIRTIO_RING_F_INDIRECT_DESC.
    #[inline]
    pub(crate) fn indirect_desc(&self) -> bool {
        self.acked_features.load(Ordering::Relaxed) & (1 << VIRTIO_RING_F_INDIRECT_DESC) != 0
    }

    /// Records that a worker could not be set up; true the first time (the one to log).
    pub(crate) fn first_worker_failure(&self) -> bool {
        !self.worker_failed.swap(true, Ordering::Relaxed)
    }

    fn inflight_total(&self) -> usize {
        self.state
            .inflight
            .iter()
            .map(|n| n.load(Ordering::Acquire))
            .sum()
    }

    /// Waits until no request of any queue is in flight; false on timeout.
    /// Stops taking requests and waits (at most the drain timeout) until those in flight are
    /// in their used rings.
    pub(crate) fn quiesce(&self) -> bool {
        self.quiescing.store(true, Ordering::Release);
        self.drain_all()
    }

    /// Whether the device takes no new requests ([`Device::quiesce`]).
    #[inline]
    pub(crate) fn quiescing(&self) -> bool {
        self.quiescing.load(Ordering::Relaxed)
    }

    /// Whether the export is paused: workers leave new requests in the rings until
    /// [`Device::wake_workers`].
    #[inline]
    pub(crate) fn paused(&self) -> bool {
        self.pauses.load(Ordering::Acquire) > 0
    }

    /// Keeps a duplicate of a worker's eventfd, to wake it when a pause ends.
    pub(crate) fn add_waker(&self, eventfd: BorrowedFd<'_>) -> io::Result<()> {
        let fd = eventfd.try_clone_to_owned()?;
        lock(&self.wakers).push(fd);
        Ok(())
    }

    /// Raises every worker's eventfd: after a pause each goes back to the queues it left.
    pub(crate) fn wake_workers(&self) {
        let one = 1u64.to_ne_bytes();
        for fd in lock(&self.wakers).iter() {
            // SAFETY: writes 8 bytes from a live local array to an eventfd this device owns
            // a duplicate of; the eventfd is non-blocking.
            let n = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
            if n < 0 {
                log::error!(
                    "vhost-user-blk export '{}': could not wake a worker after a pause: {}",
                    self.cfg.id,
                    io::Error::last_os_error()
                );
            }
        }
    }

    pub(crate) fn drain_all(&self) -> bool {
        wait_until(&self.cfg.id, "all queues", || self.inflight_total() == 0)
    }

    /// Closes the exit-event descriptors vhost-user-backend leaked into its (now closed)
    /// epoll sets. Call only after the daemon and its workers are gone.
    pub(crate) fn close_handed_out_fds(&self) {
        let fds = std::mem::take(&mut *lock(&self.handed_out_fds));
        for fd in fds {
            // vhost-user-backend took these duplicates from exit_event with into_raw_fd and
            // never closes them; its workers and their epoll sets are gone now.
            // SAFETY: nothing else knows these numbers and the list was emptied above, so each
            // descriptor we created is closed exactly once.
            unsafe { libc::close(fd) };
        }
    }
}

/// Polls `done` until it holds, for at most [`drain_timeout`]; logs while waiting.
fn wait_until(id: &str, what: &str, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    let mut nap = Duration::from_micros(20);
    let mut told = false;
    while !done() {
        let waited = start.elapsed();
        let limit = drain_timeout();
        if waited > limit {
            log::error!(
                "vhost-user-blk export '{id}': requests of {what} still in flight after {}s; \
                 going on without them",
                limit.as_secs_f64()
            );
            return false;
        }
        if !told && waited > Duration::from_secs(1) {
            log::info!("vhost-user-blk export '{id}': waiting for requests of {what} to finish");
            told = true;
        }
        std::thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(1));
    }
    true
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The data under these locks is a plain value that a panic cannot leave half-updated.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Drop for Device {
    fn drop(&mut self) {
        memory_faults::retain(self.instance, None);
    }
}

impl VhostUserBackend for Device {
    type Bitmap = ();
    type Vring = VringMutex;

    fn num_queues(&self) -> usize {
        usize::from(self.cfg.max_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.cfg.queue_size)
    }

    fn features(&self) -> u64 {
        self.cfg.features()
    }

    fn acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Relaxed);
        // Without FLUSH the driver cannot flush: the device must be writethrough.
        if features & (1 << VIRTIO_BLK_F_FLUSH) == 0 {
            self.state.writeback.store(false, Ordering::Relaxed);
        }
        log::debug!(
            "vhost-user-blk export '{}': features acked {features:#x}",
            self.cfg.id
        );
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        DeviceConfig::protocol_features()
    }

    fn reset_device(&self) {
        log::debug!("vhost-user-blk export '{}': device reset", self.cfg.id);
        self.drain_all();
        self.state
            .writeback
            .store(!self.cfg.writethrough, Ordering::Relaxed);
    }

    fn set_event_idx(&self, enabled: bool) {
        log::debug!(
            "vhost-user-blk export '{}': EVENT_IDX {}",
            self.cfg.id,
            if enabled { "on" } else { "off" }
        );
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let writeback = self.state.writeback.load(Ordering::Relaxed);
        self.cfg.read_config(writeback, offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        match (offset as usize == WCE_OFFSET, buf) {
            (true, [wce @ (0 | 1)]) => {
                let writeback = *wce == 1;
                self.state.writeback.store(writeback, Ordering::Relaxed);
                log::info!(
                    "vhost-user-blk export '{}': guest set the write cache to {}",
                    self.cfg.id,
                    if writeback {
                        "writeback"
                    } else {
                        "writethrough"
                    }
                );
                Ok(())
            }
            _ => {
                log::warn!(
                    "vhost-user-blk export '{}': refused SET_CONFIG of {} bytes at offset \
                     {offset} (only the 1-byte wce field at {WCE_OFFSET} is writable)",
                    self.cfg.id,
                    buf.len()
                );
                Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "only the wce field of the virtio-blk config space is writable",
                ))
            }
        }
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        let new = mem.memory().into_inner();
        memory_faults::register(self.instance, &new);
        let old = std::mem::replace(&mut *lock(&self.mem_current), Arc::downgrade(&new));
        drop(new);
        log::debug!(
            "vhost-user-blk export '{}': memory table updated",
            self.cfg.id
        );
        // Requests hold the memory table they started with, which keeps its mappings alive;
        // answer only when none of them uses the old table any more.
        wait_until(&self.cfg.id, "the old memory table", || {
            old.strong_count() == 0
        });
        memory_faults::retain(self.instance, Some(&mem.memory()));
        Ok(())
    }

    fn set_backend_req_fd(&self, _backend: Backend) {
        // The relay kept a duplicate of the channel for config-change notices.
        log::debug!(
            "vhost-user-blk export '{}': backend request channel opened",
            self.cfg.id
        );
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        self.thread_queues
            .iter()
            .map(|qs| qs.iter().fold(0u64, |mask, q| mask | 1 << q))
            .collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) = self.exit_events.get(thread_index)?;
        let pair = consumer
            .try_clone()
            .and_then(|c| Ok((c, notifier.try_clone()?)));
        match pair {
            Ok((c, n)) => {
                lock(&self.handed_out_fds).push(c.as_raw_fd());
                Some((c, n))
            }
            Err(e) => {
                log::error!(
                    "vhost-user-blk export '{}': could not create an exit event: {e}",
                    self.cfg.id
                );
                None
            }
        }
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let Some(n) = self.state.inflight.get(queue_index as usize) else {
            return Ok(());
        };
        let drained = wait_until(&self.cfg.id, &format!("queue {queue_index}"), || {
            n.load(Ordering::Acquire) == 0
        });
        if !drained {
            if let Some(epoch) = self.state.epoch.get(queue_index as usize) {
                epoch.fetch_add(1, Ordering::AcqRel);
            }
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringMutex],
        thread_id: usize,
    ) -> io::Result<()> {
        // Never return an error: vhost-user-backend would end the worker thread.
        worker::with_worker(self, thread_id, |w| {
            w.handle_event(self, device_event, vrings);
        });
        Ok(())
    }
}
