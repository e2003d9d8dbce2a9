//! Limits on who may try to authenticate and how often: failed authentications per source (an
//! IPv4 address or an IPv6 /64; beyond its budget the source is refused before its credentials
//! are looked at) and across all sources (beyond it, every source's failures are), a few
//! identity-token verifications a source over budget still gets (so a valid token is not locked
//! out by a neighbour), request rates per principal (`rate = "600/min"`), and the aggregation
//! that keeps refused floods from filling the audit log: the first refusal of a kind from a
//! source in a window is recorded at once, the rest are counted and recorded as one summary when
//! the window closes; past [`MAX_NEW_WINDOWS_PER_MINUTE`] sources in a minute, newcomers share
//! one window, so rotating addresses buys no records.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::Duration;

use valet_core::audit::AuditAction;
use valet_core::rate::{Bucket, Rate, Source};

/// Identity tokens a source over its failure budget may still have verified (new ones; those
/// verified before are taken from memory at no cost).
pub const GRACE_VERIFICATIONS: Rate = Rate {
    count: 10,
    per: Duration::from_secs(60),
};
/// Refused calls a grant may meet; past it, its calls are refused before their body is read or
/// its record looked up, until the budget refills (a token refused in a loop costs little).
pub const GRANT_REFUSALS: Rate = Rate {
    count: 600,
    per: Duration::from_secs(60),
};
/// Windows (sources, each with one record at once) opened per minute at most; past it new
/// sources' refusals share the catch-all window.
pub const MAX_NEW_WINDOWS_PER_MINUTE: u32 = 100;
/// The subject of the catch-all window.
pub const OTHER_SOURCES: &str = "(other sources)";

/// How long refusals of one kind from one source are gathered into one summary.
pub const AGGREGATION_WINDOW: Duration = Duration::from_secs(60);
/// Open windows kept at most; beyond, refusals share one catch-all window.
const MAX_WINDOWS: usize = 10_000;
/// Buckets kept at most per kind; full (idle) ones are forgotten first.
const MAX_BUCKETS: usize = 100_000;
/// Methods named in a summary at most, and how much of each.
const MAX_METHODS_NAMED: usize = 10;
const MAX_METHOD_CHARS: usize = 200;

/// Who a refusal is counted against: a source address, or a principal over its rate.
pub type Subject = String;

#[derive(Debug)]
struct Window {
    opened_ms: u64,
    reason: String,
    /// Refusals after the first (which was recorded when the window opened).
    n_more: u64,
    methods: BTreeSet<String>,
}

/// The refusals gathered in a window that closed, to record as one summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub subject: Subject,
    /// What was refused: an authentication (gRPC) or a gateway call.
    pub action: AuditAction,
    pub kind: &'static str,
    /// The reason of the first refusal in the window.
    pub reason: String,
    pub n_more: u64,
    pub methods: Vec<String>,
    pub window_seconds: u64,
}

#[derive(Default)]
struct State {
    failures_by_source: HashMap<Source, Bucket>,
    /// Failures across all sources.
    failures: Option<Bucket>,
    /// Verifications granted to sources over budget.
    grace_by_source: HashMap<Source, Bucket>,
    /// Refused calls per grant.
    refusals_by_grant: HashMap<String, Bucket>,
    /// Windows opened in the current minute: (minute, count).
    new_windows: (u64, u32),
    requests_by_principal: HashMap<String, Bucket>,
    windows: HashMap<(Subject, AuditAction, &'static str), Window>,
}

/// The limits' state, shared by every request.
#[derive(Default)]
pub struct AuthenticationLimits {
    state: std::sync::Mutex<State>,
}

impl AuthenticationLimits {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether `source` may try to authenticate now: refused, with how long to wait, while its
    /// failed-authentication budget is spent, or the budget of all sources (`total`) is.
    pub fn source_admitted(
        &self,
        source: IpAddr,
        limit: Rate,
        total: Rate,
        now_ms: u64,
    ) -> Result<(), Duration> {
        let state = self.state();
        if let Some(bucket) = state.failures_by_source.get(&Source::of(source)) {
            bucket.peek(limit, now_ms)?;
        }
        match &state.failures {
            Some(bucket) => bucket.peek(total, now_ms),
            None => Ok(()),
        }
    }

    /// Spends one of `source`'s failed-authentication budget, and one of all sources'.
    pub fn failed(&self, source: IpAddr, limit: Rate, total: Rate, now_ms: u64) {
        let mut state = self.state();
        let _ = spend(
            &mut state.failures_by_source,
            Source::of(source),
            limit,
            now_ms,
        );
        let _ = state
            .failures
            .get_or_insert_with(|| Bucket::full(total, now_ms))
            .take(total, now_ms);
    }

