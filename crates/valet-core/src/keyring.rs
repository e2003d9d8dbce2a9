//! Signing keys: Ed25519 key pairs, their ids, the ring of keys that still verify, and sealing of
//! private keys under the key-encryption key (AES-256-GCM) so the store never holds them in clear.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};

use crate::clock::{UnixTime, add_duration};
use crate::random;
use crate::secret::Secret;

/// What can go wrong with keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "the key-encryption key must be 32 bytes written in base64 (what `openssl rand -base64 32` prints); got {n_bytes} bytes after decoding"
    )]
    SealKeyWrongLength { n_bytes: usize },
    #[error("the key-encryption key is not valid base64 (what `openssl rand -base64 32` prints)")]
    SealKeyNotBase64,
    #[error(
        "signing key {kid} cannot be opened with this key-encryption key: it was sealed under a different key, or the stored record was altered"
    )]
    UnsealFailed { kid: String },
    #[error("signing key {kid} is stored in a form valetd cannot read: {what}")]
    CorruptKey { kid: String, what: &'static str },
    #[error("no current signing key in the key ring")]
    NoCurrentKey,
    #[error(
        "key record {kid} in the store does not carry the MAC valetd writes (missing or wrong): someone with write access to the store wrote or altered it; valetd refuses to trust any key ring that holds it"
    )]
    UnauthenticatedRecord { kid: String },
    #[error(
        "the key ring cannot be used: {reason}; valetd refuses to sign or verify until it can read a trusted key ring again"
    )]
    Unavailable { reason: String },
    #[error(transparent)]
    Randomness(#[from] random::RandomnessUnavailable),
}

/// The key-encryption key: seals signing keys at rest, and is the root of the keys that
/// authenticate what valetd reads back later (the audit chain, stored records).
pub struct SealKey(LessSafeKey, Secret);

impl std::fmt::Debug for SealKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("SealKey(<redacted>)")
    }
}

impl SealKey {
    /// Reads a key written as base64 of 32 bytes (surrounding whitespace is ignored).
    pub fn from_base64(text: &Secret) -> Result<SealKey, KeyError> {
        let text = text.expose_str().ok_or(KeyError::SealKeyNotBase64)?;
        let bytes = Secret::new(
            STANDARD
                .decode(text.trim())
                .map_err(|_| KeyError::SealKeyNotBase64)?,
        );
        if bytes.expose().len() != 32 {
            return Err(KeyError::SealKeyWrongLength {
                n_bytes: bytes.expose().len(),
            });
        }
        let unbound = UnboundKey::new(&AES_256_GCM, bytes.expose()).map_err(|_| {
            KeyError::SealKeyWrongLength {
                n_bytes: bytes.expose().len(),
            }
        })?;
        Ok(SealKey(LessSafeKey::new(unbound), bytes))
    }

