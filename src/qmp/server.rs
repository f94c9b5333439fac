//! The monitors' sockets and clients: each monitor listens on its own thread and serves one
//! client at a time (as a QEMU socket chardev does; the next waits in the backlog), reading
//! messages with the bounded [`Splitter`] and answering each before the next. Events go to
//! every client that finished capabilities negotiation, on every monitor.

use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde_json::Value;

use super::config::{ChardevAddr, MonitorConfig};
use super::dispatch::{self, Context};
use super::framing::{Frame, Splitter, MAX_MESSAGE, MAX_NESTING};
use super::protocol::{self, QmpError};
use crate::daemon::Daemon;

/// How long a write to a client may block before the client is dropped: a client that stops
/// reading must not hold the monitor (or an event sent from another monitor's thread) forever.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// A monitor whose socket listens; no thread serves it yet (see [`ListeningMonitor::serve`]).
pub struct ListeningMonitor {
    config: MonitorConfig,
    listener: UnixListener,
}

impl ListeningMonitor {
    /// Listens where `config` says: at a path (a stale socket there is replaced, as QEMU
    /// does) or on an inherited listening socket.
    pub fn listen(config: MonitorConfig) -> Result<Self, String> {
        let what = format!("monitor chardev '{}'", config.chardev);
        let listener = match &config.addr {
            ChardevAddr::Path(path) => {
                remove_stale_socket(path).map_err(|e| format!("{what}: {e}"))?;
                UnixListener::bind(path)
                    .map_err(|e| format!("{what}: Could not listen on {}: {e}", path.display()))?
            }
            ChardevAddr::Fd(fd) => inherited_listener(*fd).map_err(|e| format!("{what}: {e}"))?,
        };
        Ok(ListeningMonitor { config, listener })
    }

    /// The socket file the monitor created (removed at exit).
    pub fn socket_path(&self) -> Option<&Path> {
        match &self.config.addr {
            ChardevAddr::Path(path) => Some(path),
            ChardevAddr::Fd(_) => None,
        }
    }

    /// Serves clients on a thread of its own, for the life of the process.
    pub fn serve(self, daemon: Arc<Daemon>, clients: Arc<Clients>) -> Result<(), String> {
        let name = format!("qmp-{}", self.config.chardev);
        let mut name_end = name.len().min(15);
        while !name.is_char_boundary(name_end) {
            name_end -= 1;
        }
        std::thread::Builder::new()
            .name(name[..name_end].to_string())
            .spawn(move || self.accept_loop(&daemon, &clients))
            .map(drop)
            .map_err(|e| format!("Could not start the monitor thread: {e}"))
    }

    fn accept_loop(self, daemon: &Daemon, clients: &Arc<Clients>) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    log::info!("monitor '{}': client connected", self.config.chardev);
                    if let Err(e) = serve_client(stream, self.config.pretty, daemon, clients) {
                        log::info!("monitor '{}': client ended: {e}", self.config.chardev);
                    }
                    log::info!("monitor '{}': client disconnected", self.config.chardev);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of descriptors or memory: wait a little and try again.
                    log::error!("monitor '{}': accept failed: {e}", self.config.chardev);
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
}

/// Removes a socket left at `path` by an earlier run; anything else there is an error.
fn remove_stale_socket(path: &Path) -> Result<(), String> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)
            .map_err(|e| format!("Could not remove the old socket {}: {e}", path.display())),
        Ok(_) => Err(format!(
            "{} exists and is not a socket; not replacing it",
            path.display()
        )),
        Err(_) => Ok(()),
    }
}

/// Takes over inherited descriptor `fd`, which must be a listening Unix stream socket.
fn inherited_listener(fd: RawFd) -> Result<UnixListener, String> {
    let mut accepting: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: SO_ACCEPTCONN writes one int into `accepting`, a local, and `len` says so.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut accepting as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r != 0 || accepting == 0 {
        return Err(format!("fd={fd} is not a listening socket"));
    }
    // SAFETY: the descriptor was handed to the daemon for this chardev (the command line is
    // trusted) and is a listening socket (checked above); nothing else owns it.
    Ok(unsafe { UnixListener::from_raw_fd(fd) })
}

