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
}

struct Cached {
    source: KeySet,
    keys: Arc<Vec<PublicJwk>>,
    fetched_at: Instant,
}

/// The key cache of every issuer, by `[[issuer]]` name.
#[derive(Default)]
pub struct IdentityKeys {
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
    /// refused.
    pub async fn verify(
        &self,
        config: &Config,
        outbound: &dyn Outbound,
        token: &str,
        now: valet_core::UnixTime,
    ) -> Result<VerifiedIdentity, String> {
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
        verified.map_err(|refusal| match refusal {
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
        Ok(VerifiedIdentity {
            issuer: issuer.name.clone(),
            subject,
            claims: decoded.claims,
        })
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
        // is down is not asked again for every token presented.
        if before.is_none()
            && let Some(last) = self
                .attempts
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .get(&issuer.name)
            && last.elapsed() < MIN_REFRESH_INTERVAL
            && self.fetching.try_lock().is_ok()
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
        self.cached
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .retain(|_, entry| !matches!(entry.source, KeySet::File(_)));
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