    /// A MAC key for one `purpose`, derived from this key (HKDF-SHA256): only a holder of the
    /// key-encryption key can compute it, and keys for different purposes are independent.
    pub fn derive_mac_key(&self, purpose: &str) -> ring::hmac::Key {
        let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"valet key derivation v1");
        let info = [purpose.as_bytes()];
        // Expanding to one HMAC-SHA256 key length cannot fail.
        salt.extract(self.1.expose())
            .expand(&info, ring::hmac::HMAC_SHA256)
            .map(ring::hmac::Key::from)
            .unwrap_or_else(|_| ring::hmac::Key::new(ring::hmac::HMAC_SHA256, self.1.expose()))
    }

    /// A fresh random key, as the base64 text a key file holds.
    pub fn generate_base64() -> Result<Secret, KeyError> {
        let bytes: [u8; 32] = random::bytes()?;
        Ok(Secret::from(STANDARD.encode(bytes)))
    }

    /// Seals `plaintext`, binding it to `context` (the key id) so a sealed blob cannot be moved to
    /// another record. Output: nonce ‖ ciphertext ‖ tag.
    pub fn seal(&self, plaintext: &[u8], context: &str) -> Result<Vec<u8>, KeyError> {
        let nonce_bytes: [u8; NONCE_LEN] = random::bytes()?;
        let mut in_out = plaintext.to_vec();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce_bytes),
                Aad::from(context.as_bytes()),
                &mut in_out,
            )
            .map_err(|_| KeyError::CorruptKey {
                kid: context.to_string(),
                what: "sealing failed",
            })?;
        let mut out = nonce_bytes.to_vec();
        out.extend_from_slice(&in_out);
        zeroize::Zeroize::zeroize(&mut in_out);
        Ok(out)
    }

    /// Opens what [`SealKey::seal`] produced for the same `context`.
    pub fn open(&self, sealed: &[u8], context: &str) -> Result<Secret, KeyError> {
        if sealed.len() < NONCE_LEN {
            return Err(KeyError::CorruptKey {
                kid: context.to_string(),
                what: "sealed blob too short",
            });
        }
        let (nonce_bytes, ciphertext) = sealed.split_at(NONCE_LEN);
        let nonce =
            Nonce::try_assume_unique_for_key(nonce_bytes).map_err(|_| KeyError::CorruptKey {
                kid: context.to_string(),
                what: "bad nonce",
            })?;
        let mut in_out = ciphertext.to_vec();
        let plaintext = self
            .0
            .open_in_place(nonce, Aad::from(context.as_bytes()), &mut in_out)
            .map_err(|_| KeyError::UnsealFailed {
                kid: context.to_string(),
            })?;
        let secret = Secret::new(plaintext.to_vec());
        zeroize::Zeroize::zeroize(&mut in_out);
        Ok(secret)
    }
}

/// The id of a public key: the first 16 hex digits of its SHA-256. Doubles as its fingerprint.
pub fn key_id(public_key: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, public_key);
    hex::encode(&digest.as_ref()[..8])
}

/// An Ed25519 private key, parsed once and kept ready to sign.
pub struct SigningKey {
    kid: String,
    pair: Ed25519KeyPair,
    pkcs8: Secret,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "SigningKey({})", self.kid)
    }
}

impl SigningKey {
    /// A new random key.
    pub fn generate() -> Result<SigningKey, KeyError> {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
            .map_err(|_| KeyError::Randomness(random::RandomnessUnavailable))?;
        SigningKey::from_pkcs8(Secret::new(pkcs8.as_ref().to_vec()), "new")
    }

    /// Parses a PKCS#8 document; `kid_hint` names the record in errors.
    pub fn from_pkcs8(pkcs8: Secret, kid_hint: &str) -> Result<SigningKey, KeyError> {
        let pair =
            Ed25519KeyPair::from_pkcs8(pkcs8.expose()).map_err(|_| KeyError::CorruptKey {
                kid: kid_hint.to_string(),
                what: "not an Ed25519 PKCS#8 key",
            })?;
        let kid = key_id(pair.public_key().as_ref());
        Ok(SigningKey { kid, pair, pkcs8 })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn public_key(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.pair.public_key().as_ref());
        out
    }

    /// Signs `message` (Ed25519, deterministic).
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        let mut out = [0u8; 64];
        out.copy_from_slice(self.pair.sign(message).as_ref());
        out
    }
}

/// A signing key as the store keeps it: public half in clear, private half sealed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredKey {
    pub kid: String,
    /// Raw 32-byte Ed25519 public key, base64url.
    pub public_key: String,
    /// Sealed PKCS#8, base64; dropped once the key is retired (it never signs again).
    pub sealed_private: Option<String>,
    pub created_at: UnixTime,
    pub retired_at: Option<UnixTime>,
    /// A retired key verifies until this time: by then every token it signed has expired.
    pub verify_until: Option<UnixTime>,
    /// A MAC over every field above, under a key derived from the key-encryption key: a record
    /// written by anyone else (a public key planted in etcd, say) is refused.
    #[serde(default)]
    pub mac: Option<String>,
}

