//! Tokens: JWT claims, compact-JWS signing with the current key, and verification whose rules
//! are pinned here — the algorithm is EdDSA because valetd says so, never because a header does.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{ED25519, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use crate::clock::UnixTime;
use crate::keyring::{SigningKey, VerifyingKeys};

/// The only signature algorithm valetd issues or accepts.
pub const ALGORITHM: &str = "EdDSA";
/// The `typ` header of a valet token.
pub const TOKEN_TYPE: &str = "valet+jwt";
/// Tokens longer than this are rejected before any parsing.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// The claims of a valet token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    pub iss: String,
    /// The principal the token was issued to.
    pub sub: String,
    pub aud: String,
    pub iat: UnixTime,
    pub nbf: UnixTime,
    pub exp: UnixTime,
    /// The grant id.
    pub jti: String,
    pub task: String,
    pub scope: String,
    pub env: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    alg: String,
    typ: Option<String>,
    kid: Option<String>,
    #[serde(default)]
    crit: Option<serde_json::Value>,
}

/// Signs claims with `key` into a compact JWS.
pub fn sign(claims: &Claims, key: &SigningKey) -> String {
    let header = Header {
        alg: ALGORITHM.to_string(),
        typ: Some(TOKEN_TYPE.to_string()),
        kid: Some(key.kid().to_string()),
        crit: None,
    };
    // Serializing these plain structs cannot fail.
    let header_json = serde_json::to_vec(&HeaderOut::from(&header)).unwrap_or_default();
    let claims_json = serde_json::to_vec(claims).unwrap_or_default();
    let mut token = String::with_capacity(64 + claims_json.len() * 4 / 3 + 90);
    token.push_str(&URL_SAFE_NO_PAD.encode(header_json));
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(claims_json));
    let signature = key.sign(token.as_bytes());
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(signature));
    token
}

#[derive(Serialize)]
struct HeaderOut<'a> {
    alg: &'a str,
    typ: &'a str,
    kid: &'a str,
}

impl<'a> From<&'a Header> for HeaderOut<'a> {
    fn from(header: &'a Header) -> Self {
        HeaderOut {
            alg: &header.alg,
            typ: header.typ.as_deref().unwrap_or(TOKEN_TYPE),
            kid: header.kid.as_deref().unwrap_or_default(),
        }
    }
}

/// What a verifier expects of a token besides a good signature.
#[derive(Debug, Clone, Copy)]
pub struct Expectations<'a> {
    pub issuer: &'a str,
    /// `None` accepts any audience (valetd's own introspection); resource servers pass theirs.
    pub audience: Option<&'a str>,
    pub now: UnixTime,
    /// Allowed clock difference for offline verifiers; valetd itself uses 0.
    pub leeway_seconds: i64,
}

/// Why a token was refused. Each variant names the check that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("the token is {n_bytes} bytes; at most {max} are accepted")]
    TooLong { n_bytes: usize, max: usize },
    #[error("the token is malformed: {what}")]
    Malformed { what: &'static str },
    #[error("the token's header names algorithm {alg:?}; valet tokens are signed with EdDSA only")]
    AlgorithmNotAllowed { alg: String },
    #[error("the token's header has typ {typ:?}; valet tokens have typ {TOKEN_TYPE:?}")]
    WrongType { typ: String },
    #[error("the token's header marks extensions critical; valet tokens carry none")]
    CriticalHeader,
    #[error(
        "the token was signed by key {kid:?}, which is not in the key ring (unknown, or retired and past its tokens' lifetime)"
    )]
    UnknownKey { kid: String },
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token was issued by {found:?}; expected {expected:?}")]
    WrongIssuer { found: String, expected: String },
    #[error("the token is for audience {found:?}; expected {expected:?}")]
    WrongAudience { found: String, expected: String },
    #[error("the token expired at {}", crate::clock::format_time(*exp))]
    Expired { exp: UnixTime },
    #[error("the token is not valid before {}", crate::clock::format_time(*nbf))]
    NotYetValid { nbf: UnixTime },
}

/// Verifies a compact JWS against `keys` and `expect`, returning its claims.
///
/// The order is fixed: size, shape, header (algorithm pinned, type, key id), signature, and only
/// then the claims, which are not trusted before the signature checks out.
pub fn verify(
    token: &str,
    keys: &impl VerifyingKeys,
    expect: Expectations<'_>,
) -> Result<Claims, VerifyError> {
    let claims = verify_signature(token, keys)?;
    check_claims(&claims, expect)?;
    Ok(claims)
}

