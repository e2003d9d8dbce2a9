//! Approvals in valetd: pending token requests for sensitive scopes, per-call approvals for the
//! gateway, decisions by people, timeouts, and the webhook that announces new requests.

use std::sync::Arc;
use std::time::Duration;

use valet_core::approval::{
    self, ApprovalKind, ApprovalPolicy, ApprovalRequest, ApprovalStatus, CallFingerprint, Confirm,
};
use valet_core::audit::{AuditEvent, Outcome};
use valet_core::config::Scope;
use valet_core::grant::{Grant, GrantStatus};
use valet_core::policy::{GrantTerms, TokenRequest};
use valet_core::{UnixTime, random};
use valet_store::StoreError;

use crate::error::ApiError;
use crate::valet::{Caller, Valet};

const MAX_CAS_ATTEMPTS: usize = 8;

impl Valet {
    /// Records a pending grant and its approval request instead of issuing a token.
    pub(crate) async fn request_token_approval(
        &self,
        caller: &Caller,
        request: &TokenRequest,
        terms: GrantTerms,
        scope: &Scope,
        policy: &ApprovalPolicy,
    ) -> Result<(Grant, ApprovalRequest), ApiError> {
        let now = self.clock.now();
        let expires_at = approval::expiry(policy, now);
        let grant_id = random::grant_id(self.clock.now_millis())
            .map_err(|error| ApiError::Key(error.into()))?;
        let confirm = policy
            .confirm
            .as_ref()
            .map(|confirm| confirm_value(confirm, &scope.environment, &terms.params));
        let mut grant = terms.clone().into_grant(
            grant_id.clone(),
            &caller.principal.name,
            request,
            self.keys.ring().current().kid(),
            now,
        );
        grant.status = GrantStatus::Pending;
        grant.expires_at = expires_at;
        grant.max_expires_at = expires_at;
        let pending = ApprovalRequest {
            id: approval_id(self)?,
            kind: ApprovalKind::Token,
            grant_id,
            requester: caller.principal.name.clone(),
            scope: scope.name.clone(),
            environment: scope.environment.clone(),
            task_id: request.task_id.clone(),
            purpose: request.purpose.clone(),
            params: terms.params.clone(),
            ttl_seconds: terms.ttl.as_secs(),
            call: None,
            created_at: now,
            expires_at,
            required: policy.count,
            approvers: policy.approvers.iter().map(ToString::to_string).collect(),
            confirm,
            approvals: Vec::new(),
            status: ApprovalStatus::Pending,
            status_reason: None,
            updated_at: now,
        };
        self.store.create_grant(&grant).await?;
        self.store.create_approval(&pending).await?;
        let event = AuditEvent::new("approval.request", Outcome::Allowed)
            .with_grant(&grant)
            .with("approval_id", &pending.id)
            .with("kind", "token")
            .with("summary", pending.summary());
        self.record(caller, event).await?;
        self.notifier.announce(&pending);
        Ok((grant, pending))
    }

    /// Records a pending approval for one exact gateway call.
    pub(crate) async fn request_call_approval(
        &self,
        grant: &Grant,
        policy: &ApprovalPolicy,
        call: CallFingerprint,
        request_id: &str,
    ) -> Result<ApprovalRequest, ApiError> {
        let now = self.clock.now();
        let environment = self
            .config()
            .scopes
            .get(&grant.scope)
            .map(|scope| scope.environment.clone())
            .unwrap_or_else(|| grant.environment.clone());
        let pending = ApprovalRequest {
            id: approval_id(self)?,
            kind: ApprovalKind::Call,
            grant_id: grant.id.clone(),
            requester: grant.principal.clone(),
            scope: grant.scope.clone(),
            environment: environment.clone(),
            task_id: grant.task_id.clone(),
            purpose: grant.purpose.clone(),
            params: grant.params.clone(),
            ttl_seconds: 0,
            call: Some(call),
            created_at: now,
            expires_at: approval::expiry(policy, now),
            required: policy.count,
            approvers: policy.approvers.iter().map(ToString::to_string).collect(),
            confirm: policy
                .confirm
                .as_ref()
                .map(|confirm| confirm_value(confirm, &environment, &grant.params)),
            approvals: Vec::new(),
            status: ApprovalStatus::Pending,
            status_reason: None,
            updated_at: now,
        };
        self.store.create_approval(&pending).await?;
        let event = AuditEvent::new("approval.request", Outcome::Allowed)
            .with_grant(grant)
            .with("principal", &grant.principal)
            .with("request_id", request_id)
            .with("approval_id", &pending.id)
            .with("kind", "call")
            .with("summary", pending.summary());
        self.audit.record(event).await?;
        self.notifier.announce(&pending);
        Ok(pending)
    }

