//! Verifying a workload identity token (a JWT from Kubernetes, GitHub Actions, GitLab CI or
//! SPIFFE) the way a pinned verifier must: the algorithm comes from the issuer's config, never
//! from the token's header; the key from the issuer's JWKS by `kid`; then `iss`, `aud`, `exp`,
//! `nbf`, `iat` and the maximum token age, each refused with what was wrong.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde_json::{Map, Value};

use crate::UnixTime;

/// The signature algorithms an issuer may be pinned to. No HMAC (a shared secret is a static
/// secret) and never `none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Algorithm {
    Rs256,
    Es256,
    EdDsa,
}

impl Algorithm {
    pub const ALL: [Algorithm; 3] = [Algorithm::Rs256, Algorithm::Es256, Algorithm::EdDsa];

    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Rs256 => "RS256",
            Algorithm::Es256 => "ES256",
            Algorithm::EdDsa => "EdDSA",
        }
    }

    pub fn parse(text: &str) -> Option<Algorithm> {
        Algorithm::ALL
            .into_iter()
            .find(|algorithm| algorithm.as_str() == text)
    }
}

/// One public key from a JWKS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicJwk {
    pub kid: Option<String>,
    pub key: PublicKey,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicKey {
    /// RSA modulus and exponent, big-endian.
    Rsa { n: Vec<u8>, e: Vec<u8> },
    /// An uncompressed P-256 point (`04 || x || y`).
    P256(Vec<u8>),
    /// An Ed25519 public key.
    Ed25519(Vec<u8>),
}

impl PublicKey {
    /// SHA-256 over the key's kind and public bytes, hex: names the key that verified a token,
    /// so what the token opened ends when the issuer stops publishing that key.
    pub fn thumbprint(&self) -> String {
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        match self {
            PublicKey::Rsa { n, e } => {
                context.update(b"rsa\0");
                context.update(&(n.len() as u64).to_be_bytes());
                context.update(n);
                context.update(e);
            }
            PublicKey::P256(point) => {
                context.update(b"p256\0");
                context.update(point);
            }
            PublicKey::Ed25519(point) => {
                context.update(b"ed25519\0");
                context.update(point);
            }
        }
        hex::encode(context.finish())
    }

    fn algorithm(&self) -> Algorithm {
        match self {
            PublicKey::Rsa { .. } => Algorithm::Rs256,
            PublicKey::P256(_) => Algorithm::Es256,
            PublicKey::Ed25519(_) => Algorithm::EdDsa,
        }
    }

    fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        match self {
            PublicKey::Rsa { n, e } => RsaPublicKeyComponents { n, e }
                .verify(&signature::RSA_PKCS1_2048_8192_SHA256, message, signature)
                .is_ok(),
            PublicKey::P256(point) => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(message, signature)
                    .is_ok()
            }
            PublicKey::Ed25519(key) => UnparsedPublicKey::new(&signature::ED25519, key)
                .verify(message, signature)
                .is_ok(),
        }
    }
}

/// Reads a JWKS document. Keys of kinds Valet does not verify with (symmetric keys, other
/// curves, encryption keys) are skipped; a document with no usable key is an error.
pub fn parse_jwks(document: &[u8]) -> Result<Vec<PublicJwk>, String> {
    let value: Value = serde_json::from_slice(document)
        .map_err(|error| format!("the JWKS is not JSON: {error}"))?;
    let keys = value
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("the JWKS has no \"keys\" array")?;
    let field = |key: &Value, name: &str| -> Option<Vec<u8>> {
        key.get(name)
            .and_then(Value::as_str)
            .and_then(|text| URL_SAFE_NO_PAD.decode(text.trim_end_matches('=')).ok())
    };
    let mut usable = Vec::new();
    for key in keys {
        if key
            .get("use")
            .and_then(Value::as_str)
            .is_some_and(|usage| usage != "sig")
        {
            continue;
        }
        let public = match (
            key.get("kty").and_then(Value::as_str),
            key.get("crv").and_then(Value::as_str),
        ) {
            (Some("RSA"), _) => match (field(key, "n"), field(key, "e")) {
                (Some(n), Some(e)) if n.len() >= 256 => Some(PublicKey::Rsa { n, e }),
                _ => None,
            },
            (Some("EC"), Some("P-256")) => match (field(key, "x"), field(key, "y")) {
                (Some(x), Some(y)) if x.len() == 32 && y.len() == 32 => {
                    let mut point = vec![4];
                    point.extend_from_slice(&x);
                    point.extend_from_slice(&y);
                    Some(PublicKey::P256(point))
                }
                _ => None,
            },
            (Some("OKP"), Some("Ed25519")) => field(key, "x")
                .filter(|x| x.len() == 32)
                .map(PublicKey::Ed25519),
            _ => None,
        };
        if let Some(key_value) = public {
            usable.push(PublicJwk {
                kid: key.get("kid").and_then(Value::as_str).map(str::to_string),
                key: key_value,
            });
        }
    }
    if usable.is_empty() {
        return Err(
            "the JWKS holds no usable signing key (RSA of 2048 bits or more, EC P-256, or Ed25519)"
                .to_string(),
        );
    }
    Ok(usable)
}

