//! The key ring's life in valetd: created on first start, opened on every start, rotated on
//! request, refreshed when the store says it changed. Readers see it through one atomic pointer.
//! Every record is checked against valetd's MAC when it is read; when the ring cannot be read
//! back as valetd wrote it, valetd fails closed — it never goes on trusting what it remembers.

use std::sync::Arc;

use arc_swap::ArcSwap;
use valet_core::keyring::{KeyError, KeyRing, SealKey, SigningKey, StoredKey};
use valet_core::{Clock, KeyId};
use valet_store::{Store, StoreError};

use crate::error::ServiceError;

/// The live key ring and what it takes to change it.
pub struct Keys {
    ring: ArcSwap<KeyRing>,
    /// Why the ring cannot be trusted now (the last refresh failed); `None` when it can.
    failure: ArcSwap<Option<String>>,
    seal_key: SealKey,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
}

impl Keys {
    /// Opens the key ring from the store, creating the first key if there is none.
    pub async fn open(
        store: Arc<dyn Store>,
        seal_key: SealKey,
        clock: Arc<dyn Clock>,
    ) -> Result<Keys, ServiceError> {
        let records = store.keys().await?;
        if records.is_empty() {
            let first = StoredKey::seal(&SigningKey::generate()?, &seal_key, clock.now())?;
            match store.replace_keys(None, std::slice::from_ref(&first)).await {
                // Another replica created the first key at the same time: use theirs.
                Ok(()) | Err(StoreError::KeyRingConflict) => {}
                Err(error) => return Err(error.into()),
            }
            tracing::info!(kid = first.kid, "created the first signing key");
        }
        let ring = KeyRing::open(&store.keys().await?, &seal_key, clock.now())?;
        Ok(Keys {
            ring: ArcSwap::from_pointee(ring),
            failure: ArcSwap::from_pointee(None),
            seal_key,
            store,
            clock,
        })
    }

    /// Seals `plaintext` under the key-encryption key, bound to `context`.
    pub fn seal(&self, plaintext: &[u8], context: &str) -> Result<Vec<u8>, ServiceError> {
        Ok(self.seal_key.seal(plaintext, context)?)
    }

    /// Opens what [`Keys::seal`] sealed for the same `context`.
    pub fn unseal(&self, sealed: &[u8], context: &str) -> Result<valet_core::Secret, ServiceError> {
        Ok(self.seal_key.open(sealed, context)?)
    }

    /// Whether the last refresh failed: signing and verifying are refused until one succeeds.
    pub fn untrusted(&self) -> bool {
        self.failure.load().is_some()
    }

    /// The ring to sign and verify with; refused while the store's records cannot be trusted.
    pub fn ring(&self) -> Result<Arc<KeyRing>, ServiceError> {
        match self.failure.load().as_ref() {
            None => Ok(self.ring.load_full()),
            Some(reason) => Err(KeyError::Unavailable {
                reason: reason.clone(),
            }
            .into()),
        }
    }

    /// Re-reads the ring from the store (after a rotation elsewhere, or a sweep). A ring that
    /// cannot be read, or holds a record valetd did not write, stops all signing and verifying
    /// until a later refresh reads a trusted ring again.
    pub async fn refresh(&self) -> Result<(), ServiceError> {
        let opened = match self.store.keys().await {
            Ok(records) => KeyRing::open(&records, &self.seal_key, self.clock.now())
                .map_err(ServiceError::from),
            Err(error) => Err(error.into()),
        };
        match opened {
            Ok(ring) => {
                if self.failure.load().is_some() {
                    tracing::warn!(
                        "the key ring reads as valetd wrote it again; signing and verifying resume"
                    );
                }
                self.ring.store(Arc::new(ring));
                self.failure.store(Arc::new(None));
                Ok(())
            }
            Err(error) => {
                tracing::error!(%error, "THE KEY RING CANNOT BE TRUSTED: valetd refuses to sign or verify tokens until it can read it again");
                self.failure.store(Arc::new(Some(error.to_string())));
                Err(error)
            }
        }
    }

    /// Makes a new key current; the old one verifies for `max_token_lifetime` more.
    /// Returns (new kid, retired kid).
    pub async fn rotate(
        &self,
        max_token_lifetime: std::time::Duration,
    ) -> Result<(KeyId, KeyId), ServiceError> {
        let now = self.clock.now();
        let records = self.store.keys().await?;
        let current = records
            .iter()
            .filter(|record| record.retired_at.is_none())
            .max_by_key(|record| record.created_at)
            .ok_or(KeyError::NoCurrentKey)?;
        let new = StoredKey::seal(&SigningKey::generate()?, &self.seal_key, now)?;
        let retired = current.retired(now, max_token_lifetime, &self.seal_key);
        self.store
            .replace_keys(Some(&current.kid), &[retired, new.clone()])
            .await?;
        self.refresh().await?;
        Ok((
            KeyId::from_record(&new.kid),
            KeyId::from_record(&current.kid),
        ))
    }
}
