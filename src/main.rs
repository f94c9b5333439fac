//! strata: a vhost-user-blk storage daemon with qemu-storage-daemon's command line.

mod cli;
mod daemon;
mod export_options;
mod exports;
mod img;
mod iothreads;
mod jobs;
mod pidfile;
mod qmp;
mod serve;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let cli = cli::Cli::parse();
    let result = match cli.command {
        Some(cli::Command::Img(cmd)) => img::run(cmd),
        Some(cli::Command::Serve(args)) => serve::serve_image(args),
        None => serve::serve_qsd(cli.daemon),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("strata: {e}");
            ExitCode::FAILURE
        }
    }
}
