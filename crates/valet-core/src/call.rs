//! The rules of one call through the gateway, with no I/O: which allow rules a call can match,
//! which one allows its body (GraphQL parsed), what identifies the call for an approval, and why a
//! call is refused. The gateway and the service both read these; neither re-implements them.

use std::collections::BTreeMap;

use crate::approval::CallFingerprint;
use crate::canonical::{Body, CanonicalCall};
use crate::config::Scope;
use crate::grant::{CallRefused, InactiveReason};
use crate::graphql::{self, CheckedGraphql, GraphqlDenial};
use crate::rules::{AllowRule, PathError, QueryError, check_query};
use crate::token::VerifyError;

/// Why the gateway did not forward a call, or why a forwarded call failed. Every variant names
/// what was wrong; the gateway turns each into one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum CallRefusal {
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
    #[error("upstream {upstream:?} is served at {route}")]
    WrongRoute { upstream: String, route: String },
    #[error("the path is refused: {0}")]
    BadPath(PathError),
    #[error("the query string is refused: {0}")]
    BadQuery(QueryError),
    #[error("{reason}")]
    Denied {
        scope: String,
        rules: String,
        asked: String,
        reason: String,
    },
    #[error("{0}")]
    LimitReached(CallRefused),
    #[error("the request body is larger than the {max} bytes the matching rule allows")]
    BodyTooLarge { max: u64 },
    #[error("the request body could not be read: {0}")]
    BadBody(String),
    #[error("header {header}: {reason}")]
    BadHeader { header: String, reason: String },
    #[error("upstream {upstream} could not be reached: {detail}")]
    UpstreamFailed { upstream: String, detail: String },
    #[error("upstream {upstream} did not answer within {seconds} s")]
    UpstreamTimeout { upstream: String, seconds: u64 },
    /// The caller is at its share of what serving the upstream costs (an MCP server valetd
    /// runs: processes held, processes started).
    #[error("upstream {upstream}: {reason}")]
    UpstreamBusy {
        upstream: String,
        reason: String,
        retry_after_seconds: u64,
    },
    #[error(
        "the gateway serves /u/<upstream>/<path>, /mcp/<upstream>, /.well-known/jwks.json, /.well-known/openid-configuration, /healthz and /readyz"
    )]
    NotFound,
    #[error(
        "this call needs a person's approval: an approver runs `{approve_command}`; then retry the identical request with header Valet-Approval: {approval_id}"
    )]
    ApprovalRequired {
        approval_id: String,
        /// What the approver runs (`valet approve ap_… --confirm staging`).
        approve_command: String,
        call: Box<CallFingerprint>,
    },
    #[error("{0}")]
    ApprovalRefused(String),
}

impl CallRefusal {
    /// Every kind, as agents see it in the `error` field; tests enumerate this list.
    pub const KINDS: [&'static str; 20] = [
        "no_token",
        "bad_token",
        "unknown_grant",
        "inactive",
        "unknown_upstream",
        "wrong_upstream",
        "wrong_route",
        "bad_path",
        "bad_query",
        "denied",
        "limit_reached",
        "body_too_large",
        "bad_body",
        "bad_header",
        "upstream_failed",
        "upstream_timeout",
        "upstream_busy",
        "not_found",
        "approval_required",
        "approval_refused",
    ];

    pub fn kind(&self) -> &'static str {
        match self {
            CallRefusal::NoToken => "no_token",
            CallRefusal::BadToken(_) => "bad_token",
            CallRefusal::UnknownGrant => "unknown_grant",
            CallRefusal::Inactive(_) => "inactive",
            CallRefusal::UnknownUpstream { .. } => "unknown_upstream",
            CallRefusal::WrongUpstream { .. } => "wrong_upstream",
            CallRefusal::WrongRoute { .. } => "wrong_route",
            CallRefusal::BadPath(_) => "bad_path",
            CallRefusal::BadQuery(_) => "bad_query",
            CallRefusal::Denied { .. } => "denied",
            CallRefusal::LimitReached(_) => "limit_reached",
            CallRefusal::BodyTooLarge { .. } => "body_too_large",
            CallRefusal::BadBody(_) => "bad_body",
            CallRefusal::BadHeader { .. } => "bad_header",
            CallRefusal::UpstreamFailed { .. } => "upstream_failed",
            CallRefusal::UpstreamTimeout { .. } => "upstream_timeout",
            CallRefusal::UpstreamBusy { .. } => "upstream_busy",
            CallRefusal::NotFound => "not_found",
            CallRefusal::ApprovalRequired { .. } => "approval_required",
            CallRefusal::ApprovalRefused(_) => "approval_refused",
        }
    }

    /// Whether the call was forwarded and failed upstream (rather than refused by Valet).
    pub fn is_upstream_failure(&self) -> bool {
        matches!(
            self,
            CallRefusal::UpstreamFailed { .. } | CallRefusal::UpstreamTimeout { .. }
        )
    }

    fn from_graphql(scope: &Scope, denial: GraphqlDenial) -> CallRefusal {
        CallRefusal::Denied {
            scope: scope.name.clone(),
            rules: rules_summary(scope),
            asked: denial
                .asked()
                .unwrap_or_else(|| "a GraphQL request".to_string()),
            reason: denial.to_string(),
        }
    }
}

