//! Durable state behind one trait: grants (create-if-absent, compare-and-swap transitions, listing,
//! sweeping), revocations, sealed signing keys and the audit chain head. Every engine gives the
//! same semantics, checked by one conformance suite; the embedded engine is sled.

mod committer;
#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
mod etcd_store;
mod records;
mod sled_store;
mod sweep;

use async_trait::async_trait;
use tokio::sync::broadcast;
use valet_core::UnixTime;
use valet_core::approval::ApprovalRequest;
use valet_core::audit::ChainHead;
use valet_core::grant::{Grant, GrantStatus};
use valet_core::keyring::StoredKey;

pub use etcd_store::{EtcdOptions, EtcdStore};
pub use sled_store::SledStore;

/// What can go wrong in a store. `Unavailable` means "fail closed": nothing was done durably.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the {engine} store cannot be used: {detail}")]
    Unavailable {
        engine: &'static str,
        detail: String,
    },
    #[error("grant {id} already exists")]
    AlreadyExists { id: String },
    #[error("grant {id} changed while this request was deciding; retry the request")]
    Conflict { id: String },
    #[error("grant {id} does not exist")]
    NotFound { id: String },
    #[error("a stored {what} record ({key}) cannot be read: {detail}")]
    Corrupt {
        what: &'static str,
        key: String,
        detail: String,
    },
    #[error("approval {id} does not exist")]
    ApprovalNotFound { id: String },
    #[error("the signing key ring changed while this rotation was deciding; retry the rotation")]
    KeyRingConflict,
    #[error(
        "replica name {replica:?} is held by another live valetd ({holder}); give each replica its own name ([store] replica, valetd --replica, or VALET_REPLICA: in Kubernetes, the pod's name)"
    )]
    ReplicaTaken { replica: String, holder: String },
}

/// Which grants to list. Empty fields match everything.
#[derive(Debug, Clone, Default)]
pub struct GrantFilter {
    pub principal: Option<String>,
    pub task_id: Option<String>,
    pub scope: Option<String>,
    pub environment: Option<String>,
    /// Matched against the status at `now` (so `expired` finds active grants past their expiry).
    pub status: Option<GrantStatus>,
}

impl GrantFilter {
    pub fn matches(&self, grant: &Grant, now: UnixTime) -> bool {
        fn field(wanted: &Option<String>, actual: &str) -> bool {
            wanted.as_deref().is_none_or(|wanted| wanted == actual)
        }
        field(&self.principal, &grant.principal)
            && field(&self.task_id, &grant.task_id)
            && field(&self.scope, &grant.scope)
            && field(&self.environment, &grant.environment)
            && self
                .status
                .is_none_or(|status| grant.status_at(now) == status)
    }
}

/// One page of grants, oldest first; `next_after` continues the listing.
#[derive(Debug, Clone, Default)]
pub struct GrantPage {
    pub grants: Vec<Grant>,
    pub next_after: Option<String>,
}

impl GrantPage {
    /// Adds `grant` when it matches `filter`; returns false once the page already holds `limit`
    /// grants (and then says where the next page starts), so the caller stops reading.
    pub fn offer(
        &mut self,
        grant: Grant,
        filter: &GrantFilter,
        now: UnixTime,
        limit: usize,
    ) -> bool {
        if !filter.matches(&grant, now) {
            return true;
        }
        if self.grants.len() == limit {
            self.next_after = self.grants.last().map(|last| last.id.clone());
            return false;
        }
        self.grants.push(grant);
        true
    }
}

/// A durable revocation: in force until the revoked token would have expired anyway.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Revocation {
    pub grant_id: String,
    pub revoked_at: UnixTime,
    pub expires_at: UnixTime,
}

/// How far the store has caught up with the audit log, for engines that defer grants (see
/// [`Store::create_grant_deferred`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GrantsCheckpoint {
    /// Every grant whose issue record is at or before this audit sequence is durable in the store.
    pub sequence: u64,
    /// Recorded by a valetd as it stopped: nothing was issued after it.
    pub at_stop: bool,
}