    /// Uses an approved call approval for `call`, once.
    pub(crate) async fn consume_call_approval(
        &self,
        id: &str,
        grant: &Grant,
        call: &CallFingerprint,
        request_id: &str,
    ) -> Result<ApprovalRequest, ApiError> {
        let mut current = self.fetch_approval(id).await?;
        for _ in 0..MAX_CAS_ATTEMPTS {
            let now = self.clock.now();
            let used = current.consumed_by(&grant.id, call, now);
            let used = match used {
                Ok(used) => used,
                Err(error) => {
                    let event = AuditEvent::new("approval.use", Outcome::Denied)
                        .with_grant(grant)
                        .with("principal", &grant.principal)
                        .with("request_id", request_id)
                        .with("approval_id", id)
                        .with("reason", error.to_string());
                    self.audit.record(event).await?;
                    return Err(error.into());
                }
            };
            match self.store.update_approval(&current, &used).await {
                Ok(()) => {
                    let event = AuditEvent::new("approval.use", Outcome::Allowed)
                        .with_grant(grant)
                        .with("principal", &grant.principal)
                        .with("request_id", request_id)
                        .with("approval_id", id);
                    self.audit.record(event).await?;
                    return Ok(used);
                }
                Err(StoreError::Conflict { .. }) => current = self.fetch_approval(id).await?,
                Err(error) => return Err(error.into()),
            }
        }
        Err(StoreError::Conflict { id: id.to_string() }.into())
    }

    /// Approves as the caller; when enough have approved a token request, the grant turns active.
    pub async fn approve(
        &self,
        caller: &Caller,
        id: &str,
        confirmation: Option<&str>,
        reason: &str,
    ) -> Result<ApprovalRequest, ApiError> {
        self.decide(
            caller,
            id,
            |pending, now| pending.approved_by(&caller.principal, confirmation, reason, now),
            "approval.approve",
        )
        .await
    }

    /// Denies as the caller, with a reason; a token request's grant is denied with it.
    pub async fn deny_approval(
        &self,
        caller: &Caller,
        id: &str,
        reason: &str,
    ) -> Result<ApprovalRequest, ApiError> {
        self.decide(
            caller,
            id,
            |pending, now| pending.denied_by(&caller.principal, reason, now),
            "approval.deny",
        )
        .await
    }

    async fn decide(
        &self,
        caller: &Caller,
        id: &str,
        decide: impl Fn(
            &ApprovalRequest,
            UnixTime,
        ) -> Result<ApprovalRequest, valet_core::approval::ApprovalError>,
        action: &str,
    ) -> Result<ApprovalRequest, ApiError> {
        let mut current = self.fetch_approval(id).await?;
        for _ in 0..MAX_CAS_ATTEMPTS {
            let now = self.clock.now();
            let decided = match decide(&current, now) {
                Ok(decided) => decided,
                Err(error) => {
                    let event = AuditEvent::new(action, Outcome::Denied)
                        .with("approval_id", id)
                        .with("reason", error.to_string());
                    self.record(caller, event).await?;
                    return Err(error.into());
                }
            };
            match self.store.update_approval(&current, &decided).await {
                Ok(()) => {
                    let event = AuditEvent::new(action, Outcome::Allowed)
                        .with("approval_id", id)
                        .with("grant_id", &decided.grant_id)
                        .with("status", decided.status.to_string())
                        .with(
                            "reason",
                            decided
                                .approvals
                                .last()
                                .map(|decision| decision.reason.clone())
                                .unwrap_or_default(),
                        )
                        .with("summary", decided.summary());
                    self.record(caller, event).await?;
                    if decided.kind == ApprovalKind::Token {
                        self.settle_token_grant(&decided).await?;
                    }
                    return Ok(decided);
                }
                Err(StoreError::Conflict { .. }) => current = self.fetch_approval(id).await?,
                Err(error) => return Err(error.into()),
            }
        }
        Err(StoreError::Conflict { id: id.to_string() }.into())
    }

    /// Moves a token request's pending grant to active (approved) or denied (denied, timed out).
    async fn settle_token_grant(&self, decided: &ApprovalRequest) -> Result<(), ApiError> {
        let now = self.clock.now();
        let Some(grant) = self.store.get_grant(&decided.grant_id).await? else {
            return Ok(());
        };
        if grant.status != GrantStatus::Pending {
            return Ok(());
        }
        let next = match decided.status {
            ApprovalStatus::Approved => {
                let config = self.config();
                let scope = config.scopes.get(&grant.scope);
                let ttl = match decided.ttl_seconds {
                    0 => scope
                        .map(|scope| scope.default_ttl)
                        .unwrap_or(Duration::from_secs(60)),
                    seconds => Duration::from_secs(seconds),
                };
                let max_lifetime = scope
                    .map(|scope| scope.max_ttl.min(config.server.max_ttl))
                    .unwrap_or(ttl);
                grant.activated(ttl, max_lifetime, self.keys.ring().current().kid(), now)?
            }
            ApprovalStatus::Denied | ApprovalStatus::Expired => {
                grant.denied(decided.status_reason.as_deref().unwrap_or("denied"), now)
            }
            _ => return Ok(()),
        };
        self.store.update_grant(&grant, &next).await?;
        Ok(())
    }

