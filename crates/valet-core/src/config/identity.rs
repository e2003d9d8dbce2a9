//! How callers prove who they are, as configured: the listeners' TLS (server certificate, client
//! CA, whether a client certificate is required), the identity token issuers valetd trusts, and
//! the certificate and token identities that authenticate a principal instead of a static key.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::raw::{RawCertificateMatch, RawIdentityMatch, RawIssuer, RawServer};
use super::{ProblemKind, Problems, invalid};
use crate::identity::jwt::{Algorithm, Pins};

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

/// A platform whose identity tokens (JWTs) valetd accepts in place of a static key: a
/// Kubernetes cluster, GitHub Actions, GitLab CI, a SPIRE server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issuer {
    pub name: String,
    /// The exact `iss` of its tokens.
    pub issuer: String,
    /// A token's `aud` must hold one of these.
    pub audiences: Vec<String>,
    pub keys: KeySet,
    /// The algorithms its tokens may be signed with; a token's header must name one of them.
    pub algorithms: Vec<Algorithm>,
    pub clock_skew: Duration,
    /// How long after its `iat` a token is still accepted (however late its `exp`).
    pub max_token_age: Duration,
}

/// Where an issuer's public keys (its JWKS) come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySet {
    /// Fetched over HTTPS (verified against `ca_file`, or the public web roots), cached, and
    /// refreshed when a token names an unknown `kid` (at a bounded rate) and periodically.
    Url {
        url: String,
        ca_file: Option<PathBuf>,
    },
    /// Read from a file (air-gapped setups), again on every reload.
    File(PathBuf),
}

impl fmt::Display for KeySet {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySet::Url { url, .. } => formatter.write_str(url),
            KeySet::File(path) => write!(formatter, "file {}", path.display()),
        }
    }
}

impl Issuer {
    pub fn pins(&self) -> Pins<'_> {
        Pins {
            issuer: &self.issuer,
            audiences: &self.audiences,
            algorithms: &self.algorithms,
            clock_skew: self.clock_skew,
            max_token_age: self.max_token_age,
        }
    }
}

/// Clock skew allowed when the config does not say.
pub const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(30);
/// Token age accepted when the config does not say.
pub const DEFAULT_MAX_TOKEN_AGE: Duration = Duration::from_secs(3600);

/// Reads one `[[issuer]]`.
pub(super) fn build_issuer(
    raw: RawIssuer,
    at: &str,
    resolve: &dyn Fn(String) -> PathBuf,
    problems: &mut Problems,
) -> Option<Issuer> {
    let name = problems.name(raw.name, &format!("{at}.name"));
    let issuer = problems.required(raw.issuer, &format!("{at}.issuer"));
    if let Some(issuer) = &issuer
        && (issuer.is_empty() || issuer.len() > 512)
    {
        problems.push(format!("{at}.issuer"), invalid(issuer, "issuer", "the exact `iss` of the platform's tokens, such as \"https://token.actions.githubusercontent.com\""));
    }
    if raw.audiences.is_empty() || raw.audiences.iter().any(String::is_empty) {
        problems.push(
            format!("{at}.audiences"),
            invalid(
                &format!("{:?}", raw.audiences),
                "audience list",
                "one or more non-empty audiences, such as [\"valet\"]: tokens minted for other services are refused",
            ),
        );
    }
    let keys = match (raw.jwks_url, raw.jwks_file) {
        (Some(url), None) => {
            if !url.starts_with("https://") || url.len() <= "https://".len() {
                problems.push(
                    format!("{at}.jwks_url"),
                    invalid(
                        &url,
                        "JWKS URL",
                        "an https:// URL: keys fetched in clear could be swapped on the way",
                    ),
                );
            }
            Some(KeySet::Url {
                url,
                ca_file: raw.ca_file.clone().map(resolve),
            })
        }
        (None, Some(file)) => {
            if raw.ca_file.is_some() {
                problems.push(
                    format!("{at}.ca_file"),
                    invalid(
                        "ca_file",
                        "key with jwks_file",
                        "ca_file only with jwks_url",
                    ),
                );
            }
            Some(KeySet::File(resolve(file)))
        }
        (Some(_), Some(_)) => {
            problems.push(
                at,
                ProblemKind::BothSet {
                    first: "jwks_url",
                    second: "jwks_file",
                },
            );
            None
        }
        (None, None) => {
            problems.push(
                at,
                ProblemKind::NeitherSet {
                    first: "jwks_url",
                    second: "jwks_file",
                },
            );
            None
        }
    };
    let mut algorithms = Vec::new();
    if raw.algorithms.is_empty() {
        problems.push(
            format!("{at}.algorithms"),
            invalid(
                "[]",
                "algorithm list",
                "one or more of \"RS256\", \"ES256\", \"EdDSA\" (what the platform signs with)",
            ),
        );
    }
    for (index, text) in raw.algorithms.iter().enumerate() {
        match Algorithm::parse(text) {
            Some(algorithm) if !algorithms.contains(&algorithm) => algorithms.push(algorithm),
            Some(_) => {}
            None => problems.push(
                format!("{at}.algorithms[{index}]"),
                invalid(
                    text,
                    "algorithm",
                    "\"RS256\", \"ES256\" or \"EdDSA\" (no HMAC, never none)",
                ),
            ),
        }
    }
    let bounded = |value: Option<String>,
                   key: &str,
                   default: Duration,
                   max: Duration,
                   problems: &mut Problems| {
        let Some(text) = value else {
            return Some(default);
        };
        let key_path = format!("{at}.{key}");
        let duration = match humantime::parse_duration(&text) {
            Ok(duration) => duration,
            Err(_) => {
                problems.push(
                    &key_path,
                    invalid(&text, "duration", "a duration such as \"30s\" or \"1h\""),
                );
                return None;
            }
        };
        if duration > max {
            problems.push(
                &key_path,
                invalid(
                    &text,
                    "duration",
                    &format!("at most {}", super::format_duration(max)),
                ),
            );
            return None;
        }
        Some(duration)
    };
    let clock_skew = bounded(
        raw.clock_skew,
        "clock_skew",
        DEFAULT_CLOCK_SKEW,
        Duration::from_secs(300),
        problems,
    );
    let max_token_age = bounded(
        raw.max_token_age,
        "max_token_age",
        DEFAULT_MAX_TOKEN_AGE,
        Duration::from_secs(48 * 3600),
        problems,
    );
    Some(Issuer {
        name: name?,
        issuer: issuer?,
        audiences: raw.audiences,
        keys: keys?,
        algorithms,
        clock_skew: clock_skew?,
        max_token_age: max_token_age.filter(|age| !age.is_zero())?,
    })
}

