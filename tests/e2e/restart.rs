//! A restart keeps grants, revocations, signing keys and the audit chain; rotation keeps old
//! tokens verifiable until they expire.

use std::time::{Duration, Instant};
use valet_client::{TokenRequest, v1};
use valet_core::audit::{self, ChainHead};

use valet_tests::{ADMIN_KEY, AGENT_KEY, Deployment, OPERATOR_KEY, is_active, issue_until};

fn staging(task: &str) -> TokenRequest {
    TokenRequest::new("deploy-staging", task).with_param("project", "shop")
}

async fn audit_head(valetd: &valet_tests::Valetd) -> ChainHead {
    let operator = valetd.client(OPERATOR_KEY).await;
    let head = operator
        .admin()
        .get_audit_head(v1::GetAuditHeadRequest {})
        .await
        .unwrap()
        .into_inner();
    ChainHead {
        sequence: head.sequence,
        hash: head.hash,
    }
}

#[tokio::test]
async fn a_restart_keeps_grants_revocations_keys_and_the_audit_chain() {
    let deployment = Deployment::standard();
    let valetd = deployment.start(&[]);
    let agent = valetd.client(AGENT_KEY).await;
    let kept = agent.request_token(staging("task-kept")).await.unwrap();
    let revoked = agent.request_token(staging("task-revoked")).await.unwrap();
    agent
        .revoke(&revoked.grant.id, "before restart")
        .await
        .unwrap();
    let admin = valetd.client(ADMIN_KEY).await;
    let rotation = admin
        .admin()
        .rotate_signing_key(v1::RotateSigningKeyRequest {})
        .await
        .unwrap()
        .into_inner();
    let head_before = audit_head(&valetd).await;
    assert_eq!(valetd.stop().await, Some(0));

    let valetd = deployment.start(&[]);
    let agent = valetd.client(AGENT_KEY).await;
    assert!(
        agent.introspect(kept.token_str()).await.unwrap().active,
        "a grant issued before the restart is still active"
    );
    let after = agent.introspect(revoked.token_str()).await.unwrap();
    assert!(
        !after.active && after.reason.contains("before restart"),
        "{}",
        after.reason
    );

    let jwks = agent
        .broker()
        .get_jwks(v1::GetJwksRequest {})
        .await
        .unwrap()
        .into_inner();
    let kids: Vec<&str> = jwks.keys.iter().map(|key| key.kid.as_str()).collect();
    assert_eq!(
        kids,
        [
            rotation.new_key_id.as_str(),
            rotation.retired_key_id.as_str()
        ],
        "current key first, retired key kept"
    );

    let fresh = agent.request_token(staging("task-fresh")).await.unwrap();
    assert_eq!(fresh.grant.key_id, rotation.new_key_id);

    // The chain continues across the restart and verifies end to end against the kept head.
    let head_after = audit_head(&valetd).await;
    assert!(head_after.sequence > head_before.sequence);
    let text = std::fs::read_to_string(deployment.audit_path()).unwrap();
    let summary = audit::verify(text.lines(), Some(&head_after)).unwrap();
    assert_eq!(summary.head, head_after);
}

#[tokio::test]
async fn rotation_keeps_old_tokens_verifiable_and_signs_new_ones_with_the_new_key() {
    let deployment = Deployment::standard();
    let valetd = deployment.start(&[]);
    let agent = valetd.client(AGENT_KEY).await;
    let old = agent.request_token(staging("task-old")).await.unwrap();
    assert!(
        agent
            .verify_offline(old.token_str(), Some("railway"))
            .await
            .is_ok()
    );

    let operator = valetd.client(OPERATOR_KEY).await;
    let denied = operator
        .admin()
        .rotate_signing_key(v1::RotateSigningKeyRequest {})
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    assert!(
        denied.message().contains("needs role admin"),
        "{}",
        denied.message()
    );

    let admin = valetd.client(ADMIN_KEY).await;
    let rotation = admin
        .admin()
        .rotate_signing_key(v1::RotateSigningKeyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rotation.retired_key_id, old.grant.key_id);

    let new = agent.request_token(staging("task-new")).await.unwrap();
    assert_eq!(new.grant.key_id, rotation.new_key_id);
    // The verifier's cached JWKS knows only the old key: the unknown kid makes it refresh.
    assert!(
        agent
            .verify_offline(new.token_str(), Some("railway"))
            .await
            .is_ok()
    );
    assert!(
        agent
            .verify_offline(old.token_str(), Some("railway"))
            .await
            .is_ok()
    );
    assert!(agent.introspect(old.token_str()).await.unwrap().active);
    assert!(agent.introspect(new.token_str()).await.unwrap().active);
}

