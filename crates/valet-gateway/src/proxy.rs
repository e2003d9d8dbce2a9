//! One call through the gateway, in order: route, authenticate the token, read the grant, match a
//! rule (method, path, and for GraphQL the parsed body), count the call, audit the decision, then
//! forward with the agent's credentials stripped and the root credential injected, and stream
//! the answer back while counting it for the closing audit record.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::Frame;
use valet_core::audit::{AuditEvent, Outcome};
use valet_core::config::{Injection, Scope, Upstream, is_credential_header};
use valet_core::grant::Grant;
use valet_core::rules::{self, AllowRule};
use valet_core::token::{self, Expectations};

use crate::graphql::{self, AskedField};
use crate::mask::Masker;
use crate::response::{self, Body, BoxError, GatewayError};
use crate::{BrokerError, Gateway};
use valet_core::approval::CallFingerprint;

/// How many times counting a call is retried against concurrent calls of the same grant.
const MAX_CAS_ATTEMPTS: usize = 16;

/// Headers that belong to one connection, never forwarded (RFC 9110 section 7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// What the audit records of one call share.
struct CallRecord {
    request_id: String,
    grant: Option<Grant>,
    upstream: String,
    method: String,
    path: String,
    peer: SocketAddr,
}

impl CallRecord {
    fn event(&self, action: &str, outcome: Outcome) -> AuditEvent {
        let mut event = AuditEvent::new(action, outcome)
            .with("request_id", &self.request_id)
            .with("upstream", &self.upstream)
            .with("method", &self.method)
            .with("path", &self.path)
            .with("peer", self.peer.ip().to_string());
        if let Some(grant) = &self.grant {
            event = event.with_grant(grant).with("principal", &grant.principal);
        }
        event
    }
}

pub async fn handle(
    gateway: &Gateway,
    request: http::Request<hyper::body::Incoming>,
    peer: SocketAddr,
) -> http::Response<Body> {
    let broker = &gateway.broker;
    let path = request.uri().path().to_string();
    match path.as_str() {
        "/healthz" => {
            return response::json(http::StatusCode::OK, &serde_json::json!({"status": "ok"}));
        }
        "/.well-known/jwks.json" => {
            let keys: Vec<serde_json::Value> = broker
                .key_ring()
                .jwks()
                .iter()
                .map(|jwk| serde_json::to_value(jwk).unwrap_or_default())
                .collect();
            return response::json(http::StatusCode::OK, &serde_json::json!({ "keys": keys }));
        }
        "/.well-known/openid-configuration" => {
            let host = request
                .headers()
                .get(header::HOST)
                .and_then(|host| host.to_str().ok())
                .unwrap_or("localhost");
            return response::json(
                http::StatusCode::OK,
                &serde_json::json!({
                    "issuer": broker.config().server.issuer,
                    "jwks_uri": format!("http://{host}/.well-known/jwks.json"),
                    "id_token_signing_alg_values_supported": [token::ALGORITHM],
                    "token_endpoint_auth_signing_alg_values_supported": [token::ALGORITHM],
                }),
            );
        }
        _ => {}
    }
    let request_id = valet_core::random::bytes::<8>()
        .map(hex_encode)
        .unwrap_or_default();
    let Some((upstream_name, upstream_path)) = path
        .strip_prefix("/u/")
        .map(|rest| rest.split_once('/').unwrap_or((rest, "")))
    else {
        return response::error_response(&GatewayError::NotFound, None, &|text| {
            broker.redact(text)
        });
    };
    let mut record = CallRecord {
        request_id,
        grant: None,
        upstream: upstream_name.to_string(),
        method: request.method().to_string(),
        path: format!("/{upstream_path}"),
        peer,
    };
    let started = Instant::now();
    match forward(gateway, request, &mut record, started).await {
        Ok(response) => response,
        Err(error) => {
            let mut event = record
                .event("gateway.call", Outcome::Denied)
                .with("reason", error.to_string())
                .with("status", error.status().as_u16().to_string());
            if let GatewayError::Denied { asked, rules, .. } = &error {
                event = event.with("asked", asked).with("rules", rules);
            }
            if matches!(
                error,
                GatewayError::UpstreamFailed { .. } | GatewayError::UpstreamTimeout { .. }
            ) {
                event = event.with_value("outcome", serde_json::Value::from("failed"));
            }
            let grant_id = record.grant.as_ref().map(|grant| grant.id.clone());
            // Unavailable means the audit log itself failed: do not try it again.
            if !matches!(error, GatewayError::Unavailable(_))
                && let Err(audit_error) = broker.audit(event).await
            {
                let unavailable = GatewayError::Unavailable(audit_error.to_string());
                return response::error_response(&unavailable, grant_id.as_deref(), &|text| {
                    broker.redact(text)
                });
            }
            tracing::info!(request_id = record.request_id, status = error.status().as_u16(), reason = %broker.redact(&error.to_string()), "gateway call refused");
            response::error_response(&error, grant_id.as_deref(), &|text| broker.redact(text))
        }
    }
}

