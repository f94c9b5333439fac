//! The ratios the project tracks, from the medians of the results table: strata against
//! direct io_uring and against QSD, each with its goal, as a markdown table and JSON rows.

use std::fmt::Write as _;

use serde_json::{json, Value};

use crate::rate_report::Median;

/// The rbd workloads whose strata / QSD ratios the report gives (when rbd rows exist).
const RBD_WORKLOADS: &[&str] = &[
    "randread-4k-qd1",
    "randread-4k-qd32",
    "randwrite-4k-qd1",
    "randwrite-4k-qd32",
];
const RR1: &str = "randread-4k-qd1";
const RR1_POLL: &str = "randread-4k-qd1-poll";
const RR32: &str = "randread-4k-qd32";
const RR32_2Q: &str = "randread-4k-qd32-2q";
const RW32: &str = "randwrite-4k-qd32";
const MEDIAN_IOPS: &str = "median IOPS";
const MEDIAN_DAEMON_CPU: &str = "median daemon (utime+stime)/I/O";

/// A goal: the comparison (">=" or "<=") and its bound.
type Goal = (&'static str, f64);

/// A cell of the results table: (backend, workload, target).
type Cell<'a> = (&'a str, &'a str, &'a str);

/// One tracked ratio and what it was computed from.
struct Ratio {
    name: String,
    value: Option<f64>,
    goal: Option<Goal>,
    inputs: String,
}

impl Ratio {
    /// Whether the value meets the goal; `None` without a value or a goal.
    fn met(&self) -> Option<bool> {
        match (self.value, self.goal) {
            (Some(v), Some((">=", g))) => Some(v >= g),
            (Some(v), Some((_, g))) => Some(v <= g),
            _ => None,
        }
    }
}

/// The ratio table (markdown) and its rows (JSON) from the medians `get`; the rbd ratios
/// only when `rbd` (some rbd run exists).
pub fn table(get: &Median, rbd: bool) -> (String, Vec<Value>) {
    let mut md = String::new();
    let _ = writeln!(md, "| ratio | value | goal | met | inputs |");
    let _ = writeln!(md, "|---|---:|---|---|---|");
    let mut rows = Vec::new();
    for r in tracked(get, rbd) {
        let met = r.met();
        let value = r
            .value
            .map_or_else(|| "n/a (inputs missing)".to_string(), |v| format!("{v:.3}"));
        let goal = r.goal.map(|(op, g)| format!("{op} {g:?}"));
        let met_s = match met {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "-",
        };
        let _ = writeln!(
            md,
            "| {} | {value} | {} | {met_s} | {} |",
            r.name,
            goal.as_deref().unwrap_or("-"),
            r.inputs
        );
        rows.push(json!({
            "name": r.name,
            "value": r.value,
            "goal": goal,
            "met": met,
            "inputs": r.inputs,
        }));
    }
    (md, rows)
}