#[tokio::test]
async fn a_cut_audit_log_is_refused_at_start() {
    let deployment = Deployment::standard();
    let valetd = deployment.start(&[]);
    let agent = valetd.client(AGENT_KEY).await;
    for index in 0..3 {
        agent
            .request_token(staging(&format!("task-{index}")))
            .await
            .unwrap();
    }
    valetd.stop().await;
    let text = std::fs::read_to_string(deployment.audit_path()).unwrap();
    let kept: Vec<&str> = text.lines().take(1).collect();
    std::fs::write(deployment.audit_path(), format!("{}\n", kept.join("\n"))).unwrap();
    let (code, output) = deployment.start_expecting_failure(&[]);
    assert_eq!(code, 1);
    assert!(
        output.contains("ends at record 1 but the store's chain head is record 3: the log was cut"),
        "{output}"
    );
}

#[tokio::test]
async fn a_log_moved_aside_for_rotation_is_continued_by_the_new_file() {
    let deployment = Deployment::standard();
    let valetd = deployment.start(&[]);
    let agent = valetd.client(AGENT_KEY).await;
    agent
        .request_token(staging("before-rotation"))
        .await
        .unwrap();
    let head_before = audit_head(&valetd).await;
    valetd.stop().await;
    std::fs::rename(
        deployment.audit_path(),
        deployment.path("audit/audit.jsonl.1"),
    )
    .unwrap();

    let valetd = deployment.start(&[]);
    let agent = valetd.client(AGENT_KEY).await;
    agent
        .request_token(staging("after-rotation"))
        .await
        .unwrap();
    let new_file = std::fs::read_to_string(deployment.audit_path()).unwrap();
    let first: serde_json::Value = serde_json::from_str(new_file.lines().next().unwrap()).unwrap();
    assert_eq!(
        first["seq"],
        head_before.sequence + 1,
        "the sequence continues"
    );
    assert_eq!(
        first["prev"],
        head_before.hash.as_str(),
        "and links to the old file's last record"
    );
    let old_file = std::fs::read_to_string(deployment.path("audit/audit.jsonl.1")).unwrap();
    let both = format!("{old_file}{new_file}");
    assert!(
        audit::verify(both.lines(), Some(&audit_head(&valetd).await)).is_ok(),
        "the two files form one chain"
    );

    // An existing but emptied log is a cut, not a rotation.
    valetd.stop().await;
    std::fs::write(deployment.audit_path(), "").unwrap();
    let (code, output) = deployment.start_expecting_failure(&[]);
    assert_eq!(code, 1);
    assert!(output.contains("the log was cut"), "{output}");
}

/// One commit point: on the embedded store a grant is durable first in its issue record, and in
/// the store with the next checkpoint. A kill -9 under load must still lose no token a client
/// received: start restores from the audit log whatever the store lost.
#[tokio::test]
async fn every_token_a_client_received_survives_kill_9_under_issue_load() {
    let deployment = Deployment::standard();
    let valetd = deployment.start(&[]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..8 {
        let client = valetd.client(AGENT_KEY).await;
        workers.push(tokio::spawn(issue_until(
            client,
            staging(&format!("kill-{worker}")),
            stop.clone(),
            started,
        )));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    valetd.signal("KILL");
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut issued = Vec::new();
    for worker in workers {
        issued.extend(worker.await.unwrap().0);
    }
    assert!(!issued.is_empty());
    drop(valetd);

    let restarted = deployment.start(&[]);
    let agent = restarted.client(AGENT_KEY).await;
    for (_, token) in &issued {
        assert!(
            is_active(&agent, token.token_str()).await,
            "grant {} was handed out, so it must be known after the restart",
            token.grant.id
        );
    }
    // What start restored, it recorded; the chain verifies with the restore records in it.
    let log = std::fs::read_to_string(deployment.audit_path()).unwrap();
    let n_restored = log
        .lines()
        .filter(|line| line.contains("\"action\":\"grant.restore\""))
        .count();
    println!(
        "{} tokens received before kill -9; {n_restored} grants restored from the audit log at start",
        issued.len()
    );
    audit::verify(log.lines(), Some(&audit_head(&restarted).await)).unwrap();
}

/// After a crash, the records past the store's last grants checkpoint are needed to restore what
/// the store lost: a log moved aside then is refused, naming the record, until it is put back.
#[tokio::test]
async fn a_log_moved_aside_after_a_crash_is_refused_until_it_is_put_back() {
    let deployment = Deployment::standard();
    let valetd = deployment.start(&[]);
    let agent = valetd.client(AGENT_KEY).await;
    let issued = agent.request_token(staging("before-crash")).await.unwrap();
    valetd.signal("KILL");
    drop(valetd);
    let aside = deployment.path("audit/audit.jsonl.1");
    std::fs::rename(deployment.audit_path(), &aside).unwrap();

    let (code, output) = deployment.start_expecting_failure(&[]);
    assert_ne!(code, 0, "{output}");
    assert!(
        output.contains("did not stop cleanly")
            && output
                .contains("needed to restore the grants issued since the store's last checkpoint"),
        "says what is missing and why: {output}"
    );
    std::fs::rename(&aside, deployment.audit_path()).unwrap();
    let restarted = deployment.start(&[]);
    let agent = restarted.client(AGENT_KEY).await;
    assert!(is_active(&agent, issued.token_str()).await);
}
