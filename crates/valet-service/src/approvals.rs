//! Approvals: pending token requests for sensitive scopes, per-call approvals for the gateway,
//! decisions by people, timeouts, listing, and the webhook that announces new requests.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use valet_core::approval::{
    ApprovalKind, ApprovalPolicy, ApprovalRequest, ApprovalStatus, CallFingerprint,
};
use valet_core::audit::{AuditAction, AuditEvent, Outcome};
use valet_core::grant::{Grant, GrantStatus};
use valet_core::policy::{self, GrantTerms, TokenRequest};
use valet_core::{ApprovalId, GrantId};

use crate::compare_and_swap::{Decision, Swapped, compare_and_swap};
use crate::{Caller, ServiceError, Valet, context};

impl Valet {
    /// Records a pending grant and its approval request instead of issuing a token.
    pub(crate) async fn request_token_approval(
        &self,
        caller: &Caller,
        request: &TokenRequest,
        terms: GrantTerms,
        approval: &ApprovalPolicy,
    ) -> Result<(Grant, ApprovalRequest), ServiceError> {
        let now = self.clock.now();
        let expires_at = valet_core::approval::expiry(approval, now);
        let grant_id = GrantId::generate(self.clock.now_millis())?;
        let ttl_seconds = terms.ttl.as_secs();
        let mut grant = terms.into_grant(
            grant_id.into_string(),
            &caller.principal.name,
            request,
            self.keys.ring()?.current().kid(),
            now,
        );
        grant.authenticated_by = Some(caller.authentication.clone());
        grant.status = GrantStatus::Pending;
        grant.expires_at = expires_at;
        grant.max_expires_at = expires_at;
        let pending = ApprovalRequest::for_token(
            ApprovalId::generate(self.clock.now_millis())?,
            &grant,
            approval,
            ttl_seconds,
            now,
        );
        self.store.create_grant(&grant).await?;
        self.store.create_approval(&pending).await?;
        let event = AuditEvent::new(AuditAction::ApprovalRequest, Outcome::Allowed)
            .with_grant(&grant)
            .with("approval_id", &pending.id)
            .with("kind", "token")
            .with("summary", pending.summary());
        self.record(caller, event).await?;
        self.notifier.announce(&pending);
        Ok((grant, pending))
    }

    /// Records a pending approval for one exact gateway call by `holder` (the grant's holder).
    pub(crate) async fn request_call_approval(
        &self,
        holder: &impl crate::Attribution,
        grant: &Grant,
        approval: &ApprovalPolicy,
        call: CallFingerprint,
    ) -> Result<ApprovalRequest, ServiceError> {
        let now = self.clock.now();
        let environment = self
            .config()
            .scopes
            .get(&grant.scope)
            .map(|scope| scope.environment.clone())
            .unwrap_or_else(|| grant.environment.clone());
        let pending = ApprovalRequest::for_call(
            ApprovalId::generate(self.clock.now_millis())?,
            grant,
            &environment,
            approval,
            call,
            now,
        );
        self.store.create_approval(&pending).await?;
        let event = AuditEvent::new(AuditAction::ApprovalRequest, Outcome::Allowed)
            .with_grant(grant)
            .with("approval_id", &pending.id)
            .with("kind", "call")
            .with("summary", pending.summary());
        self.record(holder, event).await?;
        self.notifier.announce(&pending);
        Ok(pending)
    }

    /// Uses an approved call approval for `call`, once. A refusal is the caller's to record (the
    /// gateway call it belongs to is refused with it).
    pub(crate) async fn consume_call_approval(
        &self,
        holder: &impl crate::Attribution,
        id: &str,
        grant: &Grant,
        call: &CallFingerprint,
    ) -> Result<ApprovalRequest, ServiceError> {
        let id = ApprovalId::parse(id)?;
        let current = self.fetch_approval(&id).await?;
        let swapped =
            compare_and_swap(self.store.as_ref(), current, |current: &ApprovalRequest| {
                let used = current.consumed_by(&grant.id, call, self.clock.now())?;
                Ok(Decision::Write(used, ()))
            })
            .await?;
        let Swapped::Written { after: used, .. } = swapped else {
            return Err(ServiceError::Internal(
                "using an approval decided to write nothing".into(),
            ));
        };
        let event = AuditEvent::new(AuditAction::ApprovalUse, Outcome::Allowed)
            .with_grant(grant)
            .with("approval_id", id.as_str());
        self.record(holder, event).await?;
        Ok(used)
    }

