//! What valetd counts, for Prometheus: counters derived from every audit record as it is
//! committed (so the metrics say what the audit log says), the live-grant gauge kept from the
//! store's change stream, and the gauges read when scraped. Every label value is bounded: an
//! action, an outcome, a refusal kind, or a name the config declares (anything else is `other`);
//! never a secret, a token, a grant or task id, a principal's free text.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use arc_swap::ArcSwap;
use valet_core::UnixTime;
use valet_core::audit::AuditEvent;
use valet_core::call::CallRefusal;
use valet_core::config::Config;
use valet_core::grant::{Grant, GrantStatus};

use crate::ServiceError;

/// The label value for a name the config does not declare.
const OTHER: &str = "other";

/// The names a label may take, from the config in force.
#[derive(Default)]
struct KnownNames {
    scopes: BTreeSet<String>,
    environments: BTreeSet<String>,
    upstreams: BTreeSet<String>,
}

impl KnownNames {
    fn of(config: &Config) -> KnownNames {
        KnownNames {
            scopes: config.scopes.keys().cloned().collect(),
            environments: config
                .scopes
                .values()
                .map(|scope| scope.environment.clone())
                .collect(),
            upstreams: config.upstreams.keys().cloned().collect(),
        }
    }
}

/// A label value from `set`, or `other`.
fn known(set: &BTreeSet<String>, value: Option<&str>) -> String {
    match value {
        Some(value) if set.contains(value) => value.to_string(),
        Some(_) => OTHER.to_string(),
        None => String::new(),
    }
}

/// A refusal kind, if it is one valetd names; `other` otherwise.
fn refusal_kind(value: Option<&str>) -> &'static str {
    let Some(value) = value else {
        return "";
    };
    ServiceError::KINDS
        .iter()
        .chain(CallRefusal::KINDS.iter())
        .chain([crate::gateway::AUDIT_SYNC_FAILED].iter())
        .find(|kind| **kind == value)
        .copied()
        .unwrap_or(OTHER)
}

/// A rule label: `allow[N]` or `tool[N]`, the index the gateway's records start the rule with
/// (`allow[0] GET /v1/projects/**`); `other` otherwise.
fn rule_label(value: Option<&str>) -> String {
    let Some(value) = value.map(|value| value.split(' ').next().unwrap_or_default()) else {
        return String::new();
    };
    let well_formed = ["allow[", "tool["].iter().any(|prefix| {
        value
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix(']'))
            .is_some_and(|index| {
                !index.is_empty() && index.len() <= 4 && index.bytes().all(|b| b.is_ascii_digit())
            })
    });
    if well_formed {
        value.to_string()
    } else {
        OTHER.to_string()
    }
}

/// An HTTP status as a label: three digits, or `other`.
fn status_label(value: Option<&str>) -> String {
    match value {
        Some(status) if status.len() == 3 && status.bytes().all(|b| b.is_ascii_digit()) => {
            status.to_string()
        }
        Some(_) => OTHER.to_string(),
        None => String::new(),
    }
}

/// The service's metrics. Recording goes to the process's `metrics` recorder (valetd installs
/// the Prometheus one; without a recorder every call is a no-op).
pub(crate) struct Metrics {
    /// Off until valetd serves metrics: then audit records are counted (labels cost
    /// allocations on every record, not worth paying for nobody).
    enabled: std::sync::atomic::AtomicBool,
    names: ArcSwap<KnownNames>,
    /// Live grants: id → (environment, expiry), from the store's change stream.
    live: Mutex<HashMap<String, (String, UnixTime)>>,
}

impl Metrics {
    pub(crate) fn new(config: &Config) -> Metrics {
        Metrics {
            enabled: std::sync::atomic::AtomicBool::new(false),
            names: ArcSwap::from_pointee(KnownNames::of(config)),
            live: Mutex::new(HashMap::new()),
        }
    }

    /// A reload applied: the label sets follow the new config.
    pub(crate) fn config_changed(&self, config: &Config) {
        self.names
            .store(std::sync::Arc::new(KnownNames::of(config)));
    }

