//! Helpers shared by the root crate's integration tests: the strata binary as a child process
//! ([`daemon::Daemon`]), a libblkio vhost-user-blk client ([`client::Client`]) and the image
//! tools ([`img_tools`]).
#![allow(dead_code)]

pub mod client;
pub mod daemon;
pub mod img_tools;

use std::path::Path;

/// `p` as a string, for a command line or an option value (temporary paths are UTF-8).
pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}
