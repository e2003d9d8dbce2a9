//! Printing results: an aligned line per measurement for people, one JSON object per line with
//! `--json`.

use serde_json::{Value, json};

use crate::load::Measurement;

/// One scenario's figures against its baseline.
pub struct Report {
    pub scenario: String,
    pub concurrency: usize,
    pub measured: Measurement,
    pub baseline_name: String,
    pub baseline: Option<Measurement>,
    pub notes: serde_json::Map<String, Value>,
}

impl Report {
    pub fn ratio(&self) -> Option<f64> {
        self.baseline
            .as_ref()
            .map(|baseline| self.measured.throughput() / baseline.throughput().max(1e-9))
    }

    pub fn json(&self) -> Value {
        let mut value = json!({
            "scenario": self.scenario,
            "concurrency": self.concurrency,
            "throughput": round(self.measured.throughput()),
            "p50_ms": round(self.measured.percentile_ms(0.50)),
            "p90_ms": round(self.measured.percentile_ms(0.90)),
            "p99_ms": round(self.measured.percentile_ms(0.99)),
            "max_ms": round(self.measured.percentile_ms(1.0)),
            "errors": self.measured.errors,
            "baseline": self.baseline_name,
            "baseline_throughput": self.baseline.as_ref().map(|baseline| round(baseline.throughput())),
            "baseline_p50_ms": self.baseline.as_ref().map(|baseline| round(baseline.percentile_ms(0.50))),
            "baseline_p99_ms": self.baseline.as_ref().map(|baseline| round(baseline.percentile_ms(0.99))),
            "ratio": self.ratio().map(round),
        });
        if let Some(error) = &self.measured.first_error {
            value["first_error"] = Value::from(error.as_str());
        }
        for (key, note) in &self.notes {
            value[key] = note.clone();
        }
        value
    }

    pub fn print(&self, json: bool) {
        if json {
            println!("{}", self.json());
            return;
        }
        let measured = &self.measured;
        let baseline = match (&self.baseline, self.ratio()) {
            (Some(baseline), Some(ratio)) => format!(
                "  vs {} {:>9.0}/s  ratio {:.2}",
                self.baseline_name,
                baseline.throughput(),
                ratio
            ),
            _ => String::new(),
        };
        println!(
            "{:<26} c={:<3} {:>9.0}/s  p50 {:>7.3} ms  p90 {:>7.3}  p99 {:>7.3}  max {:>8.3}  errors {}{}",
            self.scenario,
            self.concurrency,
            measured.throughput(),
            measured.percentile_ms(0.5),
            measured.percentile_ms(0.9),
            measured.percentile_ms(0.99),
            measured.percentile_ms(1.0),
            measured.errors,
            baseline
        );
        if let Some(error) = &measured.first_error {
            println!("{:<26} first error: {error}", "");
        }
        for (key, note) in &self.notes {
            println!("{:<26} {key}: {note}", "");
        }
    }
}

fn round(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

/// The reports as Markdown: a table per scenario, with the machine, the date and the command.
/// The line after which benchmarks.md holds sections measured once, by hand (comparisons with
/// builds that no longer exist): a new run keeps them as they are.
pub const KEPT_MARKER: &str =
    "<!-- Sections below were measured once and are kept as they are by valet-bench -->";

/// The kept sections of an existing benchmarks.md, the marker line included.
pub fn kept_sections(document: &str) -> Option<&str> {
    document.find(KEPT_MARKER).map(|at| {
        let start = document[..at].rfind("\n\n").map_or(at, |blank| blank + 1);
        &document[start..]
    })
}

pub fn markdown(reports: &[Report], command: &str, micro: &str) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("model name"))
                .map(|line| line.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism()
        .map(|cores| cores.get())
        .unwrap_or(0);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines().next().map(|line| {
                line.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse::<u64>()
                    .unwrap_or(0)
                    / 1024
                    / 1024
            })
        })
        .unwrap_or(0);
    let date = valet_core::clock::format_time(<valet_core::SystemClock as valet_core::Clock>::now(
        &valet_core::SystemClock,
    ));
    let mut out = String::new();
    out.push_str("# Benchmarks\n\n");
    out.push_str("Figures from one run of `valet-bench` against a real valetd (release build, embedded store, every\n");
    out.push_str("grant and audit record durable before the answer) on loopback. These machines are shared and\n");
    out.push_str("noisy: compare the **ratios** against the baseline measured in the same run, not raw figures\n");
    out.push_str(
        "across runs. The load generator, valetd and the baselines share the same cores.\n\n",
    );
    out.push_str(&format!(
        "- Machine: {cores} cores ({cpu}), {memory} GiB\n- Date: {date}\n- Command: `{command}`\n\n"
    ));
    let mut scenarios: Vec<&str> = reports
        .iter()
        .map(|report| report.scenario.as_str())
        .collect();
    scenarios.dedup();
    for scenario in scenarios {
        out.push_str(&format!("## {scenario}\n\n"));
        out.push_str("| in flight | throughput /s | p50 ms | p90 ms | p99 ms | max ms | errors | baseline | baseline /s | baseline p50 ms | ratio |\n");
        out.push_str(
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |\n",
        );
        let mut notes = String::new();
        for report in reports.iter().filter(|report| report.scenario == scenario) {
            let measured = &report.measured;
            let (baseline_throughput, baseline_p50, ratio) =
                match (&report.baseline, report.ratio()) {
                    (Some(baseline), Some(ratio)) => (
                        format!("{:.0}", baseline.throughput()),
                        format!("{:.3}", baseline.percentile_ms(0.5)),
                        format!("{ratio:.2}"),
                    ),
                    _ => ("–".into(), "–".into(), "–".into()),
                };
            out.push_str(&format!(
                "| {} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {} | {} | {} | {} |\n",
                report.concurrency,
                measured.throughput(),
                measured.percentile_ms(0.5),
                measured.percentile_ms(0.9),
                measured.percentile_ms(0.99),
                measured.percentile_ms(1.0),
                measured.errors,
                if report.baseline_name.is_empty() {
                    "–"
                } else {
                    &report.baseline_name
                },
                baseline_throughput,
                baseline_p50,
                ratio
            ));
            for (key, value) in &report.notes {
                if key == "samples" {
                    continue;
                }
                notes.push_str(&format!(
                    "- in flight {}: {key} = {value}\n",
                    report.concurrency
                ));
            }
            if let Some(Value::Array(samples)) = report.notes.get("samples") {
                notes.push_str("\n| at s | grants issued | grants stored | RSS KiB | data dir KiB |\n| ---: | ---: | ---: | ---: | ---: |\n");
                for sample in samples {
                    notes.push_str(&format!(
                        "| {} | {} | {} | {} | {} |\n",
                        sample["at_s"],
                        sample["issued"],
                        sample["stored_grants"],
                        sample["rss_kib"],
                        sample["data_dir_kib"]
                    ));
                }
            }
        }
        if !notes.is_empty() {
            out.push('\n');
            out.push_str(&notes);
        }
        out.push('\n');
    }
    if !micro.trim().is_empty() {
        out.push_str("## Micro-benchmarks (criterion)\n\n```\n");
        out.push_str(micro.trim());
        out.push_str("\n```\n");
    }
    out
}
