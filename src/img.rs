//! `strata img`: image creation (raw, qcow2), information and consistency checks, with
//! qemu-img's syntax, messages and exit codes.

use std::fs::OpenOptions;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value};
use strata_backend::driver::qcow2::{self, CheckResult, CreateOptions, Repair};
use strata_backend::filename::full_backing_filename;
use strata_backend::options::{parse_bool, parse_size};
use strata_backend::{block_on, probe, ChildRole, Graph, Node, Options};

use crate::cli::{ImgCheckArgs, ImgCommand, ImgCreateArgs, ImgInfoArgs, OutputFormat, RepairMode};

/// Runs an `img` subcommand.
pub fn run(cmd: ImgCommand) -> Result<(), String> {
    match cmd {
        ImgCommand::Create(args) => create(&args),
        ImgCommand::Info(args) => info(&args),
        ImgCommand::Check(args) => check(&args),
    }
}

fn create(args: &ImgCreateArgs) -> Result<(), String> {
    let size = args
        .size
        .as_deref()
        .map(|s| parse_size(s).map_err(|e| format!("Invalid image size specified: {e}")))
        .transpose()?;
    match args.format.as_str() {
        "raw" => {
            if args.backing.is_some() {
                return Err("Backing file not supported for file format 'raw'".into());
            }
            if !args.options.is_empty() {
                return Err("Invalid options for file format 'raw'".into());
            }
            let size = size.ok_or("Image creation needs a size parameter")?;
            if !args.quiet {
                println!("Formatting '{}', fmt=raw size={size}", args.file.display());
            }
            create_raw_file(&args.file, size)
        }
        "qcow2" => create_qcow2(args, size),
        other => Err(format!(
            "Unknown file format '{other}' (strata img create supports: raw, qcow2)"
        )),
    }
}

/// Creates (or truncates) a sparse raw image of `size` bytes.
pub fn create_raw_file(path: &std::path::Path, size: u64) -> Result<(), String> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| format!("Could not create '{}': {e}", path.display()))?;
    file.set_len(size)
        .map_err(|e| format!("Could not resize '{}' to {size} bytes: {e}", path.display()))
}

/// Parses qemu-img's `-o` options for qcow2.
fn qcow2_options(args: &ImgCreateArgs, opts: &mut CreateOptions) -> Result<Option<u64>, String> {
    let mut size = None;
    for text in &args.options {
        let parsed = Options::parse(text, None).map_err(|e| e.to_string())?;
        for (key, value) in parsed.iter() {
            let bad = |e: strata_backend::BlockError| format!("Invalid option '{key}': {e}");
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
                        .map_err(|_| format!("Invalid refcount_bits '{value}'"))?
                }
                "backing_file" => opts.backing_file = Some(value.to_string()),
                "backing_fmt" => opts.backing_format = Some(value.to_string()),
                "size" => size = Some(parse_size(value).map_err(bad)?),
                "preallocation" if value == "off" => {}
                other => {
                    return Err(format!(
                        "Invalid parameter '{other}' (qcow2 takes cluster_size, compat, \
                         lazy_refcounts, compression_type, refcount_bits, extended_l2, \
                         backing_file, backing_fmt, size, preallocation=off)"
                    ))
                }
            }
        }
    }
    Ok(size)
}

/// Opens an image read-only through the block layer, with its backing chain.
fn open_image(
    graph: &Graph,
    file: &str,
    format: Option<&str>,
    no_backing: bool,
) -> Result<Arc<Node>, String> {
    let mut o = Options::new();
    o.set("file.filename", file);
    o.set("read-only", "on");
    if let Some(f) = format {
        o.set("driver", f);
    }
    if no_backing {
        o.set("backing", "null");
    }
    graph.open(o).map_err(|e| e.to_string())
}

