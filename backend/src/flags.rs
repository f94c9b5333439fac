//! Per-node flags: the options every node understands, whatever its driver.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use crate::error::{BlockError, Result};
use crate::options::Options;

/// Keys of the options every node understands.
pub mod keys {
    /// Node name chosen by the user.
    pub const NODE_NAME: &str = "node-name";
    /// Driver name.
    pub const DRIVER: &str = "driver";
    /// Open read-only.
    pub const READ_ONLY: &str = "read-only";
    /// Fall back to read-only when read-write is refused.
    pub const AUTO_READ_ONLY: &str = "auto-read-only";
    /// Bypass the host page cache (O_DIRECT).
    pub const CACHE_DIRECT: &str = "cache.direct";
    /// Ignore flush requests.
    pub const CACHE_NO_FLUSH: &str = "cache.no-flush";
    /// Discard mode.
    pub const DISCARD: &str = "discard";
    /// Zero-write detection.
    pub const DETECT_ZEROES: &str = "detect-zeroes";
}

/// What a node does with discard requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DiscardMode {
    /// Discards succeed without doing anything (QEMU's default).
    #[default]
    Ignore,
    /// Discards are passed down and free space.
    Unmap,
}

/// Whether writes of zeroes are detected and turned into write_zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DetectZeroes {
    /// No detection.
    #[default]
    Off,
    /// Zero writes become write_zeroes without unmapping.
    On,
    /// Zero writes become write_zeroes that may unmap (when discard=unmap).
    Unmap,
}

/// The flags of an open node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NodeFlags {
    /// The node refuses writes, discards and zero writes.
    pub read_only: bool,
    /// Open read-write if allowed, else read-only.
    pub auto_read_only: bool,
    /// Bypass the host page cache (O_DIRECT) in protocol drivers.
    pub cache_direct: bool,
    /// Flush requests succeed without reaching the disk.
    pub cache_no_flush: bool,
    /// Discard handling.
    pub discard: DiscardMode,
    /// Zero-write detection.
    pub detect_zeroes: DetectZeroes,
}

impl NodeFlags {
    /// Consumes the common flag options from `opts`.
    pub fn take_from(opts: &mut Options) -> Result<Self> {
        let discard = match opts.take(keys::DISCARD).as_deref() {
            None | Some("ignore") | Some("off") => DiscardMode::Ignore,
            Some("unmap") | Some("on") => DiscardMode::Unmap,
            Some(other) => {
                return Err(BlockError::invalid(format!(
                    "Parameter 'discard' expects 'ignore' or 'unmap', got '{other}'"
                )))
            }
        };
        let detect_zeroes = match opts.take(keys::DETECT_ZEROES).as_deref() {
            None | Some("off") => DetectZeroes::Off,
            Some("on") => DetectZeroes::On,
            Some("unmap") => DetectZeroes::Unmap,
            Some(other) => {
                return Err(BlockError::invalid(format!(
                    "Parameter 'detect-zeroes' expects 'off', 'on' or 'unmap', got '{other}'"
                )))
            }
        };
        if detect_zeroes == DetectZeroes::Unmap && discard != DiscardMode::Unmap {
            return Err(BlockError::invalid(
                "setting detect-zeroes to unmap is not allowed without setting discard \
                 operation to unmap",
            ));
        }
        Ok(Self {
            read_only: opts.take_bool(keys::READ_ONLY)?.unwrap_or(false),
            auto_read_only: opts.take_bool(keys::AUTO_READ_ONLY)?.unwrap_or(false),
            cache_direct: opts.take_bool(keys::CACHE_DIRECT)?.unwrap_or(false),
            cache_no_flush: opts.take_bool(keys::CACHE_NO_FLUSH)?.unwrap_or(false),
            discard,
            detect_zeroes,
        })
    }
}

/// The flags of an open node as it holds them: each one an atomic, so that QMP's
/// `blockdev-reopen` changes them while queue workers read them without a lock. A reopen
/// stores them while the node's exports are paused, so a request never sees half a change.
#[derive(Debug, Default)]
pub(crate) struct SharedFlags {
    read_only: AtomicBool,
    auto_read_only: AtomicBool,
    cache_direct: AtomicBool,
    cache_no_flush: AtomicBool,
    discard: AtomicU8,
    detect_zeroes: AtomicU8,
}

impl SharedFlags {
    pub(crate) fn new(flags: NodeFlags) -> Self {
        let shared = SharedFlags::default();
        shared.store(flags);
        shared
    }

    /// All the flags at once.
    pub(crate) fn load(&self) -> NodeFlags {
        NodeFlags {
            read_only: self.read_only(),
            auto_read_only: self.auto_read_only.load(Ordering::Relaxed),
            cache_direct: self.cache_direct.load(Ordering::Relaxed),
            cache_no_flush: self.cache_no_flush(),
            discard: self.discard(),
            detect_zeroes: self.detect_zeroes(),
        }
    }

    pub(crate) fn store(&self, f: NodeFlags) {
        self.read_only.store(f.read_only, Ordering::Release);
        self.auto_read_only
            .store(f.auto_read_only, Ordering::Relaxed);
        self.cache_direct.store(f.cache_direct, Ordering::Relaxed);
        self.cache_no_flush
            .store(f.cache_no_flush, Ordering::Relaxed);
        self.discard.store(f.discard as u8, Ordering::Relaxed);
        self.detect_zeroes
            .store(f.detect_zeroes as u8, Ordering::Relaxed);
    }

    pub(crate) fn read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }

    pub(crate) fn cache_no_flush(&self) -> bool {
        self.cache_no_flush.load(Ordering::Relaxed)
    }

    pub(crate) fn discard(&self) -> DiscardMode {
        match self.discard.load(Ordering::Relaxed) {
            x if x == DiscardMode::Unmap as u8 => DiscardMode::Unmap,
            _ => DiscardMode::Ignore,
        }
    }

    pub(crate) fn detect_zeroes(&self) -> DetectZeroes {
        match self.detect_zeroes.load(Ordering::Relaxed) {
            x if x == DetectZeroes::On as u8 => DetectZeroes::On,
            x if x == DetectZeroes::Unmap as u8 => DetectZeroes::Unmap,
            _ => DetectZeroes::Off,
        }
    }
}
