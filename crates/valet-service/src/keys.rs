//! The key ring's life in valetd: created on first start, opened on every start, rotated on
//! request, refreshed when the store says it changed. Readers see it through one atomic pointer.

use std::sync::Arc;

use arc_swap::ArcSwap;
use valet_core::keyring::{KeyError, KeyRing, SealKey, SigningKey, StoredKey};
use valet_core::{Clock, KeyId};
use valet_store::{Store, StoreError};

use crate::error::ServiceError;

/// The live key ring and what it takes to change it.
pub struct Keys {
    ring: ArcSwap<KeyRing>,
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
            seal_key,
            store,
            clock,
        })
    }

    pub fn ring(&self) -> Arc<KeyRing> {
        self.ring.load_full()
    }

    /// Re-reads the ring from the store (after a rotation elsewhere, or a sweep).
    pub async fn refresh(&self) -> Result<(), ServiceError> {
        let ring = KeyRing::open(&self.store.keys().await?, &self.seal_key, self.clock.now())?;
        self.ring.store(Arc::new(ring));
        Ok(())
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
        let retired = current.retired(now, max_token_lifetime);
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
