//! The web console on `[server] console_listen`: approvals inbox, live grants, audit status.
//! Server-rendered pages with one small script (live updates over server-sent events fed by the
//! store's change stream), assets embedded in the binary. A session comes only from a single-use
//! login link (`valet console`); every action is an existing service operation called as the
//! session's principal, and checks the session's CSRF token first.

mod form;
mod page;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use tokio::net::TcpListener;
use valet_core::approval::ApprovalStatus;
use valet_core::grant::GrantStatus;
use valet_gateway::budget::{ConnectionHandle, GuardedBody};
use valet_gateway::listener::{Acceptor, Limits};
use valet_gateway::tls::{Listener, TlsMaterial};
use valet_service::{ConsoleCaller, ServiceError, Valet};
use valet_store::GrantFilter;

use form::Fields;
use page::{GrantFilterFields, Session};

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// What every console response carries: nothing but the console's own script and styles run,
/// nothing frames it, nothing leaks in a Referer, nothing is cached.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";
const SCRIPT: &str = include_str!("assets/console.js");
const STYLES: &str = include_str!("assets/console.css");
/// How often an idle event stream carries a comment, so proxies keep it open.
const HEARTBEAT: Duration = Duration::from_secs(15);
/// Decided requests shown under the inbox.
const N_DECIDED: usize = 50;
/// Grants in the table.
const N_GRANTS: u32 = 500;
/// Audit records on the audit page.
const N_TAIL: u32 = 50;

struct Console {
    valet: Arc<Valet>,
    /// Browsers reach it over https (valetd's own TLS, or `console_url` naming https behind a
    /// TLS-terminating proxy): the cookie is `Secure` and `__Host-` prefixed, and HSTS is sent.
    secure: bool,
}

impl Console {
    fn cookie_name(&self) -> &'static str {
        if self.secure {
            "__Host-valet_console"
        } else {
            "valet_console"
        }
    }

    /// The `Set-Cookie` value that sets the session cookie to `value` for `max_age` seconds (0:
    /// removes it). Over TLS it must say `Secure`, or a browser refuses a `__Host-` cookie,
    /// removal included.
    fn set_cookie(&self, value: &str, max_age: i64) -> Option<http::HeaderValue> {
        http::HeaderValue::from_str(&format!(
            "{}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{}",
            self.cookie_name(),
            if self.secure { "; Secure" } else { "" }
        ))
        .ok()
    }
}

/// Serves the console on `listener` until valetd stops.
pub async fn serve(
    listener: TcpListener,
    limits: Limits,
    tls: Option<Arc<TlsMaterial>>,
    valet: Arc<Valet>,
) {
    let console = Arc::new(Console {
        valet: valet.clone(),
        secure: tls.is_some()
            || valet
                .console_url()
                .is_some_and(|url| url.to_ascii_lowercase().starts_with("https://")),
    });
    let mut acceptor = Acceptor::start(
        listener,
        limits,
        "console",
        tls.map(|material| (material, Listener::Gateway)),
    );
    let stopping = valet.clone();
    let accept = async {
        while let Some((connection, peer)) = acceptor.accept().await {
            let console = console.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
                    let console = console.clone();
                    let address = peer.address;
                    // In flight until its answer (an event stream included) has been sent.
                    let mut guard = peer.connection.as_ref().map(ConnectionHandle::request);
                    let handle_of_connection = peer.connection.clone();
                    if let Some(connection) = &peer.connection {
                        request.extensions_mut().insert(connection.clone());
                    }
                    async move {
                        if handle_of_connection
                            .as_ref()
                            .is_some_and(ConnectionHandle::closing)
                        {
                            let closing = html(
                                StatusCode::SERVICE_UNAVAILABLE,
                                page::error(
                                    StatusCode::SERVICE_UNAVAILABLE,
                                    valet_gateway::budget::CLOSING,
                                    None,
                                ),
                            );
                            return Ok::<_, Infallible>(
                                closing.map(|body| GuardedBody::new(body, guard)),
                            );
                        }
                        let response = handle(&console, request, address).await;
                        // A throttled caller's answer waits, so its loop runs at the pace of
                        // its (budgeted) connections.
                        let pause = response.extensions().get().map_or(
                            std::time::Duration::ZERO,
                            |valet_gateway::AnswerAfter(pause)| *pause,
                        );
                        valet_gateway::budget::wait_out_pause(
                            handle_of_connection.as_ref(),
                            &mut guard,
                            pause,
                        )
                        .await;
                        Ok::<_, Infallible>(response.map(|body| GuardedBody::new(body, guard)))
                    }
                });
                // HTTP/1.1, or HTTP/2 when a browser negotiates it over TLS.
                let served = valet_gateway::connection_builder()
                    .serve_connection(hyper_util::rt::TokioIo::new(connection), service)
                    .await;
                if let Err(error) = served {
                    tracing::debug!(%error, "console connection ended with an error");
                }
            });
        }
    };
    tokio::select! {
        _ = accept => {}
        _ = stopping.shutting_down() => {}
    }
}

