//! The `valet.v1.Admin` service: listing, watching and revoking grants; keys; config; audit head.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tonic::{Request, Response, Status};
use valet_core::config::{Principal, Role};
use valet_core::policy::{self, RequestError};
use valet_proto::v1;
use valet_proto::v1::admin_server::Admin;
use valet_store::{GrantFilter, StoreChange};

use crate::broker::{answer, caller_of};
use crate::convert::{approval_to_wire, grant_to_wire, status_from_wire};
use crate::error::ApiError;
use crate::valet::Valet;

const DEFAULT_PAGE_SIZE: u32 = 100;
const MAX_PAGE_SIZE: u32 = 1000;

pub struct AdminService {
    pub valet: Arc<Valet>,
}

/// Turns a wire filter into a store filter. Agents may only look at their own grants: an empty
/// principal filter becomes their own name, any other name is refused.
fn filter_for(
    principal: &Principal,
    wire: Option<v1::GrantFilter>,
) -> Result<GrantFilter, ApiError> {
    let wire = wire.unwrap_or_default();
    let text = |value: String| (!value.is_empty()).then_some(value);
    let status = v1::GrantStatus::try_from(wire.status).map_err(|_| ApiError::InvalidField {
        field: "filter.status",
        problem: format!("{} is not a grant status", wire.status),
    })?;
    let mut filter = GrantFilter {
        principal: text(wire.principal),
        task_id: text(wire.task_id),
        scope: text(wire.scope),
        environment: text(wire.environment),
        status: status_from_wire(status),
    };
    if !principal.has_role(Role::Operator) {
        match &filter.principal {
            Some(name) if *name != principal.name => {
                policy::require_role(
                    principal,
                    Role::Operator,
                    "looking at another principal's grants",
                )?;
            }
            _ => filter.principal = Some(principal.name.clone()),
        }
    }
    Ok(filter)
}

type GrantEventStream =
    Pin<Box<dyn Stream<Item = Result<v1::GrantEvent, Status>> + Send + 'static>>;
type AuditRecordStream =
    Pin<Box<dyn Stream<Item = Result<v1::AuditRecord, Status>> + Send + 'static>>;

