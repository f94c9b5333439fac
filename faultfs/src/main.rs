//! `strata-faultfs BACKING_DIR MOUNTPOINT`: serves BACKING_DIR's files at MOUNTPOINT until
//! unmounted (`umount MOUNTPOINT`) or stopped (SIGINT, SIGTERM). Control it by writing
//! commands to MOUNTPOINT/.faultfs-ctl (see the library's `control` module), e.g.
//! `echo 'fail fsync EIO once' > MOUNTPOINT/.faultfs-ctl`; reading that file shows counters.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [backing, mountpoint] = args.as_slice() else {
        eprintln!("usage: strata-faultfs BACKING_DIR MOUNTPOINT");
        return ExitCode::from(2);
    };
    match strata_faultfs::serve(backing, mountpoint) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("strata-faultfs: {}: {e}", mountpoint.display());
            ExitCode::FAILURE
        }
    }
}