/// What a token claims, once its form, header and signature check out under `keys` — but not
/// whether it is for this issuer, audience and moment: [`check_claims`] says that, at every use
/// (a verified token may be remembered; its claims are checked each time).
pub fn verify_signature(token: &str, keys: &impl VerifyingKeys) -> Result<Claims, VerifyError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(VerifyError::TooLong {
            n_bytes: token.len(),
            max: MAX_TOKEN_BYTES,
        });
    }
    let mut parts = token.split('.');
    let (Some(header_part), Some(claims_part), Some(signature_part), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(VerifyError::Malformed {
            what: "expected three base64url parts separated by '.'",
        });
    };
    let header_json = URL_SAFE_NO_PAD
        .decode(header_part)
        .map_err(|_| VerifyError::Malformed {
            what: "header is not base64url",
        })?;
    let header: Header =
        serde_json::from_slice(&header_json).map_err(|_| VerifyError::Malformed {
            what: "header is not a JSON object with alg",
        })?;
    if header.alg != ALGORITHM {
        return Err(VerifyError::AlgorithmNotAllowed { alg: header.alg });
    }
    match header.typ.as_deref() {
        Some(TOKEN_TYPE) => {}
        other => {
            return Err(VerifyError::WrongType {
                typ: other.unwrap_or("(none)").to_string(),
            });
        }
    }
    if header.crit.is_some() {
        return Err(VerifyError::CriticalHeader);
    }
    let kid = header.kid.ok_or(VerifyError::Malformed {
        what: "header has no kid",
    })?;
    let public_key = keys
        .public_key(&kid)
        .ok_or(VerifyError::UnknownKey { kid })?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature_part)
        .map_err(|_| VerifyError::Malformed {
            what: "signature is not base64url",
        })?;
    let signed_len = header_part.len() + 1 + claims_part.len();
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(&token.as_bytes()[..signed_len], &signature)
        .map_err(|_| VerifyError::BadSignature)?;

    let claims_json = URL_SAFE_NO_PAD
        .decode(claims_part)
        .map_err(|_| VerifyError::Malformed {
            what: "claims are not base64url",
        })?;
    serde_json::from_slice(&claims_json).map_err(|_| VerifyError::Malformed {
        what: "claims are not a valet claim set",
    })
}

/// Whether verified `claims` are for the expected issuer and audience, and valid at its moment.
pub fn check_claims(claims: &Claims, expect: Expectations<'_>) -> Result<(), VerifyError> {
    if claims.iss != expect.issuer {
        return Err(VerifyError::WrongIssuer {
            found: claims.iss.clone(),
            expected: expect.issuer.to_string(),
        });
    }
    if let Some(audience) = expect.audience
        && claims.aud != audience
    {
        return Err(VerifyError::WrongAudience {
            found: claims.aud.clone(),
            expected: audience.to_string(),
        });
    }
    check_window(claims, expect.now, expect.leeway_seconds)
}

/// Whether a token is inside its validity window at `now`, `leeway` seconds each way. Computed
/// in 128 bits, so no claim value can wrap a sum into a pass.
pub fn check_window(claims: &Claims, now: UnixTime, leeway: i64) -> Result<(), VerifyError> {
    let (now, leeway) = (i128::from(now), i128::from(leeway.max(0)));
    if now >= i128::from(claims.exp) + leeway {
        return Err(VerifyError::Expired { exp: claims.exp });
    }
    if now + leeway < i128::from(claims.nbf) {
        return Err(VerifyError::NotYetValid { nbf: claims.nbf });
    }
    Ok(())
}

/// A valet token as valetd holds it: a bearer credential, so it cannot be printed (`Debug` shows
/// its fingerprint) and leaves this type only where it is handed to its holder.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// Wraps a token received from a caller or just signed.
    pub fn new(text: String) -> Token {
        Token(text)
    }

    /// The token's text, for the reply to its own holder or for verification.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Gives the text up, for the reply to its own holder.
    pub fn into_exposed(self) -> String {
        self.0
    }

    /// A short, non-reversible fingerprint for logs and audit records.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.0)
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "Token(fingerprint {})", self.fingerprint())
    }
}

/// Signs `claims` into a [`Token`].
pub fn issue(claims: &Claims, key: &SigningKey) -> Token {
    Token(sign(claims, key))
}

/// A short, non-reversible fingerprint of a token for logs: never the token itself.
pub fn fingerprint(token: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    hex::encode(&digest.as_ref()[..6])
}

#[cfg(test)]
mod tests;
