//! The gateway: an HTTP reverse proxy inside valetd. An agent calls
//! `http://GATEWAY/u/<upstream>/<path>` with its valet token. A call passes through stages, each
//! in its own module: [`route`] (which upstream, or a document the gateway serves itself),
//! authorize (valet-service: token, grant, rule, approval, count, audit), [`forward`] (the
//! request built for the upstream: agent credentials stripped, the root credential injected),
//! [`stream`] (the answer streamed back with the root credential masked) and record (the closing
//! audit record, valet-service again). The gateway keeps no grant bookkeeping of its own.
//! [`listener`] accepts connections under the abuse limits, for the gRPC listener too.

pub mod budget;
mod forward;
mod held;
pub mod listener;
pub mod log_budget;
mod mask;
mod mcp;
mod response;
pub use response::{AnswerAfter, throttle_headers};
mod route;
mod stdio;
mod stream;
pub mod tls;
mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tracing::Instrument;
use valet_service::{CallSite, Valet};

/// The largest request head (request line or pseudo-headers, and headers) a listener reads: a
/// longer one is refused by the HTTP layer before anything else looks at it (nginx's default is
/// 8 KiB per line).
pub const MAX_REQUEST_HEAD: usize = 32 * 1024;
/// Requests one HTTP/2 connection may have open at once, on every listener.
pub const MAX_CONCURRENT_STREAMS: u32 = 100;
/// How long a client has to send a request's head (method, path, headers).
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// HTTP/2 connections are pinged this often, so a live one never looks idle...
pub const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
/// ...and one whose peer does not answer a ping within this is closed.
pub const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// The gateway: serves one listener until `shutdown` completes.
pub struct Gateway {
    valet: Arc<Valet>,
    upstreams: upstream::Clients,
    /// The MCP servers valetd runs.
    processes: stdio::Processes,
    /// MCP calls held open for an approval.
    held: Arc<held::HeldCalls>,
    /// Lines for refused calls in valetd's log.
    refusal_lines: log_budget::LogBudget,
}

impl Gateway {
    pub fn new(valet: Arc<Valet>) -> Arc<Gateway> {
        Arc::new(Gateway {
            valet,
            upstreams: upstream::Clients::default(),
            processes: stdio::Processes::default(),
            held: Arc::default(),
            refusal_lines: log_budget::LogBudget::default(),
        })
    }

