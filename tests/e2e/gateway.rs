//! The gateway against real HTTP upstreams: allowed calls arrive with the root credential and
//! without the agent's token; denied calls never arrive; every smuggling trick is refused.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use valet_client::TokenRequest;
use valet_tests::upstream::{Upstream, call, raw_request};
use valet_tests::{
    AGENT_KEY, Deployment, GITHUB_ROOT_SECRET, RAILWAY_ROOT_SECRET, standard_config,
};

/// The standard config plus a gateway with three upstreams on the test server (GraphQL, REST
/// with a header credential, REST with a query credential) and two that fail.
pub(crate) fn gateway_config(upstream: &Upstream) -> String {
    let url = upstream.url();
    standard_config(&format!(
        r#"
[[upstream]]
name = "railway"
base_url = "{url}"
credential = "railway"
[upstream.inject]
header = {{ Authorization = "Bearer {{secret}}" }}

[[upstream]]
name = "rest"
base_url = "{url}/api"
credential = "github"
headers = {{ X-Upstream-Note = "via valet" }}
timeout = "1s"
[upstream.inject]
header = {{ Authorization = "token {{secret}}" }}

[[upstream]]
name = "keyed"
base_url = "{url}"
credential = "github"
[upstream.inject]
query = {{ api_key = "{{secret}}" }}

[[upstream]]
name = "nowhere"
base_url = "http://127.0.0.1:9"
credential = "github"
connect_timeout = "1s"
[upstream.inject]
header = {{ Authorization = "Bearer {{secret}}" }}

[[scope]]
name = "railway-domains"
upstream = "railway"
environment = "staging"
default_ttl = "5m"
max_ttl = "10m"
[[scope.allow]]
path = "/graphql/v2"
graphql = {{ query = ["project", "projects"], mutation = ["customDomainCreate"] }}

[[scope]]
name = "rest-projects"
upstream = "rest"
environment = "staging"
default_ttl = "5m"
max_ttl = "10m"
[scope.params.project]
pattern = "[a-z]+"
[[scope.allow]]
methods = ["GET", "HEAD"]
path = "/v1/projects/{{project}}/**"
query = {{ page = {{ pattern = "[0-9]{{1,4}}" }} }}
[[scope.allow]]
method = "POST"
path = "/v1/projects/{{project}}/deploys"
max_body = 64
max_calls = 2
[[scope.allow]]
method = "GET"
path = "/stream"
[[scope.allow]]
method = "GET"
path = "/slow"

[[scope]]
name = "rest-short"
upstream = "rest"
environment = "staging"
default_ttl = "2s"
max_ttl = "2s"
[[scope.allow]]
method = "GET"
path = "/**"
query = {{ limit = {{ pattern = "[0-9]{{1,3}}" }} }}

[[scope]]
name = "keyed-read"
upstream = "keyed"
environment = "staging"
default_ttl = "5m"
max_ttl = "10m"
[[scope.allow]]
method = "GET"
path = "/items"
query = {{ limit = {{ pattern = "[0-9]{{1,3}}" }} }}

[[scope]]
name = "nowhere-read"
upstream = "nowhere"
environment = "staging"
default_ttl = "5m"
max_ttl = "10m"
[[scope.allow]]
method = "GET"
path = "/**"
query = {{ limit = {{ pattern = "[0-9]{{1,3}}" }} }}
"#
    ))
    .replace("listen = \"127.0.0.1:0\"\n", "listen = \"127.0.0.1:0\"\ngateway_listen = \"127.0.0.1:0\"\n")
    .replace(
        "scopes = [\"deploy-staging\", \"limited\", \"short\"]",
        "scopes = [\"deploy-staging\", \"limited\", \"short\", \"railway-domains\", \"rest-projects\", \"rest-short\", \"keyed-read\", \"nowhere-read\"]",
    )
}

fn graphql(query: &str) -> String {
    serde_json::json!({ "query": query }).to_string()
}