impl StoredKey {
    /// Seals a new current key for storage.
    pub fn seal(
        key: &SigningKey,
        seal_key: &SealKey,
        now: UnixTime,
    ) -> Result<StoredKey, KeyError> {
        let sealed = seal_key.seal(key.pkcs8.expose(), &key.kid)?;
        Ok(StoredKey {
            kid: key.kid.clone(),
            public_key: URL_SAFE_NO_PAD.encode(key.public_key()),
            sealed_private: Some(STANDARD.encode(sealed)),
            created_at: now,
            retired_at: None,
            verify_until: None,
            mac: None,
        }
        .authenticated(seal_key))
    }

    /// The record after retirement at `now`, verifying for `max_token_lifetime` more.
    pub fn retired(
        &self,
        now: UnixTime,
        max_token_lifetime: Duration,
        seal_key: &SealKey,
    ) -> StoredKey {
        StoredKey {
            sealed_private: None,
            retired_at: Some(now),
            verify_until: Some(add_duration(now, max_token_lifetime)),
            mac: None,
            ..self.clone()
        }
        .authenticated(seal_key)
    }

    /// What the MAC covers: every field, in a fixed order.
    fn mac_input(&self) -> String {
        format!(
            "valet key record v1\n{}\n{}\n{}\n{}\n{:?}\n{:?}",
            self.kid,
            self.public_key,
            self.sealed_private.as_deref().unwrap_or(""),
            self.created_at,
            self.retired_at,
            self.verify_until
        )
    }

    fn authenticated(mut self, seal_key: &SealKey) -> StoredKey {
        let key = seal_key.derive_mac_key("valet key records");
        self.mac = Some(hex::encode(
            ring::hmac::sign(&key, self.mac_input().as_bytes()).as_ref(),
        ));
        self
    }

    /// Refuses a record this valetd did not write.
    pub fn check(&self, seal_key: &SealKey) -> Result<(), KeyError> {
        let key = seal_key.derive_mac_key("valet key records");
        let authentic = self
            .mac
            .as_deref()
            .and_then(|mac| hex::decode(mac).ok())
            .is_some_and(|tag| ring::hmac::verify(&key, self.mac_input().as_bytes(), &tag).is_ok());
        if authentic {
            Ok(())
        } else {
            Err(KeyError::UnauthenticatedRecord {
                kid: self.kid.clone(),
            })
        }
    }

    /// Whether the key still verifies at `now`.
    pub fn verifies_at(&self, now: UnixTime) -> bool {
        self.verify_until.is_none_or(|until| now < until)
    }

    fn public_key_bytes(&self) -> Result<[u8; 32], KeyError> {
        URL_SAFE_NO_PAD
            .decode(&self.public_key)
            .ok()
            .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
            .ok_or_else(|| KeyError::CorruptKey {
                kid: self.kid.clone(),
                what: "public key is not 32 bytes of base64url",
            })
    }
}

/// Something that maps a key id to the Ed25519 public key that verifies it.
pub trait VerifyingKeys {
    fn public_key(&self, kid: &str) -> Option<[u8; 32]>;
}

impl VerifyingKeys for BTreeMap<String, [u8; 32]> {
    fn public_key(&self, kid: &str) -> Option<[u8; 32]> {
        self.get(kid).copied()
    }
}

/// The keys valetd signs and verifies with: one current signing key and every public key that
/// may still have live tokens.
#[derive(Debug, Clone)]
pub struct KeyRing {
    current: Arc<SigningKey>,
    verifying: BTreeMap<String, [u8; 32]>,
}

