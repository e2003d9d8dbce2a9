//! The embedded engine: sled trees for grants, a task index, revocations, keys and metadata.
//! Multi-tree changes are sled transactions; durability comes from the group committer. Work
//! that scans a tree (listings, sweeps) runs on the blocking pool, never on an async worker.
//! After a write fails (a full disk, say) sled refuses everything until it is reopened, so the
//! store fails closed and reopens the database from disk, at most once a second, until that
//! works: once space is freed it serves again without a restart.

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use async_trait::async_trait;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use tokio::sync::broadcast;
use valet_core::UnixTime;
use valet_core::approval::{ApprovalRequest, ApprovalStatus};
use valet_core::audit::ChainHead;
use valet_core::grant::{Grant, GrantStatus};
use valet_core::keyring::StoredKey;

use crate::committer::Committer;
use crate::records::{decode, encode};
use crate::sweep::{GrantRemoval, Sweep};
use crate::{
    GrantFilter, GrantPage, GrantsCheckpoint, Revocation, Store, StoreChange, StoreCounts,
    StoreError, SweepReport,
};

const ENGINE: &str = "sled";
const AUDIT_HEAD_KEY: &[u8] = b"audit_head";
const CURRENT_KEY_KEY: &[u8] = b"current_signing_key";
const GRANTS_CHECKPOINT_KEY: &[u8] = b"grants_checkpoint";
/// One-time markers live in the meta tree under this prefix.
const MARKER_PREFIX: &[u8] = b"once/";

fn marker_key(name: &str) -> Vec<u8> {
    [MARKER_PREFIX, name.as_bytes()].concat()
}

/// How often a broken database is reopened at most.
const REOPEN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// The embedded store, in one directory.
pub struct SledStore {
    directory: PathBuf,
    /// The open database; `None` after a write failed, until it is reopened.
    engine: std::sync::RwLock<Option<Arc<Engine>>>,
    /// The database that failed, until every operation that held it has let it go (sled locks
    /// its files, so a new one opens only after the old one closed), and when reopening was
    /// last tried.
    reopening: std::sync::Mutex<(Weak<Engine>, Option<std::time::Instant>)>,
    /// Named locks: one node holds the store, so a lock in the process is a lock everywhere.
    locks:
        std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>>,
    changes: broadcast::Sender<StoreChange>,
}

/// One open database: its trees and its committer.
struct Engine {
    db: sled::Db,
    trees: Trees,
    committer: Committer,
    changes: broadcast::Sender<StoreChange>,
}

/// The store's trees: cheap to clone (sled's handles are shared), so a scan can take them to the
/// blocking pool.
#[derive(Clone)]
struct Trees {
    grants: sled::Tree,
    task_index: sled::Tree,
    revocations: sled::Tree,
    keys: sled::Tree,
    meta: sled::Tree,
    approvals: sled::Tree,
}

/// Runs scanning work on the blocking pool.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| unavailable(format!("a store scan did not finish: {error}")))?
}

impl SledStore {
    /// Opens (or creates) the store in `directory`.
    pub fn open(directory: &Path) -> Result<SledStore, StoreError> {
        let changes = broadcast::channel(1024).0;
        let engine = Engine::open(directory, changes.clone())?;
        Ok(SledStore {
            directory: directory.to_path_buf(),
            engine: std::sync::RwLock::new(Some(Arc::new(engine))),
            reopening: std::sync::Mutex::new((Weak::new(), None)),
            locks: std::sync::Mutex::new(std::collections::HashMap::new()),
            changes,
        })
    }

    /// The open database, reopening it first if a write failed.
    fn engine(&self) -> Result<Arc<Engine>, StoreError> {
        if let Some(engine) = self
            .engine
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .as_ref()
        {
            return Ok(engine.clone());
        }
        let mut reopening = self
            .reopening
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut slot = self
            .engine
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(engine) = slot.as_ref() {
            return Ok(engine.clone());
        }
        if reopening.0.strong_count() > 0 {
            return Err(unavailable(
                "a write failed and the database is closing to be reopened; try again shortly (fail closed)",
            ));
        }
        if reopening
            .1
            .is_some_and(|last| last.elapsed() < REOPEN_INTERVAL)
        {
            return Err(unavailable(
                "a write failed and reopening the database failed; retrying every second (fail closed; is the disk full?)",
            ));
        }
        reopening.1 = Some(std::time::Instant::now());
        let engine = Arc::new(Engine::open(&self.directory, self.changes.clone())?);
        tracing::warn!(directory = %self.directory.display(), "the store's database was reopened after a write failure; serving again");
        *slot = Some(engine.clone());
        // What was written before the failure was re-read from disk: let followers re-read too.
        let _ = self.changes.send(StoreChange::Resync);
        Ok(engine)
    }

