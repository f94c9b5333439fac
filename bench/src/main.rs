//! strata-bench: a libblkio client that measures strata, qemu-storage-daemon (both through
//! `virtio-blk-vhost-user`) and io_uring directly on the image file (the limit) with the same
//! process, buffers and request stream. `scripts/bench.sh` starts the daemons, alternates the
//! targets over rounds and calls `strata-bench report` for the medians and ratios.
//!
//! Subcommands:
//! - `run`: one or more workloads against one target; appends one JSON line per workload.
//! - `verify`: writes a pattern and reads it back (and, optionally, directly from the file);
//!   with `--source`, compares reads with a raw source file (the qcow2 image's content).
//! - `fill`: writes the source pattern to a new raw file (the qcow2 image is converted from it).
//! - `report`: medians over rounds, the tracked ratios, a table and a JSON summary.

mod data_pattern;
mod device;
mod error;
mod procstat;
mod rate_report;
mod ratios;
mod report;
mod rng;
mod run;
mod verify;
mod workload;

use std::fs::OpenOptions;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;

use device::Driver;
use workload::Workload;

#[derive(Parser)]
#[command(name = "strata-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum DriverArg {
    /// libblkio `virtio-blk-vhost-user`; PATH is the daemon's socket.
    VhostUser,
    /// libblkio `io_uring` with direct=true; PATH is the image file.
    IoUring,
}

#[derive(clap::Args)]
struct TargetArgs {
    /// Target label: strata, qsd, io_uring (any label works; it names the row).
    #[arg(long)]
    target: String,
    /// Socket (vhost-user) or file (io_uring).
    #[arg(long)]
    path: String,
    /// libblkio driver; default: io-uring when the target is "io_uring", else vhost-user.
    #[arg(long, value_enum)]
    driver: Option<DriverArg>,
    /// Backend label: file, null, qcow2, ram, qcow2-ram, qcow2-alloc or rbd.
    #[arg(long, default_value = "file")]
    backend: String,
}

