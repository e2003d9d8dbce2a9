//! The engine-independent test suite: every `Store` engine must pass all of it.

use std::collections::BTreeMap;
use std::time::Duration;

use valet_core::audit::ChainHead;
use valet_core::grant::{Grant, GrantStatus};
use valet_core::keyring::{SealKey, SigningKey, StoredKey};

use crate::{GrantFilter, GrantsCheckpoint, Store, StoreChange, StoreError};

/// An active grant for tests, issued at `now` for five minutes.
pub fn grant(id: &str, task_id: &str, now: i64) -> Grant {
    Grant {
        id: id.to_string(),
        principal: "agent-a".into(),
        task_id: task_id.to_string(),
        purpose: "conformance".into(),
        scope: "scope-a".into(),
        environment: "staging".into(),
        audience: "api".into(),
        params: BTreeMap::from([("project".into(), "web".into())]),
        issued_at: now,
        expires_at: now + 300,
        max_expires_at: now + 900,
        uses: 0,
        max_uses: Some(3),
        status: GrantStatus::Active,
        status_reason: None,
        key_id: "k".into(),
        updated_at: now,
        rule_calls: BTreeMap::new(),
        authenticated_by: None,
        aws: None,
        mac: None,
    }
}

/// One test per check, for an engine: `$open` is an async function returning an empty store
/// (and whatever keeps it alive), called afresh for every check so one failure hides no other.
#[macro_export]
macro_rules! conformance_tests {
    ($open:path) => {
        $crate::conformance_tests!(@checks $open;
            grants_are_created_once_and_read_back,
            transitions_are_compare_and_swap,
            concurrent_uses_never_exceed_the_limit,
            listing_filters_and_paginates,
            sweeping_removes_only_what_is_done,
            key_replacement_is_compare_and_swap,
            audit_head_round_trips,
            deferred_grants_read_back_and_a_checkpoint_creates_what_is_missing,
            approvals_are_created_once_and_decided_by_compare_and_swap,
            a_marker_is_claimed_once_among_racing_claimants_and_swept_after_its_moment,
            markers_keep_their_payload_and_are_listed_by_prefix_until_swept,
            a_lock_excludes_every_other_holder_for_as_long_as_it_is_held
        );
    };
    (@checks $open:path; $($check:ident),*) => {$(
        #[tokio::test]
        async fn $check() {
            let (_keep, store) = $open().await;
            $crate::conformance::$check(&*store).await;
        }
    )*};
}

pub async fn grants_are_created_once_and_read_back(store: &dyn Store) {
    let mut changes = store.subscribe();
    let grant = grant("c-1", "task-c", 1_000);
    store.create_grant(&grant).await.unwrap();
    assert_eq!(store.get_grant("c-1").await.unwrap(), Some(grant.clone()));
    assert!(matches!(
        store.create_grant(&grant).await,
        Err(StoreError::AlreadyExists { .. })
    ));
    assert_eq!(store.get_grant("nope").await.unwrap(), None);
    assert_eq!(
        changes.recv().await.unwrap(),
        StoreChange::GrantCreated(grant)
    );
}

pub async fn transitions_are_compare_and_swap(store: &dyn Store) {
    let grant = grant("t-1", "task-t", 1_000);
    store.create_grant(&grant).await.unwrap();
    let used = grant.used(1_001).unwrap();
    store.update_grant(&grant, &used).await.unwrap();
    let stale = grant.used(1_002).unwrap();
    assert!(matches!(
        store.update_grant(&grant, &stale).await,
        Err(StoreError::Conflict { .. })
    ));
    let revoked = used.revoked("ops", "conformance", 1_003).unwrap();
    let mut changes = store.subscribe();
    store.update_grant(&used, &revoked).await.unwrap();
    assert_eq!(
        changes.recv().await.unwrap(),
        StoreChange::GrantRevoked(revoked.clone())
    );
    let revocations = store.revocations().await.unwrap();
    assert!(
        revocations
            .iter()
            .any(|revocation| revocation.grant_id == "t-1"
                && revocation.expires_at == revoked.expires_at)
    );
    let ghost = self::grant("ghost", "task-t", 1_000);
    assert!(matches!(
        store.update_grant(&ghost, &ghost).await,
        Err(StoreError::NotFound { .. })
    ));
}