    /// Runs `work` on the open database. An error that means sled can no longer write closes
    /// the database, so the next operation reopens it from disk.
    async fn run<T>(
        &self,
        work: impl AsyncFnOnce(&Engine) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let engine = self.engine()?;
        let outcome = work(&engine).await;
        if let Err(StoreError::Unavailable { detail, .. }) = &outcome
            && is_write_failure(detail)
        {
            let mut slot = self
                .engine
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if slot
                .as_ref()
                .is_some_and(|current| Arc::ptr_eq(current, &engine))
            {
                tracing::error!(%detail, "a store write failed; closing the database to reopen it from disk");
                *slot = None;
                self.reopening
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .0 = Arc::downgrade(&engine);
            }
        }
        outcome
    }
}

/// Whether an error means sled failed to write (and stays failed until reopened).
fn is_write_failure(detail: &str) -> bool {
    detail.contains("IO error") || detail.contains("Io(") || detail.contains("flush failed")
}

impl Engine {
    fn open(
        directory: &Path,
        changes: broadcast::Sender<StoreChange>,
    ) -> Result<Engine, StoreError> {
        let unavailable = |error: &dyn std::fmt::Display| StoreError::Unavailable {
            engine: ENGINE,
            detail: format!("cannot open {}: {error}", directory.display()),
        };
        let db = sled::Config::new()
            .path(directory)
            .open()
            .map_err(|error| unavailable(&error))?;
        let tree = |name: &str| db.open_tree(name).map_err(|error| unavailable(&error));
        Ok(Engine {
            trees: Trees {
                grants: tree("grants")?,
                task_index: tree("task_index")?,
                revocations: tree("revocations")?,
                keys: tree("keys")?,
                meta: tree("meta")?,
                approvals: tree("approvals")?,
            },
            committer: Committer::start(db.clone()).map_err(|error| unavailable(&error))?,
            changes,
            db,
        })
    }

    async fn durable(&self) -> Result<(), StoreError> {
        self.committer
            .durable()
            .await
            .map_err(|detail| StoreError::Unavailable {
                engine: ENGINE,
                detail: format!("flush failed: {detail}"),
            })
    }

    fn publish(&self, change: StoreChange) {
        // No subscriber is not an error: nobody is watching.
        let _ = self.changes.send(change);
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Err(error) = self.db.flush() {
            tracing::error!(%error, "final store flush failed");
        }
    }
}

fn unavailable(error: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable {
        engine: ENGINE,
        detail: error.to_string(),
    }
}

fn task_key(task_id: &str, grant_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(task_id.len() + 1 + grant_id.len());
    key.extend_from_slice(task_id.as_bytes());
    key.push(0);
    key.extend_from_slice(grant_id.as_bytes());
    key
}

fn transaction_error(error: TransactionError<StoreError>) -> StoreError {
    match error {
        TransactionError::Abort(error) => error,
        TransactionError::Storage(error) => unavailable(error),
    }
}

/// The operations, on one open database; [`SledStore`] runs each through [`SledStore::run`].
impl Engine {
    /// Writes a new grant; waits for it to be durable only when `durable`.
    async fn create_grant(&self, grant: &Grant, durable: bool) -> Result<(), StoreError> {
        let record = encode(grant);
        (&self.trees.grants, &self.trees.task_index)
            .transaction(|(grants, task_index)| {
                if grants.get(grant.id.as_bytes())?.is_some() {
                    return Err(ConflictableTransactionError::Abort(
                        StoreError::AlreadyExists {
                            id: grant.id.clone(),
                        },
                    ));
                }
                grants.insert(grant.id.as_bytes(), record.as_slice())?;
                task_index.insert(task_key(&grant.task_id, &grant.id), &[])?;
                Ok(())
            })
            .map_err(transaction_error)?;
        if durable {
            self.durable().await?;
        }
        self.publish(StoreChange::GrantCreated(grant.clone()));
        Ok(())
    }

