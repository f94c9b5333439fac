//! Aggregates the per-run JSON lines written by `strata-bench run` into a table of medians,
//! the ratios the project tracks, and a summary JSON document.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;

use serde_json::{json, Map, Value};

use crate::error::Result;
use crate::{rate_report, ratios};

/// Targets in display order; unknown targets sort after these.
const TARGET_ORDER: &[&str] = &["strata", "qsd", "io_uring"];
const BACKEND_ORDER: &[&str] = &[
    "file",
    "ram",
    "null",
    "qcow2",
    "qcow2-ram",
    "qcow2-alloc",
    "rbd",
];
/// Runs with more busy CPU than this outside the daemon and client (fraction of one CPU) are
/// counted as disturbed in the report header.
const NOISY: f64 = 0.25;
/// Metrics whose per-round median is reported.
const METRICS: &[&str] = &[
    "iops",
    "mib_s",
    "p50_us",
    "p99_us",
    "p999_us",
    "mean_us",
    "daemon_cpu_s_per_io",
    "daemon_cpu_per_s",
    "client_cpu_s_per_io",
    "osd_cpu_s_per_io",
    "other_cpu_fraction",
    "steal_fraction",
];

fn rank(order: &[&str], s: &str) -> usize {
    order.iter().position(|x| *x == s).unwrap_or(order.len())
}

pub fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

#[derive(Default)]
struct Group {
    runs: Vec<Value>,
}

impl Group {
    fn values(&self, metric: &str) -> Vec<f64> {
        self.runs
            .iter()
            .filter_map(|r| r.get(metric).and_then(Value::as_f64))
            .collect()
    }
    fn median(&self, metric: &str) -> Option<f64> {
        median(&mut self.values(metric))
    }
}

type Key = (String, String, String); // backend, workload, target

/// Per-run fractions of one CPU (interference, steal): median, max, and how many runs are
/// above [`NOISY`].
fn spread(v: &mut [f64]) -> (f64, f64, usize) {
    let above = v.iter().filter(|&&o| o > NOISY).count();
    let max = v.iter().copied().fold(0.0, f64::max);
    (median(v).unwrap_or(0.0), max, above)
}

/// A row's steal, in % of one CPU: "median (max)" over its rounds; "-" for results written
/// before steal was measured.
fn steal_cell(median: Option<f64>, rounds: &[f64]) -> String {
    match median {
        None => "-".to_string(),
        Some(m) => format!(
            "{:.0} ({:.0})",
            m * 100.0,
            rounds.iter().copied().fold(0.0, f64::max) * 100.0
        ),
    }
}

pub struct Options<'a> {
    pub results: &'a str,
    pub json_out: Option<&'a str>,
    pub markdown_out: Option<&'a str>,
    /// (target, reason) for targets that were not run.
    pub missing: Vec<(String, String)>,
    /// Targets expected per backend (for "missing" rows): (backend, targets).
    pub expect: Vec<(String, Vec<String>)>,
}

