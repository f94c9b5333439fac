//! `strata img`: image creation (raw, qcow2), information and consistency checks, with
//! qemu-img's syntax, messages and exit codes.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value};
use strata_backend::driver::qcow2::{self, CheckResult, Repair};
use strata_backend::driver::{BackingPolicy, CreateRequest, CreateTarget};
use strata_backend::filename::full_backing_filename;
use strata_backend::options::parse_size;
use strata_backend::{block_on, probe, registry, ChildRole, Graph, Node, Options};

use crate::cli::{ImgCheckArgs, ImgCommand, ImgCreateArgs, ImgInfoArgs, OutputFormat, RepairMode};

/// The graph the image tools open images in: like qemu-img, they follow the backing file names
/// of the images the user names (the daemon limits them; see `BackingPolicy`).
fn tool_graph() -> Graph {
    Graph::with_backing_policy(BackingPolicy {
        trust_images: true,
        ..BackingPolicy::default()
    })
}

/// Runs an `img` subcommand.
pub fn run(cmd: ImgCommand) -> Result<(), String> {
    match cmd {
        ImgCommand::Create(args) => create(&args),
        ImgCommand::Info(args) => info(&args),
        ImgCommand::Check(args) => check(&args),
    }
}

/// qemu-img create: the format's create hook (through the registry) makes the image from the
/// `-o` options, `-b`/`-F` and the size; the backing image is checked first unless `-u`.
fn create(args: &ImgCreateArgs) -> Result<(), String> {
    let mut options = Options::new();
    for text in &args.options {
        let parsed = Options::parse(text, None).map_err(|e| e.to_string())?;
        for (key, value) in parsed.iter() {
            options.set(key, value);
        }
    }
    let mut size = args
        .size
        .as_deref()
        .or(options.get("size"))
        .map(|s| parse_size(s).map_err(|e| format!("Invalid image size specified: {e}")))
        .transpose()?;
    options.take("size");
    match options.take("preallocation").as_deref() {
        None | Some("off") => {}
        Some(other) => {
            return Err(format!(
            "Invalid parameter 'preallocation={other}' (strata creates preallocation=off images)"
        ))
        }
    }
    if let Some(b) = &args.backing {
        options.set("backing_file", b.as_str());
    }
    if let Some(f) = &args.backing_format {
        options.set("backing_fmt", f.as_str());
    }
    let filename = args.file.to_string_lossy().into_owned();
    if let Some(backing) = options.get("backing_file").map(str::to_string) {
        if backing == filename || same_file(&filename, &backing) {
            return Err(
                "Error: Trying to create an image with the same filename as the backing file"
                    .into(),
            );
        }
        if !args.unsafe_backing {
            let full = full_backing_filename(&filename, &backing).map_err(|e| e.to_string())?;
            let graph = tool_graph();
            let node = open_image(&graph, &full, options.get("backing_fmt"), false)
                .map_err(|e| format!("Could not open backing image '{full}': {e}"))?;
            if !options.contains("backing_fmt") {
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
    let request = CreateRequest {
        target: CreateTarget::File(&args.file),
        size,
        options,
    };
    let effective = registry::create(&args.format, request).map_err(|e| e.to_string())?;
    if !args.quiet {
        let list: Vec<String> = effective.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "Formatting '{filename}', fmt={} {}",
            args.format,
            list.join(" ")
        );
    }
    Ok(())
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
    let graph = tool_graph();
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
    let graph = tool_graph();
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
