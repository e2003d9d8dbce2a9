//! Waiting for a pending grant: the requester follows its grant (and its approval request) until
//! it is decided, and receives the token once it is approved. Only the requester ever does.

use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;
use valet_core::approval::{ApprovalRequest, ApprovalStatus};
use valet_core::audit::AuditAction;
use valet_core::grant::{Grant, GrantStatus};
use valet_core::policy;
use valet_core::token::Token;
use valet_core::{ApprovalId, GrantId};
use valet_store::StoreChange;

use crate::aws_grants::AwsGrant;
use crate::in_flight::Over;
use crate::listing::{ServiceStream, stream_from_task};
use crate::{Caller, ServiceError, Valet, context};

/// Longest wait one call may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);
/// The wait when none is asked for.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(60);

/// `WaitForGrant` streams open at once for one grant, and for one principal's grants: each
/// holds a stream, a task and a follower of the store's changes (woken by every change).
pub const MAX_WAITS_PER_GRANT: usize = 8;
pub const MAX_WAITS_PER_PRINCIPAL: usize = 64;

/// The grant as it stands, with its token once it is active.
#[derive(Debug)]
pub struct GrantUpdate {
    pub grant: Grant,
    pub token: Option<Token>,
    pub aws: Option<AwsGrant>,
    pub approval: Option<ApprovalRequest>,
}

impl Valet {
    /// Follows `grant_id` until it leaves `pending` or `timeout_seconds` pass (0: a minute): the
    /// stream yields the grant now, then after each change; an active grant comes with its token.
    pub async fn wait_for_grant(
        self: &std::sync::Arc<Self>,
        caller: &Caller,
        grant_id: &str,
        timeout_seconds: u64,
    ) -> Result<ServiceStream<GrantUpdate>, ServiceError> {
        let mut context = context(AuditAction::TokenWait);
        // Subscribe first, so no change falls between the first read and the wait.
        let changes = self.store.subscribe();
        let outcome = async {
            let timeout = match timeout_seconds {
                0 => DEFAULT_WAIT,
                seconds if seconds <= MAX_WAIT.as_secs() => Duration::from_secs(seconds),
                seconds => {
                    return Err(ServiceError::InvalidField {
                        field: "timeout_seconds",
                        problem: format!("{seconds} is above the maximum {}", MAX_WAIT.as_secs()),
                    });
                }
            };
            let grant_id = GrantId::parse(grant_id)?;
            context.set("grant_id", grant_id.as_str());
            let grant = self.fetch_grant(grant_id.as_str()).await?;
            context.set_grant(&grant);
            policy::may_receive_token(&caller.principal, &grant)?;
            let caps = crate::in_flight::Caps {
                per_grant: MAX_WAITS_PER_GRANT,
                per_principal: MAX_WAITS_PER_PRINCIPAL,
            };
            let place = self
                .waits
                .take_counted(caps, &grant.id, &caller.principal.name)
                .map_err(|over| {
                    let reason = match over {
                        Over::Grant(held) => format!(
                            "{held} waits for this grant are open already (at most {MAX_WAITS_PER_GRANT}); end one, or wait on one of them"
                        ),
                        Over::Principal(held) => format!(
                            "{held} waits of principal {:?} are open already (at most {MAX_WAITS_PER_PRINCIPAL}); end one first",
                            caller.principal.name
                        ),
                    };
                    ServiceError::at_capacity(reason, Duration::from_secs(1))
                })?;
            let approval = self
                .store
                .list_approvals(false)
                .await?
                .into_iter()
                .find(|approval| approval.grant_id == grant.id);
            Ok((timeout, grant, approval, place))
        }
        .await;
        let (timeout, grant, approval, place) = self.answer(caller, context, outcome).await?;
        let valet = self.clone();
        let caller = caller.clone();
        Ok(stream_from_task(move |sender| async move {
            // Held for as long as the wait runs: its reader gone, the task ends and frees it.
            let _place = place;
            follow(valet, caller, changes, timeout, grant, approval, sender).await;
        }))
    }
}

