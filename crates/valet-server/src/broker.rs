//! The `valet.v1.Broker` service: each method decodes its request, calls one service operation,
//! and encodes the answer.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tonic::{Request, Response, Status};
use valet_core::policy::TokenRequest;
use valet_core::token::Token;
use valet_proto::v1;
use valet_proto::v1::broker_server::Broker;
use valet_service::{Caller, Issued, ServiceError, Valet};

use crate::convert::{approval_to_wire, aws_to_wire, grant_to_wire};
use crate::error::status_of;

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

/// An operation's result as a gRPC response: the one error mapping, under the request id.
pub fn reply<T>(
    valet: &Valet,
    caller: &Caller,
    result: Result<T, ServiceError>,
) -> Result<Response<T>, Status> {
    result
        .map(Response::new)
        .map_err(|error| status_of(valet, error, &caller.request_id))
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
        let issued = self.valet.issue(&caller, token_request).await;
        let now = self.valet.now();
        reply(
            &self.valet,
            &caller,
            issued.map(|issued| match issued {
                Issued::Token { grant, token, aws } => v1::RequestTokenResponse {
                    grant: Some(grant_to_wire(&grant, now)),
                    token: token.into_exposed(),
                    approval: None,
                    aws: aws.map(|aws| aws_to_wire(&aws)),
                },
                Issued::Pending { grant, approval } => v1::RequestTokenResponse {
                    grant: Some(grant_to_wire(&grant, now)),
                    token: String::new(),
                    approval: Some(approval_to_wire(&approval, now)),
                    aws: None,
                },
            }),
        )
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
        let updates = self
            .valet
            .wait_for_grant(&caller, &wire.grant_id, wire.timeout_seconds)
            .await;
        let valet = self.valet.clone();
        let stream = reply(&self.valet, &caller, updates)?.into_inner();
        let request_id = caller.request_id.clone();
        Ok(Response::new(crate::admin::until_shutdown(
            &self.valet,
            stream.map(move |update| {
                let now = valet.now();
                update
                    .map(|update| v1::WaitForGrantResponse {
                        grant: Some(grant_to_wire(&update.grant, now)),
                        token: update.token.map(Token::into_exposed).unwrap_or_default(),
                        aws: update.aws.map(|aws| aws_to_wire(&aws)),
                        approval: update
                            .approval
                            .as_ref()
                            .map(|approval| approval_to_wire(approval, now)),
                    })
                    .map_err(|error| status_of(&valet, error, &request_id))
            }),
        )))
    }

    async fn renew_token(
        &self,
        request: Request<v1::RenewTokenRequest>,
    ) -> Result<Response<v1::RenewTokenResponse>, Status> {
        let caller = caller_of(&request)?;
        let wire = request.into_inner();
        let renewed = self
            .valet
            .renew(&caller, &wire.grant_id, ttl(wire.ttl_seconds))
            .await;
        let now = self.valet.now();
        reply(
            &self.valet,
            &caller,
            renewed.map(|renewed| v1::RenewTokenResponse {
                grant: Some(grant_to_wire(&renewed.grant, now)),
                token: renewed.token.map(Token::into_exposed).unwrap_or_default(),
                aws: renewed.aws.map(|aws| aws_to_wire(&aws)),
            }),
        )
    }

    async fn revoke_token(
        &self,
        request: Request<v1::RevokeTokenRequest>,
    ) -> Result<Response<v1::RevokeTokenResponse>, Status> {
        let caller = caller_of(&request)?;
        let wire = request.into_inner();
        let revoked = self
            .valet
            .revoke_grant(&caller, &wire.grant_id, &wire.reason)
            .await;
        let now = self.valet.now();
        reply(
            &self.valet,
            &caller,
            revoked.map(|(grant, notice)| v1::RevokeTokenResponse {
                grant: Some(grant_to_wire(&grant, now)),
                notice: notice.unwrap_or_default(),
            }),
        )
    }

    async fn revoke_task(
        &self,
        request: Request<v1::RevokeTaskRequest>,
    ) -> Result<Response<v1::RevokeTaskResponse>, Status> {
        let caller = caller_of(&request)?;
        let wire = request.into_inner();
        let revoked = self
            .valet
            .revoke_task(&caller, &wire.task_id, &wire.reason)
            .await;
        reply(
            &self.valet,
            &caller,
            revoked.map(|revoked| v1::RevokeTaskResponse {
                n_revoked: revoked.len() as u64,
                grant_ids: revoked.into_iter().map(|grant| grant.id).collect(),
            }),
        )
    }

    async fn introspect(
        &self,
        request: Request<v1::IntrospectRequest>,
    ) -> Result<Response<v1::IntrospectResponse>, Status> {
        let caller = caller_of(&request)?;
        let token = Token::new(request.into_inner().token);
        let introspection = self.valet.introspect(&caller, &token).await;
        let now = self.valet.now();
        reply(
            &self.valet,
            &caller,
            introspection.map(|introspection| v1::IntrospectResponse {
                active: introspection.active,
                grant: introspection.grant.map(|grant| grant_to_wire(&grant, now)),
                reason: introspection.reason.unwrap_or_default(),
            }),
        )
    }

    async fn who_am_i(
        &self,
        request: Request<v1::WhoAmIRequest>,
    ) -> Result<Response<v1::WhoAmIResponse>, Status> {
        let caller = caller_of(&request)?;
        let principal = &caller.principal;
        Ok(Response::new(v1::WhoAmIResponse {
            principal: principal.name.clone(),
            roles: principal
                .roles
                .iter()
                .map(|role| role.as_str().to_string())
                .collect(),
            scopes: principal.scopes.iter().cloned().collect(),
            auth_method: caller.authentication.method.clone(),
            auth_subject: caller.authentication.subject.clone().unwrap_or_default(),
            auth_issuer: caller.authentication.issuer.clone().unwrap_or_default(),
        }))
    }

    async fn get_jwks(
        &self,
        _request: Request<v1::GetJwksRequest>,
    ) -> Result<Response<v1::GetJwksResponse>, Status> {
        let keys = self
            .valet
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