fn create_qcow2(args: &ImgCreateArgs, size: Option<u64>) -> Result<(), String> {
    let mut opts = CreateOptions::default();
    let opt_size = qcow2_options(args, &mut opts)?;
    if args.backing.is_some() {
        opts.backing_file = args.backing.clone();
    }
    if args.backing_format.is_some() {
        opts.backing_format = args.backing_format.clone();
    }
    let filename = args.file.to_string_lossy().into_owned();
    let mut size = size.or(opt_size);
    if let Some(backing) = &opts.backing_file {
        if *backing == filename || same_file(&filename, backing) {
            return Err(
                "Error: Trying to create an image with the same filename as the backing file"
                    .into(),
            );
        }
        if !args.unsafe_backing {
            let full = full_backing_filename(&filename, backing).map_err(|e| e.to_string())?;
            let graph = Graph::new();
            let node = open_image(&graph, &full, opts.backing_format.as_deref(), false)
                .map_err(|e| format!("Could not open backing image '{full}': {e}"))?;
            if opts.backing_format.is_none() {
                return Err(format!(
                    "Backing file specified without backing format\nDetected format of {}. \
                     (give it with -F {})",
                    node.driver_name(),
                    node.driver_name()
                ));
            }
            size = size.or(Some(node.size()));
        }
    }
    let size = size.ok_or("Image creation needs a size parameter")?;
    opts.size = size;
    if !args.quiet {
        let mut line = format!(
            "Formatting '{filename}', fmt=qcow2 cluster_size={} extended_l2={} \
             compression_type={}",
            opts.cluster_size,
            if opts.extended_l2 { "on" } else { "off" },
            if opts.compression_type == 0 {
                "zlib"
            } else {
                "zstd"
            }
        );
        line += &format!(" size={}", size.div_ceil(512) * 512);
        if opts.version < 3 {
            line += " compat=0.10";
        }
        if let Some(b) = &opts.backing_file {
            line += &format!(" backing_file={b}");
        }
        if let Some(f) = &opts.backing_format {
            line += &format!(" backing_fmt={f}");
        }
        line += &format!(
            " lazy_refcounts={} refcount_bits={}",
            if opts.lazy_refcounts { "on" } else { "off" },
            opts.refcount_bits
        );
        println!("{line}");
    }
    qcow2::create_file(&args.file, &opts).map_err(|e| e.to_string())
}

/// Whether a backing name resolves to the new file itself.
fn same_file(filename: &str, backing: &str) -> bool {
    let Ok(full) = full_backing_filename(filename, backing) else {
        return false;
    };
    let canon = |p: &str| {
        let p = Path::new(p);
        let parent = p.parent().filter(|d| !d.as_os_str().is_empty());
        let dir = parent.map_or_else(|| Path::new(".").canonicalize(), Path::canonicalize);
        dir.ok().zip(p.file_name()).map(|(d, n)| d.join(n))
    };
    matches!((canon(filename), canon(&full)), (Some(a), Some(b)) if a == b)
}

fn probe_path(path: &str) -> Result<&'static str, String> {
    let mut f = std::fs::File::open(path).map_err(|e| format!("Could not open '{path}': {e}"))?;
    let mut buf = vec![0u8; probe::PROBE_BUF_SIZE];
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Err(format!("Could not read '{path}': {e}")),
        }
    }
    Ok(probe::probe_format(&buf[..n]).unwrap_or("raw"))
}

/// QEMU's `size_to_str`: three significant digits and a binary unit.
fn size_to_str(v: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut i = 0;
    while i + 1 < UNITS.len() && v as f64 >= 1000.0 * (1u64 << (10 * i)) as f64 {
        i += 1;
    }
    let x = v as f64 / (1u64 << (10 * i)) as f64;
    let s = if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    };
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    format!("{s} {}", UNITS[i])
}

