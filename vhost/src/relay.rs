//! The frontend's socket, relayed to vhost-user-backend.
//!
//! vhost-user-backend accepts its connection itself and keeps the backend request channel
//! (SET_BACKEND_REQ_FD) inside a `vhost::vhost_user::Backend` that (in vhost 0.18) cannot send
//! VHOST_USER_BACKEND_CONFIG_CHANGE_MSG. So the export accepts the frontend itself, hands
//! vhost-user-backend the other end of a private socket, and copies messages (with their file
//! descriptors) between the two. On the way it keeps a duplicate of the backend request
//! channel and the acked protocol features, which is all a config-change notice needs, and
//! refuses memory regions that lie beyond their files ([`crate::memory_files`]). Only control
//! messages pass here; the data path (shared memory, eventfds) never does.

use std::io::{self, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{
    BackendReq, FrontendReq, VhostUserProtocolFeatures, MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE,
};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::inflight;
use crate::memory_files;

const HEADER_LEN: usize = 12;
/// Header flags: protocol version 1.
const VERSION_1: u32 = 0x1;
/// Header flags: a reply.
const REPLY: u32 = 0x4;
/// Header flags: the frontend wants an acknowledgement (REPLY_ACK).
const NEED_REPLY: u32 = 0x8;

/// One frontend connection as the export sees it.
pub(crate) struct Connection {
    frontend: UnixStream,
    internal: UnixStream,
    backend_channel: Mutex<Option<UnixStream>>,
    protocol_features: AtomicU64,
    /// Duplicates of the vrings' error eventfds (SET_VRING_ERR), by queue index.
    vring_err: Mutex<Vec<Option<OwnedFd>>>,
    /// The device's in-flight buffer, which GET/SET_INFLIGHT_FD make and install.
    inflight: Arc<inflight::Shared>,
}

impl Connection {
    pub(crate) fn new(
        frontend: &UnixStream,
        internal: &UnixStream,
        inflight: Arc<inflight::Shared>,
    ) -> io::Result<Self> {
        Ok(Connection {
            frontend: frontend.try_clone()?,
            internal: internal.try_clone()?,
            backend_channel: Mutex::new(None),
            protocol_features: AtomicU64::new(0),
            vring_err: Mutex::new(Vec::new()),
            inflight,
        })
    }

    /// Closes both sides; the relay threads and vhost-user-backend's thread then end.
    pub(crate) fn shutdown(&self) {
        let _ = self.frontend.shutdown(Shutdown::Both);
        let _ = self.internal.shutdown(Shutdown::Both);
    }

    /// Tells the frontend that the config space changed (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG),
    /// if it opened the backend request channel and negotiated CONFIG. Returns whether a notice
    /// was sent.
    pub(crate) fn send_config_change(&self) -> io::Result<bool> {
        let features = self.protocol_features.load(Ordering::Acquire);
        if features & VhostUserProtocolFeatures::CONFIG.bits() == 0 {
            return Ok(false);
        }
        let channel = self
            .backend_channel
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let Some(sock) = channel.as_ref() else {
            return Ok(false);
        };
        let mut msg = [0u8; HEADER_LEN];
        msg[0..4].copy_from_slice(&u32::from(BackendReq::CONFIG_CHANGE_MSG).to_le_bytes());
        msg[4..8].copy_from_slice(&VERSION_1.to_le_bytes());
        // No NEED_REPLY: the reply would arrive on a channel nobody reads.
        (&*sock).write_all(&msg)?;
        Ok(true)
    }

    /// Signals the error eventfd the frontend gave `queue` (SET_VRING_ERR), if any: the
    /// vhost-user way to say a virtqueue failed (QEMU logs "vhost vring error in virtqueue N").
    /// Returns whether there was one.
    pub(crate) fn signal_vring_error(&self, queue: usize) -> io::Result<bool> {
        let errs = self.vring_err.lock().unwrap_or_else(|p| p.into_inner());
        let Some(Some(fd)) = errs.get(queue) else {
            return Ok(false);
        };
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live local array to an eventfd we hold open.
        let n = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(true)
    }

    fn sniff(&self, request: u32, payload: &[u8], fds: &[OwnedFd]) {
        if request == u32::from(FrontendReq::SET_VRING_ERR) {
            self.keep_vring_err(payload, fds);
            return;
        }
        if request == u32::from(FrontendReq::SET_PROTOCOL_FEATURES) {
            if let Some(bytes) = payload.get(..8) {
                let mut v = [0u8; 8];
                v.copy_from_slice(bytes);
                self.protocol_features
                    .store(u64::from_le_bytes(v), Ordering::Release);
            }
        } else if request == u32::from(FrontendReq::SET_BACKEND_REQ_FD) {
            if let [fd] = fds {
                match fd.try_clone() {
                    Ok(dup) => {
                        *self
                            .backend_channel
                            .lock()
                            .unwrap_or_else(|p| p.into_inner()) = Some(UnixStream::from(dup));
                    }
                    Err(e) => log::warn!("could not keep the backend request channel: {e}"),
                }
            }
        }
    }
}

impl Connection {
    /// Answers GET_INFLIGHT_FD and SET_INFLIGHT_FD here (vhost-user-backend does not
    /// implement them), replying on `frontend`; returns whether `request` was one of them.
    fn handle_inflight(
        &self,
        frontend: &UnixStream,
        request: u32,
        flags: u32,
        payload: &[u8],
        fds: &[OwnedFd],
    ) -> io::Result<bool> {
        let reply = |body: &[u8], fds: &[OwnedFd]| {
            let mut header = [0u8; HEADER_LEN];
            header[0..4].copy_from_slice(&request.to_le_bytes());
            header[4..8].copy_from_slice(&(VERSION_1 | REPLY).to_le_bytes());
            header[8..12].copy_from_slice(&(body.len() as u32).to_le_bytes());
            send_all(frontend, &header, body, fds)
        };
        if request == u32::from(FrontendReq::GET_INFLIGHT_FD) {
            let made = inflight::Description::parse(payload)
                .ok_or_else(|| io::Error::other("malformed request"))
                .and_then(|req| inflight::Region::create(&req));
            match made {
                Ok((region, fd, desc)) => {
                    self.inflight.set(region);
                    reply(&desc.to_bytes(), std::slice::from_ref(&fd))?;
                }
                Err(e) => {
                    // A zero size tells the frontend there is no buffer.
                    log::warn!("GET_INFLIGHT_FD refused: {e}");
                    reply(&[0u8; inflight::Description::LEN], &[])?;
                }
            }
            return Ok(true);
        }
        if request == u32::from(FrontendReq::SET_INFLIGHT_FD) {
            let opened = match (inflight::Description::parse(payload), fds) {
                (Some(desc), [fd]) => inflight::Region::open(fd, &desc),
                _ => Err(io::Error::other("malformed message")),
            };
            let ok = match opened {
                Ok(region) => {
                    self.inflight.set(region);
                    true
                }
                Err(e) => {
                    log::warn!(
                        "SET_INFLIGHT_FD refused: {e}; requests in flight at a disconnect \
                         will not be resubmitted"
                    );
                    false
                }
            };
            if flags & NEED_REPLY != 0 {
                reply(&u64::from(!ok).to_le_bytes(), &[])?;
            }
            return Ok(true);
        }
        Ok(false)
    }

    /// Keeps a duplicate of the error eventfd of a SET_VRING_ERR message (its payload: the
    /// queue index in bits 0-7, bit 8 set when no descriptor comes with it).
    fn keep_vring_err(&self, payload: &[u8], fds: &[OwnedFd]) {
        let Some(bytes) = payload.get(..8) else {
            return;
        };
        let mut v = [0u8; 8];
        v.copy_from_slice(bytes);
        let v = u64::from_le_bytes(v);
        let queue = (v & 0xff) as usize;
        let fd = match fds {
            [fd] if v & 0x100 == 0 => match fd.try_clone() {
                Ok(dup) => Some(dup),
                Err(e) => {
                    log::warn!("could not keep the error eventfd of queue {queue}: {e}");
                    None
                }
            },
            _ => None,
        };
        let mut errs = self.vring_err.lock().unwrap_or_else(|p| p.into_inner());
        if errs.len() <= queue {
            errs.resize_with(queue + 1, || None);
        }
        errs[queue] = fd;
    }
}

/// Copies messages from `from` to `to` until either side closes; then closes both. With
/// `conn`, watches the frontend's requests for what config-change notices need.
pub(crate) fn relay(
    from: &UnixStream,
    to: &UnixStream,
    conn: Option<&Connection>,
) -> io::Result<()> {
    let result = relay_messages(from, to, conn);
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
    result
}

fn relay_messages(from: &UnixStream, to: &UnixStream, conn: Option<&Connection>) -> io::Result<()> {
    let mut payload = vec![0u8; MAX_MSG_SIZE];
    loop {
        let mut header = [0u8; HEADER_LEN];
        let mut fds = Vec::new();
        if !recv_exact(from, &mut header, &mut fds, true)? {
            return Ok(());
        }
        let request = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let size = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
        if size > MAX_MSG_SIZE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("vhost-user message {request} of {size} bytes is too large"),
            ));
        }
        let body = &mut payload[..size];
        if !recv_exact(from, body, &mut fds, false)? {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if fds.len() > MAX_ATTACHED_FD_ENTRIES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "too many file descriptors",
            ));
        }
        if let Some(conn) = conn {
            // A region beyond the end of its file would kill the daemon at its first access:
            // refuse the message and close this connection instead.
            if let Err(e) = memory_files::check(request, body, &fds) {
                log::error!("vhost-user message {request} refused, frontend disconnected: {e}");
                return Err(e);
            }
            let flags = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
            if conn.handle_inflight(from, request, flags, body, &fds)? {
                continue;
            }
            conn.sniff(request, body, &fds);
        }
        send_all(to, &header, body, &fds)?;
        if conn.is_some() && request == u32::from(FrontendReq::SET_VRING_KICK) {
            kick(&fds);
        }
    }
}