#[tokio::test]
async fn graphql_calls_pass_only_with_allowed_fields_and_denied_ones_never_reach_the_upstream() {
    let upstream = Upstream::start().await;
    let deployment = Deployment::new(&gateway_config(&upstream));
    let valetd = deployment.start(&[]);
    let gateway = valetd.gateway.clone().expect("the gateway listens");
    let agent = valetd.client(AGENT_KEY).await;
    let issued = agent
        .request_token(TokenRequest::new("railway-domains", "gw-graphql"))
        .await
        .unwrap();
    let token = issued.token_str();

    let allowed = call(
        &gateway,
        "POST",
        "/u/railway/graphql/v2",
        token,
        &graphql("mutation { customDomainCreate(input: {domain: \"shop.example.com\"}) { id } }"),
        &[("cookie", "agent-session=1")],
    )
    .await;
    assert_eq!(allowed.status, 200, "{}", allowed.body);
    assert_eq!(allowed.body, r#"{"data":{"ok":true}}"#);
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].target, "/graphql/v2");
    assert_eq!(
        seen[0].header("authorization"),
        Some(format!("Bearer {RAILWAY_ROOT_SECRET}").as_str()),
        "the root credential is injected"
    );
    assert!(
        seen[0]
            .headers
            .iter()
            .all(|(_, value)| !value.contains(token)),
        "the agent's token never goes upstream"
    );
    assert_eq!(seen[0].header("cookie"), None, "cookies are stripped");

    let smuggled = [
        ("a plain destructive mutation", graphql("mutation { volumeDelete(volumeId: \"prod\") }")),
        ("an alias that looks allowed", graphql("mutation { customDomainCreate: volumeDelete(volumeId: \"prod\") }")),
        ("a fragment", graphql("mutation { ...Gone } fragment Gone on Mutation { volumeDelete(volumeId: \"prod\") }")),
        ("an inline fragment", graphql("mutation { ... on Mutation { volumeDelete(volumeId: \"prod\") } }")),
        (
            "a batch",
            serde_json::json!([{"query": "{ project(id: \"p\") { id } }"}, {"query": "mutation { volumeDelete(volumeId: \"prod\") }"}]).to_string(),
        ),
        (
            "an operationName naming the harmless operation",
            serde_json::json!({"query": "query Safe { project(id: \"p\") { id } } mutation Evil { volumeDelete(volumeId: \"prod\") }", "operationName": "Safe"}).to_string(),
        ),
    ];
    for (trick, body) in smuggled {
        let denied = call(&gateway, "POST", "/u/railway/graphql/v2", token, &body, &[]).await;
        assert_eq!(denied.status, 403, "{trick}: {}", denied.body);
        let reply = denied.json();
        assert_eq!(reply["asked"], "mutation volumeDelete", "{trick}: {reply}");
        assert_eq!(reply["grant"], issued.grant.id.as_str());
        assert_eq!(reply["scope"], "railway-domains");
        assert!(
            reply["rules"]
                .as_str()
                .unwrap()
                .contains("mutation [customDomainCreate]"),
            "{reply}"
        );
        assert!(
            reply["reason"]
                .as_str()
                .unwrap()
                .contains("mutation volumeDelete is not allowed"),
            "{reply}"
        );
    }
    // A body that is not JSON is refused as it is read (400); a document that does not pass
    // the GraphQL rule is denied (403).
    let unreadable = call(
        &gateway,
        "POST",
        "/u/railway/graphql/v2",
        token,
        "{not json",
        &[],
    )
    .await;
    assert_eq!(unreadable.status, 400, "{}", unreadable.body);
    for body in [
        &graphql("mutation { volumeDelete("),
        &graphql("subscription { project { id } }"),
    ] {
        let denied = call(&gateway, "POST", "/u/railway/graphql/v2", token, body, &[]).await;
        assert_eq!(denied.status, 403, "{body}: {}", denied.body);
    }
    let wrong_method = call(&gateway, "GET", "/u/railway/graphql/v2", token, "", &[]).await;
    assert_eq!(wrong_method.status, 403);
    assert_eq!(
        upstream.seen().len(),
        1,
        "no denied call reached the upstream"
    );

    // The audit log has the forwarded call with its fields and status, and each denial (the
    // first of a kind whole, repeats counted in the summary written when valetd stops).
    let output = valetd.stop_with_output().await;
    let audit = std::fs::read_to_string(deployment.audit_path()).unwrap();
    let records: Vec<serde_json::Value> = audit
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let forwarded = records
        .iter()
        .find(|record| record["action"] == "gateway.call" && record["outcome"] == "allowed")
        .unwrap();
    assert_eq!(
        forwarded["graphql"],
        serde_json::json!(["mutation customDomainCreate"])
    );
    assert_eq!(forwarded["grant_id"], issued.grant.id.as_str());
    let closing = records
        .iter()
        .find(|record| record["action"] == "gateway.response")
        .unwrap();
    assert_eq!(closing["status"], "200");
    assert_eq!(closing["bytes"], 20);
    assert!(deployment.refused_calls() >= 9);
    for place in [audit.as_str(), output.as_str()] {
        assert!(
            !place.contains(RAILWAY_ROOT_SECRET) && !place.contains(token),
            "no secret and no token in logs or audit"
        );
    }
}