    async fn get_grant(&self, id: &str) -> Result<Option<Grant>, StoreError> {
        match self.trees.grants.get(id.as_bytes()).map_err(unavailable)? {
            Some(bytes) => Ok(Some(decode("grant", id.as_bytes(), &bytes)?)),
            None => Ok(None),
        }
    }

    async fn update_grant(&self, expected: &Grant, new: &Grant) -> Result<(), StoreError> {
        let expected_record = encode(expected);
        let new_record = encode(new);
        let newly_revoked =
            new.status == GrantStatus::Revoked && expected.status != GrantStatus::Revoked;
        let revocation = encode(&Revocation {
            grant_id: new.id.clone(),
            revoked_at: new.updated_at,
            expires_at: new.expires_at,
        });
        (&self.trees.grants, &self.trees.revocations)
            .transaction(|(grants, revocations)| {
                match grants.get(expected.id.as_bytes())? {
                    None => {
                        return Err(ConflictableTransactionError::Abort(StoreError::NotFound {
                            id: expected.id.clone(),
                        }));
                    }
                    Some(current) if current.as_ref() != expected_record.as_slice() => {
                        return Err(ConflictableTransactionError::Abort(StoreError::Conflict {
                            id: expected.id.clone(),
                        }));
                    }
                    Some(_) => {}
                }
                grants.insert(new.id.as_bytes(), new_record.as_slice())?;
                if newly_revoked {
                    revocations.insert(new.id.as_bytes(), revocation.as_slice())?;
                }
                Ok(())
            })
            .map_err(transaction_error)?;
        self.durable().await?;
        self.publish(if newly_revoked {
            StoreChange::GrantRevoked(new.clone())
        } else {
            StoreChange::GrantUpdated {
                before: Box::new(expected.clone()),
                after: Box::new(new.clone()),
            }
        });
        Ok(())
    }

    async fn list_grants(
        &self,
        filter: &GrantFilter,
        now: UnixTime,
        after: Option<&str>,
        limit: usize,
    ) -> Result<GrantPage, StoreError> {
        let trees = self.trees.clone();
        let filter = filter.clone();
        let after = after.map(str::to_string);
        blocking(move || trees.list_grants(&filter, now, after.as_deref(), limit)).await
    }

    async fn revocations(&self) -> Result<Vec<Revocation>, StoreError> {
        let trees = self.trees.clone();
        blocking(move || {
            trees
                .revocations
                .iter()
                .map(|entry| {
                    let (key, bytes) = entry.map_err(unavailable)?;
                    decode("revocation", &key, &bytes)
                })
                .collect()
        })
        .await
    }

    async fn sweep(
        &self,
        now: UnixTime,
        retention: std::time::Duration,
    ) -> Result<SweepReport, StoreError> {
        let trees = self.trees.clone();
        let (report, n_keys) = blocking(move || trees.sweep(Sweep::new(now, retention))).await?;
        if n_keys > 0 {
            self.publish(StoreChange::KeyRingChanged);
        }
        self.durable().await?;
        Ok(report)
    }

    async fn keys(&self) -> Result<Vec<StoredKey>, StoreError> {
        self.trees.keys()
    }

    async fn replace_keys(
        &self,
        expected_current: Option<&str>,
        records: &[StoredKey],
    ) -> Result<(), StoreError> {
        let new_current = records
            .iter()
            .find(|record| record.retired_at.is_none())
            .map(|record| record.kid.clone());
        (&self.trees.keys, &self.trees.meta)
            .transaction(|(keys, meta)| {
                let current = meta.get(CURRENT_KEY_KEY)?;
                if current.as_deref() != expected_current.map(str::as_bytes) {
                    return Err(ConflictableTransactionError::Abort(
                        StoreError::KeyRingConflict,
                    ));
                }
                for record in records {
                    keys.insert(record.kid.as_bytes(), encode(record))?;
                }
                if let Some(kid) = &new_current {
                    meta.insert(CURRENT_KEY_KEY, kid.as_bytes())?;
                }
                Ok(())
            })
            .map_err(transaction_error)?;
        self.durable().await?;
        self.publish(StoreChange::KeyRingChanged);
        Ok(())
    }

