//! Routing, the first stage: the documents the gateway serves itself (health, JWKS, OpenID
//! discovery), and for `/u/<upstream>/<path>` and `/mcp/<upstream>` the call site every later
//! stage and record names.

use std::net::SocketAddr;

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{self, HeaderMap};
use http_body_util::{BodyExt, Limited};
use valet_core::call::CallRefusal;
use valet_core::token;
use valet_service::{BodySource, CallSite, Valet};

use crate::response::{self, Body};

/// Where a request goes.
pub enum Routed {
    /// Answered by the gateway itself.
    Served(http::Response<Body>),
    /// Not a route the gateway serves.
    NotFound(CallSite),
    /// A call to an upstream.
    Upstream(CallSite, Box<http::Request<hyper::body::Incoming>>),
    /// JSON-RPC for an MCP upstream (`/mcp/<upstream>`).
    Mcp(CallSite, Box<http::Request<hyper::body::Incoming>>),
}

pub fn route(
    valet: &Valet,
    request: http::Request<hyper::body::Incoming>,
    peer: SocketAddr,
) -> Routed {
    let path = request.uri().path().to_string();
    match path.as_str() {
        "/healthz" => {
            let exposed: Vec<String> = valet
                .config()
                .server
                .plaintext_listeners_off_loopback()
                .iter()
                .map(|(listener, address)| format!("{listener} on {address}"))
                .collect();
            let body = if exposed.is_empty() {
                serde_json::json!({"status": "ok"})
            } else {
                serde_json::json!({"status": "ok", "plaintext_off_loopback": exposed})
            };
            return Routed::Served(response::json(http::StatusCode::OK, &body));
        }
        "/.well-known/jwks.json" => {
            let keys: Vec<serde_json::Value> = valet
                .jwks()
                .iter()
                .map(|jwk| serde_json::to_value(jwk).unwrap_or_default())
                .collect();
            return Routed::Served(response::json(
                http::StatusCode::OK,
                &serde_json::json!({ "keys": keys }),
            ));
        }
        "/.well-known/openid-configuration" => {
            let host = request
                .headers()
                .get(header::HOST)
                .and_then(|host| host.to_str().ok())
                .unwrap_or("localhost");
            return Routed::Served(response::json(
                http::StatusCode::OK,
                &serde_json::json!({
                    "issuer": valet.config().server.issuer,
                    "jwks_uri": format!(
                        "{}://{host}/.well-known/jwks.json",
                        if valet.config().server.tls.is_some() { "https" } else { "http" }
                    ),
                    "id_token_signing_alg_values_supported": [token::ALGORITHM],
                    "token_endpoint_auth_signing_alg_values_supported": [token::ALGORITHM],
                }),
            ));
        }
        _ => {}
    }
    let request_id = valet_core::random::bytes::<8>()
        .map(hex_encode)
        .unwrap_or_default();
    let site = |upstream: &str, upstream_path: &str| CallSite {
        request_id: request_id.clone(),
        peer,
        upstream: upstream.to_string(),
        method: request.method().to_string(),
        path: format!("/{upstream_path}"),
        query: request.uri().query().map(str::to_string),
    };
    if let Some(upstream) = path.strip_prefix("/mcp/") {
        let upstream = upstream.strip_suffix('/').unwrap_or(upstream);
        if !upstream.is_empty() && !upstream.contains('/') {
            let site = site(upstream, "");
            return Routed::Mcp(site, Box::new(request));
        }
    }
    match path
        .strip_prefix("/u/")
        .map(|rest| rest.split_once('/').unwrap_or((rest, "")))
    {
        Some((upstream, upstream_path)) => {
            let site = site(upstream, upstream_path);
            Routed::Upstream(site, Box::new(request))
        }
        None => Routed::NotFound(CallSite {
            path: path.clone(),
            ..site("", "")
        }),
    }
}

/// How long an agent may take to send a request body: a slow sender holds a connection, not a
/// worker, and not for long.
const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The agent's request body, read only when authorization asks for it.
pub struct IncomingBody {
    declared_length: Option<u64>,
    body: hyper::body::Incoming,
}

impl IncomingBody {
    pub fn new(headers: &HeaderMap, body: hyper::body::Incoming) -> IncomingBody {
        IncomingBody {
            declared_length: headers
                .get(header::CONTENT_LENGTH)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.parse().ok()),
            body,
        }
    }
}

#[async_trait]
impl BodySource for IncomingBody {
    fn declared_length(&self) -> Option<u64> {
        self.declared_length
    }

    async fn read(self: Box<Self>, max: u64) -> Result<Bytes, CallRefusal> {
        let reading = Limited::new(self.body, usize::try_from(max).unwrap_or(usize::MAX)).collect();
        let Ok(read) = tokio::time::timeout(BODY_READ_TIMEOUT, reading).await else {
            return Err(CallRefusal::BadBody(format!(
                "the body did not arrive within {} s",
                BODY_READ_TIMEOUT.as_secs()
            )));
        };
        match read {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(error) if error.is::<http_body_util::LengthLimitError>() => {
                Err(CallRefusal::BodyTooLarge { max })
            }
            Err(error) => Err(CallRefusal::BadBody(error.to_string())),
        }
    }
}

fn hex_encode(bytes: [u8; 8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}
