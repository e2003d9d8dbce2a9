//! Who is calling: the authenticated principal, how it proved who it is (a key or a client
//! certificate), and the request id that ties its log lines and audit records together.
//! Authentication itself is a service operation, so a failed one is refused and recorded like
//! any other refusal.

use valet_core::audit::{AuditAction, AuditEvent, Outcome};
use valet_core::config::{Config, Principal};
use valet_core::identity::{
    AuthenticatedBy, Credential, PresentedCertificate, certificate_still_valid, claims_read_by,
    jwt, key_fingerprint, principal_for_certificate, principal_for_identity, principal_for_key,
};

use crate::identity_keys::VerifiedIdentity;

use crate::{ServiceError, Valet};

/// An authenticated caller of an operation.
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: Principal,
    /// How it proved who it is.
    pub authentication: AuthenticatedBy,
    /// The credential it proved it with, as far as it can be checked again (console sessions
    /// are bound to it).
    pub credential: Credential,
    pub request_id: String,
}

/// What a caller presented to prove who it is.
#[derive(Debug, Clone, Copy, Default)]
pub struct Presented<'a> {
    /// The `authorization` header, when one was sent.
    pub bearer: Option<&'a [u8]>,
    /// The client certificate the TLS layer verified against the client CA.
    pub certificate: Option<&'a PresentedCertificate>,
    /// The address the request came from, for per-source limits and the audit log.
    pub source: Option<std::net::IpAddr>,
}

/// Who an audit record is attributed to: an authenticated caller, or a gateway call site.
pub trait Attribution: Sync {
    /// `event` with who asked and under which request id.
    fn attribute(&self, event: AuditEvent) -> AuditEvent;
    fn request_id(&self) -> &str;
}

impl Attribution for Caller {
    fn attribute(&self, event: AuditEvent) -> AuditEvent {
        self.authentication.describe(
            event
                .with("principal", &self.principal.name)
                .with("request_id", &self.request_id),
        )
    }

    fn request_id(&self) -> &str {
        &self.request_id
    }
}

impl Valet {
    /// Authenticates a caller from what it presented for `operation`. A refusal is recorded
    /// (the first of its kind from its source in a window at once, the rest in the window's
    /// summary), then returned. A source that spent its failed-authentication budget has its
    /// failures, and a principal over its rate its requests, refused with how long to wait.
    pub async fn authenticate(
        &self,
        presented: Presented<'_>,
        operation: &str,
        request_id: &str,
    ) -> Result<Caller, ServiceError> {
        let config = self.config();
        let now_ms = self.clock.now_millis();
        let (limit, total) = (
            config.server.failed_authentication_limit,
            config.server.failed_authentication_limit_total,
        );
        // A source over its failed-authentication budget still gets in with a valid key or
        // certificate (cheap to check; its neighbours behind one address are not locked out),
        // but its identity tokens are not verified and its failures are refused as throttled.
        let throttled = presented.source.and_then(|source| {
            self.limits
                .source_admitted(source, limit, total, now_ms)
                .err()
        });
        // An identity token is verified first (its issuer's keys may need fetching).
        let token = presented
            .bearer
            .and_then(|bearer| bearer_text(bearer).ok())
            .filter(|credential| jwt::looks_like_jwt(credential));
        // Over budget, a token verified before is taken from memory, and a few new ones per
        // source are still verified: a valid token is not locked out by a neighbour's failures.
        let verified = match token {
            None => None,
            Some(token)
                if throttled.is_some()
                    && self.identity_keys.remembered(token, self.clock.now()).is_none()
                    && !presented
                        .source
                        .is_some_and(|source| self.limits.grace_verification(source, now_ms)) =>
            {
                Some(Err(
                    "identity tokens from this source are not verified while it is over its failed-authentication budget (beyond a few a minute)".to_string(),
                ))
            }
            Some(token) => Some(
                self.identity_keys
                    .verify(&config, self.outbound.as_ref(), token, self.clock.now())
                    .await
                    ,
            ),
        };
        let trusted = self.client_authorities.load();
        let (principal, authentication, credential) =
            match identify(&config, presented, verified, &trusted, self.clock.now()) {
                Ok(found) => found,
                Err(refusal) => {
                    if let (Some(source), Some(retry_after)) = (presented.source, throttled) {
                        let reason = throttled_reason(source, limit, retry_after);
                        let refusal = Refusal::new("source_rate_limited", reason.clone());
                        self.refuse_authentication(presented, operation, request_id, refusal)
                            .await?;
                        return Err(ServiceError::throttled(reason, retry_after));
                    }
                    if let Some(source) = presented.source {
                        self.limits.failed(source, limit, total, now_ms);
                    }
                    let reason = refusal.reason.clone();
                    self.refuse_authentication(presented, operation, request_id, refusal)
                        .await?;
                    return Err(ServiceError::Unauthenticated { reason });
                }
            };
        self.admit_principal(&principal, operation, request_id, now_ms)
            .await?;
        Ok(Caller {
            principal,
            authentication,
            credential,
            request_id: request_id.to_string(),
        })
    }