/// Everything `img info` shows about one image of a chain.
fn image_info(node: &Node) -> Result<Value, String> {
    let filename = node.filename();
    let disk = std::fs::metadata(&filename)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0);
    let mut v = json!({
        "filename": filename,
        "format": node.driver_name(),
        "virtual-size": node.size(),
        "actual-size": disk,
        "dirty-flag": false,
    });
    if node.driver_name() == "qcow2" {
        let q = qcow2::read_info(Path::new(&filename)).map_err(|e| e.to_string())?;
        v["cluster-size"] = json!(q.cluster_size);
        v["dirty-flag"] = json!(q.dirty);
        let mut data = json!({
            "compat": q.compat,
            "compression-type": q.compression_type,
            "refcount-bits": q.refcount_bits,
        });
        // Version 2 images have no feature bits: qemu-img leaves these out.
        for (key, value) in [
            ("lazy-refcounts", q.lazy_refcounts),
            ("corrupt", q.corrupt),
            ("extended-l2", q.extended_l2),
        ] {
            if let Some(set) = value {
                data[key] = json!(set);
            }
        }
        v["format-specific"] = json!({"type": "qcow2", "data": data});
        if let Some(b) = &q.backing_file {
            v["backing-filename"] = json!(b);
            v["full-backing-filename"] =
                json!(full_backing_filename(&filename, b).unwrap_or_else(|_| b.clone()));
            if let Some(f) = &q.backing_format {
                v["backing-filename-format"] = json!(f);
            }
        }
        if q.snapshots > 0 {
            v["snapshots"] = json!(q.snapshots);
        }
    }
    Ok(v)
}

fn print_info(v: &Value) {
    let get = |k: &str| v.get(k).cloned().unwrap_or(Value::Null);
    println!("image: {}", get("filename").as_str().unwrap_or(""));
    println!("file format: {}", get("format").as_str().unwrap_or(""));
    let vs = get("virtual-size").as_u64().unwrap_or(0);
    println!("virtual size: {} ({vs} bytes)", size_to_str(vs));
    println!(
        "disk size: {}",
        size_to_str(get("actual-size").as_u64().unwrap_or(0))
    );
    if let Some(cs) = get("cluster-size").as_u64() {
        println!("cluster_size: {cs}");
    }
    if let Some(b) = get("backing-filename").as_str() {
        let full = get("full-backing-filename");
        match full.as_str() {
            Some(f) if f != b => println!("backing file: {b} (actual path: {f})"),
            _ => println!("backing file: {b}"),
        }
        if let Some(f) = get("backing-filename-format").as_str() {
            println!("backing file format: {f}");
        }
    }
    if let Some(n) = get("snapshots").as_u64() {
        println!("Snapshot list: {n} internal snapshots");
    }
    if let Some(data) = v.pointer("/format-specific/data") {
        println!("Format specific information:");
        for (key, label) in [
            ("compat", "compat"),
            ("compression-type", "compression type"),
            ("lazy-refcounts", "lazy refcounts"),
            ("refcount-bits", "refcount bits"),
            ("corrupt", "corrupt"),
            ("extended-l2", "extended l2"),
        ] {
            if let Some(x) = data.get(key) {
                let text = match x {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                println!("    {label}: {text}");
            }
        }
    }
    if get("dirty-flag").as_bool() == Some(true) {
        println!("dirty flag: true");
    }
}

fn info(args: &ImgInfoArgs) -> Result<(), String> {
    let file = args.file.to_string_lossy().into_owned();
    let format = match &args.format {
        Some(f) => f.clone(),
        None => probe_path(&file)?.to_string(),
    };
    let graph = Graph::new();
    let no_backing = !args.backing_chain && format == "qcow2";
    let node = open_image(&graph, &file, Some(&format), no_backing)?;
    let mut chain = vec![image_info(&node)?];
    if args.backing_chain {
        let mut cur = node.child(ChildRole::Backing).cloned();
        while let Some(n) = cur {
            chain.push(image_info(&n)?);
            cur = n.child(ChildRole::Backing).cloned();
        }
    }
    match args.output {
        OutputFormat::Json => {
            let v = if args.backing_chain {
                Value::Array(chain)
            } else {
                chain.remove(0)
            };
            println!(
                "{}",
                serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?
            );
        }
        OutputFormat::Human => {
            for (i, v) in chain.iter().enumerate() {
                if i > 0 {
                    println!();
                }
                print_info(v);
            }
        }
    }
    Ok(())
}

fn print_check(file: &str, r: &CheckResult) {
    for m in &r.messages {
        eprintln!("{m}");
    }
    if r.leaks_fixed > 0 || r.corruptions_fixed > 0 {
        println!(
            "The following inconsistencies were found and repaired:\n\n    {} leaked \
             clusters\n    {} corruptions\n\nDouble checking the fixed image now...",
            r.leaks_fixed, r.corruptions_fixed
        );
    }
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        println!("No errors were found on the image.");
    } else {
        if r.corruptions > 0 {
            println!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes \
                 to the image may corrupt it.",
                r.corruptions
            );
        }
        if r.leaks > 0 {
            println!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, \
                 but no harm to data.",
                r.leaks
            );
        }
    }
    let pct = |n: u64| {
        if r.total_clusters == 0 {
            0.0
        } else {
            n as f64 * 100.0 / r.total_clusters as f64
        }
    };
    let pct_of_alloc = |n: u64| {
        if r.allocated_clusters == 0 {
            0.0
        } else {
            n as f64 * 100.0 / r.allocated_clusters as f64
        }
    };
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        println!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
            r.allocated_clusters,
            r.total_clusters,
            pct(r.allocated_clusters),
            pct_of_alloc(r.fragmented_clusters),
            pct_of_alloc(r.compressed_clusters)
        );
    }
    println!("Image end offset: {}", r.image_end_offset);
    let _ = file;
}

