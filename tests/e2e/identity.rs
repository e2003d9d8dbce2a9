//! Workload identity: tokens shaped like Kubernetes service-account, GitHub Actions, GitLab CI
//! and SPIFFE JWT-SVID tokens, signed by a local HTTPS issuer, authenticate their principals with
//! no static secret; every check of a pinned verifier refuses a forged or stale token with its
//! reason; an unknown `kid` re-fetches the issuer's keys at a bounded rate; and the CLI inside a
//! GitHub Actions job asks the runner for its token itself.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use valet_client::{Client, ClientConfig, Credential, TokenRequest};
use valet_tests::oidc::{self, OidcServer, SigningKey};
use valet_tests::pki::Ca;
use valet_tests::{Deployment, Valetd, binary, standard_config};

const KUBERNETES_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const SPIRE_ISSUER: &str = "https://spire.example.org";
const BUILDER_SPIFFE_ID: &str = "spiffe://example.org/ns/ci/sa/builder";

/// The issuers and principals, with the keys served by `server` (GitLab's from a file).
fn identity_config(server: &OidcServer) -> String {
    let jwks = server.jwks_url();
    standard_config(&format!(
        r#"
[[principal]]
name = "k8s-builder"
roles = ["agent"]
scopes = ["limited"]
[[principal.identity]]
issuer = "kubernetes"
subject = "system:serviceaccount:ci:*"
claims = {{ "kubernetes.io/namespace" = "ci", "kubernetes.io/serviceaccount/name" = "builder" }}

[[principal]]
name = "gh-deployer"
roles = ["agent"]
scopes = ["deploy-staging"]
[[principal.identity]]
issuer = "github"
subject = "repo:acme/infra:environment:staging"
claims = {{ repository = "acme/infra", environment = "staging", job_workflow_ref = "acme/infra/.github/workflows/deploy.yml@refs/heads/*" }}

[[principal]]
name = "gl-deployer"
roles = ["agent"]
scopes = ["limited"]
[[principal.identity]]
issuer = "gitlab"
subject = "project_path:acme/infra:ref_type:branch:ref:main"
claims = {{ ref_protected = "true" }}

[[principal]]
name = "spiffe-builder"
roles = ["agent"]
scopes = ["limited"]
[[principal.identity]]
issuer = "spire"
subject = "{BUILDER_SPIFFE_ID}"

[[issuer]]
name = "kubernetes"
issuer = "{KUBERNETES_ISSUER}"
audiences = ["valet"]
jwks_url = "{jwks}"
ca_file = "oidc-ca.crt"
algorithms = ["RS256"]

[[issuer]]
name = "github"
issuer = "https://token.actions.githubusercontent.com"
audiences = ["valet"]
jwks_url = "{jwks}"
ca_file = "oidc-ca.crt"
algorithms = ["RS256"]
max_token_age = "10m"

[[issuer]]
name = "gitlab"
issuer = "https://gitlab.example.com"
audiences = ["valet"]
jwks_file = "gitlab-jwks.json"
algorithms = ["RS256"]

[[issuer]]
name = "spire"
issuer = "{SPIRE_ISSUER}"
audiences = ["valet"]
jwks_url = "{jwks}"
ca_file = "oidc-ca.crt"
algorithms = ["ES256"]
"#
    ))
}

struct Setup {
    deployment: Deployment,
    valetd: Valetd,
    server: OidcServer,
    rsa: SigningKey,
    p256: SigningKey,
    /// Keeps the issuer's key files.
    _keys: tempfile::TempDir,
}

async fn setup() -> Setup {
    let keys = tempfile::tempdir().expect("a temp dir");
    let rsa = SigningKey::rsa("rsa-1", keys.path());
    let p256 = SigningKey::p256("ec-1");
    let ca = Ca::new("issuer CA");
    let server = OidcServer::start(&ca, &[&rsa, &p256], keys.path()).await;
    let deployment = Deployment::new(&identity_config(&server));
    ca.write_certificate(&deployment.path("oidc-ca.crt"));
    std::fs::write(
        deployment.path("gitlab-jwks.json"),
        json!({"keys": [rsa.jwk()]}).to_string(),
    )
    .expect("write the GitLab JWKS");
    let valetd = deployment.start(&[]);
    Setup {
        deployment,
        valetd,
        server,
        rsa,
        p256,
        _keys: keys,
    }
}

