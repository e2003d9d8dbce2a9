//! Valet tokens whose signature was verified, remembered by their SHA-256 while the key ring that
//! verified them is in force: a token presented again (every gateway call of a grant carries the
//! same one) costs a hash and a lookup, not a signature check. Its claims — issuer, audience,
//! validity window — are still checked at every use, and the grant is still read.

use std::collections::HashMap;
use std::sync::Arc;

use valet_core::keyring::KeyRing;
use valet_core::token::{self, Claims, Expectations, VerifyError};

/// Tokens remembered at most; past it the memory starts over.
const MAX_REMEMBERED: usize = 10_000;

#[derive(Default)]
struct Remembered {
    /// The key ring they were verified under: another one (a rotation, a reload) forgets them.
    ring: Option<Arc<KeyRing>>,
    claims: HashMap<[u8; 32], Arc<Claims>>,
}

/// The tokens verified lately.
#[derive(Default)]
pub struct VerifiedTokens {
    remembered: std::sync::Mutex<Remembered>,
}

impl VerifiedTokens {
    /// `token`'s claims, verified under `ring` (now or earlier, under the same ring) and checked
    /// against `expect`.
    pub fn verify(
        &self,
        token: &str,
        ring: &Arc<KeyRing>,
        expect: Expectations<'_>,
    ) -> Result<Arc<Claims>, VerifyError> {
        let digest = valet_core::Secret::from(token.to_string()).sha256();
        let known = {
            let mut remembered = self
                .remembered
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if !remembered
                .ring
                .as_ref()
                .is_some_and(|known| Arc::ptr_eq(known, ring))
            {
                *remembered = Remembered {
                    ring: Some(ring.clone()),
                    claims: HashMap::new(),
                };
            }
            remembered.claims.get(&digest).cloned()
        };
        let claims = match known {
            Some(claims) => claims,
            None => {
                let claims = Arc::new(token::verify_signature(token, ring.as_ref())?);
                let mut remembered = self
                    .remembered
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                if remembered
                    .ring
                    .as_ref()
                    .is_some_and(|known| Arc::ptr_eq(known, ring))
                {
                    if remembered.claims.len() >= MAX_REMEMBERED {
                        remembered.claims.clear();
                    }
                    remembered.claims.insert(digest, claims.clone());
                }
                claims
            }
        };
        token::check_claims(&claims, expect)?;
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use valet_core::keyring::{SealKey, SigningKey, StoredKey};

    fn ring(seal: &SealKey) -> Arc<KeyRing> {
        let key = SigningKey::generate().unwrap();
        let stored = StoredKey::seal(&key, seal, 100).unwrap();
        Arc::new(KeyRing::open(std::slice::from_ref(&stored), seal, 100).unwrap())
    }

    fn expect(audience: &str, now: i64) -> Expectations<'_> {
        Expectations {
            issuer: "https://valet.test",
            audience: Some(audience),
            now,
            leeway_seconds: 0,
        }
    }

    #[test]
    fn a_remembered_token_is_still_checked_for_its_audience_its_time_and_its_key_ring() {
        let seal = SealKey::from_base64(&SealKey::generate_base64().unwrap()).unwrap();
        let first = ring(&seal);
        let claims = Claims {
            iss: "https://valet.test".into(),
            sub: "agent".into(),
            aud: "railway".into(),
            iat: 100,
            nbf: 100,
            exp: 200,
            jti: "gr_1".into(),
            task: "t".into(),
            scope: "s".into(),
            env: "staging".into(),
            params: Default::default(),
        };
        let token = token::sign(&claims, first.current());
        let tokens = VerifiedTokens::default();
        assert_eq!(
            tokens
                .verify(&token, &first, expect("railway", 150))
                .unwrap()
                .jti,
            "gr_1"
        );
        // Remembered now; each use still checks what the token is for and when.
        assert!(matches!(
            tokens.verify(&token, &first, expect("github", 150)),
            Err(VerifyError::WrongAudience { .. })
        ));
        assert!(matches!(
            tokens.verify(&token, &first, expect("railway", 200)),
            Err(VerifyError::Expired { .. })
        ));
        // Under another key ring (its key gone), it is verified again, and refused.
        let second = ring(&seal);
        assert!(matches!(
            tokens.verify(&token, &second, expect("railway", 150)),
            Err(VerifyError::UnknownKey { .. })
        ));
        // A forged token is never taken from memory.
        let forged = format!("{}x", &token[..token.len() - 1]);
        assert!(
            tokens
                .verify(&forged, &first, expect("railway", 150))
                .is_err()
        );
    }
}