    /// Whether `caller`'s authority still stands, for what outlives the request that
    /// authenticated it (a watch or tail stream): its principal is still configured with the
    /// same roles, and valetd would still accept the credential it proved itself with (a rotated
    /// key, an expired certificate or one whose CA was removed, an identity token past its time
    /// or binding end it). The first refusal is recorded.
    pub async fn caller_in_force(&self, caller: &Caller) -> Result<(), ServiceError> {
        let config = self.config();
        let outcome = match config.principals.get(&caller.principal.name) {
            None => Err(format!(
                "principal {:?} is no longer in the config",
                caller.principal.name
            )),
            Some(principal) if principal.roles != caller.principal.roles => Err(format!(
                "the roles of principal {:?} changed since this stream began",
                caller.principal.name
            )),
            Some(_) => {
                self.credential_still_accepted(&caller.principal.name, &caller.credential)
                    .await
            }
        };
        let Err(reason) = outcome else {
            return Ok(());
        };
        let error = ServiceError::Unauthenticated {
            reason: format!(
                "the credential this stream was opened with is no longer accepted: {reason}; reconnect with a current one"
            ),
        };
        self.answer(
            caller,
            crate::context(AuditAction::Authenticate).with("reason_kind", "credential_withdrawn"),
            Err::<(), _>(error),
        )
        .await
    }

    /// Whether valetd would still accept `credential` for `principal` (see
    /// [`Credential::still_accepted`]); for an identity token, also that its issuer still
    /// publishes the key that signed it.
    pub(crate) async fn credential_still_accepted(
        &self,
        principal: &str,
        credential: &Credential,
    ) -> Result<(), String> {
        let config = self.config();
        credential.still_accepted(
            &config,
            principal,
            &self.client_authorities.load(),
            self.clock.now(),
        )?;
        if let Credential::IdentityToken {
            issuer,
            signing_key,
            ..
        } = credential
        {
            self.identity_keys
                .key_published(&config, self.outbound.as_ref(), issuer, signing_key)
                .await?;
        }
        Ok(())
    }

    /// Takes one request from the principal's rate (`principal.rate`); over it, the refusal is
    /// recorded (once per window, the rest in its summary) and returned.
    pub(crate) async fn admit_principal(
        &self,
        principal: &valet_core::config::Principal,
        operation: &str,
        request_id: &str,
        now_ms: u64,
    ) -> Result<(), ServiceError> {
        let Some(rate) = principal.rate else {
            return Ok(());
        };
        let Err(retry_after) = self
            .limits
            .principal_admitted(&principal.name, rate, now_ms)
        else {
            return Ok(());
        };
        let reason = format!(
            "principal {:?} is over its rate of {rate} (principal.rate); retry in {} s",
            principal.name,
            retry_after.as_secs().max(1)
        );
        let subject = format!("principal {}", principal.name);
        if self.limits.note_refusal(
            subject,
            AuditAction::Authenticate,
            "principal_rate_limited",
            &reason,
            operation,
            now_ms,
        ) {
            let event = AuditEvent::new(AuditAction::Authenticate, Outcome::Denied)
                .with("reason", &reason)
                .with("reason_kind", "principal_rate_limited")
                .with("principal", &principal.name)
                .with("method", operation)
                .with("request_id", request_id);
            self.audit.record(event).await?;
        }
        Err(ServiceError::throttled(reason, retry_after))
    }

