//! The identity issuers' public keys (JWKS): fetched over HTTPS or read from a file, cached,
//! refreshed when a token names a key the cache does not hold (at most once per
//! [`MIN_REFRESH_INTERVAL`] per issuer, so forged `kid`s cannot make valetd hammer the issuer),
//! and the verification of an identity token presented as a bearer credential.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;
use valet_core::config::{Config, Issuer, KeySet};
use valet_core::identity::jwt::{self, PublicJwk, Refusal};

use crate::outbound::Outbound;

/// The least time between two fetches of one issuer's JWKS on unknown `kid`s.
pub const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// Cached keys are re-fetched after this long even when every `kid` is known (issuers rotate).
const MAX_CACHE_AGE: Duration = Duration::from_secs(3600);
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_JWKS_BYTES: usize = 256 * 1024;

/// What a verified identity token says.
#[derive(Debug, Clone)]
pub struct VerifiedIdentity {
    /// The `[[issuer]]` name.
    pub issuer: String,
    pub subject: String,
    pub claims: serde_json::Map<String, serde_json::Value>,
    /// SHA-256 of the token, hex: how grants and audit records name it.
    pub fingerprint: String,
    /// The last moment the token is accepted: `exp`, or `iat` plus the issuer's maximum age,
    /// whichever comes first (the clock skew included).
    pub acceptable_until: valet_core::UnixTime,
    /// The thumbprint of the issuer's key that verified it.
    pub signing_key: String,
}

struct Cached {
    source: KeySet,
    keys: Arc<Vec<PublicJwk>>,
    fetched_at: Instant,
}

/// A verified token, remembered until the moment it stops being acceptable.
struct Remembered {
    identity: Arc<VerifiedIdentity>,
    /// The earliest of `exp` and `iat` + the maximum age, skew included.
    acceptable_until: valet_core::UnixTime,
}

/// Verified tokens remembered at most (a workload presents the same token for minutes; an
/// ECDSA or RSA verification per request would cost more than the rest of the request).
const MAX_REMEMBERED: usize = 10_000;

/// The key cache of every issuer, by `[[issuer]]` name, and the tokens already verified.
#[derive(Default)]
pub struct IdentityKeys {
    /// By SHA-256 of the token; emptied on every config reload (pins may have changed).
    remembered: std::sync::Mutex<HashMap<[u8; 32], Remembered>>,
    cached: std::sync::Mutex<HashMap<String, Cached>>,
    /// When each issuer's JWKS was last fetched (or tried): a failed fetch is not retried for
    /// every token.
    attempts: std::sync::Mutex<HashMap<String, Instant>>,
    /// When an unknown `kid` last made each issuer's JWKS be re-fetched: the refresh budget.
    unknown_kid_refreshes: std::sync::Mutex<HashMap<String, Instant>>,
    /// One fetch at a time per process: concurrent unknown-kid tokens wait for it.
    fetching: tokio::sync::Mutex<()>,
}

