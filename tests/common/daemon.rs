//! The strata binary as a child process, its stderr lines collected through a channel.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

/// A running strata, killed if still running when dropped; its stderr lines on a channel.
pub struct Daemon {
    child: Child,
    lines: Receiver<String>,
    /// The log lines received so far, each ending in a newline.
    pub log: String,
    /// How long it gets to start, log a line, or exit after SIGTERM.
    timeout: Duration,
    /// Text its log must never hold, checked when it has exited.
    forbidden: Option<&'static str>,
}

impl Daemon {
    /// Runs strata with `args`, stdin from /dev/null; `timeout` bounds each wait.
    pub fn spawn<S: AsRef<OsStr>>(args: &[S], timeout: Duration) -> Daemon {
        Daemon::spawn_with_stdin(args, Stdio::null(), timeout)
    }

    /// Runs strata with `args` and `stdin` (an inherited socket, say); `timeout` bounds each
    /// wait.
    pub fn spawn_with_stdin<S: AsRef<OsStr>>(
        args: &[S],
        stdin: Stdio,
        timeout: Duration,
    ) -> Daemon {
        let mut child = Command::new(env!("CARGO_BIN_EXE_strata"))
            .args(args)
            .stdin(stdin)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run strata");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Daemon {
            child,
            lines,
            log: String::new(),
            timeout,
            forbidden: None,
        }
    }

    /// The same daemon, whose exit fails the test if its log holds `text`.
    pub fn forbidding(mut self, text: &'static str) -> Daemon {
        self.forbidden = Some(text);
        self
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until a socket listens at every path in `sockets`; fails if the daemon exits
    /// first or the timeout passes.
    #[track_caller]
    pub fn wait_for_sockets(&mut self, sockets: &[&Path]) {
        let deadline = Instant::now() + self.timeout;
        while !sockets.iter().all(|s| listening(s)) {
            self.drain();
            assert!(
                Instant::now() < deadline && self.child.try_wait().expect("wait").is_none(),
                "strata did not start:\n{}",
                self.log
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Moves the lines logged so far into `log`, without waiting.
    pub fn drain(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.push(line);
        }
    }

    fn push(&mut self, line: String) {
        self.log.push_str(&line);
        self.log.push('\n');
    }

    /// Waits for a log line containing `needle` and returns it.
    #[track_caller]
    pub fn wait_for(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + self.timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!("no '{needle}' in the log:\n{}", self.log),
            }
        }
    }

    /// Waits up to `limit` for the daemon to exit by itself: its status, or None if it still
    /// runs. Once it has exited, `log` holds every line it wrote.
    pub fn exit_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        let status = loop {
            match self.child.try_wait().expect("wait for strata") {
                Some(status) => break status,
                None if Instant::now() > deadline => return None,
                None => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        // The stderr thread ends at EOF: take every line it read.
        while let Ok(line) = self.lines.recv_timeout(self.timeout) {
            self.push(line);
        }
        if let Some(text) = self.forbidden {
            assert!(
                !self.log.contains(text),
                "the log holds '{text}':\n{}",
                self.log
            );
        }
        Some(status)
    }

    /// Waits up to `limit` for the daemon to exit by itself, which it must; returns whether it
    /// succeeded, its log, and how long it took to exit.
    #[track_caller]
    pub fn wait_exit(mut self, limit: Duration) -> (bool, String, Duration) {
        let start = Instant::now();
        let Some(status) = self.exit_within(limit) else {
            panic!("still running after {limit:?}:\n{}", self.log);
        };
        let took = start.elapsed();
        (status.success(), std::mem::take(&mut self.log), took)
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        let pid = libc::pid_t::try_from(self.pid()).expect("pid");
        // SAFETY: kill references no memory; `pid` is our own child's, not yet reaped.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "kill {pid}");
    }

    /// SIGTERM, then the exit status (which must come within the timeout) and the whole log.
    #[track_caller]
    pub fn terminate(self) -> (bool, String) {
        self.sigterm();
        let limit = self.timeout;
        let (ok, log, _) = self.wait_exit(limit);
        (ok, log)
    }

    /// The `/proc` status text of every thread (threads that end meanwhile are left out).
    pub fn thread_statuses(&self) -> Vec<String> {
        let tasks = format!("/proc/{}/task", self.pid());
        std::fs::read_dir(tasks)
            .expect("list threads")
            .map_while(Result::ok)
            .filter_map(|task| std::fs::read_to_string(task.path().join("status")).ok())
            .collect()
    }

    /// Seccomp mode (0 none, 2 filter) and name of every thread.
    pub fn thread_modes(&self) -> Vec<(String, u32)> {
        self.thread_statuses()
            .iter()
            .map(|status| {
                let mode = status_field(status, "Seccomp:")
                    .parse()
                    .expect("Seccomp: field");
                (status_field(status, "Name:").to_string(), mode)
            })
            .collect()
    }
}

/// The value of field `key` (with its colon) in a `/proc` status text; empty if absent.
pub fn status_field<'a>(status: &'a str, key: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map_or("", str::trim)
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a Unix socket bound to `path` listens (flags 00010000 in /proc/net/unix): the
/// file exists from bind() on, but a connect before listen() is refused.
fn listening(path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let path = path.to_string_lossy();
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() == 8 && fields[3] == "00010000" && fields[7] == path
    })
}
