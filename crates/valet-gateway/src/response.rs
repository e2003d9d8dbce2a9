//! The gateway's answers of its own: JSON bodies for denials and errors, and the one mapping from
//! a service error to an HTTP status.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};

use http::StatusCode;
use valet_core::call::CallRefusal;
use valet_service::{ServiceError, Valet};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// The HTTP status of a refused or failed call: the one mapping from a service error.
pub fn status_of(error: &ServiceError) -> StatusCode {
    match error {
        ServiceError::Call(refusal) => match refusal {
            CallRefusal::NoToken
            | CallRefusal::BadToken(_)
            | CallRefusal::UnknownGrant
            | CallRefusal::Inactive(_) => StatusCode::UNAUTHORIZED,
            CallRefusal::UnknownUpstream { .. } | CallRefusal::NotFound => StatusCode::NOT_FOUND,
            CallRefusal::WrongUpstream { .. }
            | CallRefusal::WrongRoute { .. }
            | CallRefusal::Denied { .. }
            | CallRefusal::LimitReached(_)
            | CallRefusal::ApprovalRefused(_) => StatusCode::FORBIDDEN,
            CallRefusal::BadPath(_)
            | CallRefusal::BadQuery(_)
            | CallRefusal::BadBody(_)
            | CallRefusal::BadHeader { .. } => StatusCode::BAD_REQUEST,
            CallRefusal::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            CallRefusal::UpstreamFailed { .. } => StatusCode::BAD_GATEWAY,
            CallRefusal::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            CallRefusal::UpstreamBusy { .. } => StatusCode::TOO_MANY_REQUESTS,
            CallRefusal::ApprovalRequired { .. } => StatusCode::PRECONDITION_REQUIRED,
        },
        ServiceError::Inactive(_) => StatusCode::UNAUTHORIZED,
        ServiceError::GrantNotFound { .. } => StatusCode::UNAUTHORIZED,
        ServiceError::Unauthenticated { .. } => StatusCode::UNAUTHORIZED,
        ServiceError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        ServiceError::Request(_) | ServiceError::Access(_) | ServiceError::Approval(_) => {
            StatusCode::FORBIDDEN
        }
        error if error.is_conflict() => StatusCode::CONFLICT,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// The refusal's kind, as agents see it in the `error` field.
fn kind_of(error: &ServiceError) -> &'static str {
    match error {
        ServiceError::Call(refusal) => refusal.kind(),
        ServiceError::Inactive(_) => "inactive",
        ServiceError::Unauthenticated { .. } => "unauthenticated",
        ServiceError::RateLimited { .. } => "rate_limited",
        error if error.is_conflict() => "conflict",
        ServiceError::Store(_) | ServiceError::Audit(_) => "unavailable",
        _ => "refused",
    }
}

/// A JSON response.
pub fn json(status: http::StatusCode, value: &serde_json::Value) -> http::Response<Body> {
    let mut response = http::Response::new(full(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    response
}

pub fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// The error as the agent sees it: status, and a JSON body naming what was refused and why.
/// Store and audit failures say so (fail closed) without their internals.
pub fn error_response(
    valet: &Valet,
    error: &ServiceError,
    grant_id: Option<&str>,
) -> http::Response<Body> {
    let body = error_body(valet, error, grant_id);
    with_error_headers(json(status_of(error), &body), error)
}

/// The JSON an agent gets for a refusal: `error` (its kind), `message`, and the details of a
/// denial or an approval asked for. Nothing in it is unredacted.
pub fn error_body(
    valet: &Valet,
    error: &ServiceError,
    grant_id: Option<&str>,
) -> serde_json::Value {
    let redact = |text: &str| valet.redact(text);
    let message = match error {
        ServiceError::Store(_) | ServiceError::Audit(_) | ServiceError::Internal(_) => format!(
            "the gateway cannot record this call durably, so it refused it (fail closed): {error}"
        ),
        error => error.to_string(),
    };
    let mut body = serde_json::json!({
        "error": kind_of(error),
        "message": redact(&message),
    });
    if let Some(grant_id) = grant_id {
        body["grant"] = serde_json::Value::from(grant_id);
    }
    if let ServiceError::Call(CallRefusal::Denied {
        scope,
        rules,
        asked,
        reason,
    }) = error
    {
        body["scope"] = serde_json::Value::from(scope.as_str());
        body["rules"] = serde_json::Value::from(rules.as_str());
        body["asked"] = serde_json::Value::from(redact(asked));
        body["reason"] = serde_json::Value::from(redact(reason));
    }
    if let ServiceError::Call(CallRefusal::ApprovalRequired {
        approval_id,
        approve_command,
        call,
    }) = error
    {
        body["approval_id"] = serde_json::Value::from(approval_id.as_str());
        body["approve_command"] = serde_json::Value::from(approve_command.as_str());
        body["call"] = serde_json::json!({
            "method": call.method,
            "target": call.target,
            "body_sha256": call.body_sha256,
            "graphql": call.graphql,
            "content_type": call.content_type,
            "rendering": redact(&call.rendering),
        });
    }
    body
}

/// How long the listener holds a response before sending it (a throttled caller's refusal:
/// [`ServiceError::answer_after`]).
#[derive(Debug, Clone, Copy)]
pub struct AnswerAfter(pub std::time::Duration);

/// `WWW-Authenticate` on a 401, `Retry-After` on a 429, and the pause a throttled refusal waits.
pub fn with_error_headers(
    mut response: http::Response<Body>,
    error: &ServiceError,
) -> http::Response<Body> {
    if response.status() == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer realm=\"valet\""),
        );
    }
    throttle_headers(&mut response, error);
    response
}

/// On a throttled or capped caller's answer (any listener's): `Retry-After`, and the pause it
/// waits before it is sent ([`AnswerAfter`]).
pub fn throttle_headers<B>(response: &mut http::Response<B>, error: &ServiceError) {
    let retry_after = match error {
        ServiceError::RateLimited { retry_after, .. } => Some(retry_after.as_secs()),
        ServiceError::Call(CallRefusal::UpstreamBusy {
            retry_after_seconds,
            ..
        }) => Some(*retry_after_seconds),
        _ => None,
    };
    if let Some(retry_after) = retry_after
        && let Ok(value) = http::HeaderValue::from_str(&retry_after.max(1).to_string())
    {
        response
            .headers_mut()
            .insert(http::header::RETRY_AFTER, value);
    }
    let pause = error.answer_after();
    if !pause.is_zero() {
        response.extensions_mut().insert(AnswerAfter(pause));
    }
}