    /// Whether the grant `grant_id` may have a call looked at now: refused, with how long to
    /// wait, while it has spent its [`GRANT_REFUSALS`].
    pub fn grant_admitted(&self, grant_id: &str, now_ms: u64) -> Result<(), Duration> {
        match self.state().refusals_by_grant.get(grant_id) {
            Some(bucket) => bucket.peek(GRANT_REFUSALS, now_ms),
            None => Ok(()),
        }
    }

    /// Spends one of the grant's refusal budget.
    pub fn grant_refused(&self, grant_id: &str, now_ms: u64) {
        let mut state = self.state();
        let _ = spend(
            &mut state.refusals_by_grant,
            grant_id.to_string(),
            GRANT_REFUSALS,
            now_ms,
        );
    }

    /// Whether `source`, over budget, may still have one new identity token verified now.
    pub fn grace_verification(&self, source: IpAddr, now_ms: u64) -> bool {
        let mut state = self.state();
        spend(
            &mut state.grace_by_source,
            Source::of(source),
            GRACE_VERIFICATIONS,
            now_ms,
        )
        .is_ok()
    }

    /// Takes one request from `principal`'s rate; refused, with how long to wait, when spent.
    pub fn principal_admitted(
        &self,
        principal: &str,
        rate: Rate,
        now_ms: u64,
    ) -> Result<(), Duration> {
        let mut state = self.state();
        spend(
            &mut state.requests_by_principal,
            principal.to_string(),
            rate,
            now_ms,
        )
    }

    /// Counts a refusal; `true` when it opens a window and must be recorded now (the rest of
    /// the window's refusals go into its summary).
    pub fn note_refusal(
        &self,
        subject: Subject,
        action: AuditAction,
        kind: &'static str,
        reason: &str,
        method: &str,
        now_ms: u64,
    ) -> bool {
        let mut state = self.state();
        let minute = now_ms / 60_000;
        if state.new_windows.0 != minute {
            state.new_windows = (minute, 0);
        }
        let key = if !state.windows.contains_key(&(subject.clone(), action, kind))
            && (state.windows.len() >= MAX_WINDOWS
                || state.new_windows.1 >= MAX_NEW_WINDOWS_PER_MINUTE)
        {
            (OTHER_SOURCES.to_string(), action, kind)
        } else {
            (subject, action, kind)
        };
        if !state.windows.contains_key(&key) {
            state.new_windows.1 += 1;
        }
        match state.windows.get_mut(&key) {
            Some(window) => {
                window.n_more += 1;
                if window.methods.len() < MAX_METHODS_NAMED {
                    window
                        .methods
                        .insert(method.chars().take(MAX_METHOD_CHARS).collect());
                }
                false
            }
            None => {
                state.windows.insert(
                    key,
                    Window {
                        opened_ms: now_ms,
                        reason: reason.to_string(),
                        n_more: 0,
                        methods: BTreeSet::new(),
                    },
                );
                true
            }
        }
    }