    /// Counts one committed audit record.
    pub(crate) fn observe(&self, event: &AuditEvent) {
        if !self.enabled.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let names = self.names.load();
        let action = event.action().to_string();
        let outcome = event.text("outcome").unwrap_or_default().to_string();
        let refusal = refusal_kind(event.text("refusal"));
        metrics::counter!(
            "valet_decisions_total",
            "action" => action.clone(),
            "outcome" => outcome.clone(),
            "reason" => refusal,
        )
        .increment(1);
        let scope = known(&names.scopes, event.text("scope"));
        match action.as_str() {
            "token.issue" if outcome == "allowed" => {
                metrics::counter!(
                    "valet_tokens_issued_total",
                    "scope" => scope,
                    "environment" => known(&names.environments, event.text("environment")),
                )
                .increment(1);
            }
            "token.issue" => {
                metrics::counter!(
                    "valet_tokens_denied_total",
                    "scope" => scope,
                    "reason" => refusal,
                )
                .increment(1);
            }
            "token.revoke" if outcome == "allowed" => {
                let via: &'static str = match event.text("via") {
                    None | Some("token.revoke") => "token.revoke",
                    Some("task.revoke") => "task.revoke",
                    Some("revoke_all") => "revoke_all",
                    Some("config.reload") => "config.reload",
                    Some(_) => OTHER,
                };
                metrics::counter!("valet_revocations_total", "via" => via).increment(1);
            }
            "approval.approve" | "approval.deny" | "approval.timeout"
                if event
                    .text("status")
                    .is_some_and(|status| status != "pending") =>
            {
                let decision: &'static str = match event.text("status") {
                    Some("approved") => "approved",
                    Some("denied") => "denied",
                    Some("expired") => "expired",
                    _ => OTHER,
                };
                metrics::counter!("valet_approvals_decided_total", "decision" => decision)
                    .increment(1);
            }
            "gateway.call" => {
                metrics::counter!(
                    "valet_gateway_calls_total",
                    "upstream" => known(&names.upstreams, event.text("upstream")),
                    "rule" => rule_label(event.text("rule")),
                    "outcome" => outcome,
                    "reason" => refusal,
                )
                .increment(1);
            }
            "gateway.response" => {
                let upstream = known(&names.upstreams, event.text("upstream"));
                metrics::counter!(
                    "valet_gateway_responses_total",
                    "upstream" => upstream.clone(),
                    "rule" => rule_label(event.text("rule")),
                    "status" => status_label(event.text("status")),
                )
                .increment(1);
                if let Some(latency_ms) = event.value("latency_ms").and_then(|value| value.as_f64())
                {
                    metrics::histogram!("valet_gateway_call_seconds", "upstream" => upstream)
                        .record(latency_ms / 1000.0);
                }
            }
            _ => {}
        }
    }

    /// The live-grant view follows one change of a grant.
    pub(crate) fn grant_changed(&self, grant: &Grant) {
        let mut live = self
            .live
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if grant.status == GrantStatus::Active {
            live.insert(
                grant.id.clone(),
                (grant.environment.clone(), grant.expires_at),
            );
        } else {
            live.remove(&grant.id);
        }
    }

    /// The live-grant view starts again from `grants` (at start, and after a gap in the stream).
    pub(crate) fn grants_reloaded(&self, grants: impl IntoIterator<Item = Grant>) {
        let mut live = self
            .live
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        live.clear();
        for grant in grants {
            if grant.status == GrantStatus::Active {
                live.insert(grant.id, (grant.environment, grant.expires_at));
            }
        }
    }

    /// Sets the gauges read at a scrape: live grants by environment at `now` (expired ones
    /// leave the view), pending approvals, the audit head.
    pub(crate) fn set_gauges(&self, now: UnixTime, n_pending_approvals: usize, audit_head: u64) {
        let names = self.names.load();
        let mut by_environment: BTreeMap<String, u64> = names
            .environments
            .iter()
            .map(|environment| (environment.clone(), 0))
            .collect();
        {
            let mut live = self
                .live
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            live.retain(|_, (_, expires_at)| *expires_at > now);
            for (environment, _) in live.values() {
                *by_environment
                    .entry(known(&names.environments, Some(environment)))
                    .or_default() += 1;
            }
        }
        for (environment, n) in by_environment {
            metrics::gauge!("valet_grants_active", "environment" => environment).set(n as f64);
        }
        metrics::gauge!("valet_approvals_pending").set(n_pending_approvals as f64);
        metrics::gauge!("valet_audit_head_sequence").set(audit_head as f64);
    }
}

