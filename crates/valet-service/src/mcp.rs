//! MCP calls through the gateway: authorize one POST of JSON-RPC (the token, its grant and
//! scope; every message checked against the scope's tools, resources and prompts; each tool call
//! counted against its rule, or held for a person's approval of that exact call) and record it.
//! The gateway forwards the body built here and nothing else.

use bytes::Bytes;
use serde_json::Value;
use valet_core::audit::{AuditAction, Outcome};
use valet_core::call::CallRefusal;
use valet_core::canonical::{Body, BodyError};
use valet_core::config::UpstreamKind;
use valet_core::mcp::{self, CheckedMessage, McpAllow, McpDenial};

use crate::gateway::{CallDenial, GrantHolder, call_context, call_event};
use crate::{CallDecision, CallSite, ServiceError, Valet};

/// One POST to `/mcp/<upstream>`.
pub struct McpRequest<'a> {
    pub site: &'a CallSite,
    /// The `Authorization` header as sent, if any.
    pub authorization: Option<&'a str>,
    /// The approval this request goes on with, once a person approved its tool call.
    pub approval: Option<&'a str>,
    /// The `Mcp-Session-Id` the agent sent (as the gateway gave it out), if any.
    pub session: Option<&'a str>,
    /// Every `Content-Type` header as sent: JSON-RPC travels as `application/json`, once.
    pub content_types: Vec<&'a str>,
    /// Every `Content-Encoding` header as sent.
    pub content_encodings: Vec<&'a str>,
    pub body: &'a [u8],
}

/// An MCP POST the gateway may forward: the call (grant, upstream, canonical body, root
/// credential) and what the reply filter needs.
pub struct McpDecision {
    pub call: CallDecision,
    /// Each message as it will be forwarded.
    pub checked: Vec<CheckedMessage>,
    /// What the grant may use: list replies are narrowed to it.
    pub allow: McpAllow,
    /// The server's own session id behind the one the agent sent (checked to be this grant's).
    pub server_session: Option<String>,
}

impl Valet {
    /// Authorizes one POST of JSON-RPC to an MCP upstream. A refusal is recorded and returned
    /// (`approval_required` when a tool call waits for a person); an allowed POST is recorded
    /// (each message: method, tool or resource, rule, the arguments' digest and the bound
    /// arguments in clear) before it is returned.
    pub async fn authorize_mcp(&self, request: McpRequest<'_>) -> Result<McpDecision, CallDenial> {
        let site = request.site;
        let mut context = call_context(None);
        let outcome = self.authorize_mcp_decided(request, &mut context).await;
        self.conclude_call(site, context, outcome).await
    }

    /// The session id an agent is given for the server's `server_session` on `grant_id`.
    pub fn bind_mcp_session(&self, grant_id: &str, server_session: &str) -> String {
        self.mcp_sessions.bind(grant_id, server_session)
    }

    /// Whether the grant `id` is still active (not revoked, expired or used up). A grant that
    /// cannot be read is not: authority that cannot be checked is not used (an answer streaming
    /// on it is cut off, a server process holding the credential for it is stopped).
    pub async fn grant_is_active(&self, id: &str) -> bool {
        match self.store.get_grant(id).await {
            Ok(Some(grant)) => grant.inactive_reason(self.clock.now()).is_none(),
            Ok(None) => false,
            Err(error) => {
                tracing::warn!(%error, "a grant could not be read to check it is still active; treated as ended");
                false
            }
        }
    }

