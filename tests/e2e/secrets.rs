//! No root secret, principal key or key-encryption key appears in anything valetd writes or says.

use std::time::Duration;

use valet_client::{TokenRequest, v1};
use valet_tests::{
    ADMIN_KEY, AGENT_KEY, Deployment, GITHUB_ROOT_SECRET, OPERATOR_KEY, RAILWAY_ROOT_SECRET,
    SEAL_KEY,
};

#[tokio::test]
async fn a_full_scenario_emits_no_secret_anywhere() {
    let deployment = Deployment::standard();
    let valetd = deployment.start(&["--log-format", "json"]);
    let mut replies = String::new();
    let agent = valetd.client(AGENT_KEY).await;
    let operator = valetd.client(OPERATOR_KEY).await;
    let admin = valetd.client(ADMIN_KEY).await;

    let issued = agent
        .request_token(TokenRequest::new("deploy-staging", "scan").with_param("project", "shop"))
        .await
        .unwrap();
    replies.push_str(&format!("{:?}", issued.grant));
    replies.push_str(&format!(
        "{:?}",
        agent.introspect(issued.token_str()).await.unwrap()
    ));
    replies.push_str(&format!(
        "{:?}",
        agent
            .renew(&issued.grant.id, Some(Duration::from_secs(400)))
            .await
            .unwrap()
            .grant
    ));
    let limited = agent
        .request_token(TokenRequest::new("limited", "scan"))
        .await
        .unwrap();
    for _ in 0..3 {
        replies.push_str(&format!(
            "{:?}",
            agent.introspect(limited.token_str()).await.unwrap()
        ));
    }
    for refused in [
        agent
            .request_token(TokenRequest::new("prod-db", "scan"))
            .await
            .unwrap_err(),
        agent
            .request_token(
                TokenRequest::new("deploy-staging", "scan")
                    .with_param("project", RAILWAY_ROOT_SECRET),
            )
            .await
            .unwrap_err(),
    ] {
        replies.push_str(&refused.to_string());
    }
    replies.push_str(&format!(
        "{:?}",
        agent.introspect("garbage.token.here").await.unwrap()
    ));
    replies.push_str(&format!(
        "{:?}",
        agent
            .broker()
            .get_jwks(v1::GetJwksRequest {})
            .await
            .unwrap()
            .into_inner()
    ));
    replies.push_str(&format!(
        "{:?}",
        operator
            .admin()
            .list_grants(v1::ListGrantsRequest::default())
            .await
            .unwrap()
            .into_inner()
    ));
    replies.push_str(&format!(
        "{:?}",
        admin
            .admin()
            .rotate_signing_key(v1::RotateSigningKeyRequest {})
            .await
            .unwrap()
            .into_inner()
    ));
    replies.push_str(&format!(
        "{:?}",
        admin
            .admin()
            .reload_config(v1::ReloadConfigRequest {})
            .await
            .unwrap()
            .into_inner()
    ));
    replies.push_str(&format!(
        "{:?}",
        agent.revoke_task("scan", "done").await.unwrap()
    ));
    let stranger = valet_client::Client::connect(valet_client::ClientConfig::new(
        valetd.address.clone(),
        valet_core::Secret::from("vk_wrong".to_string()),
    ))
    .await
    .unwrap();
    replies.push_str(
        &stranger
            .request_token(TokenRequest::new("limited", "scan"))
            .await
            .unwrap_err()
            .to_string(),
    );
    let output = valetd.output();
    valetd.stop().await;

    let audit = std::fs::read_to_string(deployment.audit_path()).unwrap();
    let mut stored = Vec::new();
    for entry in walk(&deployment.path("data")) {
        stored.extend(std::fs::read(entry).unwrap());
    }
    assert!(audit.lines().count() > 5, "the scenario was audited");
    assert!(!stored.is_empty(), "the store was written");
    let secrets = [
        RAILWAY_ROOT_SECRET,
        GITHUB_ROOT_SECRET,
        SEAL_KEY,
        AGENT_KEY,
        OPERATOR_KEY,
        ADMIN_KEY,
    ];
    for secret in secrets {
        for (place, text) in [
            ("stdout/stderr", output.as_bytes()),
            ("audit log", audit.as_bytes()),
            ("replies", replies.as_bytes()),
            ("data dir", &stored),
        ] {
            assert!(
                !contains(text, secret.as_bytes()),
                "a secret ({}…) appears in the {place}",
                &secret[..6]
            );
        }
    }
    // Tokens themselves never reach the logs or the audit log either: only fingerprints.
    for place in [output.as_str(), audit.as_str()] {
        assert!(!place.contains(issued.token_str()));
        assert!(!place.contains(limited.token_str()));
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

fn walk(directory: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(directory).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}