#[tokio::test]
async fn rest_calls_are_matched_on_method_path_and_params_and_paths_are_never_guessed() {
    let upstream = Upstream::start().await;
    let deployment = Deployment::new(&gateway_config(&upstream));
    let valetd = deployment.start(&[]);
    let gateway = valetd.gateway.clone().unwrap();
    let agent = valetd.client(AGENT_KEY).await;
    let issued = agent
        .request_token(TokenRequest::new("rest-projects", "gw-rest").with_param("project", "shop"))
        .await
        .unwrap();
    let token = issued.token_str();

    let allowed = call(
        &gateway,
        "GET",
        "/u/rest/v1/projects/shop/services?page=2",
        token,
        "",
        &[("x-api-key", "agent-supplied")],
    )
    .await;
    assert_eq!(allowed.status, 200, "{}", allowed.body);
    assert_eq!(
        allowed.json()["target"],
        "/api/v1/projects/shop/services?page=2",
        "base path + path + query"
    );
    // Answer headers pass an allowlist: what clients read about the body, never a cookie the
    // root credential's session set.
    assert!(
        allowed.headers.get("set-cookie").is_none(),
        "{:?}",
        allowed.headers
    );
    let seen = upstream.seen();
    assert_eq!(
        seen[0].header("authorization"),
        Some(format!("token {GITHUB_ROOT_SECRET}").as_str())
    );
    assert_eq!(seen[0].header("x-upstream-note"), Some("via valet"));
    assert_eq!(
        seen[0].header("x-api-key"),
        None,
        "credential-like headers from the agent are stripped"
    );

    let n_seen = upstream.seen().len();
    let other_project = call(
        &gateway,
        "GET",
        "/u/rest/v1/projects/bank/services",
        token,
        "",
        &[],
    )
    .await;
    assert_eq!(
        other_project.status, 403,
        "{{project}} must equal the grant's param"
    );
    assert_eq!(
        other_project.json()["asked"],
        "GET /v1/projects/bank/services"
    );
    assert_eq!(
        call(
            &gateway,
            "DELETE",
            "/u/rest/v1/projects/shop/services",
            token,
            "",
            &[]
        )
        .await
        .status,
        403
    );

    for smuggled in [
        "/u/rest/v1/projects/shop/../../bank/services",
        "/u/rest/v1/projects/shop/%2e%2e/bank/services",
        "/u/rest/v1/projects/shop%2F..%2Fbank/services",
        "/u/rest/v1/projects//shop/services",
        "/u/rest/v1/projects/shop/./services",
        "/u/rest/v1/projects/shop/a%5Cb",
    ] {
        let (status, body) = raw_request(
            &gateway,
            "GET",
            smuggled,
            &[("authorization", &format!("Bearer {token}"))],
            b"",
        )
        .await;
        assert_eq!(status, 400, "{smuggled}: {body}");
        assert!(
            body.contains("\"error\":\"bad_path\""),
            "{smuggled}: {body}"
        );
    }

    let deploy = call(
        &gateway,
        "POST",
        "/u/rest/v1/projects/shop/deploys",
        token,
        "{\"ref\":\"main\"}",
        &[],
    )
    .await;
    assert_eq!(deploy.status, 200);
    assert_eq!(
        upstream.seen().last().unwrap().body,
        Bytes::from_static(b"{\"ref\":\"main\"}"),
        "the body arrives byte for byte"
    );
    let oversized = call(
        &gateway,
        "POST",
        "/u/rest/v1/projects/shop/deploys",
        token,
        &"x".repeat(65),
        &[],
    )
    .await;
    assert_eq!(oversized.status, 413, "{}", oversized.body);
    assert!(
        oversized.json()["message"]
            .as_str()
            .unwrap()
            .contains("64 bytes")
    );
    assert_eq!(
        call(
            &gateway,
            "POST",
            "/u/rest/v1/projects/shop/deploys",
            token,
            "{}",
            &[]
        )
        .await
        .status,
        200
    );
    let third = call(
        &gateway,
        "POST",
        "/u/rest/v1/projects/shop/deploys",
        token,
        "{}",
        &[],
    )
    .await;
    assert_eq!(third.status, 403, "max_calls = 2");
    assert!(
        third.json()["message"]
            .as_str()
            .unwrap()
            .contains("has made all 2 calls"),
        "{}",
        third.body
    );
    assert_eq!(
        upstream.seen().len(),
        n_seen + 2,
        "only the two allowed deploys arrived"
    );

    // A token for one upstream is refused at another (its audience is pinned to the upstream).
    let elsewhere = call(&gateway, "GET", "/u/keyed/items", token, "", &[]).await;
    assert_eq!(elsewhere.status, 401);
    assert!(
        elsewhere.json()["message"]
            .as_str()
            .unwrap()
            .contains("audience"),
        "{}",
        elsewhere.body
    );
    // No token, an unknown upstream, an unknown route.
    assert_eq!(
        call(&gateway, "GET", "/u/rest/v1/projects/shop/x", "", "", &[])
            .await
            .status,
        401
    );
    assert_eq!(
        call(&gateway, "GET", "/u/gitlab/x", token, "", &[])
            .await
            .status,
        404
    );
    assert_eq!(
        call(&gateway, "GET", "/admin", token, "", &[]).await.status,
        404
    );
}

