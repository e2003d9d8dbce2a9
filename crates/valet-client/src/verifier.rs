//! Offline verification: tokens checked against the broker's public keys, fetched once and
//! cached, and fetched again only when a token names a key the cache does not hold.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use valet_core::keyring::Jwk;
use valet_core::token::{self, Claims, Expectations, VerifyError};
use valet_core::{Clock, SystemClock};
use valet_proto::v1;
use valet_proto::v1::broker_client::BrokerClient;

use crate::{Authenticated, ClientError};

/// Clock difference tolerated between valetd and this verifier.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Cached {
    issuer: String,
    keys: BTreeMap<String, [u8; 32]>,
}

/// A verifier sharing one JWKS cache. Cheap to clone.
#[derive(Clone)]
pub struct OfflineVerifier {
    broker: BrokerClient<Authenticated>,
    cache: Arc<RwLock<Cached>>,
    leeway: Duration,
}

impl OfflineVerifier {
    pub(crate) fn new(broker: BrokerClient<Authenticated>) -> OfflineVerifier {
        OfflineVerifier {
            broker,
            cache: Arc::default(),
            leeway: DEFAULT_LEEWAY,
        }
    }

    /// Verifies signature, key, type, issuer, expiry, not-before and (when given) audience.
    pub async fn verify(&self, token: &str, audience: Option<&str>) -> Result<Claims, ClientError> {
        if self.read(|cached| cached.keys.is_empty()) {
            self.refresh().await?;
        }
        match self.verify_cached(token, audience) {
            Err(VerifyError::UnknownKey { .. }) => {
                self.refresh().await?;
                Ok(self.verify_cached(token, audience)?)
            }
            outcome => Ok(outcome?),
        }
    }

    /// Fetches the JWKS again.
    pub async fn refresh(&self) -> Result<(), ClientError> {
        let reply = self
            .broker
            .clone()
            .get_jwks(v1::GetJwksRequest {})
            .await?
            .into_inner();
        let keys = reply
            .keys
            .into_iter()
            .filter_map(|key| {
                let jwk = Jwk {
                    kty: key.kty,
                    crv: key.crv,
                    x: key.x,
                    kid: key.kid.clone(),
                    alg: key.alg,
                    key_use: key.r#use,
                };
                jwk.ed25519_public_key().map(|public| (key.kid, public))
            })
            .collect();
        if let Ok(mut cached) = self.cache.write() {
            *cached = Cached {
                issuer: reply.issuer,
                keys,
            };
        }
        Ok(())
    }

    fn read<T>(&self, reader: impl FnOnce(&Cached) -> T) -> T {
        match self.cache.read() {
            Ok(cached) => reader(&cached),
            Err(poisoned) => reader(&poisoned.into_inner()),
        }
    }

    fn verify_cached(&self, token: &str, audience: Option<&str>) -> Result<Claims, VerifyError> {
        self.read(|cached| {
            let expectations = Expectations {
                issuer: &cached.issuer,
                audience,
                now: SystemClock.now(),
                leeway_seconds: self.leeway.as_secs() as i64,
            };
            token::verify(token, &cached.keys, expectations)
        })
    }
}
