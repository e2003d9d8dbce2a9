//! The `valet.v1.Admin` service: each method decodes its request, calls one service operation,
//! and encodes the answer.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use valet_core::audit::AuditAction;
use valet_proto::v1;
use valet_proto::v1::admin_server::Admin;
use valet_service::{GrantEventKind, ReloadTrigger, ServiceError, ServiceStream, Valet};
use valet_store::GrantFilter;

use crate::broker::{caller_of, reply};
use crate::convert::{approval_to_wire, grant_to_wire, status_from_wire};
use crate::error::status_of;

pub struct AdminService {
    pub valet: Arc<Valet>,
}

type WireStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// A wire filter as a store filter; an unknown status is a refusal of the field.
fn filter_from_wire(wire: Option<v1::GrantFilter>) -> Result<GrantFilter, ServiceError> {
    let wire = wire.unwrap_or_default();
    let text = |value: String| (!value.is_empty()).then_some(value);
    let status =
        v1::GrantStatus::try_from(wire.status).map_err(|_| ServiceError::InvalidField {
            field: "filter.status",
            problem: format!("{} is not a grant status", wire.status),
        })?;
    Ok(GrantFilter {
        principal: text(wire.principal),
        task_id: text(wire.task_id),
        scope: text(wire.scope),
        environment: text(wire.environment),
        status: status_from_wire(status),
    })
}

/// A service stream as a wire stream, each item encoded and each error mapped once.
/// How often a long-lived stream re-checks that its caller's authority still stands.
const AUTHORITY_CHECK: std::time::Duration = std::time::Duration::from_secs(2);

fn wire_stream<T: Send + 'static, W: Send + 'static>(
    valet: &Arc<Valet>,
    caller: &valet_service::Caller,
    stream: ServiceStream<T>,
    encode: impl Fn(T, &Valet) -> W + Send + 'static,
) -> WireStream<W> {
    let encoder = valet.clone();
    let request_id = caller.request_id.clone();
    // The caller's authority is checked before every item and every couple of seconds: a stream
    // ends (with UNAUTHENTICATED and the reason) once its credential is withdrawn, as a new
    // request would be refused. It ends as it would otherwise when the service's stream does.
    enum Event<T> {
        Item(T),
        Tick,
        End,
    }
    let ticks = tokio_stream::wrappers::IntervalStream::new(tokio::time::interval(AUTHORITY_CHECK))
        .map(|_| Event::Tick);
    let items = stream
        .map(Event::Item)
        .chain(futures::stream::once(std::future::ready(Event::End)));
    let (checker, caller) = (valet.clone(), caller.clone());
    let checked = futures::stream::select(items, ticks)
        .take_while(|event| std::future::ready(!matches!(event, Event::End)))
        .then(move |event| {
            let (checker, caller) = (checker.clone(), caller.clone());
            async move {
                match checker.caller_in_force(&caller).await {
                    Ok(()) => (event, None),
                    Err(error) => (event, Some(error)),
                }
            }
        })
        .scan(false, |ended, (event, refused)| {
            if *ended {
                return std::future::ready(None);
            }
            if let Some(error) = refused {
                *ended = true;
                return std::future::ready(Some(Some(Err(error))));
            }
            std::future::ready(Some(match event {
                Event::Item(item) => Some(item),
                Event::Tick | Event::End => None,
            }))
        })
        .filter_map(std::future::ready);
    until_shutdown(
        valet,
        checked.map(move |item| {
            item.map(|item| encode(item, &encoder))
                .map_err(|error| status_of(&encoder, error, &request_id))
        }),
    )
}

