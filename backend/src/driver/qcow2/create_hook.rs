//! The registry's image creation hook for qcow2: qemu-img's `-o` options in, an image file out.

use super::create::{create_file, create_on_node, CreateOptions};
use crate::driver::{CreateRequest, CreateTarget};
use crate::error::{BlockError, Result};
use crate::options::{parse_bool, parse_size};

/// Creates a qcow2 image; returns the effective options in qemu-img's order.
pub(super) fn create_image(req: CreateRequest<'_>) -> Result<Vec<(&'static str, String)>> {
    let mut opts = CreateOptions {
        size: req.size,
        ..CreateOptions::default()
    };
    for (key, value) in req.options.iter() {
        let bad = |e: BlockError| BlockError::invalid(format!("Invalid option '{key}': {e}"));
        match key {
            "cluster_size" => opts.cluster_size = parse_size(value).map_err(bad)?,
            "compat" => opts.version = CreateOptions::parse_compat(value).map_err(bad)?,
            "lazy_refcounts" => opts.lazy_refcounts = parse_bool(key, value).map_err(bad)?,
            "extended_l2" => opts.extended_l2 = parse_bool(key, value).map_err(bad)?,
            "compression_type" => {
                opts.compression_type = CreateOptions::parse_compression(value).map_err(bad)?
            }
            "refcount_bits" => {
                opts.refcount_bits = value
                    .parse()
                    .map_err(|_| BlockError::invalid(format!("Invalid refcount_bits '{value}'")))?
            }
            "backing_file" => opts.backing_file = Some(value.to_string()),
            "backing_fmt" => opts.backing_format = Some(value.to_string()),
            "preallocation" if value == "off" => {}
            "preallocation" => {
                return Err(BlockError::new(
                    libc::ENOTSUP,
                    format!(
                        "Invalid option 'preallocation={value}': strata creates qcow2 images \
                         with preallocation=off only"
                    ),
                ))
            }
            other => {
                return Err(BlockError::invalid(format!(
                    "Invalid parameter '{other}' (qcow2 takes cluster_size, compat, \
                     lazy_refcounts, compression_type, refcount_bits, extended_l2, \
                     backing_file, backing_fmt, size, preallocation=off)"
                )))
            }
        }
    }
    match req.target {
        CreateTarget::File(path) => create_file(path, &opts)?,
        CreateTarget::Node(node) => create_on_node(node, &opts)?,
    }
    Ok(effective_options(&opts))
}

/// The options as qemu-img lists them after `fmt=qcow2`.
fn effective_options(opts: &CreateOptions) -> Vec<(&'static str, String)> {
    let on_off = |b: bool| if b { "on" } else { "off" }.to_string();
    let mut list = vec![
        ("cluster_size", opts.cluster_size.to_string()),
        ("extended_l2", on_off(opts.extended_l2)),
        (
            "compression_type",
            if opts.compression_type == 0 {
                "zlib"
            } else {
                "zstd"
            }
            .to_string(),
        ),
        ("size", (opts.size.div_ceil(512) * 512).to_string()),
    ];
    if opts.version < 3 {
        list.push(("compat", "0.10".to_string()));
    }
    if let Some(b) = &opts.backing_file {
        list.push(("backing_file", b.clone()));
    }
    if let Some(f) = &opts.backing_format {
        list.push(("backing_fmt", f.clone()));
    }
    list.push(("lazy_refcounts", on_off(opts.lazy_refcounts)));
    list.push(("refcount_bits", opts.refcount_bits.to_string()));
    list
}