/// A change every valetd replica may follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreChange {
    GrantCreated(Grant),
    GrantUpdated {
        before: Box<Grant>,
        after: Box<Grant>,
    },
    GrantRevoked(Grant),
    KeyRingChanged,
    ApprovalChanged(Box<ApprovalRequest>),
    /// Changes may have been missed (a distributed engine lost its watch and resumed): whoever
    /// keeps a view of the store must reload it rather than trust it.
    Resync,
}

/// What one sweep removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub n_grants: u64,
    pub n_revocations: u64,
    pub n_keys: u64,
}

/// How many records the store holds, for operators and the churn benchmark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreCounts {
    pub n_grants: u64,
    pub n_revocations: u64,
    pub n_keys: u64,
}

/// Durable state. Every write is durable when its future completes, unless a method says otherwise.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Stores a new grant; fails with `AlreadyExists` if the id is taken.
    async fn create_grant(&self, grant: &Grant) -> Result<(), StoreError>;

    /// Stores a new grant like [`Store::create_grant`], but returns before it is durable when
    /// the engine can: it becomes durable with the next durable write, at the latest with
    /// [`Store::checkpoint_grants`]. Only for a caller that has made the grant durable
    /// elsewhere by the time it relies on it (valetd: the grant's audit record, from which start
    /// restores every grant issued after the last checkpoint). Engines whose writes are all
    /// durable anyway (etcd) create it as `create_grant` does.
    async fn create_grant_deferred(&self, grant: &Grant) -> Result<(), StoreError> {
        self.create_grant(grant).await
    }

    /// Whether [`Store::create_grant_deferred`] may return before the grant is durable.
    fn defers_grants(&self) -> bool {
        false
    }

    /// The audit record up to which every deferred grant is durably in the store, as the last
    /// [`Store::checkpoint_grants`] left it; `None` when none was ever recorded.
    async fn grants_checkpoint(&self) -> Result<Option<GrantsCheckpoint>, StoreError> {
        Ok(None)
    }

    /// Makes `grants` durable, together with every write so far, and records `checkpoint`. A grant the store no longer holds (the engine lost writes that were not
    /// yet durable: a crash, or a reopen after a failed write) is created again from the record
    /// given; one the store holds is left as it is (it may have changed since). Returns the ids
    /// of the grants created again. The caller promises that every grant whose audit record is
    /// at or before `checkpoint.sequence` was written before this call or is in `grants`.
    async fn checkpoint_grants(
        &self,
        checkpoint: GrantsCheckpoint,
        grants: &[Grant],
    ) -> Result<Vec<String>, StoreError> {
        let _ = (checkpoint, grants);
        Ok(Vec::new())
    }

    async fn get_grant(&self, id: &str) -> Result<Option<Grant>, StoreError>;

    /// Replaces `expected` with `new` only if the stored record still equals `expected`.
    /// A transition to `revoked` also records the revocation, in the same atomic write.
    async fn update_grant(&self, expected: &Grant, new: &Grant) -> Result<(), StoreError>;

    /// Grants matching `filter` at `now`, in id (issue) order, starting after `after`.
    async fn list_grants(
        &self,
        filter: &GrantFilter,
        now: UnixTime,
        after: Option<&str>,
        limit: usize,
    ) -> Result<GrantPage, StoreError>;

    /// Every grant of one task, whoever holds it.
    async fn task_grants(&self, task_id: &str) -> Result<Vec<Grant>, StoreError> {
        let filter = GrantFilter {
            task_id: Some(task_id.to_string()),
            ..GrantFilter::default()
        };
        Ok(self.list_grants(&filter, 0, None, usize::MAX).await?.grants)
    }

    /// Every revocation still in force.
    async fn revocations(&self) -> Result<Vec<Revocation>, StoreError>;

    /// Deletes grants that `Grant::sweepable` says may go, their revocations, and public keys
    /// past their verification window.
    async fn sweep(
        &self,
        now: UnixTime,
        retention: std::time::Duration,
    ) -> Result<SweepReport, StoreError>;

    /// The stored signing keys.
    async fn keys(&self) -> Result<Vec<StoredKey>, StoreError>;

    /// Writes key records atomically, only if the current (unretired) key is still
    /// `expected_current` (`None`: there is no key yet). Rotation and first start both use it.
    async fn replace_keys(
        &self,
        expected_current: Option<&str>,
        records: &[StoredKey],
    ) -> Result<(), StoreError>;

    /// The audit chain head last recorded.
    async fn audit_head(&self) -> Result<Option<ChainHead>, StoreError>;

    /// Records the audit chain head. Durable with the next durable write, not necessarily on return:
    /// the audit file itself is synced before any answer, and the head only guards its tail.
    async fn record_audit_head(&self, head: &ChainHead) -> Result<(), StoreError>;

    async fn counts(&self) -> Result<StoreCounts, StoreError>;

    /// Stores a new approval request; fails with `AlreadyExists` if the id is taken.
    async fn create_approval(&self, approval: &ApprovalRequest) -> Result<(), StoreError>;

    async fn get_approval(&self, id: &str) -> Result<Option<ApprovalRequest>, StoreError>;

    /// Replaces `expected` with `new` only if the stored record still equals `expected`.
    async fn update_approval(
        &self,
        expected: &ApprovalRequest,
        new: &ApprovalRequest,
    ) -> Result<(), StoreError>;

    /// Approval requests, oldest first; only undecided ones when `pending_only`.
    async fn list_approvals(&self, pending_only: bool) -> Result<Vec<ApprovalRequest>, StoreError>;

    /// Marks `name` (such as `console-link/ID`) as taken until `until`, across every valetd
    /// sharing this store; true when this call took it, false when it was already taken. Durable
    /// on return. Markers are swept after `until`, so `until` must outlast what they guard.
    async fn claim_once(&self, name: &str, until: UnixTime) -> Result<bool, StoreError> {
        self.claim_once_with(name, until, &[]).await
    }

    /// [`Store::claim_once`], with `payload` kept with the marker (a console session's sealed
    /// pass, so operators can list the sessions open). The payload is stored as given: a caller
    /// that trusts it later authenticates it itself.
    async fn claim_once_with(
        &self,
        name: &str,
        until: UnixTime,
        payload: &[u8],
    ) -> Result<bool, StoreError>;

    /// Whether `name` is taken (see [`Store::claim_once`]).
    async fn claimed(&self, name: &str) -> Result<bool, StoreError>;

    /// Every marker whose name starts with `prefix` and has not been swept, with its payload,
    /// in name order.
    async fn claims_under(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    /// Changes made through this store from now on.
    fn subscribe(&self) -> broadcast::Receiver<StoreChange>;

    /// Takes the lock `name` across every valetd sharing this store (waiting up to
    /// [`LOCK_WAIT`]); held until the returned guard is released or dropped, or its holder dies.
    async fn lock(&self, name: &str) -> Result<StoreLock, StoreError>;
}

/// How long [`Store::lock`] waits for another holder before giving up.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// A held lock; released when dropped.
pub struct StoreLock {
    /// An in-process hold (the embedded engine: one node).
    local: Option<tokio::sync::OwnedMutexGuard<()>>,
    /// How to let go of a hold elsewhere (etcd), run when the guard is dropped.
    remote: Option<Box<dyn FnOnce() + Send>>,
}

impl StoreLock {
    pub(crate) fn local(guard: tokio::sync::OwnedMutexGuard<()>) -> StoreLock {
        StoreLock {
            local: Some(guard),
            remote: None,
        }
    }

    pub(crate) fn remote(release: Box<dyn FnOnce() + Send>) -> StoreLock {
        StoreLock {
            local: None,
            remote: Some(release),
        }
    }
}

impl Drop for StoreLock {
    fn drop(&mut self) {
        self.local.take();
        if let Some(release) = self.remote.take() {
            release();
        }
    }
}

/// Approval requests in the order every engine lists them: oldest first.
pub(crate) fn sort_approvals(approvals: &mut [ApprovalRequest]) {
    approvals
        .sort_by(|left, right| (left.created_at, &left.id).cmp(&(right.created_at, &right.id)));
}