async fn forward(
    gateway: &Gateway,
    request: http::Request<hyper::body::Incoming>,
    record: &mut CallRecord,
    started: Instant,
) -> Result<http::Response<Body>, GatewayError> {
    let broker = &gateway.broker;
    let config = broker.config();
    let upstream = config
        .upstreams
        .get(&record.upstream)
        .cloned()
        .ok_or_else(|| GatewayError::UnknownUpstream {
            name: record.upstream.clone(),
            known: config
                .upstreams
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
        })?;

    // The token, verified with the audience pinned to this upstream.
    let token = bearer_token(request.headers()).ok_or(GatewayError::NoToken)?;
    let expectations = Expectations {
        issuer: &config.server.issuer,
        audience: Some(&upstream.name),
        now: broker.now(),
        leeway_seconds: 0,
    };
    let claims = token::verify(token, broker.key_ring().as_ref(), expectations)
        .map_err(GatewayError::BadToken)?;
    let grant = broker
        .grant(&claims.jti)
        .await
        .map_err(unavailable)?
        .ok_or(GatewayError::UnknownGrant)?;
    record.grant = Some(grant.clone());
    if let Some(reason) = grant.inactive_reason(broker.now()) {
        return Err(GatewayError::Inactive(reason));
    }
    let scope = config
        .scopes
        .get(&grant.scope)
        .ok_or_else(|| GatewayError::Denied {
            scope: grant.scope.clone(),
            rules: "(none: the scope is no longer in the config)".into(),
            asked: format!("{} {}", record.method, record.path),
            reason: format!("scope {:?} no longer exists", grant.scope),
        })?;
    if scope.upstream.as_deref() != Some(upstream.name.as_str()) {
        return Err(GatewayError::WrongUpstream {
            scope: scope.name.clone(),
            upstream: upstream.name.clone(),
        });
    }

    // The path, refused if it could mean something else upstream.
    let segments = rules::normalized_segments(&record.path).map_err(GatewayError::BadPath)?;
    let method = record.method.clone();
    let candidates: Vec<&AllowRule> = scope
        .allow
        .iter()
        .filter(|rule| rule.matches(&method, &segments, &grant.params))
        .collect();
    if candidates.is_empty() {
        return Err(GatewayError::Denied {
            scope: scope.name.clone(),
            rules: rules_summary(scope),
            asked: format!("{method} {}", record.path),
            reason: format!(
                "no rule of scope {:?} allows {method} {}",
                scope.name, record.path
            ),
        });
    }

    // The body, read whole up to the largest limit of the candidate rules: the check runs on
    // exactly the bytes that are forwarded.
    let max_body = candidates
        .iter()
        .map(|rule| rule.max_body)
        .max()
        .unwrap_or(rules::DEFAULT_MAX_BODY);
    if let Some(length) = content_length(request.headers())
        && length > max_body
    {
        return Err(GatewayError::BodyTooLarge { max: max_body });
    }
    let (parts, body) = request.into_parts();
    let body = match Limited::new(body, usize::try_from(max_body).unwrap_or(usize::MAX))
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => {
            return Err(GatewayError::BodyTooLarge { max: max_body });
        }
        Err(error) => return Err(GatewayError::BadBody(error.to_string())),
    };
    let (rule, asked_fields) = choose_rule(scope, &candidates, &body)?;

    // A rule that needs approval forwards only the identical call a person approved, once.
    if let Some(policy) = &rule.approval {
        let call = fingerprint(
            &record.method,
            &record.path,
            parts.uri.query(),
            &body,
            &asked_fields,
            rule.graphql.is_some(),
        );
        match parts
            .headers
            .get("valet-approval")
            .and_then(|value| value.to_str().ok())
        {
            None => {
                let approval_id = broker
                    .request_call_approval(&grant, policy, call.clone(), &record.request_id)
                    .await
                    .map_err(unavailable)?;
                return Err(GatewayError::ApprovalRequired {
                    approval_id,
                    call: Box::new(call),
                });
            }
            Some(id) => match broker
                .consume_call_approval(id.trim(), &grant, &call, &record.request_id)
                .await
            {
                Ok(()) => {}
                Err(BrokerError::Refused {
                    reason,
                    pending: true,
                }) => {
                    tracing::debug!(%reason, "approval still pending");
                    return Err(GatewayError::ApprovalRequired {
                        approval_id: id.trim().to_string(),
                        call: Box::new(call),
                    });
                }
                Err(BrokerError::Refused { reason, .. }) => {
                    return Err(GatewayError::ApprovalRefused(reason));
                }
                Err(error) => return Err(unavailable(error)),
            },
        }
    }

    // Count the call against the grant and the rule, then record the decision.
    let grant = count_call(gateway, grant, rule).await?;
    record.grant = Some(grant.clone());
    let fields: Vec<String> = asked_fields.iter().map(ToString::to_string).collect();
    let mut decision = record
        .event("gateway.call", Outcome::Allowed)
        .with("rule", rule.to_string());
    if !fields.is_empty() {
        decision = decision.with_value("graphql", serde_json::Value::from(fields.clone()));
    }
    broker.audit(decision).await.map_err(unavailable)?;

    // Forward.
    let secret = broker.credential(&upstream.credential).ok_or_else(|| {
        GatewayError::Unavailable(format!(
            "credential {:?} is not loaded",
            upstream.credential
        ))
    })?;
    let upstream_request = upstream_request(&upstream, parts, body, &secret)?;
    let client =
        gateway
            .upstreams
            .client_for(&upstream)
            .map_err(|detail| GatewayError::UpstreamFailed {
                upstream: upstream.name.clone(),
                detail,
            })?;
    let answer =
        match tokio::time::timeout(upstream.timeout, client.request(upstream_request)).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(error)) => {
                return Err(GatewayError::UpstreamFailed {
                    upstream: upstream.name.clone(),
                    detail: error_chain(&error),
                });
            }
            Err(_) => {
                return Err(GatewayError::UpstreamTimeout {
                    upstream: upstream.name.clone(),
                    seconds: upstream.timeout.as_secs(),
                });
            }
        };
    let (mut parts, upstream_body) = answer.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let masker = masker_for(&upstream, &secret);
    for value in parts.headers.values_mut() {
        if let Some(masked) = masker.mask_once(value.as_bytes())
            && let Ok(masked) = HeaderValue::from_bytes(&masked)
        {
            *value = masked;
        }
    }
    let status = parts.status.as_u16();
    let closing = Closing {
        broker: gateway.broker.clone(),
        event: Some(
            record
                .event("gateway.response", Outcome::Allowed)
                .with("rule", rule.to_string())
                .with("status", status.to_string()),
        ),
        bytes: 0,
        started,
    };
    Ok(http::Response::from_parts(
        parts,
        counted(upstream_body, masker, closing),
    ))
}