/// The tracked ratios in report order.
fn tracked(get: &Median, rbd: bool) -> Vec<Ratio> {
    let quotient = |metric: &str, (b1, w1, t1): Cell, (b2, w2, t2): Cell| {
        div(get(b1, w1, t1, metric), get(b2, w2, t2, metric))
    };
    let iops = |name: String, num: Cell, den: Cell, goal: Option<Goal>| Ratio {
        name,
        value: quotient("iops", num, den),
        goal,
        inputs: MEDIAN_IOPS.into(),
    };
    let iops_vs_direct = |b: &str, w: &str| {
        iops(
            format!("{b} {w} IOPS, strata / io_uring direct"),
            (b, w, "strata"),
            (b, w, "io_uring"),
            Some((">=", 0.97)),
        )
    };
    let iops_vs_qsd = |b: &str, w: &str, min: f64| {
        iops(
            format!("{b} {w} IOPS, strata / QSD"),
            (b, w, "strata"),
            (b, w, "qsd"),
            Some((">=", min)),
        )
    };
    let cpu_vs_qsd = |b: &str, w: &str, max: f64, inputs: &str| Ratio {
        name: format!("{b} {w} daemon CPU s per I/O, strata / QSD"),
        value: quotient("daemon_cpu_s_per_io", (b, w, "strata"), (b, w, "qsd")),
        goal: Some(("<=", max)),
        inputs: inputs.into(),
    };
    // The latency (`metric`: p50 or mean) a target adds at QD1 (workload `w`) over direct
    // io_uring on the same backend (µs).
    let added = |metric: &str, b: &str, w: &str, t: &str| match (
        get(b, w, t, metric),
        get(b, w, "io_uring", metric),
    ) {
        (Some(a), Some(d)) => Some(a - d),
        _ => None,
    };
    let added_p50 = |b: &str, w: &str, t: &str| added("p50_us", b, w, t);
    // The mean beside the p50: a sleeping direct client's latencies gather in several modes
    // (docs/performance.md), so its p50 jumps between them while its mean does not.
    let added_mean = |b: &str, w: &str| {
        format!(
            "; added mean µs: strata {}, qsd {} (direct mean {})",
            fmt_opt(added("mean_us", b, w, "strata")),
            fmt_opt(added("mean_us", b, w, "qsd")),
            fmt_opt(get(b, w, "io_uring", "mean_us"))
        )
    };
    // The QD1 workload a backend's latency ratios use, and what its label says: the polling
    // client's when strata and direct both ran it (neither latency then holds the client's
    // wake-up, which differs between them), else the sleeping client's.
    let qd1 = |b: &str| {
        let polled = get(b, RR1_POLL, "strata", "p50_us").is_some()
            && get(b, RR1_POLL, "io_uring", "p50_us").is_some();
        if polled {
            (RR1_POLL, " (polling client)")
        } else {
            (RR1, "")
        }
    };
    // How busy strata's client kept its CPU (%): when it is near 100 on both numbers of
    // queues, the 2-queue ratio measures the client, not the daemon.
    let client_busy = |w: &str| {
        let iops = get("null", w, "strata", "iops")?;
        let cpu = get("null", w, "strata", "client_cpu_s_per_io")?;
        Some(iops * cpu * 100.0)
    };

    let mut ratios = Vec::new();
    for w in [RR32, RW32] {
        let qsd = quotient("iops", ("ram", w, "qsd"), ("ram", w, "io_uring"));
        ratios.push(Ratio {
            inputs: format!("{MEDIAN_IOPS}; QSD / direct: {}", fmt_opt(qsd)),
            ..iops_vs_direct("ram", w)
        });
    }
    let (w, client) = qd1("ram");
    ratios.push(Ratio {
        name: format!("ram {w} p50 added over direct, strata (µs){client}"),
        value: added_p50("ram", w, "strata"),
        goal: Some(("<=", 5.0)),
        inputs: format!(
            "added p50 µs: strata {}, qsd {} (direct p50 {}){}",
            fmt_opt(added_p50("ram", w, "strata")),
            fmt_opt(added_p50("ram", w, "qsd")),
            fmt_opt(get("ram", w, "io_uring", "p50_us")),
            added_mean("ram", w)
        ),
    });
    ratios.push(iops_vs_direct("file", RR32));
    let (w, client) = qd1("file");
    ratios.push(Ratio {
        name: format!("file {w} p50 added over direct, strata / QSD{client}"),
        value: div(added_p50("file", w, "strata"), added_p50("file", w, "qsd")),
        goal: Some(("<=", 0.5)),
        inputs: format!(
            "added p50 µs: strata {}, qsd {} (direct p50 {}){}",
            fmt_opt(added_p50("file", w, "strata")),
            fmt_opt(added_p50("file", w, "qsd")),
            fmt_opt(get("file", w, "io_uring", "p50_us")),
            added_mean("file", w)
        ),
    });
    ratios.push(iops_vs_qsd("null", RR32, 1.5));
    ratios.push(cpu_vs_qsd("null", RR32, 0.6, MEDIAN_DAEMON_CPU));
    ratios.push(Ratio {
        inputs: format!(
            "{MEDIAN_IOPS}; strata's client CPU busy: {}% on 1 queue, {}% on 2",
            fmt_opt(client_busy(RR32)),
            fmt_opt(client_busy(RR32_2Q))
        ),
        ..iops(
            format!("null {RR32} IOPS, strata 2 queues / 1 queue"),
            ("null", RR32_2Q, "strata"),
            ("null", RR32, "strata"),
            Some((">=", 1.6)),
        )
    });
    ratios.push(iops_vs_qsd("qcow2", RR32, 1.0));
    // References: where QSD stands on the same scales.
    ratios.push(iops(
        format!("(ref) file {RR32} IOPS, QSD / io_uring direct"),
        ("file", RR32, "qsd"),
        ("file", RR32, "io_uring"),
        None,
    ));
    ratios.push(iops(
        format!("(ref) null {RR32} IOPS, QSD 2 queues / 1 queue"),
        ("null", RR32_2Q, "qsd"),
        ("null", RR32, "qsd"),
        None,
    ));
    ratios.push(iops(
        format!("(ref) {RR32} IOPS, QSD qcow2 / QSD raw file"),
        ("qcow2", RR32, "qsd"),
        ("file", RR32, "qsd"),
        None,
    ));
    // rbd: strata against QSD's own rbd driver on the same image, only when rbd was run.
    if rbd {
        ratios.extend(RBD_WORKLOADS.iter().map(|w| iops_vs_qsd("rbd", w, 1.0)));
        let inputs = format!("{MEDIAN_DAEMON_CPU}, librbd's threads included");
        ratios.extend(
            RBD_WORKLOADS
                .iter()
                .map(|w| cpu_vs_qsd("rbd", w, 1.0, &inputs)),
        );
    }
    ratios
}