#[tokio::test]
async fn query_credentials_are_injected_and_cannot_be_overridden() {
    let upstream = Upstream::start().await;
    let deployment = Deployment::new(&gateway_config(&upstream));
    let valetd = deployment.start(&[]);
    let gateway = valetd.gateway.clone().unwrap();
    let agent = valetd.client(AGENT_KEY).await;
    let issued = agent
        .request_token(TokenRequest::new("keyed-read", "gw-keyed"))
        .await
        .unwrap();
    // The agent may not set the parameter the root credential goes in: it is no parameter of
    // the rule, so the call is refused and the upstream never sees it.
    let smuggled = call(
        &gateway,
        "GET",
        "/u/keyed/items?api_key=mine&limit=5",
        issued.token_str(),
        "",
        &[],
    )
    .await;
    assert_eq!(smuggled.status, 403, "{}", smuggled.body);
    assert!(smuggled.body.contains("api_key"), "{}", smuggled.body);
    // What was asked names the whole call, path included, for the agent and in the record.
    assert_eq!(
        smuggled.json()["asked"],
        "GET /items?api_key=mine&limit=5",
        "{}",
        smuggled.body
    );
    let recorded = deployment
        .audit_records()
        .into_iter()
        .rev()
        .find(|record| record["refusal"] == "denied")
        .expect("the refusal is recorded");
    assert_eq!(recorded["asked"], "GET /items?api_key=mine&limit=5");
    assert!(upstream.seen().is_empty());
    let reply = call(
        &gateway,
        "GET",
        "/u/keyed/items?limit=5",
        issued.token_str(),
        "",
        &[],
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        upstream.seen()[0].target,
        format!("/items?limit=5&api_key={GITHUB_ROOT_SECRET}")
    );
    // This upstream echoes the URL it was called with; the agent must still not see the secret.
    assert!(!reply.body.contains(GITHUB_ROOT_SECRET), "{}", reply.body);
    assert!(
        reply.body.contains("api_key=[masked by valet]"),
        "{}",
        reply.body
    );
}

