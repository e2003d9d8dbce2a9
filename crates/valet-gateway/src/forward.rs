//! Forwarding, the third stage: the request the upstream receives, built from the authorized
//! call only — its canonical path and query, its checked body, an allowlist of the agent's headers
//! (never one that overrides the method, rewrites the path, asks for a range or an encoding, or
//! carries a credential), the root credential injected on this leg only — sent with the
//! upstream's timeout, while the call's audit record is synced; the answer goes on to
//! [`crate::stream`] only once that record is durable, and only when it can be masked: unencoded
//! and whole.

use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http_body_util::Full;
use valet_core::call::CallRefusal;
use valet_core::config::{Injection, Target, Upstream};
use valet_core::rules;
use valet_service::CallDecision;

use crate::Gateway;
use crate::response::{self, Body};
use crate::stream::{self, Closing};

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

/// Sends the authorized call upstream and streams the answer back; a failure to reach the
/// upstream is recorded and answered.
pub async fn forward(
    gateway: &Gateway,
    parts: http::request::Parts,
    mut decision: CallDecision,
) -> http::Response<Body> {
    let started = Instant::now();
    let valet = &gateway.valet;
    // A credential the answer could not be masked for is never sent.
    let masker = match stream::masker_for(&decision.secret) {
        Ok(masker) => masker,
        Err(too_long) => {
            let refusal = CallRefusal::UpstreamFailed {
                upstream: decision.upstream.name.clone(),
                detail: too_long.to_string(),
            };
            let error = valet.call_failed(&decision, refusal).await;
            return response::error_response(valet, &error, Some(&decision.grant.id));
        }
    };
    let sent = send(gateway, parts, &decision).await;
    // The call's record was written before the call left; nothing of the answer reaches the
    // agent before that record is on disk.
    if let Err(error) = valet.call_record_durable(&mut decision).await {
        return response::error_response(valet, &error, Some(&decision.grant.id));
    }
    let answer = sent.and_then(
        |answer| match unmaskable(answer.headers(), answer.status()) {
            None => Ok(answer),
            Some(detail) => Err(CallRefusal::UpstreamFailed {
                upstream: decision.upstream.name.clone(),
                detail,
            }),
        },
    );
    let answer = match answer {
        Ok(answer) => answer,
        Err(refusal) => {
            let error = valet.call_failed(&decision, refusal).await;
            return response::error_response(valet, &error, Some(&decision.grant.id));
        }
    };
    let (parts, upstream_body) = answer.into_parts();
    let status = parts.status;
    // The gateway's own response: the upstream's status code, never its reason phrase (hyper
    // keeps a non-standard one in the extensions); only the answer headers clients read, masked.
    let mut response = http::Response::new(());
    *response.status_mut() = status;
    *response.headers_mut() = answer_headers(&parts.headers, &masker);
    let closing = Closing::new(valet.clone(), decision, status.as_u16(), started);
    let (parts, ()) = response.into_parts();
    http::Response::from_parts(parts, stream::masked(upstream_body, masker, closing))
}

/// The headers of an upstream's answer an agent receives: what clients read about a body, a
/// redirect, caching and retrying, each masked. Everything else — `Set-Cookie` (a session the
/// root credential opened would carry its authority), `Content-Length` (masking changes lengths),
/// diagnostics and custom headers an upstream may reflect the request into — is dropped.
pub const ANSWER_HEADERS: [&str; 24] = [
    "content-type",
    "content-language",
    "content-disposition",
    "cache-control",
    "etag",
    "last-modified",
    "expires",
    "location",
    "retry-after",
    "link",
    "vary",
    "www-authenticate",
    "x-request-id",
    "x-github-request-id",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "x-ratelimit-used",
    "x-ratelimit-resource",
    "ratelimit",
    "ratelimit-policy",
    "ratelimit-limit",
    "ratelimit-remaining",
    "ratelimit-reset",
];

