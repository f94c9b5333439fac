//! QMP, the QEMU Machine Protocol: the management sockets of `--chardev` + `--monitor`.
//!
//! - [`config`]: the command-line options;
//! - [`framing`]: the byte stream split into bounded JSON messages;
//! - [`protocol`]: requests, replies, errors, events, the greeting;
//! - [`schema`]: what each command takes and returns, checked before it runs and reported by
//!   `query-qmp-schema`;
//! - [`args`]: a handler's arguments, taken one by one, with QEMU's error texts;
//! - [`server`]: listening, clients, negotiation, events;
//! - [`dispatch`] and [`commands`]: the commands.
//!
//! Monitors run on threads of their own; commands reach the data path only through the
//! graph's and the exports' own interfaces (starting, stopping, resizing), never a lock the
//! queues' workers take.

pub mod args;
pub mod commands;
pub mod config;
pub mod dispatch;
pub mod framing;
pub mod protocol;
pub mod schema;
pub mod server;

pub use config::MonitorConfig;
pub use server::{Clients, ListeningMonitor};