/// `a / b` when both are known and `b` is not zero.
pub fn div(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => Some(a / b),
        _ => None,
    }
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".to_string(), |x| format!("{x:.1}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ratio rows for p50 medians given as (backend, workload, target, p50 µs); each
    /// row's mean is its p50 plus 10 µs.
    fn rows(p50s: &[(&str, &str, &str, f64)]) -> Vec<Value> {
        let get = |b: &str, w: &str, t: &str, metric: &str| {
            let p50 = p50s
                .iter()
                .find(|r| (r.0, r.1, r.2) == (b, w, t))
                .map(|r| r.3);
            match metric {
                "p50_us" => p50,
                "mean_us" => p50.map(|p| p + 10.0),
                _ => None,
            }
        };
        table(&get, false).1
    }

    /// The ratio whose name starts with `prefix`: (name, value, inputs).
    fn ratio(rows: &[Value], prefix: &str) -> (String, Option<f64>, String) {
        let r = rows
            .iter()
            .find(|r| r["name"].as_str().unwrap().starts_with(prefix))
            .unwrap_or_else(|| panic!("no ratio {prefix}"));
        (
            r["name"].as_str().unwrap().to_string(),
            r["value"].as_f64(),
            r["inputs"].as_str().unwrap().to_string(),
        )
    }

    const SLEEPING: &[(&str, &str, &str, f64)] = &[
        ("ram", RR1, "strata", 50.0),
        ("ram", RR1, "qsd", 130.0),
        ("ram", RR1, "io_uring", 37.0),
        ("file", RR1, "strata", 60.0),
        ("file", RR1, "qsd", 100.0),
        ("file", RR1, "io_uring", 40.0),
    ];

    #[test]
    fn added_p50_uses_the_sleeping_rows_without_polling_ones() {
        let r = rows(SLEEPING);
        let (name, value, inputs) = ratio(&r, "ram randread-4k-qd1");
        assert_eq!(
            name,
            "ram randread-4k-qd1 p50 added over direct, strata (µs)"
        );
        assert_eq!(value, Some(13.0));
        assert_eq!(
            inputs,
            "added p50 µs: strata 13.0, qsd 93.0 (direct p50 37.0); \
             added mean µs: strata 13.0, qsd 93.0 (direct mean 47.0)"
        );
        let (name, value, _) = ratio(&r, "file randread-4k-qd1");
        assert_eq!(
            name,
            "file randread-4k-qd1 p50 added over direct, strata / QSD"
        );
        assert_eq!(value, Some(20.0 / 60.0));
    }

    #[test]
    fn added_p50_uses_the_polling_rows_when_strata_and_direct_have_them() {
        let mut p50s = SLEEPING.to_vec();
        p50s.extend([
            ("ram", RR1_POLL, "strata", 30.0),
            ("ram", RR1_POLL, "qsd", 90.0),
            ("ram", RR1_POLL, "io_uring", 26.0),
            // file: no direct row with the polling client, so the sleeping rows stay.
            ("file", RR1_POLL, "strata", 35.0),
        ]);
        let r = rows(&p50s);
        let (name, value, inputs) = ratio(&r, "ram randread-4k-qd1");
        assert_eq!(
            name,
            "ram randread-4k-qd1-poll p50 added over direct, strata (µs) (polling client)"
        );
        assert_eq!(value, Some(4.0));
        assert_eq!(
            inputs,
            "added p50 µs: strata 4.0, qsd 64.0 (direct p50 26.0); \
             added mean µs: strata 4.0, qsd 64.0 (direct mean 36.0)"
        );
        let (name, value, _) = ratio(&r, "file randread-4k-qd1");
        assert_eq!(
            name,
            "file randread-4k-qd1 p50 added over direct, strata / QSD"
        );
        assert_eq!(value, Some(20.0 / 60.0));
    }
}
