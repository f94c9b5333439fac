//! What happens to a system call the seccomp filter refuses: the kernel sends SIGSYS (the
//! filter's action is `Trap`), and this handler writes one line naming the call and the
//! thread to stderr, then makes the call return EPERM. So a call missing from the allowlist
//! shows in the log and fails where the daemon already handles errors, instead of killing
//! every export at once or going unnoticed.

use std::sync::atomic::{AtomicU32, Ordering};

/// Refusals reported on stderr; later ones only fail, so a refused call in a loop cannot
/// flood the log.
const MAX_REPORTS: u32 = 32;

static REPORTED: AtomicU32 = AtomicU32::new(0);

/// Installs the SIGSYS handler for the whole process.
pub(super) fn install() -> Result<(), String> {
    // SAFETY: an all-zero sigaction is a valid value (empty mask, no flags) before it is
    // filled in below.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `action` is initialised and `on_sigsys` only makes async-signal-safe calls
    // (write, prctl) and atomic operations on a static.
    if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
        return Err(format!(
            "Could not install the SIGSYS handler: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

extern "C" fn on_sigsys(
    _signal: libc::c_int,
    _info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    let context = context.cast::<libc::ucontext_t>();
    // SAFETY: the kernel passes a valid ucontext_t to an SA_SIGINFO handler; after a seccomp
    // trap, RAX holds the number of the refused call, and what the handler leaves in RAX is
    // the call's return value once it returns.
    let rax = unsafe { &mut (*context).uc_mcontext.gregs[libc::REG_RAX as usize] };
    let number = *rax;
    *rax = -i64::from(libc::EPERM);
    if REPORTED.fetch_add(1, Ordering::Relaxed) < MAX_REPORTS {
        report(number);
    }
}

/// Writes "strata: sandbox: thread NAME made system call N, which the sandbox refuses (EPERM);
/// ..." to stderr without allocating.
fn report(number: i64) {
    let mut line = Line::default();
    line.push(b"strata: sandbox: thread '");
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes (NUL included) into `name`.
    if unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) } == 0 {
        let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        line.push(&name[..len]);
    }
    line.push(b"' made system call ");
    line.push_number(number);
    line.push(
        b" (x86_64), which the sandbox refuses: it failed with EPERM. \
          Run with --sandbox off to serve without the sandbox, and report this.\n",
    );
    // SAFETY: writes the initialised part of a local buffer to stderr.
    unsafe { libc::write(libc::STDERR_FILENO, line.buf.as_ptr().cast(), line.len) };
}

/// A fixed buffer for one line (a signal handler must not allocate).
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Line {
            buf: [0; 256],
            len: 0,
        }
    }
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_number(&mut self, n: i64) {
        if n < 0 {
            self.push(b"-");
        }
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        let mut v = n.unsigned_abs();
        loop {
            at -= 1;
            digits[at] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[at..]);
    }
}