/// Picks the first candidate rule that allows the body; GraphQL rules parse it.
fn choose_rule<'a>(
    scope: &Scope,
    candidates: &[&'a AllowRule],
    body: &Bytes,
) -> Result<(&'a AllowRule, Vec<AskedField>), GatewayError> {
    let mut first_denial = None;
    for rule in candidates {
        if body.len() as u64 > rule.max_body {
            first_denial.get_or_insert(GatewayError::BodyTooLarge { max: rule.max_body });
            continue;
        }
        match &rule.graphql {
            None => return Ok((rule, Vec::new())),
            Some(allow) => match graphql::check(body, allow) {
                Ok(fields) => return Ok((rule, fields)),
                Err(denial) => {
                    first_denial.get_or_insert(GatewayError::from_graphql(
                        &scope.name,
                        rules_summary(scope),
                        denial,
                    ));
                }
            },
        }
    }
    Err(first_denial.unwrap_or_else(|| GatewayError::Denied {
        scope: scope.name.clone(),
        rules: rules_summary(scope),
        asked: "this call".into(),
        reason: "no rule allows it".into(),
    }))
}

/// Records one call on the grant when a limit applies (compare-and-swap, so concurrent calls
/// never both take the last use).
async fn count_call(
    gateway: &Gateway,
    mut grant: Grant,
    rule: &AllowRule,
) -> Result<Grant, GatewayError> {
    if grant.max_uses.is_none() && rule.max_calls.is_none() {
        return Ok(grant);
    }
    let broker = &gateway.broker;
    for _ in 0..MAX_CAS_ATTEMPTS {
        let next = grant
            .called(rule, broker.now())
            .map_err(GatewayError::CallRefused)?;
        match broker.update_grant(&grant, &next).await {
            Ok(()) => return Ok(next),
            Err(BrokerError::Conflict) => {
                grant = broker
                    .grant(&grant.id)
                    .await
                    .map_err(unavailable)?
                    .ok_or(GatewayError::UnknownGrant)?;
            }
            Err(error) => return Err(unavailable(error)),
        }
    }
    Err(GatewayError::Unavailable(format!(
        "grant {} is changing too fast to count this call",
        grant.id
    )))
}