    /// Accepts connections (HTTP/1.1 and HTTP/2) until `shutdown` resolves, then lets in-flight
    /// calls finish.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        limits: listener::Limits,
        tls: Option<Arc<tls::TlsMaterial>>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let mut acceptor = listener::Acceptor::start(
            listener,
            limits,
            "gateway",
            tls.map(|material| (material, tls::Listener::Gateway)),
        );
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        // Idle and dead stdio MCP servers are stopped, and those of ended grants and of
        // upstreams gone from the config.
        let reaper = {
            let gateway = self.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                    let idle_timeouts = gateway
                        .valet
                        .config()
                        .upstreams
                        .values()
                        .filter_map(|upstream| match &upstream.target {
                            valet_core::config::Target::Process(server) => {
                                Some((upstream.name.clone(), server.idle_timeout))
                            }
                            valet_core::config::Target::Url { .. } => None,
                        })
                        .collect();
                    gateway.processes.reap(&idle_timeouts).await;
                    // A process holds the root credential: it ends with its grant.
                    for (upstream, grant) in gateway.processes.grants().await {
                        if !gateway.valet.grant_is_active(&grant).await {
                            gateway.processes.stop(&upstream, &grant).await;
                        }
                    }
                }
            })
        };
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = acceptor.accept() => {
                    let Some((stream, peer)) = accepted else { break };
                    let (connection, peer) = (peer.connection, peer.address);
                    let gateway = self.clone();
                    let service = hyper::service::service_fn(move |mut request: http::Request<hyper::body::Incoming>| {
                        let gateway = gateway.clone();
                        // In flight until its answer has been sent; the connection handle lets
                        // authorization mark the connection authenticated.
                        let mut guard = connection.as_ref().map(budget::ConnectionHandle::request);
                        let handle = connection.clone();
                        if let Some(connection) = &connection {
                            request.extensions_mut().insert(connection.clone());
                        }
                        async move {
                            if handle.as_ref().is_some_and(budget::ConnectionHandle::closing) {
                                let closing = response::json(
                                    http::StatusCode::SERVICE_UNAVAILABLE,
                                    &serde_json::json!({"error": "connection_closing", "message": budget::CLOSING}),
                                );
                                return Ok(closing.map(|body| budget::GuardedBody::new(body, guard)));
                            }
                            let response = gateway.handle(request, peer).await;
                            // A throttled caller's answer waits, so its loop runs at the pace
                            // of its (budgeted) connections.
                            let pause = response.extensions().get().map_or(std::time::Duration::ZERO, |response::AnswerAfter(pause)| *pause);
                            budget::wait_out_pause(handle.as_ref(), &mut guard, pause).await;
                            Ok::<_, std::convert::Infallible>(response.map(|body| budget::GuardedBody::new(body, guard)))
                        }
                    });
                    let connection = connection_builder().serve_connection(TokioIo::new(stream), service).into_owned();
                    let connection = graceful.watch(connection);
                    tokio::spawn(async move {
                        if let Err(error) = connection.await {
                            tracing::debug!(%error, "gateway connection ended with an error");
                        }
                    });
                }
                _ = &mut shutdown => break,
            }
        }
        tokio::select! {
            _ = graceful.shutdown() => {}
            _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => tracing::warn!("gateway connections still open after 5 s; stopping anyway"),
        }
        reaper.abort();
        self.processes.stop_all().await;
    }

    /// One call, stage by stage.
    async fn handle(
        self: &Arc<Self>,
        request: http::Request<hyper::body::Incoming>,
        peer: SocketAddr,
    ) -> http::Response<response::Body> {
        // Readiness follows the store: without it the broker fails closed, so a load balancer
        // or Kubernetes should send nothing here (liveness is /healthz).
        if request.uri().path() == "/readyz" {
            let (status, state) = if self.valet.store_reachable().await {
                (http::StatusCode::OK, "ready")
            } else {
                (http::StatusCode::SERVICE_UNAVAILABLE, "store unreachable")
            };
            return response::json(status, &serde_json::json!({ "status": state }));
        }
        let (site, request) = match route::route(&self.valet, request, peer) {
            route::Routed::Served(response) => return response,
            route::Routed::NotFound(site) => {
                let error = self
                    .valet
                    .refuse_call(&site, valet_core::call::CallRefusal::NotFound)
                    .await;
                return response::error_response(&self.valet, &error, None);
            }
            route::Routed::Upstream(site, request) => (site, request),
            route::Routed::Mcp(site, request) => {
                let span = call_span(&site, "mcp");
                return mcp::handle(self, *request, site).instrument(span).await;
            }
        };
        let span = call_span(&site, "gateway");
        self.forward_call(site, *request).instrument(span).await
    }

    /// A call routed to an upstream: authorize it, then forward what was checked.
    async fn forward_call(
        self: &Arc<Self>,
        site: CallSite,
        request: http::Request<hyper::body::Incoming>,
    ) -> http::Response<response::Body> {
        let (parts, body) = request.into_parts();
        // The connection counts as authenticated once the token is, before the body is read.
        let connection = parts.extensions.get::<budget::ConnectionHandle>().cloned();
        let authenticated = move |principal: &str| {
            if let Some(connection) = &connection {
                connection.authenticated(principal);
            }
        };
        let decision = self
            .valet
            .authorize_call(valet_service::CallRequest {
                site: &site,
                authorization: parts
                    .headers
                    .get(http::header::AUTHORIZATION)
                    .and_then(|value| value.to_str().ok()),
                approval: parts
                    .headers
                    .get("valet-approval")
                    .and_then(|value| value.to_str().ok()),
                content_types: header_values(&parts.headers, http::header::CONTENT_TYPE),
                content_encodings: header_values(&parts.headers, http::header::CONTENT_ENCODING),
                headers: parts
                    .headers
                    .iter()
                    .map(|(name, value)| (name.as_str(), value.as_bytes()))
                    .collect(),
                body: Box::new(route::IncomingBody::new(&parts.headers, body)),
                on_authenticated: Some(&authenticated),
            })
            .await;
        let decision = match decision {
            Ok(decision) => decision,
            Err(denial) => {
                if let Some(left_out) = self.refusal_lines.take() {
                    tracing::info!(request_id = site.request_id, reason = %self.valet.redact(&denial.error.to_string()), left_out, "gateway call refused");
                }
                return response::error_response(
                    &self.valet,
                    &denial.error,
                    denial.grant_id.as_deref(),
                );
            }
        };
        forward::forward(self, parts, decision).await
    }
}

/// Every value of a header, as sent; a value that is not text stands as itself in a form no
/// check accepts, so it is refused rather than overlooked.
pub(crate) fn header_values(
    headers: &http::HeaderMap,
    name: http::header::HeaderName,
) -> Vec<&str> {
    headers
        .get_all(name)
        .iter()
        .map(|value| value.to_str().unwrap_or("(not text)"))
        .collect()
}

/// How valetd's HTTP listeners (the gateway, the console) serve a connection: HTTP/1.1 or
/// HTTP/2; an HTTP/1.1 client must send its request head within [`HEADER_READ_TIMEOUT`], and an
/// HTTP/2 connection is pinged every [`KEEPALIVE_INTERVAL`] and closed when a ping goes unanswered
/// for [`KEEPALIVE_TIMEOUT`].
pub fn connection_builder() -> hyper_util::server::conn::auto::Builder<TokioExecutor> {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_REQUEST_HEAD);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(KEEPALIVE_INTERVAL))
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .max_header_list_size(MAX_REQUEST_HEAD as u32)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS);
    builder
}

/// The span of one gateway call, named by kind, with the request id its log lines and audit
/// records carry (exported as a trace when tracing is configured).
fn call_span(site: &CallSite, kind: &'static str) -> tracing::Span {
    tracing::info_span!(
        "gateway",
        kind,
        request_id = %site.request_id,
        upstream = %site.upstream,
        method = %site.method,
    )
}