/// Connects with `token` in an identity token file (as a pod reads its projected token).
async fn client_with_token(setup: &Setup, token: &str) -> Client {
    let path: PathBuf = setup.deployment.path("identity-token");
    std::fs::write(&path, token).expect("write the token file");
    Client::connect(ClientConfig::with_credential(
        setup.valetd.address.clone(),
        Credential::IdentityTokenFile(path),
    ))
    .await
    .expect("connect")
}

/// The refusal of a token request made with `token`.
async fn refusal(setup: &Setup, token: &str) -> String {
    let error = client_with_token(setup, token)
        .await
        .request_token(TokenRequest::new("limited", "identity-refusal"))
        .await
        .expect_err("the identity token was expected to be refused");
    assert_eq!(error.code(), Some(tonic::Code::Unauthenticated), "{error}");
    error.to_string()
}

#[tokio::test]
async fn identity_tokens_of_each_platform_authenticate_their_principal_with_no_static_secret() {
    let setup = setup().await;
    let cases = [
        (
            setup.rsa.sign(&oidc::kubernetes_claims(
                KUBERNETES_ISSUER,
                "ci",
                "builder",
                "builder-7d9f",
            )),
            "limited",
            "k8s-builder",
            "kubernetes",
            "system:serviceaccount:ci:builder",
        ),
        (
            setup.rsa.sign(&oidc::github_actions_claims(
                "acme/infra",
                "refs/heads/main",
                Some("staging"),
            )),
            "deploy-staging",
            "gh-deployer",
            "github",
            "repo:acme/infra:environment:staging",
        ),
        (
            setup
                .rsa
                .sign(&oidc::gitlab_claims("acme/infra", "main", "staging")),
            "limited",
            "gl-deployer",
            "gitlab",
            "project_path:acme/infra:ref_type:branch:ref:main",
        ),
        (
            setup
                .p256
                .sign(&oidc::spiffe_claims(SPIRE_ISSUER, BUILDER_SPIFFE_ID)),
            "limited",
            "spiffe-builder",
            "spire",
            BUILDER_SPIFFE_ID,
        ),
    ];
    for (token, scope, principal, issuer, subject) in cases {
        let client = client_with_token(&setup, &token).await;
        let mut request = TokenRequest::new(scope, format!("identity-{principal}"));
        if scope == "deploy-staging" {
            request = request.with_param("project", "web");
        }
        let issued = client
            .request_token(request)
            .await
            .unwrap_or_else(|error| panic!("{principal}: {error}"));
        assert_eq!(issued.grant.principal, principal);
        let records = setup.deployment.audit_records();
        let record = records
            .iter()
            .find(|record| {
                record["action"] == "token.issue" && record["grant_id"] == issued.grant.id.as_str()
            })
            .expect("an issue record");
        assert_eq!(record["auth_method"], "identity_token", "{record}");
        assert_eq!(record["auth_issuer"], issuer);
        assert_eq!(record["auth_subject"], subject);
        assert_eq!(record["auth_fingerprint"].as_str().map(str::len), Some(64));
        // The token itself appears nowhere valetd writes.
        let audit = std::fs::read_to_string(setup.deployment.audit_path()).expect("audit log");
        assert!(!audit.contains(&token) && !setup.valetd.output().contains(&token));
    }

    // A valid token from a workflow that no principal lists authenticates nobody.
    let branch = setup.rsa.sign(&oidc::github_actions_claims(
        "acme/infra",
        "refs/heads/feature",
        None,
    ));
    assert!(
        refusal(&setup, &branch)
            .await
            .contains("matches no principal")
    );
    let other_namespace = setup.rsa.sign(&oidc::kubernetes_claims(
        KUBERNETES_ISSUER,
        "prod",
        "builder",
        "builder-1",
    ));
    assert!(
        refusal(&setup, &other_namespace)
            .await
            .contains("matches no principal")
    );
}

