//! Revocation: one grant, every grant of a task, or every grant of a principal, scope or
//! environment (the panic button). A revocation is durable and in force before it is answered;
//! for an aws-sts grant it is then written at AWS, and what that means is reported.

use valet_core::audit::{AuditAction, AuditEvent, Outcome};
use valet_core::config::Role;
use valet_core::grant::{Grant, GrantStatus};
use valet_core::policy;
use valet_core::{GrantId, TaskId};
use valet_store::GrantFilter;

use crate::compare_and_swap::{Decision, Swapped, compare_and_swap};
use crate::{Caller, ServiceError, Valet, context};

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
            self.revoke(caller, grant, reason_or_default(reason), "token.revoke")
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
                if policy::may_act_on(&caller.principal, &grant).is_err()
                    || grant.status_at(self.clock.now()) != GrantStatus::Active
                {
                    continue;
                }
                revoked.push(
                    self.revoke(caller, grant, reason_or_default(reason), "task.revoke")
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
        let outcome = async {
            policy::require_role(
                &caller.principal,
                Role::Operator,
                "revoking all grants of a target",
            )?;
            let filter = filter.ok_or(policy::RequestError::FieldMissing {
                field: "target (one of principal, scope, environment)",
            })?;
            policy::check_reason(reason)?;
            let filter = GrantFilter {
                status: Some(GrantStatus::Active),
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
                    revoked.push(self.revoke(caller, grant, reason, "revoke_all").await?.0);
                }
                match page.next_after {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
            Ok(revoked)
        }
        .await;
        self.answer(caller, context, outcome).await
    }

    /// Revokes `current` in Valet (the outer result), then at AWS for an aws-sts scope (the
    /// inner one: a failure there is audited and reported, and never stops a batch revocation).
    async fn revoke(
        &self,
        caller: &Caller,
        current: Grant,
        reason: &str,
        via: &str,
    ) -> Result<(Grant, Result<Option<String>, ServiceError>), ServiceError> {
        let swapped = compare_and_swap(self.store.as_ref(), current, |current: &Grant| {
            let now = self.clock.now();
            Ok(match current.revoked(&caller.principal.name, reason, now) {
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
                self.record(caller, event).await?;
                let at_aws = self.revoke_at_aws(caller, &revoked, now).await?;
                Ok((revoked, at_aws))
            }
            Swapped::Kept {
                current,
                extra: now,
            } if current.status == GrantStatus::Revoked => {
                let at_aws = self.revoke_at_aws(caller, &current, now).await?;
                Ok((current, at_aws))
            }
            Swapped::Kept { current, .. } => Ok((current, Ok(None))),
        }
    }

    async fn revoke_at_aws(
        &self,
        caller: &Caller,
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