#[tokio::test]
async fn revoked_and_expired_tokens_are_refused_on_the_next_call() {
    let upstream = Upstream::start().await;
    let deployment = Deployment::new(&gateway_config(&upstream));
    let valetd = deployment.start(&[]);
    let gateway = valetd.gateway.clone().unwrap();
    let agent = valetd.client(AGENT_KEY).await;
    let issued = agent
        .request_token(
            TokenRequest::new("rest-projects", "gw-revoke").with_param("project", "shop"),
        )
        .await
        .unwrap();
    let path = "/u/rest/v1/projects/shop/services";
    assert_eq!(
        call(&gateway, "GET", path, issued.token_str(), "", &[])
            .await
            .status,
        200
    );
    agent.revoke(&issued.grant.id, "compromised").await.unwrap();
    let refused = call(&gateway, "GET", path, issued.token_str(), "", &[]).await;
    assert_eq!(refused.status, 401);
    assert!(
        refused.json()["message"]
            .as_str()
            .unwrap()
            .contains("revoked by agent: compromised"),
        "{}",
        refused.body
    );

    let short = agent
        .request_token(TokenRequest::new("rest-short", "gw-expire"))
        .await
        .unwrap();
    assert_eq!(
        call(
            &gateway,
            "GET",
            "/u/rest/anything",
            short.token_str(),
            "",
            &[]
        )
        .await
        .status,
        200
    );
    let expired = valet_tests::eventually(Duration::from_secs(10), || async {
        call(
            &gateway,
            "GET",
            "/u/rest/anything",
            short.token_str(),
            "",
            &[],
        )
        .await
        .status
            == 401
    })
    .await;
    assert!(expired, "a 2 s token still passed after 10 s");
    let n_seen = upstream.seen().len();
    assert_eq!(
        call(
            &gateway,
            "GET",
            "/u/rest/anything",
            short.token_str(),
            "",
            &[]
        )
        .await
        .status,
        401
    );
    assert_eq!(
        call(&gateway, "GET", path, issued.token_str(), "", &[])
            .await
            .status,
        401
    );
    assert_eq!(upstream.seen().len(), n_seen, "refused calls never arrive");
}