    /// Counts a failed authentication from `source` against its budget; refused as throttled
    /// (with how long to wait) when the source is already over it.
    pub(crate) fn count_failed_authentication(
        &self,
        source: Option<std::net::IpAddr>,
        failure: ServiceError,
    ) -> ServiceError {
        let Some(source) = source else {
            return failure;
        };
        let (limit, total) = {
            let config = self.config();
            (
                config.server.failed_authentication_limit,
                config.server.failed_authentication_limit_total,
            )
        };
        let now_ms = self.clock.now_millis();
        if let Err(retry_after) = self.limits.source_admitted(source, limit, total, now_ms) {
            return ServiceError::throttled(
                throttled_reason(source, limit, retry_after),
                retry_after,
            );
        }
        self.limits.failed(source, limit, total, now_ms);
        failure
    }

    /// Records an authentication refusal: at once when it opens its window (per source and
    /// kind), else counted into the window's summary.
    async fn refuse_authentication(
        &self,
        presented: Presented<'_>,
        operation: &str,
        request_id: &str,
        refusal: Refusal,
    ) -> Result<(), ServiceError> {
        let source = presented
            .source
            .map(|source| source.to_string())
            .unwrap_or_else(|| "(unknown)".to_string());
        if !self.limits.note_refusal(
            source.clone(),
            AuditAction::Authenticate,
            refusal.kind,
            &refusal.reason,
            operation,
            self.clock.now_millis(),
        ) {
            return Ok(());
        }
        let mut event = AuditEvent::new(AuditAction::Authenticate, Outcome::Denied)
            .with("reason", &refusal.reason)
            .with("reason_kind", refusal.kind)
            .with("source", source)
            .with("method", operation)
            .with("request_id", request_id);
        if let Some(certificate) = presented.certificate {
            event = event
                .with("certificate", certificate.display_name())
                .with("certificate_fingerprint", &certificate.fingerprint);
        }
        self.audit.record(event).await?;
        Ok(())
    }

    /// Records the summaries of the refusal windows that closed (all of them when `all`, at
    /// shutdown): how many more refusals of each kind each source met after the recorded one.
    pub async fn record_refusal_summaries(&self, all: bool) -> Result<usize, ServiceError> {
        let summaries = self.limits.close_windows(self.clock.now_millis(), all);
        let n_summaries = summaries.len();
        for summary in summaries {
            let event = AuditEvent::new(summary.action, Outcome::Denied).with("aggregated", "true");
            let event = match summary.subject.strip_prefix(crate::gateway::GRANT_SUBJECT) {
                Some(grant) => event.with(
                    "grant_id",
                    grant.split_once('#').map_or(grant, |(id, _)| id),
                ),
                None => event.with("source", &summary.subject),
            };
            let event = event
                .with("reason_kind", summary.kind)
                .with("reason", &summary.reason)
                .with("n_more", summary.n_more.to_string())
                .with("methods", summary.methods.join(","))
                .with("window_seconds", summary.window_seconds.to_string());
            self.audit.record(event).await?;
        }
        Ok(n_summaries)
    }
}

/// Why a caller was not authenticated: a kind to aggregate by, and the reason in words.
#[derive(Debug)]
struct Refusal {
    kind: &'static str,
    reason: String,
}

impl Refusal {
    fn new(kind: &'static str, reason: impl Into<String>) -> Refusal {
        Refusal {
            kind,
            reason: reason.into(),
        }
    }
}