    async fn audit_head(&self) -> Result<Option<ChainHead>, StoreError> {
        match self.trees.meta.get(AUDIT_HEAD_KEY).map_err(unavailable)? {
            Some(bytes) => Ok(Some(decode("audit head", AUDIT_HEAD_KEY, &bytes)?)),
            None => Ok(None),
        }
    }

    async fn record_audit_head(&self, head: &ChainHead) -> Result<(), StoreError> {
        self.trees
            .meta
            .insert(AUDIT_HEAD_KEY, encode(head))
            .map_err(unavailable)?;
        Ok(())
    }

    async fn grants_checkpoint(&self) -> Result<Option<GrantsCheckpoint>, StoreError> {
        match self
            .trees
            .meta
            .get(GRANTS_CHECKPOINT_KEY)
            .map_err(unavailable)?
        {
            Some(bytes) => Ok(Some(decode(
                "grants checkpoint",
                GRANTS_CHECKPOINT_KEY,
                &bytes,
            )?)),
            None => Ok(None),
        }
    }

    async fn checkpoint_grants(
        &self,
        checkpoint: GrantsCheckpoint,
        grants: &[Grant],
    ) -> Result<Vec<String>, StoreError> {
        // On this one engine: check, re-create what it lost, write the checkpoint, and flush, so a
        // reopen in between cannot leave a checkpoint over a grant the disk does not hold.
        let mut created = Vec::new();
        for grant in grants {
            match self.create_grant(grant, false).await {
                Ok(()) => created.push(grant.id.clone()),
                Err(StoreError::AlreadyExists { .. }) => {}
                Err(error) => return Err(error),
            }
        }
        // Written before the flush, so it is durable with (never without) every grant before it.
        self.trees
            .meta
            .insert(GRANTS_CHECKPOINT_KEY, encode(&checkpoint))
            .map_err(unavailable)?;
        self.durable().await?;
        Ok(created)
    }

    async fn counts(&self) -> Result<StoreCounts, StoreError> {
        Ok(StoreCounts {
            n_grants: self.trees.grants.len() as u64,
            n_revocations: self.trees.revocations.len() as u64,
            n_keys: self.trees.keys.len() as u64,
        })
    }

    async fn claim_once_with(
        &self,
        name: &str,
        until: UnixTime,
        payload: &[u8],
    ) -> Result<bool, StoreError> {
        let taken = self
            .trees
            .meta
            .compare_and_swap(
                marker_key(name),
                None as Option<&[u8]>,
                Some([until.to_be_bytes().as_slice(), payload].concat()),
            )
            .map_err(unavailable)?
            .is_ok();
        if taken {
            self.durable().await?;
        }
        Ok(taken)
    }

    async fn claimed(&self, name: &str) -> Result<bool, StoreError> {
        self.trees
            .meta
            .contains_key(marker_key(name))
            .map_err(unavailable)
    }

    async fn claims_under(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut claims = Vec::new();
        for entry in self.trees.meta.scan_prefix(marker_key(prefix)) {
            let (key, bytes) = entry.map_err(unavailable)?;
            let name = String::from_utf8_lossy(&key[MARKER_PREFIX.len()..]).into_owned();
            claims.push((name, bytes.get(8..).unwrap_or_default().to_vec()));
        }
        Ok(claims)
    }

    async fn create_approval(&self, approval: &ApprovalRequest) -> Result<(), StoreError> {
        let inserted = self
            .trees
            .approvals
            .compare_and_swap(
                approval.id.as_bytes(),
                None as Option<&[u8]>,
                Some(encode(approval)),
            )
            .map_err(unavailable)?;
        if inserted.is_err() {
            return Err(StoreError::AlreadyExists {
                id: approval.id.clone(),
            });
        }
        self.durable().await?;
        self.publish(StoreChange::ApprovalChanged(Box::new(approval.clone())));
        Ok(())
    }

    async fn get_approval(&self, id: &str) -> Result<Option<ApprovalRequest>, StoreError> {
        match self
            .trees
            .approvals
            .get(id.as_bytes())
            .map_err(unavailable)?
        {
            Some(bytes) => Ok(Some(decode("approval", id.as_bytes(), &bytes)?)),
            None => Ok(None),
        }
    }