impl KeyRing {
    /// Builds the ring from stored records: the newest unretired key signs; every key still
    /// within its verification window verifies.
    pub fn open(
        records: &[StoredKey],
        seal_key: &SealKey,
        now: UnixTime,
    ) -> Result<KeyRing, KeyError> {
        // Every record must be valetd's own: a verifying key planted in the store would let
        // whoever holds its private half sign tokens valetd accepts. When no record at all
        // checks, the likelier cause is the wrong key-encryption key: say that.
        let failing: Vec<&StoredKey> = records
            .iter()
            .filter(|record| record.check(seal_key).is_err())
            .collect();
        if let Some(first) = failing.first() {
            if failing.len() == records.len() {
                return Err(KeyError::UnsealFailed {
                    kid: first.kid.clone(),
                });
            }
            return Err(KeyError::UnauthenticatedRecord {
                kid: first.kid.clone(),
            });
        }
        let current_record = records
            .iter()
            .filter(|record| record.retired_at.is_none())
            .max_by_key(|record| record.created_at)
            .ok_or(KeyError::NoCurrentKey)?;
        let sealed_text =
            current_record
                .sealed_private
                .as_ref()
                .ok_or_else(|| KeyError::CorruptKey {
                    kid: current_record.kid.clone(),
                    what: "current key has no private half",
                })?;
        let sealed = STANDARD
            .decode(sealed_text)
            .map_err(|_| KeyError::CorruptKey {
                kid: current_record.kid.clone(),
                what: "sealed private key is not base64",
            })?;
        let pkcs8 = seal_key.open(&sealed, &current_record.kid)?;
        let current = SigningKey::from_pkcs8(pkcs8, &current_record.kid)?;
        if current.kid != current_record.kid {
            return Err(KeyError::CorruptKey {
                kid: current_record.kid.clone(),
                what: "key id does not match the key",
            });
        }
        let mut verifying = BTreeMap::new();
        for record in records.iter().filter(|record| record.verifies_at(now)) {
            verifying.insert(record.kid.clone(), record.public_key_bytes()?);
        }
        Ok(KeyRing {
            current: Arc::new(current),
            verifying,
        })
    }

    pub fn current(&self) -> &SigningKey {
        &self.current
    }

    /// The key ids that verify, current first.
    pub fn key_ids(&self) -> Vec<String> {
        let mut ids = vec![self.current.kid.clone()];
        ids.extend(
            self.verifying
                .keys()
                .filter(|kid| **kid != self.current.kid)
                .cloned(),
        );
        ids
    }

    /// The public keys as a JSON Web Key Set.
    pub fn jwks(&self) -> Vec<Jwk> {
        self.key_ids()
            .into_iter()
            .filter_map(|kid| {
                let public = self.verifying.get(&kid)?;
                Some(Jwk::ed25519(&kid, public))
            })
            .collect()
    }
}

impl VerifyingKeys for KeyRing {
    fn public_key(&self, kid: &str) -> Option<[u8; 32]> {
        self.verifying.get(kid).copied()
    }
}

/// One public key in JWK form (RFC 8037: OKP, Ed25519).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    pub kty: String,
    pub crv: String,
    pub x: String,
    pub kid: String,
    pub alg: String,
    #[serde(rename = "use")]
    pub key_use: String,
}

impl Jwk {
    pub fn ed25519(kid: &str, public_key: &[u8; 32]) -> Jwk {
        Jwk {
            kty: "OKP".to_string(),
            crv: "Ed25519".to_string(),
            x: URL_SAFE_NO_PAD.encode(public_key),
            kid: kid.to_string(),
            alg: crate::token::ALGORITHM.to_string(),
            key_use: "sig".to_string(),
        }
    }

