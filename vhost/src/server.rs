//! An export: the listening socket, the accept loop, and one device per frontend connection.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use strata_backend::block_on;
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{Error as DaemonError, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::device::Device;
use crate::device_config::DeviceConfig;
use crate::error::Error;
use crate::export_config::BlkExportConfig;
use crate::inflight;
use crate::relay::{self, Connection};

mod listen;

use listen::BoundSocket;
pub use listen::Listen;

/// A running export. Dropping it stops it (like [`stop`](Self::stop) + [`join`](Self::join)).
pub struct BlkExport {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<Result<(), Error>>>,
}

struct Shared {
    cfg: Arc<DeviceConfig>,
    stopping: AtomicBool,
    stop_event: OwnedFd,
    conn: Mutex<Option<Arc<Connection>>>,
    /// The device of the current connection.
    device: Mutex<Weak<Device>>,
    /// Pauses held ([`BlkExport::pause`]), shared with every device of the export.
    pauses: Arc<AtomicUsize>,
}

impl Shared {
    fn id(&self) -> &str {
        &self.cfg.id
    }

    fn set_conn(&self, conn: Option<Arc<Connection>>) {
        *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = conn;
    }

    fn conn(&self) -> Option<Arc<Connection>> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_device(&self, device: Weak<Device>) {
        *self.device.lock().unwrap_or_else(|p| p.into_inner()) = device;
    }

    fn device(&self) -> Option<Arc<Device>> {
        self.device
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .upgrade()
    }
}

/// An export that listens but serves nobody yet: its socket accepts connections (they wait in
/// the backlog) and no thread of its own runs, so the caller can still restrict the process
/// (e.g. with Landlock, which covers only the calling thread and those it starts later)
/// before [`serve`](Self::serve).
pub struct ListeningExport {
    shared: Arc<Shared>,
    serving: Serving,
}

impl ListeningExport {
    /// The export id.
    pub fn id(&self) -> &str {
        self.shared.id()
    }

    /// The socket file the export created (None for an inherited socket): it removes it at
    /// the end.
    pub fn socket_path(&self) -> Option<&Path> {
        self.serving.bound.as_ref().map(BoundSocket::path)
    }

    /// The private directory holding the socket between the relay and vhost-user-backend: it
    /// is removed at the end.
    pub fn private_dir(&self) -> &Path {
        &self.serving._private.path
    }

    /// Starts serving frontends on threads of the export, one after the other, until
    /// [`BlkExport::stop`].
    pub fn serve(self) -> Result<BlkExport, Error> {
        let serving = self.serving;
        let thread = thread::Builder::new()
            .name(thread_name("vu-blk", self.shared.id()))
            .spawn(move || serving.run())
            .map_err(|e| Error::io("Could not start the export thread", e))?;
        Ok(BlkExport {
            shared: self.shared,
            thread: Some(thread),
        })
    }
}

impl BlkExport {
    /// Validates the settings, starts listening and serving, and returns; frontends are served
    /// on threads of the export, one after the other, until [`stop`](Self::stop).
    pub fn start(config: BlkExportConfig, listen: Listen) -> Result<BlkExport, Error> {
        Self::listen(config, listen)?.serve()
    }

    /// Validates the settings and starts listening, without serving yet (see
    /// [`ListeningExport`]).
    pub fn listen(config: BlkExportConfig, listen: Listen) -> Result<ListeningExport, Error> {
        let cfg = Arc::new(DeviceConfig::new(&config)?);
        let id = cfg.id.clone();
        let (listener, bound) = listen::open(listen, &config)?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("Could not make the listening socket non-blocking", e))?;
        let private = PrivateDir::new(config.private_dir_parent.as_deref())?;
        let internal_path = private.path.join("vhost-user.sock");
        let internal = UnixListener::bind(&internal_path).map_err(|e| {
            Error::io(
                format!("Could not listen on {}", internal_path.display()),
                e,
            )
        })?;
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(Error::io(
                "Could not create an eventfd",
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let stop_event = unsafe { OwnedFd::from_raw_fd(fd) };
        let shared = Arc::new(Shared {
            cfg,
            stopping: AtomicBool::new(false),
            stop_event,
            conn: Mutex::new(None),
            device: Mutex::new(Weak::new()),
            pauses: Arc::default(),
        });
        log::info!(
            "vhost-user-blk export '{id}': serving node '{}' ({} bytes, {}) on {}, poll-max-ns={}",
            shared.cfg.node.name(),
            shared.cfg.node.size(),
            if shared.cfg.writable {
                "writable"
            } else {
                "read-only"
            },
            bound.as_ref().map_or_else(
                || "an inherited socket".to_string(),
                |b| b.path().display().to_string()
            ),
            shared.cfg.poll_max_ns
        );
        let serving = Serving {
            shared: shared.clone(),
            listener,
            bound,
            internal: Listener::from(internal),
            internal_path,
            _private: private,
        };
        Ok(ListeningExport { shared, serving })
    }

    /// The export id.
    pub fn id(&self) -> &str {
        self.shared.id()
    }

    /// Asks the export to stop: no new frontend is accepted; the current one's device takes no
    /// new requests and finishes (and completes) those in flight before it is disconnected,
    /// so the rings it hands back are complete and a daemon that takes over has nothing to
    /// resubmit; then the node is flushed and [`join`](Self::join) returns. Callable from any
    /// thread (e.g. one waiting for SIGTERM), any number of times; blocks while it drains.
    pub fn stop(&self) {
        if !self.shared.stopping.swap(true, Ordering::SeqCst) {
            log::info!("vhost-user-blk export '{}': stopping", self.id());
        }
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a local u64 to our own eventfd, open for `shared`'s life.
        let _ = unsafe {
            libc::write(
                self.shared.stop_event.as_raw_fd(),
                (&one as *const u64).cast(),
                8,
            )
        };
        if let Some(device) = self.shared.device() {
            device.quiesce();
        }
        if let Some(conn) = self.shared.conn() {
            conn.shutdown();
        }
    }

    /// Waits until the export stopped (after [`stop`](Self::stop), or a fatal error).
    pub fn join(mut self) -> Result<(), Error> {
        self.join_thread()
    }

    fn join_thread(&mut self) -> Result<(), Error> {
        match self.thread.take() {
            None => Ok(()),
            Some(t) => t.join().unwrap_or_else(|_| {
                Err(Error::Panicked {
                    id: self.id().to_string(),
                })
            }),
        }
    }

    /// The exported node.
    pub fn node(&self) -> &Arc<strata_backend::Node> {
        &self.shared.cfg.node
    }

    /// The requests of the export's frontends (all connections'), as QMP's `query-blockstats`
    /// reports them.
    pub fn io_stats(&self) -> &strata_backend::accounting::IoStats {
        &self.shared.cfg.stats
    }

    /// Whether the export lets its frontend write (`writable=on`).
    pub fn is_writable(&self) -> bool {
        self.shared.cfg.writable
    }

    /// Whether a frontend is connected now (QMP's `block-export-del` in safe mode refuses then).
    pub fn has_frontend(&self) -> bool {
        self.shared.conn().is_some()
    }

    /// Pauses the export while the caller changes its node (QMP's `block_resize`): its queues
    /// take no new requests, and this returns once those in flight completed (or the drain
    /// timeout passed; false then). Other exports go on. The queues resume when the returned
    /// guard is dropped.
    pub fn pause(&self) -> (ExportPause<'_>, bool) {
        self.shared.pauses.fetch_add(1, Ordering::AcqRel);
        let pause = ExportPause {
            shared: &self.shared,
        };
        let drained = self.shared.device().is_none_or(|d| d.drain_all());
        (pause, drained)
    }

    /// Tells the connected frontend that the disk size changed (read live from the node), over
    /// the backend request channel when the frontend opened it (VHOST_USER_PROTOCOL_F_CONFIG
    /// and BACKEND_REQ). Returns whether a notice was sent; without one, the guest sees the new
    /// capacity only when it reads the config space again.
    pub fn notify_resize(&self) -> bool {
        let id = self.id();
        let size = self.shared.cfg.node.size();
        let Some(conn) = self.shared.conn() else {
            log::info!("vhost-user-blk export '{id}': resized to {size} bytes; no frontend");
            return false;
        };
        match conn.send_config_change() {
            Ok(true) => {
                log::info!(
                    "vhost-user-blk export '{id}': resized to {size} bytes; frontend notified"
                );
                true
            }
            Ok(false) => {
                log::info!(
                    "vhost-user-blk export '{id}': resized to {size} bytes; the frontend has no \
                     backend request channel to notify it on"
                );
                false
            }
            Err(e) => {
                log::warn!(
                    "vhost-user-blk export '{id}': resized to {size} bytes; could not notify \
                     the frontend: {e}"
                );
                false
            }
        }
    }
}

impl Drop for BlkExport {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop();
            if let Err(e) = self.join_thread() {
                log::error!("{e}");
            }
        }
    }
}