impl IdentityKeys {
    /// Verifies `token` against the issuer its `iss` names; returns what it says, or why it is
    /// refused. A token verified before is taken from memory while its times still allow it.
    pub async fn verify(
        &self,
        config: &Config,
        outbound: &dyn Outbound,
        token: &str,
        now: valet_core::UnixTime,
    ) -> Result<Arc<VerifiedIdentity>, String> {
        let digest = valet_core::Secret::from(token.to_string()).sha256();
        if let Some(remembered) = self
            .remembered
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&digest)
            && now <= remembered.acceptable_until
        {
            return Ok(remembered.identity.clone());
        }
        let (identity, acceptable_until) = self
            .verify_now(config, outbound, token, hex::encode(digest), now)
            .await?;
        let identity = Arc::new(identity);
        let mut remembered = self
            .remembered
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if remembered.len() >= MAX_REMEMBERED {
            remembered.retain(|_, entry| now <= entry.acceptable_until);
            if remembered.len() >= MAX_REMEMBERED {
                remembered.clear();
            }
        }
        remembered.insert(
            digest,
            Remembered {
                identity: identity.clone(),
                acceptable_until,
            },
        );
        Ok(identity)
    }

    /// The identity of a token verified before, while its times still allow it; no work beyond
    /// a hash and a lookup.
    pub fn remembered(
        &self,
        token: &str,
        now: valet_core::UnixTime,
    ) -> Option<Arc<VerifiedIdentity>> {
        let digest = valet_core::Secret::from(token.to_string()).sha256();
        self.remembered
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&digest)
            .filter(|remembered| now <= remembered.acceptable_until)
            .map(|remembered| remembered.identity.clone())
    }

    /// Forgets every verified token (the issuers' pins may have changed).
    pub fn forget_verified(&self) {
        self.remembered
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clear();
    }

    async fn verify_now(
        &self,
        config: &Config,
        outbound: &dyn Outbound,
        token: &str,
        fingerprint: String,
        now: valet_core::UnixTime,
    ) -> Result<(VerifiedIdentity, valet_core::UnixTime), String> {
        let decoded = jwt::decode(token)?;
        let named = decoded.issuer().unwrap_or_default();
        let issuer = config
            .issuers
            .values()
            .find(|issuer| issuer.issuer == named)
            .ok_or_else(|| {
                format!(
                    "the identity token's iss {named:?} is not an [[issuer]] valetd trusts; trusted: [{}]",
                    config
                        .issuers
                        .values()
                        .map(|issuer| issuer.issuer.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?;
        let keys = self.keys(issuer, outbound, false).await?;
        let verified = match jwt::verify(&decoded, issuer.pins(), &keys, now) {
            Err(Refusal::UnknownKey { kid }) => {
                if !self.may_refresh(&issuer.name) {
                    return Err(format!(
                        "the identity token's kid {kid:?} is not in issuer {}'s keys (its JWKS is re-fetched for an unknown kid at most every {} s)",
                        issuer.name,
                        MIN_REFRESH_INTERVAL.as_secs()
                    ));
                }
                let keys = self.keys(issuer, outbound, true).await?;
                jwt::verify(&decoded, issuer.pins(), &keys, now)
            }
            other => other,
        };
        let signing_key = verified.map_err(|refusal| match refusal {
            Refusal::UnknownKey { kid } => format!(
                "the identity token's kid {kid:?} is not in issuer {}'s keys, even after re-fetching them",
                issuer.name
            ),
            Refusal::Invalid(reason) => reason,
        })?;
        let subject = decoded
            .claims
            .get("sub")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_string();
        let time = |name: &str| {
            decoded
                .claims
                .get(name)
                .and_then(serde_json::Value::as_i64)
                .unwrap_or_default()
        };
        let skew = i64::try_from(issuer.clock_skew.as_secs()).unwrap_or(i64::MAX);
        let max_age = i64::try_from(issuer.max_token_age.as_secs()).unwrap_or(i64::MAX);
        let acceptable_until = time("exp")
            .saturating_add(skew)
            .min(time("iat").saturating_add(max_age).saturating_add(skew));
        Ok((
            VerifiedIdentity {
                issuer: issuer.name.clone(),
                subject,
                claims: decoded.claims,
                fingerprint,
                acceptable_until,
                signing_key,
            },
            acceptable_until,
        ))
    }

    /// Whether an unknown kid may trigger a fetch now; if so, spends the budget.
    fn may_refresh(&self, issuer: &str) -> bool {
        let mut attempts = self
            .unknown_kid_refreshes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = Instant::now();
        match attempts.get(issuer) {
            Some(last) if now.duration_since(*last) < MIN_REFRESH_INTERVAL => false,
            _ => {
                attempts.insert(issuer.to_string(), now);
                true
            }
        }
    }

    /// The issuer's keys: cached while fresh and from the same source, else fetched.
    async fn keys(
        &self,
        issuer: &Issuer,
        outbound: &dyn Outbound,
        refresh: bool,
    ) -> Result<Arc<Vec<PublicJwk>>, String> {
        let cached = |keys: &Self| {
            let cached = keys
                .cached
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            cached
                .get(&issuer.name)
                .filter(|entry| entry.source == issuer.keys)
                .filter(|entry| entry.fetched_at.elapsed() < MAX_CACHE_AGE)
                .map(|entry| (entry.keys.clone(), entry.fetched_at))
        };
        let before = cached(self);
        if let Some((keys, _)) = &before
            && !refresh
        {
            return Ok(keys.clone());
        }
        // Without keys, a failed fetch is retried only after the refresh interval: an issuer that
        // is down is not asked again for every token presented. A recent attempt counts as failed
        // only once nobody is fetching and the cache is still empty — a fetch that succeeded
        // fills the cache before it lets go of the lock, so a caller that looked at the cache
        // just before that is not refused.
        if before.is_none()
            && let Some(last) = self
                .attempts
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .get(&issuer.name)
            && last.elapsed() < MIN_REFRESH_INTERVAL
            && self.fetching.try_lock().is_ok()
            && cached(self).is_none()
        {
            return Err(format!(
                "issuer {}'s keys could not be fetched from {} a moment ago; valetd tries again after {} s",
                issuer.name,
                issuer.keys,
                MIN_REFRESH_INTERVAL.as_secs()
            ));
        }
        let _one_at_a_time = self.fetching.lock().await;
        // Someone else may have fetched while this waited.
        if let Some((keys, fetched_at)) = cached(self)
            && before.as_ref().is_none_or(|(_, at)| fetched_at > *at)
        {
            return Ok(keys);
        }
        self.attempts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(issuer.name.clone(), Instant::now());
        let document = fetch(&issuer.keys, outbound).await.map_err(|detail| {
            format!(
                "cannot get issuer {}'s keys from {}: {detail}",
                issuer.name, issuer.keys
            )
        })?;
        let keys = Arc::new(jwt::parse_jwks(&document).map_err(|detail| {
            format!(
                "issuer {}'s keys from {}: {detail}",
                issuer.name, issuer.keys
            )
        })?);
        tracing::info!(issuer = issuer.name, source = %issuer.keys, n_keys = keys.len(), "identity issuer keys fetched");
        self.cached
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(
                issuer.name.clone(),
                Cached {
                    source: issuer.keys.clone(),
                    keys: keys.clone(),
                    fetched_at: Instant::now(),
                },
            );
        Ok(keys)
    }

    /// Forgets cached keys read from files, so a reload re-reads them.
    pub fn forget_files(&self) {
        let mut forgotten = Vec::new();
        self.cached
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .retain(|name, entry| {
                let file = matches!(entry.source, KeySet::File(_));
                if file {
                    forgotten.push(name.clone());
                }
                !file
            });
        // A file is read again at once: its last read does not count against the retry
        // interval (which would refuse every token of the issuer for a while after a reload).
        let mut attempts = self
            .attempts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for name in forgotten {
            attempts.remove(&name);
        }
    }

    /// Whether issuer `issuer_name` still publishes the key `thumbprint` (its cached key set,
    /// re-read when the cache is stale or was emptied by a reload).
    pub async fn key_published(
        &self,
        config: &Config,
        outbound: &dyn Outbound,
        issuer_name: &str,
        thumbprint: &str,
    ) -> Result<(), String> {
        let issuer = config
            .issuers
            .get(issuer_name)
            .ok_or_else(|| format!("issuer {issuer_name} is no longer in the config"))?;
        let keys = self.keys(issuer, outbound, false).await?;
        if keys.iter().any(|jwk| jwk.key.thumbprint() == thumbprint) {
            Ok(())
        } else {
            Err(format!(
                "issuer {issuer_name} no longer publishes the key that signed the identity token"
            ))
        }
    }
}

async fn fetch(source: &KeySet, outbound: &dyn Outbound) -> Result<Bytes, String> {
    match source {
        KeySet::File(path) => tokio::fs::read(path)
            .await
            .map(Bytes::from)
            .map_err(|error| error.to_string()),
        KeySet::Url { url, ca_file } => {
            let request = http::Request::get(url.as_str())
                .header(http::header::ACCEPT, "application/json")
                .body(Bytes::new())
                .map_err(|error| error.to_string())?;
            let answer = match ca_file {
                Some(path) => {
                    let ca = tokio::fs::read(path).await.map_err(|error| {
                        format!("cannot read ca_file {}: {error}", path.display())
                    })?;
                    outbound
                        .send_trusting(&ca, request, FETCH_TIMEOUT, MAX_JWKS_BYTES)
                        .await?
                }
                None => {
                    outbound
                        .send(request, FETCH_TIMEOUT, MAX_JWKS_BYTES)
                        .await?
                }
            };
            if answer.status != 200 {
                return Err(format!("it answered HTTP {}", answer.status));
            }
            Ok(answer.body)
        }
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};

    use super::*;
    use crate::tests::NoNetwork;

    const NOW: i64 = 1_800_000_000;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_remembered_token_is_refused_once_its_time_is_up() {
        let directory = tempfile::tempdir().unwrap();
        let random = ring::rand::SystemRandom::new();
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &random).unwrap();
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &random)
                .unwrap();
        let point = pair.public_key().as_ref();
        std::fs::write(
            directory.path().join("jwks.json"),
            serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k", "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..])}]}).to_string(),
        )
        .unwrap();
        let config = Config::parse(
            r#"
[server]
data_dir = "data"
issuer = "https://valet.test"
max_ttl = "1h"
[audit]
path = "audit.jsonl"
[[issuer]]
name = "test"
issuer = "https://issuer.test"
audiences = ["valet"]
jwks_file = "jwks.json"
algorithms = ["ES256"]
clock_skew = "10s"
"#,
            directory.path(),
        )
        .unwrap();
        let signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"ES256","kid":"k"}"#),
            URL_SAFE_NO_PAD.encode(
                serde_json::json!({"iss": "https://issuer.test", "aud": "valet", "sub": "w", "iat": NOW, "exp": NOW + 60}).to_string()
            )
        );
        let signature = pair.sign(&random, signed.as_bytes()).unwrap();
        let token = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()));

        let keys = IdentityKeys::default();
        let first = keys.verify(&config, &NoNetwork, &token, NOW).await.unwrap();
        let again = keys
            .verify(&config, &NoNetwork, &token, NOW + 70)
            .await
            .unwrap();
        assert!(Arc::ptr_eq(&first, &again), "remembered within exp + skew");
        let late = keys
            .verify(&config, &NoNetwork, &token, NOW + 71)
            .await
            .unwrap_err();
        assert!(late.contains("expired"), "{late}");
        // A forged token is never remembered as the real one.
        let mut forged = token.clone().into_bytes();
        let at = forged.len() - 10;
        forged[at] = if forged[at] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(forged).unwrap();
        assert!(
            keys.verify(&config, &NoNetwork, &forged, NOW)
                .await
                .is_err()
        );

        // Many first tokens at once on a cold cache: one fetch, and none of them is told the
        // keys "could not be fetched a moment ago" because another caller's fetch was finishing.
        let keys = Arc::new(IdentityKeys::default());
        let config = Arc::new(config);
        let mut tasks = Vec::new();
        for n in 0..64 {
            let signed = format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(r#"{"alg":"ES256","kid":"k"}"#),
                URL_SAFE_NO_PAD.encode(
                    serde_json::json!({"iss": "https://issuer.test", "aud": "valet", "sub": format!("w{n}"), "iat": NOW, "exp": NOW + 60}).to_string()
                )
            );
            let signature = pair.sign(&random, signed.as_bytes()).unwrap();
            let token = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()));
            let (keys, config) = (keys.clone(), config.clone());
            tasks.push(tokio::spawn(async move {
                keys.verify(&config, &NoNetwork, &token, NOW)
                    .await
                    .map(|_| ())
            }));
        }
        for task in tasks {
            task.await.unwrap().unwrap();
        }
    }
}
