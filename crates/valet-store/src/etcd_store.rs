//! The distributed engine: etcd v3, shared by every valetd replica. Records are JSON values under
//! one key prefix; every status change is a transaction that compares the stored value, so two
//! replicas never both win; grants carry leases that outlive their retention, so records that are
//! never swept still disappear; one watch of the prefix feeds every replica's change stream.
//!
//! Keys under `PREFIX`:
//!
//! | key | value |
//! | --- | --- |
//! | `/grants/ID` | grant |
//! | `/tasks/TASK\0ID` | empty: the task index |
//! | `/revocations/ID` | revocation |
//! | `/keys/KID` | sealed signing key |
//! | `/meta/current_key` | the current key's id |
//! | `/approvals/ID` | approval request |
//! | `/replicas/REPLICA/audit_head` | that replica's audit chain head |

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    LockOptions, PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use tokio::sync::{broadcast, watch};
use valet_core::approval::{ApprovalRequest, ApprovalStatus};
use valet_core::audit::ChainHead;
use valet_core::grant::{Grant, GrantStatus};
use valet_core::keyring::StoredKey;
use valet_core::{Secret, UnixTime};

use crate::records::{decode, encode};
use crate::sweep::{GrantRemoval, Sweep};
use crate::{
    GrantFilter, GrantPage, Revocation, Store, StoreChange, StoreCounts, StoreError, SweepReport,
};

const ENGINE: &str = "etcd";
/// How long one etcd request may take before the store fails closed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a write waits for the watch to deliver it to this replica's subscribers.
const WATCH_CATCH_UP: Duration = Duration::from_secs(2);
/// One attempt against one member; a request retries on another within `REQUEST_TIMEOUT`.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(1000);
/// Between attempts after a transient failure.
const RETRY_PAUSE: Duration = Duration::from_millis(25);
/// Leases are shared by records whose lifetimes end within the same minute.
const LEASE_BUCKET_SECONDS: i64 = 60;
const PAGE: i64 = 500;

/// Where the etcd cluster is and how to talk to it.
#[derive(Clone)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    /// Namespaces one Valet deployment in a shared etcd, such as `/valet/prod`.
    pub prefix: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// This replica's name: its audit chain head is kept under it.
    pub replica: String,
    /// How long ended grants stay listable; grant leases last at least this long past the end.
    pub retention: Duration,
    /// For `https://` endpoints: the CA's PEM file, and a client certificate and key if the
    /// cluster asks for one.
    pub ca_file: Option<std::path::PathBuf>,
    pub client_certificate: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// How long a lock outlives a holder that died without letting go (a live holder keeps it
    /// for as long as it holds it). [`EtcdOptions::DEFAULT_LOCK_LEASE`] unless a test needs less.
    pub lock_lease: Duration,
}

impl EtcdOptions {
    /// The default of [`EtcdOptions::lock_lease`].
    pub const DEFAULT_LOCK_LEASE: Duration = Duration::from_secs(15);
}

/// The etcd engine.
pub struct EtcdStore {
    client: Client,
    prefix: String,
    replica: String,
    retention: Duration,
    changes: broadcast::Sender<StoreChange>,
    /// The newest revision the watch has delivered.
    seen: watch::Receiver<i64>,
    leases: Mutex<HashMap<i64, (i64, Instant)>>,
    lock_lease: Duration,
    /// Keeps this replica's claim on its name alive.
    claim: tokio::task::JoinHandle<()>,
    watcher: tokio::task::JoinHandle<()>,
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        self.watcher.abort();
        self.claim.abort();
    }
}

/// How long a replica's claim on its name outlives the replica: a restarted replica waits at most
/// this long for its old claim to lapse.
const CLAIM_TTL_SECONDS: i64 = 10;

