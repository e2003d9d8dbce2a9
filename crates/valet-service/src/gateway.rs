//! The gateway's operations: authorize one call (verify the token, read the grant, match a rule on
//! method, path and body, take a person's approval when the rule needs one, count the call, and
//! record the decision) and record how a forwarded call ended. The gateway itself only routes,
//! forwards and streams; every grant rule and every audit record of a call lives here.

use std::net::SocketAddr;

use async_trait::async_trait;
use bytes::Bytes;
use valet_core::Secret;
use valet_core::approval::{
    ApprovalError, ApprovalKind, ApprovalRequest, ApprovalStatus, CallFingerprint,
};
use valet_core::audit::{AuditAction, AuditEvent, Outcome};
use valet_core::call::{self, CallRefusal};
use valet_core::canonical::CanonicalCall;
use valet_core::config::Upstream;
use valet_core::grant::{Grant, RuleCounter};
use valet_core::rules::{self, AllowRule};
use valet_core::token::Expectations;

use crate::caller::Attribution;
use crate::compare_and_swap::{Decision, Swapped, compare_and_swap};
use crate::{ServiceError, Valet};

/// Where a gateway call came from and what it asked, before anything is checked.
#[derive(Debug, Clone)]
pub struct CallSite {
    pub request_id: String,
    pub peer: SocketAddr,
    /// The upstream named in the URL (`/u/<upstream>/…`).
    pub upstream: String,
    pub method: String,
    /// The path after the upstream's name, starting with `/`.
    pub path: String,
    /// The raw query string, when there is one.
    pub query: Option<String>,
}

impl Attribution for CallSite {
    fn attribute(&self, event: AuditEvent) -> AuditEvent {
        event
            .with("request_id", &self.request_id)
            .with("upstream", &self.upstream)
            .with("method", &self.method)
            .with("path", &self.path)
            .with("query", self.query.clone().unwrap_or_default())
            .with("peer", self.peer.ip().to_string())
    }

    fn request_id(&self) -> &str {
        &self.request_id
    }
}

/// How a refusal window counted per grant names its subject (`grant:ID`).
pub(crate) const GRANT_SUBJECT: &str = "grant:";

/// The holder of the grant a call presents, as its records name it.
pub(crate) struct GrantHolder<'a> {
    pub(crate) site: &'a CallSite,
    pub(crate) principal: String,
}

impl Attribution for GrantHolder<'_> {
    fn attribute(&self, event: AuditEvent) -> AuditEvent {
        self.site
            .attribute(event)
            .with("principal", &self.principal)
    }

    fn request_id(&self) -> &str {
        &self.site.request_id
    }
}

/// The request body, read only once the call may have one and only up to what its rule allows.
#[async_trait]
pub trait BodySource: Send {
    /// The length the request declares, when it declares one.
    fn declared_length(&self) -> Option<u64>;
    /// Reads the whole body; more than `max` bytes is `BodyTooLarge`.
    async fn read(self: Box<Self>, max: u64) -> Result<Bytes, CallRefusal>;
}

/// One call to authorize.
pub struct CallRequest<'a> {
    pub site: &'a CallSite,
    /// The `Authorization` header as sent, if any.
    pub authorization: Option<&'a str>,
    /// The `Valet-Approval` header as sent, if any.
    pub approval: Option<&'a str>,
    /// Every `Content-Type` header as sent (one is expected, or none without a body).
    pub content_types: Vec<&'a str>,
    /// Every `Content-Encoding` header as sent.
    pub content_encodings: Vec<&'a str>,
    /// Every request header as sent: those the upstream may receive (the gateway's allowlist and
    /// the upstream's `forward_headers`) are part of the canonical call.
    pub headers: Vec<(&'a str, &'a [u8])>,
    pub body: Box<dyn BodySource + 'a>,
    /// Told the grant's principal once the token is verified and its grant active, before the
    /// body is read (the gateway counts the connection as authenticated from then on).
    pub on_authenticated: Option<&'a (dyn Fn(&str) + Sync)>,
}

