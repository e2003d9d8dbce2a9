//! One commit point for issuing on the embedded store: a new grant goes into the store without
//! waiting for a flush, its `token.issue` audit record (which carries the grant) is the one sync
//! before the token is returned, and a checkpoint every [`CHECKPOINT_INTERVAL`] makes the store
//! catch up. After a crash, start re-reads the records past the last checkpoint and creates
//! again every live grant the store lost. Engines that make every write durable (etcd) skip all
//! of this.

use std::sync::Arc;
use std::time::Duration;

use valet_core::audit::{AuditAction, AuditEvent, ChainKey, Outcome};
use valet_core::grant::Grant;

use valet_store::GrantsCheckpoint;

use crate::administration::OwnAccount;
use crate::audit_sink::AuditError;
use crate::caller::Attribution;
use crate::{ServiceError, Valet};

/// How often the store is brought up to the audit log: at most this much of issuing (plus one
/// flush) is re-read from the audit log after a crash.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(100);

/// The field of a `token.issue` record that carries the grant as it was stored (without its MAC).
pub(crate) const GRANT_FIELD: &str = "grant";

/// Grants issued since the last checkpoint, with the sequence of their issue record.
pub(crate) struct DeferredGrants {
    pending: std::sync::Mutex<Vec<(u64, Grant)>>,
    /// Issues between writing their grant and adding it to `pending`, each with the durable
    /// audit sequence when it started: its record will come after that, so a checkpoint never
    /// goes past it (else a grant lost by a reopen in between could be passed over).
    in_flight: std::sync::Mutex<(u64, std::collections::BTreeMap<u64, u64>)>,
    /// One checkpoint at a time, and the sequence the last one recorded (`None`: none yet).
    checkpoint: tokio::sync::Mutex<Option<u64>>,
    chain_key: Arc<ChainKey>,
}

impl DeferredGrants {
    pub(crate) fn new(chain_key: ChainKey) -> DeferredGrants {
        DeferredGrants {
            pending: std::sync::Mutex::new(Vec::new()),
            in_flight: std::sync::Mutex::new((0, std::collections::BTreeMap::new())),
            checkpoint: tokio::sync::Mutex::new(None),
            chain_key: Arc::new(chain_key),
        }
    }

    /// Registers an issue starting now, while `durable` is the last durable record; the issue
    /// leaves the register when the returned guard drops (done, failed or cancelled).
    fn start_issue(&self, durable: u64) -> InFlight<'_> {
        let mut in_flight = self
            .in_flight
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        in_flight.0 += 1;
        let ticket = in_flight.0;
        in_flight.1.insert(ticket, durable);
        InFlight {
            grants: self,
            ticket,
        }
    }

    /// How far a checkpoint may go: `durable`, but not past the start of an issue still on its
    /// way to `pending`.
    fn checkpoint_bound(&self, durable: u64) -> u64 {
        let in_flight = self
            .in_flight
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        in_flight.1.values().copied().fold(durable, u64::min)
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Vec<(u64, Grant)>> {
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One issue on its way from the store to the pending list; leaves the register when dropped.
struct InFlight<'a> {
    grants: &'a DeferredGrants,
    ticket: u64,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.grants
            .in_flight
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .1
            .remove(&self.ticket);
    }
}

/// `event` carrying `grant` as the store holds it, so the record alone can restore it.
pub(crate) fn with_grant_record(event: AuditEvent, grant: &Grant) -> AuditEvent {
    match serde_json::to_value(grant) {
        Ok(mut value) => {
            if let serde_json::Value::Object(fields) = &mut value {
                fields.remove("mac");
            }
            event.with_value(GRANT_FIELD, value)
        }
        Err(_) => event,
    }
}

/// The grant a `token.issue` record says was issued, if it is one that carries it.
fn issued_grant(record: &serde_json::Value) -> Option<(u64, Grant)> {
    let text = |key: &str| record.get(key).and_then(serde_json::Value::as_str);
    if text("action") != Some(AuditAction::TokenIssue.as_str())
        || text("outcome") != Some("allowed")
    {
        return None;
    }
    let sequence = record.get("seq").and_then(serde_json::Value::as_u64)?;
    let grant: Grant = serde_json::from_value(record.get(GRANT_FIELD)?.clone()).ok()?;
    (Some(grant.id.as_str()) == text("grant_id")).then_some((sequence, grant))
}

