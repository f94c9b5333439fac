//! Statistics: `query-blockstats` (per export, or with `query-nodes` per node) and
//! `block-latency-histogram-set`, in QEMU 7.2's shapes.
//!
//! An export's entry is what QEMU shows for a guest device's block backend: the export's own
//! request counts (`device` "", `qdev` the export id), its node's name and highest written
//! offset, and the node's file child (`parent`) and backing chain (`backing`) as node entries.
//! Node entries carry each node's own counts (QEMU 7.2 counts nothing per node: its entries
//! are zeros there).

use serde_json::{json, Map, Value};
use strata_backend::accounting::{
    histogram::check_boundaries, BoundaryError, HistogramSnapshot, IoKind, IoStats,
    IoStatsSnapshot, MAX_BOUNDARIES,
};
use strata_backend::{ChildRole, Node};

use crate::qmp::args::Args;
use crate::qmp::dispatch::Context;
use crate::qmp::protocol::QmpError;

/// `query-blockstats`.
pub fn query_blockstats(ctx: &Context<'_>, mut args: Args) -> Result<Value, QmpError> {
    let query_nodes = args.opt_bool("query-nodes")?.unwrap_or(false);
    args.finish()?;
    let mut list = Vec::new();
    if query_nodes {
        for node in ctx.daemon.graph.nodes() {
            list.push(Value::Object(node_entry(&node, false)));
        }
    } else {
        ctx.daemon.exports.for_each(|export| {
            let node = export.node();
            let mut entry = node_entry(node, true);
            let highest = node.io_stats().snapshot().wr_highest_offset;
            entry.insert(
                "stats".into(),
                stats_json(&export.io_stats().snapshot(), highest),
            );
            entry.insert("device".into(), json!(""));
            entry.insert("qdev".into(), json!(export.id()));
            list.push(Value::Object(entry));
        });
    }
    Ok(Value::Array(list))
}

/// A node's entry: its counts, its file child as `parent` and, for an export's entry
/// (`with_backing`), its backing chain, as QEMU's `bdrv_query_bds_stats`.
fn node_entry(node: &Node, with_backing: bool) -> Map<String, Value> {
    let s = node.io_stats().snapshot();
    let mut e = Map::new();
    e.insert("node-name".into(), json!(node.name()));
    e.insert("stats".into(), stats_json(&s, s.wr_highest_offset));
    if matches!(node.driver_name(), "file" | "host_device") {
        let st = node.stats();
        e.insert(
            "driver-specific".into(),
            json!({
                "driver": node.driver_name(),
                "discard-nb-ok": st.discards_ok.get(),
                "discard-nb-failed": st.discards_failed.get(),
                "discard-bytes-ok": st.discard_bytes_ok.get(),
            }),
        );
    }
    if let Some(file) = node.child(ChildRole::File) {
        e.insert(
            "parent".into(),
            Value::Object(node_entry(file, with_backing)),
        );
    }
    if with_backing {
        if let Some(backing) = node.child(ChildRole::Backing) {
            e.insert("backing".into(), Value::Object(node_entry(backing, true)));
        }
    }
    e
}

/// QEMU's `BlockDeviceStats`.
fn stats_json(s: &IoStatsSnapshot, wr_highest_offset: u64) -> Value {
    let k = |kind: IoKind| s.kinds[kind as usize];
    let (rd, wr, fl, un) = (
        k(IoKind::Read),
        k(IoKind::Write),
        k(IoKind::Flush),
        k(IoKind::Unmap),
    );
    let mut m = json!({
        "rd_bytes": rd.bytes,
        "wr_bytes": wr.bytes,
        "unmap_bytes": un.bytes,
        "rd_operations": rd.ops,
        "wr_operations": wr.ops,
        "flush_operations": fl.ops,
        "unmap_operations": un.ops,
        "rd_total_time_ns": rd.total_time_ns,
        "wr_total_time_ns": wr.total_time_ns,
        "flush_total_time_ns": fl.total_time_ns,
        "unmap_total_time_ns": un.total_time_ns,
        "wr_highest_offset": wr_highest_offset,
        "rd_merged": 0,
        "wr_merged": 0,
        "unmap_merged": 0,
        "failed_rd_operations": rd.failed,
        "failed_wr_operations": wr.failed,
        "failed_flush_operations": fl.failed,
        "failed_unmap_operations": un.failed,
        "invalid_rd_operations": rd.invalid,
        "invalid_wr_operations": wr.invalid,
        "invalid_flush_operations": fl.invalid,
        "invalid_unmap_operations": un.invalid,
        // Failed requests count in the times, refused ones in the idle time.
        "account_invalid": true,
        "account_failed": true,
        "timed_stats": [],
    });
    if let Some(idle) = s.idle_time_ns {
        m["idle_time_ns"] = json!(idle);
    }
    for (name, h) in ["rd", "wr", "flush"].iter().zip(&s.histograms) {
        if let Some(HistogramSnapshot { boundaries, bins }) = h {
            m[format!("{name}_latency_histogram")] =
                json!({"boundaries": boundaries, "bins": bins});
        }
    }
    m
}