/// A token split and decoded, not yet verified: enough to find its issuer and key.
#[derive(Debug, Clone)]
pub struct UnverifiedToken<'a> {
    signed_part: &'a str,
    signature: Vec<u8>,
    pub algorithm: String,
    pub kid: Option<String>,
    pub claims: Map<String, Value>,
}

impl UnverifiedToken<'_> {
    /// The `iss` claim, to find the issuer's config.
    pub fn issuer(&self) -> Option<&str> {
        self.claims.get("iss").and_then(Value::as_str)
    }
}

/// Whether `credential` has the shape of a JWS (three base64url parts): a JWT is presented as
/// the bearer credential in place of a principal key.
pub fn looks_like_jwt(credential: &str) -> bool {
    let parts: Vec<&str> = credential.split('.').collect();
    parts.len() == 3
        && parts[0].starts_with("eyJ")
        && parts.iter().all(|part| {
            part.bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_')
        })
}

/// The largest identity token accepted: real ones are 1–2 KiB.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Splits and decodes a token; refuses what is not a well-formed JWS with a JSON object payload.
pub fn decode(token: &str) -> Result<UnverifiedToken<'_>, String> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(format!(
            "the identity token is {} bytes; at most {MAX_TOKEN_BYTES} are accepted",
            token.len()
        ));
    }
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("the identity token is not a JWS (three base64url parts)".to_string());
    };
    let json = |part: &str, what: &str| -> Result<Map<String, Value>, String> {
        let bytes = URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|_| format!("the identity token's {what} is not base64url"))?;
        match serde_json::from_slice(&bytes) {
            Ok(Value::Object(map)) => Ok(map),
            _ => Err(format!("the identity token's {what} is not a JSON object")),
        }
    };
    let header_map = json(header, "header")?;
    let claims = json(payload, "payload")?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| "the identity token's signature is not base64url".to_string())?;
    if header_map.contains_key("crit") {
        return Err(
            "the identity token has critical header parameters, which Valet does not process"
                .to_string(),
        );
    }
    Ok(UnverifiedToken {
        signed_part: &token[..header.len() + 1 + payload.len()],
        signature,
        algorithm: header_map
            .get("alg")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        kid: header_map
            .get("kid")
            .and_then(Value::as_str)
            .map(str::to_string),
        claims,
    })
}

/// What an issuer's config pins.
#[derive(Debug, Clone, Copy)]
pub struct Pins<'a> {
    pub issuer: &'a str,
    pub audiences: &'a [String],
    pub algorithms: &'a [Algorithm],
    pub clock_skew: Duration,
    pub max_token_age: Duration,
}

/// Why the key could not be chosen: the caller may refresh the JWKS on an unknown `kid`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No key in the JWKS has the token's `kid`.
    UnknownKey {
        kid: String,
    },
    Invalid(String),
}

