//! Every kind of bad input gets a specific, clear refusal — and nothing is issued for it.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use valet_client::{Client, ClientConfig, TokenRequest, v1};
use valet_core::Secret;
use valet_core::keyring::SigningKey;
use valet_core::token::{self, Claims};
use valet_tests::{AGENT_KEY, Deployment, OPERATOR_KEY};

async fn refusal(client: &Client, request: TokenRequest) -> (tonic::Code, String) {
    let error = client
        .request_token(request)
        .await
        .expect_err("the request should be refused");
    (error.code().expect("an RPC status"), error.to_string())
}

fn staging() -> TokenRequest {
    TokenRequest::new("deploy-staging", "task-bad").with_param("project", "shop")
}

#[tokio::test]
async fn bad_requests_are_refused_naming_the_rule_and_what_is_allowed() {
    let deployment = Deployment::standard();
    let valetd = deployment.start(&[]);
    let agent = valetd.client(AGENT_KEY).await;
    use tonic::Code::{InvalidArgument, PermissionDenied};

    let mut unknown = staging();
    unknown.scope = "drop-production".into();
    assert_eq!(
        refusal(&agent, unknown).await,
        (PermissionDenied, "scope \"drop-production\" does not exist; scopes you may request: [deploy-staging, limited, short]".into())
    );

    let mut not_allowed = staging();
    not_allowed.scope = "prod-db".into();
    let (code, message) = refusal(&agent, not_allowed).await;
    assert_eq!(code, PermissionDenied);
    assert!(
        message.contains("principal \"agent\" may not request scope \"prod-db\""),
        "{message}"
    );

    let (code, message) = refusal(&agent, staging().with_ttl(Duration::from_secs(3600))).await;
    assert_eq!(
        (code, message.as_str()),
        (
            InvalidArgument,
            "ttl 1h exceeds scope \"deploy-staging\" max_ttl 10m"
        )
    );

    let (code, message) = refusal(&agent, TokenRequest::new("deploy-staging", "task-bad")).await;
    assert_eq!(code, InvalidArgument);
    assert!(
        message.contains("requires parameter \"project\""),
        "{message}"
    );

    let (code, message) = refusal(&agent, staging().with_param("region", "eu")).await;
    assert_eq!(code, InvalidArgument);
    assert!(
        message.contains("has no parameter \"region\"; its parameters: [project]"),
        "{message}"
    );

    let (code, message) = refusal(
        &agent,
        TokenRequest::new("deploy-staging", "task-bad").with_param("project", "Prod DB"),
    )
    .await;
    assert_eq!(code, PermissionDenied);
    assert!(
        message.contains("must be a value matching [a-z][a-z0-9-]{0,31}"),
        "{message}"
    );

    let mut long_task = staging();
    long_task.task_id = "t".repeat(129);
    assert_eq!(
        refusal(&agent, long_task).await,
        (
            InvalidArgument,
            "task_id is 129 bytes; at most 128 are allowed".into()
        )
    );

    let (code, message) = refusal(&agent, staging().with_purpose("p".repeat(1025))).await;
    assert_eq!(
        (code, message.as_str()),
        (
            InvalidArgument,
            "purpose is 1025 bytes; at most 1024 are allowed"
        )
    );

    let (code, message) = refusal(
        &agent,
        TokenRequest::new("deploy-staging", "task-bad").with_param("project", "a".repeat(300)),
    )
    .await;
    assert_eq!(
        (code, message.as_str()),
        (
            InvalidArgument,
            "param \"project\" is 300 bytes; at most 256 are allowed"
        )
    );

    let mut crowded = staging();
    for index in 0..40 {
        crowded.params.insert(format!("p{index}"), "v".into());
    }
    assert_eq!(
        refusal(&agent, crowded).await,
        (
            InvalidArgument,
            "params has 41 entries; at most 32 are allowed".into()
        )
    );

    let mut other_audience = staging();
    other_audience.audience = Some("github".into());
    let (code, message) = refusal(&agent, other_audience).await;
    assert_eq!(code, PermissionDenied);
    assert!(
        message.contains("for audience \"railway\" only"),
        "{message}"
    );

    // A message far above any field bound is refused by the transport's size limit.
    let huge = staging().with_purpose("x".repeat(200_000));
    let (code, _) = refusal(&agent, huge).await;
    assert_eq!(code, tonic::Code::OutOfRange);

    let operator = valetd.client(OPERATOR_KEY).await;
    let grants = operator
        .admin()
        .list_grants(v1::ListGrantsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .grants;
    assert!(
        grants.is_empty(),
        "nothing may be issued for a refused request: {grants:?}"
    );
}

#[tokio::test]
async fn bad_or_missing_principal_keys_are_unauthenticated() {
    let deployment = Deployment::standard();
    let valetd = deployment.start(&[]);
    let stranger = Client::connect(ClientConfig::new(
        valetd.address.clone(),
        Secret::from("vk_not_a_real_key".to_string()),
    ))
    .await
    .unwrap();
    let error = stranger.request_token(staging()).await.unwrap_err();
    assert_eq!(error.code(), Some(tonic::Code::Unauthenticated));
    assert!(error.to_string().contains("not known to valetd"), "{error}");

    // No authorization header at all, through a raw channel.
    let channel = tonic::transport::Endpoint::from_shared(valetd.address.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut raw = v1::broker_client::BrokerClient::new(channel);
    let status = raw.get_jwks(v1::GetJwksRequest {}).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert!(
        status.message().contains("authorization: Bearer"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn forged_malformed_and_misdirected_tokens_are_inactive_saying_which_check_failed() {
    let deployment = Deployment::standard();
    let valetd = deployment.start(&[]);
    let agent = valetd.client(AGENT_KEY).await;
    let issued = agent.request_token(staging()).await.unwrap();
    let genuine = issued.token_str().to_string();
    let claims = agent.verify_offline(&genuine, None).await.unwrap();

    let inactive_reason = |token: String| {
        let agent = agent.clone();
        async move {
            let reply = agent.introspect(&token).await.unwrap();
            assert!(!reply.active, "forged token was active: {token}");
            reply.reason
        }
    };

    assert!(
        inactive_reason("not-a-token".into())
            .await
            .contains("malformed")
    );

    let stranger_key = SigningKey::generate().unwrap();
    let foreign = token::sign(
        &Claims {
            exp: claims.exp + 60,
            ..claims.clone()
        },
        &stranger_key,
    );
    assert!(
        inactive_reason(foreign)
            .await
            .contains("not in the key ring")
    );

    let parts: Vec<&str> = genuine.split('.').collect();
    let header: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
    let with_alg = |alg: &str| {
        let mut header = header.clone();
        header["alg"] = serde_json::Value::from(alg);
        URL_SAFE_NO_PAD.encode(header.to_string())
    };
    let alg_none = format!("{}.{}.", with_alg("none"), parts[1]);
    assert!(inactive_reason(alg_none).await.contains("EdDSA only"));

    // HS256 keyed with the public key, the classic algorithm-confusion attack.
    let jwks = agent
        .broker()
        .get_jwks(v1::GetJwksRequest {})
        .await
        .unwrap()
        .into_inner();
    let public_key = URL_SAFE_NO_PAD.decode(&jwks.keys[0].x).unwrap();
    let signing_input = format!("{}.{}", with_alg("HS256"), parts[1]);
    let tag = hmac_sha256(&public_key, signing_input.as_bytes());
    let confused = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(tag));
    assert!(inactive_reason(confused).await.contains("EdDSA only"));

    let mut widened: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    widened["env"] = serde_json::Value::from("production");
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(widened.to_string()),
        parts[2]
    );
    assert!(
        inactive_reason(tampered)
            .await
            .contains("signature does not verify")
    );

    let error = agent
        .verify_offline(&genuine, Some("github"))
        .await
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("for audience \"railway\"; expected \"github\""),
        "{error}"
    );

    // The genuine token is still fine after all that.
    assert!(agent.introspect(&genuine).await.unwrap().active);
}

fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    // HMAC by hand (RFC 2104) so the test needs no extra crypto dependency.
    let mut block = [0u8; 64];
    block[..key.len().min(64)].copy_from_slice(&key[..key.len().min(64)]);
    let digest = |data: &[u8]| Secret::new(data.to_vec()).sha256();
    let inner: Vec<u8> = block
        .iter()
        .map(|byte| byte ^ 0x36)
        .chain(message.iter().copied())
        .collect();
    let outer: Vec<u8> = block
        .iter()
        .map(|byte| byte ^ 0x5c)
        .chain(digest(&inner))
        .collect();
    digest(&outer).to_vec()
}
