//! The operator's API: listing with filters and pages, watching, revoke-all, config reload.

use std::time::Duration;

use futures::FutureExt;
use tokio_stream::StreamExt;
use valet_client::{TokenRequest, v1};
use valet_tests::{
    ADMIN_KEY, AGENT_KEY, Deployment, OPERATOR_KEY, OTHER_AGENT_KEY, standard_config,
};

fn staging(task: &str) -> TokenRequest {
    TokenRequest::new("deploy-staging", task).with_param("project", "shop")
}

fn filter(principal: &str, status: v1::GrantStatus) -> Option<v1::GrantFilter> {
    Some(v1::GrantFilter {
        principal: principal.into(),
        status: status as i32,
        ..v1::GrantFilter::default()
    })
}

#[tokio::test]
async fn listing_filters_paginates_and_agents_see_only_their_own() {
    let deployment = Deployment::standard();
    let valetd = deployment.start(&[]);
    let agent = valetd.client(AGENT_KEY).await;
    let other = valetd.client(OTHER_AGENT_KEY).await;
    for index in 0..5 {
        agent
            .request_token(staging(&format!("list-{index}")))
            .await
            .unwrap();
    }
    other.request_token(staging("list-other")).await.unwrap();

    let operator = valetd.client(OPERATOR_KEY).await;
    let mut seen = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = operator
            .admin()
            .list_grants(v1::ListGrantsRequest {
                filter: filter("agent", v1::GrantStatus::Active),
                page_size: 2,
                page_token,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.grants.len() <= 2);
        seen.extend(page.grants.into_iter().map(|grant| grant.task_id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(
        seen,
        ["list-0", "list-1", "list-2", "list-3", "list-4"],
        "oldest first, every page"
    );

    let own = agent
        .admin()
        .list_grants(v1::ListGrantsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .grants;
    assert_eq!(own.len(), 5);
    assert!(own.iter().all(|grant| grant.principal == "agent"));
    let snooping = agent
        .admin()
        .list_grants(v1::ListGrantsRequest {
            filter: filter("other-agent", v1::GrantStatus::Unspecified),
            ..Default::default()
        })
        .await;
    assert_eq!(snooping.unwrap_err().code(), tonic::Code::PermissionDenied);

    let too_big = operator
        .admin()
        .list_grants(v1::ListGrantsRequest {
            page_size: 5000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(too_big.code(), tonic::Code::InvalidArgument);
    assert!(
        too_big.message().contains("maximum 1000"),
        "{}",
        too_big.message()
    );
}

#[tokio::test]
async fn revoke_all_by_principal_scope_and_environment_needs_an_operator_and_a_reason() {
    let deployment = Deployment::standard();
    let valetd = deployment.start(&[]);
    let agent = valetd.client(AGENT_KEY).await;
    let other = valetd.client(OTHER_AGENT_KEY).await;
    let a1 = agent.request_token(staging("ra-1")).await.unwrap();
    let a2 = agent
        .request_token(TokenRequest::new("limited", "ra-2"))
        .await
        .unwrap();
    let o1 = other.request_token(staging("ra-3")).await.unwrap();
    let o2 = other
        .request_token(TokenRequest::new("prod-db", "ra-4"))
        .await
        .unwrap();
    use v1::revoke_all_request::Target;

    let denied = agent
        .admin()
        .revoke_all(v1::RevokeAllRequest {
            target: Some(Target::Principal("other-agent".into())),
            reason: "x".into(),
        })
        .await;
    let denied = denied.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    assert!(
        denied.message().contains("needs role operator"),
        "{}",
        denied.message()
    );

    let operator = valetd.client(OPERATOR_KEY).await;
    let no_reason = operator
        .admin()
        .revoke_all(v1::RevokeAllRequest {
            target: Some(Target::Scope("deploy-staging".into())),
            reason: String::new(),
        })
        .await;
    assert_eq!(no_reason.unwrap_err().code(), tonic::Code::InvalidArgument);
    let no_target = operator
        .admin()
        .revoke_all(v1::RevokeAllRequest {
            target: None,
            reason: "r".into(),
        })
        .await
        .unwrap_err();
    assert!(
        no_target.message().contains("target"),
        "{}",
        no_target.message()
    );

    let revoke = |target| {
        let operator = operator.clone();
        async move {
            operator
                .admin()
                .revoke_all(v1::RevokeAllRequest {
                    target: Some(target),
                    reason: "incident 42".into(),
                })
                .await
                .unwrap()
                .into_inner()
                .n_revoked
        }
    };
    assert_eq!(revoke(Target::Environment("production".into())).await, 1);
    assert!(!operator.introspect(o2.token_str()).await.unwrap().active);
    assert!(operator.introspect(o1.token_str()).await.unwrap().active);
    assert_eq!(revoke(Target::Scope("deploy-staging".into())).await, 2);
    assert!(!operator.introspect(a1.token_str()).await.unwrap().active);
    assert!(!operator.introspect(o1.token_str()).await.unwrap().active);
    assert_eq!(revoke(Target::Principal("agent".into())).await, 1);
    let last = operator.introspect(a2.token_str()).await.unwrap();
    assert!(
        !last.active && last.reason.contains("revoked by operator: incident 42"),
        "{}",
        last.reason
    );
}

#[tokio::test]
async fn a_watch_or_tail_stream_ends_when_the_key_that_opened_it_is_rotated() {
    let deployment = Deployment::standard();
    let valetd = deployment.start(&[]);
    let operator = valetd.client(OPERATOR_KEY).await;
    let mut grants = operator
        .admin()
        .watch_grants(v1::WatchGrantsRequest { filter: None })
        .await
        .unwrap()
        .into_inner();
    let mut tail = operator
        .admin()
        .audit_tail(v1::AuditTailRequest {
            last: 0,
            follow: true,
        })
        .await
        .unwrap()
        .into_inner();
    // The operator's key is rotated out (config change, reload).
    let config = std::fs::read_to_string(deployment.config_path()).unwrap();
    std::fs::write(
        deployment.config_path(),
        config.replace(
            &valet_tests::sha256_hex(OPERATOR_KEY),
            &valet_tests::sha256_hex("vk_test_operator_rotated_91"),
        ),
    )
    .unwrap();
    valetd
        .client(ADMIN_KEY)
        .await
        .admin()
        .reload_config(v1::ReloadConfigRequest {})
        .await
        .expect("the reload applies");
    // Both streams end within seconds with the reason, though nothing else happened on them.
    for (name, ended) in [
        (
            "WatchGrants",
            async {
                loop {
                    match grants.next().await {
                        Some(Ok(_)) => continue,
                        Some(Err(status)) => return Some(status),
                        None => return None,
                    }
                }
            }
            .boxed(),
        ),
        (
            "AuditTail",
            async {
                loop {
                    match tail.next().await {
                        Some(Ok(_)) => continue,
                        Some(Err(status)) => return Some(status),
                        None => return None,
                    }
                }
            }
            .boxed(),
        ),
    ] {
        let status = tokio::time::timeout(Duration::from_secs(15), ended)
            .await
            .unwrap_or_else(|_| panic!("{name} kept streaming after the key was rotated"))
            .unwrap_or_else(|| panic!("{name} ended without saying why"));
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{name}");
        assert!(
            status.message().contains("key was replaced"),
            "{name}: {}",
            status.message()
        );
    }
    assert!(
        deployment
            .audit_records()
            .iter()
            .any(|record| record["reason_kind"] == "credential_withdrawn"),
        "the end is audited"
    );
}

#[tokio::test]
async fn watching_streams_issues_renewals_and_revocations() {
    let deployment = Deployment::standard();
    let valetd = deployment.start(&[]);
    let operator = valetd.client(OPERATOR_KEY).await;
    let mut stream = operator
        .admin()
        .watch_grants(v1::WatchGrantsRequest { filter: None })
        .await
        .unwrap()
        .into_inner();
    let agent = valetd.client(AGENT_KEY).await;
    let issued = agent.request_token(staging("watched")).await.unwrap();
    agent
        .renew(&issued.grant.id, Some(Duration::from_secs(400)))
        .await
        .unwrap();
    agent.revoke(&issued.grant.id, "done").await.unwrap();
    let mut kinds = Vec::new();
    while kinds.len() < 3 {
        let event = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("an event within 10 s")
            .unwrap()
            .unwrap();
        assert_eq!(event.grant.as_ref().unwrap().id, issued.grant.id);
        kinds.push(v1::GrantEventKind::try_from(event.kind).unwrap());
    }
    assert_eq!(
        kinds,
        [
            v1::GrantEventKind::Issued,
            v1::GrantEventKind::Renewed,
            v1::GrantEventKind::Revoked
        ]
    );
}

#[tokio::test]
async fn reload_applies_a_valid_config_atomically_and_keeps_the_old_one_otherwise() {
    let deployment = Deployment::standard();
    let valetd = deployment.start(&[]);
    let agent = valetd.client(AGENT_KEY).await;
    let admin = valetd.client(ADMIN_KEY).await;
    let operator = valetd.client(OPERATOR_KEY).await;

    let denied = operator
        .admin()
        .reload_config(v1::ReloadConfigRequest {})
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    assert!(
        denied.message().contains("needs role admin"),
        "{}",
        denied.message()
    );

    // A new scope, granted to the agent.
    let added = standard_config(
        "\n[[scope]]\nname = \"docs-read\"\ncredential = \"github\"\nenvironment = \"ci\"\naudience = \"github\"\ndefault_ttl = \"1m\"\nmax_ttl = \"5m\"\n",
    )
    .replace("scopes = [\"deploy-staging\", \"limited\", \"short\"]", "scopes = [\"deploy-staging\", \"limited\", \"short\", \"docs-read\"]");
    std::fs::write(deployment.config_path(), &added).unwrap();
    let reply = admin
        .admin()
        .reload_config(v1::ReloadConfigRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (reply.n_scopes, reply.n_principals, reply.n_credentials),
        (5, 4, 2)
    );
    agent
        .request_token(TokenRequest::new("docs-read", "after-reload"))
        .await
        .unwrap();

    // A broken file is refused whole; the running config stays.
    std::fs::write(
        deployment.config_path(),
        added.replace("max_ttl = \"5m\"", "max_ttl = \"5 fortnights\""),
    )
    .unwrap();
    let refused = admin
        .admin()
        .reload_config(v1::ReloadConfigRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused
            .message()
            .contains("the running config stays in force"),
        "{}",
        refused.message()
    );
    assert!(
        refused
            .message()
            .contains("scope[4].max_ttl: \"5 fortnights\" is not a valid duration"),
        "{}",
        refused.message()
    );
    agent
        .request_token(TokenRequest::new("docs-read", "still-there"))
        .await
        .unwrap();

    // SIGHUP reloads too: taking the scope away again.
    std::fs::write(deployment.config_path(), standard_config("")).unwrap();
    valetd.signal("HUP");
    let gone = valet_tests::eventually(Duration::from_secs(10), || async {
        agent
            .request_token(TokenRequest::new("docs-read", "after-hup"))
            .await
            .is_err_and(|error| error.code() == Some(tonic::Code::PermissionDenied))
    })
    .await;
    assert!(gone, "SIGHUP did not reload the config");
}