#[tokio::test]
async fn every_pinned_check_refuses_a_forged_or_stale_identity_token() {
    let setup = setup().await;
    let base = oidc::kubernetes_claims(KUBERNETES_ISSUER, "ci", "builder", "builder-7d9f");
    let with = |change: &dyn Fn(&mut serde_json::Value)| {
        let mut claims = base.clone();
        change(&mut claims);
        setup.rsa.sign(&claims)
    };
    let now = oidc::now();
    let cases: Vec<(String, &str)> = vec![
        (
            with(&|claims| claims["aud"] = json!(["https://kubernetes.default.svc"])),
            "valetd accepts [valet]",
        ),
        (
            with(&|claims| {
                claims["iat"] = json!(now - 7200);
                claims["exp"] = json!(now - 3600);
            }),
            "expired",
        ),
        (
            with(&|claims| {
                claims["iat"] = json!(now - 7200);
                claims["nbf"] = json!(now - 7200);
                claims["exp"] = json!(now + 7200);
            }),
            "accepted for 3600 s",
        ),
        (
            with(&|claims| claims["iss"] = json!("https://evil.example")),
            "not an [[issuer]] valetd trusts",
        ),
        // The header lies about the algorithm; the issuer is pinned to RS256.
        (
            setup
                .rsa
                .sign_with_header(&json!({"alg": "none", "kid": "rsa-1"}), &base),
            "pinned to [RS256]",
        ),
        // A different key under the published kid.
        (
            SigningKey::p256("rsa-1")
                .sign_with_header(&json!({"alg": "RS256", "kid": "rsa-1"}), &base),
            "signature does not verify",
        ),
    ];
    for (token, expected) in cases {
        let reason = refusal(&setup, &token).await;
        assert!(reason.contains(expected), "{expected:?} in {reason:?}");
    }
    // alg none with no signature, and HS256 keyed with the issuer's public key.
    let unsigned = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(json!({"alg": "none"}).to_string()),
        URL_SAFE_NO_PAD.encode(base.to_string())
    );
    let reason = refusal(&setup, &unsigned).await;
    assert!(
        reason.contains("not a JWS") || reason.contains("pinned"),
        "{reason}"
    );
    let signed = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(json!({"alg": "HS256", "kid": "rsa-1"}).to_string()),
        URL_SAFE_NO_PAD.encode(base.to_string())
    );
    let public_key = setup.rsa.jwk()["n"].as_str().expect("n").to_string();
    let hmac = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, public_key.as_bytes()),
        signed.as_bytes(),
    );
    let hs256 = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(hmac.as_ref()));
    assert!(refusal(&setup, &hs256).await.contains("alg \"HS256\""));

    // Unknown kids: the first re-fetches the JWKS once; the next within the interval does not.
    let before = setup.server.jwks_fetches();
    let ghost = SigningKey::p256("ghost");
    let ghost_rsa_header = |kid: &str| json!({"alg": "RS256", "kid": kid});
    let first = refusal(
        &setup,
        &ghost.sign_with_header(&ghost_rsa_header("ghost-1"), &base),
    )
    .await;
    assert!(first.contains("even after re-fetching"), "{first}");
    for kid in ["ghost-2", "ghost-3", "ghost-4"] {
        let next = refusal(
            &setup,
            &ghost.sign_with_header(&ghost_rsa_header(kid), &base),
        )
        .await;
        assert!(next.contains("at most every 30 s"), "{next}");
    }
    assert!(
        setup.server.jwks_fetches() <= before + 1,
        "unknown kids fetched the JWKS {} times",
        setup.server.jwks_fetches() - before
    );
    // Every refusal is audited with its reason; no token text is.
    let records = setup.deployment.audit_records();
    let refused = records
        .iter()
        .filter(|record| record["action"] == "principal.authenticate")
        .count();
    assert!(refused >= 1, "authentication refusals are audited");
}

#[tokio::test]
async fn rotated_issuer_keys_are_fetched_when_a_token_names_a_new_kid() {
    let setup = setup().await;
    let claims = oidc::kubernetes_claims(KUBERNETES_ISSUER, "ci", "builder", "builder-7d9f");
    client_with_token(&setup, &setup.rsa.sign(&claims))
        .await
        .request_token(TokenRequest::new("limited", "before-rotation"))
        .await
        .expect("a token before the rotation");
    let fetches = setup.server.jwks_fetches();
    let keys = tempfile::tempdir().expect("a temp dir");
    let rotated = SigningKey::rsa("rsa-2", keys.path());
    setup.server.publish(&[&rotated]);
    client_with_token(&setup, &rotated.sign(&claims))
        .await
        .request_token(TokenRequest::new("limited", "after-rotation"))
        .await
        .expect("a token signed with the rotated key");
    assert_eq!(setup.server.jwks_fetches(), fetches + 1);
}