#[tokio::test]
async fn responses_stream_and_upstream_failures_are_clear_and_bounded() {
    let upstream = Upstream::start().await;
    let deployment = Deployment::new(&gateway_config(&upstream));
    let valetd = deployment.start(&[]);
    let gateway = valetd.gateway.clone().unwrap();
    let agent = valetd.client(AGENT_KEY).await;
    let issued = agent
        .request_token(
            TokenRequest::new("rest-projects", "gw-stream").with_param("project", "shop"),
        )
        .await
        .unwrap();

    // The first chunk arrives while the upstream is still holding the second back — what lies
    // more than the masking window's 8 KiB behind its end, in whole 4 KiB blocks, which the
    // gateway holds whatever the bytes are (holding "what could start the secret" would tell the
    // agent the secret's prefix).
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let request = http::Request::get(format!("{gateway}/u/rest/stream"))
        .header("authorization", format!("Bearer {}", issued.token_str()))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let first = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("the first chunk streamed before the response ended")
        .unwrap()
        .unwrap();
    let sent = valet_tests::upstream::stream_first();
    let first = first.into_data().unwrap();
    assert_eq!(first.len(), (sent.len() - 8192) / 4096 * 4096);
    assert_eq!(&first[..], &sent[..first.len()]);
    upstream.release_stream.notify_one();
    let mut rest = Vec::new();
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .unwrap()
    {
        rest.extend_from_slice(&frame.unwrap().into_data().unwrap());
    }
    let mut expected = sent[first.len()..].to_vec();
    expected.extend_from_slice(b"second\n");
    assert_eq!(
        rest, expected,
        "the held window and the second chunk, once the stream ends"
    );

    let slow = call(&gateway, "GET", "/u/rest/slow", issued.token_str(), "", &[]).await;
    assert_eq!(slow.status, 504, "{}", slow.body);
    assert!(
        slow.json()["message"]
            .as_str()
            .unwrap()
            .contains("did not answer within 1 s")
    );

    let nowhere = agent
        .request_token(TokenRequest::new("nowhere-read", "gw-nowhere"))
        .await
        .unwrap();
    let failed = call(
        &gateway,
        "GET",
        "/u/nowhere/x",
        nowhere.token_str(),
        "",
        &[],
    )
    .await;
    assert_eq!(failed.status, 502, "{}", failed.body);
    assert!(
        failed.json()["message"]
            .as_str()
            .unwrap()
            .contains("upstream nowhere could not be reached"),
        "{}",
        failed.body
    );
    assert!(!failed.body.contains(GITHUB_ROOT_SECRET));
}

#[tokio::test]
async fn the_gateway_serves_the_jwks_and_openid_discovery_for_offline_verifiers() {
    let upstream = Upstream::start().await;
    let deployment = Deployment::new(&gateway_config(&upstream));
    let valetd = deployment.start(&[]);
    let gateway = valetd.gateway.clone().unwrap();
    let health = call(&gateway, "GET", "/healthz", "", "", &[]).await;
    assert_eq!(health.status, 200);
    let jwks = call(&gateway, "GET", "/.well-known/jwks.json", "", "", &[])
        .await
        .json();
    assert_eq!(jwks["keys"][0]["kty"], "OKP");
    assert_eq!(jwks["keys"][0]["crv"], "Ed25519");
    assert_eq!(jwks["keys"][0]["alg"], "EdDSA");
    let discovery = call(
        &gateway,
        "GET",
        "/.well-known/openid-configuration",
        "",
        "",
        &[],
    )
    .await
    .json();
    assert_eq!(discovery["issuer"], "https://valet.test");
    assert!(
        discovery["jwks_uri"]
            .as_str()
            .unwrap()
            .ends_with("/.well-known/jwks.json")
    );
}

#[tokio::test]
async fn when_the_audit_log_cannot_be_written_the_gateway_forwards_nothing() {
    let upstream = Upstream::start().await;
    let config = gateway_config(&upstream);
    let deployment = Deployment::new(&config);
    let valetd = deployment.start(&[]);
    let agent = valetd.client(AGENT_KEY).await;
    let issued = agent
        .request_token(TokenRequest::new("rest-projects", "gw-audit").with_param("project", "shop"))
        .await
        .unwrap();
    valetd.stop().await;
    std::fs::write(
        deployment.config_path(),
        config.replace("path = \"audit/audit.jsonl\"", "path = \"/dev/full\""),
    )
    .unwrap();
    // /dev/full takes the open and refuses every write: the disk filled up under valetd.
    let valetd = deployment.start(&[]);
    let gateway = valetd.gateway.clone().unwrap();
    let refused = call(
        &gateway,
        "GET",
        "/u/rest/v1/projects/shop/services",
        issued.token_str(),
        "",
        &[],
    )
    .await;
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert!(
        refused.json()["message"]
            .as_str()
            .unwrap()
            .contains("fail closed"),
        "{}",
        refused.body
    );
    assert!(upstream.seen().is_empty(), "nothing was forwarded");
}