    async fn update_approval(
        &self,
        expected: &ApprovalRequest,
        new: &ApprovalRequest,
    ) -> Result<(), StoreError> {
        let swapped = self
            .trees
            .approvals
            .compare_and_swap(
                expected.id.as_bytes(),
                Some(encode(expected)),
                Some(encode(new)),
            )
            .map_err(unavailable)?;
        match swapped {
            Ok(()) => {}
            Err(error) if error.current.is_none() => {
                return Err(StoreError::ApprovalNotFound {
                    id: expected.id.clone(),
                });
            }
            Err(_) => {
                return Err(StoreError::Conflict {
                    id: expected.id.clone(),
                });
            }
        }
        self.durable().await?;
        self.publish(StoreChange::ApprovalChanged(Box::new(new.clone())));
        Ok(())
    }

    async fn list_approvals(&self, pending_only: bool) -> Result<Vec<ApprovalRequest>, StoreError> {
        let trees = self.trees.clone();
        blocking(move || {
            let mut approvals = Vec::new();
            for entry in trees.approvals.iter() {
                let (key, bytes) = entry.map_err(unavailable)?;
                let approval: ApprovalRequest = decode("approval", &key, &bytes)?;
                if !pending_only || approval.status == ApprovalStatus::Pending {
                    approvals.push(approval);
                }
            }
            crate::sort_approvals(&mut approvals);
            Ok(approvals)
        })
        .await
    }
}

#[async_trait]
impl Store for SledStore {
    async fn create_grant(&self, grant: &Grant) -> Result<(), StoreError> {
        self.run(async |engine| engine.create_grant(grant, true).await)
            .await
    }

    async fn create_grant_deferred(&self, grant: &Grant) -> Result<(), StoreError> {
        self.run(async |engine| engine.create_grant(grant, false).await)
            .await
    }

    fn defers_grants(&self) -> bool {
        true
    }

    async fn grants_checkpoint(&self) -> Result<Option<GrantsCheckpoint>, StoreError> {
        self.run(async |engine| engine.grants_checkpoint().await)
            .await
    }

    async fn checkpoint_grants(
        &self,
        checkpoint: GrantsCheckpoint,
        grants: &[Grant],
    ) -> Result<Vec<String>, StoreError> {
        self.run(async |engine| engine.checkpoint_grants(checkpoint, grants).await)
            .await
    }

    async fn get_grant(&self, id: &str) -> Result<Option<Grant>, StoreError> {
        self.run(async |engine| engine.get_grant(id).await).await
    }

    async fn update_grant(&self, expected: &Grant, new: &Grant) -> Result<(), StoreError> {
        self.run(async |engine| engine.update_grant(expected, new).await)
            .await
    }

    async fn list_grants(
        &self,
        filter: &GrantFilter,
        now: UnixTime,
        after: Option<&str>,
        limit: usize,
    ) -> Result<GrantPage, StoreError> {
        self.run(async |engine| engine.list_grants(filter, now, after, limit).await)
            .await
    }

    async fn revocations(&self) -> Result<Vec<Revocation>, StoreError> {
        self.run(async |engine| engine.revocations().await).await
    }

    async fn sweep(
        &self,
        now: UnixTime,
        retention: std::time::Duration,
    ) -> Result<SweepReport, StoreError> {
        self.run(async |engine| engine.sweep(now, retention).await)
            .await
    }

    async fn keys(&self) -> Result<Vec<StoredKey>, StoreError> {
        self.run(async |engine| engine.keys().await).await
    }

    async fn replace_keys(
        &self,
        expected_current: Option<&str>,
        records: &[StoredKey],
    ) -> Result<(), StoreError> {
        self.run(async |engine| engine.replace_keys(expected_current, records).await)
            .await
    }

    async fn audit_head(&self) -> Result<Option<ChainHead>, StoreError> {
        self.run(async |engine| engine.audit_head().await).await
    }

    async fn record_audit_head(&self, head: &ChainHead) -> Result<(), StoreError> {
        self.run(async |engine| engine.record_audit_head(head).await)
            .await
    }

    async fn counts(&self) -> Result<StoreCounts, StoreError> {
        self.run(async |engine| engine.counts().await).await
    }

    async fn create_approval(&self, approval: &ApprovalRequest) -> Result<(), StoreError> {
        self.run(async |engine| engine.create_approval(approval).await)
            .await
    }