    /// Approves as the caller; when enough have approved a token request, the grant turns active.
    pub async fn approve(
        &self,
        caller: &Caller,
        id: &str,
        confirmation: Option<&str>,
        reason: &str,
    ) -> Result<ApprovalRequest, ServiceError> {
        self.decide(
            caller,
            id,
            reason,
            AuditAction::ApprovalApprove,
            |pending, now| pending.approved_by(&caller.principal, confirmation, reason, now),
        )
        .await
    }

    /// Denies as the caller, with a reason; a token request's grant is denied with it.
    pub async fn deny_approval(
        &self,
        caller: &Caller,
        id: &str,
        reason: &str,
    ) -> Result<ApprovalRequest, ServiceError> {
        self.decide(
            caller,
            id,
            reason,
            AuditAction::ApprovalDeny,
            |pending, now| pending.denied_by(&caller.principal, reason, now),
        )
        .await
    }

    async fn decide(
        &self,
        caller: &Caller,
        id: &str,
        reason: &str,
        action: AuditAction,
        decide: impl Fn(
            &ApprovalRequest,
            valet_core::UnixTime,
        ) -> Result<ApprovalRequest, valet_core::approval::ApprovalError>
        + Sync,
    ) -> Result<ApprovalRequest, ServiceError> {
        let mut context = context(action);
        let outcome = async {
            policy::check_text("reason", reason, policy::limits::MAX_REASON_BYTES, false)?;
            let id = ApprovalId::parse(id)?;
            context.set("approval_id", id.as_str());
            let current = self.fetch_approval(&id).await?;
            // Nothing is approved for a grant that ended (revoked while it waited, say): its
            // requests were withdrawn, and the refusal says why.
            if let Some(grant) = self.store.get_grant(&current.grant_id).await? {
                current.check_grant_live(&grant, self.clock.now())?;
            }
            let swapped =
                compare_and_swap(self.store.as_ref(), current, |current: &ApprovalRequest| {
                    Ok(Decision::Write(decide(current, self.clock.now())?, ()))
                })
                .await?;
            let Swapped::Written { after: decided, .. } = swapped else {
                return Err(ServiceError::Internal(
                    "a decision decided to write nothing".into(),
                ));
            };
            let event = AuditEvent::new(action, Outcome::Allowed)
                .with("approval_id", id.as_str())
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
            Ok(decided)
        }
        .await;
        self.answer(caller, context, outcome).await
    }

    /// Moves a token request's pending grant to active (approved) or denied (denied, timed out).
    async fn settle_token_grant(&self, decided: &ApprovalRequest) -> Result<(), ServiceError> {
        let Some(grant) = self.store.get_grant(&decided.grant_id).await? else {
            return Ok(());
        };
        compare_and_swap(self.store.as_ref(), grant, |grant: &Grant| {
            let now = self.clock.now();
            if grant.status != GrantStatus::Pending {
                return Ok(Decision::Keep(()));
            }
            let next = match decided.status {
                ApprovalStatus::Approved => {
                    match policy::settlement_lifetime(
                        &self.config(),
                        &grant.scope,
                        decided.ttl_seconds,
                    ) {
                        Ok((ttl, max_lifetime)) => grant.activated(
                            ttl,
                            max_lifetime,
                            self.keys.ring()?.current().kid(),
                            now,
                        )?,
                        Err(error) => grant.denied(
                            &format!("approved, but it cannot be granted any more: {error}"),
                            now,
                        ),
                    }
                }
                ApprovalStatus::Denied | ApprovalStatus::Expired => {
                    grant.denied(decided.status_reason.as_deref().unwrap_or("denied"), now)
                }
                _ => return Ok(Decision::Keep(())),
            };
            Ok(Decision::Write(next, ()))
        })
        .await?;
        Ok(())
    }