/// The rules of `scope` whose method and path match; none is a denial naming every rule.
pub fn candidate_rules<'a>(
    scope: &'a Scope,
    method: &str,
    path: &str,
    segments: &[String],
    params: &BTreeMap<String, String>,
) -> Result<Vec<&'a AllowRule>, CallRefusal> {
    let candidates: Vec<&AllowRule> = scope
        .allow
        .iter()
        .filter(|rule| rule.matches(method, segments, params))
        .collect();
    if candidates.is_empty() {
        return Err(CallRefusal::Denied {
            scope: scope.name.clone(),
            rules: rules_summary(scope),
            asked: format!("{method} {path}"),
            reason: format!("no rule of scope {:?} allows {method} {path}", scope.name),
        });
    }
    Ok(candidates)
}

/// The largest body any of `candidates` accepts: the gateway reads no more than this.
pub fn max_body(candidates: &[&AllowRule]) -> u64 {
    candidates
        .iter()
        .map(|rule| rule.max_body)
        .max()
        .unwrap_or(crate::rules::DEFAULT_MAX_BODY)
}

/// What the upstream receives for an allowed call: built from the canonical call and the rule
/// that allowed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forwarded {
    /// The canonical query string (REST rules), never one for GraphQL.
    pub query: Option<String>,
    /// The Content-Type the upstream receives: the gateway's own, from the canonical body.
    pub content_type: Option<String>,
    /// The body: the canonical GraphQL request, or the canonical body.
    pub body: Vec<u8>,
    /// The body as a person reads it, whole; `None` for bytes no person can read.
    pub rendering: Option<String>,
    /// For GraphQL: every field asked for, every call as it will execute, every operation.
    pub graphql: Option<CheckedGraphql>,
}

/// Picks the first candidate rule that allows the canonical call (query parameters, body;
/// GraphQL rules check its document), and builds what the upstream receives.
pub fn choose_rule<'a>(
    scope: &Scope,
    candidates: &[&'a AllowRule],
    call: &CanonicalCall,
    params: &BTreeMap<String, String>,
) -> Result<(&'a AllowRule, Forwarded), CallRefusal> {
    let mut first_denial = None;
    for rule in candidates {
        match allows(scope, rule, call, params) {
            Ok(forwarded) => return Ok((rule, forwarded)),
            Err(denial) => {
                first_denial.get_or_insert(denial);
            }
        }
    }
    Err(first_denial.unwrap_or_else(|| CallRefusal::Denied {
        scope: scope.name.clone(),
        rules: rules_summary(scope),
        asked: call.asked(),
        reason: "no rule allows it".into(),
    }))
}