/// Answers one request, with the headers every answer carries.
async fn handle(console: &Console, request: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let request_id = valet_core::random::request_id();
    // A span per request, exported with the RPC and gateway spans when traces are configured;
    // the path only (a login link's pass is in the query, never in a span).
    let span = tracing::info_span!(
        "console",
        %request_id,
        method = %request.method(),
        path = %request.uri().path()
    );
    let mut response =
        tracing::Instrument::instrument(route(console, request, peer, &request_id), span).await;
    let headers = response.headers_mut();
    for (name, value) in [
        ("content-security-policy", CONTENT_SECURITY_POLICY),
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "no-referrer"),
        ("cache-control", "no-store"),
        ("cross-origin-opener-policy", "same-origin"),
    ] {
        headers.insert(name, http::HeaderValue::from_static(value));
    }
    if console.secure {
        // Browsers reach the console over https only from now on, even typed as http://.
        headers.insert(
            "strict-transport-security",
            http::HeaderValue::from_static("max-age=31536000"),
        );
    }
    if let Ok(value) = http::HeaderValue::from_str(&request_id) {
        headers.insert("x-request-id", value);
    }
    response
}

async fn route(
    console: &Console,
    request: Request<Incoming>,
    peer: SocketAddr,
    request_id: &str,
) -> Response<Body> {
    let valet = &console.valet;
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let query = Fields::parse(request.uri().query().unwrap_or(""));
    // Browsers say where a request comes from: a form posted from another site (login CSRF
    // included) is refused before anything else, on top of SameSite cookies and CSRF tokens.
    let from_elsewhere = request
        .headers()
        .get("sec-fetch-site")
        .and_then(|value| value.to_str().ok())
        .is_some_and(|site| site != "same-origin" && site != "none");
    if method == Method::POST && from_elsewhere {
        let error = valet
            .refuse_console_request(
                request_id,
                Some(peer.ip()),
                &path,
                ServiceError::Unauthenticated {
                    reason: "the form was posted from another site (Sec-Fetch-Site); the console takes actions from its own pages only".into(),
                },
            )
            .await;
        return refusal(valet, error, None);
    }
    match (&method, path.as_str()) {
        (&Method::GET, "/assets/console.js") => {
            return text(StatusCode::OK, "text/javascript; charset=utf-8", SCRIPT);
        }
        (&Method::GET, "/assets/console.css") => {
            return text(StatusCode::OK, "text/css; charset=utf-8", STYLES);
        }
        (&Method::GET, "/login") => return html(StatusCode::OK, page::login(query.get("link"))),
        (&Method::POST, "/login") => {
            let fields = match read_form(request).await {
                Ok(fields) => fields,
                Err(response) => return response,
            };
            return match valet
                .open_console_session(
                    fields.get("link"),
                    fields.get("code"),
                    Some(peer.ip()),
                    request_id,
                )
                .await
            {
                Ok(opened) => {
                    let mut response =
                        html(StatusCode::OK, page::logged_in(&opened.pass.principal));
                    let max_age = (opened.pass.expires_at - valet.now()).max(0);
                    if let Some(value) = console.set_cookie(&opened.cookie, max_age) {
                        response.headers_mut().insert(header::SET_COOKIE, value);
                    }
                    response
                }
                Err(error) => refusal(valet, error, None),
            };
        }
        (&Method::GET, "/") => return redirect("/approvals"),
        _ => {}
    }
    // Everything else needs a session.
    let cookie = form::cookie(request.headers(), console.cookie_name()).unwrap_or("");
    let session = if cookie.is_empty() {
        Err(ServiceError::Unauthenticated {
            reason: "no console session: log in with a link from `valet console`".into(),
        })
    } else {
        valet
            .console_caller(cookie, Some(peer.ip()), request_id)
            .await
    };
    // Without a session: an action is counted against the source's budget and recorded (the
    // first of its kind in a window, the rest summarised); a page is counted.
    let session = match session {
        Ok(session) => session,
        Err(error) if method == Method::POST => {
            let error = valet
                .refuse_console_request(request_id, Some(peer.ip()), &path, error)
                .await;
            return refusal(valet, error, None);
        }
        Err(error) => {
            return refusal(
                valet,
                valet.refuse_console_page(Some(peer.ip()), error),
                None,
            );
        }
    };
    if let Some(connection) = request.extensions().get::<ConnectionHandle>() {
        connection.authenticated(&session.session.principal);
    }
    let csrf = valet.console_csrf(&session.session);
    let view = Session {
        principal: &session.session.principal,
        csrf: &csrf,
        expires_at: session.session.expires_at,
    };
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if method == Method::GET {
        return match read(console, &session, &view, &segments, &query).await {
            Ok(response) => response,
            Err(error) => refusal(valet, error, Some(&view)),
        };
    }
    if method != Method::POST {
        return html(
            StatusCode::METHOD_NOT_ALLOWED,
            page::error(
                StatusCode::METHOD_NOT_ALLOWED,
                &format!("{method} {path}: the console serves GET pages and POST forms only"),
                Some(&view),
            ),
        );
    }
    let fields = match read_form(request).await {
        Ok(fields) => fields,
        Err(response) => return response,
    };
    if let Err(error) = valet
        .check_console_csrf(&session, fields.get("csrf"), &path)
        .await
    {
        return refusal(valet, error, Some(&view));
    }
    match act(console, &session, &segments, &fields).await {
        Ok(response) => response,
        Err(error) => refusal(valet, error, Some(&view)),
    }
}

