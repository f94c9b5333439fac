//! The commands, one file per family.

pub mod control;
pub mod exports;
pub mod iothread;
pub mod jobs;
pub mod nodes;
pub mod reopen;
pub mod resize;
pub mod stats;