    /// Times out pending requests past their expiry (timeout means denied). Called by the sweeper.
    pub async fn expire_approvals(&self) -> Result<usize, ApiError> {
        let now = self.clock.now();
        let mut n_expired = 0;
        for pending in self.store.list_approvals(true).await? {
            let Some(expired) = pending.timed_out(now) else {
                continue;
            };
            match self.store.update_approval(&pending, &expired).await {
                Ok(()) => {
                    let event = AuditEvent::new("approval.timeout", Outcome::Denied)
                        .with("approval_id", &expired.id)
                        .with("grant_id", &expired.grant_id)
                        .with("principal", "valetd")
                        .with("reason", expired.status_reason.clone().unwrap_or_default())
                        .with("summary", expired.summary());
                    self.audit.record(event).await?;
                    if expired.kind == ApprovalKind::Token {
                        self.settle_token_grant(&expired).await?;
                    }
                    n_expired += 1;
                }
                Err(StoreError::Conflict { .. }) => {}
                Err(error) => return Err(error.into()),
            }
        }
        Ok(n_expired)
    }

    pub(crate) async fn fetch_approval(&self, id: &str) -> Result<ApprovalRequest, ApiError> {
        if id.is_empty() || id.len() > 64 {
            return Err(ApiError::InvalidField {
                field: "id",
                problem: "not an approval id valetd returned".into(),
            });
        }
        self.store
            .get_approval(id)
            .await?
            .ok_or_else(|| ApiError::Store(StoreError::ApprovalNotFound { id: id.to_string() }))
    }
}

fn approval_id(valet: &Valet) -> Result<String, ApiError> {
    random::grant_id(valet.clock.now_millis())
        .map(|id| format!("ap_{id}"))
        .map_err(|error| ApiError::Key(error.into()))
}

fn confirm_value(
    confirm: &Confirm,
    environment: &str,
    params: &std::collections::BTreeMap<String, String>,
) -> (String, String) {
    match confirm {
        Confirm::Environment => ("environment".to_string(), environment.to_string()),
        Confirm::Param(name) => (name.clone(), params.get(name).cloned().unwrap_or_default()),
    }
}

/// Announces new pending requests to the configured webhook: a JSON POST each, retried with
/// backoff on a task of its own so the request path never waits; failures are audited.
pub struct Notifier {
    sender: tokio::sync::mpsc::UnboundedSender<ApprovalRequest>,
}

impl Notifier {
    pub fn start(valet: std::sync::Weak<Valet>) -> Notifier {
        let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel::<ApprovalRequest>();
        tokio::spawn(async move {
            while let Some(pending) = receiver.recv().await {
                let Some(valet) = valet.upgrade() else { return };
                let Some(url) = valet.config().approvals_webhook.clone() else {
                    continue;
                };
                tokio::spawn(deliver(valet, url, pending));
            }
        });
        Notifier { sender }
    }

    pub fn announce(&self, pending: &ApprovalRequest) {
        let _ = self.sender.send(pending.clone());
    }
}

const WEBHOOK_ATTEMPTS: u32 = 5;

async fn deliver(valet: Arc<Valet>, url: String, pending: ApprovalRequest) {
    let body = serde_json::json!({
        "event": "approval.pending",
        "approval": crate::convert::approval_json(&pending),
    })
    .to_string();
    let mut delay = Duration::from_millis(500);
    for attempt in 1..=WEBHOOK_ATTEMPTS {
        let outcome = crate::webhook::post_json(&url, &body).await;
        let event = AuditEvent::new(
            "approval.webhook",
            if outcome.is_ok() {
                Outcome::Allowed
            } else {
                Outcome::Failed
            },
        )
        .with("approval_id", &pending.id)
        .with("principal", "valetd")
        .with("url", &url)
        .with_value("attempt", serde_json::Value::from(attempt));
        let event = match &outcome {
            Ok(status) => event.with("status", status.to_string()),
            Err(error) => event.with("reason", error.clone()),
        };
        if let Err(error) = valet.audit.record(event).await {
            tracing::error!(%error, "cannot audit a webhook delivery");
        }
        if outcome.is_ok() {
            return;
        }
        tokio::time::sleep(delay).await;
        delay *= 2;
    }
    tracing::error!(
        approval_id = pending.id,
        url,
        "the approvals webhook failed {WEBHOOK_ATTEMPTS} times; giving up"
    );
}