impl Valet {
    /// Writes a newly issued grant and its issue record; returns once both are durable — the
    /// record on disk, the grant in the store or (embedded store) in that record, until the next
    /// checkpoint.
    pub(crate) async fn commit_issue(
        &self,
        who: &impl Attribution,
        grant: &Grant,
        issued: AuditEvent,
    ) -> Result<(), ServiceError> {
        let issued = with_grant_record(issued, grant);
        if !self.store.defers_grants() {
            // Both must be durable before the token is handed out; they commit concurrently, so
            // the caller waits for the slower, not the sum.
            let (stored, audited) =
                tokio::join!(self.store.create_grant(grant), self.record(who, issued));
            return match (stored, audited) {
                (Ok(()), audited) => audited,
                (Err(error), audited) => {
                    if audited.is_ok() {
                        // The audit log says issued; say also that it was not, and why.
                        let failed = AuditEvent::new(AuditAction::TokenIssue, Outcome::Failed)
                            .with("grant_id", &grant.id)
                            .with(
                                "reason",
                                format!(
                                    "the grant could not be stored, so no token was handed out: {error}"
                                ),
                            );
                        let _ = self.record(who, failed).await;
                    }
                    Err(error.into())
                }
            };
        }
        // The grant is written first: a checkpoint that sees this record durable then finds the
        // grant in the store it flushes.
        let _in_flight = self.deferred.start_issue(self.audit.durable_sequence());
        self.store.create_grant_deferred(grant).await?;
        let head = self.audit.record(who.attribute(issued)).await?;
        self.deferred.pending().push((head.sequence, grant.clone()));
        Ok(())
    }

    /// Brings the store up to the audit log: every grant issued up to the last durable record is
    /// made durable in the store (created again if the store lost it, with a `grant.restore`
    /// record), and that record becomes the store's checkpoint. Returns how many were restored.
    pub async fn checkpoint_grants(&self) -> Result<usize, ServiceError> {
        self.checkpoint(false).await
    }

    /// The last checkpoint of a stopping valetd (after its last record): the next start knows
    /// nothing was issued after it, and the log may be moved aside before then.
    pub async fn checkpoint_grants_at_stop(&self) -> Result<usize, ServiceError> {
        self.checkpoint(true).await
    }

    async fn checkpoint(&self, at_stop: bool) -> Result<usize, ServiceError> {
        if !self.store.defers_grants() {
            return Ok(0);
        }
        let mut last = self.deferred.checkpoint.lock().await;
        let through = self
            .deferred
            .checkpoint_bound(self.audit.durable_sequence());
        let due: Vec<(u64, Grant)> = {
            let mut pending = self.deferred.pending();
            let (due, later) = pending
                .drain(..)
                .partition(|(sequence, _)| *sequence <= through);
            *pending = later;
            due
        };
        if due.is_empty() && *last == Some(through) && !at_stop {
            return Ok(0);
        }
        let now = self.clock.now();
        // A grant past its expiry is of no use to anyone: it is not created again.
        let live: Vec<Grant> = due
            .iter()
            .filter(|(_, grant)| grant.expires_at > now)
            .map(|(_, grant)| grant.clone())
            .collect();
        let restored = match self
            .store
            .checkpoint_grants(
                GrantsCheckpoint {
                    sequence: through,
                    at_stop,
                },
                &live,
            )
            .await
        {
            Ok(restored) => restored,
            Err(error) => {
                // Kept for the next checkpoint: their records stay the only durable copy.
                self.deferred.pending().extend(due);
                return Err(error.into());
            }
        };
        *last = Some(through);
        drop(last);
        let own = OwnAccount {
            request_id: "grants-checkpoint",
            trigger: "grants checkpoint",
        };
        for id in &restored {
            let Some((sequence, grant)) = due.iter().find(|(_, grant)| &grant.id == id) else {
                continue;
            };
            tracing::warn!(grant_id = %id, issue_record = sequence, "the store had lost a grant issued before a crash or a failed write; created again from its issue record");
            let event = AuditEvent::new(AuditAction::GrantRestore, Outcome::Allowed)
                .with_grant(grant)
                .with_value("issue_record", serde_json::Value::from(*sequence))
                .with(
                    "reason",
                    "the store lost it before its checkpoint (a crash, or a reopen after a failed write); created again from its token.issue record",
                );
            self.record(&own, event).await?;
        }
        Ok(restored.len())
    }

