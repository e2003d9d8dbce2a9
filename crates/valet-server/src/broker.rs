//! The `valet.v1.Broker` service: wire types in, `Valet` operations, wire types out.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};
use valet_core::policy::TokenRequest;
use valet_proto::v1;
use valet_proto::v1::broker_server::Broker;

use crate::convert::approval_to_wire;
use crate::convert::aws_to_wire;
use crate::convert::grant_to_wire;
use crate::error::ApiError;
use crate::valet::{Caller, Issued, Valet};

pub struct BrokerService {
    pub valet: Arc<Valet>,
}

/// The authenticated caller the authentication layer attached to the request.
pub fn caller_of<T>(request: &Request<T>) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no authenticated principal"))
}

/// Runs an operation and maps its error to a status under the caller's request id.
/// Root credentials an error message might echo are redacted.
pub async fn answer<T>(
    valet: &Valet,
    caller: &Caller,
    operation: impl std::future::Future<Output = Result<T, ApiError>>,
) -> Result<Response<T>, Status> {
    operation.await.map(Response::new).map_err(|error| {
        valet
            .redactor
            .redact_status(error.into_status(&caller.request_id))
    })
}

fn ttl(seconds: u64) -> Option<Duration> {
    (seconds > 0).then(|| Duration::from_secs(seconds))
}

#[tonic::async_trait]
impl Broker for BrokerService {
    async fn request_token(
        &self,
        request: Request<v1::RequestTokenRequest>,
    ) -> Result<Response<v1::RequestTokenResponse>, Status> {
        let caller = caller_of(&request)?;
        let wire = request.into_inner();
        let token_request = TokenRequest {
            scope: wire.scope,
            task_id: wire.task_id,
            purpose: wire.purpose,
            ttl: ttl(wire.ttl_seconds),
            params: wire.params.into_iter().collect(),
            audience: (!wire.audience.is_empty()).then_some(wire.audience),
        };
        answer(&self.valet, &caller, async {
            let now = self.valet.clock.now();
            Ok(match self.valet.issue(&caller, token_request).await? {
                Issued::Token { grant, token, aws } => v1::RequestTokenResponse {
                    grant: Some(grant_to_wire(&grant, now)),
                    token,
                    approval: None,
                    aws: aws.map(|aws| aws_to_wire(&aws)),
                },
                Issued::Pending { grant, approval } => v1::RequestTokenResponse {
                    grant: Some(grant_to_wire(&grant, now)),
                    token: String::new(),
                    approval: Some(approval_to_wire(&approval, now)),
                    aws: None,
                },
            })
        })
        .await
    }

    type WaitForGrantStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<v1::WaitForGrantResponse, Status>> + Send + 'static>,
    >;

    async fn wait_for_grant(
        &self,
        request: Request<v1::WaitForGrantRequest>,
    ) -> Result<Response<Self::WaitForGrantStream>, Status> {
        let caller = caller_of(&request)?;
        let wire = request.into_inner();
        let timeout = match wire.timeout_seconds {
            0 => Duration::from_secs(60),
            seconds if seconds <= 3600 => Duration::from_secs(seconds),
            seconds => {
                return Err(Status::invalid_argument(format!(
                    "timeout_seconds {seconds} is above the maximum 3600"
                )));
            }
        };
        let valet = self.valet.clone();
        // Subscribe first, so no change falls between the first read and the wait.
        let mut changes = valet.store.subscribe();
        let grant = valet
            .store
            .get_grant(&wire.grant_id)
            .await
            .map_err(|error| ApiError::from(error).into_status(&caller.request_id))?;
        let Some(grant) = grant else {
            return Err(Status::not_found(format!(
                "grant {} does not exist",
                wire.grant_id
            )));
        };
        if grant.principal != caller.principal.name {
            return Err(Status::permission_denied(format!(
                "grant {} belongs to another principal; only the requester receives its token",
                grant.id
            )));
        }
        let approval = valet
            .store
            .list_approvals(false)
            .await
            .ok()
            .and_then(|all| {
                all.into_iter()
                    .find(|approval| approval.grant_id == grant.id)
            });
        let (sender, receiver) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + timeout;
            let mut grant = grant;
            let mut approval = approval;
            loop {
                let now = valet.clock.now();
                let status = grant.status_at(now);
                let done = status != valet_core::grant::GrantStatus::Pending;
                let (token, aws) = if status == valet_core::grant::GrantStatus::Active {
                    match valet.token_for(&caller, &grant).await {
                        Ok(minted) => minted,
                        Err(error) => {
                            let status = valet
                                .redactor
                                .redact_status(error.into_status(&caller.request_id));
                            let _ = sender.send(Err(status)).await;
                            return;
                        }
                    }
                } else {
                    (String::new(), None)
                };
                let message = v1::WaitForGrantResponse {
                    grant: Some(grant_to_wire(&grant, now)),
                    token,
                    aws: aws.map(|aws| aws_to_wire(&aws)),
                    approval: approval
                        .as_ref()
                        .map(|approval| approval_to_wire(approval, now)),
                };
                if sender.send(Ok(message)).await.is_err() || done {
                    return;
                }
                // Wait for the next change to this grant or its approval, or the deadline.
                let expires_in = Duration::from_secs(
                    u64::try_from(grant.expires_at - valet.clock.now()).unwrap_or(0),
                );
                let timed_out = tokio::time::Instant::now() + expires_in;
                loop {
                    let change = tokio::select! {
                        change = changes.recv() => change,
                        // The approval's timeout: report the grant as it then stands.
                        _ = tokio::time::sleep_until(timed_out) => break,
                        _ = tokio::time::sleep_until(deadline) => return,
                    };
                    match change {
                        Ok(valet_store::StoreChange::GrantUpdated { after, .. })
                            if after.id == grant.id =>
                        {
                            grant = *after;
                            break;
                        }
                        Ok(valet_store::StoreChange::GrantRevoked(after))
                            if after.id == grant.id =>
                        {
                            grant = after;
                            break;
                        }
                        Ok(valet_store::StoreChange::ApprovalChanged(changed))
                            if changed.grant_id == grant.id =>
                        {
                            approval = Some(*changed);
                        }
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            if let Ok(Some(current)) = valet.store.get_grant(&grant.id).await {
                                grant = current;
                            }
                            break;
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
        )))
    }

