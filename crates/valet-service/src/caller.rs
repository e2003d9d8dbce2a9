//! Who is calling: the authenticated principal, how it proved who it is (a key or a client
//! certificate), and the request id that ties its log lines and audit records together.
//! Authentication itself is a service operation, so a failed one is refused and recorded like
//! any other refusal.

use valet_core::audit::{AuditAction, AuditEvent, Outcome};
use valet_core::config::{Config, Principal};
use valet_core::identity::{
    AuthenticatedBy, PresentedCertificate, jwt, principal_for_certificate, principal_for_identity,
    principal_for_key,
};

use crate::identity_keys::VerifiedIdentity;

use crate::{ServiceError, Valet};

/// An authenticated caller of an operation.
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: Principal,
    /// How it proved who it is.
    pub authentication: AuthenticatedBy,
    pub request_id: String,
}

/// What a caller presented to prove who it is.
#[derive(Debug, Clone, Copy, Default)]
pub struct Presented<'a> {
    /// The `authorization` header, when one was sent.
    pub bearer: Option<&'a [u8]>,
    /// The client certificate the TLS layer verified against the client CA.
    pub certificate: Option<&'a PresentedCertificate>,
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
    /// Authenticates a caller from what it presented for `operation`. A refusal is recorded,
    /// then returned.
    pub async fn authenticate(
        &self,
        presented: Presented<'_>,
        operation: &str,
        request_id: &str,
    ) -> Result<Caller, ServiceError> {
        let config = self.config();
        // An identity token is verified first (its issuer's keys may need fetching).
        let token = presented
            .bearer
            .and_then(|bearer| bearer_text(bearer).ok())
            .filter(|credential| jwt::looks_like_jwt(credential));
        let verified = match token {
            None => None,
            Some(token) => Some(
                self.identity_keys
                    .verify(&config, self.outbound.as_ref(), token, self.clock.now())
                    .await
                    .map(|identity| (identity, token)),
            ),
        };
        match identify(&config, presented, verified) {
            Ok((principal, authentication)) => Ok(Caller {
                principal,
                authentication,
                request_id: request_id.to_string(),
            }),
            Err(reason) => {
                let mut event = AuditEvent::new(AuditAction::Authenticate, Outcome::Denied)
                    .with("reason", &reason)
                    .with("method", operation)
                    .with("request_id", request_id);
                if let Some(certificate) = presented.certificate {
                    event = event
                        .with("certificate", certificate.display_name())
                        .with("certificate_fingerprint", &certificate.fingerprint);
                }
                self.audit.record(event).await?;
                Err(ServiceError::Unauthenticated { reason })
            }
        }
    }
}

/// Who presented this: the principal of the bearer key, else of the client certificate. When
/// both name a principal they must name the same one.
fn identify(
    config: &Config,
    presented: Presented<'_>,
    verified: Option<Result<(VerifiedIdentity, &str), String>>,
) -> Result<(Principal, AuthenticatedBy), String> {
    let by_certificate = presented.certificate.map(|certificate| {
        principal_for_certificate(config, certificate)
            .map(|principal| (principal, AuthenticatedBy::client_certificate(certificate)))
    });
    let Some(bearer) = presented.bearer else {
        return match by_certificate {
            Some(found) => found,
            None => Err("no credential: send `authorization: Bearer <principal key or identity token>` (the valet CLI and client read VALET_KEY or VALET_IDENTITY_TOKEN_FILE) or connect with a client certificate a principal is configured for".to_string()),
        };
    };
    let (principal, authentication) = match verified {
        Some(verified) => {
            let (identity, token) = verified?;
            let principal = principal_for_identity(config, &identity.issuer, &identity.claims)?;
            (
                principal,
                AuthenticatedBy::identity_token(&identity.issuer, &identity.subject, token),
            )
        }
        None => {
            let key = bearer_text(bearer)?;
            let principal = principal_for_key(config, key).ok_or(
                "the principal key is not known to valetd (revoked, mistyped, or for another deployment)",
            )?;
            (principal, AuthenticatedBy::principal_key())
        }
    };
    if let Some(Ok((other, _))) = &by_certificate
        && other.name != principal.name
    {
        return Err(format!(
            "the client certificate names principal {:?} but the key names {:?}; present one principal's credentials",
            other.name, principal.name
        ));
    }
    Ok((principal, authentication))
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
