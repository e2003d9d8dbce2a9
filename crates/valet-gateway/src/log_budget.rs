//! How many refusal lines the listeners write to valetd's log: a refused caller in a loop would
//! otherwise cost the log what the audit log's aggregation saves it. Past the budget lines are
//! counted, and the next line written says how many were left out.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::time::Instant;
use valet_core::rate::{Bucket, Rate};

/// Refusal lines written per second at most, per kind of line.
pub const REFUSAL_LINES: Rate = Rate {
    count: 20,
    per: std::time::Duration::from_secs(1),
};

/// The budget of one kind of log line.
#[derive(Debug)]
pub struct LogBudget {
    bucket: Mutex<Option<Bucket>>,
    epoch: Instant,
    left_out: AtomicU64,
}

impl Default for LogBudget {
    fn default() -> Self {
        LogBudget {
            bucket: Mutex::new(None),
            epoch: Instant::now(),
            left_out: AtomicU64::new(0),
        }
    }
}

impl LogBudget {
    /// Whether a line may be written now: `Some(n)` with the lines left out since the last one
    /// written, `None` when this one is left out (and counted).
    pub fn take(&self) -> Option<u64> {
        let now_ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let mut bucket = self
            .bucket
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let taken = bucket
            .get_or_insert_with(|| Bucket::full(REFUSAL_LINES, now_ms))
            .take(REFUSAL_LINES, now_ms);
        match taken {
            Ok(()) => Some(self.left_out.swap(0, Ordering::AcqRel)),
            Err(_) => {
                self.left_out.fetch_add(1, Ordering::AcqRel);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn past_its_budget_lines_are_counted_and_the_next_one_says_how_many() {
        let budget = LogBudget::default();
        for _ in 0..REFUSAL_LINES.count {
            assert_eq!(budget.take(), Some(0));
        }
        assert_eq!(budget.take(), None);
        assert_eq!(budget.take(), None);
        tokio::time::advance(std::time::Duration::from_secs(1)).await;
        assert_eq!(budget.take(), Some(2));
    }
}
