//! MCP at `/mcp/<upstream>` (Streamable HTTP): a POST of JSON-RPC is read, authorized message by
//! message (valet-service), held open while a person decides on an approval-gated tool call,
//! then forwarded as the JSON-RPC the check built — to a remote server with the root credential
//! injected on the leg, or to a stdio server valetd runs — and the reply comes back with list
//! results narrowed to the grant, server requests the scope does not allow dropped, and the root
//! credential masked. Refusals are JSON-RPC errors an MCP client shows the model.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::SinkExt;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::Frame;
use serde_json::{Map, Value, json};
use valet_core::call::CallRefusal;
use valet_core::config::Target;
use valet_core::mcp::ReplyFilter;
use valet_service::{BodySource, CallSite, McpDecision, McpRequest, ServiceError, Valet};

use crate::Gateway;
use crate::forward::{self, strip_hop_by_hop, unmaskable};
use crate::response::{self, Body, BoxError};
use crate::route::IncomingBody;
use crate::stdio::{HANDSHAKE_VERSIONS, MODERN_VERSIONS, STDIO_PROTOCOL_VERSION};
use crate::stream::{self, Closing};

/// Largest JSON-RPC POST an agent may send.
const MAX_REQUEST_BODY: u64 = 1024 * 1024;
/// Largest JSON reply read whole from a remote server (SSE replies stream).
const MAX_REPLY_BODY: usize = 16 * 1024 * 1024;
/// How often the agent hears that a held call still waits.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// JSON-RPC error codes of the gateway's own answers.
const CODE_UNAUTHORIZED: i64 = -32001;
const CODE_REFUSED: i64 = -32003;
const CODE_INVALID_REQUEST: i64 = -32600;
const CODE_INTERNAL: i64 = -32603;

/// What the agent's request said about the protocol, read once from its headers.
#[derive(Clone, Default)]
struct AgentHeaders {
    authorization: Option<String>,
    protocol_version: Option<String>,
    /// As the agent sent it: the service checks it is one the gateway gave this grant.
    session_id: Option<String>,
    accepts_sse: bool,
}