/// The pages and event streams.
async fn read(
    console: &Console,
    session: &ConsoleCaller,
    view: &Session<'_>,
    segments: &[&str],
    query: &Fields,
) -> Result<Response<Body>, ServiceError> {
    let valet = &console.valet;
    let caller = &session.caller;
    let now = valet.now();
    match segments {
        ["approvals"] => {
            let pending = valet
                .list_approvals(caller, true, 1000, "")
                .await?
                .approvals;
            if query.get("fragment") == "pending" {
                return Ok(html(
                    StatusCode::OK,
                    page::pending_list(view, &pending, now),
                ));
            }
            let mut decided: Vec<_> = valet
                .list_approvals(caller, false, 1000, "")
                .await?
                .approvals
                .into_iter()
                .filter(|approval| approval.status != ApprovalStatus::Pending)
                .collect();
            decided.sort_by_key(|approval| std::cmp::Reverse(approval.updated_at));
            decided.truncate(N_DECIDED);
            Ok(html(
                StatusCode::OK,
                page::approvals(view, &pending, &decided, now),
            ))
        }
        ["approvals", id] => {
            let approval = valet.get_approval(caller, id).await?;
            Ok(html(StatusCode::OK, page::approval(view, &approval, now)))
        }
        ["grants"] => {
            let filter = grant_filter(query);
            let listing = valet
                .list_grants(caller, store_filter(&filter, true)?, N_GRANTS, "")
                .await?;
            let more = listing.next_page_token.is_some();
            if query.get("fragment") == "table" {
                return Ok(html(
                    StatusCode::OK,
                    page::grants_table(view, &listing.grants, more, now),
                ));
            }
            let notice = query
                .get("revoked")
                .parse::<u64>()
                .ok()
                .map(|n| format!("{n} grant(s) revoked"));
            Ok(html(
                StatusCode::OK,
                page::grants(view, &listing.grants, more, &filter, now, notice.as_deref()),
            ))
        }
        ["grants", id] if query.get("fragment") == "row" => {
            // A row the table shows is always replaced; a new one is added only when it
            // matches the table's filters.
            let grant = valet.console_grant(caller, id).await?;
            let shown = query.get("known") == "1"
                || store_filter(&grant_filter(query), true)?.matches(&grant, now);
            Ok(if shown {
                html(StatusCode::OK, page::grant_row(view, &grant, now))
            } else {
                html(StatusCode::NO_CONTENT, String::new())
            })
        }
        ["grants", id] => {
            let grant = valet.console_grant(caller, id).await?;
            let trail = valet.grant_trail(caller, id).await?;
            Ok(html(StatusCode::OK, page::grant(view, &grant, &trail, now)))
        }
        ["audit"] => {
            let head = valet.audit_head(caller).await?;
            let tail: Vec<_> = valet
                .audit_tail(caller, N_TAIL, false)
                .await?
                .filter_map(|record| std::future::ready(record.ok()))
                .collect()
                .await;
            let check = valet.last_audit_verification();
            Ok(html(
                StatusCode::OK,
                page::audit(view, &head, check.as_ref(), &tail),
            ))
        }
        ["sessions"] => {
            let open = valet.console_sessions(caller).await?;
            Ok(html(
                StatusCode::OK,
                page::sessions(view, &session.session.id, &open, now),
            ))
        }
        ["events", "approvals"] => {
            let approvals = valet.watch_approvals(caller).await?;
            let events = approvals.map(|approval| match approval {
                Ok(approval) => event(
                    "approval",
                    &serde_json::json!({ "id": approval.id, "status": approval.status.to_string() }),
                ),
                Err(error) => event("error", &serde_json::json!({ "error": error.to_string() })),
            });
            Ok(event_stream(valet, session, events))
        }
        ["events", "grants"] => {
            // Every change to a grant of the other filters: a row the table shows changes
            // status in place (revoked, expired) even when it then no longer matches its status.
            let filter = store_filter(&grant_filter(query), false)?;
            let grants = valet.watch_grants(caller, filter).await?;
            let events = grants.map(|change| match change {
                Ok(change) => event(
                    "grant",
                    &serde_json::json!({ "id": change.grant.id, "kind": format!("{:?}", change.kind).to_lowercase() }),
                ),
                Err(error) => event("error", &serde_json::json!({ "error": error.to_string() })),
            });
            Ok(event_stream(valet, session, events))
        }
        _ => Ok(html(
            StatusCode::NOT_FOUND,
            page::error(
                StatusCode::NOT_FOUND,
                "no such page; the console has /approvals, /grants, /audit and /sessions",
                Some(view),
            ),
        )),
    }
}