fn upstream_request(
    upstream: &Upstream,
    parts: http::request::Parts,
    body: Bytes,
    secret: &valet_core::Secret,
) -> Result<http::Request<Full<Bytes>>, GatewayError> {
    let secret_text = secret.expose_str().ok_or_else(|| {
        GatewayError::Unavailable(format!("credential {:?} is not text", upstream.credential))
    })?;
    let forwarded_path = parts
        .uri
        .path()
        .strip_prefix("/u/")
        .and_then(|rest| rest.find('/').map(|position| &rest[position..]))
        .unwrap_or("/");
    let mut query: Vec<&str> = parts
        .uri
        .query()
        .map(|query| query.split('&').filter(|pair| !pair.is_empty()).collect())
        .unwrap_or_default();
    let injected_query;
    if let Injection::Query { name, template } = &upstream.inject {
        // The agent may not set the parameter the root credential goes in.
        query.retain(|pair| pair.split('=').next() != Some(name.as_str()));
        injected_query = format!(
            "{}={}",
            percent_encode(name),
            percent_encode(&template.replace("{secret}", secret_text))
        );
        query.push(&injected_query);
    }
    let mut uri = format!(
        "{}://{}{}{}",
        if upstream.base_url.https {
            "https"
        } else {
            "http"
        },
        upstream.base_url.authority,
        upstream.base_url.path,
        forwarded_path
    );
    if !query.is_empty() {
        uri.push('?');
        uri.push_str(&query.join("&"));
    }
    let uri: http::Uri = uri
        .parse()
        .map_err(|_| GatewayError::BadPath(rules::PathError::BadCharacter))?;

    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    let credential_like: Vec<HeaderName> = headers
        .keys()
        .filter(|name| is_credential_header(name.as_str()))
        .cloned()
        .collect();
    for name in credential_like {
        headers.remove(name);
    }
    headers.remove(header::HOST);
    headers.remove(header::CONTENT_LENGTH);
    for (name, value) in &upstream.headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::try_from(name.as_str()),
            HeaderValue::try_from(value.as_str()),
        ) {
            headers.insert(name, value);
        }
    }
    if let Injection::Header { name, template } = &upstream.inject {
        let name = HeaderName::try_from(name.as_str())
            .map_err(|error| GatewayError::Unavailable(error.to_string()))?;
        let mut value =
            HeaderValue::try_from(template.replace("{secret}", secret_text)).map_err(|_| {
                GatewayError::Unavailable(format!(
                    "credential {:?} cannot be sent in a header",
                    upstream.credential
                ))
            })?;
        value.set_sensitive(true);
        headers.insert(name, value);
    }
    let mut request = http::Request::new(Full::new(body));
    *request.method_mut() = parts.method;
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    Ok(request)
}

