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
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
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

/// The credential a caller authenticated with, as much of it as is needed to tell later whether
/// valetd would still accept it: what a console session is bound to, so that rotating a key,
/// removing a certificate's CA or an identity binding, or letting a credential expire ends the
/// sessions it opened. Holds no secret: a principal key is named by a fingerprint of its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum Credential {
    PrincipalKey {
        /// [`key_fingerprint`] of the key's hash.
        fingerprint: String,
    },
    ClientCertificate {
        /// Its names, validity and CAs, as presented.
        certificate: PresentedCertificate,
    },
    IdentityToken {
        /// The `[[issuer]]` name.
        issuer: String,
        subject: String,
        /// SHA-256 of the token, hex.
        fingerprint: String,
        /// The claims the principal's `[[principal.identity]]` entries read (`sub` and the
        /// claim paths they name), as the token had them.
        claims: serde_json::Map<String, serde_json::Value>,
        /// The last moment the token itself is accepted (`exp`, `iat` + the maximum age).
        acceptable_until: UnixTime,
        /// [`jwt::PublicKey::thumbprint`] of the issuer's key that verified it: once the issuer
        /// no longer publishes that key, the token authenticates nothing more.
        #[serde(default)]
        signing_key: String,
    },
}

/// How a principal key is named where its hash is not shown: the first 8 bytes of a SHA-256 over
/// its hash, hex.
pub fn key_fingerprint(key_sha256: &[u8; 32]) -> String {
    let mut message = b"valet principal key fingerprint\0".to_vec();
    message.extend_from_slice(key_sha256);
    hex::encode(&ring::digest::digest(&ring::digest::SHA256, &message).as_ref()[..8])
}

/// The claims of `claims` that any of `principal`'s identity entries for `issuer` reads: `sub` and
/// each named claim path, nested as in the token.
pub fn claims_read_by(
    principal: &Principal,
    issuer: &str,
    claims: &serde_json::Map<String, serde_json::Value>,
) -> serde_json::Map<String, serde_json::Value> {
    let mut kept = serde_json::Map::new();
    let mut paths: Vec<&str> = vec!["sub"];
    for matcher in principal
        .identities
        .iter()
        .filter(|matcher| matcher.issuer == issuer)
    {
        paths.extend(matcher.claims.keys().map(String::as_str));
    }
    for path in paths {
        let segments: Vec<&str> = path.split('/').collect();
        let mut source = claims;
        let mut found = true;
        for segment in &segments[..segments.len() - 1] {
            match source.get(*segment).and_then(serde_json::Value::as_object) {
                Some(inner) => source = inner,
                None => {
                    found = false;
                    break;
                }
            }
        }
        let Some(value) = source.get(segments[segments.len() - 1]).filter(|_| found) else {
            continue;
        };
        insert_at(&mut kept, &segments, value.clone());
    }
    kept
}

/// Puts `value` at the path `segments` of `target`, making the objects on the way.
fn insert_at(
    target: &mut serde_json::Map<String, serde_json::Value>,
    segments: &[&str],
    value: serde_json::Value,
) {
    match segments {
        [] => {}
        [last] => {
            target.insert(last.to_string(), value);
        }
        [first, rest @ ..] => {
            let entry = target
                .entry(first.to_string())
                .or_insert_with(|| serde_json::Value::Object(serde_json::Map::new()));
            if let Some(inner) = entry.as_object_mut() {
                insert_at(inner, rest, value);
            }
        }
    }
}

impl Credential {
    /// The last moment the credential itself is valid, when it has one (a certificate's, an
    /// identity token's); a key has none.
    pub fn valid_until(&self) -> Option<UnixTime> {
        match self {
            Credential::PrincipalKey { .. } => None,
            Credential::ClientCertificate { certificate } => Some(certificate.not_after),
            Credential::IdentityToken {
                acceptable_until, ..
            } => Some(*acceptable_until),
        }
    }

    /// The credential in a few words, for listings and audit records.
    pub fn describe(&self) -> String {
        match self {
            Credential::PrincipalKey { fingerprint } => format!("principal key {fingerprint}"),
            Credential::ClientCertificate { certificate } => format!(
                "client certificate {} (sha256 {})",
                certificate.display_name(),
                &certificate.fingerprint[..certificate.fingerprint.len().min(16)]
            ),
            Credential::IdentityToken {
                issuer, subject, ..
            } => format!("identity token from {issuer} (sub {subject})"),
        }
    }

    /// Whether valetd would still authenticate `principal` with this credential at `now`, under
    /// `config` and the client CAs trusted now; the reason when not.
    pub fn still_accepted(
        &self,
        config: &Config,
        principal: &str,
        trusted_authorities: &[String],
        now: UnixTime,
    ) -> Result<(), String> {
        let Some(configured) = config.principals.get(principal) else {
            return Err(format!(
                "principal {principal:?} is no longer in the config"
            ));
        };
        match self {
            Credential::PrincipalKey { fingerprint } => match &configured.key_sha256 {
                Some(hash) if key_fingerprint(hash) == *fingerprint => Ok(()),
                Some(_) => Err(format!(
                    "principal {principal:?}'s key was replaced (the session was opened with key {fingerprint})"
                )),
                None => Err(format!("principal {principal:?} no longer has a key")),
            },
            Credential::ClientCertificate { certificate } => {
                certificate_still_valid(certificate, trusted_authorities, now)?;
                match principal_for_certificate(config, certificate) {
                    Ok(found) if found.name == principal => Ok(()),
                    Ok(found) => Err(format!(
                        "the client certificate ({}) now names principal {:?}",
                        certificate.display_name(),
                        found.name
                    )),
                    Err(reason) => Err(reason),
                }
            }
            Credential::IdentityToken {
                issuer,
                subject,
                claims,
                acceptable_until,
                ..
            } => {
                if now > *acceptable_until {
                    return Err(format!(
                        "the identity token from {issuer} (sub {subject}) stopped being accepted at {}",
                        crate::clock::format_time(*acceptable_until)
                    ));
                }
                if !config.issuers.contains_key(issuer) {
                    return Err(format!("issuer {issuer} is no longer in the config"));
                }
                match principal_for_identity(config, issuer, claims) {
                    Ok(found) if found.name == principal => Ok(()),
                    Ok(found) => Err(format!(
                        "the identity token from {issuer} (sub {subject}) now names principal {:?}",
                        found.name
                    )),
                    Err(reason) => Err(reason),
                }
            }
        }
    }
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

    /// The certificate with only the names `principal`'s `[[principal.certificate]]` entries
    /// match: what a session bound to it keeps (a certificate may carry many names).
    pub fn narrowed_to(&self, principal: &Principal) -> PresentedCertificate {
        let matched = |candidate: PresentedCertificate| {
            principal
                .certificates
                .iter()
                .any(|matcher| matcher.matches(&candidate))
        };
        let alone = |uris: Vec<String>, dns_names: Vec<String>, common_names: Vec<String>| {
            PresentedCertificate {
                uris,
                dns_names,
                common_names,
                ..PresentedCertificate::default()
            }
        };
        PresentedCertificate {
            uris: self
                .uris
                .iter()
                .filter(|uri| matched(alone(vec![uri.to_string()], vec![], vec![])))
                .cloned()
                .collect(),
            dns_names: self
                .dns_names
                .iter()
                .filter(|dns| matched(alone(vec![], vec![dns.to_string()], vec![])))
                .cloned()
                .collect(),
            common_names: self
                .common_names
                .iter()
                .filter(|common| matched(alone(vec![], vec![], vec![common.to_string()])))
                .cloned()
                .collect(),
            ..self.clone()
        }
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
