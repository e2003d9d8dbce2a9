//! Request rates: `"600/min"` as written in the config, and the token bucket that enforces one
//! (a burst of the whole count, refilled evenly over the period), driven by an injected clock;
//! and the source a budget counts a caller against.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

/// Where requests come from, as budgets (connections, failed authentications) count them: one IPv4 address, or one IPv6 /64 (what
/// one host or one customer of a provider commonly holds; an IPv4 address mapped into IPv6 is
/// that IPv4 address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    V4(Ipv4Addr),
    V6Prefix(u64),
}

impl Source {
    pub fn of(address: IpAddr) -> Source {
        match address {
            IpAddr::V4(v4) => Source::V4(v4),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(v4),
                None => Source::V6Prefix((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::V4(address) => write!(formatter, "{address}"),
            Source::V6Prefix(prefix) => {
                let address = std::net::Ipv6Addr::from(u128::from(*prefix) << 64);
                write!(formatter, "{address}/64")
            }
        }
    }
}

/// A number of events per period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

/// What a rate is written as.
pub const RATE_RULE: &str = "N/s, N/min or N/h with N from 1 to 1000000, such as \"600/min\"";

impl Rate {
    pub fn parse(text: &str) -> Option<Rate> {
        let (count, period) = text.trim().split_once('/')?;
        let count: u32 = count
            .trim()
            .parse()
            .ok()
            .filter(|count| (1..=1_000_000).contains(count))?;
        let per = match period.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            _ => return None,
        };
        Some(Rate { count, per })
    }

    /// Milliseconds for one event's worth of refill.
    fn millis_per_event(self) -> f64 {
        self.per.as_millis() as f64 / f64::from(self.count)
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let period = match self.per.as_secs() {
            1 => "s",
            60 => "min",
            _ => "h",
        };
        write!(formatter, "{}/{period}", self.count)
    }
}

/// A token bucket for one caller.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    tokens: f64,
    updated_ms: u64,
}

impl Bucket {
    /// A full bucket.
    pub fn full(rate: Rate, now_ms: u64) -> Bucket {
        Bucket {
            tokens: f64::from(rate.count),
            updated_ms: now_ms,
        }
    }

    /// Takes one event's token; when the bucket is empty, says how long until one is back.
    pub fn take(&mut self, rate: Rate, now_ms: u64) -> Result<(), Duration> {
        let elapsed = now_ms.saturating_sub(self.updated_ms) as f64;
        self.tokens = (self.tokens + elapsed / rate.millis_per_event()).min(f64::from(rate.count));
        self.updated_ms = now_ms.max(self.updated_ms);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let wait = ((1.0 - self.tokens) * rate.millis_per_event()).ceil() as u64;
            Err(Duration::from_millis(wait.max(1)))
        }
    }

    /// Whether a token is available now, without taking it; if not, how long until one is.
    pub fn peek(&self, rate: Rate, now_ms: u64) -> Result<(), Duration> {
        let mut copy = *self;
        copy.take(rate, now_ms)
    }

    /// Whether the bucket has refilled completely by `now_ms` (it can be forgotten).
    pub fn is_full(&self, rate: Rate, now_ms: u64) -> bool {
        let elapsed = now_ms.saturating_sub(self.updated_ms) as f64;
        self.tokens + elapsed / rate.millis_per_event() >= f64::from(rate.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_as_written_and_refuse_the_rest() {
        assert_eq!(
            Rate::parse("600/min"),
            Some(Rate {
                count: 600,
                per: Duration::from_secs(60)
            })
        );
        assert_eq!(
            Rate::parse("5/s").map(|rate| rate.to_string()),
            Some("5/s".into())
        );
        for text in ["", "600", "0/min", "-1/s", "10/day", "x/min", "2000000/s"] {
            assert_eq!(Rate::parse(text), None, "{text}");
        }
    }

    #[test]
    fn a_bucket_allows_the_burst_then_refills_evenly() {
        let rate = Rate::parse("3/s").unwrap();
        let mut bucket = Bucket::full(rate, 0);
        for _ in 0..3 {
            bucket.take(rate, 0).unwrap();
        }
        let wait = bucket.take(rate, 0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(334));
        assert!(bucket.take(rate, 200).is_err());
        bucket.take(rate, 334).unwrap();
        assert!(!bucket.is_full(rate, 334));
        assert!(bucket.is_full(rate, 1_400));
    }
}
