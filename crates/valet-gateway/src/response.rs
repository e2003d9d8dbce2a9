//! The gateway's answers of its own: JSON bodies for denials and errors, and the one mapping from
//! a gateway error to an HTTP status.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};

use valet_core::grant::{CallRefused, InactiveReason};
use valet_core::rules::PathError;
use valet_core::token::VerifyError;

use crate::graphql::GraphqlDenial;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// Why the gateway did not forward a call.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("no valet token: send `Authorization: Bearer <valet token>`")]
    NoToken,
    #[error("the valet token was refused: {0}")]
    BadToken(VerifyError),
    #[error("the token's grant is not known (it ended and was swept)")]
    UnknownGrant,
    #[error("{0}")]
    Inactive(InactiveReason),
    #[error("no upstream {name:?}; upstreams: [{known}]")]
    UnknownUpstream { name: String, known: String },
    #[error("scope {scope:?} is not for upstream {upstream:?}")]
    WrongUpstream { scope: String, upstream: String },
    #[error("the path is refused: {0}")]
    BadPath(PathError),
    #[error("{reason}")]
    Denied {
        scope: String,
        rules: String,
        asked: String,
        reason: String,
    },
    #[error("{0}")]
    CallRefused(CallRefused),
    #[error("the request body is larger than the {max} bytes the matching rule allows")]
    BodyTooLarge { max: u64 },
    #[error("the request body could not be read: {0}")]
    BadBody(String),
    #[error("the gateway cannot record this call durably, so it refused it (fail closed): {0}")]
    Unavailable(String),
    #[error("upstream {upstream} could not be reached: {detail}")]
    UpstreamFailed { upstream: String, detail: String },
    #[error("upstream {upstream} did not answer within {seconds} s")]
    UpstreamTimeout { upstream: String, seconds: u64 },
    #[error(
        "the gateway serves /u/<upstream>/<path>, /.well-known/jwks.json, /.well-known/openid-configuration and /healthz"
    )]
    NotFound,
    #[error(
        "this call needs a person's approval: retry the identical request with header Valet-Approval: {approval_id} once it is approved"
    )]
    ApprovalRequired {
        approval_id: String,
        call: Box<valet_core::approval::CallFingerprint>,
    },
    #[error("{0}")]
    ApprovalRefused(String),
}

impl GatewayError {
    pub fn status(&self) -> http::StatusCode {
        use http::StatusCode;
        match self {
            GatewayError::NoToken
            | GatewayError::BadToken(_)
            | GatewayError::UnknownGrant
            | GatewayError::Inactive(_) => StatusCode::UNAUTHORIZED,
            GatewayError::UnknownUpstream { .. } | GatewayError::NotFound => StatusCode::NOT_FOUND,
            GatewayError::WrongUpstream { .. }
            | GatewayError::Denied { .. }
            | GatewayError::CallRefused(_) => StatusCode::FORBIDDEN,
            GatewayError::BadPath(_) | GatewayError::BadBody(_) => StatusCode::BAD_REQUEST,
            GatewayError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::UpstreamFailed { .. } => StatusCode::BAD_GATEWAY,
            GatewayError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::ApprovalRequired { .. } => StatusCode::PRECONDITION_REQUIRED,
            GatewayError::ApprovalRefused(_) => StatusCode::FORBIDDEN,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            GatewayError::NoToken => "no_token",
            GatewayError::BadToken(_) => "bad_token",
            GatewayError::UnknownGrant => "unknown_grant",
            GatewayError::Inactive(_) => "inactive",
            GatewayError::UnknownUpstream { .. } => "unknown_upstream",
            GatewayError::WrongUpstream { .. } => "wrong_upstream",
            GatewayError::BadPath(_) => "bad_path",
            GatewayError::Denied { .. } => "denied",
            GatewayError::CallRefused(_) => "limit_reached",
            GatewayError::BodyTooLarge { .. } => "body_too_large",
            GatewayError::BadBody(_) => "bad_body",
            GatewayError::Unavailable(_) => "unavailable",
            GatewayError::UpstreamFailed { .. } => "upstream_failed",
            GatewayError::UpstreamTimeout { .. } => "upstream_timeout",
            GatewayError::NotFound => "not_found",
            GatewayError::ApprovalRequired { .. } => "approval_required",
            GatewayError::ApprovalRefused(_) => "approval_refused",
        }
    }

    pub fn from_graphql(scope: &str, rules: String, denial: GraphqlDenial) -> GatewayError {
        GatewayError::Denied {
            scope: scope.to_string(),
            rules,
            asked: denial
                .asked()
                .unwrap_or_else(|| "a GraphQL request".to_string()),
            reason: denial.to_string(),
        }
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
pub fn error_response(
    error: &GatewayError,
    grant_id: Option<&str>,
    redact: &dyn Fn(&str) -> String,
) -> http::Response<Body> {
    let mut body = serde_json::json!({
        "error": error.kind(),
        "message": redact(&error.to_string()),
    });
    if let Some(grant_id) = grant_id {
        body["grant"] = serde_json::Value::from(grant_id);
    }
    if let GatewayError::Denied {
        scope,
        rules,
        asked,
        reason,
    } = error
    {
        body["scope"] = serde_json::Value::from(scope.as_str());
        body["rules"] = serde_json::Value::from(rules.as_str());
        body["asked"] = serde_json::Value::from(redact(asked));
        body["reason"] = serde_json::Value::from(redact(reason));
    }
    if let GatewayError::ApprovalRequired { approval_id, call } = error {
        body["approval_id"] = serde_json::Value::from(approval_id.as_str());
        body["call"] = serde_json::json!({
            "method": call.method,
            "target": call.target,
            "body_sha256": call.body_sha256,
            "graphql": call.graphql,
            "variables": call.variables.as_deref().map(redact),
        });
    }
    let mut response = json(error.status(), &body);
    if error.status() == http::StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer realm=\"valet\""),
        );
    }
    response
}