/// Ends `stream` when valetd begins to stop, with a last `UNAVAILABLE` that says so, so a
/// watcher reconnects (to another replica, or once this one is back) instead of holding up the
/// shutdown until its grace period runs out.
pub fn until_shutdown<W: Send + 'static>(
    valet: &Arc<Valet>,
    stream: impl Stream<Item = Result<W, Status>> + Send + 'static,
) -> WireStream<W> {
    let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (watcher, flag) = (valet.clone(), stopped.clone());
    let stop = async move {
        watcher.shutting_down().await;
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
    };
    let farewell = futures::stream::once(async move {
        stopped
            .load(std::sync::atomic::Ordering::SeqCst)
            .then(|| Err(Status::unavailable("valetd is stopping; reconnect")))
    })
    .filter_map(std::future::ready);
    Box::pin(stream.take_until(stop).chain(farewell))
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_grants(
        &self,
        request: Request<v1::ListGrantsRequest>,
    ) -> Result<Response<v1::ListGrantsResponse>, Status> {
        let caller = caller_of(&request)?;
        let wire = request.into_inner();
        let listing = match filter_from_wire(wire.filter) {
            Ok(filter) => {
                self.valet
                    .list_grants(&caller, filter, wire.page_size, &wire.page_token)
                    .await
            }
            Err(error) => {
                self.valet
                    .refuse(&caller, AuditAction::GrantsList, error)
                    .await
            }
        };
        let now = self.valet.now();
        reply(
            &self.valet,
            &caller,
            listing.map(|listing| v1::ListGrantsResponse {
                grants: listing
                    .grants
                    .iter()
                    .map(|grant| grant_to_wire(grant, now))
                    .collect(),
                next_page_token: listing.next_page_token.unwrap_or_default(),
            }),
        )
    }

    type WatchGrantsStream = WireStream<v1::GrantEvent>;

    async fn watch_grants(
        &self,
        request: Request<v1::WatchGrantsRequest>,
    ) -> Result<Response<Self::WatchGrantsStream>, Status> {
        let caller = caller_of(&request)?;
        let wire = request.into_inner();
        let events = match filter_from_wire(wire.filter) {
            Ok(filter) => self.valet.watch_grants(&caller, filter).await,
            Err(error) => {
                self.valet
                    .refuse(&caller, AuditAction::GrantsWatch, error)
                    .await
            }
        };
        let events = reply(&self.valet, &caller, events)?.into_inner();
        Ok(Response::new(wire_stream(
            &self.valet,
            &caller,
            events,
            |event, valet| v1::GrantEvent {
                kind: match event.kind {
                    GrantEventKind::Issued => v1::GrantEventKind::Issued,
                    GrantEventKind::Renewed => v1::GrantEventKind::Renewed,
                    GrantEventKind::Used => v1::GrantEventKind::Used,
                    GrantEventKind::Revoked => v1::GrantEventKind::Revoked,
                } as i32,
                grant: Some(grant_to_wire(&event.grant, valet.now())),
            },
        )))
    }

    async fn revoke_all(
        &self,
        request: Request<v1::RevokeAllRequest>,
    ) -> Result<Response<v1::RevokeAllResponse>, Status> {
        let caller = caller_of(&request)?;
        let wire = request.into_inner();
        let filter = match wire.target {
            Some(v1::revoke_all_request::Target::Principal(name)) if !name.is_empty() => {
                Some(GrantFilter {
                    principal: Some(name),
                    ..GrantFilter::default()
                })
            }
            Some(v1::revoke_all_request::Target::Scope(name)) if !name.is_empty() => {
                Some(GrantFilter {
                    scope: Some(name),
                    ..GrantFilter::default()
                })
            }
            Some(v1::revoke_all_request::Target::Environment(name)) if !name.is_empty() => {
                Some(GrantFilter {
                    environment: Some(name),
                    ..GrantFilter::default()
                })
            }
            _ => None,
        };
        let revoked = self.valet.revoke_all(&caller, filter, &wire.reason).await;
        reply(
            &self.valet,
            &caller,
            revoked.map(|revoked| v1::RevokeAllResponse {
                n_revoked: revoked.len() as u64,
            }),
        )
    }

    async fn rotate_signing_key(
        &self,
        request: Request<v1::RotateSigningKeyRequest>,
    ) -> Result<Response<v1::RotateSigningKeyResponse>, Status> {
        let caller = caller_of(&request)?;
        let rotated = self.valet.rotate_signing_key(&caller).await;
        reply(
            &self.valet,
            &caller,
            rotated.map(|(new, retired)| v1::RotateSigningKeyResponse {
                new_key_id: new.into_string(),
                retired_key_id: retired.into_string(),
            }),
        )
    }

    async fn reload_config(
        &self,
        request: Request<v1::ReloadConfigRequest>,
    ) -> Result<Response<v1::ReloadConfigResponse>, Status> {
        let caller = caller_of(&request)?;
        let reloaded = self.valet.reload(ReloadTrigger::Caller(&caller)).await;
        reply(
            &self.valet,
            &caller,
            reloaded.map(|reloaded| v1::ReloadConfigResponse {
                n_principals: reloaded.config.principals.len() as u64,
                n_scopes: reloaded.config.scopes.len() as u64,
                n_credentials: reloaded.n_credentials as u64,
                n_grants_ended: reloaded.n_grants_ended,
                n_grants_clamped: reloaded.n_grants_clamped,
                restart_only: reloaded
                    .restart_only
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
            }),
        )
    }

    async fn get_audit_head(
        &self,
        request: Request<v1::GetAuditHeadRequest>,
    ) -> Result<Response<v1::GetAuditHeadResponse>, Status> {
        let caller = caller_of(&request)?;
        let head = self.valet.audit_head(&caller).await;
        reply(
            &self.valet,
            &caller,
            head.map(|head| v1::GetAuditHeadResponse {
                sequence: head.sequence,
                hash: head.hash,
            }),
        )
    }

    async fn list_approvals(
        &self,
        request: Request<v1::ListApprovalsRequest>,
    ) -> Result<Response<v1::ListApprovalsResponse>, Status> {
        let caller = caller_of(&request)?;
        let wire = request.into_inner();
        let listing = self
            .valet
            .list_approvals(&caller, wire.pending_only, wire.page_size, &wire.page_token)
            .await;
        let now = self.valet.now();
        reply(
            &self.valet,
            &caller,
            listing.map(|listing| v1::ListApprovalsResponse {
                approvals: listing
                    .approvals
                    .iter()
                    .map(|approval| approval_to_wire(approval, now))
                    .collect(),
                next_page_token: listing.next_page_token.unwrap_or_default(),
            }),
        )
    }

    async fn get_approval(
        &self,
        request: Request<v1::GetApprovalRequest>,
    ) -> Result<Response<v1::Approval>, Status> {
        let caller = caller_of(&request)?;
        let wire = request.into_inner();
        let approval = self.valet.get_approval(&caller, &wire.id).await;
        let now = self.valet.now();
        reply(
            &self.valet,
            &caller,
            approval.map(|approval| approval_to_wire(&approval, now)),
        )
    }

    async fn approve(
        &self,
        request: Request<v1::ApproveRequest>,
    ) -> Result<Response<v1::Approval>, Status> {
        let caller = caller_of(&request)?;
        let wire = request.into_inner();
        let confirmation = (!wire.confirm.is_empty()).then_some(wire.confirm.as_str());
        let approval = self
            .valet
            .approve(&caller, &wire.id, confirmation, &wire.reason)
            .await;
        let now = self.valet.now();
        reply(
            &self.valet,
            &caller,
            approval.map(|approval| approval_to_wire(&approval, now)),
        )
    }

    async fn deny(
        &self,
        request: Request<v1::DenyRequest>,
    ) -> Result<Response<v1::Approval>, Status> {
        let caller = caller_of(&request)?;
        let wire = request.into_inner();
        let approval = self
            .valet
            .deny_approval(&caller, &wire.id, &wire.reason)
            .await;
        let now = self.valet.now();
        reply(
            &self.valet,
            &caller,
            approval.map(|approval| approval_to_wire(&approval, now)),
        )
    }

    type WatchApprovalsStream = WireStream<v1::Approval>;

    async fn watch_approvals(
        &self,
        request: Request<v1::WatchApprovalsRequest>,
    ) -> Result<Response<Self::WatchApprovalsStream>, Status> {
        let caller = caller_of(&request)?;
        let approvals = self.valet.watch_approvals(&caller).await;
        let approvals = reply(&self.valet, &caller, approvals)?.into_inner();
        Ok(Response::new(wire_stream(
            &self.valet,
            &caller,
            approvals,
            |approval, valet| approval_to_wire(&approval, valet.now()),
        )))
    }

    async fn create_console_login(
        &self,
        request: Request<v1::CreateConsoleLoginRequest>,
    ) -> Result<Response<v1::CreateConsoleLoginResponse>, Status> {
        let caller = caller_of(&request)?;
        let login = self.valet.create_console_login(&caller).await;
        reply(
            &self.valet,
            &caller,
            login.map(|login| v1::CreateConsoleLoginResponse {
                url: login.url,
                expires_at: Some(prost_types::Timestamp {
                    seconds: login.expires_at,
                    nanos: 0,
                }),
                code: login.code,
            }),
        )
    }

    async fn list_console_sessions(
        &self,
        request: Request<v1::ListConsoleSessionsRequest>,
    ) -> Result<Response<v1::ListConsoleSessionsResponse>, Status> {
        let caller = caller_of(&request)?;
        let sessions = self.valet.console_sessions(&caller).await;
        let at = |seconds| Some(prost_types::Timestamp { seconds, nanos: 0 });
        reply(
            &self.valet,
            &caller,
            sessions.map(|sessions| v1::ListConsoleSessionsResponse {
                sessions: sessions
                    .into_iter()
                    .map(|open| v1::ConsoleSession {
                        id: open.pass.id,
                        principal: open.pass.principal,
                        credential: open.pass.credential.describe(),
                        opened_at: at(open.pass.issued_at),
                        expires_at: at(open.pass.expires_at),
                        credential_refused: open.credential_accepted.err().unwrap_or_default(),
                    })
                    .collect(),
            }),
        )
    }

    async fn end_console_session(
        &self,
        request: Request<v1::EndConsoleSessionRequest>,
    ) -> Result<Response<v1::EndConsoleSessionResponse>, Status> {
        let caller = caller_of(&request)?;
        let id = request.get_ref().id.clone();
        let ended = self.valet.end_console_session_by_id(&caller, &id).await;
        reply(
            &self.valet,
            &caller,
            ended.map(|()| v1::EndConsoleSessionResponse {}),
        )
    }

    type AuditTailStream = WireStream<v1::AuditRecord>;

    async fn audit_tail(
        &self,
        request: Request<v1::AuditTailRequest>,
    ) -> Result<Response<Self::AuditTailStream>, Status> {
        let caller = caller_of(&request)?;
        let wire = request.into_inner();
        let records = self.valet.audit_tail(&caller, wire.last, wire.follow).await;
        let records = reply(&self.valet, &caller, records)?.into_inner();
        Ok(Response::new(wire_stream(
            &self.valet,
            &caller,
            records,
            |record, _| v1::AuditRecord {
                sequence: record.sequence,
                line: record.line,
            },
        )))
    }
}