impl Valet {
    /// Waits until approval `id` no longer waits for people (approved, denied, timed out or
    /// gone), following the store's change stream as [`Valet::wait_for_grant`] does: read again,
    /// checked, at each change to it (a change in the stream is what the engine saw; only a
    /// record valetd wrote decides), at a resync, and at its expiry. An MCP call held on the
    /// approval is then authorized again with it, which uses it once or refuses — and records
    /// either.
    pub async fn wait_for_approval(&self, id: &str) -> Result<(), ServiceError> {
        let id = ApprovalId::parse(id).map_err(ServiceError::Request)?;
        // Subscribe first, so no change falls between a read and the wait.
        let mut changes = self.store.subscribe();
        loop {
            let approval = match self.fetch_approval(&id).await {
                Ok(approval) => approval,
                Err(ServiceError::ApprovalNotFound { .. }) => return Ok(()),
                Err(error) => return Err(error),
            };
            let now = self.clock.now();
            if approval.status_at(now) != ApprovalStatus::Pending {
                return Ok(());
            }
            // Its expiry, a moment after: the sweep that times it out writes a change too.
            let expires_in =
                Duration::from_secs(u64::try_from(approval.expires_at - now).unwrap_or(0) + 1);
            let expired = tokio::time::sleep(expires_in);
            tokio::pin!(expired);
            loop {
                tokio::select! {
                    change = changes.recv() => match change {
                        Ok(StoreChange::ApprovalChanged(changed)) if changed.id == approval.id => break,
                        Ok(StoreChange::Resync) | Err(RecvError::Lagged(_)) => break,
                        Ok(_) => {}
                        Err(RecvError::Closed) => {
                            return Err(ServiceError::Internal(
                                "the store's change stream ended".into(),
                            ));
                        }
                    },
                    () = &mut expired => break,
                }
            }
        }
    }
}

async fn follow(
    valet: std::sync::Arc<Valet>,
    caller: Caller,
    mut changes: tokio::sync::broadcast::Receiver<StoreChange>,
    timeout: Duration,
    mut grant: Grant,
    mut approval: Option<ApprovalRequest>,
    sender: tokio::sync::mpsc::Sender<Result<GrantUpdate, ServiceError>>,
) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let now = valet.clock.now();
        let status = grant.status_at(now);
        let done = status != GrantStatus::Pending;
        let (token, aws) = if status == GrantStatus::Active {
            match valet.token_for(&caller, &grant).await {
                Ok((token, aws)) => (Some(token), aws),
                Err(error) => {
                    let mut context = context(AuditAction::TokenWait);
                    context.set_grant(&grant);
                    if let Err(error) = valet.answer::<()>(&caller, context, Err(error)).await {
                        let _ = sender.send(Err(error)).await;
                    }
                    return;
                }
            }
        } else {
            (None, None)
        };
        let update = GrantUpdate {
            grant: grant.clone(),
            token,
            aws,
            approval: approval.clone(),
        };
        if sender.send(Ok(update)).await.is_err() || done {
            return;
        }
        // Wait for the next change to this grant or its approval, or the deadline.
        let expires_in =
            Duration::from_secs(u64::try_from(grant.expires_at - valet.clock.now()).unwrap_or(0));
        let timed_out = tokio::time::Instant::now() + expires_in;
        loop {
            let change = tokio::select! {
                change = changes.recv() => change,
                // The approval's timeout: report the grant as it then stands.
                _ = tokio::time::sleep_until(timed_out) => break,
                _ = tokio::time::sleep_until(deadline) => return,
            };
            match change {
                // Read the grant again, checked: a change in the stream is what the engine saw,
                // and only a record valetd wrote may release a token.
                Ok(StoreChange::GrantUpdated { after, .. }) if after.id == grant.id => {
                    match valet.store.get_grant(&grant.id).await {
                        Ok(Some(current)) => grant = current,
                        Ok(None) => return,
                        Err(error) => {
                            let _ = sender.send(Err(error.into())).await;
                            return;
                        }
                    }
                    break;
                }
                Ok(StoreChange::GrantRevoked(after)) if after.id == grant.id => {
                    if let Ok(Some(current)) = valet.store.get_grant(&grant.id).await {
                        grant = current;
                    }
                    break;
                }
                Ok(StoreChange::ApprovalChanged(changed)) if changed.grant_id == grant.id => {
                    approval = Some(*changed);
                }
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => {
                    if let Ok(Some(current)) = valet.store.get_grant(&grant.id).await {
                        grant = current;
                    }
                    break;
                }
                Err(RecvError::Closed) => return,
            }
        }
    }
}
