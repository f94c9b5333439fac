//! The real `strata` binary as a child process, for tests that need a daemon they can watch
//! from outside (its CPU time, memory, descriptors) or a process boundary to the frontend.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The `strata` binary of this build, built (or brought up to date) once per test run.
pub fn strata_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // This test runs from <target>/<profile>/deps.
        let exe = std::env::current_exe().expect("test executable");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>");
        let target = profile_dir.parent().expect("target dir");
        let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        build.args([
            "build",
            "--quiet",
            "-p",
            "strata",
            "--bin",
            "strata",
            "--target-dir",
        ]);
        build.arg(target);
        if profile_dir.ends_with("release") {
            build.arg("--release");
        }
        let mut child = build.spawn().expect("run cargo build");
        let deadline = Instant::now() + Duration::from_secs(900);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for cargo build") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("cargo build of the strata binary did not finish in 15 minutes");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(status.success(), "cargo build of the strata binary failed");
        profile_dir.join("strata")
    })
}

/// A running `strata` daemon, its sockets in a temporary directory and its log in a file.
pub struct Daemon {
    child: Child,
    pub dir: tempfile::TempDir,
    log: PathBuf,
}

impl Daemon {
    /// Starts the daemon with one export per `(id, extra export options)`, on socket `<id>`,
    /// each of its own null-co node (1 GiB, reads return zeroes).
    pub fn start(exports: &[(&str, &str)]) -> Daemon {
        Self::start_with_nodes("", exports)
    }

    /// As [`Daemon::start`], with `node_extra` added to each null-co node's options.
    pub fn start_with_nodes(node_extra: &str, exports: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut args = Vec::new();
        for (id, extra) in exports {
            args.push("--blockdev".to_string());
            args.push(format!(
                "driver=null-co,node-name=n-{id},read-zeroes=on{node_extra}"
            ));
            args.push("--export".to_string());
            args.push(format!(
                "type=vhost-user-blk,id={id},node-name=n-{id},writable=on,addr.type=unix,\
                 addr.path={}{extra}",
                dir.path().join(id).display()
            ));
        }
        Self::start_in(dir, &args, exports.len())
    }

    /// Starts the daemon with `args` in `dir` (where its sockets should be) and waits until
    /// its `exports` exports serve.
    pub fn start_in(dir: tempfile::TempDir, args: &[String], exports: usize) -> Daemon {
        Self::start_in_with_env(dir, args, exports, &[])
    }

    /// As [`Daemon::start_in`], with `env` added to the daemon's environment.
    pub fn start_in_with_env(
        dir: tempfile::TempDir,
        args: &[String],
        exports: usize,
        env: &[(&str, &str)],
    ) -> Daemon {
        let log = dir.path().join("strata.log");
        let child = Command::new(strata_bin())
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("log file"))
            .spawn()
            .expect("run strata");
        let mut d = Daemon { child, dir, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while d.log_text().matches("serving node").count() < exports {
            assert!(
                d.alive() && Instant::now() < deadline,
                "strata did not start:\n{}",
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        d
    }

    pub fn socket(&self, id: &str) -> PathBuf {
        self.dir.path().join(id)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU time (user + system) the daemon used so far, in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))
            .expect("/proc/<pid>/stat");
        // Fields after the command name (which ends at the last ')'): state is field 3, utime
        // and stime fields 14 and 15.
        let rest = &stat[stat.rfind(')').expect("comm") + 2..];
        let fields: Vec<&str> = rest.split(' ').collect();
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
    }

    /// Resident memory (VmRSS) in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("/proc/<pid>/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    /// Open file descriptors.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("/proc/<pid>/fd")
            .count()
    }

    /// Threads.
    pub fn thread_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.pid()))
            .expect("/proc/<pid>/task")
            .count()
    }

    /// Sends SIGTERM and waits up to `limit` for a clean exit.
    pub fn terminate_within(mut self, limit: Duration) {
        // SAFETY: kill has no memory-safety preconditions; the pid is our own child's.
        let r = unsafe { libc::kill(self.pid() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(r, 0, "kill");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                assert!(status.success(), "strata exited with {status}");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "strata ignored SIGTERM for {limit:?}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