fn allows(
    scope: &Scope,
    rule: &AllowRule,
    call: &CanonicalCall,
    params: &BTreeMap<String, String>,
) -> Result<Forwarded, CallRefusal> {
    let denied = |asked: String, reason: String| CallRefusal::Denied {
        scope: scope.name.clone(),
        rules: rules_summary(scope),
        asked,
        reason: format!("{rule}: {reason}"),
    };
    // Frameworks bind a route's parameters from a body too, some letting the body win (Laravel's
    // `$request->env`, Spring's `@ModelAttribute`): a body name that is one of the path's
    // parameters could replace the segment the rule bound.
    if let Some(name) = call.body_names().into_iter().find(|name| {
        rule.path
            .params()
            .any(|param| crate::json::fold(param) == crate::json::fold(name))
    }) {
        return Err(denied(
            call.asked(),
            format!(
                "the body names {name:?}, a parameter of the path {}; frameworks that bind both let the body win, so send it in the path only",
                rule.path
            ),
        ));
    }
    // The rule bounds what the upstream receives: the same canonical call meets the same rule,
    // however it was spaced when sent.
    let body = call.body.bytes();
    if body.len() as u64 > rule.max_body {
        return Err(CallRefusal::BodyTooLarge { max: rule.max_body });
    }
    let Some(allow) = &rule.graphql else {
        let query = check_query(&call.query, &rule.query, params)
            .map_err(|error| denied(call.asked(), error.to_string()))?;
        return Ok(Forwarded {
            query: query.canonical(),
            content_type: call.body.content_type(),
            body,
            rendering: call.body.render(),
            graphql: None,
        });
    };
    // A GraphQL request travels only as POST application/json, with no query string: the forms
    // servers also execute (GET ?query=, form bodies, application/graphql, multipart) would let
    // the upstream run a document the gateway did not check.
    if call.method != "POST" {
        return Err(denied(
            format!("GraphQL over {}", call.method),
            "GraphQL requests are accepted only as POST application/json (a GET carries its document in the URL)".into(),
        ));
    }
    if !call.query.is_empty() {
        return Err(denied(
            "a GraphQL request with a query string".into(),
            format!(
                "{} (servers execute ?query= before the body)",
                QueryError::NotTaken
            ),
        ));
    }
    let value = match &call.body {
        Body::Json { media_type, value } if media_type == "application/json" => value,
        other => {
            return Err(denied(
                format!(
                    "a GraphQL request of content type {}",
                    other.content_type().as_deref().unwrap_or("(none)")
                ),
                "send Content-Type: application/json; form, multipart and application/graphql bodies are not accepted".into(),
            ));
        }
    };
    let checked = graphql::check_request(value, allow, params)
        .map_err(|denial| CallRefusal::from_graphql(scope, denial))?;
    Ok(Forwarded {
        query: None,
        content_type: Some("application/json".into()),
        body: checked.body.clone(),
        rendering: Some(checked.rendering.clone()),
        graphql: Some(checked),
    })
}

/// Every rule of a scope in one line, for denials.
pub fn rules_summary(scope: &Scope) -> String {
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

/// The identity of a call for approval — its canonical call as the upstream receives it — and
/// the whole of it as a person reads it.
pub fn fingerprint(
    upstream: &str,
    rule: &AllowRule,
    call: &CanonicalCall,
    forwarded: &Forwarded,
) -> CallFingerprint {
    let target = match &forwarded.query {
        Some(query) => format!("{}?{query}", call.path.canonical()),
        None => call.path.canonical(),
    };
    let digest = ring::digest::digest(&ring::digest::SHA256, &forwarded.body);
    let graphql = forwarded.graphql.as_ref();
    CallFingerprint {
        method: call.method.clone(),
        target,
        content_type: forwarded.content_type.clone().unwrap_or_default(),
        body_sha256: hex::encode(digest.as_ref()),
        graphql: graphql
            .map(|checked| checked.fields.iter().map(ToString::to_string).collect())
            .unwrap_or_default(),
        upstream: upstream.to_string(),
        calls: graphql
            .map(|checked| checked.calls.iter().map(ToString::to_string).collect())
            .unwrap_or_default(),
        body_bytes: forwarded.body.len() as u64,
        rendering: forwarded.rendering.clone().unwrap_or_default(),
        headers: call.headers.clone(),
        rule: rule.to_string(),
    }
}

/// Whether a person can be asked to approve `call`: only a call shown whole, within
/// [`crate::canonical::MAX_RENDERING`]. Returns why not.
pub fn unapprovable(call: &CallFingerprint) -> Option<String> {
    if call.body_bytes > 0 && call.rendering.is_empty() {
        return Some(format!(
            "its body ({} bytes of {}) is not text a person can read, and a person approves only what they read whole",
            call.body_bytes, call.content_type
        ));
    }
    let shown = call.rendering.len() + call.calls.iter().map(String::len).sum::<usize>();
    (shown > crate::canonical::MAX_RENDERING).then(|| {
        format!(
            "it renders to {shown} bytes, and a person approves only what they read whole (at most {} bytes); split it into smaller calls",
            crate::canonical::MAX_RENDERING
        )
    })
}
