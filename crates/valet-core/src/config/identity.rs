//! How callers prove who they are, as configured: the listeners' TLS (server certificate, client
//! CA, whether a client certificate is required) and the certificate identities that
//! authenticate a principal instead of, or besides, a static key.

use std::fmt;
use std::path::PathBuf;

use super::raw::{RawCertificateMatch, RawServer};
use super::{ProblemKind, Problems, invalid};

/// TLS on both listeners (gRPC and gateway). Which files are read is fixed at start; their
/// contents are re-read on reload and when they change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// The CA bundle client certificates are verified against; no client certificates are
    /// asked for when `None`.
    pub client_ca_file: Option<PathBuf>,
    pub client_auth: ClientAuth,
}

/// Whether a TLS client must present a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// A certificate is verified when presented; callers without one authenticate otherwise
    /// (a key or an identity token).
    Optional,
    /// The handshake fails without a certificate from the client CA.
    Required,
}

impl ClientAuth {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientAuth::Optional => "optional",
            ClientAuth::Required => "required",
        }
    }
}

/// Reads `tls_cert_file`, `tls_key_file`, `client_ca_file` and `client_auth` from `[server]`.
pub(super) fn build_server_tls(
    raw: &RawServer,
    resolve: &dyn Fn(String) -> PathBuf,
    problems: &mut Problems,
) -> Option<ServerTls> {
    let client_auth = match raw.client_auth.as_deref() {
        None => None,
        Some("optional") => Some(ClientAuth::Optional),
        Some("required") => Some(ClientAuth::Required),
        Some(other) => {
            problems.push(
                "server.client_auth",
                invalid(other, "client_auth", "\"optional\" or \"required\""),
            );
            None
        }
    };
    match (&raw.tls_cert_file, &raw.tls_key_file) {
        (Some(cert_file), Some(key_file)) => {
            if raw.client_auth.is_some() && raw.client_ca_file.is_none() {
                problems.push(
                    "server.client_auth",
                    invalid(
                        raw.client_auth.as_deref().unwrap_or_default(),
                        "client_auth without client_ca_file",
                        "server.client_ca_file set to the CA bundle client certificates are verified against",
                    ),
                );
            }
            Some(ServerTls {
                cert_file: resolve(cert_file.clone()),
                key_file: resolve(key_file.clone()),
                client_ca_file: raw.client_ca_file.clone().map(resolve),
                client_auth: client_auth.unwrap_or(ClientAuth::Optional),
            })
        }
        (None, None) => {
            for (key, set) in [
                ("server.client_ca_file", raw.client_ca_file.is_some()),
                ("server.client_auth", raw.client_auth.is_some()),
            ] {
                if set {
                    problems.push(
                        key,
                        invalid(
                            key.trim_start_matches("server."),
                            "key without TLS",
                            "server.tls_cert_file and server.tls_key_file set as well: client certificates need TLS",
                        ),
                    );
                }
            }
            None
        }
        (Some(_), None) => {
            problems.push("server.tls_key_file", ProblemKind::Missing);
            None
        }
        (None, Some(_)) => {
            problems.push("server.tls_cert_file", ProblemKind::Missing);
            None
        }
    }
}

/// One client-certificate identity a principal is known by. A certificate matches when it
/// chains to the configured client CA and carries this name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertificateMatch {
    /// A SPIFFE ID in a URI subject alternative name, such as
    /// `spiffe://example.org/ns/ci/sa/builder`.
    SpiffeId(String),
    /// A DNS subject alternative name.
    DnsName(String),
    /// The subject's common name (for CAs that issue no SANs).
    CommonName(String),
}

impl CertificateMatch {
    /// Whether a presented certificate carries this identity.
    pub fn matches(&self, certificate: &crate::identity::PresentedCertificate) -> bool {
        match self {
            CertificateMatch::SpiffeId(id) => certificate.uris.iter().any(|uri| uri == id),
            CertificateMatch::DnsName(name) => certificate
                .dns_names
                .iter()
                .any(|dns| dns.eq_ignore_ascii_case(name)),
            CertificateMatch::CommonName(name) => {
                certificate.common_names.iter().any(|common| common == name)
            }
        }
    }
}

impl fmt::Display for CertificateMatch {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CertificateMatch::SpiffeId(id) => write!(formatter, "SPIFFE ID {id}"),
            CertificateMatch::DnsName(name) => write!(formatter, "DNS name {name}"),
            CertificateMatch::CommonName(name) => write!(formatter, "common name {name}"),
        }
    }
}

/// Reads one `[[principal.certificate]]`: exactly one of `spiffe_id`, `dns_name`, `common_name`.
pub(super) fn build_certificate_match(
    raw: RawCertificateMatch,
    at: &str,
    problems: &mut Problems,
) -> Option<CertificateMatch> {
    const EXPECTED: &str = "exactly one of spiffe_id, dns_name, common_name";
    let set: Vec<CertificateMatch> = [
        raw.spiffe_id.map(CertificateMatch::SpiffeId),
        raw.dns_name.map(CertificateMatch::DnsName),
        raw.common_name.map(CertificateMatch::CommonName),
    ]
    .into_iter()
    .flatten()
    .collect();
    let [matcher] = <[CertificateMatch; 1]>::try_from(set)
        .map_err(|set| {
            problems.push(
                at,
                invalid(
                    &format!("{} keys", set.len()),
                    "certificate identity",
                    EXPECTED,
                ),
            );
        })
        .ok()?;
    let valid = match &matcher {
        CertificateMatch::SpiffeId(id) => is_spiffe_id(id),
        CertificateMatch::DnsName(name) => {
            !name.is_empty()
                && name.len() <= 253
                && name
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'-'))
        }
        CertificateMatch::CommonName(name) => !name.is_empty() && name.len() <= 256,
    };
    if !valid {
        let (key, text, expected) = match &matcher {
            CertificateMatch::SpiffeId(id) => (
                "spiffe_id",
                id,
                "spiffe://TRUST-DOMAIN/PATH, such as \"spiffe://example.org/ns/ci/sa/builder\"",
            ),
            CertificateMatch::DnsName(name) => (
                "dns_name",
                name,
                "a DNS name of letters, digits, '.' and '-' (no wildcards)",
            ),
            CertificateMatch::CommonName(name) => ("common_name", name, "1 to 256 characters"),
        };
        problems.push(
            format!("{at}.{key}"),
            invalid(text, "certificate name", expected),
        );
        return None;
    }
    Some(matcher)
}

/// Whether `id` is a SPIFFE ID: `spiffe://` + a lower-case trust domain + a non-empty path.
pub fn is_spiffe_id(id: &str) -> bool {
    let Some(rest) = id.strip_prefix("spiffe://") else {
        return false;
    };
    let Some((domain, path)) = rest.split_once('/') else {
        return false;
    };
    !domain.is_empty()
        && domain.bytes().all(|byte| {
            byte.is_ascii_lowercase() || byte.is_ascii_digit() || matches!(byte, b'.' | b'-' | b'_')
        })
        && !path.is_empty()
        && path.split('/').all(|segment| {
            !segment.is_empty()
                && segment != "."
                && segment != ".."
                && segment
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'-' | b'_'))
        })
}