/// A call the gateway may forward, with everything it needs to do so: the request the upstream
/// receives is built from these checked parts only.
pub struct CallDecision {
    /// Where the call came from, with the path and query as the upstream receives them
    /// (canonical, re-encoded from what was checked).
    pub site: CallSite,
    /// The Content-Type the upstream receives: the gateway's own, for the canonical body.
    pub content_type: Option<String>,
    /// The agent's headers the upstream receives, as the canonical call read them.
    pub headers: Vec<(String, String)>,
    pub grant: Grant,
    pub upstream: Upstream,
    /// The rule that allowed the call, as people read it (`allow[0] POST /graphql`).
    pub rule: String,
    /// The body the upstream receives: what was checked (for GraphQL, rebuilt from it).
    pub body: Bytes,
    /// The root credential to inject on the upstream leg.
    pub secret: Secret,
    /// The call's audit record, written before the decision was returned and being made
    /// durable: the gateway forwards meanwhile, and releases no answer before it completes.
    pub durable: Option<crate::DurableRecord>,
    /// Its place among the grant's and principal's calls in flight, held until the answer has
    /// been streamed ([`CallDecision::answered`]) or the decision is dropped.
    pub in_flight: Option<crate::in_flight::InFlightPlace>,
}

impl CallDecision {
    /// The answer has been streamed (or the agent went away): the call no longer counts as in
    /// flight, though its closing record may still be being written.
    pub fn answered(&mut self) {
        self.in_flight = None;
    }
}

impl std::fmt::Debug for CallDecision {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("CallDecision")
            .field("request_id", &self.site.request_id)
            .field("grant", &self.grant.id)
            .field("upstream", &self.upstream.name)
            .field("rule", &self.rule)
            .finish()
    }
}

/// A call that was not authorized: why, and the grant it presented once that was known.
#[derive(Debug)]
pub struct CallDenial {
    pub error: ServiceError,
    pub grant_id: Option<String>,
    /// The principal the grant belongs to, once the token named one.
    pub principal: Option<String>,
}

/// How a forwarded call ended.
#[derive(Debug)]
pub enum CallOutcome {
    /// The upstream answered; the body was streamed to the agent (`complete`: to its end).
    Answered {
        status: u16,
        bytes: u64,
        latency_ms: f64,
        complete: bool,
    },
    /// The upstream could not be reached or did not answer in time.
    Failed(CallRefusal),
}

/// Which upstreams the gateway serves, for routing.
pub struct Upstreams {
    pub names: Vec<String>,
}

impl Valet {
    /// Authorizes one call through the gateway. A refusal is recorded (action `gateway.call`,
    /// outcome `denied`, the reason) and returned; an allowed call is recorded before it is
    /// returned, so no call is forwarded without its record.
    pub async fn authorize_call(
        &self,
        request: CallRequest<'_>,
    ) -> Result<CallDecision, CallDenial> {
        let site = request.site;
        let mut context = call_context(None);
        let outcome = self.authorize_decided(request, &mut context).await;
        self.conclude_call(site, context, outcome).await
    }

    /// The caller of an MCP POST, checked before its body is read (the token, its grant, the
    /// grant's budgets): a request without a valid token costs its source's budget, not a
    /// megabyte of memory. Refusals are recorded as every call's are; the principal is returned.
    pub async fn admit_mcp_caller(
        &self,
        site: &CallSite,
        authorization: Option<&str>,
    ) -> Result<String, CallDenial> {
        let mut context = call_context(None);
        let outcome = self
            .grant_for_call(
                site,
                authorization,
                valet_core::config::UpstreamKind::Mcp,
                None,
                &mut context,
            )
            .await
            .map(|(_, _, grant, _place)| grant.principal);
        self.conclude_call(site, context, outcome).await
    }

    /// How every call's decision ends: a call without a valid token is anonymous, counted
    /// against its source (beyond its budget refused as throttled) and recorded the first time
    /// per source and kind in a window, the rest in its summary; a grant's refusal spends its
    /// budget and is recorded (or summarised); an allowed call was recorded by its decision.
    pub(crate) async fn conclude_call<T>(
        &self,
        site: &CallSite,
        context: AuditEvent,
        mut outcome: Result<T, ServiceError>,
    ) -> Result<T, CallDenial> {
        let source = site.peer.ip();
        let (limit, total) = {
            let config = self.config();
            (
                config.server.failed_authentication_limit,
                config.server.failed_authentication_limit_total,
            )
        };
        let now_ms = self.clock.now_millis();
        let grant_id = context.get("grant_id").map(str::to_string);
        let principal = context.get("grant_principal").map(str::to_string);
        let mut anonymous = None;
        if let Err(ServiceError::Call(
            refusal @ (CallRefusal::NoToken | CallRefusal::BadToken(_)),
        )) = &outcome
        {
            anonymous = Some(refusal.kind());
            match self.limits.source_admitted(source, limit, total, now_ms) {
                Ok(()) => self.limits.failed(source, limit, total, now_ms),
                Err(retry_after) => {
                    anonymous = Some("source_rate_limited");
                    outcome = Err(ServiceError::throttled(
                        format!(
                            "too many calls without a valid token from {source} (at most {limit}, server.failed_authentication_limit); retry in {} s",
                            retry_after.as_secs().max(1)
                        ),
                        retry_after,
                    ));
                }
            }
        }
        if let (Some(kind), Err(error)) = (anonymous, &outcome)
            && !self.limits.note_refusal(
                source.to_string(),
                AuditAction::GatewayCall,
                kind,
                &error.to_string(),
                &format!("{} /u/{}{}", site.method, site.upstream, site.path),
                now_ms,
            )
        {
            return outcome.map_err(|error| CallDenial {
                error,
                grant_id,
                principal,
            });
        }
        if let Err(error) = &outcome
            && !self.call_refusal_recorded_now(grant_id.as_deref(), site, error)
        {
            return outcome.map_err(|error| CallDenial {
                error,
                grant_id,
                principal,
            });
        }
        self.answer(site, context, outcome)
            .await
            .map_err(|error| CallDenial {
                error,
                grant_id,
                principal,
            })
    }

