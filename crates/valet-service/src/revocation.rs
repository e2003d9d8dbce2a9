//! Revocation: one grant, every grant of a task, or every grant of a principal, scope or
//! environment (the panic button). A revocation is durable and in force before it is answered;
//! for an aws-sts grant it is then written at AWS, and what that means is reported.

use valet_core::audit::{AuditAction, AuditEvent, Outcome};
use valet_core::config::Role;
use valet_core::grant::{Grant, GrantStatus};
use valet_core::policy;
use valet_core::{GrantId, TaskId};
use valet_store::GrantFilter;

use valet_core::approval::ApprovalRequest;

use crate::compare_and_swap::{Decision, Swapped, compare_and_swap};
use crate::{Attribution, Caller, ServiceError, Valet, context};

/// What an operator types in the console to confirm revoking every live grant of a target.
pub const REVOKE_ALL_CONFIRMATION: &str = "revoke all";

/// Grants read per page while revoking a whole target.
const REVOKE_PAGE: usize = 500;

impl Valet {
    /// Revokes one grant. Revoking a grant that is no longer active changes nothing in Valet;
    /// for a revoked grant of an aws-sts scope it writes the deny at AWS again. Returns the grant
    /// and what the revocation means outside Valet, when that needs saying.
    pub async fn revoke_grant(
        &self,
        caller: &Caller,
        grant_id: &str,
        reason: &str,
    ) -> Result<(Grant, Option<String>), ServiceError> {
        let mut context = context(AuditAction::TokenRevoke);
        let outcome = async {
            let grant_id = GrantId::parse(grant_id)?;
            policy::check_text("reason", reason, policy::limits::MAX_REASON_BYTES, false)?;
            let grant = self
                .grant_for_action(caller, &grant_id, &mut context)
                .await?;
            self.revoke(
                caller,
                &caller.principal.name,
                grant,
                reason_or_default(reason),
                "token.revoke",
            )
            .await
        }
        .await;
        // A failure at AWS was recorded where it happened (aws.revoke, failed); the revocation
        // in Valet stands and is not a refusal.
        let (grant, at_aws) = self.answer(caller, context, outcome).await?;
        Ok((grant, at_aws?))
    }

    /// Revokes every active grant of a task the caller may act on.
    pub async fn revoke_task(
        &self,
        caller: &Caller,
        task_id: &str,
        reason: &str,
    ) -> Result<Vec<Grant>, ServiceError> {
        let context = context(AuditAction::TokenRevoke)
            .with("task_id", crate::tokens::bounded(task_id, 128))
            .with("via", "task.revoke");
        let outcome = async {
            let task_id = TaskId::parse(task_id)?;
            policy::check_text("reason", reason, policy::limits::MAX_REASON_BYTES, false)?;
            let mut revoked = Vec::new();
            for grant in self.store.task_grants(task_id.as_str()).await? {
                // Pending grants too (a later approval must find nothing to activate), and ended
                // ones whose STS sessions are still valid (their deny must land at AWS).
                let now = self.clock.now();
                let sessions_live = grant
                    .aws
                    .as_ref()
                    .is_some_and(|issue| issue.sessions_until > now);
                if policy::may_act_on(&caller.principal, &grant).is_err()
                    || !(grant.is_live(now) || sessions_live)
                {
                    continue;
                }
                revoked.push(
                    self.revoke(
                        caller,
                        &caller.principal.name,
                        grant,
                        reason_or_default(reason),
                        "task.revoke",
                    )
                    .await?
                    .0,
                );
            }
            Ok(revoked)
        }
        .await;
        self.answer(caller, context, outcome).await
    }

    /// Revokes every active grant matching `filter`: the panic button. Operators only.
    pub async fn revoke_all(
        &self,
        caller: &Caller,
        filter: Option<GrantFilter>,
        reason: &str,
    ) -> Result<Vec<Grant>, ServiceError> {
        let context = context(AuditAction::TokenRevoke).with("via", "revoke_all");
        let outcome = self.revoke_all_decided(caller, filter, reason).await;
        self.answer(caller, context, outcome).await
    }

    /// Revokes every live grant of a target named as the console's form names it (`target`:
    /// environment, principal or scope; `name`), once the operator typed `revoke all` to
    /// confirm. A missing confirmation or an unknown target is refused and recorded like any
    /// other refusal.
    pub async fn revoke_all_confirmed(
        &self,
        caller: &Caller,
        (target, name): (&str, Option<String>),
        confirmation: &str,
        reason: &str,
    ) -> Result<Vec<Grant>, ServiceError> {
        let context = context(AuditAction::TokenRevoke).with("via", "revoke_all");
        let outcome = async {
            if confirmation.trim() != REVOKE_ALL_CONFIRMATION {
                return Err(ServiceError::InvalidField {
                    field: "confirm",
                    problem: format!(
                        "type `{REVOKE_ALL_CONFIRMATION}` to confirm revoking every live grant of the target"
                    ),
                });
            }
            let filter = match (target, name) {
                (_, None) => None,
                ("environment", Some(name)) => Some(GrantFilter {
                    environment: Some(name),
                    ..GrantFilter::default()
                }),
                ("principal", Some(name)) => Some(GrantFilter {
                    principal: Some(name),
                    ..GrantFilter::default()
                }),
                ("scope", Some(name)) => Some(GrantFilter {
                    scope: Some(name),
                    ..GrantFilter::default()
                }),
                (other, Some(_)) => {
                    return Err(ServiceError::InvalidField {
                        field: "target",
                        problem: format!(
                            "{:?} is not a target; one of environment, principal, scope",
                            crate::tokens::bounded(other, 64)
                        ),
                    });
                }
            };
            self.revoke_all_decided(caller, filter, reason).await
        }
        .await;
        self.answer(caller, context, outcome).await
    }