    async fn claim_once_with(
        &self,
        name: &str,
        until: UnixTime,
        payload: &[u8],
    ) -> Result<bool, StoreError> {
        self.run(async |engine| engine.claim_once_with(name, until, payload).await)
            .await
    }

    async fn claimed(&self, name: &str) -> Result<bool, StoreError> {
        self.run(async |engine| engine.claimed(name).await).await
    }

    async fn claims_under(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.run(async |engine| engine.claims_under(prefix).await)
            .await
    }

    async fn get_approval(&self, id: &str) -> Result<Option<ApprovalRequest>, StoreError> {
        self.run(async |engine| engine.get_approval(id).await).await
    }

    async fn update_approval(
        &self,
        expected: &ApprovalRequest,
        new: &ApprovalRequest,
    ) -> Result<(), StoreError> {
        self.run(async |engine| engine.update_approval(expected, new).await)
            .await
    }

    async fn list_approvals(&self, pending_only: bool) -> Result<Vec<ApprovalRequest>, StoreError> {
        self.run(async |engine| engine.list_approvals(pending_only).await)
            .await
    }

    fn subscribe(&self) -> broadcast::Receiver<StoreChange> {
        self.changes.subscribe()
    }

    async fn lock(&self, name: &str) -> Result<crate::StoreLock, StoreError> {
        let lock = self
            .locks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry(name.to_string())
            .or_default()
            .clone();
        match tokio::time::timeout(crate::LOCK_WAIT, lock.lock_owned()).await {
            Ok(guard) => Ok(crate::StoreLock::local(guard)),
            Err(_) => Err(unavailable(format!(
                "lock {name} was held longer than {} s",
                crate::LOCK_WAIT.as_secs()
            ))),
        }
    }
}

impl Trees {
    fn list_grants(
        &self,
        filter: &GrantFilter,
        now: UnixTime,
        after: Option<&str>,
        limit: usize,
    ) -> Result<GrantPage, StoreError> {
        let limit = limit.max(1);
        let mut page = GrantPage::default();
        let push = |grant: Grant, page: &mut GrantPage| page.offer(grant, filter, now, limit);
        if let Some(task_id) = &filter.task_id {
            let prefix = task_key(task_id, "");
            for entry in self.task_index.scan_prefix(&prefix) {
                let (key, _) = entry.map_err(unavailable)?;
                let grant_id = &key[prefix.len()..];
                if after.is_some_and(|after| grant_id <= after.as_bytes()) {
                    continue;
                }
                let Some(bytes) = self.grants.get(grant_id).map_err(unavailable)? else {
                    continue;
                };
                if !push(decode("grant", grant_id, &bytes)?, &mut page) {
                    break;
                }
            }
        } else {
            let start = match after {
                Some(after) => Bound::Excluded(after.as_bytes().to_vec()),
                None => Bound::Unbounded,
            };
            for entry in self.grants.range::<Vec<u8>, _>((start, Bound::Unbounded)) {
                let (key, bytes) = entry.map_err(unavailable)?;
                if !push(decode("grant", &key, &bytes)?, &mut page) {
                    break;
                }
            }
        }
        Ok(page)
    }

    fn keys(&self) -> Result<Vec<StoredKey>, StoreError> {
        self.keys
            .iter()
            .map(|entry| {
                let (key, bytes) = entry.map_err(unavailable)?;
                decode("signing key", &key, &bytes)
            })
            .collect()
    }