fn check(args: &ImgCheckArgs) -> Result<(), String> {
    let file = args.file.to_string_lossy().into_owned();
    let format = match &args.format {
        Some(f) => f.clone(),
        None => probe_path(&file)?.to_string(),
    };
    if format != "qcow2" {
        return Err(format!(
            "This image format ({format}) does not support checks"
        ));
    }
    let repair = match args.repair {
        None => Repair::None,
        Some(RepairMode::Leaks) => Repair::Leaks,
        Some(RepairMode::All) => Repair::All,
    };
    let graph = Graph::new();
    let mut o = Options::new();
    o.set("driver", "file");
    o.set("filename", file.as_str());
    o.set(
        "read-only",
        if repair == Repair::None { "on" } else { "off" },
    );
    let node = graph.open(o).map_err(|e| e.to_string())?;
    let result = block_on(qcow2::check(&node, repair))
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("Check failed: {e}"))?;
    drop(node);
    if !args.quiet {
        match args.output {
            OutputFormat::Json => {
                let v = json!({
                    "filename": file,
                    "format": "qcow2",
                    "check-errors": result.check_errors,
                    "corruptions": result.corruptions,
                    "leaks": result.leaks,
                    "corruptions-fixed": result.corruptions_fixed,
                    "leaks-fixed": result.leaks_fixed,
                    "image-end-offset": result.image_end_offset,
                    "total-clusters": result.total_clusters,
                    "allocated-clusters": result.allocated_clusters,
                    "fragmented-clusters": result.fragmented_clusters,
                    "compressed-clusters": result.compressed_clusters,
                });
                println!(
                    "{}",
                    serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?
                );
            }
            OutputFormat::Human => print_check(&file, &result),
        }
    }
    // qemu-img's exit codes: 2 corruptions, 3 only leaks.
    let code = if result.corruptions > 0 {
        2
    } else if result.leaks > 0 {
        3
    } else {
        0
    };
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_as_qemu_prints_them() {
        assert_eq!(size_to_str(196_624), "192 KiB");
        assert_eq!(size_to_str(1 << 30), "1 GiB");
        assert_eq!(size_to_str(1536 << 20), "1.5 GiB");
        assert_eq!(size_to_str(512), "512 B");
        assert_eq!(size_to_str(0), "0 B");
    }
}