impl TargetArgs {
    fn driver(&self) -> Driver {
        match self.driver {
            Some(DriverArg::VhostUser) => Driver::VhostUser,
            Some(DriverArg::IoUring) => Driver::IoUring,
            None if self.target == "io_uring" => Driver::IoUring,
            None => Driver::VhostUser,
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Run workloads against one target and append one JSON line per workload to --out.
    Run {
        #[command(flatten)]
        t: TargetArgs,
        /// Workloads, comma-separated or repeated: PATTERN-BS-qdN[-Mq][-rIOPS][-poll], e.g.
        /// randread-4k-qd32, write-128k-qd8, randread-4k-qd32-2q, randread-4k-qd1-r10k (a
        /// fixed rate of 10000 requests per second, at most QD in flight),
        /// randread-4k-qd1-poll (the client polls for completions instead of sleeping).
        #[arg(long, value_delimiter = ',', required = true)]
        workload: Vec<String>,
        /// Measured seconds per workload.
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
        /// Unmeasured warm-up seconds before the window.
        #[arg(long, default_value_t = 1.0)]
        ramp: f64,
        /// Seed of the request stream (same seed = same offsets on every target).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// The daemon's pid: its utime+stime over the window gives CPU seconds per I/O.
        #[arg(long)]
        daemon_pid: Option<u32>,
        /// The Ceph OSD's pid (rbd backend): its CPU seconds per I/O over the window too.
        #[arg(long)]
        osd_pid: Option<u32>,
        /// Round number, recorded in the JSON line.
        #[arg(long, default_value_t = 1)]
        round: u32,
        /// Limit offsets to the first BYTES of the target (default: whole capacity).
        #[arg(long)]
        span: Option<u64>,
        /// JSON-lines file to append results to.
        #[arg(long)]
        out: Option<String>,
        /// Writes carry the source pattern of their offset (what `fill` writes) instead of
        /// random data: they leave an image made from `fill`'s output unchanged (qcow2).
        #[arg(long)]
        write_source: bool,
    },
    /// Write a pattern through the target, read it back and compare.
    Verify {
        #[command(flatten)]
        t: TargetArgs,
        /// Fail unless the target's capacity is exactly this many bytes.
        #[arg(long)]
        expect_size: Option<u64>,
        /// Only check that requests complete (for null-co, which stores nothing).
        #[arg(long)]
        no_data: bool,
        /// Also read the pattern back directly from this file with io_uring (O_DIRECT).
        #[arg(long, conflicts_with = "source")]
        check_file: Option<String>,
        /// The target serves this raw file's content (written by `fill`; the qcow2 image is
        /// converted from it): reads through the target must equal it. Then a pattern is
        /// written and read back, and the source data restored (unless --read-only).
        #[arg(long, conflicts_with = "no_data")]
        source: Option<String>,
        /// With --source: only compare reads, write nothing.
        #[arg(long, requires = "source")]
        read_only: bool,
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
    /// Write the source pattern (every 8 bytes: their own offset XOR a constant) to a new file.
    Fill {
        /// The file to create (must not exist).
        #[arg(long)]
        path: String,
        /// Size in bytes (a multiple of 512).
        #[arg(long)]
        size: u64,
    },
    /// Medians over rounds, ratios, table and JSON from a results file.
    Report {
        /// JSON-lines results written by `run`.
        #[arg(long)]
        results: String,
        /// Summary JSON output.
        #[arg(long)]
        json: Option<String>,
        /// Markdown table output (also printed to stdout).
        #[arg(long)]
        markdown: Option<String>,
        /// TARGET=REASON for a target that was not run (shown in its rows).
        #[arg(long)]
        missing: Vec<String>,
        /// BACKEND=T1,T2,... targets expected for a backend (absent ones show as missing).
        #[arg(long)]
        expect: Vec<String>,
    },
}

fn pinning_note(daemon_pid: Option<u32>) -> String {
    let client = procstat::cpus_allowed("self");
    // SAFETY: sysconf has no memory-safety preconditions.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    match daemon_pid {
        Some(pid) => {
            let daemon = procstat::cpus_allowed(&pid.to_string());
            let pinned = daemon != client && !daemon.contains('-') && !client.contains('-');
            format!(
                "daemon CPUs {daemon}, client CPUs {client}{} ({online} CPUs online)",
                if pinned {
                    " (pinned apart with taskset)"
                } else {
                    ""
                }
            )
        }
        None => format!("no daemon, client CPUs {client} ({online} CPUs online)"),
    }
}

fn secs(s: f64, what: &str) -> Result<Duration, String> {
    if s.is_finite() && s >= 0.0 {
        Ok(Duration::from_secs_f64(s))
    } else {
        Err(format!("bad {what}: {s}"))
    }
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.cmd {
        Cmd::Run {
            t,
            workload,
            duration,
            ramp,
            seed,
            daemon_pid,
            osd_pid,
            round,
            span,
            out,
            write_source,
        } => {
            let workloads: Vec<Workload> = workload
                .iter()
                .map(|w| Workload::parse(w.trim()))
                .collect::<Result<_, _>>()?;
            let duration = secs(duration, "--duration")?;
            if duration.is_zero() {
                return Err("--duration must be > 0".into());
            }
            let ramp = secs(ramp, "--ramp")?;
            let pinning = pinning_note(daemon_pid);
            let daemon_comm = daemon_pid.map(procstat::comm);
            for w in workloads {
                let r = run::run_workload(&run::RunSpec {
                    driver: t.driver(),
                    path: &t.path,
                    workload: w,
                    ramp,
                    duration,
                    seed,
                    daemon_pid,
                    osd_pid,
                    span,
                    write_source,
                })
                .map_err(|e| format!("{} {} {w}: {e}", t.target, t.backend))?;
                let iops = r.ios as f64 / r.seconds;
                let mib_s = r.bytes as f64 / r.seconds / (1024.0 * 1024.0);
                let dcpu_io = r.daemon_cpu_s.map(|c| c / r.ios as f64);
                let line = json!({
                    "target": t.target,
                    "backend": t.backend,
                    "workload": w.to_string(),
                    "round": round,
                    "iops": iops,
                    "mib_s": mib_s,
                    "p50_us": r.p50_us,
                    "p99_us": r.p99_us,
                    "p999_us": r.p999_us,
                    "mean_us": r.mean_us,
                    "ios": r.ios,
                    "seconds": r.seconds,
                    "ramp_seconds": ramp.as_secs_f64(),
                    "seed": seed,
                    "capacity": r.capacity,
                    "daemon_pid": daemon_pid,
                    "daemon_comm": daemon_comm,
                    "daemon_cpu_s": r.daemon_cpu_s,
                    "daemon_cpu_s_per_io": dcpu_io,
                    "daemon_cpu_per_s": r.daemon_cpu_s.map(|c| c / r.seconds),
                    "rate": w.rate,
                    "osd_pid": osd_pid,
                    "osd_cpu_s": r.osd_cpu_s,
                    "osd_cpu_s_per_io": r.osd_cpu_s.map(|c| c / r.ios as f64),
                    "client_cpu_s": r.client_cpu_s,
                    "client_cpu_s_per_io": r.client_cpu_s / r.ios as f64,
                    "other_cpu_s": r.other_cpu_s,
                    "other_cpu_fraction": r.other_cpu_s / r.seconds,
                    "steal_s": r.steal_s,
                    "steal_fraction": r.steal_s / r.seconds,
                    "pinning": pinning,
                });
                println!(
                    "{:<8} {:<5} {:<20} {:>9.0} IOPS {:>8.1} MiB/s  p50 {:>7.1} p99 {:>7.1} p99.9 {:>7.1} µs  daemon {} µs/IO  client {:.2} µs/IO{}  steal {:.0}%",
                    t.target,
                    t.backend,
                    w.to_string(),
                    iops,
                    mib_s,
                    r.p50_us,
                    r.p99_us,
                    r.p999_us,
                    dcpu_io.map_or("-".to_string(), |c| format!("{:.2}", c * 1e6)),
                    r.client_cpu_s / r.ios as f64 * 1e6,
                    r.osd_cpu_s.map_or(String::new(), |c| format!(
                        "  OSD {:.2} µs/IO",
                        c / r.ios as f64 * 1e6
                    )),
                    r.steal_s / r.seconds * 100.0,
                );
                if let Some(path) = &out {
                    let mut f = OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)
                        .map_err(|e| format!("open {path}: {e}"))?;
                    writeln!(f, "{line}").map_err(|e| format!("write {path}: {e}"))?;
                }
            }
            Ok(())
        }
        Cmd::Verify {
            t,
            expect_size,
            no_data,
            check_file,
            source,
            read_only,
            seed,
        } => {
            let r = match &source {
                Some(src) => {
                    verify::verify_source(t.driver(), &t.path, src, seed, expect_size, !read_only)
                }
                None => verify::verify(
                    t.driver(),
                    &t.path,
                    seed,
                    expect_size,
                    !no_data,
                    check_file.as_deref(),
                ),
            }
            .map_err(|e| format!("verify {} {}: {e}", t.target, t.backend))?;
            let data = match &source {
                Some(src) if r.write_checked => {
                    format!("reads equal {src}; written, read back and restored")
                }
                Some(src) => format!("reads equal {src} (read-only)"),
                None if r.data_checked => "compared".to_string(),
                None => "not compared (null driver)".to_string(),
            };
            println!(
                "verify {} {}: ok: {} requests, {} KiB, capacity {} bytes, data {data}{}",
                t.target,
                t.backend,
                r.requests,
                r.bytes / 1024,
                r.capacity,
                if r.cross_checked {
                    ", cross-checked on the file"
                } else {
                    ""
                }
            );
            Ok(())
        }
        Cmd::Fill { path, size } => {
            let t0 = std::time::Instant::now();
            data_pattern::fill_file(&path, size)?;
            println!(
                "fill: wrote {size} bytes of the source pattern to {path} in {:.1} s",
                t0.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Cmd::Report {
            results,
            json,
            markdown,
            missing,
            expect,
        } => {
            let split = |s: &String, what: &str| -> Result<(String, String), String> {
                s.split_once('=')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| format!("{what} wants NAME=VALUE, got {s:?}"))
            };
            let missing = missing
                .iter()
                .map(|s| split(s, "--missing"))
                .collect::<Result<Vec<_>, _>>()?;
            let expect = expect
                .iter()
                .map(|s| {
                    split(s, "--expect").map(|(b, ts)| {
                        (
                            b,
                            ts.split(',')
                                .filter(|x| !x.is_empty())
                                .map(str::to_string)
                                .collect(),
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            report::report(&report::Options {
                results: &results,
                json_out: json.as_deref(),
                markdown_out: markdown.as_deref(),
                missing,
                expect,
            })
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("strata-bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}