    /// One sweep pass; returns the report and how many keys went (the key ring changed).
    fn sweep(&self, mut sweep: Sweep) -> Result<(SweepReport, u64), StoreError> {
        for entry in self.grants.iter() {
            let (key, bytes) = entry.map_err(unavailable)?;
            let grant: Grant = decode("grant", &key, &bytes)?;
            if !sweep.grant_may_go(&grant) {
                continue;
            }
            let removal = (&self.grants, &self.task_index, &self.revocations)
                .transaction(|(grants, task_index, revocations)| {
                    // Only delete the record we judged: a concurrent change makes us skip it.
                    if grants.get(&key)?.as_deref() != Some(bytes.as_ref()) {
                        return Ok(GrantRemoval::Skipped);
                    }
                    grants.remove(&key)?;
                    task_index.remove(task_key(&grant.task_id, &grant.id))?;
                    Ok(GrantRemoval::Removed {
                        had_revocation: revocations.remove(&key)?.is_some(),
                    })
                })
                .map_err(transaction_error)?;
            sweep.grant_removal(removal);
        }
        for entry in self.revocations.iter() {
            let (key, bytes) = entry.map_err(unavailable)?;
            let revocation: Revocation = decode("revocation", &key, &bytes)?;
            let grant_exists = self.grants.contains_key(&key).map_err(unavailable)?;
            if sweep.revocation_may_go(&revocation, grant_exists) {
                self.revocations.remove(&key).map_err(unavailable)?;
                sweep.revocation_removed();
            }
        }
        for entry in self.approvals.iter() {
            let (key, bytes) = entry.map_err(unavailable)?;
            let approval: ApprovalRequest = decode("approval", &key, &bytes)?;
            if sweep.approval_may_go(&approval) {
                let _ = self
                    .approvals
                    .compare_and_swap(&key, Some(bytes), None as Option<&[u8]>)
                    .map_err(unavailable)?;
            }
        }
        for entry in self.meta.scan_prefix(MARKER_PREFIX) {
            let (key, bytes) = entry.map_err(unavailable)?;
            let until = bytes
                .get(..8)
                .and_then(|head| <[u8; 8]>::try_from(head).ok())
                .map(UnixTime::from_be_bytes)
                .unwrap_or(0);
            if sweep.marker_may_go(until) {
                let _ = self
                    .meta
                    .compare_and_swap(&key, Some(bytes), None as Option<&[u8]>)
                    .map_err(unavailable)?;
            }
        }
        let mut n_keys = 0;
        for record in self.keys()? {
            if sweep.key_may_go(&record) {
                self.keys
                    .remove(record.kid.as_bytes())
                    .map_err(unavailable)?;
                sweep.key_removed();
                n_keys += 1;
            }
        }
        Ok((sweep.report(), n_keys))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (tempfile::TempDir, SledStore) {
        let directory = tempfile::tempdir().unwrap();
        let store = SledStore::open(directory.path()).unwrap();
        (directory, store)
    }

    async fn opened() -> (tempfile::TempDir, Box<dyn Store>) {
        let (directory, store) = store().await;
        (directory, Box::new(store))
    }

    mod conformance {
        crate::conformance_tests!(super::opened);
    }

    #[tokio::test]
    async fn a_sweep_counts_only_what_it_removed() {
        let (_directory, store) = store().await;
        let ended = crate::conformance::grant("g-ended", "task", 1_000);
        let revoked = ended.revoked("ops", "done", 1_001).unwrap();
        store.create_grant(&ended).await.unwrap();
        store.update_grant(&ended, &revoked).await.unwrap();
        let report = store
            .sweep(1_000_000, std::time::Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!((report.n_grants, report.n_revocations), (1, 1));
        let again = store
            .sweep(1_000_000, std::time::Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(again, SweepReport::default());
    }

    #[tokio::test]
    async fn state_survives_reopening() {
        let directory = tempfile::tempdir().unwrap();
        let grant = crate::conformance::grant("g-reopen", "task", 1_000);
        {
            let store = SledStore::open(directory.path()).unwrap();
            store.create_grant(&grant).await.unwrap();
            let revoked = grant.revoked("ops", "test", 1_001).unwrap();
            store.update_grant(&grant, &revoked).await.unwrap();
            store
                .record_audit_head(&ChainHead {
                    sequence: 7,
                    hash: "ab".repeat(32),
                })
                .await
                .unwrap();
            store
                .sweep(1_001, std::time::Duration::from_secs(60))
                .await
                .unwrap();
        }
        let store = SledStore::open(directory.path()).unwrap();
        let reopened = store.get_grant("g-reopen").await.unwrap().unwrap();
        assert_eq!(reopened.status, GrantStatus::Revoked);
        assert_eq!(store.revocations().await.unwrap().len(), 1);
        assert_eq!(store.audit_head().await.unwrap().unwrap().sequence, 7);
    }

    #[tokio::test]
    async fn an_unwritable_directory_is_a_clear_error() {
        let directory = tempfile::tempdir().unwrap();
        let file = directory.path().join("not-a-directory");
        std::fs::write(&file, b"x").unwrap();
        let error = SledStore::open(&file.join("data")).err().unwrap();
        assert!(error.to_string().contains("cannot open"), "{error}");
    }
}