#[tokio::test]
async fn the_gateway_speaks_http2_as_well() {
    let upstream = Upstream::start().await;
    let deployment = Deployment::new(&gateway_config(&upstream));
    let valetd = deployment.start(&[]);
    let gateway = valetd.gateway.clone().unwrap();
    let agent = valetd.client(AGENT_KEY).await;
    let issued = agent
        .request_token(TokenRequest::new("rest-projects", "gw-h2").with_param("project", "shop"))
        .await
        .unwrap();
    // HTTP/2 with prior knowledge (h2c), as gRPC-style clients and many SDKs speak it.
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let request = http::Request::get(format!("{gateway}/u/rest/v1/projects/shop/services"))
        .header("authorization", format!("Bearer {}", issued.token_str()))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("/api/v1/projects/shop/services"));
}

/// No record, no call — and no answer without a durable record — across a kill -9 under load:
/// every call the upstream executed, and every answer an agent received, has its `gateway.call`
/// record in the audit log afterwards. (The record is written before the call is forwarded and
/// synced while it runs; the answer waits for the sync.)
#[tokio::test]
async fn every_forwarded_call_and_every_answer_has_its_record_after_kill_9_under_load() {
    let upstream = Upstream::start().await;
    let deployment = Deployment::new(&gateway_config(&upstream));
    let valetd = deployment.start(&[]);
    let gateway = valetd.gateway.clone().expect("the gateway listens");
    let agent = valetd.client(AGENT_KEY).await;
    let token = agent
        .request_token(TokenRequest::new("rest-projects", "kill-9").with_param("project", "shop"))
        .await
        .unwrap()
        .token_str()
        .to_string();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for worker in 0..8 {
        let (gateway, token, stop) = (gateway.clone(), token.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let client: Client<HttpConnector, Full<Bytes>> =
                Client::builder(TokioExecutor::new()).build_http();
            let mut answered = Vec::new();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                n += 1;
                let path = format!("/v1/projects/shop/items/w{worker}-{n}");
                let request = http::Request::get(format!("{gateway}/u/rest{path}"))
                    .header("authorization", format!("Bearer {token}"))
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                // After the kill, calls fail to connect: that is expected, not an answer.
                let Ok(response) = client.request(request).await else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                let status = response.status();
                if response.into_body().collect().await.is_ok() && status.is_success() {
                    answered.push(path);
                }
            }
            answered
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    valetd.signal("KILL");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut answered = Vec::new();
    for worker in workers {
        answered.extend(worker.await.unwrap());
    }
    assert!(!answered.is_empty(), "no call was answered before the kill");

    let log = std::fs::read_to_string(deployment.audit_path()).unwrap();
    let recorded: std::collections::BTreeSet<String> = log
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|record| record["action"] == "gateway.call" && record["outcome"] == "allowed")
        .filter_map(|record| record["path"].as_str().map(str::to_string))
        .collect();
    for path in &answered {
        assert!(
            recorded.contains(path),
            "{path} was answered but has no durable record"
        );
    }
    let executed: Vec<String> = upstream
        .seen()
        .into_iter()
        .map(|seen| seen.target.trim_start_matches("/api").to_string())
        .filter(|target| target.starts_with("/v1/projects/shop/items/"))
        .collect();
    assert!(executed.len() >= answered.len());
    for target in &executed {
        assert!(
            recorded.contains(target),
            "the upstream executed {target}, which has no record"
        );
    }
    println!(
        "{} answered, {} executed upstream, every one recorded",
        answered.len(),
        executed.len()
    );
}
