//! The tower layers every RPC passes through, and the one function that stacks them.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::Status;
use tower::{Layer, Service};
use tracing::Instrument;
use valet_core::audit::{AuditEvent, Outcome};
use valet_core::config::{Config, Principal};
use valet_core::secret::constant_time_eq;

use crate::error::ApiError;
use crate::valet::{Caller, Valet};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The id of one request, in logs, audit records and internal-error messages.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Stacks the layers, outermost first.
pub fn stack(
    valet: Arc<Valet>,
) -> tower::ServiceBuilder<
    tower::layer::util::Stack<
        AuthenticateLayer,
        tower::layer::util::Stack<RequestIdLayer, tower::layer::util::Identity>,
    >,
> {
    tower::ServiceBuilder::new()
        // Outermost: every request, even one refused by authentication, gets an id and a span.
        .layer(RequestIdLayer)
        // Then authentication, so no service code runs for an unknown caller.
        .layer(AuthenticateLayer { valet })
}

/// Gives each request an id and a tracing span, and logs its outcome and latency.
#[derive(Debug, Clone, Copy)]
pub struct RequestIdLayer;

impl<S> Layer<S> for RequestIdLayer {
    type Service = RequestIdService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestIdService { inner }
    }
}

#[derive(Debug, Clone)]
pub struct RequestIdService<S> {
    inner: S,
}

impl<S, RequestBody, ResponseBody> Service<http::Request<RequestBody>> for RequestIdService<S>
where
    S: Service<http::Request<RequestBody>, Response = http::Response<ResponseBody>>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, mut request: http::Request<RequestBody>) -> Self::Future {
        let request_id = new_request_id();
        let method = request.uri().path().to_string();
        request
            .extensions_mut()
            .insert(RequestId(request_id.clone()));
        let span =
            tracing::info_span!("rpc", %method, %request_id, principal = tracing::field::Empty);
        let started = Instant::now();
        let future = self.inner.call(request);
        Box::pin(
            async move {
                let mut response = future.await?;
                let status = response
                    .headers()
                    .get("grpc-status")
                    .and_then(|value| value.to_str().ok())
                    .unwrap_or("0")
                    .to_string();
                if let Ok(value) = http::HeaderValue::from_str(&request_id) {
                    response.headers_mut().insert("x-request-id", value);
                }
                tracing::debug!(grpc_status = %status, latency_us = started.elapsed().as_micros() as u64, "rpc finished");
                Ok(response)
            }
            .instrument(span),
        )
    }
}

fn new_request_id() -> String {
    valet_core::random::bytes::<8>()
        .map(hex::encode)
        .unwrap_or_else(|_| "unavailable".to_string())
}

/// Authenticates the principal from `authorization: Bearer <key>`; the health and reflection
/// services stay open so load balancers and `grpcurl` can use them.
#[derive(Clone)]
pub struct AuthenticateLayer {
    valet: Arc<Valet>,
}

impl<S> Layer<S> for AuthenticateLayer {
    type Service = AuthenticateService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthenticateService {
            inner,
            valet: self.valet.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthenticateService<S> {
    inner: S,
    valet: Arc<Valet>,
}

impl<S, RequestBody, ResponseBody> Service<http::Request<RequestBody>> for AuthenticateService<S>
where
    S: Service<http::Request<RequestBody>, Response = http::Response<ResponseBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    RequestBody: Send + 'static,
    ResponseBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, mut request: http::Request<RequestBody>) -> Self::Future {
        // The inner service was made ready by poll_ready; take it and leave a clone behind.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let valet = self.valet.clone();
        Box::pin(async move {
            let path = request.uri().path();
            if path.starts_with("/grpc.health.") || path.starts_with("/grpc.reflection.") {
                return inner.call(request).await;
            }
            let request_id = request
                .extensions()
                .get::<RequestId>()
                .map(|id| id.0.clone())
                .unwrap_or_default();
            match authenticate(&valet.config(), request.headers()) {
                Ok(principal) => {
                    tracing::Span::current().record("principal", principal.name.as_str());
                    request.extensions_mut().insert(Caller {
                        principal,
                        request_id,
                    });
                    inner.call(request).await
                }
                Err(reason) => {
                    let event = AuditEvent::new("principal.authenticate", Outcome::Denied)
                        .with("reason", reason)
                        .with("method", path)
                        .with("request_id", &request_id);
                    let status = match valet.audit.record(event).await {
                        Ok(_) => ApiError::Unauthenticated { reason }.into_status(&request_id),
                        Err(error) => Status::unavailable(format!(
                            "valetd cannot write its audit log (fail closed); request id {request_id}: {error}"
                        )),
                    };
                    tracing::warn!(reason, "authentication failed");
                    Ok(status.into_http())
                }
            }
        })
    }
}

/// Finds the principal whose key hash matches the bearer key, comparing in constant time.
fn authenticate(config: &Config, headers: &http::HeaderMap) -> Result<Principal, &'static str> {
    let value = headers
        .get(http::header::AUTHORIZATION)
        .ok_or("no principal key: send `authorization: Bearer <principal key>` (the valet CLI and client read VALET_KEY)")?;
    let value = value
        .to_str()
        .map_err(|_| "the authorization header is not text")?;
    let key = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or("the authorization header must be `Bearer <principal key>`")?
        .trim();
    if key.is_empty() {
        return Err("the principal key is empty");
    }
    let digest = valet_core::Secret::from(key.to_string()).sha256();
    let mut found = None;
    // Compare against every principal, so the time taken does not reveal which one matched.
    for principal in config.principals.values() {
        if constant_time_eq(&principal.key_sha256, &digest) {
            found = Some(principal);
        }
    }
    found.cloned().ok_or(
        "the principal key is not known to valetd (revoked, mistyped, or for another deployment)",
    )
}
