//! The store as the service sees it: every grant and approval record carries a MAC under a key
//! derived from the key-encryption key — set on every write, checked on every read — so a record
//! planted or altered by someone with write access to the store (etcd, the data dir) but not the
//! key is refused rather than trusted. Signing-key records carry their own MAC (valet-core's key
//! ring checks it); everything else passes through to the engine.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::broadcast;
use valet_core::UnixTime;
use valet_core::approval::{ApprovalKey, ApprovalRequest};
use valet_core::audit::ChainHead;
use valet_core::grant::{Grant, GrantKey};
use valet_core::keyring::StoredKey;
use valet_store::{
    GrantFilter, GrantPage, Revocation, Store, StoreChange, StoreCounts, StoreError, StoreLock,
    SweepReport,
};

pub(crate) struct AuthenticatedStore {
    inner: Arc<dyn Store>,
    key: GrantKey,
    approval_key: ApprovalKey,
}

impl AuthenticatedStore {
    pub(crate) fn new(
        inner: Arc<dyn Store>,
        key: GrantKey,
        approval_key: ApprovalKey,
    ) -> AuthenticatedStore {
        AuthenticatedStore {
            inner,
            key,
            approval_key,
        }
    }

    /// `approval` if it carries valetd's MAC; refused (and said loudly) otherwise.
    fn checked_approval(&self, approval: ApprovalRequest) -> Result<ApprovalRequest, StoreError> {
        if self.approval_key.verifies(&approval) {
            return Ok(approval);
        }
        tracing::error!(
            approval_id = approval.id,
            "AN APPROVAL RECORD IN THE STORE DOES NOT CARRY VALETD'S MAC: it was written or altered by someone without the key-encryption key; it is refused"
        );
        Err(StoreError::Corrupt {
            what: "approval",
            key: approval.id,
            detail: "its MAC does not check: it was written or altered by someone without valetd's key-encryption key, and is refused".into(),
        })
    }

    /// `grant` if it carries valetd's MAC; refused (and said loudly) otherwise.
    fn checked(&self, grant: Grant) -> Result<Grant, StoreError> {
        if self.key.verifies(&grant) {
            return Ok(grant);
        }
        tracing::error!(
            grant_id = grant.id,
            "A GRANT RECORD IN THE STORE DOES NOT CARRY VALETD'S MAC: it was written or altered by someone without the key-encryption key; it is refused"
        );
        Err(StoreError::Corrupt {
            what: "grant",
            key: grant.id,
            detail: "its MAC does not check: it was written or altered by someone without valetd's key-encryption key, and is refused".into(),
        })
    }
}

#[async_trait]
impl Store for AuthenticatedStore {
    async fn create_grant(&self, grant: &Grant) -> Result<(), StoreError> {
        self.inner.create_grant(&self.key.sealed(grant)).await
    }

    async fn create_grant_deferred(&self, grant: &Grant) -> Result<(), StoreError> {
        self.inner
            .create_grant_deferred(&self.key.sealed(grant))
            .await
    }

    fn defers_grants(&self) -> bool {
        self.inner.defers_grants()
    }

    // Not MAC'd, and need not be: a checkpoint moved back only makes start re-read (and re-check
    // the MACs of) more audit records; moved forward, grants issued after it are not restored
    // after a crash, and their tokens are refused — fail closed, never a token that should not be.
    async fn grants_checkpoint(&self) -> Result<Option<valet_store::GrantsCheckpoint>, StoreError> {
        self.inner.grants_checkpoint().await
    }

    async fn checkpoint_grants(
        &self,
        checkpoint: valet_store::GrantsCheckpoint,
        grants: &[Grant],
    ) -> Result<Vec<String>, StoreError> {
        let sealed: Vec<Grant> = grants.iter().map(|grant| self.key.sealed(grant)).collect();
        self.inner.checkpoint_grants(checkpoint, &sealed).await
    }