/// A pause of an export's queues ([`BlkExport::pause`]); dropping it resumes them.
pub struct ExportPause<'a> {
    shared: &'a Shared,
}

impl Drop for ExportPause<'_> {
    fn drop(&mut self) {
        if self.shared.pauses.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Some(device) = self.shared.device() {
                device.wake_workers();
            }
        }
    }
}

/// Thread names are at most 15 bytes on Linux.
fn thread_name(prefix: &str, id: &str) -> String {
    let mut name = format!("{prefix}-{id}");
    let mut end = name.len().min(15);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name.truncate(end);
    name
}

/// The serving thread's state.
struct Serving {
    shared: Arc<Shared>,
    listener: UnixListener,
    bound: Option<BoundSocket>,
    internal: Listener,
    internal_path: PathBuf,
    _private: PrivateDir,
}

impl Serving {
    fn run(mut self) -> Result<(), Error> {
        let id = self.shared.id().to_string();
        let result = loop {
            match self.accept() {
                Ok(Some(frontend)) => self.serve_connection(frontend),
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
            if self.shared.stopping.load(Ordering::SeqCst) {
                break Ok(());
            }
        };
        self.bound = None; // removes the socket file: no new frontend finds it
        let flushed = block_on(self.shared.cfg.node.flush())
            .and_then(|r| r)
            .map_err(|source| Error::Block {
                id: id.clone(),
                source,
            });
        log::info!("vhost-user-blk export '{id}': stopped");
        result.and(flushed)
    }

    /// Waits for the next frontend; None when the export is stopping.
    fn accept(&self) -> Result<Option<UnixStream>, Error> {
        loop {
            if self.shared.stopping.load(Ordering::SeqCst) {
                return Ok(None);
            }
            let mut fds = [
                libc::pollfd {
                    fd: self.listener.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.shared.stop_event.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::io("poll on the listening socket failed", e));
            }
            if fds[1].revents != 0 {
                continue; // the stop flag is checked at the top
            }
            match self.listener.accept() {
                Ok((stream, _)) => {
                    stream
                        .set_nonblocking(false)
                        .map_err(|e| Error::io("Could not make the frontend socket blocking", e))?;
                    return Ok(Some(stream));
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::Interrupted
                            | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => {
                    // Out of descriptors or memory: wait a little and try again.
                    log::error!(
                        "vhost-user-blk export '{}': accept failed: {e}",
                        self.shared.id()
                    );
                    thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// Serves one frontend until it disconnects or the export stops.
    fn serve_connection(&mut self, frontend: UnixStream) {
        let id = self.shared.id().to_string();
        log::info!(
            "vhost-user-blk export '{id}': frontend connected{}",
            peer_description(&frontend)
        );
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let device = match Device::new(
            self.shared.cfg.clone(),
            mem.clone(),
            self.shared.pauses.clone(),
        ) {
            Ok(d) => Arc::new(d),
            Err(e) => {
                log::error!("vhost-user-blk export '{id}': could not create the device: {e}");
                return;
            }
        };
        let mut daemon = match VhostUserDaemon::new(thread_name("vu-ctl", &id), device.clone(), mem)
        {
            Ok(d) => d,
            Err(e) => {
                log::error!("vhost-user-blk export '{id}': could not start the device: {e}");
                return;
            }
        };
        device.set_epoll_handlers(&daemon.get_epoll_handlers());
        self.shared.set_device(Arc::downgrade(&device));
        match self.connect_relay(&frontend, &mut daemon, device.inflight.clone()) {
            Ok(relays) => {
                if let Some(conn) = self.shared.conn() {
                    device.set_connection(conn);
                }
                let result = daemon.wait();
                if let Some(conn) = self.shared.conn() {
                    conn.shutdown();
                }
                for r in relays {
                    if let Ok(Err(e)) = r.join() {
                        log::debug!("vhost-user-blk export '{id}': relay ended: {e}");
                    }
                }
                self.shared.set_conn(None);
                match result {
                    Ok(()) => {}
                    Err(DaemonError::HandleRequest(
                        VhostUserError::Disconnected | VhostUserError::PartialMessage,
                    )) => {}
                    Err(e) => log::warn!("vhost-user-blk export '{id}': frontend error: {e}"),
                }
            }
            Err(e) => log::error!("vhost-user-blk export '{id}': {e}"),
        }
        device.drain_all();
        drop(daemon);
        device.close_handed_out_fds();
        if let Err(e) = block_on(self.shared.cfg.node.flush()).and_then(|r| r) {
            log::error!("vhost-user-blk export '{id}': flush after disconnect failed: {e}");
        }
        log::info!("vhost-user-blk export '{id}': frontend disconnected");
    }

    /// Connects vhost-user-backend to the private socket and starts relaying the frontend to it.
    fn connect_relay(
        &mut self,
        frontend: &UnixStream,
        daemon: &mut VhostUserDaemon<Arc<Device>>,
        inflight: Arc<inflight::Shared>,
    ) -> Result<Vec<JoinHandle<io::Result<()>>>, String> {
        let internal = UnixStream::connect(&self.internal_path)
            .map_err(|e| format!("could not connect to the private socket: {e}"))?;
        daemon
            .start(&mut self.internal)
            .map_err(|e| format!("could not start the vhost-user handler: {e}"))?;
        let conn = Arc::new(
            Connection::new(frontend, &internal, inflight)
                .map_err(|e| format!("could not duplicate a socket: {e}"))?,
        );
        self.shared.set_conn(Some(conn.clone()));
        if self.shared.stopping.load(Ordering::SeqCst) {
            conn.shutdown();
        }
        let id = self.shared.id().to_string();
        let spawn =
            |name: &str, from: UnixStream, to: UnixStream, conn: Option<Arc<Connection>>| {
                thread::Builder::new()
                    .name(thread_name(name, &id))
                    .spawn(move || relay::relay(&from, &to, conn.as_deref()))
            };
        let clone = |s: &UnixStream| s.try_clone().map_err(|e| e.to_string());
        let mut relays = Vec::new();
        for (name, from, to, sniff) in [
            (
                "vu-fe",
                clone(frontend)?,
                clone(&internal)?,
                Some(conn.clone()),
            ),
            ("vu-be", clone(&internal)?, clone(frontend)?, None),
        ] {
            match spawn(name, from, to, sniff) {
                Ok(t) => relays.push(t),
                Err(e) => {
                    conn.shutdown();
                    return Err(format!("could not start a relay thread: {e}"));
                }
            }
        }
        Ok(relays)
    }
}

/// " (pid N, uid U)" of the socket's peer, or nothing.
fn peer_description(sock: &UnixStream) -> String {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes at most `len` bytes into `cred`, a local ucred.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r == 0 {
        format!(" (pid {}, uid {})", cred.pid, cred.uid)
    } else {
        String::new()
    }
}

/// A private (0700) directory for the socket between the relay and vhost-user-backend.
struct PrivateDir {
    path: PathBuf,
}

impl PrivateDir {
    /// A new directory in `parent`, or else in the temporary directory.
    fn new(parent: Option<&Path>) -> Result<PrivateDir, Error> {
        let mut base = parent.map_or_else(std::env::temp_dir, Path::to_path_buf);
        // Unix socket paths are limited to 107 bytes.
        if parent.is_none() && base.as_os_str().len() > 64 {
            base = PathBuf::from("/tmp");
        }
        let template = base.join("strata-vhost-XXXXXX");
        let mut bytes = template.as_os_str().as_bytes().to_vec();
        if bytes.contains(&0) {
            return Err(Error::io(
                "Invalid temporary directory",
                io::ErrorKind::InvalidInput.into(),
            ));
        }
        bytes.push(0);
        // SAFETY: `bytes` is a NUL-terminated buffer that mkdtemp rewrites in place (only the
        // XXXXXX part) and does not keep.
        let r = unsafe { libc::mkdtemp(bytes.as_mut_ptr().cast()) };
        if r.is_null() {
            return Err(Error::io(
                format!("Could not create a directory in {}", base.display()),
                io::Error::last_os_error(),
            ));
        }
        bytes.pop();
        Ok(PrivateDir {
            path: PathBuf::from(OsString::from_vec(bytes)),
        })
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