    /// The raw public key, when this JWK is an Ed25519 signing key whose id matches its bytes.
    pub fn ed25519_public_key(&self) -> Option<[u8; 32]> {
        if self.kty != "OKP" || self.crv != "Ed25519" || self.alg != crate::token::ALGORITHM {
            return None;
        }
        let bytes = <[u8; 32]>::try_from(URL_SAFE_NO_PAD.decode(&self.x).ok()?).ok()?;
        (key_id(&bytes) == self.kid).then_some(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seal_key() -> SealKey {
        SealKey::from_base64(&SealKey::generate_base64().unwrap()).unwrap()
    }

    #[test]
    fn sealed_keys_open_only_under_the_same_key_and_record() {
        let seal = seal_key();
        let key = SigningKey::generate().unwrap();
        let stored = StoredKey::seal(&key, &seal, 100).unwrap();
        let ring = KeyRing::open(std::slice::from_ref(&stored), &seal, 100).unwrap();
        assert_eq!(ring.current().kid(), key.kid());

        let other = seal_key();
        assert!(matches!(
            KeyRing::open(std::slice::from_ref(&stored), &other, 100),
            Err(KeyError::UnsealFailed { .. })
        ));

        let mut moved = stored.clone();
        let another = SigningKey::generate().unwrap();
        moved.kid = another.kid().to_string();
        assert!(KeyRing::open(&[moved], &seal, 100).is_err());
    }

    #[test]
    fn a_planted_verifying_key_or_an_altered_record_is_refused() {
        let seal = seal_key();
        let current = StoredKey::seal(&SigningKey::generate().unwrap(), &seal, 100).unwrap();
        // A public key written into the store by someone who holds its private half.
        let outside = SigningKey::generate().unwrap();
        let planted = StoredKey {
            kid: outside.kid().to_string(),
            public_key: URL_SAFE_NO_PAD.encode(outside.public_key()),
            sealed_private: None,
            created_at: 50,
            retired_at: Some(60),
            verify_until: Some(10_000_000),
            mac: None,
        };
        assert!(matches!(
            KeyRing::open(&[current.clone(), planted], &seal, 100),
            Err(KeyError::UnauthenticatedRecord { kid }) if kid == outside.kid()
        ));
        // A retired key's window stretched by hand.
        let mut stretched = current.retired(100, Duration::from_secs(60), &seal);
        stretched.verify_until = Some(10_000_000);
        let newer = StoredKey::seal(&SigningKey::generate().unwrap(), &seal, 100).unwrap();
        assert!(KeyRing::open(&[stretched, newer], &seal, 100).is_err());
    }

    #[test]
    fn retired_keys_verify_until_their_tokens_expire() {
        let seal = seal_key();
        let old = StoredKey::seal(&SigningKey::generate().unwrap(), &seal, 100).unwrap();
        let new = StoredKey::seal(&SigningKey::generate().unwrap(), &seal, 200).unwrap();
        let retired = old.retired(200, Duration::from_secs(3600), &seal);
        assert_eq!(retired.sealed_private, None);
        let records = [retired.clone(), new.clone()];
        let ring = KeyRing::open(&records, &seal, 300).unwrap();
        assert_eq!(ring.current().kid(), new.kid);
        assert!(ring.public_key(&old.kid).is_some());
        assert_eq!(ring.jwks().len(), 2);
        let later = KeyRing::open(&records, &seal, 200 + 3600).unwrap();
        assert!(later.public_key(&old.kid).is_none());
    }

    #[test]
    fn seal_key_text_must_be_32_bytes_of_base64() {
        assert!(matches!(
            SealKey::from_base64(&Secret::from("c2hvcnQ=".to_string())),
            Err(KeyError::SealKeyWrongLength { n_bytes: 5 })
        ));
        assert!(matches!(
            SealKey::from_base64(&Secret::from("not base64!".to_string())),
            Err(KeyError::SealKeyNotBase64)
        ));
    }

    #[test]
    fn jwk_round_trips_and_rejects_mismatched_ids() {
        let key = SigningKey::generate().unwrap();
        let jwk = Jwk::ed25519(key.kid(), &key.public_key());
        assert_eq!(jwk.ed25519_public_key(), Some(key.public_key()));
        let mut lying = jwk.clone();
        lying.kid = "0000000000000000".to_string();
        assert_eq!(lying.ed25519_public_key(), None);
    }
}