    /// Whether a refused call of the grant `grant_id` is recorded now: the first refusal of each
    /// kind per grant in a window is, the rest are counted into the window's summary (a token
    /// sending refused calls in a loop costs a few records a minute, not one each). A call that
    /// waits for an approval is recorded the first time in a window for each approval (the
    /// record names it); a refused approval always is.
    pub(crate) fn call_refusal_recorded_now(
        &self,
        grant_id: Option<&str>,
        site: &CallSite,
        error: &ServiceError,
    ) -> bool {
        let Some(grant_id) = grant_id else {
            return true;
        };
        // Every refusal spends the grant's budget (at a cap included: answered at once, they
        // could otherwise be looped on at full speed) but those of a grant already over it.
        if error.answer_after().is_zero() {
            self.limits.grant_refused(grant_id, self.clock.now_millis());
        }
        let summarised = match error {
            ServiceError::Call(CallRefusal::ApprovalRefused(_)) => false,
            ServiceError::Call(_) | ServiceError::RateLimited { .. } => true,
            _ => false,
        };
        // A call no rule allows is told apart by what it asked, a call waiting for a person by
        // the approval it waits for: each different one is recorded (once a window), repeats of
        // it are counted.
        let subject = match error {
            ServiceError::Call(CallRefusal::Denied { asked, .. }) => {
                let digest = valet_core::audit::sha256_hex(asked.as_bytes());
                format!("{GRANT_SUBJECT}{grant_id}#{}", &digest[..16])
            }
            ServiceError::Call(CallRefusal::ApprovalRequired { approval_id, .. }) => {
                format!("{GRANT_SUBJECT}{grant_id}#{approval_id}")
            }
            _ => format!("{GRANT_SUBJECT}{grant_id}"),
        };
        !summarised
            || self.limits.note_refusal(
                subject,
                AuditAction::GatewayCall,
                error.kind(),
                &error.to_string(),
                &format!("{} /u/{}{}", site.method, site.upstream, site.path),
                self.clock.now_millis(),
            )
    }

    /// Records a call refused before it reached an upstream's rules (an unknown route), so
    /// every refusal of the gateway is in the audit log (the first of its kind from a source in
    /// a window at once, the rest in the window's summary); returns the refusal.
    pub async fn refuse_call(&self, site: &CallSite, refusal: CallRefusal) -> ServiceError {
        if !self.limits.note_refusal(
            site.peer.ip().to_string(),
            AuditAction::GatewayCall,
            refusal.kind(),
            &refusal.to_string(),
            &format!("{} {}", site.method, site.path),
            self.clock.now_millis(),
        ) {
            return refusal.into();
        }
        match self
            .answer::<()>(site, call_context(None), Err(refusal.into()))
            .await
        {
            Err(error) => error,
            Ok(()) => ServiceError::Internal("a refusal answered success".into()),
        }
    }