/// Who presented this: the principal of the bearer key or identity token, else of the client
/// certificate. When both name a principal they must name the same one.
fn identify(
    config: &Config,
    presented: Presented<'_>,
    verified: Option<Result<std::sync::Arc<VerifiedIdentity>, String>>,
    trusted_authorities: &[String],
    now: valet_core::UnixTime,
) -> Result<(Principal, AuthenticatedBy, Credential), Refusal> {
    // A certificate the connection was opened with is re-checked at every request: a new
    // handshake with it would fail once it expired or its CA was removed, and so does this.
    if let Some(certificate) = presented.certificate {
        certificate_still_valid(certificate, trusted_authorities, now)
            .map_err(|reason| Refusal::new("client_certificate", reason))?;
    }
    let by_certificate = presented.certificate.map(|certificate| {
        principal_for_certificate(config, certificate).map(|principal| {
            let credential = Credential::ClientCertificate {
                certificate: certificate.narrowed_to(&principal),
            };
            (
                principal,
                AuthenticatedBy::client_certificate(certificate),
                credential,
            )
        })
    });
    let Some(bearer) = presented.bearer else {
        return match by_certificate {
            Some(found) => found.map_err(|reason| Refusal::new("client_certificate", reason)),
            None => Err(Refusal::new(
                "no_credential",
                "no credential: send `authorization: Bearer <principal key or identity token>` (the valet CLI and client read VALET_KEY or VALET_IDENTITY_TOKEN_FILE) or connect with a client certificate a principal is configured for",
            )),
        };
    };
    let (principal, authentication, credential) = match verified {
        Some(verified) => {
            let identity = verified.map_err(|reason| Refusal::new("identity_token", reason))?;
            let principal = principal_for_identity(config, &identity.issuer, &identity.claims)
                .map_err(|reason| Refusal::new("identity_token", reason))?;
            let credential = Credential::IdentityToken {
                issuer: identity.issuer.clone(),
                subject: identity.subject.clone(),
                fingerprint: identity.fingerprint.clone(),
                claims: claims_read_by(&principal, &identity.issuer, &identity.claims),
                acceptable_until: identity.acceptable_until,
                signing_key: identity.signing_key.clone(),
            };
            (
                principal,
                AuthenticatedBy::identity_token(
                    &identity.issuer,
                    &identity.subject,
                    &identity.fingerprint,
                ),
                credential,
            )
        }
        None => {
            let key =
                bearer_text(bearer).map_err(|reason| Refusal::new("malformed_header", reason))?;
            let principal = principal_for_key(config, key).ok_or(Refusal::new(
                "unknown_key",
                "the principal key is not known to valetd (revoked, mistyped, or for another deployment)",
            ))?;
            let credential = Credential::PrincipalKey {
                fingerprint: principal
                    .key_sha256
                    .as_ref()
                    .map(key_fingerprint)
                    .unwrap_or_default(),
            };
            (principal, AuthenticatedBy::principal_key(), credential)
        }
    };
    if let Some(Ok((other, _, _))) = &by_certificate
        && other.name != principal.name
    {
        return Err(Refusal::new(
            "credential_mismatch",
            format!(
                "the client certificate names principal {:?} but the bearer credential names {:?}; present one principal's credentials",
                other.name, principal.name
            ),
        ));
    }
    Ok((principal, authentication, credential))
}

/// The credential in `authorization: Bearer <credential>`.
fn bearer_text(value: &[u8]) -> Result<&str, String> {
    let value = std::str::from_utf8(value).map_err(|_| "the authorization header is not text")?;
    let key = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or("the authorization header must be `Bearer <principal key or identity token>`")?
        .trim();
    if key.is_empty() {
        return Err("the principal key is empty".to_string());
    }
    Ok(key)
}

/// Why a source over its failed-authentication budget is refused, and for how long.
fn throttled_reason(
    source: std::net::IpAddr,
    limit: valet_core::rate::Rate,
    retry_after: std::time::Duration,
) -> String {
    format!(
        "too many failed authentications from {} (at most {limit}, server.failed_authentication_limit; or from all sources, server.failed_authentication_limit_total); retry in {} s",
        valet_core::rate::Source::of(source),
        retry_after.as_secs().max(1)
    )
}