/// Verifies the signature and every claim of `token` against the pins and the issuer's keys.
pub fn verify(
    token: &UnverifiedToken<'_>,
    pins: Pins<'_>,
    keys: &[PublicJwk],
    now: UnixTime,
) -> Result<String, Refusal> {
    let invalid = |text: String| Refusal::Invalid(text);
    let pinned = pins
        .algorithms
        .iter()
        .map(|algorithm| algorithm.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let algorithm = Algorithm::parse(&token.algorithm)
        .filter(|algorithm| pins.algorithms.contains(algorithm))
        .ok_or_else(|| {
            invalid(format!(
                "the identity token says alg {:?}; issuer {} is pinned to [{pinned}]",
                token.algorithm, pins.issuer
            ))
        })?;
    // The key must be of the pinned algorithm's kind: an RSA public key is never an HMAC secret.
    let candidates: Vec<&PublicJwk> = keys
        .iter()
        .filter(|jwk| jwk.key.algorithm() == algorithm)
        .filter(|jwk| match &token.kid {
            Some(kid) => jwk.kid.as_deref() == Some(kid.as_str()),
            None => true,
        })
        .collect();
    let key = match (candidates.as_slice(), &token.kid) {
        ([key], _) => key,
        ([], Some(kid)) => return Err(Refusal::UnknownKey { kid: kid.clone() }),
        ([], None) => {
            return Err(invalid(format!(
                "issuer {} has no {} key for this token",
                pins.issuer,
                algorithm.as_str()
            )));
        }
        (_, _) => {
            return Err(invalid(
                "the identity token has no kid and the issuer has several keys".to_string(),
            ));
        }
    };
    if !key
        .key
        .verify(token.signed_part.as_bytes(), &token.signature)
    {
        return Err(invalid(
            "the identity token's signature does not verify with the issuer's key".to_string(),
        ));
    }
    check_claims(&token.claims, pins, now).map_err(invalid)?;
    Ok(key.key.thumbprint())
}

fn check_claims(claims: &Map<String, Value>, pins: Pins<'_>, now: UnixTime) -> Result<(), String> {
    let issuer = claims
        .get("iss")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if issuer != pins.issuer {
        return Err(format!(
            "the identity token's iss is {issuer:?}; expected {:?}",
            pins.issuer
        ));
    }
    let audiences: Vec<&str> = match claims.get("aud") {
        Some(Value::String(audience)) => vec![audience.as_str()],
        Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if !audiences
        .iter()
        .any(|audience| pins.audiences.iter().any(|pinned| pinned == audience))
    {
        return Err(format!(
            "the identity token's aud is {audiences:?}; valetd accepts [{}] from this issuer (request the token with that audience)",
            pins.audiences.join(", ")
        ));
    }
    let time = |name: &str, required: bool| -> Result<Option<UnixTime>, String> {
        match claims.get(name) {
            None if required => Err(format!("the identity token has no {name} claim")),
            None => Ok(None),
            Some(value) => value
                .as_i64()
                .or_else(|| value.as_f64().map(|float| float as i64))
                .map(Some)
                .ok_or_else(|| format!("the identity token's {name} is not a number")),
        }
    };
    check_times(
        now,
        time("exp", true)?.unwrap_or_default(),
        time("nbf", false)?,
        time("iat", true)?.unwrap_or_default(),
        pins.clock_skew,
        pins.max_token_age,
    )?;
    match claims.get("sub").and_then(Value::as_str) {
        Some(subject) if !subject.is_empty() => Ok(()),
        _ => Err("the identity token has no sub claim".to_string()),
    }
}

/// The value at `path` (segments separated by `/`, as in `kubernetes.io/serviceaccount/name`)
/// as text: strings as they are, numbers and booleans written out.
pub fn claim_text(claims: &Map<String, Value>, path: &str) -> Option<String> {
    let mut segments = path.split('/');
    let mut value = claims.get(segments.next()?)?;
    for segment in segments {
        value = value.get(segment)?;
    }
    match value {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        Value::Bool(flag) => Some(flag.to_string()),
        _ => None,
    }
}

/// The time checks of an identity token: `exp`, `nbf`, `iat` and the issuer's maximum token age,
/// with `skew` of leeway each way. Computed in 128 bits: no claim value (`i64::MIN` included, which
/// only an issuer could sign) can wrap a sum or a difference into a pass.
pub fn check_times(
    now: UnixTime,
    expires: UnixTime,
    not_before: Option<UnixTime>,
    issued: UnixTime,
    skew: Duration,
    max_token_age: Duration,
) -> Result<(), String> {
    let now = i128::from(now);
    let skew = i128::from(skew.as_secs());
    let expires = i128::from(expires);
    let issued = i128::from(issued);
    if now > expires + skew {
        return Err(format!(
            "the identity token expired {} s ago; get a fresh one",
            now - expires
        ));
    }
    if let Some(not_before) = not_before
        && now + skew < i128::from(not_before)
    {
        return Err("the identity token is not valid yet (nbf is in the future)".to_string());
    }
    if issued > now + skew {
        return Err(
            "the identity token was issued in the future (iat); check the clocks".to_string(),
        );
    }
    let max_age = i128::from(max_token_age.as_secs());
    if now - issued > max_age + skew {
        return Err(format!(
            "the identity token was issued {} s ago; this issuer's tokens are accepted for {max_age} s (issuer.max_token_age)",
            now - issued
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
