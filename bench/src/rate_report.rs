//! The fixed-rate part of the report: for each workload run at a fixed rate, what the daemons
//! cost at that load (CPU seconds per second, from utime+stime over the window) and their
//! latency, strata beside QSD in one table with the ratios.

use std::fmt::Write as _;

use serde_json::{json, Value};

use crate::ratios::div;

/// A median of one metric: (backend, workload, target, metric) -> value.
pub type Median<'a> = dyn Fn(&str, &str, &str, &str) -> Option<f64> + 'a;

/// The table (markdown) and its rows (JSON) for the fixed-rate workloads `rated`, as
/// (backend, workload) pairs in report order; empty when there are none.
pub fn table(rated: &[(String, String)], median: &Median) -> (String, Vec<Value>) {
    if rated.is_empty() {
        return (String::new(), Vec::new());
    }
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Fixed rate: daemon CPU (% of one CPU, utime+stime over the window) and latency, strata vs QSD\n"
    );
    let _ = writeln!(
        md,
        "| backend | workload | IOPS strata / QSD | CPU % strata | CPU % QSD | CPU strata / QSD | p50 µs strata / QSD | p99 µs strata / QSD |"
    );
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|");
    let mut rows = Vec::new();
    let f0 = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
    let f1 = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    let f2 = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
    for (b, w) in rated {
        let m = |t: &str, metric: &str| median(b, w, t, metric);
        let cpu = |t: &str| m(t, "daemon_cpu_per_s").map(|c| c * 100.0);
        let cpu_ratio = div(cpu("strata"), cpu("qsd"));
        let _ = writeln!(
            md,
            "| {b} | {w} | {} / {} | {} | {} | {} | {} / {} | {} / {} |",
            f0(m("strata", "iops")),
            f0(m("qsd", "iops")),
            f1(cpu("strata")),
            f1(cpu("qsd")),
            f2(cpu_ratio),
            f1(m("strata", "p50_us")),
            f1(m("qsd", "p50_us")),
            f1(m("strata", "p99_us")),
            f1(m("qsd", "p99_us")),
        );
        rows.push(json!({
            "backend": b,
            "workload": w,
            "iops": {"strata": m("strata", "iops"), "qsd": m("qsd", "iops")},
            "daemon_cpu_percent": {"strata": cpu("strata"), "qsd": cpu("qsd")},
            "daemon_cpu_strata_over_qsd": cpu_ratio,
            "p50_us": {"strata": m("strata", "p50_us"), "qsd": m("qsd", "p50_us")},
            "p99_us": {"strata": m("strata", "p99_us"), "qsd": m("qsd", "p99_us")},
        }));
    }
    (md, rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_put_strata_beside_qsd() {
        let rated = vec![("null".to_string(), "randread-4k-qd1-r1k".to_string())];
        let median = |b: &str, w: &str, t: &str, metric: &str| -> Option<f64> {
            assert_eq!((b, w), ("null", "randread-4k-qd1-r1k"));
            match (t, metric) {
                ("strata", "daemon_cpu_per_s") => Some(0.02),
                ("qsd", "daemon_cpu_per_s") => Some(0.05),
                ("strata", "p50_us") => Some(20.0),
                ("qsd", "p50_us") => Some(40.0),
                (_, "iops") => Some(1000.0),
                _ => None,
            }
        };
        let (md, rows) = table(&rated, &median);
        assert!(
            md.contains("| null | randread-4k-qd1-r1k | 1000 / 1000 | 2.0 | 5.0 | 0.40 | 20.0 / 40.0 | - / - |"),
            "{md}"
        );
        assert_eq!(rows[0]["daemon_cpu_strata_over_qsd"].as_f64(), Some(0.4));
        assert!(table(&[], &median).0.is_empty());
    }
}