impl crate::Valet {
    /// Metrics are served from now on: audit records are counted.
    pub fn enable_metrics(&self) {
        self.metrics
            .enabled
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Keeps the live-grant gauge's view of the store: every active grant at start, then the
    /// store's change stream (every replica's changes, with etcd); a gap in the stream (a lag,
    /// a resync) reads everything again. Runs until the process ends.
    pub async fn follow_grants_for_metrics(&self) {
        loop {
            let mut changes = self.store.subscribe();
            match self.active_grants().await {
                Ok(grants) => self.metrics.grants_reloaded(grants),
                Err(error) => {
                    tracing::warn!(%error, "cannot list the active grants for the metrics; retrying");
                    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                    continue;
                }
            }
            loop {
                match changes.recv().await {
                    Ok(valet_store::StoreChange::GrantCreated(grant))
                    | Ok(valet_store::StoreChange::GrantRevoked(grant)) => {
                        self.metrics.grant_changed(&grant)
                    }
                    Ok(valet_store::StoreChange::GrantUpdated { after, .. }) => {
                        self.metrics.grant_changed(&after)
                    }
                    Ok(valet_store::StoreChange::Resync)
                    | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        }
    }

    async fn active_grants(&self) -> Result<Vec<Grant>, ServiceError> {
        let filter = valet_store::GrantFilter {
            status: Some(GrantStatus::Active),
            ..valet_store::GrantFilter::default()
        };
        let now = self.clock.now();
        let mut grants = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self
                .store
                .list_grants(&filter, now, after.as_deref(), 1000)
                .await?;
            grants.extend(page.grants);
            match page.next_after {
                Some(next) => after = Some(next),
                None => return Ok(grants),
            }
        }
    }

    /// Sets the gauges a scrape reads (the store reachable, live grants, pending approvals, the
    /// audit head); call it before rendering the metrics.
    pub async fn refresh_metrics(&self) {
        let reachable = self.store_reachable().await;
        metrics::gauge!("valet_store_up").set(if reachable { 1.0 } else { 0.0 });
        let n_pending = match self.store.list_approvals(true).await {
            Ok(pending) => pending.len(),
            Err(error) => {
                tracing::warn!(%error, "cannot count pending approvals for the metrics");
                0
            }
        };
        self.metrics
            .set_gauges(self.clock.now(), n_pending, self.audit.durable_sequence());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_take_only_bounded_values() {
        let set: BTreeSet<String> = ["staging".to_string()].into();
        assert_eq!(known(&set, Some("staging")), "staging");
        assert_eq!(known(&set, Some("ghp_secret_value")), OTHER);
        assert_eq!(refusal_kind(Some("denied")), "denied");
        assert_eq!(refusal_kind(Some("not_allowed")), "not_allowed");
        assert_eq!(refusal_kind(Some("a reason with a token eyJ...")), OTHER);
        assert_eq!(rule_label(Some("allow[3]")), "allow[3]");
        assert_eq!(rule_label(Some("tool[12]")), "tool[12]");
        assert_eq!(rule_label(Some("allow[0] GET /v1/projects/**")), "allow[0]");
        assert_eq!(rule_label(Some("allow[x]")), OTHER);
        assert_eq!(rule_label(Some("allow[123456]")), OTHER);
        assert_eq!(status_label(Some("428")), "428");
        assert_eq!(status_label(Some("4280")), OTHER);
    }
}