    async fn authorize_mcp_decided(
        &self,
        request: McpRequest<'_>,
        context: &mut valet_core::audit::AuditEvent,
    ) -> Result<McpDecision, ServiceError> {
        let site = request.site;
        let (config, upstream, grant, in_flight) = self
            .grant_for_call(
                site,
                request.authorization,
                UpstreamKind::Mcp,
                None,
                context,
            )
            .await?;
        let Some(scope) = config.scopes.get(&grant.scope) else {
            return Err(CallRefusal::UnknownGrant.into());
        };
        let allow = scope.mcp.clone().unwrap_or_default();
        // A session belongs to the grant that opened it: another grant's token cannot reach the
        // server's session state with it.
        let server_session = match request.session {
            None => None,
            Some(presented) => Some(
                self.mcp_sessions
                    .unbind(&grant.id, presented)
                    .ok_or_else(|| CallRefusal::Denied {
                        scope: scope.name.clone(),
                        rules: allow.summary(),
                        asked: "an MCP session".into(),
                        reason: "Mcp-Session-Id names a session this grant did not open (or not one the gateway gave out); open your own with initialize".into(),
                    })?,
            ),
        };
        // The POST read once, as the canonical call reads a body: JSON-RPC is application/json.
        crate::gateway::refuse_content_encoding(&request.content_encodings)?;
        let (checked, body) = if crate::gateway::body_is_heavy(request.body) {
            // A large POST is read on the blocking pool: no request holds the async workers.
            let content_types: Vec<String> = request
                .content_types
                .iter()
                .map(|value| value.to_string())
                .collect();
            let (bytes, allow, params, scope_name) = (
                bytes::Bytes::copy_from_slice(request.body),
                allow.clone(),
                grant.params.clone(),
                scope.name.clone(),
            );
            tokio::task::spawn_blocking(move || {
                let content_types: Vec<&str> = content_types.iter().map(String::as_str).collect();
                read_post(&content_types, &bytes, &allow, &params, &scope_name)
            })
            .await
            .map_err(|error| {
                ServiceError::Internal(format!("reading the call failed: {error}"))
            })??
        } else {
            read_post(
                &request.content_types,
                request.body,
                &allow,
                &grant.params,
                &scope.name,
            )?
        };
        let holder = GrantHolder {
            site,
            principal: grant.principal.clone(),
        };
        // Each tool call counts against its rule; one that needs approval goes only alone, and
        // only as the exact call a person approved.
        let mut grant = grant;
        let mut rules = Vec::new();
        let mut counted = Vec::new();
        let n_messages = checked.len();
        for message in &checked {
            let Some(rule) = message.tool_rule.map(|index| &allow.tools[index]) else {
                continue;
            };
            rules.push(rule.to_string());
            let Some(approval) = &rule.approval else {
                counted.push((rule.counter(), 1));
                continue;
            };
            if n_messages > 1 {
                return Err(CallRefusal::Denied {
                    scope: scope.name.clone(),
                    rules: allow.summary(),
                    asked: format!("tools/call {}", message.target.clone().unwrap_or_default()),
                    reason: format!(
                        "{rule} needs a person's approval of each call, and a batch of {n_messages} messages holds it; send the call on its own"
                    ),
                }
                .into());
            }
            let call = mcp::call_fingerprint(&upstream.name, rule, message);
            grant = self
                .admit_call(
                    &holder,
                    grant,
                    &rule.counter(),
                    1,
                    Some((approval, call)),
                    request.approval,
                    context,
                )
                .await?;
        }
        // Every call of the POST counted as one change: a batch refused in part counts nothing.
        if !counted.is_empty() {
            grant = self.count_calls(grant, &counted).await?;
        }
        let records: Vec<Value> = checked
            .iter()
            .map(|message| mcp::audit_entry(message, &allow))
            .collect();
        let rule = rules.join(", ");
        let event = call_event(AuditAction::GatewayCall, Outcome::Allowed, Some(&grant))
            .with("rule", &rule)
            .with_value("mcp", Value::from(records));
        // Written before it is forwarded; durable before any answer is released.
        let durable = self.record_written(site, event).await?;
        let secret = self.root_credential(&upstream)?;
        Ok(McpDecision {
            call: CallDecision {
                site: site.clone(),
                content_type: Some("application/json".into()),
                headers: Vec::new(),
                grant,
                upstream,
                rule,
                body: Bytes::from(body),
                secret,
                durable: Some(durable),
                in_flight: Some(in_flight),
            },
            checked,
            allow,
            server_session,
        })
    }
}

/// A POST of JSON-RPC read once, as the canonical call reads a body (`application/json`, strict
/// JSON), then checked message by message against what the scope allows.
fn read_post(
    content_types: &[&str],
    bytes: &[u8],
    allow: &McpAllow,
    params: &std::collections::BTreeMap<String, String>,
    scope: &str,
) -> Result<(Vec<CheckedMessage>, Vec<u8>), CallRefusal> {
    let denied = |asked: String, reason: String| CallRefusal::Denied {
        scope: scope.to_string(),
        rules: allow.summary(),
        asked,
        reason,
    };
    let value = match Body::read(content_types, bytes) {
        Ok(Body::Json { media_type, value }) if media_type == "application/json" => value,
        Ok(other) => {
            return Err(CallRefusal::BadHeader {
                header: "Content-Type".into(),
                reason: format!(
                    "{}: send JSON-RPC as application/json",
                    other.content_type().unwrap_or_else(|| "(none)".into())
                ),
            });
        }
        Err(BodyError::Json(error)) => {
            return Err(denied(
                "a body that is not JSON-RPC".into(),
                McpDenial::NotJsonRpc(error.to_string()).to_string(),
            ));
        }
        Err(error) => {
            return Err(CallRefusal::BadHeader {
                header: "Content-Type".into(),
                reason: error.to_string(),
            });
        }
    };
    mcp::check_post(&value, allow, params)
        .map_err(|denial| denied(denial.asked(), denial.to_string()))
}
