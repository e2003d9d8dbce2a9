//! Who a caller is, from what it presented: a static principal key, a client certificate
//! verified by the TLS layer, or a workload identity token verified against its issuer's keys.
//! The rules that turn a credential into a principal live here; the listeners and the service
//! only hand over what they saw and fetched.

pub mod jwt;

use serde::{Deserialize, Serialize};

use crate::UnixTime;
use crate::config::{Config, Principal};
use crate::secret::constant_time_eq;

/// How a principal proved who it is, as the grant and the audit log record it. Never holds the
/// credential itself: a fingerprint at most.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthenticatedBy {
    /// `principal_key` or `client_certificate`.
    pub method: String,
    /// Who vouched for the identity: the client CA for a certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// The identity presented: a SPIFFE ID, DNS name or common name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// SHA-256 of the presented certificate, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

impl AuthenticatedBy {
    pub const PRINCIPAL_KEY: &str = "principal_key";
    pub const CLIENT_CERTIFICATE: &str = "client_certificate";
    pub const IDENTITY_TOKEN: &str = "identity_token";

    pub fn principal_key() -> AuthenticatedBy {
        AuthenticatedBy {
            method: Self::PRINCIPAL_KEY.to_string(),
            issuer: None,
            subject: None,
            fingerprint: None,
        }
    }

    pub fn client_certificate(certificate: &PresentedCertificate) -> AuthenticatedBy {
        AuthenticatedBy {
            method: Self::CLIENT_CERTIFICATE.to_string(),
            issuer: Some("server.client_ca_file".to_string()),
            subject: Some(certificate.display_name()),
            fingerprint: Some(certificate.fingerprint.clone()),
        }
    }

    /// An identity token from `issuer` (the `[[issuer]]` name) for `subject`, named by its
    /// SHA-256 `fingerprint` (hex); the token itself is never kept.
    pub fn identity_token(issuer: &str, subject: &str, fingerprint: &str) -> AuthenticatedBy {
        AuthenticatedBy {
            method: Self::IDENTITY_TOKEN.to_string(),
            issuer: Some(issuer.to_string()),
            subject: Some(subject.to_string()),
            fingerprint: Some(fingerprint.to_string()),
        }
    }

    /// Adds the fields to an audit event.
    pub fn describe(&self, event: crate::audit::AuditEvent) -> crate::audit::AuditEvent {
        let mut event = event.with("auth_method", &self.method);
        for (field, value) in [
            ("auth_issuer", &self.issuer),
            ("auth_subject", &self.subject),
            ("auth_fingerprint", &self.fingerprint),
        ] {
            if let Some(value) = value {
                event = event.with(field, value);
            }
        }
        event
    }
}

/// The names in a client certificate that the TLS layer verified against the client CA, and
/// what its trust rests on, so that every request re-checks it (a connection, or a session
/// resumed from it, outlives the moment of the handshake).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PresentedCertificate {
    /// URI subject alternative names (SPIFFE IDs among them).
    pub uris: Vec<String>,
    pub dns_names: Vec<String>,
    pub common_names: Vec<String>,
    /// SHA-256 of the certificate's DER, hex: how the audit log names the certificate.
    pub fingerprint: String,
    /// The first and last moments (inclusive) at which the certificate, every certificate of
    /// the chain it came with and the client CA it was verified up to are all valid.
    pub not_before: UnixTime,
    pub not_after: UnixTime,
    /// SHA-256 of each configured client CA the chain was verified up to, hex.
    pub authorities: Vec<String>,
}

