//! Time as an injected dependency: valetd reads the system clock, tests move a fake one.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch, UTC. All expiries are computed in this unit by valetd.
pub type UnixTime = i64;

/// The source of "now" for every rule that involves time.
pub trait Clock: Send + Sync + 'static {
    /// The current time, in whole seconds since the Unix epoch (UTC).
    fn now(&self) -> UnixTime;

    /// The current time in milliseconds, for ordering (grant ids). Defaults to whole seconds.
    fn now_millis(&self) -> u64 {
        u64::try_from(self.now()).unwrap_or(0).saturating_mul(1000)
    }
}

/// The machine's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> UnixTime {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    }

    fn now_millis(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }
}

/// A clock that moves only when told to; clones share one time.
#[derive(Debug, Clone)]
pub struct FakeClock {
    now: Arc<AtomicI64>,
}

impl FakeClock {
    /// A clock standing at `start`.
    pub fn at(start: UnixTime) -> Self {
        Self {
            now: Arc::new(AtomicI64::new(start)),
        }
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let seconds = i64::try_from(by.as_secs()).unwrap_or(i64::MAX);
        self.now.fetch_add(seconds, Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now(&self) -> UnixTime {
        self.now.load(Ordering::SeqCst)
    }
}

/// Adds a duration to a time, saturating instead of overflowing.
pub fn add_duration(at: UnixTime, duration: Duration) -> UnixTime {
    at.saturating_add(i64::try_from(duration.as_secs()).unwrap_or(i64::MAX))
}

/// Formats a Unix time as RFC 3339 (UTC), for records people read.
pub fn format_time(at: UnixTime) -> String {
    let seconds = u64::try_from(at).unwrap_or(0);
    // Past year 9999 RFC 3339 has no form (and the addition could overflow): the seconds then.
    match UNIX_EPOCH.checked_add(Duration::from_secs(seconds)) {
        Some(time) if seconds < 253_402_300_800 => {
            humantime::format_rfc3339_seconds(time).to_string()
        }
        _ => format!("{seconds} s after 1970"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_clock_moves_only_when_advanced_and_clones_share_it() {
        let clock = FakeClock::at(1_000);
        let other = clock.clone();
        assert_eq!(clock.now(), 1_000);
        other.advance(Duration::from_secs(90));
        assert_eq!(clock.now(), 1_090);
    }

    #[test]
    fn time_formats_as_rfc3339_utc() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_time(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
