//! The few librados and librbd C functions the rbd driver calls (Debian's `librbd-dev`,
//! Ceph 16), declared by hand: a binding generator would pull in libclang for a dozen
//! prototypes from `rados/librados.h` and `rbd/librbd.h`.

use std::os::raw::{c_char, c_int, c_void};

/// `rados_t`: a cluster handle.
pub type Rados = *mut c_void;
/// `rados_ioctx_t`: a pool (and namespace) I/O context.
pub type IoCtx = *mut c_void;
/// `rbd_image_t`: an open image.
pub type Image = *mut c_void;
/// `rbd_completion_t`: one asynchronous request.
pub type Completion = *mut c_void;
/// `rbd_callback_t`.
pub type Callback = Option<unsafe extern "C" fn(Completion, *mut c_void)>;

#[link(name = "rados")]
extern "C" {
    pub fn rados_create2(
        cluster: *mut Rados,
        cluster_name: *const c_char,
        name: *const c_char,
        flags: u64,
    ) -> c_int;
    pub fn rados_conf_read_file(cluster: Rados, path: *const c_char) -> c_int;
    pub fn rados_conf_set(cluster: Rados, option: *const c_char, value: *const c_char) -> c_int;
    pub fn rados_conf_get(
        cluster: Rados,
        option: *const c_char,
        buf: *mut c_char,
        len: usize,
    ) -> c_int;
    pub fn rados_connect(cluster: Rados) -> c_int;
    pub fn rados_shutdown(cluster: Rados);
    pub fn rados_ioctx_create(cluster: Rados, pool: *const c_char, ioctx: *mut IoCtx) -> c_int;
    pub fn rados_ioctx_destroy(ioctx: IoCtx);
    pub fn rados_ioctx_set_namespace(ioctx: IoCtx, nspace: *const c_char);
}

#[link(name = "rbd")]
extern "C" {
    pub fn rbd_open(
        io: IoCtx,
        name: *const c_char,
        image: *mut Image,
        snap: *const c_char,
    ) -> c_int;
    pub fn rbd_open_read_only(
        io: IoCtx,
        name: *const c_char,
        image: *mut Image,
        snap: *const c_char,
    ) -> c_int;
    pub fn rbd_close(image: Image) -> c_int;
    pub fn rbd_get_size(image: Image, size: *mut u64) -> c_int;
    pub fn rbd_resize(image: Image, size: u64) -> c_int;
    pub fn rbd_aio_create_completion(
        arg: *mut c_void,
        cb: Callback,
        comp: *mut Completion,
    ) -> c_int;
    pub fn rbd_aio_get_return_value(comp: Completion) -> isize;
    pub fn rbd_aio_release(comp: Completion);
    pub fn rbd_aio_readv(
        image: Image,
        iov: *const libc::iovec,
        iovcnt: c_int,
        off: u64,
        comp: Completion,
    ) -> c_int;
    pub fn rbd_aio_writev(
        image: Image,
        iov: *const libc::iovec,
        iovcnt: c_int,
        off: u64,
        comp: Completion,
    ) -> c_int;
    pub fn rbd_aio_flush(image: Image, comp: Completion) -> c_int;
    pub fn rbd_aio_discard(image: Image, off: u64, len: u64, comp: Completion) -> c_int;
    pub fn rbd_aio_write_zeroes(
        image: Image,
        off: u64,
        len: u64,
        comp: Completion,
        zero_flags: c_int,
        op_flags: c_int,
    ) -> c_int;
}
