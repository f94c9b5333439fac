//! The commands, one file per family.

pub mod control;
pub mod exports;
pub mod nodes;
pub mod resize;