/// The allowlisted answer headers, masked; a value that masking makes unusable as a header is
/// dropped.
pub fn answer_headers(sent: &HeaderMap, masker: &crate::mask::Masker) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in sent {
        if !ANSWER_HEADERS.contains(&name.as_str()) {
            continue;
        }
        if let Ok(masked) = HeaderValue::from_bytes(&masker.mask_whole(value.as_bytes())) {
            headers.append(name.clone(), masked);
        }
    }
    headers
}

async fn send(
    gateway: &Gateway,
    parts: http::request::Parts,
    decision: &CallDecision,
) -> Result<http::Response<hyper::body::Incoming>, CallRefusal> {
    let request = upstream_request(&decision.upstream, parts, decision)?;
    send_request(gateway, &decision.upstream, request).await
}

/// Sends a request built for `upstream` on its connection pool, within its timeout (to the
/// answer's head; the body then streams).
pub async fn send_request(
    gateway: &Gateway,
    upstream: &Upstream,
    request: http::Request<Full<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, CallRefusal> {
    let client = gateway
        .upstreams
        .client_for(upstream)
        .await
        .map_err(|detail| CallRefusal::UpstreamFailed {
            upstream: upstream.name.clone(),
            detail,
        })?;
    match tokio::time::timeout(upstream.timeout, client.request(request)).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(error)) => Err(CallRefusal::UpstreamFailed {
            upstream: upstream.name.clone(),
            detail: error_chain(&error),
        }),
        Err(_) => Err(CallRefusal::UpstreamTimeout {
            upstream: upstream.name.clone(),
            seconds: upstream.timeout.as_secs(),
        }),
    }
}

fn upstream_request(
    upstream: &Upstream,
    parts: http::request::Parts,
    decision: &CallDecision,
) -> Result<http::Request<Full<Bytes>>, CallRefusal> {
    let mut headers = forwarded_headers(decision);
    let uri = upstream_leg(
        upstream,
        &decision.site.path,
        decision.site.query.as_deref(),
        &decision.secret,
        &mut headers,
    )?;
    let mut request = http::Request::new(Full::new(decision.body.clone()));
    // The method that was checked: no header or parameter can change it on this leg.
    *request.method_mut() = parts.method;
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    Ok(request)
}

/// The upstream leg of a call: the URL (base URL, `path`, `query`) and the headers the upstream
/// config adds, with the root credential injected where it says — on this leg only.
pub fn upstream_leg(
    upstream: &Upstream,
    path: &str,
    query: Option<&str>,
    secret: &valet_core::Secret,
    headers: &mut HeaderMap,
) -> Result<http::Uri, CallRefusal> {
    let unusable = |what: &str| CallRefusal::UpstreamFailed {
        upstream: upstream.name.clone(),
        detail: format!("credential {:?} {what}", upstream.credential),
    };
    let Target::Url { base_url, inject } = &upstream.target else {
        return Err(CallRefusal::UpstreamFailed {
            upstream: upstream.name.clone(),
            detail: "it is a server valetd runs, not a URL".into(),
        });
    };
    let secret_text = secret.expose_str().ok_or_else(|| unusable("is not text"))?;
    let mut query: Vec<&str> = query
        .map(|query| query.split('&').filter(|pair| !pair.is_empty()).collect())
        .unwrap_or_default();
    let injected_query;
    if let Injection::Query { name, template } = inject {
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
        if base_url.https { "https" } else { "http" },
        base_url.authority,
        base_url.path,
        path
    );
    if !query.is_empty() {
        uri.push('?');
        uri.push_str(&query.join("&"));
    }
    let uri: http::Uri = uri
        .parse()
        .map_err(|_| CallRefusal::BadPath(rules::PathError::BadCharacter))?;
    for (name, value) in &upstream.headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::try_from(name.as_str()),
            HeaderValue::try_from(value.as_str()),
        ) {
            headers.insert(name, value);
        }
    }
    if let Injection::Header { name, template } = inject {
        let name = HeaderName::try_from(name.as_str())
            .map_err(|_| unusable("has an injection header name HTTP does not allow"))?;
        let mut value = HeaderValue::try_from(template.replace("{secret}", secret_text))
            .map_err(|_| unusable("cannot be sent in a header"))?;
        value.set_sensitive(true);
        headers.insert(name, value);
    }
    Ok(uri)
}

