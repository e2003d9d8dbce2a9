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