/// The actions: each is one existing service operation, as the session's principal.
async fn act(
    console: &Console,
    session: &ConsoleCaller,
    segments: &[&str],
    fields: &Fields,
) -> Result<Response<Body>, ServiceError> {
    let valet = &console.valet;
    let caller = &session.caller;
    let reason = fields.get("reason").trim();
    match segments {
        ["approvals", id, "approve"] => {
            let confirmation = fields.non_empty("confirm");
            let decided = valet
                .approve(caller, id, confirmation.as_deref(), reason)
                .await?;
            Ok(redirect(&format!("/approvals/{}", decided.id)))
        }
        ["approvals", id, "deny"] => {
            let decided = valet.deny_approval(caller, id, reason).await?;
            Ok(redirect(&format!("/approvals/{}", decided.id)))
        }
        ["grants", id, "revoke"] => {
            let (grant, _) = valet.revoke_grant(caller, id, reason).await?;
            Ok(redirect(&format!("/grants/{}", grant.id)))
        }
        ["tasks", "revoke"] => {
            let task = fields.get("task");
            let revoked = valet.revoke_task(caller, task, reason).await?;
            Ok(redirect(&format!(
                "/grants?task={}&status=any&revoked={}",
                form::encode(task),
                revoked.len()
            )))
        }
        ["revoke-all"] => {
            let target = (fields.get("target"), fields.non_empty("name"));
            let revoked = valet
                .revoke_all_confirmed(caller, target, fields.get("confirm"), reason)
                .await?;
            Ok(redirect(&format!("/grants?revoked={}", revoked.len())))
        }
        ["audit", "verify"] => {
            valet.verify_audit_chain(caller).await?;
            Ok(redirect("/audit"))
        }
        ["sessions", id, "end"] => {
            valet.end_console_session_by_id(caller, id).await?;
            Ok(redirect("/sessions"))
        }
        ["logout"] => {
            valet.end_console_session(session).await?;
            let mut response = html(
                StatusCode::OK,
                page::layout(
                    "Logged out",
                    page::Section::None,
                    None,
                    "<h1>Logged out</h1><p>This session is ended on every replica. Run <code>valet console</code> to log in again.</p>",
                ),
            );
            if let Some(value) = console.set_cookie("", 0) {
                response.headers_mut().insert(header::SET_COOKIE, value);
            }
            Ok(response)
        }
        _ => Err(ServiceError::InvalidField {
            field: "path",
            problem: "no such action; the console's forms post to /approvals/ID/approve, /approvals/ID/deny, /grants/ID/revoke, /tasks/revoke, /revoke-all, /audit/verify, /sessions/ID/end and /logout".into(),
        }),
    }
}

