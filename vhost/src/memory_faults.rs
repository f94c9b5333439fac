//! Containment of guest memory whose file the frontend shrinks after it was mapped.
//!
//! A region is checked against its file's size when it is shared ([`crate::memory_files`]),
//! but the frontend can truncate the file later (a memfd that is not sealed, a file on
//! /dev/shm or hugetlbfs). An access to the lost part raises SIGBUS, which would kill the
//! whole daemon with every export in it. Here a SIGBUS handler finds the guest memory region
//! the fault lies in, puts anonymous memory in place of the whole region (so the access, run
//! again, completes against memory no one else sees) and marks the region's device; that
//! device's workers see the mark at their next event and drop the connection
//! ([`crate::worker`]). A SIGBUS anywhere else is not ours: the default action (a crash with a
//! core dump) runs as before.
//!
//! The handler only reads atomics and calls mmap, both safe in a signal handler. Each region
//! lives in a slot guarded by a sequence counter (odd while a writer changes it), so the
//! handler never acts on a half-written slot; writers take a mutex among themselves.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, Once};

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Regions of all devices at once: a vhost-user frontend shares at most a few dozen per
/// connection; a region that finds no slot is logged and left uncontained.
const SLOTS: usize = 1024;

/// One guest memory mapping.
struct Slot {
    /// Even when the slot is stable, odd while a writer changes it.
    seq: AtomicU64,
    start: AtomicUsize,
    /// Zero: the slot is free.
    len: AtomicUsize,
    /// The device ([`crate::device::Device::instance`]) the mapping belongs to.
    owner: AtomicU64,
}

#[allow(
    clippy::declare_interior_mutable_const,
    reason = "only used to initialise the static array"
)]
const FREE: Slot = Slot {
    seq: AtomicU64::new(0),
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    owner: AtomicU64::new(0),
};

static TABLE: [Slot; SLOTS] = [FREE; SLOTS];
/// Serialises writers of TABLE (the handler only reads it).
static WRITERS: Mutex<()> = Mutex::new(());
/// Faults contained so far, in any region.
static FAULTS: AtomicU64 = AtomicU64::new(0);
/// Devices whose memory faulted, as a small set (a device's id, 0 for free entries).
static FAULTED: [AtomicU64; 64] = [const { AtomicU64::new(0) }; 64];
static INSTALL: Once = Once::new();
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Installs the SIGBUS handler (once per process). An error leaves the default action: a
/// truncated memory file then kills the process, as it would without this module.
pub(crate) fn install() {
    INSTALL.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value, filled in below.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_sigbus as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        // SAFETY: `action` is initialised, its handler is an `extern "C"` function of the
        // signature SA_SIGINFO expects that only does what is safe in a signal handler, and
        // a null old action is allowed.
        let r = unsafe {
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut())
        };
        if r == 0 {
            INSTALLED.store(true, Ordering::Release);
        } else {
            log::warn!(
                "could not install the SIGBUS handler ({}): a frontend that truncates its \
                 memory file after sharing it would stop the whole daemon",
                io::Error::last_os_error()
            );
        }
    });
}

/// Records the regions of `mem` as device `owner`'s (in addition to those it has), so that a
/// fault in them is contained. A slot of another device that overlaps one of them is stale
/// (its mapping is gone, as the address is mapped again) and is taken over.
pub(crate) fn register(owner: u64, mem: &GuestMemoryMmap) {
    if !INSTALLED.load(Ordering::Acquire) {
        return;
    }
    let _writers = WRITERS.lock().unwrap_or_else(|e| e.into_inner());
    for region in mem.iter() {
        let start = region.as_ptr() as usize;
        let len = region.len() as usize;
        let same_or_stale = |s: &Slot| {
            let (s_start, s_len) = (
                s.start.load(Ordering::Relaxed),
                s.len.load(Ordering::Relaxed),
            );
            s_len != 0 && s_start < start + len && start < s_start + s_len
        };
        let slot = TABLE
            .iter()
            .find(|s| same_or_stale(s))
            .or_else(|| TABLE.iter().find(|s| s.len.load(Ordering::Relaxed) == 0));
        match slot {
            Some(slot) => write_slot(slot, start, len, owner),
            None => log::warn!(
                "guest memory region at {start:#x} ({len} bytes): no slot left to contain a \
                 truncation of its file"
            ),
        }
        // Any further overlapping slots are stale too.
        for s in TABLE.iter().filter(|s| same_or_stale(s)) {
            if s.start.load(Ordering::Relaxed) != start || s.owner.load(Ordering::Relaxed) != owner
            {
                write_slot(s, 0, 0, 0);
            }
        }
    }
}