    async fn revoke_all_decided(
        &self,
        caller: &Caller,
        filter: Option<GrantFilter>,
        reason: &str,
    ) -> Result<Vec<Grant>, ServiceError> {
        {
            policy::require_role(
                &caller.principal,
                Role::Operator,
                "revoking all grants of a target",
            )?;
            let filter = filter.ok_or(policy::RequestError::FieldMissing {
                field: "target (one of principal, scope, environment)",
            })?;
            policy::check_reason(reason)?;
            // Every live grant, pending ones too.
            let filter = GrantFilter {
                status: None,
                ..filter
            };
            let mut revoked = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let page = self
                    .store
                    .list_grants(&filter, self.clock.now(), after.as_deref(), REVOKE_PAGE)
                    .await?;
                for grant in page.grants {
                    if !grant.is_live(self.clock.now()) {
                        continue;
                    }
                    revoked.push(
                        self.revoke(caller, &caller.principal.name, grant, reason, "revoke_all")
                            .await?
                            .0,
                    );
                }
                match page.next_after {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
            Ok(revoked)
        }
    }

    /// Revokes `current` in Valet (the outer result), withdraws the approval requests that could
    /// still release anything for it, then revokes at AWS for an aws-sts scope (the inner
    /// result: a failure there is audited and reported, and never stops a batch revocation).
    /// `by` names who revoked, in the grant; `who` is whom the records are attributed to.
    pub(crate) async fn revoke(
        &self,
        who: &impl Attribution,
        by: &str,
        current: Grant,
        reason: &str,
        via: &str,
    ) -> Result<(Grant, Result<Option<String>, ServiceError>), ServiceError> {
        let swapped = compare_and_swap(self.store.as_ref(), current, |current: &Grant| {
            let now = self.clock.now();
            Ok(match current.revoked(by, reason, now) {
                Ok(revoked) => Decision::Write(revoked, now),
                Err(_) => Decision::Keep(now),
            })
        })
        .await?;
        match swapped {
            Swapped::Written {
                after: revoked,
                extra: now,
            } => {
                let event = AuditEvent::new(AuditAction::TokenRevoke, Outcome::Allowed)
                    .with_grant(&revoked)
                    .with("via", via)
                    .with("reason", reason);
                self.record(who, event).await?;
                self.withdraw_approvals(
                    who,
                    &revoked,
                    &format!("grant {} was revoked by {by}: {reason}", revoked.id),
                )
                .await?;
                let at_aws = self.revoke_at_aws(who, &revoked, now).await?;
                Ok((revoked, at_aws))
            }
            // Revoked already, or ended in Valet while its STS sessions live on: (re)write the
            // deny for as long as they can be valid.
            Swapped::Kept {
                current,
                extra: now,
            } if current.status == GrantStatus::Revoked
                || current
                    .aws
                    .as_ref()
                    .is_some_and(|issue| issue.sessions_until > now) =>
            {
                let at_aws = self.revoke_at_aws(who, &current, now).await?;
                Ok((current, at_aws))
            }
            Swapped::Kept { current, .. } => Ok((current, Ok(None))),
        }
    }

    /// Withdraws every request for `grant` that could still release something.
    async fn withdraw_approvals(
        &self,
        who: &impl Attribution,
        grant: &Grant,
        reason: &str,
    ) -> Result<(), ServiceError> {
        // Only a scope with approvals (for its tokens or for calls) can have requests; a config
        // reload may have removed them since, so a scope no longer configured is read too.
        let config = self.config();
        let may_have_requests = config.scopes.get(&grant.scope).is_none_or(|scope| {
            scope.approval.is_some() || scope.allow.iter().any(|rule| rule.approval.is_some())
        });
        if !may_have_requests {
            return Ok(());
        }
        for pending in self.store.list_approvals(false).await? {
            if pending.grant_id != grant.id {
                continue;
            }
            let swapped =
                compare_and_swap(self.store.as_ref(), pending, |current: &ApprovalRequest| {
                    Ok(match current.withdrawn(reason, self.clock.now()) {
                        Some(withdrawn) => Decision::Write(withdrawn, ()),
                        None => Decision::Keep(()),
                    })
                })
                .await?;
            if let Swapped::Written { after, .. } = swapped {
                let event = AuditEvent::new(AuditAction::ApprovalWithdraw, Outcome::Allowed)
                    .with_grant(grant)
                    .with("approval_id", &after.id)
                    .with("reason", reason)
                    .with("summary", after.summary());
                self.record(who, event).await?;
            }
        }
        Ok(())
    }

    async fn revoke_at_aws(
        &self,
        caller: &impl Attribution,
        revoked: &Grant,
        now: valet_core::UnixTime,
    ) -> Result<Result<Option<String>, ServiceError>, ServiceError> {
        match self.deny_aws(revoked, now).await {
            Ok(None) => Ok(Ok(None)),
            Ok(Some((notice, event))) => {
                self.record(caller, event).await?;
                Ok(Ok(Some(notice)))
            }
            Err(error) => {
                tracing::error!(grant_id = %revoked.id, error = %self.redact(&error.to_string()), "the revocation could not be written at AWS");
                let failed = AuditEvent::new(AuditAction::AwsRevoke, Outcome::Failed)
                    .with_grant(revoked)
                    .with("reason", error.to_string());
                self.record(caller, failed).await?;
                Ok(Err(error))
            }
        }
    }
}

fn reason_or_default(reason: &str) -> &str {
    if reason.is_empty() {
        "no reason given"
    } else {
        reason
    }
}
