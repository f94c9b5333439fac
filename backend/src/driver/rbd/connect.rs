//! A connection to a Ceph cluster and one pool (librados): the configuration the rbd node's
//! options give, with timeouts so that an unreachable or broken cluster fails the open
//! instead of hanging it.

use std::ffi::{CStr, CString};
use std::os::raw::c_char;
use std::ptr;

use super::ffi;
use crate::error::{BlockError, Result};

/// Ceph defaults that strata replaces where the configuration keeps them: (option, Ceph's
/// default, strata's value). A value set to exactly Ceph's default cannot be told from it.
const OUR_DEFAULTS: [(&str, &str, &str); 4] = [
    // Ceph's timeouts are made for a cluster that is there: the connect waits five minutes
    // and a request forever.
    // How long the connect waits for the monitors.
    ("client_mount_timeout", "300", "10"),
    // Monitor commands (pool and image lookups).
    ("rados_mon_op_timeout", "0", "10"),
    // A data request with its OSD down: long enough for an OSD to restart, after which the
    // guest sees an I/O error rather than a request that never completes.
    ("rados_osd_op_timeout", "0", "60"),
    // librbd hands each request to a dispatch thread of its own unless this is off: one more
    // thread wake-up per request, on top of the messenger's. Off, strata's workers build and
    // send each request themselves (less daemon CPU per request: docs/performance.md,
    // "Requests handed to librbd by the worker"). A pool's or image's own configuration
    // (`rbd config image set IMAGE rbd_non_blocking_aio true`) still turns it back on. What
    // can then hold up a worker is librbd's own short locks, and the connection's throttle
    // (`objecter_inflight_ops`, `objecter_inflight_op_bytes`) when that many requests are
    // already in flight: the worker waits for some of them to finish, as a drain would.
    ("rbd_non_blocking_aio", "true", "false"),
];

/// Whether a configured value is `default`: as text, or as the same number (Ceph prints a
/// number option as `300.000000`).
fn is_default(value: &str, default: &str) -> bool {
    let value = value.trim();
    value == default
        || matches!(
            (value.parse::<f64>(), default.parse::<f64>()),
            (Ok(v), Ok(d)) if v == d
        )
}

/// What the connection needs from the node's options.
#[derive(Debug, Default)]
pub struct ConnectOptions {
    /// The configuration file (`conf`); Ceph's default search (CEPH_CONF, /etc/ceph/...)
    /// when None.
    pub conf: Option<String>,
    /// The client id (`user`), without `client.`; Ceph's default (`admin`) when None.
    pub user: Option<String>,
    /// The client's key (from `key-secret`), else the configured keyring's.
    pub key: Option<String>,
    /// `auth-client-required`, as Ceph's `auth_client_required` list.
    pub auth_client_required: Option<String>,
    /// `server`, as Ceph's `mon_host` list.
    pub mon_host: Option<String>,
    /// The pool.
    pub pool: String,
    /// The namespace in the pool.
    pub namespace: Option<String>,
    /// librbd's write-back cache (`rbd_cache`): off with `cache.direct=on`, as in QEMU.
    pub rbd_cache: bool,
}

/// A connected cluster handle and an I/O context on the pool; shut down when dropped.
pub struct Cluster {
    rados: ffi::Rados,
    ioctx: ffi::IoCtx,
}

// SAFETY: librados handles may be used from any thread (librados is thread-safe); the
// handles are only destroyed in Drop, when no other reference exists.
unsafe impl Send for Cluster {}
// SAFETY: as above.
unsafe impl Sync for Cluster {}

fn cstring(what: &str, value: &str) -> Result<CString> {
    CString::new(value).map_err(|_| BlockError::invalid(format!("rbd: {what} contains a NUL byte")))
}

fn errno_error(r: i32, what: impl Into<String>) -> BlockError {
    let what: String = what.into();
    BlockError::from_errno(-r, what)
}

/// A handle that is shut down on drop unless it was connected and handed over.
struct Handle(ffi::Rados);

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: self.0 is a handle from rados_create2 that nothing else uses.
        unsafe { ffi::rados_shutdown(self.0) };
    }
}

impl Handle {
    fn set(&self, option: &str, value: &str) -> Result<()> {
        let (o, v) = (cstring("an option", option)?, cstring(option, value)?);
        // SAFETY: a live, not yet connected handle and two NUL-terminated strings.
        let r = unsafe { ffi::rados_conf_set(self.0, o.as_ptr(), v.as_ptr()) };
        if r < 0 {
            return Err(errno_error(
                r,
                format!("rbd: cannot set '{option}' to '{value}'"),
            ));
        }
        Ok(())
    }

