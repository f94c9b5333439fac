//! `strata img`: image creation.

use std::fs::OpenOptions;

use strata_backend::options::parse_size;

use crate::cli::{ImgCommand, ImgCreateArgs};

/// Runs an `img` subcommand.
pub fn run(cmd: ImgCommand) -> Result<(), String> {
    match cmd {
        ImgCommand::Create(args) => create(&args),
    }
}

fn create(args: &ImgCreateArgs) -> Result<(), String> {
    let size = parse_size(&args.size).map_err(|e| format!("Invalid image size specified: {e}"))?;
    match args.format.as_str() {
        "raw" => create_raw(args, size),
        other => Err(format!("Unknown file format '{other}' (strata img create supports: raw)")),
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

fn create_raw(args: &ImgCreateArgs, size: u64) -> Result<(), String> {
    println!("Formatting '{}', fmt=raw size={size}", args.file.display());
    create_raw_file(&args.file, size)
}