/// The table's filters from a query; the status defaults to `active`.
fn grant_filter(query: &Fields) -> GrantFilterFields {
    let text = |name: &str| query.get(name).trim().to_string();
    GrantFilterFields {
        environment: text("environment"),
        principal: text("principal"),
        scope: text("scope"),
        task: text("task"),
        status: query.non_empty("status").unwrap_or_else(|| "active".into()),
    }
}

/// The store filter for `filter`, with its status when `with_status`.
fn store_filter(
    filter: &GrantFilterFields,
    with_status: bool,
) -> Result<GrantFilter, ServiceError> {
    let text = |value: &str| (!value.is_empty()).then(|| value.to_string());
    let status = match filter.status.as_str() {
        _ if !with_status => None,
        "any" => None,
        "active" => Some(GrantStatus::Active),
        "pending" => Some(GrantStatus::Pending),
        "revoked" => Some(GrantStatus::Revoked),
        "expired" => Some(GrantStatus::Expired),
        "denied" => Some(GrantStatus::Denied),
        other => {
            return Err(ServiceError::InvalidField {
                field: "status",
                problem: format!(
                    "{other:?} is not a grant status; one of {}",
                    page::STATUS_CHOICES.join(", ")
                ),
            });
        }
    };
    Ok(GrantFilter {
        environment: text(&filter.environment),
        principal: text(&filter.principal),
        scope: text(&filter.scope),
        task_id: text(&filter.task),
        status,
    })
}

/// Reads a form body (at most [`form::MAX_FORM_BYTES`]); anything else is a clear refusal.
async fn read_form(request: Request<Incoming>) -> Result<Fields, Response<Body>> {
    let form_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/x-www-form-urlencoded"));
    let refuse =
        |status: StatusCode, message: &str| html(status, page::error(status, message, None));
    if !form_type {
        return Err(refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the console's actions take application/x-www-form-urlencoded forms only",
        ));
    }
    let body = Limited::new(request.into_body(), form::MAX_FORM_BYTES)
        .collect()
        .await
        .map_err(|_| {
            refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                "the form is larger than 16 KiB or was cut off; the console's forms are a few short fields",
            )
        })?
        .to_bytes();
    let text = std::str::from_utf8(&body)
        .map_err(|_| refuse(StatusCode::BAD_REQUEST, "the form is not UTF-8 text"))?;
    Ok(Fields::parse(text))
}

