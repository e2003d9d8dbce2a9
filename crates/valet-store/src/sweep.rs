//! What a sweep may delete and how it is counted, for every engine: each engine reads its records
//! and deletes them (its own I/O); whether a record may go, and what the report says, is decided
//! here once.

use std::time::Duration;

use valet_core::UnixTime;
use valet_core::approval::{ApprovalRequest, ApprovalStatus};
use valet_core::grant::Grant;
use valet_core::keyring::StoredKey;

use crate::{Revocation, SweepReport};

/// One sweep pass at `now`, keeping ended records for `retention`.
pub(crate) struct Sweep {
    now: UnixTime,
    retention: Duration,
    report: SweepReport,
}

/// What an engine's conditional delete of a grant did.
pub(crate) enum GrantRemoval {
    /// The record changed since it was judged (or is gone): it stays, and is not counted.
    Skipped,
    /// Deleted, with its revocation when it had one.
    Removed { had_revocation: bool },
}

impl Sweep {
    pub(crate) fn new(now: UnixTime, retention: Duration) -> Sweep {
        Sweep {
            now,
            retention,
            report: SweepReport::default(),
        }
    }

    /// Whether the grant may go: `Grant::sweepable` decides.
    pub(crate) fn grant_may_go(&self, grant: &Grant) -> bool {
        grant.sweepable(self.now, self.retention)
    }

    pub(crate) fn grant_removal(&mut self, removal: GrantRemoval) {
        if let GrantRemoval::Removed { had_revocation } = removal {
            self.report.n_grants += 1;
            self.report.n_revocations += u64::from(had_revocation);
        }
    }

    /// A revocation outlives its grant record only until the token it revoked would have
    /// expired anyway.
    pub(crate) fn revocation_may_go(&self, revocation: &Revocation, grant_exists: bool) -> bool {
        self.now >= revocation.expires_at && !grant_exists
    }

    pub(crate) fn revocation_removed(&mut self) {
        self.report.n_revocations += 1;
    }

    /// Decided (or timed out) approval requests are kept for `retention`.
    pub(crate) fn approval_may_go(&self, approval: &ApprovalRequest) -> bool {
        let ended = !matches!(
            approval.status,
            ApprovalStatus::Pending | ApprovalStatus::Approved
        );
        let ended_at = approval.expires_at.max(approval.updated_at);
        ended && self.now >= valet_core::clock::add_duration(ended_at, self.retention)
    }

    /// A public key goes once no token it signed can still verify.
    /// A one-time marker may go once its moment has passed: what it guarded has expired.
    pub(crate) fn marker_may_go(&self, until: UnixTime) -> bool {
        self.now >= until
    }

    pub(crate) fn key_may_go(&self, key: &StoredKey) -> bool {
        !key.verifies_at(self.now)
    }

    pub(crate) fn key_removed(&mut self) {
        self.report.n_keys += 1;
    }

    pub(crate) fn report(self) -> SweepReport {
        self.report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skipped_grant_is_not_counted() {
        let mut sweep = Sweep::new(1_000, Duration::from_secs(60));
        sweep.grant_removal(GrantRemoval::Skipped);
        sweep.grant_removal(GrantRemoval::Removed {
            had_revocation: true,
        });
        sweep.grant_removal(GrantRemoval::Removed {
            had_revocation: false,
        });
        let report = sweep.report();
        assert_eq!((report.n_grants, report.n_revocations), (2, 1));
    }

    #[test]
    fn a_revocation_goes_only_after_its_token_expired_and_its_grant_is_gone() {
        let sweep = Sweep::new(1_000, Duration::from_secs(60));
        let revocation = |expires_at| Revocation {
            grant_id: "g".into(),
            revoked_at: 0,
            expires_at,
        };
        assert!(sweep.revocation_may_go(&revocation(999), false));
        assert!(!sweep.revocation_may_go(&revocation(999), true));
        assert!(!sweep.revocation_may_go(&revocation(1_001), false));
    }
}