    async fn get_grant(&self, id: &str) -> Result<Option<Grant>, StoreError> {
        match self.inner.get_grant(id).await? {
            Some(grant) => self.checked(grant).map(Some),
            None => Ok(None),
        }
    }

    async fn update_grant(&self, expected: &Grant, new: &Grant) -> Result<(), StoreError> {
        // The MAC is a function of the fields: the expected record, sealed, is byte for byte
        // what the store holds when nothing changed it.
        self.inner
            .update_grant(&self.key.sealed(expected), &self.key.sealed(new))
            .await
    }

    async fn list_grants(
        &self,
        filter: &GrantFilter,
        now: UnixTime,
        after: Option<&str>,
        limit: usize,
    ) -> Result<GrantPage, StoreError> {
        let mut page = self.inner.list_grants(filter, now, after, limit).await?;
        // A forged record is left out of listings (and said loudly); reading it directly fails.
        page.grants
            .retain(|grant| self.checked(grant.clone()).is_ok());
        Ok(page)
    }

    async fn revocations(&self) -> Result<Vec<Revocation>, StoreError> {
        self.inner.revocations().await
    }

    async fn sweep(
        &self,
        now: UnixTime,
        retention: std::time::Duration,
    ) -> Result<SweepReport, StoreError> {
        self.inner.sweep(now, retention).await
    }

    async fn keys(&self) -> Result<Vec<StoredKey>, StoreError> {
        self.inner.keys().await
    }

    async fn replace_keys(
        &self,
        expected_current: Option<&str>,
        records: &[StoredKey],
    ) -> Result<(), StoreError> {
        self.inner.replace_keys(expected_current, records).await
    }

    async fn audit_head(&self) -> Result<Option<ChainHead>, StoreError> {
        self.inner.audit_head().await
    }

    async fn record_audit_head(&self, head: &ChainHead) -> Result<(), StoreError> {
        self.inner.record_audit_head(head).await
    }

    async fn counts(&self) -> Result<StoreCounts, StoreError> {
        self.inner.counts().await
    }

    // A marker carries no MAC: planting one can only refuse a console link or end a session
    // (fail closed); removing one needs the link itself, which is MAC'd and expires in a minute.
    // Payloads pass as they are: the console opens each session's sealed pass, MAC and all.
    async fn claim_once_with(
        &self,
        name: &str,
        until: UnixTime,
        payload: &[u8],
    ) -> Result<bool, StoreError> {
        self.inner.claim_once_with(name, until, payload).await
    }

    async fn claimed(&self, name: &str) -> Result<bool, StoreError> {
        self.inner.claimed(name).await
    }

    async fn claims_under(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.inner.claims_under(prefix).await
    }

    async fn create_approval(&self, approval: &ApprovalRequest) -> Result<(), StoreError> {
        self.inner
            .create_approval(&self.approval_key.sealed(approval))
            .await
    }

    async fn get_approval(&self, id: &str) -> Result<Option<ApprovalRequest>, StoreError> {
        match self.inner.get_approval(id).await? {
            Some(approval) => self.checked_approval(approval).map(Some),
            None => Ok(None),
        }
    }

    async fn update_approval(
        &self,
        expected: &ApprovalRequest,
        new: &ApprovalRequest,
    ) -> Result<(), StoreError> {
        self.inner
            .update_approval(
                &self.approval_key.sealed(expected),
                &self.approval_key.sealed(new),
            )
            .await
    }

    async fn list_approvals(&self, pending_only: bool) -> Result<Vec<ApprovalRequest>, StoreError> {
        let mut approvals = self.inner.list_approvals(pending_only).await?;
        approvals.retain(|approval| self.checked_approval(approval.clone()).is_ok());
        Ok(approvals)
    }

    /// Changes as the engine saw them: followers that act on a grant read it again through
    /// [`Store::get_grant`], which checks it.
    fn subscribe(&self) -> broadcast::Receiver<StoreChange> {
        self.inner.subscribe()
    }

    async fn lock(&self, name: &str) -> Result<StoreLock, StoreError> {
        self.inner.lock(name).await
    }
}