/// The identity of a call for approval: method, target, body hash, and what people need to read.
fn fingerprint(
    method: &str,
    path: &str,
    query: Option<&str>,
    body: &Bytes,
    fields: &[AskedField],
    is_graphql: bool,
) -> CallFingerprint {
    let target = match query {
        Some(query) => format!("{path}?{query}"),
        None => path.to_string(),
    };
    let digest = ring::digest::digest(&ring::digest::SHA256, body);
    let variables = if is_graphql {
        serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|value| match value {
                serde_json::Value::Object(object) => object
                    .get("variables")
                    .filter(|variables| !variables.is_null())
                    .map(ToString::to_string),
                serde_json::Value::Array(items) => {
                    let all: Vec<serde_json::Value> = items
                        .iter()
                        .filter_map(|item| item.get("variables").cloned())
                        .collect();
                    (!all.is_empty()).then(|| serde_json::Value::Array(all).to_string())
                }
                _ => None,
            })
    } else {
        None
    };
    CallFingerprint {
        method: method.to_string(),
        target,
        body_sha256: digest
            .as_ref()
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect(),
        graphql: fields.iter().map(ToString::to_string).collect(),
        variables,
    }
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| {
            value
                .split(',')
                .map(|name| name.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .collect();
    for name in HOP_BY_HOP.iter().map(|name| name.to_string()).chain(listed) {
        headers.remove(name.as_str());
    }
}

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|token| !token.is_empty())
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

fn rules_summary(scope: &Scope) -> String {
    let rules: Vec<String> = scope
        .allow
        .iter()
        .map(|rule| match &rule.graphql {
            None => rule.to_string(),
            Some(allow) => format!(
                "{rule} graphql query [{}] mutation [{}]",
                allow.query.iter().cloned().collect::<Vec<_>>().join(", "),
                allow
                    .mutation
                    .iter()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
        .collect();
    format!("scope {}: {}", scope.name, rules.join("; "))
}

fn unavailable(error: BrokerError) -> GatewayError {
    GatewayError::Unavailable(error.to_string())
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn hex_encode(bytes: [u8; 8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Writes the closing audit record (status, bytes, latency) when the response body ends — or is
/// dropped half-way because the agent went away.
struct Closing {
    broker: Arc<dyn crate::Broker>,
    event: Option<AuditEvent>,
    bytes: u64,
    started: Instant,
}

impl Closing {
    fn finish(&mut self, complete: bool) {
        let Some(event) = self.event.take() else {
            return;
        };
        let event = event
            .with_value("bytes", serde_json::Value::from(self.bytes))
            .with_value(
                "latency_ms",
                serde_json::Value::from(self.started.elapsed().as_secs_f64() * 1000.0),
            )
            .with_value("complete", serde_json::Value::from(complete));
        let broker = self.broker.clone();
        tokio::spawn(async move {
            if let Err(error) = broker.audit(event).await {
                tracing::error!(%error, "cannot write the closing audit record of a gateway call");
            }
        });
    }
}

impl Drop for Closing {
    fn drop(&mut self) {
        self.finish(false);
    }
}

/// The secret as the upstream leg carries it: raw, and for query injection also
/// percent-encoded, so an echo of either form is caught.
fn masker_for(upstream: &Upstream, secret: &valet_core::Secret) -> Masker {
    let mut needles = vec![secret.expose().to_vec()];
    if let Injection::Query { .. } = &upstream.inject
        && let Some(text) = secret.expose_str()
    {
        needles.push(percent_encode(text).into_bytes());
    }
    Masker::new(needles)
}

/// The upstream's body, streamed frame by frame as it arrives, with the root credential masked,
/// counted for the closing record.
fn counted(body: hyper::body::Incoming, masker: Masker, closing: Closing) -> Body {
    let stream = futures::stream::unfold(
        (Some(body), masker, closing),
        |(body, mut masker, mut closing)| async move {
            let mut body = body?;
            loop {
                match body.frame().await {
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => {
                            closing.bytes += data.len() as u64;
                            let ready = masker.push(&data);
                            if ready.is_empty() {
                                continue;
                            }
                            return Some((Ok(Frame::data(ready)), (Some(body), masker, closing)));
                        }
                        // Trailers pass through.
                        Err(frame) => return Some((Ok(frame), (Some(body), masker, closing))),
                    },
                    Some(Err(error)) => {
                        return Some((
                            Err(Box::new(error) as BoxError),
                            (Some(body), masker, closing),
                        ));
                    }
                    None => {
                        closing.finish(true);
                        let rest = masker.finish();
                        if rest.is_empty() {
                            return None;
                        }
                        return Some((Ok(Frame::data(rest)), (None, masker, closing)));
                    }
                }
            }
        },
    );
    BodyExt::boxed(StreamBody::new(stream))
}

impl std::fmt::Debug for Closing {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Closing")
            .field("bytes", &self.bytes)
            .finish()
    }
}