pub fn report(opts: &Options) -> Result<()> {
    let text =
        fs::read_to_string(opts.results).map_err(|e| format!("read {}: {e}", opts.results))?;
    let mut groups: BTreeMap<Key, Group> = BTreeMap::new();
    let mut workload_order: Vec<String> = Vec::new();
    let mut rated: Vec<(String, String)> = Vec::new();
    let mut pinning: Vec<String> = Vec::new();
    let mut durations: Vec<f64> = Vec::new();
    let mut other: Vec<f64> = Vec::new();
    let mut steal: Vec<f64> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .map_err(|e| format!("{}:{}: bad JSON: {e}", opts.results, i + 1))?;
        let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
        let (backend, workload, target) = (s("backend"), s("workload"), s("target"));
        if !workload_order.contains(&workload) {
            workload_order.push(workload.clone());
        }
        if v.get("rate").is_some_and(|r| !r.is_null())
            && !rated.iter().any(|(b, w)| *b == backend && *w == workload)
        {
            rated.push((backend.clone(), workload.clone()));
        }
        if let Some(p) = v.get("pinning").and_then(Value::as_str) {
            if !pinning.iter().any(|x| x == p) {
                pinning.push(p.to_string());
            }
        }
        if let Some(o) = v.get("other_cpu_fraction").and_then(Value::as_f64) {
            other.push(o);
        }
        if let Some(o) = v.get("steal_fraction").and_then(Value::as_f64) {
            steal.push(o);
        }
        if let Some(d) = v.get("seconds").and_then(Value::as_f64) {
            durations.push(d);
        }
        groups
            .entry((backend, workload, target))
            .or_default()
            .runs
            .push(v);
    }
    if groups.is_empty() {
        return Err(format!("{}: no results", opts.results));
    }

    // Add expected-but-missing combinations.
    let present: Vec<Key> = groups.keys().cloned().collect();
    let mut missing_rows: Vec<Key> = Vec::new();
    for (backend, targets) in &opts.expect {
        for w in &workload_order {
            if !present.iter().any(|(b, wl, _)| b == backend && wl == w) {
                continue;
            }
            for t in targets {
                let k = (backend.clone(), w.clone(), t.clone());
                if !groups.contains_key(&k) {
                    missing_rows.push(k);
                }
            }
        }
    }
    let missing_reason = |t: &str| {
        opts.missing
            .iter()
            .find(|(mt, _)| mt == t)
            .map(|(_, r)| r.clone())
            .unwrap_or_else(|| "not run".to_string())
    };

    let mut keys: Vec<Key> = groups.keys().cloned().chain(missing_rows).collect();
    // Report order: backends, then workloads in the order they were run, then targets.
    let backend_workload_order = |b: &str, w: &str| {
        (
            rank(BACKEND_ORDER, b),
            b.to_string(),
            workload_order.iter().position(|x| x == w),
        )
    };
    keys.sort_by_key(|(b, w, t)| {
        (
            backend_workload_order(b, w),
            rank(TARGET_ORDER, t),
            t.clone(),
        )
    });

    // Table. The OSD column only when some run measured an OSD (rbd).
    let has_osd = groups
        .values()
        .any(|g| !g.values("osd_cpu_s_per_io").is_empty());
    let (osd_head, osd_rule, osd_empty) = if has_osd {
        (" OSD CPU µs/IO |", "---:|", " |")
    } else {
        ("", "", "")
    };
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| backend | workload | target | IOPS | MiB/s | p50 µs | p99 µs | p99.9 µs | daemon CPU µs/IO | client CPU µs/IO |{osd_head} other CPU % | steal % (max) | rounds |"
    );
    let _ = writeln!(
        table,
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|{osd_rule}---:|---:|---:|"
    );
    let mut rows_json = Vec::new();
    for k in &keys {
        let (b, w, t) = k;
        match groups.get(k) {
            None => {
                let reason = missing_reason(t);
                let _ = writeln!(
                    table,
                    "| {b} | {w} | {t} | missing: {reason} | | | | | | |{osd_empty} | | 0 |"
                );
                rows_json.push(json!({
                    "backend": b, "workload": w, "target": t, "rounds": 0,
                    "missing": reason,
                }));
            }
            Some(g) => {
                let m = |metric: &str| g.median(metric);
                let f0 = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.0}"));
                let f1 = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.1}"));
                let us = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{:.2}", v * 1e6));
                let _ = writeln!(
                    table,
                    "| {b} | {w} | {t} | {} | {} | {} | {} | {} | {} | {} |{} {} | {} | {} |",
                    f0(m("iops")),
                    f1(m("mib_s")),
                    f1(m("p50_us")),
                    f1(m("p99_us")),
                    f1(m("p999_us")),
                    us(m("daemon_cpu_s_per_io")),
                    us(m("client_cpu_s_per_io")),
                    if has_osd {
                        format!(" {} |", us(m("osd_cpu_s_per_io")))
                    } else {
                        String::new()
                    },
                    m("other_cpu_fraction")
                        .map_or("-".to_string(), |v| format!("{:.0}", v * 100.0)),
                    steal_cell(m("steal_fraction"), &g.values("steal_fraction")),
                    g.runs.len()
                );
                let mut med = Map::new();
                let mut all = Map::new();
                for metric in METRICS {
                    med.insert(metric.to_string(), json!(m(metric)));
                    all.insert(metric.to_string(), json!(g.values(metric)));
                }
                rows_json.push(json!({
                    "backend": b, "workload": w, "target": t, "rounds": g.runs.len(),
                    "median": med, "per_round": all,
                }));
            }
        }
    }

    // Ratios.
    let get = |b: &str, w: &str, t: &str, metric: &str| -> Option<f64> {
        groups
            .get(&(b.to_string(), w.to_string(), t.to_string()))
            .and_then(|g| g.median(metric))
    };
    let (ratio_text, ratios_json) = ratios::table(&get, groups.keys().any(|(b, _, _)| b == "rbd"));

    let pin_line = if pinning.is_empty() {
        "pinning: unknown".to_string()
    } else {
        format!("pinning: {}", pinning.join("; "))
    };
    let rounds = groups.values().map(|g| g.runs.len()).max().unwrap_or(0);
    let duration = median(&mut durations).unwrap_or(0.0);
    let (other_med, other_max, noisy) = spread(&mut other);
    let outside = if has_osd {
        "daemon, client and OSD"
    } else {
        "daemon and client"
    };
    let (steal_med, steal_max, stolen) = spread(&mut steal);
    let mut header = format!(
        "strata-bench: median of {rounds} round(s), {duration:.1} s measured per run; {pin_line}\n\
         interference (busy CPU outside {outside}): median {:.0}%, max {:.0}% of one CPU; \
         {noisy} of {} runs above {:.0}%",
        other_med * 100.0,
        other_max * 100.0,
        other.len(),
        NOISY * 100.0
    );
    if !steal.is_empty() {
        let _ = write!(
            header,
            "\nsteal (CPU time the hypervisor gave to other guests): median {:.0}%, max {:.0}% \
             of one CPU; {stolen} of {} runs above {:.0}%",
            steal_med * 100.0,
            steal_max * 100.0,
            steal.len(),
            NOISY * 100.0
        );
    }

    let mut md = String::new();
    let _ = writeln!(md, "{header}\n");
    md.push_str(&table);
    md.push('\n');
    md.push_str(&ratio_text);
    rated.sort_by_key(|(b, w)| backend_workload_order(b, w));
    let (rate_text, rate_json) = rate_report::table(&rated, &get);
    if !rate_text.is_empty() {
        md.push('\n');
        md.push_str(&rate_text);
    }
    print!("{md}");

    if let Some(p) = opts.markdown_out {
        fs::write(p, &md).map_err(|e| format!("write {p}: {e}"))?;
    }
    if let Some(p) = opts.json_out {
        let doc = json!({
            "tool": "strata-bench",
            "kernel": fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            // SAFETY: sysconf has no memory-safety preconditions.
            "cpus_online": unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) },
            "rounds": rounds,
            "measured_seconds_per_run": duration,
            "interference": {
                "other_cpu_fraction_median": other_med,
                "other_cpu_fraction_max": other_max,
                "runs_above_threshold": noisy,
                "threshold": NOISY,
                "steal_fraction_median": steal_med,
                "steal_fraction_max": steal_max,
                "steal_runs_above_threshold": stolen,
            },
            "pinning": pinning,
            "missing": opts.missing.iter().map(|(t, r)| json!({"target": t, "reason": r})).collect::<Vec<_>>(),
            "rows": rows_json,
            "ratios": ratios_json,
            "fixed_rate": rate_json,
        });
        let s = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
        fs::write(p, s + "\n").map_err(|e| format!("write {p}: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ratio called `name` in a summary document.
    fn ratio_named(doc: &Value, name: &str) -> Value {
        doc["ratios"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("no ratio {name}"))
            .clone()
    }

    #[test]
    fn steal_cell_shows_median_and_worst_round() {
        assert_eq!(steal_cell(None, &[]), "-");
        assert_eq!(steal_cell(Some(0.01), &[0.01, 0.35, 0.0]), "1 (35)");
    }

    #[test]
    fn median_odd_even() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&mut []), None);
    }

    #[test]
    fn report_from_lines() {
        let dir = std::env::temp_dir().join(format!("strata-bench-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let res = dir.join("r.jsonl");
        let mut lines = String::new();
        for (t, iops, p50) in [("qsd", 70000.0, 64.0), ("io_uring", 78000.0, 51.0)] {
            for round in 1..=3 {
                lines.push_str(
                    &json!({"backend": "file", "workload": "randread-4k-qd32", "target": t,
                            "round": round, "iops": iops + round as f64, "p50_us": p50,
                            "seconds": 5.0, "pinning": "daemon CPU 0, client CPU 1"})
                    .to_string(),
                );
                lines.push('\n');
            }
        }
        for (t, iops) in [("qsd", 40000.0), ("strata", 44000.0)] {
            lines.push_str(
                &json!({"backend": "qcow2", "workload": "randread-4k-qd32", "target": t,
                        "round": 1, "iops": iops, "seconds": 5.0})
                .to_string(),
            );
            lines.push('\n');
        }
        fs::write(&res, lines).unwrap();
        let out = dir.join("s.json");
        report(&Options {
            results: res.to_str().unwrap(),
            json_out: Some(out.to_str().unwrap()),
            markdown_out: None,
            missing: vec![("strata".into(), "does not build".into())],
            expect: vec![(
                "file".into(),
                vec!["strata".into(), "qsd".into(), "io_uring".into()],
            )],
        })
        .unwrap();
        let doc: Value = serde_json::from_str(&fs::read_to_string(&out).unwrap()).unwrap();
        let rows = doc["rows"].as_array().unwrap();
        assert_eq!(rows.len(), 5);
        assert_eq!(rows[0]["target"], "strata");
        assert_eq!(rows[0]["missing"], "does not build");
        assert_eq!(rows[1]["median"]["iops"], 70002.0);
        let ratio = |name: &str| ratio_named(&doc, name);
        let r = ratio("(ref) file randread-4k-qd32 IOPS, QSD / io_uring direct");
        assert!((r["value"].as_f64().unwrap() - 70002.0 / 78002.0).abs() < 1e-9);
        let q = ratio("qcow2 randread-4k-qd32 IOPS, strata / QSD");
        assert!((q["value"].as_f64().unwrap() - 1.1).abs() < 1e-9);
        assert_eq!(q["goal"], ">= 1.0");
        assert_eq!(q["met"], true);
        // qcow2 rows sort after file, strata before qsd.
        assert_eq!(rows[3]["backend"], "qcow2");
        assert_eq!(rows[3]["target"], "strata");
        assert_eq!(rows[4]["target"], "qsd");
        // No rbd rows: no rbd ratios, no OSD column.
        let ratios = doc["ratios"].as_array().unwrap();
        assert!(!ratios
            .iter()
            .any(|r| r["name"].as_str().unwrap().starts_with("rbd ")));
        let md = dir.join("s.md");
        report(&Options {
            results: res.to_str().unwrap(),
            json_out: None,
            markdown_out: Some(md.to_str().unwrap()),
            missing: vec![],
            expect: vec![],
        })
        .unwrap();
        assert!(!fs::read_to_string(&md).unwrap().contains("OSD CPU"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rbd_rows_give_osd_column_and_ratios() {
        let dir = std::env::temp_dir().join(format!("strata-bench-rbd-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let res = dir.join("r.jsonl");
        let mut lines = String::new();
        for (t, iops, cpu) in [("strata", 4400.0, 100e-6), ("qsd", 4000.0, 125e-6)] {
            lines.push_str(
                &json!({"backend": "rbd", "workload": "randread-4k-qd32", "target": t,
                        "round": 1, "iops": iops, "daemon_cpu_s_per_io": cpu,
                        "osd_cpu_s_per_io": 150e-6, "seconds": 4.0})
                .to_string(),
            );
            lines.push('\n');
        }
        fs::write(&res, lines).unwrap();
        let (out, md) = (dir.join("s.json"), dir.join("s.md"));
        report(&Options {
            results: res.to_str().unwrap(),
            json_out: Some(out.to_str().unwrap()),
            markdown_out: Some(md.to_str().unwrap()),
            missing: vec![],
            expect: vec![("rbd".into(), vec!["strata".into(), "qsd".into()])],
        })
        .unwrap();
        let doc: Value = serde_json::from_str(&fs::read_to_string(&out).unwrap()).unwrap();
        let ratio = |name: &str| ratio_named(&doc, name);
        let r = ratio("rbd randread-4k-qd32 IOPS, strata / QSD");
        assert!((r["value"].as_f64().unwrap() - 1.1).abs() < 1e-9);
        assert_eq!(r["met"], true);
        let c = ratio("rbd randread-4k-qd32 daemon CPU s per I/O, strata / QSD");
        assert!((c["value"].as_f64().unwrap() - 0.8).abs() < 1e-9);
        assert_eq!(c["met"], true);
        // Workloads not run: no value.
        assert_eq!(
            ratio("rbd randwrite-4k-qd1 IOPS, strata / QSD")["value"],
            Value::Null
        );
        let text = fs::read_to_string(&md).unwrap();
        assert!(text.contains("| OSD CPU µs/IO |"), "{text}");
        assert!(text.contains("| 100.00 | - | 150.00 |"), "{text}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