    /// Times out pending requests past their expiry (timeout means denied). Called every second
    /// by the process running the service.
    pub async fn expire_approvals(&self) -> Result<usize, ServiceError> {
        let now = self.clock.now();
        let mut n_expired = 0;
        for pending in self.store.list_approvals(true).await? {
            let Some(expired) = pending.timed_out(now) else {
                continue;
            };
            match self.store.update_approval(&pending, &expired).await {
                Ok(()) => {
                    let event = AuditEvent::new(AuditAction::ApprovalTimeout, Outcome::Denied)
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
                // Decided (or timed out by another replica) meanwhile: theirs stands.
                Err(valet_store::StoreError::Conflict { .. }) => {}
                Err(error) => return Err(error.into()),
            }
        }
        Ok(n_expired)
    }

    pub(crate) async fn fetch_approval(
        &self,
        id: &ApprovalId,
    ) -> Result<ApprovalRequest, ServiceError> {
        self.store
            .get_approval(id.as_str())
            .await?
            .ok_or_else(|| ServiceError::ApprovalNotFound { id: id.to_string() })
    }
}

/// Announces new pending requests to the configured webhook: a JSON POST each, retried with
/// backoff on a task of its own so the request path never waits; every attempt is audited.
pub(crate) struct Notifier {
    sender: tokio::sync::mpsc::UnboundedSender<ApprovalRequest>,
}

impl Notifier {
    pub(crate) fn start(valet: std::sync::Weak<Valet>) -> Notifier {
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

    pub(crate) fn announce(&self, pending: &ApprovalRequest) {
        let _ = self.sender.send(pending.clone());
    }
}

const WEBHOOK_ATTEMPTS: u32 = 5;
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);

async fn deliver(valet: Arc<Valet>, url: String, pending: ApprovalRequest) {
    let mut body = serde_json::json!({
        "event": "approval.pending",
        "approval": approval_json(&pending),
    });
    // Where an approver decides it in the web console, when the console is on.
    if let Some(base) = valet.console_url() {
        body["console_url"] = serde_json::Value::String(format!("{base}/approvals/{}", pending.id));
    }
    let body = body.to_string();
    let mut delay = Duration::from_millis(500);
    for attempt in 1..=WEBHOOK_ATTEMPTS {
        let outcome = post_json(valet.outbound.as_ref(), &url, &body).await;
        let event = AuditEvent::new(
            AuditAction::ApprovalWebhook,
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

/// Posts `body` to `url`; `Ok(status)` for a 2xx answer, otherwise what went wrong.
async fn post_json(outbound: &dyn crate::Outbound, url: &str, body: &str) -> Result<u16, String> {
    let request = http::Request::post(url)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::USER_AGENT, "valetd")
        .body(Bytes::from(body.to_string()))
        .map_err(|error| error.to_string())?;
    let answer = outbound
        .send(request, WEBHOOK_TIMEOUT, 64 * 1024)
        .await
        .map_err(|error| format!("the webhook could not be reached: {error}"))?;
    if (200..300).contains(&answer.status) {
        Ok(answer.status)
    } else {
        Err(format!("the webhook answered {}", answer.status))
    }
}

/// The approval as the webhook receives it: what is asked, by whom, and until when. Text an agent
/// wrote is escaped as every place an operator reads it shows it (a chat tool renders it).
pub fn approval_json(approval: &ApprovalRequest) -> serde_json::Value {
    let for_people = valet_core::approval::escape_for_people;
    let params: std::collections::BTreeMap<&String, String> = approval
        .params
        .iter()
        .map(|(name, value)| (name, for_people(value)))
        .collect();
    serde_json::json!({
        "id": approval.id,
        "kind": match approval.kind { ApprovalKind::Token => "token", ApprovalKind::Call => "call" },
        "summary": for_people(&approval.summary()),
        "rendered": approval.render(),
        "grant_id": approval.grant_id,
        "requester": approval.requester,
        "scope": approval.scope,
        "environment": approval.environment,
        "task_id": approval.task_id,
        "purpose": for_people(&approval.purpose),
        "params": params,
        "call": approval.call,
        "created_at": valet_core::clock::format_time(approval.created_at),
        "expires_at": valet_core::clock::format_time(approval.expires_at),
        "required": approval.required,
        "approvers": approval.approvers,
        "confirm": approval.confirm.as_ref().map(|(what, _)| what),
    })
}