/// The headers the upstream receives: the agent's, as the canonical call read them (the
/// allowlist and the upstream's `forward_headers`, each once), and what the gateway sets itself
/// (encoding, origin, and the content type of the canonical body).
fn forwarded_headers(decision: &CallDecision) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in &decision.headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::try_from(name.as_str()),
            HeaderValue::from_str(value),
        ) {
            headers.append(name, value);
        }
    }
    if let Some(value) = decision
        .content_type
        .as_deref()
        .and_then(|content_type| HeaderValue::from_str(content_type).ok())
    {
        headers.insert(header::CONTENT_TYPE, value);
    }
    gateway_headers(&mut headers, decision.site.peer);
    headers
}

/// What the gateway itself says on every upstream leg: that only an unencoded answer will do
/// (only that can be masked), and where the call came from.
pub fn gateway_headers(headers: &mut HeaderMap, peer: std::net::SocketAddr) {
    headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    let peer = peer.ip().to_string();
    if let Ok(value) = HeaderValue::from_str(&peer) {
        headers.insert(HeaderName::from_static("x-forwarded-for"), value);
    }
    if let Ok(value) = HeaderValue::from_str(&format!("for=\"{peer}\";proto=http")) {
        headers.insert(header::FORWARDED, value);
    }
}

/// Why an answer cannot be passed on masked: an encoding the masker cannot see through, or a
/// piece of a whole that could hold a part of the secret.
pub fn unmaskable(headers: &HeaderMap, status: http::StatusCode) -> Option<String> {
    // The header's value is not quoted: what an upstream writes there is its own, and could be
    // the credential in a form the redactor does not know.
    if headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .any(|value| {
            !value
                .to_str()
                .is_ok_and(|encoding| encoding.trim().eq_ignore_ascii_case("identity"))
        })
    {
        return Some(
            "it answered with a Content-Encoding other than identity although the gateway asked for identity; an encoded answer cannot be checked for the root credential, so nothing of it is passed on".into(),
        );
    }
    // HTTP/1.1 lets an upstream compress in transfer (`Transfer-Encoding: gzip, chunked`); the
    // client takes off the chunking only, so anything but plain chunking is refused likewise.
    if headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|value| value.to_str().unwrap_or("(not text)").split(','))
        .any(|coding| !coding.trim().eq_ignore_ascii_case("chunked"))
    {
        return Some(
            "it answered with a Transfer-Encoding other than chunked (a compression in transfer); an encoded answer cannot be checked for the root credential, so nothing of it is passed on".into(),
        );
    }
    if status == http::StatusCode::PARTIAL_CONTENT {
        return Some(
            "it answered with a part of a resource (206) although the gateway asked for the whole; a part cannot be checked for the root credential, so nothing of it is passed on".into(),
        );
    }
    None
}

pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
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

pub fn percent_encode(text: &str) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn with(name: &'static str, value: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(name, http::HeaderValue::from_static(value));
        headers
    }

    #[test]
    fn an_answer_encoded_in_any_way_but_plain_chunking_is_unmaskable() {
        let ok = http::StatusCode::OK;
        assert!(unmaskable(&HeaderMap::new(), ok).is_none());
        assert!(unmaskable(&with("transfer-encoding", "chunked"), ok).is_none());
        assert!(unmaskable(&with("transfer-encoding", "Chunked"), ok).is_none());
        assert!(unmaskable(&with("content-encoding", "identity"), ok).is_none());
        for (name, value) in [
            ("transfer-encoding", "gzip, chunked"),
            ("transfer-encoding", "deflate"),
            ("content-encoding", "gzip"),
            ("content-encoding", "br"),
        ] {
            let refused = unmaskable(&with(name, value), ok).expect("refused");
            assert!(
                !refused.contains(value),
                "the upstream's value is not quoted"
            );
        }
        assert!(unmaskable(&HeaderMap::new(), http::StatusCode::PARTIAL_CONTENT).is_some());
    }
}