/// An optional list of boundaries, QEMU's `[uint64]` (the schema has checked it is a list of
/// integers). QEMU takes a negative one as its two's complement; strata refuses it.
fn opt_boundaries(rest: &mut Map<String, Value>, key: &str) -> Result<Option<Vec<u64>>, QmpError> {
    let Some(value) = rest.remove(key) else {
        return Ok(None);
    };
    let items = value.as_array().map(Vec::as_slice).unwrap_or_default();
    items
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_u64().ok_or_else(|| {
                QmpError::generic(format!(
                    "Parameter '{key}[{i}]' expects a non-negative integer, got {v}"
                ))
            })
        })
        .collect::<Result<Vec<u64>, _>>()
        .map(Some)
}

/// `block-latency-histogram-set`: `id` is an export id (QEMU: a device) or, which QEMU does
/// not take, a node name. `boundaries` sets the read, write and flush histograms, each
/// `boundaries-KIND` one of them; none at all turns every histogram off. New histograms start
/// empty. Every list is checked before any histogram changes.
pub fn block_latency_histogram_set(ctx: &Context<'_>, mut args: Args) -> Result<Value, QmpError> {
    let id = args.str("id")?;
    let mut rest = args.take_rest();
    let all = opt_boundaries(&mut rest, "boundaries")?;
    let per_kind = [
        opt_boundaries(&mut rest, "boundaries-read")?,
        opt_boundaries(&mut rest, "boundaries-write")?,
        opt_boundaries(&mut rest, "boundaries-flush")?,
    ];
    Args::new(rest).finish()?;
    let node = if ctx.daemon.exports.contains(&id) {
        None
    } else {
        Some(
            ctx.daemon
                .graph
                .find(&id)
                .ok_or_else(|| QmpError::device_not_found(format!("Device '{id}' not found")))?,
        )
    };
    let chosen: Vec<Option<&Vec<u64>>> = per_kind
        .iter()
        .map(|own| own.as_ref().or(all.as_ref()))
        .collect();
    for (name, b) in ["read", "write", "flush"].iter().zip(&chosen) {
        if let Some(b) = b {
            check_boundaries(b).map_err(|e| {
                QmpError::generic(match e {
                    BoundaryError::TooMany => format!(
                        "Device '{id}' set {name} boundaries fail: at most {MAX_BOUNDARIES} \
                         boundaries"
                    ),
                    _ => format!("Device '{id}' set {name} boundaries fail"),
                })
            })?;
        }
    }
    let clear = chosen.iter().all(Option::is_none);
    let apply = |stats: &IoStats| {
        for (kind, b) in IoKind::WITH_HISTOGRAM.iter().zip(&chosen) {
            let Some(h) = stats.histogram(*kind) else {
                continue;
            };
            // Checked above, so `set` cannot refuse them.
            let _ = match b {
                Some(b) => h.set(Some(b)),
                None if clear => h.set(None),
                None => Ok(()),
            };
        }
    };
    match node {
        Some(node) => apply(node.io_stats()),
        None => ctx.daemon.exports.for_each(|export| {
            if export.id() == id {
                apply(export.io_stats());
            }
        }),
    }
    Ok(json!({}))
}

#[cfg(test)]
mod tests {
    use strata_backend::{Graph, Options};

    use super::*;
    use crate::qmp::schema::check::check;

    fn conforms(ty: &str, value: &Value) {
        check(ty, value, "return", "return").unwrap_or_else(|e| panic!("{}: {value}", e.desc));
    }

    /// Every member strata fills in is in its schema, of the type listed there, and every
    /// member listed as required is filled in.
    #[test]
    fn entries_are_what_the_schema_says() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let mut options = Options::new();
        options.set("driver", "raw");
        options.set("node-name", "d0");
        options.set("file.driver", "file");
        options.set("file.filename", image.to_str().unwrap());
        let node = Graph::new().open(options).unwrap();
        for with_backing in [false, true] {
            let entry = Value::Object(node_entry(&node, with_backing));
            conforms("BlockStats", &entry);
            assert_eq!(entry["parent"]["driver-specific"]["driver"], "file");
        }
        // The members present only once there is a value.
        let histogram = HistogramSnapshot {
            boundaries: vec![10, u64::MAX],
            bins: vec![1, 2, 3],
        };
        let snapshot = IoStatsSnapshot {
            idle_time_ns: Some(5),
            histograms: [0; 3].map(|_| Some(histogram.clone())),
            ..IoStatsSnapshot::default()
        };
        let stats = stats_json(&snapshot, 0);
        assert!(stats.get("flush_latency_histogram").is_some(), "{stats}");
        conforms("BlockDeviceStats", &stats);
    }
}
