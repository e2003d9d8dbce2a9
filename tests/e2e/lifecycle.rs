//! The life of a grant: issue, introspect, renew, use limits, revoke, revoke a task, expire.

use std::time::Duration;

use valet_client::{TokenRequest, v1};
use valet_tests::{AGENT_KEY, Deployment, OPERATOR_KEY, OTHER_AGENT_KEY, eventually};

fn staging(task: &str) -> TokenRequest {
    TokenRequest::new("deploy-staging", task)
        .with_purpose("e2e")
        .with_param("project", "shop")
}

#[tokio::test]
async fn issue_introspect_revoke_and_the_revocation_is_in_force_on_return() {
    let deployment = Deployment::standard();
    let valetd = deployment.start(&[]);
    let agent = valetd.client(AGENT_KEY).await;

    let issued = agent.request_token(staging("task-1")).await.unwrap();
    assert_eq!(issued.grant.scope, "deploy-staging");
    assert_eq!(issued.grant.environment, "staging");
    assert_eq!(
        issued.grant.params.get("project").map(String::as_str),
        Some("shop")
    );
    assert_eq!(issued.grant.status, v1::GrantStatus::Active as i32);
    let lifetime =
        issued.grant.expires_at.unwrap().seconds - issued.grant.issued_at.unwrap().seconds;
    assert_eq!(lifetime, 300, "the scope's default TTL");

    let claims = agent
        .verify_offline(issued.token_str(), Some("railway"))
        .await
        .unwrap();
    assert_eq!(
        (
            claims.sub.as_str(),
            claims.jti.as_str(),
            claims.env.as_str()
        ),
        ("agent", issued.grant.id.as_str(), "staging")
    );
    assert_eq!(
        claims.params.get("project").map(String::as_str),
        Some("shop")
    );

    let introspection = agent.introspect(issued.token_str()).await.unwrap();
    assert!(introspection.active, "{}", introspection.reason);

    let revoked = agent
        .revoke(&issued.grant.id, "finished early")
        .await
        .unwrap();
    assert_eq!(revoked.grant.status, v1::GrantStatus::Revoked as i32);
    let after = agent.introspect(issued.token_str()).await.unwrap();
    assert!(!after.active);
    assert!(
        after.reason.contains("revoked by agent: finished early"),
        "{}",
        after.reason
    );
    // Revoking again changes nothing and is not an error.
    assert_eq!(
        agent
            .revoke(&issued.grant.id, "again")
            .await
            .unwrap()
            .grant
            .status_reason,
        revoked.grant.status_reason
    );
}

#[tokio::test]
async fn revoking_a_task_ends_all_its_grants_and_only_the_callers() {
    let deployment = Deployment::standard();
    let valetd = deployment.start(&[]);
    let agent = valetd.client(AGENT_KEY).await;
    let other = valetd.client(OTHER_AGENT_KEY).await;

    let first = agent.request_token(staging("task-a")).await.unwrap();
    let second = agent
        .request_token(TokenRequest::new("limited", "task-a"))
        .await
        .unwrap();
    let elsewhere = agent.request_token(staging("task-b")).await.unwrap();
    let foreign = other.request_token(staging("task-a")).await.unwrap();

    // Another agent cannot revoke this agent's grant.
    let error = other.revoke(&first.grant.id, "mine now").await.unwrap_err();
    assert_eq!(error.code(), Some(tonic::Code::PermissionDenied));
    assert!(
        error.to_string().contains("only on its own grants"),
        "{error}"
    );

    let revoked = agent.revoke_task("task-a", "task done").await.unwrap();
    assert_eq!(revoked.len(), 2);
    let operator = valetd.client(OPERATOR_KEY).await;
    for token in [&first, &second] {
        assert!(!operator.introspect(token.token_str()).await.unwrap().active);
    }
    assert!(
        operator
            .introspect(elsewhere.token_str())
            .await
            .unwrap()
            .active
    );
    assert!(
        operator
            .introspect(foreign.token_str())
            .await
            .unwrap()
            .active,
        "another principal's grants in a same-named task stay"
    );
}

