//! Block drivers: the API an open driver implements ([`api`]), how a driver is described and
//! opened ([`open`]), and the drivers themselves. The registry of drivers is
//! [`crate::registry`].

mod api;
mod backing_policy;
mod open;

pub(crate) mod file;
mod file_create;
mod image_lock;
pub(crate) mod null;
pub mod qcow2;
pub(crate) mod raw;
pub(crate) mod rbd;

pub(crate) use api::accept_any_reopen;
pub use api::{BlockDriver, BlockStatus, FileId, IoFuture, Limits};
pub use backing_policy::BackingPolicy;
pub use open::{
    BackingChain, ChildOpener, CreateFn, CreateRequest, CreateTarget, DriverInfo, DriverKind,
    NodeFuture, OpenContext, OpenFuture, ParentOptions, MAX_BACKING_CHAIN,
};
pub use rbd::refuse_opens as refuse_rbd_opens;
