//! Parsing `--export` options (qemu-storage-daemon's `type=vhost-user-blk,...` syntax).

use std::path::PathBuf;

use strata_backend::{Graph, Options};
use strata_vhost::{BlkExportConfig, Listen};

use crate::iothreads::IoThreads;

/// Default number of descriptors per virtqueue.
const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Most virtqueues an export may have (one worker thread each).
const MAX_QUEUES: u16 = 64;

/// Parses one `--export` and resolves its node in the graph (and its iothread in `iothreads`).
pub fn parse(
    text: &str,
    graph: &Graph,
    iothreads: &IoThreads,
) -> Result<(BlkExportConfig, Listen), String> {
    let mut o = Options::parse(text, Some("type")).map_err(|e| e.to_string())?;
    let err = |e: strata_backend::BlockError| e.to_string();
    match o.take("type").as_deref() {
        Some("vhost-user-blk") => {}
        Some(other) => {
            return Err(format!(
                "Export type '{other}' is not supported (strata serves type=vhost-user-blk)"
            ))
        }
        None => return Err("--export needs 'type' (type=vhost-user-blk)".into()),
    }
    let id = o.take("id").ok_or("--export needs an 'id'")?;
    let node_name = o
        .take("node-name")
        .ok_or_else(|| format!("export '{id}': needs 'node-name'"))?;
    let node = graph
        .find(&node_name)
        .ok_or_else(|| format!("export '{id}': Cannot find node '{node_name}'"))?;
    let writable = o.take_bool("writable").map_err(err)?.unwrap_or(false);
    let writethrough = o.take_bool("writethrough").map_err(err)?.unwrap_or(false);
    if writable && node.is_read_only() {
        return Err(format!(
            "export '{id}': writable=on, but node '{node_name}' is read-only"
        ));
    }
    // strata runs a worker per queue whatever the iothread; its polling setting carries over.
    let iothread_poll_max_ns = match o.take("iothread") {
        Some(name) => iothreads
            .poll_max_ns(&name)
            .map_err(|e| format!("export '{id}': {e}"))?,
        None => None,
    };
    let listen = match o.take("addr.type").as_deref() {
        Some("unix") => {
            Listen::UnixPath(PathBuf::from(o.take("addr.path").ok_or_else(|| {
                format!("export '{id}': addr.type=unix needs 'addr.path'")
            })?))
        }
        Some("fd") => {
            let s = o
                .take("addr.str")
                .ok_or_else(|| format!("export '{id}': addr.type=fd needs 'addr.str'"))?;
            Listen::Fd(s.parse().map_err(|_| {
                format!("export '{id}': addr.str must be a file descriptor number, got '{s}'")
            })?)
        }
        Some(other) => {
            return Err(format!(
                "export '{id}': addr.type '{other}' is not supported (use unix or fd)"
            ))
        }
        None => return Err(format!("export '{id}': needs 'addr.type' (unix or fd)")),
    };
    let num_queues = o.take_u64("num-queues").map_err(err)?.unwrap_or(1);
    if num_queues == 0 || num_queues > u64::from(MAX_QUEUES) {
        return Err(format!(
            "export '{id}': num-queues must be between 1 and {MAX_QUEUES}, got {num_queues}"
        ));
    }
    let logical_block_size = o
        .take_size("logical-block-size")
        .map_err(err)?
        .unwrap_or(512);
    if !(512..=65536).contains(&logical_block_size) || !logical_block_size.is_power_of_two() {
        return Err(format!(
            "export '{id}': logical-block-size must be a power of two from 512 to 65536, got {logical_block_size}"
        ));
    }
    let serial = o.take("serial");
    // QSD sets polling on its iothread object (poll-max-ns); strata's workers belong to the
    // export, so the export takes it too, and its own setting wins.
    let poll_max_ns = o
        .take_u64("poll-max-ns")
        .map_err(err)?
        .or(iothread_poll_max_ns)
        .unwrap_or(strata_vhost::DEFAULT_POLL_MAX_NS);
    if let Some(key) = o.first_key() {
        return Err(format!("export '{id}': Invalid parameter '{key}'"));
    }
    Ok((
        BlkExportConfig {
            id,
            node,
            writable,
            num_queues: num_queues as u16,
            queue_size: DEFAULT_QUEUE_SIZE,
            logical_block_size: logical_block_size as u32,
            serial,
            writethrough,
            poll_max_ns,
        },
        listen,
    ))
}