impl AgentHeaders {
    /// The headers, or the refusal of a protocol revision the gateway does not serve (the server
    /// would read the body under rules the check does not know). The body's type and encoding
    /// are the service's to read, with the body.
    fn read(headers: &HeaderMap) -> Result<AgentHeaders, CallRefusal> {
        let text = |name: &str| {
            headers
                .get(name)
                .and_then(|value| value.to_str().ok())
                .map(str::to_string)
        };
        let protocol_version = text("mcp-protocol-version");
        if let Some(version) = &protocol_version
            && !HANDSHAKE_VERSIONS.contains(&version.as_str())
            && !MODERN_VERSIONS.contains(&version.as_str())
        {
            return Err(CallRefusal::BadHeader {
                header: "MCP-Protocol-Version".into(),
                reason: format!(
                    "{version:?} is not a revision the gateway serves; served: {}",
                    HANDSHAKE_VERSIONS
                        .iter()
                        .chain(MODERN_VERSIONS.iter())
                        .copied()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        Ok(AgentHeaders {
            authorization: text("authorization"),
            protocol_version,
            session_id: text("mcp-session-id"),
            accepts_sse: headers
                .get_all(header::ACCEPT)
                .iter()
                .filter_map(|value| value.to_str().ok())
                .any(|value| value.contains("text/event-stream")),
        })
    }

    fn modern(&self) -> bool {
        self.protocol_version
            .as_deref()
            .is_some_and(|version| MODERN_VERSIONS.contains(&version))
    }
}

/// One request to `/mcp/<upstream>`.
pub async fn handle(
    gateway: &Arc<Gateway>,
    request: http::Request<hyper::body::Incoming>,
    site: CallSite,
) -> http::Response<Body> {
    let valet = &gateway.valet;
    if request.method() != http::Method::POST {
        // No server-initiated stream (GET) and no session end (DELETE) pass the gateway: what a
        // server says arrives on the reply to a POST, where it is checked.
        let mut answer = jsonrpc_error(
            http::StatusCode::METHOD_NOT_ALLOWED,
            Value::Null,
            CODE_INVALID_REQUEST,
            &format!(
                "{} is not served at /mcp/{}: the gateway takes POST (JSON-RPC); server messages arrive on the reply to a POST",
                request.method(),
                site.upstream
            ),
            None,
        );
        answer
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return answer;
    }
    let (parts, body) = request.into_parts();
    let agent = match AgentHeaders::read(&parts.headers) {
        Ok(agent) => agent,
        Err(refused) => return refuse_unread(valet, &site, refused).await,
    };
    // The caller first: nothing of the body is read for a request without a valid token, or of
    // a grant over its budgets.
    match valet
        .admit_mcp_caller(&site, agent.authorization.as_deref())
        .await
    {
        Ok(principal) => {
            if let Some(connection) = parts.extensions.get::<crate::budget::ConnectionHandle>() {
                connection.authenticated(&principal);
            }
        }
        Err(denial) => {
            return refusal(
                valet,
                &denial.error,
                denial.grant_id.as_deref(),
                Value::Null,
            );
        }
    }
    let body = match Box::new(IncomingBody::new(&parts.headers, body))
        .read(MAX_REQUEST_BODY)
        .await
    {
        Ok(body) => body,
        Err(refused) => return refuse_unread(valet, &site, refused).await,
    };
    let request_id = single_id(&body);
    let content_types = crate::header_values(&parts.headers, header::CONTENT_TYPE);
    let content_encodings = crate::header_values(&parts.headers, header::CONTENT_ENCODING);
    let authorized = valet
        .authorize_mcp(McpRequest {
            site: &site,
            authorization: agent.authorization.as_deref(),
            approval: None,
            session: agent.session_id.as_deref(),
            content_types: content_types.clone(),
            content_encodings: content_encodings.clone(),
            body: &body,
        })
        .await;
    match authorized {
        Ok(decision) => {
            if let Some(connection) = parts.extensions.get::<crate::budget::ConnectionHandle>() {
                connection.authenticated(&decision.call.grant.principal);
            }
            dispatch(gateway, decision, &agent).await
        }
        Err(denial) => match &denial.error {
            ServiceError::Call(CallRefusal::ApprovalRequired {
                approval_id,
                approve_command,
                call,
            }) => {
                let waiting = format!(
                    "waiting for a person to approve {} {} on {} (approval {approval_id}: {approve_command})",
                    call.method, call.target, call.upstream
                );
                let (Some(grant), Some(principal)) =
                    (denial.grant_id.as_deref(), denial.principal.as_deref())
                else {
                    return refusal(valet, &denial.error, denial.grant_id.as_deref(), request_id);
                };
                // Held within the grant's and principal's share, on the approval's one wait.
                let (place, wait) =
                    match gateway
                        .held
                        .hold(&gateway.valet, grant, principal, approval_id)
                    {
                        Ok(held) => held,
                        Err(crate::held::NotHeld(reason)) => {
                            return jsonrpc_error(
                                http::StatusCode::TOO_MANY_REQUESTS,
                                request_id,
                                CODE_REFUSED,
                                &reason,
                                Some(json!({"approval_id": approval_id})),
                            );
                        }
                    };
                hold(
                    gateway,
                    Held {
                        _place: place,
                        wait,
                        site,
                        agent,
                        content_types: content_types
                            .iter()
                            .map(|value| value.to_string())
                            .collect(),
                        body,
                        approval_id: approval_id.clone(),
                        waiting,
                        request_id,
                    },
                )
                .await
            }
            error => refusal(valet, error, denial.grant_id.as_deref(), request_id),
        },
    }
}

/// A POST refused before its body is read or anything authorized: recorded, answered as
/// JSON-RPC.
async fn refuse_unread(
    valet: &Valet,
    site: &CallSite,
    refused: CallRefusal,
) -> http::Response<Body> {
    let error = valet.refuse_call(site, refused).await;
    refusal(valet, &error, None, Value::Null)
}

/// A tool call waiting for a person's approval.
struct Held {
    /// Its place among the held calls of its grant and principal.
    _place: crate::held::HeldPlace,
    /// The wait it shares with every call held on the same approval.
    wait: futures::future::Shared<futures::future::BoxFuture<'static, crate::held::Decided>>,
    site: CallSite,
    agent: AgentHeaders,
    /// The body's Content-Type headers as sent (the first authorization read them).
    content_types: Vec<String>,
    body: Bytes,
    approval_id: String,
    /// What the agent is told while it waits.
    waiting: String,
    request_id: Value,
}

/// Holds the call open while a person decides (the approval's own timeout is the limit; it
/// counts as a denial), then forwards it once with that approval. An agent that takes SSE hears
/// progress notifications (or, without a progress token, comments) while it waits.
async fn hold(gateway: &Arc<Gateway>, held: Held) -> http::Response<Body> {
    let progress_token = serde_json::from_slice::<Value>(&held.body)
        .ok()
        .and_then(|message| message.pointer("/params/_meta/progressToken").cloned());
    if !held.agent.accepts_sse {
        return decide(gateway, &held).await;
    }
    let (mut sender, receiver) =
        futures::channel::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
    let gateway = gateway.clone();
    tokio::spawn(async move {
        let mut progress = 0u64;
        let mut last_note = None::<Instant>;
        let decided = decide(&gateway, &held);
        tokio::pin!(decided);
        let answer = loop {
            if last_note.is_none_or(|at| at.elapsed() >= PROGRESS_EVERY) {
                last_note = Some(Instant::now());
                let note = match &progress_token {
                    Some(token) => {
                        progress += 1;
                        sse_event(&json!({
                            "jsonrpc": "2.0",
                            "method": "notifications/progress",
                            "params": {"progressToken": token, "progress": progress, "message": held.waiting},
                        }))
                    }
                    None => Bytes::from(format!(": {}\n\n", held.waiting.replace('\n', " "))),
                };
                if sender.send(Ok(Frame::data(note))).await.is_err() {
                    // The agent went away; the approval stays as it is, unused.
                    return;
                }
            }
            tokio::select! {
                answer = &mut decided => break answer,
                _ = tokio::time::sleep(PROGRESS_EVERY) => {}
            }
        };
        let (parts, body) = answer.into_parts();
        let is_sse = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| value.starts_with("text/event-stream"));
        let Ok(collected) = body.collect().await else {
            return;
        };
        let bytes = collected.to_bytes();
        let event = if is_sse {
            bytes
        } else if bytes.is_empty() {
            return;
        } else {
            match serde_json::from_slice::<Value>(&bytes) {
                Ok(message) => sse_event(&message),
                Err(_) => return,
            }
        };
        let _ = sender.send(Ok(Frame::data(event))).await;
    });
    let mut response = http::Response::new(BodyExt::boxed(StreamBody::new(receiver)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// Waits while people decide on the held call's approval, then authorizes the same body again
/// with it: approved, it is used once and the call forwarded; denied, expired or gone, the
/// service refuses the call and records why.
async fn decide(gateway: &Gateway, held: &Held) -> http::Response<Body> {
    let valet = &gateway.valet;
    if let Err(error) = held.wait.clone().await {
        return refusal(valet, &error, None, held.request_id.clone());
    }
    let authorized = valet
        .authorize_mcp(McpRequest {
            site: &held.site,
            authorization: held.agent.authorization.as_deref(),
            approval: Some(&held.approval_id),
            session: held.agent.session_id.as_deref(),
            content_types: held.content_types.iter().map(String::as_str).collect(),
            content_encodings: Vec::new(),
            body: &held.body,
        })
        .await;
    match authorized {
        Ok(decision) => dispatch(gateway, decision, &held.agent).await,
        Err(denial) => refusal(
            valet,
            &denial.error,
            denial.grant_id.as_deref(),
            held.request_id.clone(),
        ),
    }
}

/// Forwards an authorized POST to its server and answers with the filtered, masked reply.
async fn dispatch(
    gateway: &Gateway,
    decision: McpDecision,
    agent: &AgentHeaders,
) -> http::Response<Body> {
    let started = Instant::now();
    let valet = gateway.valet.clone();
    let McpDecision {
        mut call,
        checked,
        allow,
        server_session,
    } = decision;
    let filter = ReplyFilter::new(&checked, allow, call.grant.params.clone());
    let masker = match stream::masker_for(&call.secret) {
        Ok(masker) => masker,
        Err(too_long) => {
            let refused = CallRefusal::UpstreamFailed {
                upstream: call.upstream.name.clone(),
                detail: too_long.to_string(),
            };
            let error = valet.call_failed(&call, refused).await;
            return refusal(&valet, &error, Some(&call.grant.id), single_id(&call.body));
        }
    };
    let answered = match &call.upstream.target {
        Target::Url { .. } => {
            remote(
                gateway,
                &call,
                &checked,
                (agent, server_session.as_deref()),
                filter,
            )
            .await
        }
        Target::Process(_) => stdio(gateway, &call, &checked, agent, filter).await,
    };
    // Nothing of the answer before the call's audit record is on disk.
    if let Err(error) = valet.call_record_durable(&mut call).await {
        return refusal(&valet, &error, Some(&call.grant.id), single_id(&call.body));
    }
    match answered {
        Ok((status, headers, body, framing)) => {
            let mut response = http::Response::new(Full::new(Bytes::new()));
            *response.status_mut() = status;
            for (name, value) in &headers {
                if let Ok(value) = HeaderValue::from_bytes(&masker.mask_whole(value.as_bytes())) {
                    response.headers_mut().insert(name.clone(), value);
                }
            }
            let (parts, _) = response.into_parts();
            let closing = Closing::new(valet, call, status.as_u16(), started);
            http::Response::from_parts(parts, stream::masked_as(body, masker, closing, framing))
        }
        Err(refused) => {
            let error = valet.call_failed(&call, refused).await;
            refusal(&valet, &error, Some(&call.grant.id), single_id(&call.body))
        }
    }
}

/// The server's answer: status, the headers the agent gets, the body and how it is framed (a
/// JSON body or SSE events re-serialised whole, or bytes as they came).
type Answered = (http::StatusCode, HeaderMap, Body, stream::Framing);

/// A remote server over Streamable HTTP: the checked body POSTed with the root credential on
/// the leg, and the headers the protocol needs built by the gateway from what it checked.
async fn remote(
    gateway: &Gateway,
    call: &valet_service::CallDecision,
    checked: &[valet_core::mcp::CheckedMessage],
    (agent, server_session): (&AgentHeaders, Option<&str>),
    filter: ReplyFilter,
) -> Result<Answered, CallRefusal> {
    let upstream = &call.upstream;
    let failed = |detail: String| CallRefusal::UpstreamFailed {
        upstream: upstream.name.clone(),
        detail,
    };
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::ACCEPT,
        HeaderValue::from_static("application/json, text/event-stream"),
    );
    forward::gateway_headers(&mut headers, call.site.peer);
    let mut set = |name: &'static str, value: &str| {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(HeaderName::from_static(name), value);
        }
    };
    if let Some(version) = &agent.protocol_version {
        set("mcp-protocol-version", version);
    }
    if let Some(session) = server_session {
        set("mcp-session-id", session);
    }
    // 2026-07-28 routes on headers that must equal the body: built from the checked message.
    if agent.modern()
        && let [message] = checked
    {
        set("mcp-method", &message.method);
        if let Some(target) = message
            .target
            .as_deref()
            .filter(|target| target.bytes().all(|byte| (0x20..0x7f).contains(&byte)))
        {
            set("mcp-name", target);
        }
    }
    let uri = forward::upstream_leg(upstream, "", None, &call.secret, &mut headers)?;
    let mut request = http::Request::new(Full::new(call.body.clone()));
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    let answer = forward::send_request(gateway, upstream, request).await?;
    if let Some(detail) = unmaskable(answer.headers(), answer.status()) {
        return Err(failed(detail));
    }
    let (mut parts, body) = answer.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    // Only what an MCP client reads comes back.
    let mut kept = HeaderMap::new();
    for name in [
        header::CONTENT_TYPE,
        header::CACHE_CONTROL,
        HeaderName::from_static("mcp-protocol-version"),
    ] {
        if let Some(value) = parts.headers.get(&name) {
            kept.insert(name, value.clone());
        }
    }
    // The agent gets the server's session only bound to its grant, never as the server gave it;
    // a session id that carries the credential is refused (its binding would be a function of
    // the credential, and the agent could not use it masked).
    let server_session = parts
        .headers
        .get("mcp-session-id")
        .and_then(|value| value.to_str().ok());
    if let Some(session) = server_session {
        let masker =
            crate::stream::masker_for(&call.secret).map_err(|error| failed(error.to_string()))?;
        if masker.mask_whole(session.as_bytes()) != session.as_bytes() {
            return Err(failed(
                "its MCP session id carries the root credential; a session valetd binds to a grant must not".into(),
            ));
        }
    }
    if let Some(value) = server_session
        .map(|session| gateway.valet.bind_mcp_session(&call.grant.id, session))
        .and_then(|session| HeaderValue::from_str(&session).ok())
    {
        kept.insert(HeaderName::from_static("mcp-session-id"), value);
    }
    let content_type = kept
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let framing = if content_type.starts_with("text/event-stream")
        || content_type.starts_with("application/json")
    {
        stream::Framing::Whole
    } else {
        stream::Framing::Stream
    };
    let body: Body = if content_type.starts_with("text/event-stream") {
        // Event by event, as they arrive: a long tool call streams its progress.
        let events =
            futures::stream::unfold((Some(body), filter), |(body, mut filter)| async move {
                let mut body = body?;
                loop {
                    match body.frame().await {
                        Some(Ok(frame)) => {
                            let Ok(data) = frame.into_data() else {
                                continue;
                            };
                            let ready = filter.sse_chunk(&data);
                            if !ready.is_empty() {
                                return Some((
                                    Ok::<_, BoxError>(Frame::data(Bytes::from(ready))),
                                    (Some(body), filter),
                                ));
                            }
                        }
                        Some(Err(error)) => {
                            return Some((Err(Box::new(error) as BoxError), (None, filter)));
                        }
                        None => {
                            let rest = filter.finish();
                            if rest.is_empty() {
                                return None;
                            }
                            return Some((Ok(Frame::data(Bytes::from(rest))), (None, filter)));
                        }
                    }
                }
            });
        BodyExt::boxed(StreamBody::new(events))
    } else if content_type.starts_with("application/json") {
        let whole = Limited::new(body, MAX_REPLY_BODY)
            .collect()
            .await
            .map_err(|error| failed(format!("its reply could not be read: {error}")))?
            .to_bytes();
        response::full(Bytes::from(filter.json_body(&whole)))
    } else {
        // An answer without JSON-RPC (202 to a notification, an error page) carries no list
        // to narrow; it is still masked.
        BodyExt::boxed(body.map_err(|error| Box::new(error) as BoxError))
    };
    Ok((parts.status, kept, body, framing))
}

/// A stdio server valetd runs for this grant: `initialize` and `server/discover` are answered
/// from the server's own initialization; each request goes to the process with an id of
/// valetd's; notifications from the agent end here.
async fn stdio(
    gateway: &Gateway,
    call: &valet_service::CallDecision,
    checked: &[valet_core::mcp::CheckedMessage],
    agent: &AgentHeaders,
    filter: ReplyFilter,
) -> Result<Answered, CallRefusal> {
    let upstream = &call.upstream;
    let valet = gateway.valet.clone();
    // What the server writes to its log reaches valetd's log with the credential masked in every
    // form the masker knows, then redacted (every credential valetd holds, raw).
    let log_masker =
        crate::stream::masker_for(&call.secret).map_err(|error| CallRefusal::UpstreamFailed {
            upstream: upstream.name.clone(),
            detail: error.to_string(),
        })?;
    let redact: Arc<dyn Fn(&str) -> String + Send + Sync> = Arc::new(move |line: &str| {
        valet.redact(&String::from_utf8_lossy(
            &log_masker.mask_whole(line.as_bytes()),
        ))
    });
    let process = gateway
        .processes
        .process_for(
            upstream,
            &call.grant.id,
            &call.grant.principal,
            &call.secret,
            redact,
        )
        .await
        .map_err(|error| match error {
            crate::stdio::StdioError::Busy {
                reason,
                retry_after,
            } => CallRefusal::UpstreamBusy {
                upstream: upstream.name.clone(),
                reason,
                retry_after_seconds: u64::try_from(retry_after.as_millis().div_ceil(1000))
                    .unwrap_or(u64::MAX)
                    .max(1),
            },
            error => CallRefusal::UpstreamFailed {
                upstream: upstream.name.clone(),
                detail: error.to_string(),
            },
        })?;
    let initialized = process.initialized();
    let modern = agent.modern();
    let answers = checked.iter().map(|message| {
        let process = process.clone();
        async move {
            // Notifications and answers to the server end here: only requests are answered.
            message.message.get("method")?;
            let id = message.message.get("id")?.clone();
            let result = match message.method.as_str() {
                "initialize" => {
                    let asked = message
                        .message
                        .pointer("/params/protocolVersion")
                        .and_then(Value::as_str)
                        .filter(|version| HANDSHAKE_VERSIONS.contains(version))
                        .unwrap_or(STDIO_PROTOCOL_VERSION);
                    let mut result = Map::new();
                    result.insert("protocolVersion".into(), Value::from(asked));
                    for key in ["capabilities", "serverInfo", "instructions"] {
                        if let Some(value) = initialized.get(key) {
                            result.insert(key.into(), value.clone());
                        }
                    }
                    Ok(Value::Object(result))
                }
                "server/discover" => Ok(json!({
                    "resultType": "complete",
                    "supportedVersions": MODERN_VERSIONS,
                    "capabilities": initialized.get("capabilities").cloned().unwrap_or_else(|| json!({})),
                    "instructions": initialized.get("instructions").cloned(),
                    "cacheScope": "private",
                    "ttlMs": 0,
                    "_meta": {"io.modelcontextprotocol/serverInfo": initialized.get("serverInfo").cloned()},
                })),
                method => {
                    let mut params = message.message.get("params").cloned();
                    // The process speaks the handshake revision: the per-request envelope of
                    // 2026-07-28 is the gateway's to read, not the server's.
                    if let Some(Value::Object(meta)) =
                        params.as_mut().and_then(|params| params.get_mut("_meta"))
                    {
                        meta.retain(|key, _| !key.starts_with("io.modelcontextprotocol/"));
                    }
                    match process.request(method, params, upstream.timeout).await {
                        Ok(response) => match (response.get("result"), response.get("error")) {
                            (Some(result), _) => Ok(result.clone()),
                            (None, Some(error)) => Err(error.clone()),
                            (None, None) => Err(json!({"code": CODE_INTERNAL, "message": "the server answered without a result or an error"})),
                        },
                        Err(error) => Err(json!({
                            "code": CODE_INTERNAL,
                            "message": format!("upstream {}: {error}", upstream.name),
                        })),
                    }
                }
            };
            Some(match result {
                Ok(mut result) => {
                    if modern {
                        modernise(&message.method, &mut result);
                    }
                    json!({"jsonrpc": "2.0", "id": id, "result": result})
                }
                Err(error) => json!({"jsonrpc": "2.0", "id": id, "error": error}),
            })
        }
    });
    let answers: Vec<Value> = futures::future::join_all(answers)
        .await
        .into_iter()
        .flatten()
        .collect();
    let mut headers = HeaderMap::new();
    if answers.is_empty() {
        return Ok((
            http::StatusCode::ACCEPTED,
            headers,
            response::full(Bytes::new()),
            stream::Framing::Whole,
        ));
    }
    // The canonical body is an array exactly when the agent sent a batch.
    let reply = if call.body.starts_with(b"[") {
        Value::Array(answers)
    } else {
        answers.into_iter().next().unwrap_or(Value::Null)
    };
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(version) = &agent.protocol_version
        && let Ok(value) = HeaderValue::from_str(version)
    {
        headers.insert(HeaderName::from_static("mcp-protocol-version"), value);
    }
    let body = filter.json_body(reply.to_string().as_bytes());
    Ok((
        http::StatusCode::OK,
        headers,
        response::full(Bytes::from(body)),
        stream::Framing::Whole,
    ))
}

/// Methods whose 2026-07-28 results say how long they may be cached.
const CACHEABLE_METHODS: [&str; 6] = [
    "prompts/list",
    "resources/list",
    "resources/read",
    "resources/templates/list",
    "server/discover",
    "tools/list",
];

/// A result of the handshake revision (the stdio server's) in the shape a 2026-07-28 client
/// reads: `resultType`, and for cacheable methods a private cache scope with no lifetime.
fn modernise(method: &str, result: &mut Value) {
    let Value::Object(result) = result else {
        return;
    };
    result
        .entry("resultType")
        .or_insert_with(|| Value::from("complete"));
    if CACHEABLE_METHODS.contains(&method) {
        result
            .entry("cacheScope")
            .or_insert_with(|| Value::from("private"));
        result.entry("ttlMs").or_insert_with(|| Value::from(0));
    }
}

/// A refusal as a JSON-RPC error: the HTTP status the gateway gives it, and in `data` the same
/// details a REST call's refusal carries.
fn refusal(
    valet: &Valet,
    error: &ServiceError,
    grant_id: Option<&str>,
    request_id: Value,
) -> http::Response<Body> {
    let data = response::error_body(valet, error, grant_id);
    let message = data
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("refused")
        .to_string();
    let status = response::status_of(error);
    let code = match status {
        http::StatusCode::UNAUTHORIZED => CODE_UNAUTHORIZED,
        http::StatusCode::FORBIDDEN | http::StatusCode::TOO_MANY_REQUESTS => CODE_REFUSED,
        http::StatusCode::BAD_REQUEST | http::StatusCode::PAYLOAD_TOO_LARGE => CODE_INVALID_REQUEST,
        _ => CODE_INTERNAL,
    };
    let message = format!("Valet refused this: {message}");
    response::with_error_headers(
        jsonrpc_error(status, request_id, code, &message, Some(data)),
        error,
    )
}

fn jsonrpc_error(
    status: http::StatusCode,
    id: Value,
    code: i64,
    message: &str,
    data: Option<Value>,
) -> http::Response<Body> {
    let mut error = json!({"code": code, "message": message});
    if let Some(data) = data {
        error["data"] = data;
    }
    response::json(status, &json!({"jsonrpc": "2.0", "id": id, "error": error}))
}

/// The id of a POST holding one request, for the refusal's reply (null otherwise).
fn single_id(body: &[u8]) -> Value {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|message| message.get("id").cloned())
        .filter(|id| id.is_string() || id.is_i64() || id.is_u64())
        .unwrap_or(Value::Null)
}

fn sse_event(message: &Value) -> Bytes {
    Bytes::from(format!("event: message\ndata: {message}\n\n"))
}
