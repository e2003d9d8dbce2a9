//! The one compare-and-swap retry loop: decide the next record from the current one, write it only
//! if the stored record is still the current one, and after a concurrent change re-read and decide
//! again. Every transition of a grant or an approval goes through it.

use std::future::Future;
use std::pin::Pin;

use async_trait::async_trait;
use valet_core::approval::ApprovalRequest;
use valet_core::grant::Grant;
use valet_store::{Store, StoreError};

use crate::ServiceError;

/// How many times a decision is retried against concurrent changes before giving up (then the
/// caller is told to retry: `ABORTED`).
pub(crate) const MAX_ATTEMPTS: usize = 16;

/// A record the store changes only by compare-and-swap.
#[async_trait]
pub(crate) trait SwappedRecord: Clone + Send + Sync + 'static {
    fn record_id(&self) -> &str;
    async fn replace(store: &dyn Store, expected: &Self, new: &Self) -> Result<(), StoreError>;
    async fn reload(store: &dyn Store, id: &str) -> Result<Self, ServiceError>;
}

#[async_trait]
impl SwappedRecord for Grant {
    fn record_id(&self) -> &str {
        &self.id
    }

    async fn replace(store: &dyn Store, expected: &Grant, new: &Grant) -> Result<(), StoreError> {
        store.update_grant(expected, new).await
    }

    async fn reload(store: &dyn Store, id: &str) -> Result<Grant, ServiceError> {
        store
            .get_grant(id)
            .await?
            .ok_or_else(|| ServiceError::GrantNotFound { id: id.to_string() })
    }
}

#[async_trait]
impl SwappedRecord for ApprovalRequest {
    fn record_id(&self) -> &str {
        &self.id
    }

    async fn replace(
        store: &dyn Store,
        expected: &ApprovalRequest,
        new: &ApprovalRequest,
    ) -> Result<(), StoreError> {
        store.update_approval(expected, new).await
    }

    async fn reload(store: &dyn Store, id: &str) -> Result<ApprovalRequest, ServiceError> {
        store
            .get_approval(id)
            .await?
            .ok_or_else(|| ServiceError::ApprovalNotFound { id: id.to_string() })
    }
}

/// What a decision asks for.
pub(crate) enum Decision<T, X> {
    /// Write this record in place of the current one; `X` is what the decision produced with it.
    Write(T, X),
    /// Leave the record as it is.
    Keep(X),
}

/// What the loop did.
pub(crate) enum Swapped<T, X> {
    /// `after` replaced the record.
    Written { after: T, extra: X },
    /// The decision was to leave `current` (as last read) alone.
    Kept { current: T, extra: X },
}

/// A decision that needs to await something (minting credentials elsewhere) before it is known.
pub(crate) type Deciding<'s, T, X> =
    Pin<Box<dyn Future<Output = Result<Decision<T, X>, ServiceError>> + Send + 's>>;

/// Applies `decide` to `current` until its result is written or it decides to write nothing;
/// `Err` from `decide` refuses.
pub(crate) async fn compare_and_swap<T, X>(
    store: &dyn Store,
    current: T,
    mut decide: impl FnMut(&T) -> Result<Decision<T, X>, ServiceError> + Send,
) -> Result<Swapped<T, X>, ServiceError>
where
    T: SwappedRecord,
    X: Send,
{
    compare_and_swap_awaiting(store, current, move |current| {
        Box::pin(std::future::ready(decide(&current)))
    })
    .await
}

/// [`compare_and_swap`] for a decision that awaits: `decide` gets its own copy of the record.
pub(crate) async fn compare_and_swap_awaiting<'s, T, X>(
    store: &dyn Store,
    mut current: T,
    mut decide: impl FnMut(T) -> Deciding<'s, T, X> + Send,
) -> Result<Swapped<T, X>, ServiceError>
where
    T: SwappedRecord,
    X: Send,
{
    for _ in 0..MAX_ATTEMPTS {
        let (next, extra) = match decide(current.clone()).await? {
            Decision::Write(next, extra) => (next, extra),
            Decision::Keep(extra) => return Ok(Swapped::Kept { current, extra }),
        };
        match T::replace(store, &current, &next).await {
            Ok(()) => return Ok(Swapped::Written { after: next, extra }),
            Err(StoreError::Conflict { .. }) => {
                current = T::reload(store, current.record_id()).await?;
            }
            Err(error) => return Err(error.into()),
        }
    }
    Err(StoreError::Conflict {
        id: current.record_id().to_string(),
    }
    .into())
}
