//! Who is calling: the authenticated principal, how it proved who it is, and the request id that
//! ties its log lines and audit records together. Authentication itself is a service operation,
//! so a failed one is refused and recorded like any other refusal.

use valet_core::audit::{AuditAction, AuditEvent, Outcome};
use valet_core::config::{Config, Principal};
use valet_core::secret::constant_time_eq;

use crate::{ServiceError, Valet};

/// An authenticated caller of an operation.
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: Principal,
    pub authentication: Authentication,
    pub request_id: String,
}

/// How a caller proved who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authentication {
    /// A static principal key, matched by its SHA-256.
    PrincipalKey,
}

impl Authentication {
    pub fn method(&self) -> &'static str {
        match self {
            Authentication::PrincipalKey => "principal_key",
        }
    }
}

/// Who an audit record is attributed to: an authenticated caller, or a gateway call site.
pub trait Attribution: Sync {
    /// `event` with who asked and under which request id.
    fn attribute(&self, event: AuditEvent) -> AuditEvent;
    fn request_id(&self) -> &str;
}

impl Attribution for Caller {
    fn attribute(&self, event: AuditEvent) -> AuditEvent {
        event
            .with("principal", &self.principal.name)
            .with("request_id", &self.request_id)
    }

    fn request_id(&self) -> &str {
        &self.request_id
    }
}

impl Valet {
    /// Authenticates a caller from the `authorization` header it sent (`None`: none at all) for
    /// `operation`. A refusal is recorded, then returned.
    pub async fn authenticate(
        &self,
        bearer: Option<&[u8]>,
        operation: &str,
        request_id: &str,
    ) -> Result<Caller, ServiceError> {
        match principal_for(&self.config(), bearer) {
            Ok(principal) => Ok(Caller {
                principal,
                authentication: Authentication::PrincipalKey,
                request_id: request_id.to_string(),
            }),
            Err(reason) => {
                let error = ServiceError::Unauthenticated {
                    reason: reason.to_string(),
                };
                let event = AuditEvent::new(AuditAction::Authenticate, Outcome::Denied)
                    .with("reason", reason)
                    .with("method", operation)
                    .with("request_id", request_id);
                self.audit.record(event).await?;
                Err(error)
            }
        }
    }
}

/// Finds the principal whose key hash matches the bearer key, comparing in constant time.
fn principal_for(config: &Config, bearer: Option<&[u8]>) -> Result<Principal, &'static str> {
    let value = bearer.ok_or("no principal key: send `authorization: Bearer <principal key>` (the valet CLI and client read VALET_KEY)")?;
    let value = std::str::from_utf8(value).map_err(|_| "the authorization header is not text")?;
    let key = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or("the authorization header must be `Bearer <principal key>`")?
        .trim();
    if key.is_empty() {
        return Err("the principal key is empty");
    }
    let digest = valet_core::Secret::from(key.to_string()).sha256();
    let mut found = None;
    // Compare against every principal, so the time taken does not reveal which one matched.
    for principal in config.principals.values() {
        if constant_time_eq(&principal.key_sha256, &digest) {
            found = Some(principal);
        }
    }
    found.cloned().ok_or(
        "the principal key is not known to valetd (revoked, mistyped, or for another deployment)",
    )
}