/// Claims this replica's name with a lease only a live replica keeps alive: a second live valetd
/// with the same name (two replicas left with the default host name, say) refuses to start, so
/// two writers never share one audit chain head. Waits out a claim a dead replica left behind.
async fn claim_replica(
    client: &Client,
    prefix: &str,
    replica: &str,
) -> Result<tokio::task::JoinHandle<()>, StoreError> {
    let key = format!("{prefix}/replicas/{replica}/claim");
    let holder = format!(
        "pid {} on {}",
        std::process::id(),
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|name| name.trim().to_string())
            .unwrap_or_default()
    );
    let deadline = Instant::now() + Duration::from_secs(CLAIM_TTL_SECONDS as u64 + 3);
    let lease = loop {
        let mut leases = client.lease_client();
        let lease = bounded(leases.grant(CLAIM_TTL_SECONDS, None)).await?.id();
        let claim = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                holder.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        if bounded(client.kv_client().txn(claim)).await?.succeeded() {
            break lease;
        }
        let _ = leases.revoke(lease).await;
        if Instant::now() >= deadline {
            let current = bounded(client.kv_client().get(key.clone(), None)).await?;
            let holder = current
                .kvs()
                .first()
                .and_then(|kv| kv.value_str().ok())
                .unwrap_or("holder unknown")
                .to_string();
            return Err(StoreError::ReplicaTaken {
                replica: replica.to_string(),
                holder,
            });
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let replica = replica.to_string();
    Ok(keep_lease_alive(
        client.clone(),
        lease,
        Duration::from_secs(3),
        move || {
            tracing::error!(
                replica,
                "this replica's claim on its name lapsed (etcd was unreachable too long); another valetd could take the name"
            )
        },
    ))
}

/// Keeps `lease` alive, renewing it every `interval`, until the returned task is aborted: while
/// this process lives and reaches etcd, what the lease holds (a replica's name, a place in a
/// lock's line, a held lock) does not lapse. `lapsed` runs each time etcd reports the lease gone.
fn keep_lease_alive(
    client: Client,
    lease: i64,
    interval: Duration,
    lapsed: impl Fn() + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut leases = client.lease_client();
        loop {
            match leases.keep_alive(lease).await {
                Ok((mut keeper, mut answers)) => loop {
                    if keeper.keep_alive().await.is_err() {
                        break;
                    }
                    match answers.message().await {
                        Ok(Some(answer)) if answer.ttl() > 0 => {}
                        Ok(Some(_)) => {
                            lapsed();
                            break;
                        }
                        _ => break,
                    }
                    tokio::time::sleep(interval).await;
                },
                Err(error) => {
                    tracing::warn!(lease, %error, "cannot keep an etcd lease alive; retrying");
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
}

fn unavailable(error: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable {
        engine: ENGINE,
        detail: error.to_string(),
    }
}

/// Runs one etcd request with the fail-closed time limit.
async fn bounded<T, E: std::fmt::Display>(
    request: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(unavailable(error)),
        Err(_) => Err(unavailable(format!(
            "etcd did not answer within {} s",
            REQUEST_TIMEOUT.as_secs()
        ))),
    }
}

/// Whether another attempt may reach a live member: the connection failed, broke with the
/// request in flight, or the attempt timed out on a member that stopped answering. Every write is
/// a transaction that recognises its own earlier landing (the stored value is already the one it
/// writes), so a retry never writes twice or reports a conflict with itself.
fn is_transient(error: &etcd_client::Error) -> bool {
    match error {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(status) => match status.code() {
            // The member's connection closed with the request on it ("operation was canceled",
            // hyper's `Canceled`: a killed member): another member may answer.
            tonic::Code::Unavailable => true,
            tonic::Code::Cancelled if status.message().contains("operation was canceled") => true,
            tonic::Code::Unknown | tonic::Code::Cancelled => {
                status.message().contains("transport error")
                    || status.message().contains("Timeout expired")
            }
            _ => false,
        },
        _ => false,
    }
}

/// Runs `attempt` against the cluster, again on a transient failure (a dead member among the
/// endpoints), until it succeeds or the fail-closed time limit passes.
async fn retrying<T, F, Fut>(client: &Client, attempt: F) -> Result<T, StoreError>
where
    F: Fn(Client) -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    Ok(retrying_counted(client, attempt).await?.0)
}

/// [`retrying`], also saying whether more than one attempt was made.
async fn retrying_counted<T, F, Fut>(client: &Client, attempt: F) -> Result<(T, bool), StoreError>
where
    F: Fn(Client) -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
    let mut retried = false;
    loop {
        match tokio::time::timeout_at(deadline, attempt(client.clone())).await {
            Ok(Ok(value)) => return Ok((value, retried)),
            Ok(Err(error)) if is_transient(&error) => {
                retried = true;
                if tokio::time::Instant::now() + RETRY_PAUSE >= deadline {
                    return Err(unavailable(error));
                }
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            Ok(Err(error)) => return Err(unavailable(error)),
            Err(_) => {
                return Err(unavailable(format!(
                    "etcd did not answer within {} s",
                    REQUEST_TIMEOUT.as_secs()
                )));
            }
        }
    }
}

impl EtcdStore {
    /// Connects to the cluster and starts following its changes.
    pub async fn connect(options: EtcdOptions) -> Result<EtcdStore, StoreError> {
        let mut connect = ConnectOptions::new()
            .with_connect_timeout(ATTEMPT_TIMEOUT)
            .with_timeout(ATTEMPT_TIMEOUT)
            .with_keep_alive(Duration::from_secs(1), Duration::from_secs(1))
            .with_keep_alive_while_idle(true);
        if let Some(ca_file) = &options.ca_file {
            let read = |path: &std::path::Path| {
                std::fs::read(path).map_err(|error| {
                    unavailable(format!("cannot read {}: {error}", path.display()))
                })
            };
            let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read(ca_file)?));
            if let Some((cert, key)) = &options.client_certificate {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            connect = connect.with_tls(tls);
        }
        if let (Some(username), Some(password)) = (&options.username, &options.password) {
            connect = connect.with_user(
                username.clone(),
                password.expose_str().unwrap_or_default().to_string(),
            );
        }
        let client = bounded(Client::connect(options.endpoints.clone(), Some(connect))).await?;
        let prefix = options.prefix.trim_end_matches('/').to_string();
        // Where the watch starts: the current revision, read now.
        let mut kv = client.kv_client();
        let start = bounded(kv.get(
            format!("{prefix}/meta/"),
            Some(GetOptions::new().with_prefix().with_count_only()),
        ))
        .await?
        .header()
        .map(|header| header.revision())
        .unwrap_or(0);
        let claim = claim_replica(&client, &prefix, &options.replica).await?;
        let (changes, _) = broadcast::channel(1024);
        let (seen_sender, seen) = watch::channel(start);
        let watcher = tokio::spawn(follow(
            client.clone(),
            prefix.clone(),
            start,
            changes.clone(),
            seen_sender,
        ));
        Ok(EtcdStore {
            client,
            prefix,
            replica: options.replica,
            retention: options.retention,
            changes,
            seen,
            leases: Mutex::new(HashMap::new()),
            lock_lease: options.lock_lease,
            watcher,
            claim,
        })
    }

    fn key(&self, kind: &str, id: &str) -> String {
        format!("{}/{kind}/{id}", self.prefix)
    }

    fn task_key(&self, task_id: &str, grant_id: &str) -> String {
        format!("{}/tasks/{task_id}\0{grant_id}", self.prefix)
    }

    /// Waits until this replica's watch has delivered `revision`, so a caller that subscribed
    /// before writing sees its own change. A broken watch does not fail the write (it is durable);
    /// the watch resynchronises on its own.
    async fn caught_up(&self, revision: i64) {
        let mut seen = self.seen.clone();
        let waited =
            tokio::time::timeout(WATCH_CATCH_UP, seen.wait_for(|seen| *seen >= revision)).await;
        if !matches!(waited, Ok(Ok(_))) {
            tracing::warn!(
                revision,
                "the etcd watch is behind; changes reach subscribers late"
            );
        }
    }

    /// A lease that outlives `grant`'s retention: shared by records ending in the same minute,
    /// never granted shorter than needed.
    async fn lease_for(&self, grant: &Grant) -> Result<i64, StoreError> {
        let ends_at = grant.expires_at.max(grant.updated_at);
        let needed = (ends_at - grant.updated_at).max(0)
            + i64::try_from(self.retention.as_secs()).unwrap_or(i64::MAX / 4);
        let bucket = (needed / LEASE_BUCKET_SECONDS + 2) * LEASE_BUCKET_SECONDS;
        {
            let leases = self
                .leases
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some((id, granted)) = leases.get(&bucket)
                && granted.elapsed() < Duration::from_secs(LEASE_BUCKET_SECONDS as u64)
            {
                return Ok(*id);
            }
        }
        let id = retrying(&self.client, |client| async move {
            client.lease_client().grant(bucket, None).await
        })
        .await?
        .id();
        self.leases
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(bucket, (id, Instant::now()));
        Ok(id)
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        let txn = &txn;
        let (response, retried) = retrying_counted(&self.client, |client| async move {
            client.kv_client().txn(txn.clone()).await
        })
        .await?;
        Ok(TxnOutcome { response, retried })
    }

    /// Compare-and-swap: runs `operations` (which write `record` at `key`) only if `key` still
    /// holds `expected`. A conflict when the key holds something else, `missing()` when it is gone;
    /// success when this very write landed on an earlier attempt.
    async fn swap(
        &self,
        key: String,
        expected: Vec<u8>,
        record: &[u8],
        operations: Vec<TxnOp>,
        missing: impl FnOnce() -> StoreError,
    ) -> Result<(), StoreError> {
        let id = key.rsplit('/').next().unwrap_or_default().to_string();
        let txn = Txn::new()
            .when([Compare::value(key.clone(), CompareOp::Equal, expected)])
            .and_then(operations)
            .or_else([TxnOp::get(key, None)]);
        let response = self.txn(txn).await?;
        if !response.succeeded() {
            if response.landed_earlier(record) {
                return Ok(());
            }
            return Err(match response.current() {
                Some(_) => StoreError::Conflict { id },
                None => missing(),
            });
        }
        self.caught_up(response.revision()).await;
        Ok(())
    }

    async fn get_value(&self, key: String) -> Result<Option<Vec<u8>>, StoreError> {
        let key = &key;
        let response = retrying(&self.client, |client| async move {
            client.kv_client().get(key.clone(), None).await
        })
        .await?;
        Ok(response.kvs().first().map(|kv| kv.value().to_vec()))
    }

    /// Every (key, value) under `prefix`, read in pages.
    async fn scan(&self, prefix: &str) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        self.scan_from(prefix, prefix.as_bytes().to_vec(), None)
            .await
    }

    /// (key, value) pairs under `prefix` from `start` on, at most `limit` (all when `None`).
    async fn scan_from(
        &self,
        prefix: &str,
        start: Vec<u8>,
        limit: Option<usize>,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        let end = prefix_end(prefix.as_bytes());
        let mut out = Vec::new();
        let mut from = start;
        loop {
            let (from_key, end) = (&from, &end);
            let response = retrying(&self.client, |client| async move {
                client
                    .kv_client()
                    .get(
                        from_key.clone(),
                        Some(GetOptions::new().with_range(end.clone()).with_limit(PAGE)),
                    )
                    .await
            })
            .await?;
            for pair in response.kvs() {
                out.push((pair.key().to_vec(), pair.value().to_vec()));
                if limit.is_some_and(|limit| out.len() >= limit) {
                    return Ok(out);
                }
            }
            if !response.more() || response.kvs().is_empty() {
                return Ok(out);
            }
            let mut next = response
                .kvs()
                .last()
                .map(|kv| kv.key().to_vec())
                .unwrap_or_default();
            next.push(0);
            from = next;
        }
    }

    async fn delete(&self, key: Vec<u8>) -> Result<(), StoreError> {
        let key = &key;
        retrying(&self.client, |client| async move {
            client.kv_client().delete(key.clone(), None).await
        })
        .await?;
        Ok(())
    }

    async fn count(&self, kind: &str) -> Result<u64, StoreError> {
        let key = &format!("{}/{kind}/", self.prefix);
        let response = retrying(&self.client, |client| async move {
            client
                .kv_client()
                .get(
                    key.clone(),
                    Some(GetOptions::new().with_prefix().with_count_only()),
                )
                .await
        })
        .await?;
        Ok(u64::try_from(response.count()).unwrap_or(0))
    }
}

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// A transaction's answer, and whether it took more than one attempt.
struct TxnOutcome {
    response: etcd_client::TxnResponse,
    retried: bool,
}