/// A glob over claim text: `*` matches any run of characters; anything else matches itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob(String);

impl Glob {
    pub fn new(text: impl Into<String>) -> Glob {
        Glob(text.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn matches(&self, text: &str) -> bool {
        let mut parts = self.0.split('*');
        let first = parts.next().unwrap_or_default();
        let Some(mut rest) = text.strip_prefix(first) else {
            return false;
        };
        let parts: Vec<&str> = parts.collect();
        let Some((last, middle)) = parts.split_last() else {
            return rest.is_empty();
        };
        for part in middle {
            match rest.find(part) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
        rest.len() >= last.len() && rest.ends_with(last)
    }
}

/// The identity tokens that authenticate a principal: from one issuer, with a subject and claims
/// matching these globs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityMatch {
    /// The `[[issuer]]` name.
    pub issuer: String,
    pub subject: Glob,
    /// Claim paths (`repository`, `kubernetes.io/namespace`) and the globs their values match.
    pub claims: BTreeMap<String, Glob>,
}

impl IdentityMatch {
    pub fn matches(
        &self,
        issuer: &str,
        claims: &serde_json::Map<String, serde_json::Value>,
    ) -> bool {
        self.issuer == issuer
            && claims
                .get("sub")
                .and_then(serde_json::Value::as_str)
                .is_some_and(|subject| self.subject.matches(subject))
            && self.claims.iter().all(|(path, glob)| {
                crate::identity::jwt::claim_text(claims, path)
                    .is_some_and(|value| glob.matches(&value))
            })
    }
}

impl fmt::Display for IdentityMatch {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "identity {} subject {}",
            self.issuer,
            self.subject.as_str()
        )?;
        for (path, glob) in &self.claims {
            write!(formatter, " {path}={}", glob.as_str())?;
        }
        Ok(())
    }
}

/// Reads one `[[principal.identity]]`.
pub(super) fn build_identity_match(
    raw: RawIdentityMatch,
    at: &str,
    issuers: &BTreeMap<String, Issuer>,
    problems: &mut Problems,
) -> Option<IdentityMatch> {
    let issuer = problems.required(raw.issuer, &format!("{at}.issuer"));
    if let Some(name) = &issuer
        && !issuers.contains_key(name)
    {
        problems.push(
            format!("{at}.issuer"),
            invalid(
                name,
                "issuer",
                &format!(
                    "the name of an [[issuer]]; defined issuers: [{}]",
                    issuers.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            ),
        );
    }
    let subject = problems.required(raw.subject, &format!("{at}.subject"));
    if let Some(subject) = &subject
        && (subject.is_empty()
            || subject.chars().all(|character| character == '*') && raw.claims.is_empty())
    {
        problems.push(
            format!("{at}.subject"),
            invalid(
                subject,
                "subject",
                "the token's sub, exact or a glob; a subject of only '*' needs claims that narrow it",
            ),
        );
    }
    for (path, value) in &raw.claims {
        if path.is_empty() || path.split('/').any(str::is_empty) || value.is_empty() {
            problems.push(
                format!("{at}.claims.{path}"),
                invalid(
                    value,
                    "claim matcher",
                    "a claim path (segments separated by '/') and a non-empty value or glob",
                ),
            );
        }
    }
    Some(IdentityMatch {
        issuer: issuer?,
        subject: Glob::new(subject?),
        claims: raw
            .claims
            .into_iter()
            .map(|(path, value)| (path, Glob::new(value)))
            .collect(),
    })
}