    /// Waits until the call's own audit record is on disk. When its sync failed, the call had
    /// already reached the upstream: that is recorded (best effort: the log is what failed) and
    /// the error returned, and the agent gets no answer but the refusal.
    pub async fn call_record_durable(
        &self,
        decision: &mut CallDecision,
    ) -> Result<(), ServiceError> {
        let Some(durable) = decision.durable.take() else {
            return Ok(());
        };
        let Err(error) = durable.wait().await else {
            return Ok(());
        };
        tracing::error!(request_id = decision.site.request_id, %error, "the audit record of a forwarded gateway call could not be made durable; its answer is withheld");
        let event = call_event(
            AuditAction::GatewayCall,
            Outcome::Failed,
            Some(&decision.grant),
        )
        .with("rule", &decision.rule)
        .with("refusal", AUDIT_SYNC_FAILED)
        .with(
            "reason",
            format!("the call reached the upstream, but its audit record could not be made durable ({error}); the answer was withheld"),
        );
        if let Err(second) = self.record(&decision.site, event).await {
            tracing::error!(request_id = decision.site.request_id, error = %second, "cannot record the failed sync either");
        }
        Err(error.into())
    }

    /// Records that a forwarded call failed upstream (unreachable, too slow, an answer that cannot
    /// be masked) and returns the error the agent gets.
    pub async fn call_failed(&self, decision: &CallDecision, refusal: CallRefusal) -> ServiceError {
        match self
            .record_call_outcome(decision, CallOutcome::Failed(refusal))
            .await
        {
            Err(error) => error,
            Ok(()) => ServiceError::Internal("a failed call was recorded as success".into()),
        }
    }

    /// Records how a forwarded call ended. A failed call is recorded as `gateway.call`, outcome
    /// `failed` (and returned, for the agent); an answered one as `gateway.response`.
    pub async fn record_call_outcome(
        &self,
        decision: &CallDecision,
        outcome: CallOutcome,
    ) -> Result<(), ServiceError> {
        match outcome {
            // Valet's own refusal after the decision (the caller at its share of an upstream's
            // processes): it spends the grant's refusal budget and is summarised like any other.
            CallOutcome::Failed(refusal @ CallRefusal::UpstreamBusy { .. }) => {
                let error = ServiceError::Call(refusal);
                if self.call_refusal_recorded_now(Some(&decision.grant.id), &decision.site, &error)
                {
                    self.answer::<()>(
                        &decision.site,
                        call_context(Some(&decision.grant)),
                        Err(error),
                    )
                    .await
                } else {
                    Err(error)
                }
            }
            CallOutcome::Failed(refusal) => {
                self.answer::<()>(
                    &decision.site,
                    call_context(Some(&decision.grant)),
                    Err(refusal.into()),
                )
                .await
            }
            CallOutcome::Answered {
                status,
                bytes,
                latency_ms,
                complete,
            } => {
                let event = call_event(
                    AuditAction::GatewayResponse,
                    Outcome::Allowed,
                    Some(&decision.grant),
                )
                .with("rule", &decision.rule)
                .with("status", status.to_string())
                .with_value("bytes", serde_json::Value::from(bytes))
                .with_value("latency_ms", serde_json::Value::from(latency_ms))
                .with_value("complete", serde_json::Value::from(complete));
                self.record(&decision.site, event).await
            }
        }
    }

    /// The upstreams in the config, for the gateway's routing errors.
    pub fn upstreams(&self) -> Upstreams {
        Upstreams {
            names: self.config().upstreams.keys().cloned().collect(),
        }
    }

