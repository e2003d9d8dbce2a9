//! The load loop: N concurrent workers repeat one operation until the time is up; every latency
//! is kept, so percentiles are exact.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What one measurement produced.
#[derive(Debug, Clone, Default)]
pub struct Measurement {
    pub n_ok: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Measurement {
    pub fn throughput(&self) -> f64 {
        self.n_ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The latency at `quantile` (0..=1), in milliseconds.
    pub fn percentile_ms(&self, quantile: f64) -> f64 {
        if self.latencies.is_empty() {
            return 0.0;
        }
        let index = ((self.latencies.len() as f64 - 1.0) * quantile).round() as usize;
        self.latencies[index].as_secs_f64() * 1000.0
    }
}

/// Runs `operation` from `concurrency` workers for `duration` (or, when `max_operations` is set,
/// until that many have run). Worker `w` passes `w` to the operation.
pub async fn run<F, Fut>(
    concurrency: usize,
    duration: Duration,
    max_operations: Option<u64>,
    operation: F,
) -> Measurement
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    let operation = Arc::new(operation);
    let started = Instant::now();
    let deadline = started + duration;
    let budget = Arc::new(std::sync::atomic::AtomicU64::new(
        max_operations.unwrap_or(u64::MAX),
    ));
    let mut workers = Vec::new();
    for worker in 0..concurrency.max(1) {
        let operation = operation.clone();
        let budget = budget.clone();
        workers.push(tokio::spawn(async move {
            let mut measurement = Measurement::default();
            while Instant::now() < deadline {
                if budget
                    .fetch_update(
                        std::sync::atomic::Ordering::SeqCst,
                        std::sync::atomic::Ordering::SeqCst,
                        |left| left.checked_sub(1),
                    )
                    .is_err()
                {
                    break;
                }
                let began = Instant::now();
                match operation(worker).await {
                    Ok(()) => {
                        measurement.n_ok += 1;
                        measurement.latencies.push(began.elapsed());
                    }
                    Err(error) => {
                        measurement.errors += 1;
                        measurement.first_error.get_or_insert(error);
                    }
                }
            }
            measurement
        }));
    }
    let mut total = Measurement::default();
    for worker in workers {
        if let Ok(measurement) = worker.await {
            total.n_ok += measurement.n_ok;
            total.errors += measurement.errors;
            if total.first_error.is_none() {
                total.first_error = measurement.first_error;
            }
            total.latencies.extend(measurement.latencies);
        }
    }
    total.elapsed = started.elapsed();
    total.latencies.sort_unstable();
    total
}
