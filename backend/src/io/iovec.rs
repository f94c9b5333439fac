//! Scatter-gather buffers handed to the block layer.

use std::marker::PhantomData;

/// One buffer of a vectored request: an `iovec` the kernel reads from or writes into.
///
/// The lifetime ties the buffer to the memory it points at; request futures borrow the
/// iovecs, and an in-flight io_uring operation is waited for before its future is dropped,
/// so the memory stays valid for as long as the kernel may touch it.
#[derive(Clone, Copy)]
#[repr(transparent)]
pub struct IoVec<'a> {
    raw: libc::iovec,
    _memory: PhantomData<&'a mut [u8]>,
}

// SAFETY: an IoVec is a pointer and a length into memory the caller lends for the duration of
// a request; the block layer only hands it to the kernel or copies through it on the thread
// that runs the request, so sending or sharing the descriptor itself is sound.
unsafe impl Send for IoVec<'_> {}
// SAFETY: see the Send impl; &IoVec gives no access to the memory without unsafe code.
unsafe impl Sync for IoVec<'_> {}

impl<'a> IoVec<'a> {
    /// Borrows a byte slice for the duration of a request.
    pub fn new(buf: &'a mut [u8]) -> Self {
        Self {
            raw: libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            },
            _memory: PhantomData,
        }
    }

    /// Wraps memory the caller owns outside Rust's borrow rules (guest memory).
    ///
    /// # Safety
    /// `ptr..ptr+len` must be valid for reads and writes, and must not be touched by anyone
    /// else in ways that conflict with the request, until every request using it has completed.
    pub unsafe fn from_raw_parts(ptr: *mut u8, len: usize) -> Self {
        Self {
            raw: libc::iovec {
                iov_base: ptr.cast(),
                iov_len: len,
            },
            _memory: PhantomData,
        }
    }

    /// Start of the buffer.
    pub fn as_ptr(&self) -> *mut u8 {
        self.raw.iov_base.cast()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.raw.iov_len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.raw.iov_len == 0
    }

    /// The same memory from `start`, `len` bytes long. Panics if out of range (a caller bug).
    pub fn slice(&self, start: usize, len: usize) -> IoVec<'a> {
        assert!(start.checked_add(len).is_some_and(|end| end <= self.len()));
        // SAFETY: the range lies inside this buffer, which the caller lent for 'a.
        unsafe { IoVec::from_raw_parts(self.as_ptr().add(start), len) }
    }
}

/// Total length of a vector of buffers.
pub fn total_len(iov: &[IoVec<'_>]) -> u64 {
    iov.iter().map(|v| v.len() as u64).sum()
}

/// Views IoVecs as `libc::iovec`s for the kernel.
pub fn as_raw<'s>(iov: &'s [IoVec<'_>]) -> &'s [libc::iovec] {
    // SAFETY: IoVec is repr(transparent) over libc::iovec (PhantomData is zero-sized).
    unsafe { std::slice::from_raw_parts(iov.as_ptr().cast(), iov.len()) }
}

/// Copies from a byte slice into the buffers, starting at byte `skip` of the vector.
pub fn copy_to_iov(iov: &[IoVec<'_>], mut skip: usize, mut src: &[u8]) {
    for v in iov {
        if src.is_empty() {
            break;
        }
        if skip >= v.len() {
            skip -= v.len();
            continue;
        }
        let n = (v.len() - skip).min(src.len());
        // SAFETY: the IoVec is valid for writes of its length for the request's duration and
        // `skip + n <= v.len()`; `src` is a separate Rust slice, so the ranges do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), v.as_ptr().add(skip), n) };
        src = &src[n..];
        skip = 0;
    }
}

/// Copies from the buffers, starting at byte `skip` of the vector, into a byte slice.
pub fn copy_from_iov(iov: &[IoVec<'_>], mut skip: usize, mut dst: &mut [u8]) {
    for v in iov {
        if dst.is_empty() {
            break;
        }
        if skip >= v.len() {
            skip -= v.len();
            continue;
        }
        let n = (v.len() - skip).min(dst.len());
        // SAFETY: the IoVec is valid for reads of its length for the request's duration and
        // `skip + n <= v.len()`; `dst` is a separate Rust slice.
        unsafe { std::ptr::copy_nonoverlapping(v.as_ptr().add(skip), dst.as_mut_ptr(), n) };
        dst = &mut dst[n..];
        skip = 0;
    }
}

/// Fills the buffers with zeroes from byte `skip` of the vector to its end.
pub fn zero_iov(iov: &[IoVec<'_>], mut skip: usize) {
    for v in iov {
        if skip >= v.len() {
            skip -= v.len();
            continue;
        }
        // SAFETY: the IoVec is valid for writes of its length; `skip < v.len()`.
        unsafe { std::ptr::write_bytes(v.as_ptr().add(skip), 0, v.len() - skip) };
        skip = 0;
    }
}

/// Whether every byte of the buffers is zero.
pub fn iov_is_zero(iov: &[IoVec<'_>]) -> bool {
    iov.iter().all(|v| {
        // SAFETY: the IoVec is valid for reads of its length for the request's duration.
        let bytes = unsafe { std::slice::from_raw_parts(v.as_ptr(), v.len()) };
        bytes.iter().all(|&b| b == 0)
    })
}

/// The sub-vector covering bytes `start..start+len` of `iov`.
pub fn sub_iov<'a>(iov: &[IoVec<'a>], mut start: usize, mut len: usize) -> Vec<IoVec<'a>> {
    let mut out = Vec::new();
    for v in iov {
        if len == 0 {
            break;
        }
        if start >= v.len() {
            start -= v.len();
            continue;
        }
        let n = (v.len() - start).min(len);
        out.push(v.slice(start, n));
        len -= n;
        start = 0;
    }
    out
}