/// One server-sent event.
fn event(name: &str, data: &serde_json::Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

/// A `text/event-stream` of `events`, with heartbeats, ended when the session expires or valetd
/// stops (the browser reconnects, and is then asked to log in again if its session is over).
/// How often an open event stream checks that its session still stands (not ended, its
/// credential still accepted): a revocation ends the stream within this.
const SESSION_CHECK: Duration = Duration::from_secs(2);

/// `events` as a server-sent event stream for `session`: heartbeats keep it open; it ends when
/// the session expires, is ended or loses its credential (checked before every event and every
/// [`SESSION_CHECK`]), or when valetd stops.
fn event_stream(
    valet: &Arc<Valet>,
    session: &ConsoleCaller,
    events: impl futures::Stream<Item = Bytes> + Send + 'static,
) -> Response<Body> {
    let remaining = (session.session.expires_at - valet.now()).max(0) as u64;
    let stopping = valet.clone();
    let heartbeats = tokio_stream::wrappers::IntervalStream::new(tokio::time::interval(HEARTBEAT))
        .map(|_| Some(Bytes::from_static(b": heartbeat\n\n")));
    let checks = tokio_stream::wrappers::IntervalStream::new(tokio::time::interval(SESSION_CHECK))
        .map(|_| None);
    let end = async move {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(remaining)) => {}
            _ = stopping.shutting_down() => {}
        }
    };
    let (checker, pass, caller) = (
        valet.clone(),
        session.session.clone(),
        session.caller.clone(),
    );
    let stream = futures::stream::select(
        futures::stream::select(events.map(Some), heartbeats),
        checks,
    )
    .take_until(end)
    .then(move |item| {
        let (checker, pass, caller) = (checker.clone(), pass.clone(), caller.clone());
        async move {
            checker
                .console_session_in_force(&pass, &caller)
                .await
                .map(|()| item)
        }
    })
    .take_while(|checked| std::future::ready(checked.is_ok()))
    .filter_map(|checked| std::future::ready(checked.ok().flatten()))
    .map(|bytes| Ok::<_, Infallible>(Frame::data(bytes)));
    let mut response = Response::new(BodyExt::boxed_unsync(StreamBody::new(stream)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    response
}

fn full(text: impl Into<Bytes>) -> Body {
    BodyExt::boxed_unsync(Full::new(text.into()))
}

fn text(status: StatusCode, content_type: &'static str, body: &'static str) -> Response<Body> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}

fn html(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    response
}

fn redirect(location: &str) -> Response<Body> {
    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(value) = http::HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// A refused or failed operation as a page: the service's own words (credentials redacted)
/// under the status that fits.
fn refusal(valet: &Valet, error: ServiceError, session: Option<&Session>) -> Response<Body> {
    let status = match &error {
        ServiceError::Unauthenticated { .. } | ServiceError::Console(_) => StatusCode::UNAUTHORIZED,
        ServiceError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        ServiceError::Access(_) => StatusCode::FORBIDDEN,
        ServiceError::Request(error) if !error.is_invalid_argument() => StatusCode::FORBIDDEN,
        ServiceError::Approval(valet_core::approval::ApprovalError::SelfApproval { .. })
        | ServiceError::Approval(valet_core::approval::ApprovalError::AgentCannotApprove {
            ..
        })
        | ServiceError::Approval(valet_core::approval::ApprovalError::NotAnApprover { .. }) => {
            StatusCode::FORBIDDEN
        }
        ServiceError::GrantNotFound { .. }
        | ServiceError::ApprovalNotFound { .. }
        | ServiceError::ConsoleSessionNotFound { .. }
        | ServiceError::ConsoleOff => StatusCode::NOT_FOUND,
        ServiceError::Request(_)
        | ServiceError::InvalidField { .. }
        | ServiceError::Approval(valet_core::approval::ApprovalError::WrongConfirmation {
            ..
        })
        | ServiceError::Approval(valet_core::approval::ApprovalError::ReasonRequired { .. }) => {
            StatusCode::BAD_REQUEST
        }
        ServiceError::Approval(_) | ServiceError::Transition(_) | ServiceError::Inactive(_) => {
            StatusCode::CONFLICT
        }
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    let message = valet.redact(&error.to_string());
    let mut response = html(status, page::error(status, &message, session));
    valet_gateway::throttle_headers(&mut response, &error);
    response
}
