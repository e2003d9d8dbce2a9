//! What callers may look at: grants (listed and watched), approval requests, and the audit log's
//! head and tail. Who sees what is valet-core's rule ([`policy::visible_principal`]); a refused
//! look is recorded like every refusal.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use tokio::sync::broadcast::error::RecvError;
use valet_core::ApprovalId;
use valet_core::approval::ApprovalRequest;
use valet_core::audit::{AuditAction, ChainHead};
use valet_core::config::Role;
use valet_core::grant::Grant;
use valet_core::policy;
use valet_store::{GrantFilter, StoreChange};

use crate::audit_sink::WrittenRecord;
use crate::{Caller, ServiceError, Valet, context};

/// A stream of results fed by a task of the service.
pub type ServiceStream<T> = Pin<Box<dyn Stream<Item = Result<T, ServiceError>> + Send + 'static>>;

pub const DEFAULT_PAGE_SIZE: u32 = 100;
pub const MAX_PAGE_SIZE: u32 = 1000;
pub const DEFAULT_TAIL: u32 = 20;
pub const MAX_TAIL: u32 = 1000;

/// One page of grants.
#[derive(Debug, Clone)]
pub struct GrantListing {
    pub grants: Vec<Grant>,
    /// Where the next page starts; `None` on the last page.
    pub next_page_token: Option<String>,
}

/// One page of the approval requests the caller may see.
#[derive(Debug, Clone)]
pub struct ApprovalListing {
    pub approvals: Vec<ApprovalRequest>,
    /// Where the next page starts; `None` on the last page.
    pub next_page_token: Option<String>,
}

/// What happened to a grant, for watchers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantEventKind {
    Issued,
    Renewed,
    Used,
    Revoked,
}

#[derive(Debug, Clone)]
pub struct GrantEvent {
    pub kind: GrantEventKind,
    pub grant: Grant,
}

/// The audit log's last records, then (when following) every record written after them.
pub type AuditTail = ServiceStream<WrittenRecord>;

impl Valet {
    /// One page of the grants `filter` names that the caller may see.
    pub async fn list_grants(
        &self,
        caller: &Caller,
        filter: GrantFilter,
        page_size: u32,
        page_token: &str,
    ) -> Result<GrantListing, ServiceError> {
        let outcome = async {
            let filter = visible_filter(caller, filter)?;
            let page_size = match page_size {
                0 => DEFAULT_PAGE_SIZE,
                size if size <= MAX_PAGE_SIZE => size,
                size => {
                    return Err(ServiceError::InvalidField {
                        field: "page_size",
                        problem: format!("{size} is above the maximum {MAX_PAGE_SIZE}"),
                    });
                }
            };
            let after = (!page_token.is_empty()).then_some(page_token);
            if after.is_some_and(|token| token.len() > policy::limits::MAX_GRANT_ID_BYTES) {
                return Err(ServiceError::InvalidField {
                    field: "page_token",
                    problem: "not a page token valetd returned".into(),
                });
            }
            let page = self
                .store
                .list_grants(&filter, self.clock.now(), after, page_size as usize)
                .await?;
            Ok(GrantListing {
                grants: page.grants,
                next_page_token: page.next_after,
            })
        }
        .await;
        self.answer(caller, context(AuditAction::GrantsList), outcome)
            .await
    }

    /// Changes to the grants `filter` names that the caller may see, from now on.
    pub async fn watch_grants(
        &self,
        caller: &Caller,
        filter: GrantFilter,
    ) -> Result<ServiceStream<GrantEvent>, ServiceError> {
        let outcome = visible_filter(caller, filter);
        let filter = self
            .answer(caller, context(AuditAction::GrantsWatch), outcome)
            .await?;
        let clock = self.clock.clone();
        Ok(follow_channel(
            self.store.subscribe(),
            "list grants again and re-watch",
            move |change| {
                let (kind, grant) = match change {
                    StoreChange::GrantCreated(grant) => (GrantEventKind::Issued, grant),
                    StoreChange::GrantRevoked(grant) => (GrantEventKind::Revoked, grant),
                    StoreChange::GrantUpdated { before, after }
                        if after.expires_at != before.expires_at =>
                    {
                        (GrantEventKind::Renewed, *after)
                    }
                    StoreChange::GrantUpdated { after, .. } => (GrantEventKind::Used, *after),
                    StoreChange::KeyRingChanged
                    | StoreChange::ApprovalChanged(_)
                    | StoreChange::Resync => return None,
                };
                filter
                    .matches(&grant, clock.now())
                    .then_some(GrantEvent { kind, grant })
            },
        ))
    }

    /// One page of the approval requests the caller may see (agents: their own; operators: all),
    /// oldest first: no reply can grow past the message limit however many wait.
    pub async fn list_approvals(
        &self,
        caller: &Caller,
        pending_only: bool,
        page_size: u32,
        page_token: &str,
    ) -> Result<ApprovalListing, ServiceError> {
        let outcome = async {
            let page_size = match page_size {
                0 => DEFAULT_PAGE_SIZE,
                size if size <= MAX_PAGE_SIZE => size,
                size => {
                    return Err(ServiceError::InvalidField {
                        field: "page_size",
                        problem: format!("{size} is above the maximum {MAX_PAGE_SIZE}"),
                    });
                }
            } as usize;
            let mut approvals = self.store.list_approvals(pending_only).await?;
            approvals.retain(|approval| {
                policy::may_see_approval(&caller.principal, &approval.requester).is_ok()
            });
            if !page_token.is_empty() {
                let Some(position) = approvals
                    .iter()
                    .position(|approval| approval.id == page_token)
                else {
                    return Err(ServiceError::InvalidField {
                        field: "page_token",
                        problem: "not a page token valetd returned (or that request was swept)"
                            .into(),
                    });
                };
                approvals.drain(..=position);
            }
            let next_page_token =
                (approvals.len() > page_size).then(|| approvals[page_size - 1].id.clone());
            approvals.truncate(page_size);
            Ok(ApprovalListing {
                approvals,
                next_page_token,
            })
        }
        .await;
        self.answer(caller, context(AuditAction::ApprovalsList), outcome)
            .await
    }