const DEFAULT_TAIL: u32 = 20;
const MAX_TAIL: u32 = 1000;

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_grants(
        &self,
        request: Request<v1::ListGrantsRequest>,
    ) -> Result<Response<v1::ListGrantsResponse>, Status> {
        let caller = caller_of(&request)?;
        let wire = request.into_inner();
        answer(&self.valet, &caller, async {
            let filter = filter_for(&caller.principal, wire.filter)?;
            let page_size = match wire.page_size {
                0 => DEFAULT_PAGE_SIZE,
                size if size <= MAX_PAGE_SIZE => size,
                size => {
                    return Err(ApiError::InvalidField {
                        field: "page_size",
                        problem: format!("{size} is above the maximum {MAX_PAGE_SIZE}"),
                    });
                }
            };
            let after = (!wire.page_token.is_empty()).then_some(wire.page_token.as_str());
            if after.is_some_and(|token| token.len() > policy::limits::MAX_GRANT_ID_BYTES) {
                return Err(ApiError::InvalidField {
                    field: "page_token",
                    problem: "not a page token this server returned".into(),
                });
            }
            let now = self.valet.clock.now();
            let page = self
                .valet
                .store
                .list_grants(&filter, now, after, page_size as usize)
                .await?;
            Ok(v1::ListGrantsResponse {
                grants: page
                    .grants
                    .iter()
                    .map(|grant| grant_to_wire(grant, now))
                    .collect(),
                next_page_token: page.next_after.unwrap_or_default(),
            })
        })
        .await
    }

    type WatchGrantsStream = GrantEventStream;

    async fn watch_grants(
        &self,
        request: Request<v1::WatchGrantsRequest>,
    ) -> Result<Response<Self::WatchGrantsStream>, Status> {
        let caller = caller_of(&request)?;
        let wire = request.into_inner();
        let filter = filter_for(&caller.principal, wire.filter).map_err(|error| {
            self.valet
                .redactor
                .redact_status(error.into_status(&caller.request_id))
        })?;
        let mut changes = self.valet.store.subscribe();
        let clock = self.valet.clock.clone();
        let stream = async_stream(move |sender| async move {
            loop {
                let change = match changes.recv().await {
                    Ok(change) => change,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n_missed)) => {
                        let _ = sender
                            .send(Err(Status::data_loss(format!("the watcher fell {n_missed} changes behind; list grants again and re-watch"))))
                            .await;
                        return;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                let (kind, grant) = match change {
                    StoreChange::GrantCreated(grant) => (v1::GrantEventKind::Issued, grant),
                    StoreChange::GrantRevoked(grant) => (v1::GrantEventKind::Revoked, grant),
                    StoreChange::GrantUpdated { before, after }
                        if after.expires_at != before.expires_at =>
                    {
                        (v1::GrantEventKind::Renewed, *after)
                    }
                    StoreChange::GrantUpdated { after, .. } => (v1::GrantEventKind::Used, *after),
                    StoreChange::KeyRingChanged
                    | StoreChange::ApprovalChanged(_)
                    | StoreChange::Resync => continue,
                };
                let now = clock.now();
                if !filter.matches(&grant, now) {
                    continue;
                }
                let event = v1::GrantEvent {
                    kind: kind as i32,
                    grant: Some(grant_to_wire(&grant, now)),
                };
                if sender.send(Ok(event)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn revoke_all(
        &self,
        request: Request<v1::RevokeAllRequest>,
    ) -> Result<Response<v1::RevokeAllResponse>, Status> {
        let caller = caller_of(&request)?;
        let wire = request.into_inner();
        answer(&self.valet, &caller, async {
            let filter = match wire.target {
                Some(v1::revoke_all_request::Target::Principal(name)) if !name.is_empty() => {
                    GrantFilter {
                        principal: Some(name),
                        ..GrantFilter::default()
                    }
                }
                Some(v1::revoke_all_request::Target::Scope(name)) if !name.is_empty() => {
                    GrantFilter {
                        scope: Some(name),
                        ..GrantFilter::default()
                    }
                }
                Some(v1::revoke_all_request::Target::Environment(name)) if !name.is_empty() => {
                    GrantFilter {
                        environment: Some(name),
                        ..GrantFilter::default()
                    }
                }
                _ => {
                    return Err(RequestError::FieldMissing {
                        field: "target (one of principal, scope, environment)",
                    }
                    .into());
                }
            };
            let revoked = self.valet.revoke_all(&caller, filter, &wire.reason).await?;
            Ok(v1::RevokeAllResponse {
                n_revoked: revoked.len() as u64,
            })
        })
        .await
    }

    async fn rotate_signing_key(
        &self,
        request: Request<v1::RotateSigningKeyRequest>,
    ) -> Result<Response<v1::RotateSigningKeyResponse>, Status> {
        let caller = caller_of(&request)?;
        answer(&self.valet, &caller, async {
            let (new_key_id, retired_key_id) = self.valet.rotate_signing_key(&caller).await?;
            Ok(v1::RotateSigningKeyResponse {
                new_key_id,
                retired_key_id,
            })
        })
        .await
    }

    async fn reload_config(
        &self,
        request: Request<v1::ReloadConfigRequest>,
    ) -> Result<Response<v1::ReloadConfigResponse>, Status> {
        let caller = caller_of(&request)?;
        answer(&self.valet, &caller, async {
            self.valet
                .require_role(&caller, Role::Admin, "reloading the config")
                .await?;
            let config = self.valet.reload(Some(&caller)).await?;
            Ok(v1::ReloadConfigResponse {
                n_principals: config.principals.len() as u64,
                n_scopes: config.scopes.len() as u64,
                n_credentials: self.valet.n_credentials() as u64,
            })
        })
        .await
    }

    async fn get_audit_head(
        &self,
        request: Request<v1::GetAuditHeadRequest>,
    ) -> Result<Response<v1::GetAuditHeadResponse>, Status> {
        let caller = caller_of(&request)?;
        answer(&self.valet, &caller, async {
            self.valet
                .require_role(&caller, Role::Operator, "reading the audit chain head")
                .await?;
            let head = self
                .valet
                .store
                .audit_head()
                .await?
                .unwrap_or_else(valet_core::audit::ChainHead::genesis);
            Ok(v1::GetAuditHeadResponse {
                sequence: head.sequence,
                hash: head.hash,
            })
        })
        .await
    }

    async fn list_approvals(
        &self,
        request: Request<v1::ListApprovalsRequest>,
    ) -> Result<Response<v1::ListApprovalsResponse>, Status> {
        let caller = caller_of(&request)?;
        let wire = request.into_inner();
        answer(&self.valet, &caller, async {
            let now = self.valet.clock.now();
            let mut approvals = self.valet.store.list_approvals(wire.pending_only).await?;
            // Agents see their own requests; operators see everything.
            if !caller.principal.has_role(Role::Operator) {
                approvals.retain(|approval| approval.requester == caller.principal.name);
            }
            Ok(v1::ListApprovalsResponse {
                approvals: approvals
                    .iter()
                    .map(|approval| approval_to_wire(approval, now))
                    .collect(),
            })
        })
        .await
    }

    async fn get_approval(
        &self,
        request: Request<v1::GetApprovalRequest>,
    ) -> Result<Response<v1::Approval>, Status> {
        let caller = caller_of(&request)?;
        let wire = request.into_inner();
        answer(&self.valet, &caller, async {
            let approval = self.valet.fetch_approval(&wire.id).await?;
            if !caller.principal.has_role(Role::Operator)
                && approval.requester != caller.principal.name
            {
                policy::require_role(
                    &caller.principal,
                    Role::Operator,
                    "looking at another principal's approval",
                )?;
            }
            Ok(approval_to_wire(&approval, self.valet.clock.now()))
        })
        .await
    }

    async fn approve(
        &self,
        request: Request<v1::ApproveRequest>,
    ) -> Result<Response<v1::Approval>, Status> {
        let caller = caller_of(&request)?;
        let wire = request.into_inner();
        answer(&self.valet, &caller, async {
            policy::check_text(
                "reason",
                &wire.reason,
                policy::limits::MAX_REASON_BYTES,
                false,
            )?;
            let confirmation = (!wire.confirm.is_empty()).then_some(wire.confirm.as_str());
            let approval = self
                .valet
                .approve(&caller, &wire.id, confirmation, &wire.reason)
                .await?;
            Ok(approval_to_wire(&approval, self.valet.clock.now()))
        })
        .await
    }

    async fn deny(
        &self,
        request: Request<v1::DenyRequest>,
    ) -> Result<Response<v1::Approval>, Status> {
        let caller = caller_of(&request)?;
        let wire = request.into_inner();
        answer(&self.valet, &caller, async {
            policy::check_text(
                "reason",
                &wire.reason,
                policy::limits::MAX_REASON_BYTES,
                false,
            )?;
            let approval = self
                .valet
                .deny_approval(&caller, &wire.id, &wire.reason)
                .await?;
            Ok(approval_to_wire(&approval, self.valet.clock.now()))
        })
        .await
    }

    type WatchApprovalsStream =
        Pin<Box<dyn Stream<Item = Result<v1::Approval, Status>> + Send + 'static>>;

    async fn watch_approvals(
        &self,
        request: Request<v1::WatchApprovalsRequest>,
    ) -> Result<Response<Self::WatchApprovalsStream>, Status> {
        let caller = caller_of(&request)?;
        let operator = caller.principal.has_role(Role::Operator);
        let name = caller.principal.name.clone();
        let mut changes = self.valet.store.subscribe();
        let clock = self.valet.clock.clone();
        let (sender, receiver) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                match changes.recv().await {
                    Ok(StoreChange::ApprovalChanged(approval))
                        if operator || approval.requester == name =>
                    {
                        if sender
                            .send(Ok(approval_to_wire(&approval, clock.now())))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n_missed)) => {
                        let _ = sender
                            .send(Err(Status::data_loss(format!(
                                "the watcher fell {n_missed} changes behind; list approvals again"
                            ))))
                            .await;
                        return;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
        )))
    }

    type AuditTailStream = AuditRecordStream;

    async fn audit_tail(
        &self,
        request: Request<v1::AuditTailRequest>,
    ) -> Result<Response<Self::AuditTailStream>, Status> {
        let caller = caller_of(&request)?;
        let wire = request.into_inner();
        let redact = |error: ApiError| {
            self.valet
                .redactor
                .redact_status(error.into_status(&caller.request_id))
        };
        self.valet
            .require_role(&caller, Role::Operator, "reading the audit log")
            .await
            .map_err(redact)?;
        let last = match wire.last {
            0 => DEFAULT_TAIL,
            last if last <= MAX_TAIL => last,
            last => {
                return Err(redact(ApiError::InvalidField {
                    field: "last",
                    problem: format!("{last} is above the maximum {MAX_TAIL}"),
                }));
            }
        };
        // Subscribe before reading the file, so no record falls between the two.
        let mut written = wire.follow.then(|| self.valet.audit.follow());
        let recent = self
            .valet
            .audit
            .last_records(last as usize)
            .await
            .map_err(|error| redact(error.into()))?;
        let (sender, receiver) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            let mut last_sent = 0;
            for record in recent {
                last_sent = record.sequence;
                if sender
                    .send(Ok(v1::AuditRecord {
                        sequence: record.sequence,
                        line: record.line,
                    }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            let Some(written) = written.as_mut() else {
                return;
            };
            loop {
                match written.recv().await {
                    Ok(record) if record.sequence > last_sent => {
                        last_sent = record.sequence;
                        let message = v1::AuditRecord {
                            sequence: record.sequence,
                            line: record.line.clone(),
                        };
                        if sender.send(Ok(message)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n_missed)) => {
                        let _ = sender
                            .send(Err(Status::data_loss(format!(
                                "the follower fell {n_missed} records behind; tail again"
                            ))))
                            .await;
                        return;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
        )))
    }
}

/// A stream fed by a task: the task gets a sender and ends when the receiver is dropped.
fn async_stream<F, Fut>(task: F) -> GrantEventStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<v1::GrantEvent, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (sender, receiver) = tokio::sync::mpsc::channel(64);
    tokio::spawn(task(sender));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(receiver))
}