/// Forgets device `owner`'s regions, except those of `keep` (its current memory table).
pub(crate) fn retain(owner: u64, keep: Option<&GuestMemoryMmap>) {
    let _writers = WRITERS.lock().unwrap_or_else(|e| e.into_inner());
    for s in &TABLE {
        if s.owner.load(Ordering::Relaxed) != owner || s.len.load(Ordering::Relaxed) == 0 {
            continue;
        }
        let start = s.start.load(Ordering::Relaxed);
        let kept = keep.is_some_and(|mem| mem.iter().any(|r| r.as_ptr() as usize == start));
        if !kept {
            write_slot(s, 0, 0, 0);
        }
    }
    if keep.is_none() {
        for f in &FAULTED {
            let _ = f.compare_exchange(owner, 0, Ordering::AcqRel, Ordering::Relaxed);
        }
    }
}

fn write_slot(slot: &Slot, start: usize, len: usize, owner: u64) {
    slot.seq.fetch_add(1, Ordering::AcqRel);
    slot.start.store(start, Ordering::Release);
    slot.len.store(len, Ordering::Release);
    slot.owner.store(owner, Ordering::Release);
    slot.seq.fetch_add(1, Ordering::AcqRel);
}

/// How many faults were contained so far (a worker compares it with what it saw last, one
/// load per event).
#[inline]
pub(crate) fn faults() -> u64 {
    FAULTS.load(Ordering::Acquire)
}

/// Whether the memory of device `owner` faulted.
pub(crate) fn faulted(owner: u64) -> bool {
    FAULTED.iter().any(|f| f.load(Ordering::Acquire) == owner)
}

/// The SIGBUS handler.
extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for a handler installed with SA_SIGINFO.
    let addr = unsafe { (*info).si_addr() } as usize;
    if !contain(addr) {
        // Not guest memory, or it cannot be replaced: back to the default action, which the
        // access raises again on return.
        // SAFETY: resetting a signal's action to SIG_DFL is async-signal-safe.
        unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
    }
}

/// Replaces the guest memory region holding `addr` with anonymous memory and marks its
/// device; false if `addr` is in no region or the replacement failed.
fn contain(addr: usize) -> bool {
    for slot in &TABLE {
        let seq = slot.seq.load(Ordering::Acquire);
        if seq % 2 == 1 {
            continue;
        }
        let start = slot.start.load(Ordering::Acquire);
        let len = slot.len.load(Ordering::Acquire);
        let owner = slot.owner.load(Ordering::Acquire);
        if slot.seq.load(Ordering::Acquire) != seq || len == 0 {
            continue;
        }
        if addr < start || addr - start >= len {
            continue;
        }
        // Replacing the mapping with anonymous memory of the same size keeps every pointer into
        // it valid; its former contents are lost to this process only, which drops the
        // connection. mmap is async-signal-safe in practice (a plain system call).
        // SAFETY: [start, start + len) is a guest mapping the faulting thread holds mapped.
        let p = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return false;
        }
        if !FAULTED.iter().any(|f| f.load(Ordering::Acquire) == owner) {
            for f in &FAULTED {
                if f.compare_exchange(0, owner, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    break;
                }
            }
        }
        FAULTS.fetch_add(1, Ordering::AcqRel);
        return true;
    }
    false
}