/// Whether a certificate the TLS layer verified at the handshake still authenticates at `now`:
/// within its (and its chain's) validity, and issued by a client CA the listeners still trust
/// (`trusted`: the fingerprints of the client CAs in force). Checked at every request.
pub fn certificate_still_valid(
    certificate: &PresentedCertificate,
    trusted: &[String],
    now: UnixTime,
) -> Result<(), String> {
    if now < certificate.not_before {
        return Err(format!(
            "the client certificate ({}) is not valid before {}",
            certificate.display_name(),
            crate::clock::format_time(certificate.not_before)
        ));
    }
    if now > certificate.not_after {
        return Err(format!(
            "the client certificate ({}) or its chain expired at {}: connect with a current certificate",
            certificate.display_name(),
            crate::clock::format_time(certificate.not_after)
        ));
    }
    if !certificate
        .authorities
        .iter()
        .any(|authority| trusted.contains(authority))
    {
        return Err(format!(
            "the client certificate ({}) was issued by a client CA that is no longer in server.client_ca_file: connect with a certificate from a configured CA",
            certificate.display_name()
        ));
    }
    Ok(())
}

impl PresentedCertificate {
    /// The SPIFFE ID it carries, if any: what the audit log names it by first.
    pub fn spiffe_id(&self) -> Option<&str> {
        self.uris
            .iter()
            .map(String::as_str)
            .find(|uri| crate::config::is_spiffe_id(uri))
    }

    /// The name to show for it: SPIFFE ID, else first DNS name, else common name.
    pub fn display_name(&self) -> String {
        self.spiffe_id()
            .map(str::to_string)
            .or_else(|| self.dns_names.first().map(|name| format!("dns:{name}")))
            .or_else(|| self.common_names.first().map(|name| format!("cn:{name}")))
            .unwrap_or_else(|| "(no name)".to_string())
    }
}

/// Finds the principal whose key hash matches `key`, comparing against every principal in
/// constant time so the time taken does not reveal which one matched.
pub fn principal_for_key(config: &Config, key: &str) -> Option<Principal> {
    let digest = crate::Secret::from(key.to_string()).sha256();
    let mut found = None;
    for principal in config.principals.values() {
        if let Some(key_sha256) = &principal.key_sha256
            && constant_time_eq(key_sha256, &digest)
        {
            found = Some(principal);
        }
    }
    found.cloned()
}

/// Finds the principal one of whose `[[principal.identity]]` entries matches a verified identity
/// token from issuer `issuer` (its `[[issuer]]` name); a token matching two principals is
/// refused as ambiguous.
pub fn principal_for_identity(
    config: &Config,
    issuer: &str,
    claims: &serde_json::Map<String, serde_json::Value>,
) -> Result<Principal, String> {
    let subject = claims
        .get("sub")
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default();
    let matching: Vec<&Principal> = config
        .principals
        .values()
        .filter(|principal| {
            principal
                .identities
                .iter()
                .any(|matcher| matcher.matches(issuer, claims))
        })
        .collect();
    match matching.as_slice() {
        [principal] => Ok((*principal).clone()),
        [] => Err(format!(
            "the identity token from issuer {issuer} (sub {subject:?}) is valid but matches no principal's [[principal.identity]]"
        )),
        several => Err(format!(
            "the identity token from issuer {issuer} (sub {subject:?}) matches more than one principal ({}); narrow their [[principal.identity]] claims",
            several
                .iter()
                .map(|principal| principal.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Finds the principal one of whose `[[principal.certificate]]` entries the certificate carries.
/// The config guarantees at most one principal per identity; a certificate carrying identities
/// of two principals is refused as ambiguous.
pub fn principal_for_certificate(
    config: &Config,
    certificate: &PresentedCertificate,
) -> Result<Principal, String> {
    let matching: Vec<&Principal> = config
        .principals
        .values()
        .filter(|principal| {
            principal
                .certificates
                .iter()
                .any(|matcher| matcher.matches(certificate))
        })
        .collect();
    match matching.as_slice() {
        [principal] => Ok((*principal).clone()),
        [] => Err(format!(
            "the client certificate ({}) is valid but names no principal: add a [[principal.certificate]] with its SPIFFE ID, DNS name or common name",
            certificate.display_name()
        )),
        several => Err(format!(
            "the client certificate ({}) names more than one principal ({}); give each principal its own certificate",
            certificate.display_name(),
            several
                .iter()
                .map(|principal| principal.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}
