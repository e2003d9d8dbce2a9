//! The tower layers every RPC passes through, and the one function that stacks them.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tower::{Layer, Service};
use tracing::Instrument;
use valet_gateway::budget::{ConnectionHandle, GuardedBody};
use valet_service::Valet;

use crate::error::status_of;

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
        .layer(AuthenticateLayer {
            valet,
            refusal_lines: Arc::default(),
        })
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
        let request_id = valet_core::random::request_id();
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
                metrics::histogram!(
                    "valet_rpc_seconds",
                    "method" => method_label(&method),
                    "code" => code_label(&status),
                )
                .record(started.elapsed().as_secs_f64());
                tracing::debug!(grpc_status = %status, latency_us = started.elapsed().as_micros() as u64, "rpc finished");
                Ok(response)
            }
            .instrument(span),
        )
    }
}

/// The methods valetd serves. A client chooses the path it calls, so any other path is labelled
/// `other`: a metric label never takes a value from outside this list.
const METHODS: [&str; 27] = [
    "/valet.v1.Broker/RequestToken",
    "/valet.v1.Broker/WaitForGrant",
    "/valet.v1.Broker/RenewToken",
    "/valet.v1.Broker/RevokeToken",
    "/valet.v1.Broker/RevokeTask",
    "/valet.v1.Broker/Introspect",
    "/valet.v1.Broker/GetJwks",
    "/valet.v1.Broker/WhoAmI",
    "/valet.v1.Admin/ListGrants",
    "/valet.v1.Admin/WatchGrants",
    "/valet.v1.Admin/RevokeAll",
    "/valet.v1.Admin/RotateSigningKey",
    "/valet.v1.Admin/ReloadConfig",
    "/valet.v1.Admin/GetAuditHead",
    "/valet.v1.Admin/AuditTail",
    "/valet.v1.Admin/ListApprovals",
    "/valet.v1.Admin/GetApproval",
    "/valet.v1.Admin/Approve",
    "/valet.v1.Admin/Deny",
    "/valet.v1.Admin/WatchApprovals",
    "/valet.v1.Admin/CreateConsoleLogin",
    "/valet.v1.Admin/ListConsoleSessions",
    "/valet.v1.Admin/EndConsoleSession",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

fn method_label(path: &str) -> &'static str {
    METHODS
        .iter()
        .find(|method| **method == path)
        .copied()
        .unwrap_or("other")
}

/// A gRPC status code as a label: its number (0–16), or `other`.
fn code_label(status: &str) -> String {
    match status.parse::<u8>() {
        Ok(code) if code <= 16 => code.to_string(),
        _ => "other".to_string(),
    }
}

/// Authenticates the principal from `authorization: Bearer <key>` or the connection's client
/// certificate through the service (which records a refusal); the health and reflection services
/// stay open so load balancers and `grpcurl` can use them.
#[derive(Clone)]
pub struct AuthenticateLayer {
    valet: Arc<Valet>,
    /// Lines for failed authentications in valetd's log.
    refusal_lines: Arc<valet_gateway::log_budget::LogBudget>,
}

impl<S> Layer<S> for AuthenticateLayer {
    type Service = AuthenticateService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthenticateService {
            inner,
            valet: self.valet.clone(),
            refusal_lines: self.refusal_lines.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthenticateService<S> {
    inner: S,
    valet: Arc<Valet>,
    refusal_lines: Arc<valet_gateway::log_budget::LogBudget>,
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
    type Response = http::Response<GuardedBody<ResponseBody>>;
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
        let refusal_lines = self.refusal_lines.clone();
        Box::pin(async move {
            let peer = request
                .extensions()
                .get::<valet_gateway::listener::Peer>()
                .cloned();
            // In flight (never closed as idle or to make room) until its answer, a stream
            // included, has been sent.
            let mut guard = peer
                .as_ref()
                .and_then(|peer| peer.connection.as_ref())
                .map(ConnectionHandle::request);
            let guarded = |response: http::Response<ResponseBody>, guard| {
                response.map(|body| GuardedBody::new(body, guard))
            };
            if peer
                .as_ref()
                .and_then(|peer| peer.connection.as_ref())
                .is_some_and(ConnectionHandle::closing)
            {
                let closing = tonic::Status::unavailable(valet_gateway::budget::CLOSING);
                return Ok(guarded(closing.into_http(), guard));
            }
            let path = request.uri().path().to_string();
            if path.starts_with("/grpc.health.") || path.starts_with("/grpc.reflection.") {
                return inner
                    .call(request)
                    .await
                    .map(|response| guarded(response, guard));
            }
            let request_id = request
                .extensions()
                .get::<RequestId>()
                .map(|id| id.0.clone())
                .unwrap_or_default();
            let bearer = request
                .headers()
                .get(http::header::AUTHORIZATION)
                .map(|value| value.as_bytes().to_vec());
            let presented = valet_service::Presented {
                bearer: bearer.as_deref(),
                certificate: peer.as_ref().and_then(|peer| peer.certificate.as_deref()),
                source: peer.as_ref().map(|peer| peer.address.ip()),
            };
            match valet.authenticate(presented, &path, &request_id).await {
                Ok(caller) => {
                    tracing::Span::current().record("principal", caller.principal.name.as_str());
                    if let Some(connection) =
                        peer.as_ref().and_then(|peer| peer.connection.as_ref())
                    {
                        connection.authenticated(&caller.principal.name);
                    }
                    request.extensions_mut().insert(caller);
                    inner
                        .call(request)
                        .await
                        .map(|response| guarded(response, guard))
                }
                Err(error) => {
                    if let Some(left_out) = refusal_lines.take() {
                        tracing::warn!(reason = %error, left_out, "authentication failed");
                    }
                    // A throttled caller's answer waits, so its loop runs at the pace of its
                    // streams and connections (which are budgeted).
                    valet_gateway::budget::wait_out_pause(
                        peer.as_ref().and_then(|peer| peer.connection.as_ref()),
                        &mut guard,
                        error.answer_after(),
                    )
                    .await;
                    let response = status_of(&valet, error, &request_id).into_http();
                    Ok(guarded(response, guard))
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_method_labels_are_exactly_the_rpcs_in_the_proto_files() {
        let mut in_proto = Vec::new();
        for (service, text) in [
            (
                "valet.v1.Broker",
                include_str!("../../../proto/valet/v1/broker.proto"),
            ),
            (
                "valet.v1.Admin",
                include_str!("../../../proto/valet/v1/admin.proto"),
            ),
        ] {
            for line in text.lines() {
                if let Some(rest) = line.trim().strip_prefix("rpc ")
                    && let Some((name, _)) = rest.split_once('(')
                {
                    in_proto.push(format!("/{service}/{}", name.trim()));
                }
            }
        }
        let ours: Vec<&str> = METHODS
            .iter()
            .copied()
            .filter(|method| method.starts_with("/valet.v1."))
            .collect();
        assert_eq!(ours, in_proto);
        assert_eq!(method_label("/valet.v1.Broker/DropEverything"), "other");
        assert_eq!(code_label("7"), "7");
        assert_eq!(code_label("70"), "other");
    }
}