/// Writes the kick eventfd a SET_VRING_KICK just passed on (if it had one), so the worker
/// looks at the queue as soon as it starts: requests in flight at a disconnect are
/// resubmitted at once, not at the driver's next kick (it kicked for them already). A kick
/// with nothing to do is harmless.
fn kick(fds: &[OwnedFd]) {
    if let [fd] = fds {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live local array to the eventfd the frontend passed,
        // which `fds` holds open.
        let _ = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }
}

/// Fills `buf` from the stream, collecting passed descriptors. Returns false on a clean end of
/// stream before the first byte when `eof_ok`.
fn recv_exact(
    sock: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    eof_ok: bool,
) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        let mut iov = [libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        }];
        let mut raw: [RawFd; MAX_ATTACHED_FD_ENTRIES] = [-1; MAX_ATTACHED_FD_ENTRIES];
        // SAFETY: the iovec points at `rest`, a live mutable byte slice that may take any bytes.
        let r = unsafe { sock.recv_with_fds(&mut iov, &mut raw) };
        let (n, nfds) = match r {
            Ok(v) => v,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno())),
        };
        for &fd in &raw[..nfds] {
            // SAFETY: recvmsg just installed these descriptors in our table; nothing else owns
            // them.
            fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        if n == 0 {
            if filled == 0 && eof_ok {
                return Ok(false);
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        filled += n;
    }
    Ok(true)
}

fn send_all(sock: &UnixStream, header: &[u8], body: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let total = header.len() + body.len();
    let sent = loop {
        match sock.send_with_fds(&[header, body], &raw) {
            Ok(n) => break n,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno())),
        }
    };
    if sent < total {
        // The descriptors went with the first part; the rest is plain bytes.
        let mut all = Vec::with_capacity(total);
        all.extend_from_slice(header);
        all.extend_from_slice(body);
        (&*sock).write_all(&all[sent..])?;
    }
    Ok(())
}