    fn get(&self, option: &str) -> Option<String> {
        let o = cstring("an option", option).ok()?;
        let mut buf = [0 as c_char; 64];
        // SAFETY: a live handle, a NUL-terminated name and a buffer of the given length.
        let r = unsafe { ffi::rados_conf_get(self.0, o.as_ptr(), buf.as_mut_ptr(), buf.len()) };
        if r < 0 {
            return None;
        }
        // SAFETY: rados_conf_get wrote a NUL-terminated string into buf.
        let value = unsafe { CStr::from_ptr(buf.as_ptr()) };
        Some(value.to_string_lossy().into_owned())
    }
}

impl Cluster {
    /// Connects as `options` say and opens the pool (and namespace). Blocks for at most the
    /// connect timeout.
    pub fn connect(options: &ConnectOptions) -> Result<Self> {
        let user = options.user.as_deref().unwrap_or("admin");
        let name = cstring("user", &format!("client.{user}"))?;
        let mut rados = ptr::null_mut();
        // SAFETY: out-pointer to a local; NUL-terminated cluster and client names.
        let r = unsafe { ffi::rados_create2(&mut rados, c"ceph".as_ptr(), name.as_ptr(), 0) };
        if r < 0 {
            return Err(errno_error(r, "rbd: cannot create a cluster handle"));
        }
        let handle = Handle(rados);
        let conf = options
            .conf
            .as_deref()
            .map(|c| cstring("conf", c))
            .transpose()?;
        let conf_ptr = conf.as_ref().map_or(ptr::null(), |c| c.as_ptr());
        // SAFETY: a live handle; a NUL-terminated path, or NULL for Ceph's default search.
        let r = unsafe { ffi::rados_conf_read_file(rados, conf_ptr) };
        // Without `conf`, a missing default file is fine (server= may say all), as in QEMU.
        if r < 0 {
            if let Some(path) = &options.conf {
                return Err(errno_error(
                    r,
                    format!("rbd: error reading conf file '{path}'"),
                ));
            }
        }
        for (option, default, ours) in OUR_DEFAULTS {
            if handle.get(option).is_some_and(|v| is_default(&v, default)) {
                handle.set(option, ours)?;
            }
        }
        if let Some(mon_host) = &options.mon_host {
            handle.set("mon_host", mon_host)?;
        }
        if let Some(key) = &options.key {
            handle.set("key", key)?;
        }
        if let Some(auth) = &options.auth_client_required {
            handle.set("auth_client_required", auth)?;
        }
        handle.set(
            "rbd_cache",
            if options.rbd_cache { "true" } else { "false" },
        )?;
        // SAFETY: a live, configured handle.
        let r = unsafe { ffi::rados_connect(rados) };
        if r < 0 {
            let why = match -r {
                libc::ETIMEDOUT => "no monitor answered in time (is the cluster reachable?)",
                libc::EACCES | libc::EPERM => "authentication failed (check the user and key)",
                _ => "cannot connect",
            };
            return Err(errno_error(
                r,
                format!("rbd: {why}: connecting as client.{user}"),
            ));
        }
        let pool = cstring("pool", &options.pool)?;
        let mut ioctx = ptr::null_mut();
        // SAFETY: a connected handle, a NUL-terminated pool name, an out-pointer to a local.
        let r = unsafe { ffi::rados_ioctx_create(rados, pool.as_ptr(), &mut ioctx) };
        if r < 0 {
            let what = if r == -libc::ENOENT {
                format!("rbd: pool '{}' does not exist", options.pool)
            } else {
                format!("rbd: cannot open pool '{}'", options.pool)
            };
            return Err(errno_error(r, what));
        }
        let cluster = Self {
            rados: handle.0,
            ioctx,
        };
        std::mem::forget(handle);
        if let Some(ns) = &options.namespace {
            let ns = cstring("namespace", ns)?;
            // SAFETY: a live I/O context and a NUL-terminated name (librados copies it).
            unsafe { ffi::rados_ioctx_set_namespace(cluster.ioctx, ns.as_ptr()) };
        }
        Ok(cluster)
    }

    /// The pool's I/O context, valid while `self` lives.
    pub fn ioctx(&self) -> ffi::IoCtx {
        self.ioctx
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: both handles are live and unused elsewhere (images opened on the context
        // are closed before their Cluster drops: see `Image`).
        unsafe {
            ffi::rados_ioctx_destroy(self.ioctx);
            ffi::rados_shutdown(self.rados);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_default;

    #[test]
    fn a_default_matches_as_text_or_as_the_same_number() {
        assert!(is_default("300.000000", "300"));
        assert!(is_default("0", "0"));
        assert!(is_default("true", "true"));
        assert!(!is_default("300.5", "300"));
        assert!(!is_default("false", "true"));
        assert!(!is_default("", "0"));
    }
}