impl TxnOutcome {
    fn succeeded(&self) -> bool {
        self.response.succeeded()
    }

    fn revision(&self) -> i64 {
        self.response
            .header()
            .map(|header| header.revision())
            .unwrap_or(0)
    }

    /// The value the failure branch read back, when the key exists.
    fn current(&self) -> Option<Vec<u8>> {
        self.response
            .op_responses()
            .iter()
            .find_map(|operation| match operation {
                TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.value().to_vec()),
                _ => None,
            })
    }

    /// Whether a failed comparison is this very write, landed on an earlier attempt whose
    /// answer was lost: retried, and the stored value is already the one it writes.
    fn landed_earlier(&self, record: &[u8]) -> bool {
        self.retried && self.current().as_deref() == Some(record)
    }
}

/// Follows every change under the prefix, from any replica, into `changes`. After a gap
/// (compaction, lost connection) it announces a resync, so followers reload instead of trusting a
/// view that may have missed changes.
async fn follow(
    client: Client,
    prefix: String,
    start: i64,
    changes: broadcast::Sender<StoreChange>,
    seen: watch::Sender<i64>,
) {
    let grants = format!("{prefix}/grants/");
    let keys = format!("{prefix}/keys/");
    let current_key = format!("{prefix}/meta/current_key");
    let approvals = format!("{prefix}/approvals/");
    let mut next = start + 1;
    loop {
        let mut watch_client = client.watch_client();
        let options = WatchOptions::new()
            .with_prefix()
            .with_prev_key()
            .with_start_revision(next);
        let stream = watch_client
            .watch(format!("{prefix}/"), Some(options))
            .await;
        let mut stream = match stream {
            Ok(stream) => stream,
            Err(error) => {
                tracing::warn!(%error, "cannot watch etcd; retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        loop {
            let response = match stream.message().await {
                Ok(Some(response)) => response,
                Ok(None) => break,
                Err(error) => {
                    tracing::warn!(%error, "the etcd watch broke; resuming");
                    break;
                }
            };
            if response.compact_revision() > 0 || response.canceled() {
                // The changes since `next` are gone: everyone must reload.
                tracing::warn!(
                    compacted_to = response.compact_revision(),
                    "the etcd watch lost changes to compaction; followers reload"
                );
                next = response.compact_revision().max(next);
                let _ = changes.send(StoreChange::Resync);
                break;
            }
            let mut key_ring_changed = false;
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                let key = String::from_utf8_lossy(kv.key());
                next = next.max(kv.mod_revision() + 1);
                if key.starts_with(&keys) || key == current_key {
                    key_ring_changed = true;
                    continue;
                }
                if event.event_type() != EventType::Put {
                    continue;
                }
                if key.starts_with(&grants) {
                    let Ok(after) = serde_json::from_slice::<Grant>(kv.value()) else {
                        continue;
                    };
                    let before = event
                        .prev_kv()
                        .and_then(|prev| serde_json::from_slice::<Grant>(prev.value()).ok());
                    let change = match before {
                        None => StoreChange::GrantCreated(after),
                        Some(before)
                            if after.status == GrantStatus::Revoked
                                && before.status != GrantStatus::Revoked =>
                        {
                            StoreChange::GrantRevoked(after)
                        }
                        Some(before) if before == after => continue,
                        Some(before) => StoreChange::GrantUpdated {
                            before: Box::new(before),
                            after: Box::new(after),
                        },
                    };
                    let _ = changes.send(change);
                } else if key.starts_with(&approvals)
                    && let Ok(approval) = serde_json::from_slice::<ApprovalRequest>(kv.value())
                {
                    let _ = changes.send(StoreChange::ApprovalChanged(Box::new(approval)));
                }
            }
            if key_ring_changed {
                let _ = changes.send(StoreChange::KeyRingChanged);
            }
            if let Some(header) = response.header() {
                next = next.max(header.revision() + 1);
            }
            seen.send_replace(next - 1);
        }
        // Reconnected: tell followers to reload what they keep, then carry on from `next`.
        let _ = changes.send(StoreChange::Resync);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn create_grant(&self, grant: &Grant) -> Result<(), StoreError> {
        let lease = self.lease_for(grant).await?;
        let key = self.key("grants", &grant.id);
        let record = encode(grant);
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then([
                TxnOp::put(
                    key.clone(),
                    record.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                ),
                TxnOp::put(
                    self.task_key(&grant.task_id, &grant.id),
                    Vec::new(),
                    Some(PutOptions::new().with_lease(lease)),
                ),
            ])
            .or_else([TxnOp::get(key, None)]);
        let response = self.txn(txn).await?;
        if !response.succeeded() && !response.landed_earlier(&record) {
            return Err(StoreError::AlreadyExists {
                id: grant.id.clone(),
            });
        }
        self.caught_up(response.revision()).await;
        Ok(())
    }

    async fn get_grant(&self, id: &str) -> Result<Option<Grant>, StoreError> {
        let key = self.key("grants", id);
        match self.get_value(key.clone()).await? {
            Some(bytes) => Ok(Some(decode("grant", key.as_bytes(), &bytes)?)),
            None => Ok(None),
        }
    }

    async fn update_grant(&self, expected: &Grant, new: &Grant) -> Result<(), StoreError> {
        let key = self.key("grants", &expected.id);
        let newly_revoked =
            new.status == GrantStatus::Revoked && expected.status != GrantStatus::Revoked;
        let lease = self.lease_for(new).await?;
        let with_lease = || Some(PutOptions::new().with_lease(lease));
        let record = encode(new);
        let mut operations = vec![
            TxnOp::put(key.clone(), record.clone(), with_lease()),
            TxnOp::put(
                self.task_key(&new.task_id, &new.id),
                Vec::new(),
                with_lease(),
            ),
        ];
        if newly_revoked {
            operations.push(TxnOp::put(
                self.key("revocations", &new.id),
                encode(&Revocation {
                    grant_id: new.id.clone(),
                    revoked_at: new.updated_at,
                    expires_at: new.expires_at,
                }),
                with_lease(),
            ));
        }
        self.swap(key, encode(expected), &record, operations, || {
            StoreError::NotFound {
                id: expected.id.clone(),
            }
        })
        .await
    }

    async fn list_grants(
        &self,
        filter: &GrantFilter,
        now: UnixTime,
        after: Option<&str>,
        limit: usize,
    ) -> Result<GrantPage, StoreError> {
        let limit = limit.max(1);
        let mut page = GrantPage::default();
        let consider = |grant: Grant, page: &mut GrantPage| page.offer(grant, filter, now, limit);
        if let Some(task_id) = &filter.task_id {
            let prefix = self.task_key(task_id, "");
            for (key, _) in self.scan(&prefix).await? {
                let grant_id = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
                if after.is_some_and(|after| grant_id.as_str() <= after) {
                    continue;
                }
                if let Some(grant) = self.get_grant(&grant_id).await?
                    && !consider(grant, &mut page)
                {
                    break;
                }
            }
            return Ok(page);
        }
        let prefix = format!("{}/grants/", self.prefix);
        let mut start = match after {
            Some(after) => {
                let mut key = format!("{prefix}{after}").into_bytes();
                key.push(0);
                key
            }
            None => prefix.clone().into_bytes(),
        };
        loop {
            let batch = self
                .scan_from(&prefix, start.clone(), Some(PAGE as usize))
                .await?;
            let Some((last, _)) = batch.last() else {
                return Ok(page);
            };
            start = last.clone();
            start.push(0);
            let full = batch.len() == PAGE as usize;
            for (key, bytes) in batch {
                if !consider(decode("grant", &key, &bytes)?, &mut page) {
                    return Ok(page);
                }
            }
            if !full {
                return Ok(page);
            }
        }
    }

    async fn revocations(&self) -> Result<Vec<Revocation>, StoreError> {
        self.scan(&format!("{}/revocations/", self.prefix))
            .await?
            .iter()
            .map(|(key, bytes)| decode("revocation", key, bytes))
            .collect()
    }

    async fn sweep(&self, now: UnixTime, retention: Duration) -> Result<SweepReport, StoreError> {
        let mut sweep = Sweep::new(now, retention);
        for (key, bytes) in self.scan(&format!("{}/grants/", self.prefix)).await? {
            let grant: Grant = decode("grant", &key, &bytes)?;
            if !sweep.grant_may_go(&grant) {
                continue;
            }
            // Only delete the record we judged: a concurrent change makes us skip it.
            let revocation = self.key("revocations", &grant.id);
            let had_revocation = self.get_value(revocation.clone()).await?.is_some();
            let txn = Txn::new()
                .when([Compare::value(key.clone(), CompareOp::Equal, bytes)])
                .and_then([
                    TxnOp::delete(key, None),
                    TxnOp::delete(self.task_key(&grant.task_id, &grant.id), None),
                    TxnOp::delete(revocation, None),
                ]);
            sweep.grant_removal(if self.txn(txn).await?.succeeded() {
                GrantRemoval::Removed { had_revocation }
            } else {
                GrantRemoval::Skipped
            });
        }
        for (key, bytes) in self.scan(&format!("{}/revocations/", self.prefix)).await? {
            let revocation: Revocation = decode("revocation", &key, &bytes)?;
            let grant_exists = self
                .get_value(self.key("grants", &revocation.grant_id))
                .await?
                .is_some();
            if sweep.revocation_may_go(&revocation, grant_exists) {
                self.delete(key).await?;
                sweep.revocation_removed();
            }
        }
        for (key, bytes) in self.scan(&format!("{}/approvals/", self.prefix)).await? {
            let approval: ApprovalRequest = decode("approval", &key, &bytes)?;
            if sweep.approval_may_go(&approval) {
                let txn = Txn::new()
                    .when([Compare::value(key.clone(), CompareOp::Equal, bytes)])
                    .and_then([TxnOp::delete(key, None)]);
                self.txn(txn).await?;
            }
        }
        for (key, bytes) in self.scan(&format!("{}/once/", self.prefix)).await? {
            let until = bytes
                .get(..8)
                .and_then(|head| <[u8; 8]>::try_from(head).ok())
                .map(UnixTime::from_be_bytes)
                .unwrap_or(0);
            if sweep.marker_may_go(until) {
                let txn = Txn::new()
                    .when([Compare::value(key.clone(), CompareOp::Equal, bytes)])
                    .and_then([TxnOp::delete(key, None)]);
                self.txn(txn).await?;
            }
        }
        for record in self.keys().await? {
            if sweep.key_may_go(&record) {
                self.delete(self.key("keys", &record.kid).into_bytes())
                    .await?;
                sweep.key_removed();
            }
        }
        Ok(sweep.report())
    }

    async fn keys(&self) -> Result<Vec<StoredKey>, StoreError> {
        self.scan(&format!("{}/keys/", self.prefix))
            .await?
            .iter()
            .map(|(key, bytes)| decode("signing key", key, bytes))
            .collect()
    }

    async fn replace_keys(
        &self,
        expected_current: Option<&str>,
        records: &[StoredKey],
    ) -> Result<(), StoreError> {
        let current_key = format!("{}/meta/current_key", self.prefix);
        let condition = match expected_current {
            None => Compare::version(current_key.clone(), CompareOp::Equal, 0),
            Some(kid) => Compare::value(current_key.clone(), CompareOp::Equal, kid),
        };
        let new_current = records
            .iter()
            .find(|record| record.retired_at.is_none())
            .map(|record| record.kid.clone());
        let mut operations: Vec<TxnOp> = records
            .iter()
            .map(|record| TxnOp::put(self.key("keys", &record.kid), encode(record), None))
            .collect();
        if let Some(kid) = &new_current {
            operations.push(TxnOp::put(current_key.clone(), kid.clone(), None));
        }
        let txn = Txn::new()
            .when([condition])
            .and_then(operations)
            .or_else([TxnOp::get(current_key, None)]);
        let response = self.txn(txn).await?;
        // A fresh key id in place already means this rotation landed on an earlier attempt.
        if !response.succeeded()
            && !new_current
                .as_ref()
                .is_some_and(|kid| response.landed_earlier(kid.as_bytes()))
        {
            return Err(StoreError::KeyRingConflict);
        }
        self.caught_up(response.revision()).await;
        Ok(())
    }

    async fn audit_head(&self) -> Result<Option<ChainHead>, StoreError> {
        let key = format!("{}/replicas/{}/audit_head", self.prefix, self.replica);
        match self.get_value(key.clone()).await? {
            Some(bytes) => Ok(Some(decode("audit head", key.as_bytes(), &bytes)?)),
            None => Ok(None),
        }
    }

    async fn record_audit_head(&self, head: &ChainHead) -> Result<(), StoreError> {
        let key = format!("{}/replicas/{}/audit_head", self.prefix, self.replica);
        let (key, value) = (&key, &encode(head));
        retrying(&self.client, |client| async move {
            client
                .kv_client()
                .put(key.clone(), value.clone(), None)
                .await
        })
        .await?;
        Ok(())
    }

    async fn counts(&self) -> Result<StoreCounts, StoreError> {
        Ok(StoreCounts {
            n_grants: self.count("grants").await?,
            n_revocations: self.count("revocations").await?,
            n_keys: self.count("keys").await?,
        })
    }

    async fn create_approval(&self, approval: &ApprovalRequest) -> Result<(), StoreError> {
        let key = self.key("approvals", &approval.id);
        let record = encode(approval);
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), record.clone(), None)])
            .or_else([TxnOp::get(key, None)]);
        let response = self.txn(txn).await?;
        if !response.succeeded() && !response.landed_earlier(&record) {
            return Err(StoreError::AlreadyExists {
                id: approval.id.clone(),
            });
        }
        self.caught_up(response.revision()).await;
        Ok(())
    }

    async fn claim_once_with(
        &self,
        name: &str,
        until: UnixTime,
        payload: &[u8],
    ) -> Result<bool, StoreError> {
        let key = self.key("once", name);
        // The moment, then a nonce: a retried transaction whose first attempt landed finds its
        // own record and still counts as this call's claim.
        let nonce = valet_core::random::bytes::<16>().map_err(|error| StoreError::Unavailable {
            engine: ENGINE,
            detail: error.to_string(),
        })?;
        let record = [until.to_be_bytes().as_slice(), nonce.as_slice(), payload].concat();
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), record.clone(), None)])
            .or_else([TxnOp::get(key, None)]);
        let response = self.txn(txn).await?;
        Ok(response.succeeded() || response.landed_earlier(&record))
    }

    async fn claimed(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.get_value(self.key("once", name)).await?.is_some())
    }

    async fn claims_under(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let start = self.key("once", "");
        let mut claims = Vec::new();
        for (key, bytes) in self.scan(&self.key("once", prefix)).await? {
            let name = String::from_utf8_lossy(&key[start.len()..]).into_owned();
            claims.push((name, bytes.get(24..).unwrap_or_default().to_vec()));
        }
        Ok(claims)
    }

    async fn get_approval(&self, id: &str) -> Result<Option<ApprovalRequest>, StoreError> {
        let key = self.key("approvals", id);
        match self.get_value(key.clone()).await? {
            Some(bytes) => Ok(Some(decode("approval", key.as_bytes(), &bytes)?)),
            None => Ok(None),
        }
    }

    async fn update_approval(
        &self,
        expected: &ApprovalRequest,
        new: &ApprovalRequest,
    ) -> Result<(), StoreError> {
        let key = self.key("approvals", &expected.id);
        let record = encode(new);
        let operations = vec![TxnOp::put(key.clone(), record.clone(), None)];
        self.swap(key, encode(expected), &record, operations, || {
            StoreError::ApprovalNotFound {
                id: expected.id.clone(),
            }
        })
        .await
    }

    async fn list_approvals(&self, pending_only: bool) -> Result<Vec<ApprovalRequest>, StoreError> {
        let mut approvals = Vec::new();
        for (key, bytes) in self.scan(&format!("{}/approvals/", self.prefix)).await? {
            let approval: ApprovalRequest = decode("approval", &key, &bytes)?;
            if !pending_only || approval.status == ApprovalStatus::Pending {
                approvals.push(approval);
            }
        }
        crate::sort_approvals(&mut approvals);
        Ok(approvals)
    }

    fn subscribe(&self) -> broadcast::Receiver<StoreChange> {
        self.changes.subscribe()
    }
    async fn lock(&self, name: &str) -> Result<crate::StoreLock, StoreError> {
        // The hold lives as long as a lease this replica keeps alive — from joining the line until
        // it lets go — so the lock passes on only when released or when its holder dies (its lease
        // then lapses within `lock_lease`). A lease that were not kept alive would lapse under a
        // holder that waited or worked longer than it, and let a second holder in.
        let mut leases = self.client.lease_client();
        let ttl = i64::try_from(self.lock_lease.as_secs().max(2)).unwrap_or(i64::MAX);
        let lease = bounded(leases.grant(ttl, None)).await?.id();
        let lock_name = name.to_string();
        let keeper = keep_lease_alive(self.client.clone(), lease, self.lock_lease / 3, move || {
            tracing::error!(
                lock = lock_name,
                "the lease of a lock this replica holds or waits for lapsed (etcd was unreachable too long)"
            )
        });
        let key = format!("{}/locks/{name}", self.prefix);
        let deadline = Instant::now() + crate::LOCK_WAIT;
        let held = loop {
            // Each attempt is bounded by the client's request timeout; asking again with the
            // same lease keeps our place in the queue.
            let attempt = self
                .client
                .lock_client()
                .lock(key.clone(), Some(LockOptions::new().with_lease(lease)))
                .await;
            match attempt {
                Ok(response) => break response.key().to_vec(),
                Err(_) if Instant::now() < deadline => tokio::time::sleep(RETRY_PAUSE).await,
                Err(error) => {
                    keeper.abort();
                    let _ = leases.revoke(lease).await;
                    return Err(unavailable(format!(
                        "lock {name} could not be taken within {} s: {error}",
                        crate::LOCK_WAIT.as_secs()
                    )));
                }
            }
        };
        let client = self.client.clone();
        Ok(crate::StoreLock::remote(Box::new(move || {
            keeper.abort();
            tokio::spawn(async move {
                let _ = client.lock_client().unlock(held).await;
                let _ = client.lease_client().revoke(lease).await;
            });
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_ends_are_the_next_key_after_the_prefix() {
        assert_eq!(prefix_end(b"/valet/grants/"), b"/valet/grants0".to_vec());
        assert_eq!(prefix_end(&[b'a', 0xff]), b"b".to_vec());
        assert_eq!(prefix_end(&[0xff]), vec![0]);
    }
}