/// The clients of every monitor that may receive events.
#[derive(Default)]
pub struct Clients {
    list: Mutex<Vec<Weak<Client>>>,
}

/// One connected client: its socket's writing half, shared with event senders.
pub struct Client {
    stream: Mutex<UnixStream>,
    pretty: bool,
}

impl Client {
    /// Sends one message; an error means the client is gone or stuck.
    fn send(&self, message: &Value) -> io::Result<()> {
        let bytes = protocol::encode(message, self.pretty);
        let mut stream = self.stream.lock().unwrap_or_else(|p| p.into_inner());
        stream.write_all(&bytes)
    }
}

impl Clients {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Weak<Client>>> {
        self.list.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(&self, client: &Arc<Client>) {
        let mut list = self.lock();
        list.retain(|c| c.strong_count() > 0);
        list.push(Arc::downgrade(client));
    }

    /// Sends event `name` to every client that negotiated capabilities.
    pub fn emit(&self, name: &str, data: Value) {
        let event = protocol::event(name, data);
        let clients: Vec<Arc<Client>> = self.lock().iter().filter_map(Weak::upgrade).collect();
        for client in clients {
            if let Err(e) = client.send(&event) {
                log::info!("monitor: could not send event {name} to a client: {e}");
            }
        }
    }
}

/// Serves one client until it disconnects.
fn serve_client(
    stream: UnixStream,
    pretty: bool,
    daemon: &Daemon,
    clients: &Arc<Clients>,
) -> io::Result<()> {
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let mut reader = stream.try_clone()?;
    let client = Arc::new(Client {
        stream: Mutex::new(stream),
        pretty,
    });
    client.send(&protocol::greeting())?;
    let mut splitter = Splitter::default();
    let mut negotiated = false;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for frame in splitter.push(&buf[..n]) {
            let reply = match frame {
                Frame::Message(bytes) => match handle(&bytes, &mut negotiated, daemon, clients) {
                    Handled::Reply(reply) => reply,
                    Handled::Negotiated(reply) => {
                        client.send(&reply)?;
                        clients.register(&client);
                        continue;
                    }
                },
                Frame::TooLong => error_reply(&format!(
                    "JSON message exceeds {MAX_MESSAGE} bytes; it was dropped"
                )),
                Frame::TooDeep => error_reply(&format!(
                    "JSON nesting exceeds {MAX_NESTING} levels; the message was dropped"
                )),
                Frame::Unbalanced => error_reply("JSON parse error, stray '}' or ']'"),
            };
            client.send(&reply)?;
        }
    }
}

fn error_reply(desc: &str) -> Value {
    protocol::reply_error(&QmpError::generic(desc), None)
}

enum Handled {
    Reply(Value),
    /// The reply to `qmp_capabilities`: from now on the client receives events.
    Negotiated(Value),
}

/// Answers one message, with capabilities negotiation as QEMU does it.
fn handle(bytes: &[u8], negotiated: &mut bool, daemon: &Daemon, clients: &Clients) -> Handled {
    let request = match protocol::parse_request(bytes) {
        Ok(r) => r,
        Err((e, id)) => return Handled::Reply(protocol::reply_error(&e, id)),
    };
    let id = request.id.clone();
    if !*negotiated {
        if request.execute != "qmp_capabilities" {
            return Handled::Reply(protocol::reply_error(
                &QmpError::command_not_found(
                    "Expecting capabilities negotiation with 'qmp_capabilities'",
                ),
                id,
            ));
        }
        return match dispatch::negotiate(request.arguments) {
            Ok(value) => {
                *negotiated = true;
                Handled::Negotiated(protocol::reply_return(value, id))
            }
            Err(e) => Handled::Reply(protocol::reply_error(&e, id)),
        };
    }
    if request.execute == "qmp_capabilities" {
        return Handled::Reply(protocol::reply_error(
            &QmpError::command_not_found(
                "Capabilities negotiation is already complete, command ignored",
            ),
            id,
        ));
    }
    let ctx = Context { daemon, clients };
    Handled::Reply(
        match dispatch::execute(&ctx, &request.execute, request.arguments) {
            Ok(value) => protocol::reply_return(value, id),
            Err(e) => protocol::reply_error(&e, id),
        },
    )
}