    async fn renew_token(
        &self,
        request: Request<v1::RenewTokenRequest>,
    ) -> Result<Response<v1::RenewTokenResponse>, Status> {
        let caller = caller_of(&request)?;
        let wire = request.into_inner();
        answer(&self.valet, &caller, async {
            let (grant, token, aws) = self
                .valet
                .renew(&caller, &wire.grant_id, ttl(wire.ttl_seconds))
                .await?;
            Ok(v1::RenewTokenResponse {
                grant: Some(grant_to_wire(&grant, self.valet.clock.now())),
                token,
                aws: aws.map(|aws| aws_to_wire(&aws)),
            })
        })
        .await
    }

    async fn revoke_token(
        &self,
        request: Request<v1::RevokeTokenRequest>,
    ) -> Result<Response<v1::RevokeTokenResponse>, Status> {
        let caller = caller_of(&request)?;
        let wire = request.into_inner();
        answer(&self.valet, &caller, async {
            let (grant, notice) = self
                .valet
                .revoke_grant(&caller, &wire.grant_id, &wire.reason)
                .await?;
            Ok(v1::RevokeTokenResponse {
                grant: Some(grant_to_wire(&grant, self.valet.clock.now())),
                notice: notice.unwrap_or_default(),
            })
        })
        .await
    }

    async fn revoke_task(
        &self,
        request: Request<v1::RevokeTaskRequest>,
    ) -> Result<Response<v1::RevokeTaskResponse>, Status> {
        let caller = caller_of(&request)?;
        let wire = request.into_inner();
        answer(&self.valet, &caller, async {
            let revoked = self
                .valet
                .revoke_task(&caller, &wire.task_id, &wire.reason)
                .await?;
            Ok(v1::RevokeTaskResponse {
                n_revoked: revoked.len() as u64,
                grant_ids: revoked.into_iter().map(|grant| grant.id).collect(),
            })
        })
        .await
    }

    async fn introspect(
        &self,
        request: Request<v1::IntrospectRequest>,
    ) -> Result<Response<v1::IntrospectResponse>, Status> {
        let caller = caller_of(&request)?;
        let wire = request.into_inner();
        answer(&self.valet, &caller, async {
            let introspection = self.valet.introspect(&caller, &wire.token).await?;
            let now = self.valet.clock.now();
            Ok(v1::IntrospectResponse {
                active: introspection.active,
                grant: introspection.grant.map(|grant| grant_to_wire(&grant, now)),
                reason: introspection.reason.unwrap_or_default(),
            })
        })
        .await
    }

    async fn get_jwks(
        &self,
        _request: Request<v1::GetJwksRequest>,
    ) -> Result<Response<v1::GetJwksResponse>, Status> {
        let ring = self.valet.keys.ring();
        let keys = ring
            .jwks()
            .into_iter()
            .map(|jwk| v1::Jwk {
                kty: jwk.kty,
                crv: jwk.crv,
                x: jwk.x,
                kid: jwk.kid,
                alg: jwk.alg,
                r#use: jwk.key_use,
            })
            .collect();
        Ok(Response::new(v1::GetJwksResponse {
            keys,
            issuer: self.valet.config().server.issuer.clone(),
        }))
    }
}