/// A stand-in for the GitHub Actions runner's token endpoint: answers `{"value": token}` to a
/// request carrying the runner's bearer, and records the query it was asked.
async fn runner_endpoint(token: String) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!(
        "http://{}/_apis/token?api-version=2.0",
        listener.local_addr().expect("address")
    );
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let task_seen = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (token, seen) = (token.clone(), task_seen.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |request: http::Request<hyper::body::Incoming>| {
                        let authorized = request
                            .headers()
                            .get("authorization")
                            .is_some_and(|value| value == "Bearer runner-request-token");
                        seen.lock()
                            .unwrap_or_else(|poisoned| poisoned.into_inner())
                            .push(request.uri().query().unwrap_or_default().to_string());
                        let (status, body) = if authorized {
                            (200, json!({"value": token}).to_string())
                        } else {
                            (401, String::new())
                        };
                        async move {
                            Ok::<_, Infallible>(
                                http::Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::from(body)))
                                    .expect("a response"),
                            )
                        }
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (url, seen)
}

#[tokio::test]
async fn the_cli_in_a_github_actions_job_asks_the_runner_for_its_identity_token() {
    let setup = setup().await;
    let token = setup.rsa.sign(&oidc::github_actions_claims(
        "acme/infra",
        "refs/heads/main",
        Some("staging"),
    ));
    let (url, seen) = runner_endpoint(token).await;
    let server = setup.valetd.address.clone();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(binary("valet"))
            .args([
                "--json",
                "token",
                "request",
                "--scope",
                "deploy-staging",
                "--task",
                "gh-run-10",
                "--param",
                "project=web",
            ])
            .env_clear()
            .env("VALET_SERVER", server)
            .env("ACTIONS_ID_TOKEN_REQUEST_URL", url)
            .env("ACTIONS_ID_TOKEN_REQUEST_TOKEN", "runner-request-token")
            .output()
            .expect("run valet")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "valet token request in a GitHub Actions job: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("gh-deployer"), "{stdout}");
    let queries = seen.lock().expect("lock").clone();
    assert_eq!(queries, vec!["api-version=2.0&audience=valet".to_string()]);
}

#[tokio::test]
async fn a_key_the_issuer_no_longer_publishes_ends_the_streams_its_tokens_opened() {
    let setup = setup().await;
    let token = setup
        .rsa
        .sign(&oidc::gitlab_claims("acme/infra", "main", "staging"));
    let client = client_with_token(&setup, &token).await;
    let mut grants = client
        .admin()
        .watch_grants(valet_client::v1::WatchGrantsRequest { filter: None })
        .await
        .expect("an agent watches its own grants")
        .into_inner();
    // The issuer drops the key (compromised, say) and publishes another; valetd re-reads it.
    let keys = tempfile::tempdir().expect("a temp dir");
    let next = SigningKey::rsa("rsa-next", keys.path());
    std::fs::write(
        setup.deployment.path("gitlab-jwks.json"),
        json!({"keys": [next.jwk()]}).to_string(),
    )
    .expect("write the GitLab JWKS");
    setup
        .valetd
        .client(valet_tests::ADMIN_KEY)
        .await
        .admin()
        .reload_config(valet_client::v1::ReloadConfigRequest {})
        .await
        .expect("the reload applies");
    let ended = tokio::time::timeout(std::time::Duration::from_secs(15), async {
        loop {
            match tokio_stream::StreamExt::next(&mut grants).await {
                Some(Ok(_)) => continue,
                Some(Err(status)) => return Some(status),
                None => return None,
            }
        }
    })
    .await
    .expect("the stream outlived the key that signed its token")
    .expect("the stream ended without saying why");
    assert_eq!(ended.code(), tonic::Code::Unauthenticated, "{ended:?}");
    assert!(
        ended.message().contains("no longer publishes the key"),
        "{}",
        ended.message()
    );
    // A token signed with the published key is accepted at once after the reload.
    client_with_token(
        &setup,
        &next.sign(&oidc::gitlab_claims("acme/infra", "main", "staging")),
    )
    .await
    .request_token(TokenRequest::new("limited", "after-the-key-change"))
    .await
    .expect("the new key's token is accepted right after the reload");
}