    /// One approval request, when the caller may see it.
    pub async fn get_approval(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<ApprovalRequest, ServiceError> {
        let mut context = context(AuditAction::ApprovalGet);
        let outcome = async {
            let id = ApprovalId::parse(id)?;
            context.set("approval_id", id.as_str());
            let approval = self.fetch_approval(&id).await?;
            policy::may_see_approval(&caller.principal, &approval.requester)?;
            Ok(approval)
        }
        .await;
        self.answer(caller, context, outcome).await
    }

    /// Changes to approval requests the caller may see, from now on.
    pub async fn watch_approvals(
        &self,
        caller: &Caller,
    ) -> Result<ServiceStream<ApprovalRequest>, ServiceError> {
        let principal = caller.principal.clone();
        Ok(follow_channel(
            self.store.subscribe(),
            "list approvals again",
            move |change| match change {
                StoreChange::ApprovalChanged(approval)
                    if policy::may_see_approval(&principal, &approval.requester).is_ok() =>
                {
                    Some(*approval)
                }
                _ => None,
            },
        ))
    }

    /// The audit chain head valetd recorded. Operators only.
    pub async fn audit_head(&self, caller: &Caller) -> Result<ChainHead, ServiceError> {
        let outcome = async {
            policy::require_role(
                &caller.principal,
                Role::Operator,
                "reading the audit chain head",
            )?;
            Ok(self
                .store
                .audit_head()
                .await?
                .unwrap_or_else(ChainHead::genesis))
        }
        .await;
        self.answer(caller, context(AuditAction::AuditHead), outcome)
            .await
    }

    /// The last `last` audit records (0: the default), then every new one when `follow`.
    /// Operators only.
    pub async fn audit_tail(
        &self,
        caller: &Caller,
        last: u32,
        follow: bool,
    ) -> Result<AuditTail, ServiceError> {
        let outcome = async {
            policy::require_role(&caller.principal, Role::Operator, "reading the audit log")?;
            match last {
                0 => Ok(DEFAULT_TAIL),
                last if last <= MAX_TAIL => Ok(last),
                last => Err(ServiceError::InvalidField {
                    field: "last",
                    problem: format!("{last} is above the maximum {MAX_TAIL}"),
                }),
            }
        }
        .await;
        let last = self
            .answer(caller, context(AuditAction::AuditTail), outcome)
            .await?;
        // Subscribe before reading the file, so no record falls between the two.
        let written = follow.then(|| self.audit.follow());
        let recent = self.audit.last_records(last as usize).await?;
        let last_sent = recent.last().map(|record| record.sequence).unwrap_or(0);
        let recent = futures::stream::iter(recent.into_iter().map(Ok));
        let Some(written) = written else {
            return Ok(Box::pin(recent));
        };
        let newer = follow_channel(written, "tail the audit log again", move |record| {
            (record.sequence > last_sent).then(|| (*record).clone())
        });
        Ok(Box::pin(recent.chain(newer)))
    }
}

/// `filter` narrowed to the principals the caller may see.
fn visible_filter(caller: &Caller, filter: GrantFilter) -> Result<GrantFilter, ServiceError> {
    let principal =
        policy::visible_principal(&caller.principal, filter.principal.as_deref(), "grants")?;
    Ok(GrantFilter {
        principal,
        ..filter
    })
}

/// A stream fed by a task: the task gets a sender and ends when the receiver is dropped.
pub(crate) fn stream_from_task<T, F, Fut>(task: F) -> ServiceStream<T>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<Result<T, ServiceError>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (sender, receiver) = tokio::sync::mpsc::channel(64);
    // The task ends when its reader goes away (the client disconnected, the stream was
    // dropped), not at its next item, which may be an hour off.
    let reader_gone = sender.clone();
    let task = task(sender);
    tokio::spawn(async move {
        tokio::select! {
            () = task => {}
            () = reader_gone.closed() => {}
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(receiver))
}

/// Follows a broadcast channel from now on, keeping what `select` keeps. A follower that falls
/// behind gets one `Lagged` error saying what to do (`advice`), and the stream ends.
fn follow_channel<C, T>(
    mut receiver: tokio::sync::broadcast::Receiver<C>,
    advice: &'static str,
    mut select: impl FnMut(C) -> Option<T> + Send + 'static,
) -> ServiceStream<T>
where
    C: Clone + Send + 'static,
    T: Send + 'static,
{
    stream_from_task(move |sender| async move {
        loop {
            let item = match receiver.recv().await {
                Ok(change) => match select(change) {
                    Some(item) => Ok(item),
                    None => continue,
                },
                Err(RecvError::Lagged(n_missed)) => Err(ServiceError::Lagged { n_missed, advice }),
                Err(RecvError::Closed) => return,
            };
            let lagged = item.is_err();
            if sender.send(item).await.is_err() || lagged {
                return;
            }
        }
    })
}