    /// At start: the grants issued after the store's last checkpoint, read back from the audit
    /// log (every record checked against valetd's MAC), are made durable in the store.
    pub(crate) async fn restore_deferred_grants(&self) -> Result<usize, ServiceError> {
        if !self.store.defers_grants() {
            return Ok(0);
        }
        if let Some(GrantsCheckpoint {
            sequence: checkpoint,
            at_stop,
        }) = self.store.grants_checkpoint().await?
        {
            // After a crash the records past the checkpoint are the only copy of some grants; a
            // new file cannot hold them (and its head may be all the store knows).
            if !at_stop && self.audit.started_new_file() {
                return Err(AuditError::NeededForRestore {
                    path: self.audit.path().display().to_string(),
                    sequence: checkpoint,
                }
                .into());
            }
            let records = self
                .audit
                .durable_records_after(checkpoint, self.deferred.chain_key.clone())
                .await?;
            let issued: Vec<(u64, Grant)> = records.iter().filter_map(issued_grant).collect();
            if !issued.is_empty() {
                tracing::info!(
                    n_grants = issued.len(),
                    checkpoint,
                    "checking the grants issued after the store's last checkpoint"
                );
            }
            self.deferred.pending().extend(issued);
        }
        // None: nothing was ever deferred (a new store, or one written only by a valetd that
        // flushed every grant); the first checkpoint is recorded now.
        self.checkpoint_grants().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_never_passes_the_start_of_an_issue_in_flight() {
        let grants = DeferredGrants::new(ChainKey::from_seal_key(
            &valet_core::keyring::SealKey::from_base64(
                &valet_core::keyring::SealKey::generate_base64().unwrap(),
            )
            .unwrap(),
        ));
        assert_eq!(grants.checkpoint_bound(40), 40);
        let first = grants.start_issue(10);
        let second = grants.start_issue(25);
        assert_eq!(grants.checkpoint_bound(40), 10);
        drop(first);
        assert_eq!(grants.checkpoint_bound(40), 25);
        drop(second);
        assert_eq!(grants.checkpoint_bound(40), 40);
    }

    #[test]
    fn only_allowed_issue_records_that_carry_their_grant_restore_it() {
        let grant: Grant = serde_json::from_value(serde_json::json!({
            "id": "g1", "principal": "agent", "task_id": "t", "purpose": "", "scope": "s",
            "environment": "staging", "audience": "a", "params": {}, "issued_at": 1,
            "expires_at": 2, "max_expires_at": 3, "uses": 0, "max_uses": null,
            "status": "active", "status_reason": null, "key_id": "k", "updated_at": 1
        }))
        .unwrap();
        let event = with_grant_record(
            AuditEvent::new(AuditAction::TokenIssue, Outcome::Allowed).with_grant(&grant),
            &grant,
        );
        let (line, _) =
            valet_core::audit::chain(&valet_core::audit::ChainHead::genesis(), &event, 1, None);
        let record: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(issued_grant(&record), Some((1, grant.clone())));

        let mut denied = record.clone();
        denied["outcome"] = serde_json::Value::from("denied");
        assert_eq!(issued_grant(&denied), None);
        let mut other = record.clone();
        other["grant_id"] = serde_json::Value::from("g2");
        assert_eq!(
            issued_grant(&other),
            None,
            "the grant must be the one named"
        );
        let mut renewed = record;
        renewed["action"] = serde_json::Value::from("token.renew");
        assert_eq!(issued_grant(&renewed), None);
    }
}
