//! The parts of the `strata` binary that its integration tests call as the daemon does.

pub mod sandbox;