#[tokio::test]
async fn uses_are_counted_and_a_grant_runs_out() {
    let deployment = Deployment::standard();
    let valetd = deployment.start(&[]);
    let agent = valetd.client(AGENT_KEY).await;
    let issued = agent
        .request_token(TokenRequest::new("limited", "task-uses"))
        .await
        .unwrap();
    assert_eq!(issued.grant.max_uses, 2);
    assert!(agent.introspect(issued.token_str()).await.unwrap().active);
    let second = agent.introspect(issued.token_str()).await.unwrap();
    assert!(second.active);
    assert_eq!(second.grant.unwrap().uses, 2);
    let third = agent.introspect(issued.token_str()).await.unwrap();
    assert!(!third.active);
    assert!(
        third.reason.contains("used all 2 of its uses"),
        "{}",
        third.reason
    );
}

#[tokio::test]
async fn renewal_extends_within_the_max_lifetime_only_where_allowed() {
    let deployment = Deployment::standard();
    let valetd = deployment.start(&[]);
    let agent = valetd.client(AGENT_KEY).await;
    let issued = agent
        .request_token(staging("task-renew").with_ttl(Duration::from_secs(60)))
        .await
        .unwrap();
    let renewed = agent
        .renew(&issued.grant.id, Some(Duration::from_secs(600)))
        .await
        .unwrap();
    assert!(renewed.grant.expires_at.unwrap().seconds > issued.grant.expires_at.unwrap().seconds);
    assert_eq!(renewed.grant.id, issued.grant.id);
    assert!(agent.introspect(renewed.token_str()).await.unwrap().active);
    // At the max lifetime, a further renewal has nothing to extend.
    let error = agent
        .renew(&issued.grant.id, Some(Duration::from_secs(600)))
        .await
        .unwrap_err();
    assert_eq!(
        error.code(),
        Some(tonic::Code::FailedPrecondition),
        "{error}"
    );
    assert!(error.to_string().contains("max lifetime"), "{error}");

    let other = valetd.client(OTHER_AGENT_KEY).await;
    let production = other
        .request_token(TokenRequest::new("prod-db", "task-prod"))
        .await
        .unwrap();
    let error = other.renew(&production.grant.id, None).await.unwrap_err();
    assert_eq!(error.code(), Some(tonic::Code::PermissionDenied));
    assert!(
        error.to_string().contains("does not allow renewal"),
        "{error}"
    );
}

#[tokio::test]
async fn a_token_expires_on_time() {
    let deployment = Deployment::standard();
    let valetd = deployment.start(&[]);
    let agent = valetd.client(AGENT_KEY).await;
    let issued = agent
        .request_token(TokenRequest::new("short", "task-short"))
        .await
        .unwrap();
    assert!(agent.introspect(issued.token_str()).await.unwrap().active);
    let expired = eventually(Duration::from_secs(10), || async {
        let reply = agent.introspect(issued.token_str()).await.unwrap();
        !reply.active && reply.reason.contains("expired")
    })
    .await;
    assert!(expired, "a 2 s token was still active after 10 s");
    let error = agent.renew(&issued.grant.id, None).await.unwrap_err();
    assert!(error.to_string().contains("it is expired"), "{error}");
}

#[tokio::test]
async fn a_task_guard_revokes_its_grants_when_it_ends_or_is_dropped() {
    let deployment = Deployment::standard();
    let valetd = deployment.start(&[]);
    let agent = valetd.client(AGENT_KEY).await;

    let guard = agent.task("guarded-1");
    let token = guard
        .request("deploy-staging", &[("project", "web")], None)
        .await
        .unwrap();
    assert!(agent.introspect(token.token_str()).await.unwrap().active);
    assert_eq!(guard.end().await.unwrap(), vec![token.grant.id.clone()]);
    assert!(!agent.introspect(token.token_str()).await.unwrap().active);

    let dropped = {
        let guard = agent.task("guarded-2");
        guard
            .request("deploy-staging", &[("project", "web")], None)
            .await
            .unwrap()
    };
    let revoked = eventually(Duration::from_secs(10), || async {
        !agent.introspect(dropped.token_str()).await.unwrap().active
    })
    .await;
    assert!(
        revoked,
        "dropping the guard did not revoke the task's grant"
    );
}
