//! CPU time accounting from /proc: utime + stime of a whole process (all its threads,
//! including exited ones), and the CPU affinity of a process.

use std::fs;

use crate::error::Result;

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Parses utime + stime (fields 14 and 15) out of a /proc/PID/stat line, in clock ticks.
fn parse_stat(stat: &str) -> Option<u64> {
    // The command name (field 2) may contain spaces and parentheses: fields after it start
    // after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts with field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn stat_seconds(path: &str) -> Result<f64> {
    let s = fs::read_to_string(path).map_err(|e| format!("read {path}: {e}"))?;
    let ticks = parse_stat(&s).ok_or_else(|| format!("cannot parse {path}: {s:?}"))?;
    Ok(ticks as f64 / clock_ticks())
}

/// utime + stime of process `pid`, in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    if !std::path::Path::new(&path).exists() {
        return Err(format!(
            "process {pid} (daemon or OSD) is gone: it exited during the run"
        ));
    }
    stat_seconds(&path)
}

/// utime + stime of this process, in seconds.
pub fn self_cpu_seconds() -> Result<f64> {
    stat_seconds("/proc/self/stat")
}

/// CPU seconds of the whole machine (all CPUs) from the aggregate line of /proc/stat.
#[derive(Clone, Copy)]
pub struct MachineCpu {
    /// Busy: everything but idle, iowait and steal.
    pub busy: f64,
    /// Steal: time this VM's CPUs were runnable but the hypervisor ran something else.
    pub steal: f64,
}

/// The machine's busy and steal seconds so far.
pub fn machine_cpu_seconds() -> Result<MachineCpu> {
    let s = fs::read_to_string("/proc/stat").map_err(|e| format!("read /proc/stat: {e}"))?;
    let line = s
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or("no aggregate cpu line in /proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal [guest guest_nice] (guest is in user).
    let field = |i: usize| v.get(i).copied().unwrap_or(0);
    let busy: u64 = v.iter().take(8).sum::<u64>() - field(3) - field(4) - field(7);
    Ok(MachineCpu {
        busy: busy as f64 / clock_ticks(),
        steal: field(7) as f64 / clock_ticks(),
    })
}

/// `Cpus_allowed_list` of a process ("self" or a pid), e.g. "0" or "0-1".
pub fn cpus_allowed(pid: &str) -> String {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| "?".to_string())
}

/// The command name of a process, for the report.
pub fn comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_comm() {
        let line = "1234 (a) b (c) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0 1 2 3";
        assert_eq!(parse_stat(line), Some(325));
    }

    #[test]
    fn self_cpu_is_readable() {
        assert!(self_cpu_seconds().unwrap() >= 0.0);
        assert!(cpus_allowed("self") != "?");
        let m = machine_cpu_seconds().unwrap();
        assert!(m.busy > 0.0 && m.steal >= 0.0);
    }
}