    /// Closes the windows older than [`AGGREGATION_WINDOW`] (every window when `all`, at
    /// shutdown) and returns the summaries of those that gathered more than their first refusal.
    pub fn close_windows(&self, now_ms: u64, all: bool) -> Vec<Summary> {
        let window_ms = AGGREGATION_WINDOW.as_millis() as u64;
        let mut state = self.state();
        let closing: Vec<(Subject, AuditAction, &'static str)> = state
            .windows
            .iter()
            .filter(|(_, window)| all || now_ms.saturating_sub(window.opened_ms) >= window_ms)
            .map(|(key, _)| key.clone())
            .collect();
        let mut summaries = Vec::new();
        for key in closing {
            if let Some(window) = state.windows.remove(&key)
                && window.n_more > 0
            {
                summaries.push(Summary {
                    subject: key.0,
                    action: key.1,
                    kind: key.2,
                    reason: window.reason,
                    n_more: window.n_more,
                    methods: window.methods.into_iter().collect(),
                    window_seconds: now_ms.saturating_sub(window.opened_ms).div_ceil(1000),
                });
            }
        }
        summaries
    }
}

/// Takes one from `key`'s bucket in `buckets` (a full one when it has none), forgetting full
/// (idle) buckets first once [`MAX_BUCKETS`] are kept; refused, with how long to wait, when empty.
fn spend<K: std::hash::Hash + Eq>(
    buckets: &mut HashMap<K, Bucket>,
    key: K,
    rate: Rate,
    now_ms: u64,
) -> Result<(), Duration> {
    if buckets.len() >= MAX_BUCKETS {
        buckets.retain(|_, bucket| !bucket.is_full(rate, now_ms));
    }
    buckets
        .entry(key)
        .or_insert_with(|| Bucket::full(rate, now_ms))
        .take(rate, now_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_refusals_is_one_record_and_one_summary_per_source_and_kind() {
        let limits = AuthenticationLimits::default();
        assert!(limits.note_refusal(
            "10.0.0.1".into(),
            AuditAction::Authenticate,
            "unknown_key",
            "unknown",
            "/a",
            0
        ));
        for index in 0..1_000 {
            assert!(!limits.note_refusal(
                "10.0.0.1".into(),
                AuditAction::Authenticate,
                "unknown_key",
                "unknown",
                &format!("/m{index}"),
                10
            ));
        }
        assert!(limits.note_refusal(
            "10.0.0.2".into(),
            AuditAction::Authenticate,
            "unknown_key",
            "unknown",
            "/a",
            10
        ));
        assert!(limits.note_refusal(
            "10.0.0.1".into(),
            AuditAction::Authenticate,
            "no_credential",
            "none",
            "/a",
            10
        ));
        assert!(limits.close_windows(59_000, false).is_empty());
        let summaries = limits.close_windows(60_000, false);
        assert_eq!(
            summaries.len(),
            1,
            "windows with one refusal need no summary"
        );
        assert_eq!(summaries[0].n_more, 1_000);
        assert_eq!(summaries[0].methods.len(), MAX_METHODS_NAMED);
        // A new window opens with a recorded refusal.
        assert!(limits.note_refusal(
            "10.0.0.1".into(),
            AuditAction::Authenticate,
            "unknown_key",
            "unknown",
            "/a",
            61_000
        ));
    }

    #[test]
    fn a_source_that_spent_its_failure_budget_is_refused_until_it_refills() {
        let limits = AuthenticationLimits::default();
        let limit = Rate::parse("3/min").unwrap();
        let total = Rate::parse("100/min").unwrap();
        let source: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..3 {
            limits.source_admitted(source, limit, total, 0).unwrap();
            limits.failed(source, limit, total, 0);
        }
        let wait = limits.source_admitted(source, limit, total, 0).unwrap_err();
        assert_eq!(wait, Duration::from_secs(20));
        assert!(
            limits
                .source_admitted("10.0.0.2".parse().unwrap(), limit, total, 0)
                .is_ok()
        );
        assert!(limits.source_admitted(source, limit, total, 20_000).is_ok());
        // An IPv6 /64 is one source.
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        for _ in 0..3 {
            limits.failed(v6, limit, total, 0);
        }
        assert!(
            limits
                .source_admitted("2001:db8::ffff".parse().unwrap(), limit, total, 0)
                .is_err()
        );
    }

    #[test]
    fn rotating_sources_spend_the_budget_of_all_sources_and_open_few_windows() {
        let limits = AuthenticationLimits::default();
        let limit = Rate::parse("60/min").unwrap();
        let total = Rate::parse("1000/min").unwrap();
        let mut recorded = 0;
        for n in 0..1_500u32 {
            let source = IpAddr::from([10, 1, (n / 250) as u8, (n % 250) as u8]);
            limits.source_admitted(source, limit, total, 0).ok();
            limits.failed(source, limit, total, 0);
            if limits.note_refusal(
                source.to_string(),
                AuditAction::Authenticate,
                "unknown_key",
                "unknown",
                "/a",
                0,
            ) {
                recorded += 1;
            }
        }
        // Past the budget of all sources, a fresh address is refused too.
        assert!(
            limits
                .source_admitted("10.9.9.9".parse().unwrap(), limit, total, 0)
                .is_err()
        );
        assert_eq!(
            recorded,
            MAX_NEW_WINDOWS_PER_MINUTE as usize + 1,
            "the rest share one window"
        );
        // A source over budget may still have a few new identity tokens verified.
        let source: IpAddr = "10.1.0.1".parse().unwrap();
        let granted = (0..50)
            .filter(|_| limits.grace_verification(source, 0))
            .count();
        assert_eq!(granted, GRACE_VERIFICATIONS.count as usize);
    }

    #[test]
    fn a_principal_over_its_rate_is_told_when_to_retry() {
        let limits = AuthenticationLimits::default();
        let rate = Rate::parse("2/s").unwrap();
        limits.principal_admitted("agent", rate, 0).unwrap();
        limits.principal_admitted("agent", rate, 0).unwrap();
        assert_eq!(
            limits.principal_admitted("agent", rate, 0),
            Err(Duration::from_millis(500))
        );
        assert!(limits.principal_admitted("other", rate, 0).is_ok());
    }
}