    /// The checks every call starts with: the upstream named, the token (audience pinned to
    /// that upstream), its grant (active), and the grant's scope (for that upstream). Sets the
    /// audit context to the grant once it is known.
    pub(crate) async fn grant_for_call(
        &self,
        site: &CallSite,
        authorization: Option<&str>,
        kind: valet_core::config::UpstreamKind,
        on_authenticated: Option<&(dyn Fn(&str) + Sync)>,
        context: &mut AuditEvent,
    ) -> Result<
        (
            std::sync::Arc<valet_core::config::Config>,
            Upstream,
            Grant,
            crate::in_flight::InFlightPlace,
        ),
        ServiceError,
    > {
        let config = self.config();
        let upstream = config
            .upstreams
            .get(&site.upstream)
            .cloned()
            .ok_or_else(|| CallRefusal::UnknownUpstream {
                name: site.upstream.clone(),
                known: config
                    .upstreams
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        if upstream.kind != kind {
            return Err(CallRefusal::WrongRoute {
                upstream: upstream.name.clone(),
                route: match upstream.kind {
                    valet_core::config::UpstreamKind::Http => {
                        format!("/u/{}/<path>", upstream.name)
                    }
                    valet_core::config::UpstreamKind::Mcp => format!("/mcp/{}", upstream.name),
                },
            }
            .into());
        }

        // The token, verified with the audience pinned to this upstream.
        let token = authorization
            .and_then(bearer_token)
            .ok_or(CallRefusal::NoToken)?;
        let expectations = Expectations {
            issuer: &config.server.issuer,
            audience: Some(&upstream.name),
            now: self.clock.now(),
            leeway_seconds: 0,
        };
        let claims = self
            .verified_tokens
            .verify(token, &self.keys.ring()?, expectations)
            .map_err(CallRefusal::BadToken)?;
        context.set("grant_id", &claims.jti);
        if let Err(retry_after) = self
            .limits
            .grant_admitted(&claims.jti, self.clock.now_millis())
        {
            return Err(ServiceError::throttled(
                format!(
                    "this grant's calls met {} refusals in a minute (refused by its scope, or at a cap such as its principal's calls in flight), the most a grant meets; until that eases its calls are refused unread, each answered after a pause: retry in {} s",
                    crate::authentication_limits::GRANT_REFUSALS.count,
                    retry_after.as_secs().max(1)
                ),
                retry_after,
            ));
        }
        let grant = self
            .store
            .get_grant(&claims.jti)
            .await?
            .ok_or(CallRefusal::UnknownGrant)?;
        *context = call_context(Some(&grant));
        if let Some(reason) = grant.inactive_reason(self.clock.now()) {
            return Err(CallRefusal::Inactive(reason).into());
        }
        if let Some(authenticated) = on_authenticated {
            authenticated(&grant.principal);
        }
        // A place among the calls in flight, before anything is counted.
        let caps = crate::in_flight::Caps::for_connections(config.server.max_connections);
        let place = self
            .in_flight
            .take(caps, &grant.id, &grant.principal)
            .map_err(|reason| {
                ServiceError::at_capacity(reason, std::time::Duration::from_secs(1))
            })?;
        let scope = config
            .scopes
            .get(&grant.scope)
            .ok_or_else(|| CallRefusal::Denied {
                scope: grant.scope.clone(),
                rules: "(none: the scope is no longer in the config)".into(),
                asked: format!("{} {}", site.method, site.path),
                reason: format!("scope {:?} no longer exists", grant.scope),
            })?;
        if scope.upstream.as_deref() != Some(upstream.name.as_str()) {
            return Err(CallRefusal::WrongUpstream {
                scope: scope.name.clone(),
                upstream: upstream.name.clone(),
            }
            .into());
        }
        Ok((config, upstream, grant, place))
    }

    async fn authorize_decided(
        &self,
        request: CallRequest<'_>,
        context: &mut AuditEvent,
    ) -> Result<CallDecision, ServiceError> {
        let site = request.site;
        let (config, upstream, grant, in_flight) = self
            .grant_for_call(
                site,
                request.authorization,
                valet_core::config::UpstreamKind::Http,
                request.on_authenticated,
                context,
            )
            .await?;
        let holder = GrantHolder {
            site,
            principal: grant.principal.clone(),
        };
        let Some(scope) = config.scopes.get(&grant.scope) else {
            return Err(CallRefusal::UnknownGrant.into());
        };

        // The path, refused if it could mean something else upstream; then the rules it matches.
        let path = rules::check_path(&site.path).map_err(CallRefusal::BadPath)?;
        let candidates = call::candidate_rules(
            scope,
            &site.method,
            &site.path,
            &path.segments,
            &grant.params,
        )?;
        refuse_content_encoding(&request.content_encodings)?;

        // The body, read whole up to the largest limit of the candidate rules; then the canonical
        // call, read once from it: what the rules check, what an approver reads and what the
        // upstream receives. Reading and checking is CPU work with a budget: a large body or a
        // GraphQL document goes to the blocking pool, so no request can stall the async workers.
        let max_body = call::max_body(&candidates);
        if let Some(length) = request.body.declared_length()
            && length > max_body
        {
            return Err(CallRefusal::BodyTooLarge { max: max_body }.into());
        }
        let body = request.body.read(max_body).await?;
        let heavy = body_is_heavy(&body) || candidates.iter().any(|rule| rule.graphql.is_some());
        let indices: Vec<usize> = candidates.iter().map(|rule| rule.index).collect();
        let content_types: Vec<String> = request
            .content_types
            .iter()
            .map(|value| value.to_string())
            .collect();
        let headers: Vec<(String, Vec<u8>)> = request
            .headers
            .iter()
            .filter(|(name, _)| forwards_header(&upstream, name))
            .map(|(name, value)| (name.to_ascii_lowercase(), value.to_vec()))
            .collect();
        let read_and_choose = {
            let config = config.clone();
            let scope_name = scope.name.clone();
            let method = site.method.clone();
            let sent_path = site.path.clone();
            let query = site.query.clone();
            let params = grant.params.clone();
            move || -> Result<(usize, CanonicalCall, call::Forwarded), CallRefusal> {
                let scope = config
                    .scopes
                    .get(&scope_name)
                    .ok_or(CallRefusal::UnknownGrant)?;
                let content_types: Vec<&str> = content_types.iter().map(String::as_str).collect();
                let headers: Vec<(String, &[u8])> = headers
                    .iter()
                    .map(|(name, value)| (name.clone(), value.as_slice()))
                    .collect();
                let canonical = CanonicalCall::read(
                    &method,
                    &sent_path,
                    path,
                    query.as_deref(),
                    &headers,
                    &content_types,
                    &body,
                )?;
                let candidates: Vec<&AllowRule> =
                    indices.iter().map(|index| &scope.allow[*index]).collect();
                let (rule, forwarded) = call::choose_rule(scope, &candidates, &canonical, &params)?;
                Ok((rule.index, canonical, forwarded))
            }
        };
        let (rule_index, canonical, forwarded) = if heavy {
            tokio::task::spawn_blocking(read_and_choose)
                .await
                .map_err(|error| {
                    ServiceError::Internal(format!("reading the call failed: {error}"))
                })??
        } else {
            read_and_choose()?
        };
        let rule = &scope.allow[rule_index];
        // From here on the call is what the upstream will receive.
        let forwarded_site = CallSite {
            path: canonical.path.canonical(),
            query: forwarded.query.clone(),
            ..site.clone()
        };

        // A rule that needs approval forwards only the identical call a person approved, once.
        // Asking counts as a call of the rule; using the approval does not count again.
        let gated = match &rule.approval {
            Some(approval) => {
                if let Some(checked) = &forwarded.graphql {
                    refuse_repeated_gated_fields(scope, rule, checked)?;
                }
                Some((
                    approval,
                    call::fingerprint(&upstream.name, rule, &canonical, &forwarded),
                ))
            }
            None => None,
        };
        // What executes counts: every top-level field of a GraphQL document, aliases included.
        let executed = forwarded
            .graphql
            .as_ref()
            .map_or(1, |checked| checked.executed_fields());
        let grant = self
            .admit_call(
                &holder,
                grant,
                &rule.counter(),
                executed,
                gated,
                request.approval,
                context,
            )
            .await?;

        // Record the decision: what the upstream receives, never the request as it came.
        let mut decision = call_event(AuditAction::GatewayCall, Outcome::Allowed, Some(&grant))
            .with("rule", rule.to_string());
        if let Some(checked) = &forwarded.graphql {
            let fields: Vec<String> = checked.fields.iter().map(ToString::to_string).collect();
            decision = decision
                .with_value("graphql", serde_json::Value::from(fields))
                .with_value(
                    "operations",
                    serde_json::Value::from(checked.operations.clone()),
                );
        }
        // Written before it is forwarded (no record, no call, even if valetd dies now); durable
        // before any answer is released, which the gateway waits for.
        let durable = self.record_written(&forwarded_site, decision).await?;

        let secret = self.root_credential(&upstream)?;
        Ok(CallDecision {
            site: forwarded_site,
            content_type: forwarded.content_type.clone(),
            headers: canonical.headers.clone(),
            grant,
            rule: rule.to_string(),
            upstream,
            body: Bytes::from(forwarded.body),
            secret,
            durable: Some(durable),
            in_flight: Some(in_flight),
        })
    }

    /// Counts a call against its rule, or — for a rule that needs approval — takes the approval
    /// named for this exact call (or asks for one: asking counts as the call, using it does not).
    /// `executed` is how many calls the request makes of the rule: 1, or for a GraphQL document
    /// each top-level field it executes.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn admit_call(
        &self,
        holder: &GrantHolder<'_>,
        grant: Grant,
        counter: &RuleCounter,
        executed: u64,
        gated: Option<(&valet_core::approval::ApprovalPolicy, CallFingerprint)>,
        named: Option<&str>,
        context: &mut AuditEvent,
    ) -> Result<Grant, ServiceError> {
        match gated {
            Some((approval, call)) => {
                context.set("approval_id", named.unwrap_or_default().trim());
                self.take_call_approval(holder, grant, counter, executed, approval, call, named)
                    .await
            }
            None => self.count_call(grant, counter, executed).await,
        }
    }

    /// The root credential an upstream's calls carry.
    pub(crate) fn root_credential(&self, upstream: &Upstream) -> Result<Secret, ServiceError> {
        self.credential(&upstream.credential).ok_or_else(|| {
            ServiceError::Internal(format!(
                "credential {:?} is not loaded",
                upstream.credential
            ))
        })
    }

    /// Opens an approval request for `call` (or points at the identical one already waiting), or
    /// uses the approval the caller names for it. Returns the grant as it stands after counting.
    #[allow(clippy::too_many_arguments)]
    async fn take_call_approval(
        &self,
        holder: &GrantHolder<'_>,
        grant: Grant,
        rule: &RuleCounter,
        executed: u64,
        approval: &valet_core::approval::ApprovalPolicy,
        call: CallFingerprint,
        named: Option<&str>,
    ) -> Result<Grant, ServiceError> {
        let Some(id) = named.map(str::trim) else {
            // One look-then-open at a time on this replica (across replicas the approval limits
            // bound the duplicates a race can open).
            let _opening = self.call_approvals.lock().await;
            let waiting: Vec<ApprovalRequest> = self
                .store
                .list_approvals(true)
                .await?
                .into_iter()
                .filter(|pending| pending.kind == ApprovalKind::Call)
                .collect();
            // The identical call already waits: the retry points at the same request.
            if let Some(same) = waiting.iter().find(|pending| {
                pending.grant_id == grant.id
                    && pending
                        .call
                        .as_ref()
                        .is_some_and(|asked| asked.same_call(&call))
            }) {
                return Err(CallRefusal::ApprovalRequired {
                    approval_id: same.id.clone(),
                    approve_command: same.approve_command(),
                    call: Box::new(call),
                }
                .into());
            }
            let limits = self.config().approval_limits;
            let for_grant = waiting
                .iter()
                .filter(|pending| pending.grant_id == grant.id)
                .count();
            let for_principal = waiting
                .iter()
                .filter(|pending| pending.requester == grant.principal)
                .count();
            if for_grant >= limits.per_grant as usize {
                return Err(CallRefusal::ApprovalRefused(format!(
                    "grant {} already has {for_grant} calls waiting for approval (approvals.max_pending_per_grant is {}); wait for a decision",
                    grant.id, limits.per_grant
                ))
                .into());
            }
            if for_principal >= limits.per_principal as usize {
                return Err(CallRefusal::ApprovalRefused(format!(
                    "principal {:?} already has {for_principal} calls waiting for approval (approvals.max_pending_per_principal is {}); wait for decisions",
                    grant.principal, limits.per_principal
                ))
                .into());
            }
            // A person approves only what they read whole.
            if let Some(reason) = call::unapprovable(&call) {
                return Err(CallRefusal::ApprovalRefused(format!(
                    "this call cannot be put to a person: {reason}"
                ))
                .into());
            }
            let grant = self.count_call(grant, rule, executed).await?;
            let pending = self
                .request_call_approval(holder, &grant, approval, call.clone())
                .await?;
            return Err(CallRefusal::ApprovalRequired {
                approve_command: pending.approve_command(),
                approval_id: pending.id,
                call: Box::new(call),
            }
            .into());
        };
        match self.consume_call_approval(holder, id, &grant, &call).await {
            Ok(_) => Ok(grant),
            Err(ServiceError::Approval(ApprovalError::NotUsable {
                status: ApprovalStatus::Pending,
                ..
            })) => {
                let approve_command = match valet_core::ApprovalId::parse(id) {
                    Ok(parsed) => self.fetch_approval(&parsed).await?.approve_command(),
                    Err(_) => format!("valet approve {id}"),
                };
                Err(CallRefusal::ApprovalRequired {
                    approval_id: id.to_string(),
                    approve_command,
                    call: Box::new(call),
                }
                .into())
            }
            Err(ServiceError::Approval(error)) => {
                Err(CallRefusal::ApprovalRefused(error.to_string()).into())
            }
            Err(ServiceError::ApprovalNotFound { id }) => {
                Err(CallRefusal::ApprovalRefused(format!("approval {id} does not exist")).into())
            }
            Err(ServiceError::Request(error)) => {
                Err(CallRefusal::ApprovalRefused(format!("Valet-Approval: {error}")).into())
            }
            Err(error) => Err(error),
        }
    }

    /// Records `executed` calls on the grant when a limit applies (compare-and-swap, so concurrent calls
    /// never both take the last use).
    async fn count_call(
        &self,
        grant: Grant,
        rule: &RuleCounter,
        executed: u64,
    ) -> Result<Grant, ServiceError> {
        self.count_calls(grant, &[(rule.clone(), executed)]).await
    }

    /// Records every one of `calls` on the grant as one compare-and-swap, when a limit applies:
    /// all of them fit, or none is counted.
    pub(crate) async fn count_calls(
        &self,
        grant: Grant,
        calls: &[(RuleCounter, u64)],
    ) -> Result<Grant, ServiceError> {
        if grant.max_uses.is_none() && calls.iter().all(|(rule, _)| rule.max_calls.is_none()) {
            return Ok(grant);
        }
        let swapped = compare_and_swap(self.store.as_ref(), grant, |grant: &Grant| {
            let next = grant
                .called_all(calls, self.clock.now())
                .map_err(CallRefusal::LimitReached)?;
            Ok(Decision::Write(next, ()))
        })
        .await?;
        Ok(match swapped {
            Swapped::Written { after, .. } => after,
            Swapped::Kept { current, .. } => current,
        })
    }
}

/// Whether a request header named `name` reaches `upstream`: on the gateway's allowlist or the
/// upstream's `forward_headers`, and none that changes what the upstream acts on.
fn forwards_header(upstream: &Upstream, name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    (valet_core::config::FORWARDED_HEADERS.contains(&name.as_str())
        || upstream.forward_headers.contains(name.as_str()))
        && valet_core::config::never_forwarded(&name).is_none()
}

/// Bodies from this size on are read on the blocking pool.
const HEAVY_BODY: usize = 16 * 1024;

pub(crate) fn body_is_heavy(body: &[u8]) -> bool {
    body.len() >= HEAVY_BODY
}

/// A body must arrive as the bytes the upstream will read: no Content-Encoding but `identity`,
/// given once.
pub(crate) fn refuse_content_encoding(encodings: &[&str]) -> Result<(), CallRefusal> {
    if let Some(encoding) = encodings
        .iter()
        .find(|encoding| !encoding.trim().eq_ignore_ascii_case("identity"))
    {
        return Err(CallRefusal::BadBody(format!(
            "the body is sent with Content-Encoding {encoding}; send it unencoded, so the gateway reads the bytes the upstream reads"
        )));
    }
    if encodings.len() > 1 {
        return Err(CallRefusal::BadHeader {
            header: "Content-Encoding".into(),
            reason: format!(
                "sent {} times; send it once (identity) or not at all",
                encodings.len()
            ),
        });
    }
    Ok(())
}

/// A person approves one call at a time: a document asking an approval-gated field more than
/// once (aliased copies beside an innocent-looking first call) is refused, naming the field.
fn refuse_repeated_gated_fields(
    scope: &valet_core::config::Scope,
    rule: &AllowRule,
    checked: &valet_core::graphql::CheckedGraphql,
) -> Result<(), CallRefusal> {
    for field in &checked.fields {
        let n_calls = checked
            .calls
            .iter()
            .filter(|call| call.operation == field.operation && call.field == field.field)
            .count();
        if n_calls > 1 {
            return Err(CallRefusal::Denied {
                scope: scope.name.clone(),
                rules: call::rules_summary(scope),
                asked: field.to_string(),
                reason: format!(
                    "{rule}: {field} appears {n_calls} times in one document; a person approves one call at a time, so send each as its own request"
                ),
            });
        }
    }
    Ok(())
}

/// The record a refused call leaves, completed by [`Valet::answer`].
pub(crate) fn call_context(grant: Option<&Grant>) -> AuditEvent {
    call_event(AuditAction::GatewayCall, Outcome::Denied, grant)
}

pub(crate) fn call_event(
    action: AuditAction,
    outcome: Outcome,
    grant: Option<&Grant>,
) -> AuditEvent {
    let event = AuditEvent::new(action, outcome);
    match grant {
        Some(grant) => event.with_grant(grant).with("principal", &grant.principal),
        None => event,
    }
}

/// The refusal kind of a forwarded call whose record could not be made durable (its answer is
/// withheld).
pub(crate) const AUDIT_SYNC_FAILED: &str = "audit_sync_failed";

/// The refusal's details for the record, beyond its reason.
pub(crate) fn describe_refusal(event: AuditEvent, error: &ServiceError) -> AuditEvent {
    let event = event.with("refusal", error.kind());
    let ServiceError::Call(refusal) = error else {
        return event;
    };
    match refusal {
        CallRefusal::Denied { asked, rules, .. } => event.with("asked", asked).with("rules", rules),
        CallRefusal::ApprovalRequired { approval_id, .. } => event.with("approval_id", approval_id),
        _ => event,
    }
}

fn bearer_token(value: &str) -> Option<&str> {
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|token| !token.is_empty())
}