pub async fn concurrent_uses_never_exceed_the_limit(store: &dyn Store) {
    let grant = grant("u-1", "task-u", 1_000);
    store.create_grant(&grant).await.unwrap();
    let mut successes = 0;
    // Ten contenders read the same record, then each tries to record a use from its stale
    // snapshot: only the first write per snapshot generation may land, and never past max_uses.
    for _round in 0..5 {
        let mut snapshots = Vec::new();
        for _ in 0..10 {
            snapshots.push(store.get_grant("u-1").await.unwrap().unwrap());
        }
        for snapshot in &snapshots {
            if let Ok(next) = snapshot.used(1_001)
                && store.update_grant(snapshot, &next).await.is_ok()
            {
                successes += 1;
            }
        }
    }
    assert_eq!(successes, 3);
    assert_eq!(store.get_grant("u-1").await.unwrap().unwrap().uses, 3);
}

pub async fn listing_filters_and_paginates(store: &dyn Store) {
    for index in 0..7 {
        let mut grant = grant(
            &format!("l-{index}"),
            if index < 4 { "task-l1" } else { "task-l2" },
            2_000,
        );
        if index % 2 == 0 {
            grant.principal = "agent-b".into();
        }
        store.create_grant(&grant).await.unwrap();
    }
    let by_task = GrantFilter {
        task_id: Some("task-l1".into()),
        ..GrantFilter::default()
    };
    let page = store.list_grants(&by_task, 2_000, None, 3).await.unwrap();
    assert_eq!(
        page.grants
            .iter()
            .map(|grant| grant.id.as_str())
            .collect::<Vec<_>>(),
        ["l-0", "l-1", "l-2"]
    );
    let rest = store
        .list_grants(&by_task, 2_000, page.next_after.as_deref(), 3)
        .await
        .unwrap();
    assert_eq!(
        rest.grants
            .iter()
            .map(|grant| grant.id.as_str())
            .collect::<Vec<_>>(),
        ["l-3"]
    );
    assert_eq!(rest.next_after, None);

    let by_principal = GrantFilter {
        principal: Some("agent-b".into()),
        ..GrantFilter::default()
    };
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .list_grants(&by_principal, 2_000, after.as_deref(), 2)
            .await
            .unwrap();
        seen.extend(page.grants.iter().map(|grant| grant.id.clone()));
        match page.next_after {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(seen, ["l-0", "l-2", "l-4", "l-6"]);

    let expired = GrantFilter {
        status: Some(GrantStatus::Expired),
        task_id: Some("task-l2".into()),
        ..GrantFilter::default()
    };
    assert_eq!(
        store
            .list_grants(&expired, 2_000, None, 10)
            .await
            .unwrap()
            .grants
            .len(),
        0
    );
    assert_eq!(
        store
            .list_grants(&expired, 2_300, None, 10)
            .await
            .unwrap()
            .grants
            .len(),
        3
    );
    assert_eq!(store.task_grants("task-l2").await.unwrap().len(), 3);
}

pub async fn sweeping_removes_only_what_is_done(store: &dyn Store) {
    let live = grant("s-live", "task-s", 10_000);
    let old = grant("s-old", "task-s", 5_000);
    store.create_grant(&live).await.unwrap();
    store.create_grant(&old).await.unwrap();
    let revoked = old.revoked("ops", "sweep", 5_001).unwrap();
    store.update_grant(&old, &revoked).await.unwrap();
    let before = store.counts().await.unwrap();
    let report = store.sweep(10_000, Duration::from_secs(60)).await.unwrap();
    assert!(report.n_grants >= 1);
    assert_eq!(store.get_grant("s-old").await.unwrap(), None);
    assert!(store.get_grant("s-live").await.unwrap().is_some());
    assert!(
        !store
            .revocations()
            .await
            .unwrap()
            .iter()
            .any(|revocation| revocation.grant_id == "s-old")
    );
    assert_eq!(store.task_grants("task-s").await.unwrap().len(), 1);
    let after = store.counts().await.unwrap();
    assert_eq!(after.n_grants, before.n_grants - report.n_grants);
}

pub async fn a_marker_is_claimed_once_among_racing_claimants_and_swept_after_its_moment(
    store: &dyn Store,
) {
    assert!(!store.claimed("console-link/a").await.unwrap());
    let claim = || store.claim_once("console-link/a", 20_000);
    let claims = tokio::join!(claim(), claim(), claim(), claim(), claim(), claim());
    let claims = [claims.0, claims.1, claims.2, claims.3, claims.4, claims.5];
    let n_won = claims
        .into_iter()
        .map(Result::unwrap)
        .filter(|won| *won)
        .count();
    assert_eq!(
        n_won, 1,
        "exactly one of six racing claims takes the marker"
    );
    assert!(store.claimed("console-link/a").await.unwrap());
    assert!(!store.claim_once("console-link/a", 30_000).await.unwrap());
    assert!(store.claim_once("console-link/b", 40_000).await.unwrap());
    // Swept once its moment has passed, not before.
    store.sweep(19_999, Duration::from_secs(60)).await.unwrap();
    assert!(store.claimed("console-link/a").await.unwrap());
    store.sweep(20_000, Duration::from_secs(60)).await.unwrap();
    assert!(!store.claimed("console-link/a").await.unwrap());
    assert!(store.claimed("console-link/b").await.unwrap());
}

pub async fn markers_keep_their_payload_and_are_listed_by_prefix_until_swept(store: &dyn Store) {
    assert!(
        store
            .claims_under("console-session/")
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .claim_once_with("console-session/b", 20_000, b"second")
            .await
            .unwrap()
    );
    assert!(
        store
            .claim_once_with("console-session/a", 30_000, b"first")
            .await
            .unwrap()
    );
    // A claim that loses keeps the winner's payload.
    assert!(
        !store
            .claim_once_with("console-session/a", 40_000, b"intruder")
            .await
            .unwrap()
    );
    assert!(
        store
            .claim_once("console-session-ended/a", 30_000)
            .await
            .unwrap()
    );
    assert!(store.claim_once("console-link/x", 30_000).await.unwrap());
    assert_eq!(
        store.claims_under("console-session/").await.unwrap(),
        [
            ("console-session/a".to_string(), b"first".to_vec()),
            ("console-session/b".to_string(), b"second".to_vec()),
        ],
        "in name order, with their payloads, and only under the prefix"
    );
    store.sweep(20_000, Duration::from_secs(60)).await.unwrap();
    assert_eq!(
        store.claims_under("console-session/").await.unwrap(),
        [("console-session/a".to_string(), b"first".to_vec())],
        "swept once its moment has passed"
    );
}

/// How long [`a_lock_excludes_every_other_holder_for_as_long_as_it_is_held`] holds its lock:
/// longer than the lock lease the etcd conformance engine is given (2 s), so a lease that lapsed
/// under a live holder would let the second holder in early.
pub const LOCK_HOLD: Duration = Duration::from_secs(5);

pub async fn a_lock_excludes_every_other_holder_for_as_long_as_it_is_held(store: &dyn Store) {
    let first = store.lock("role/a").await.expect("the free lock is taken");
    let second = async {
        let guard = store.lock("role/a").await;
        (std::time::Instant::now(), guard)
    };
    let hold = async {
        // Meanwhile another name is free.
        let other = store.lock("role/b").await;
        assert!(other.is_ok(), "a lock of another name is not held");
        drop(other);
        tokio::time::sleep(LOCK_HOLD).await;
        let released = std::time::Instant::now();
        drop(first);
        released
    };
    let ((taken, guard), released) = tokio::join!(second, hold);
    assert!(guard.is_ok(), "the lock is taken once it is let go");
    assert!(
        taken >= released,
        "a second holder got the lock while the first still held it"
    );
}

pub async fn key_replacement_is_compare_and_swap(store: &dyn Store) {
    let seal = SealKey::from_base64(&SealKey::generate_base64().unwrap()).unwrap();
    let first = StoredKey::seal(&SigningKey::generate().unwrap(), &seal, 100).unwrap();
    store
        .replace_keys(None, std::slice::from_ref(&first))
        .await
        .unwrap();
    assert!(matches!(
        store.replace_keys(None, std::slice::from_ref(&first)).await,
        Err(StoreError::KeyRingConflict)
    ));
    let second = StoredKey::seal(&SigningKey::generate().unwrap(), &seal, 200).unwrap();
    let retired = first.retired(200, Duration::from_secs(3600), &seal);
    store
        .replace_keys(Some(&first.kid), &[retired.clone(), second.clone()])
        .await
        .unwrap();
    assert!(matches!(
        store
            .replace_keys(Some(&first.kid), std::slice::from_ref(&second))
            .await,
        Err(StoreError::KeyRingConflict)
    ));
    let mut keys = store.keys().await.unwrap();
    keys.sort_by_key(|key| key.created_at);
    assert_eq!(keys, vec![retired, second]);
    let report = store
        .sweep(200 + 3600, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(report.n_keys, 1);
    assert_eq!(store.keys().await.unwrap().len(), 1);
}

pub async fn audit_head_round_trips(store: &dyn Store) {
    assert_eq!(store.audit_head().await.unwrap(), None);
    let head = ChainHead {
        sequence: 42,
        hash: "cd".repeat(32),
    };
    store.record_audit_head(&head).await.unwrap();
    assert_eq!(store.audit_head().await.unwrap(), Some(head));
}

/// A deferred grant reads back at once and is created only once; a checkpoint creates again only
/// the grants the store does not hold, and (on an engine that defers) is read back.
pub async fn deferred_grants_read_back_and_a_checkpoint_creates_what_is_missing(store: &dyn Store) {
    let now = 1_800_000_000;
    let deferred = grant("01deferred", "t-deferred", now);
    store.create_grant_deferred(&deferred).await.unwrap();
    assert_eq!(
        store.get_grant(&deferred.id).await.unwrap(),
        Some(deferred.clone())
    );
    assert!(matches!(
        store.create_grant_deferred(&deferred).await,
        Err(StoreError::AlreadyExists { .. })
    ));
    let missing = grant("01missing", "t-missing", now);
    let mut changed = deferred.clone();
    changed.uses = 2;
    let checkpoint = GrantsCheckpoint {
        sequence: 41,
        at_stop: false,
    };
    let created = store
        .checkpoint_grants(checkpoint, &[changed, missing.clone()])
        .await
        .unwrap();
    if store.defers_grants() {
        assert_eq!(created, vec![missing.id.clone()]);
        assert_eq!(store.get_grant(&missing.id).await.unwrap(), Some(missing));
        assert_eq!(
            store.get_grant(&deferred.id).await.unwrap(),
            Some(deferred),
            "a grant the store holds is left as it is"
        );
        assert_eq!(store.grants_checkpoint().await.unwrap(), Some(checkpoint));
    } else {
        assert!(created.is_empty());
        assert_eq!(store.grants_checkpoint().await.unwrap(), None);
    }
}

pub async fn approvals_are_created_once_and_decided_by_compare_and_swap(store: &dyn Store) {
    use valet_core::approval::{ApprovalKind, ApprovalRequest, ApprovalStatus};
    let pending = ApprovalRequest {
        id: "ap-1".into(),
        kind: ApprovalKind::Token,
        grant_id: "g".into(),
        requester: "agent-a".into(),
        scope: "scope-a".into(),
        environment: "production".into(),
        task_id: "t".into(),
        purpose: String::new(),
        params: BTreeMap::new(),
        ttl_seconds: 0,
        call: None,
        created_at: 100,
        expires_at: 1_000,
        required: 1,
        approvers: Vec::new(),
        confirm: None,
        approvals: Vec::new(),
        status: ApprovalStatus::Pending,
        status_reason: None,
        updated_at: 100,
        mac: None,
    };
    store.create_approval(&pending).await.unwrap();
    assert!(matches!(
        store.create_approval(&pending).await,
        Err(StoreError::AlreadyExists { .. })
    ));
    assert_eq!(
        store.list_approvals(true).await.unwrap(),
        vec![pending.clone()]
    );
    let denied = ApprovalRequest {
        status: ApprovalStatus::Denied,
        updated_at: 200,
        ..pending.clone()
    };
    store.update_approval(&pending, &denied).await.unwrap();
    let approved = ApprovalRequest {
        status: ApprovalStatus::Approved,
        ..pending.clone()
    };
    assert!(
        matches!(
            store.update_approval(&pending, &approved).await,
            Err(StoreError::Conflict { .. })
        ),
        "a decided request cannot be decided again from a stale read"
    );
    assert!(store.list_approvals(true).await.unwrap().is_empty());
    assert_eq!(store.get_approval("ap-1").await.unwrap(), Some(denied));
    store
        .sweep(1_000 + 3_600, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        store.get_approval("ap-1").await.unwrap(),
        None,
        "ended approvals are swept after retention"
    );
}
