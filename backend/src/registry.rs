//! The driver registry: every driver strata has, found by name, by filename protocol or by
//! device, and the image creation hook of each format.

use crate::driver::{file, null, qcow2, raw, rbd, CreateRequest, DriverInfo};
use crate::error::{BlockError, Result};

/// Every driver strata has.
static DRIVERS: &[DriverInfo] = &[
    raw::DRIVER,
    qcow2::DRIVER,
    file::FILE_DRIVER,
    file::HOST_DEVICE_DRIVER,
    null::DRIVER,
    rbd::DRIVER,
];

/// Finds a driver by name.
pub fn find(name: &str) -> Result<&'static DriverInfo> {
    DRIVERS.iter().find(|d| d.name == name).ok_or_else(|| {
        let known: Vec<&str> = DRIVERS.iter().map(|d| d.name).collect();
        BlockError::invalid(format!(
            "Unknown driver '{name}' (strata has: {})",
            known.join(", ")
        ))
    })
}

/// Picks the protocol for a filename: a block device gets `host_device`, a `proto:` prefix names
/// its protocol, anything else is a `file`.
pub fn find_protocol(filename: &str) -> Result<&'static DriverInfo> {
    let best = DRIVERS
        .iter()
        .filter_map(|d| Some((d.probe_device?(filename), d)))
        .filter(|(score, _)| *score > 0)
        .max_by_key(|(score, _)| *score);
    if let Some((_, d)) = best {
        return Ok(d);
    }
    if let Some((prefix, _)) = filename.split_once(':') {
        // QEMU's path_has_protocol: a colon before any slash.
        if !prefix.contains('/') && !prefix.is_empty() {
            return DRIVERS
                .iter()
                .find(|d| d.protocol_prefix == Some(prefix))
                .ok_or_else(|| BlockError::invalid(format!("Unknown protocol '{prefix}'")));
        }
    }
    find("file")
}

/// Creates an image of `format` as `request` says; returns the effective format options (see
/// [`crate::driver::CreateFn`]).
pub fn create(format: &str, request: CreateRequest<'_>) -> Result<Vec<(&'static str, String)>> {
    let driver = find(format)?;
    let create = driver.create.ok_or_else(|| {
        let can: Vec<&str> = DRIVERS
            .iter()
            .filter(|d| d.create.is_some())
            .map(|d| d.name)
            .collect();
        BlockError::new(
            libc::ENOTSUP,
            format!(
                "Format driver '{format}' does not support image creation (strata creates: {})",
                can.join(", ")
            ),
        )
    })?;
    create(request)
}
