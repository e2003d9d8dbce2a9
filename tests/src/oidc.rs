//! A local OpenID Connect issuer for identity tests: an HTTPS server (certificate from a
//! throwaway CA) serving discovery and a JWKS whose keys can be rotated, counting JWKS fetches,
//! and signing tokens shaped like Kubernetes service-account, GitHub Actions, GitLab CI and
//! SPIFFE JWT-SVID tokens with RS256 (an openssl-made key) or ES256.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair, RsaKeyPair};
use serde_json::{Value, json};

use crate::pki::{Ca, Validity};

/// A signing key and its public JWK.
pub struct SigningKey {
    pub kid: String,
    kind: KeyKind,
    jwk: Value,
}

enum KeyKind {
    Rsa(RsaKeyPair),
    P256(EcdsaKeyPair),
}

impl SigningKey {
    /// A 2048-bit RSA key made by openssl (ring signs with it but does not make RSA keys).
    pub fn rsa(kid: &str, directory: &Path) -> SigningKey {
        let path = directory.join(format!("{kid}.der"));
        let made = Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-outform",
                "DER",
                "-out",
            ])
            .arg(&path)
            .output()
            .expect("run openssl genpkey");
        assert!(made.status.success(), "openssl genpkey: {made:?}");
        let modulus = Command::new("openssl")
            .args(["rsa", "-inform", "DER", "-noout", "-modulus", "-in"])
            .arg(&path)
            .output()
            .expect("run openssl rsa");
        let text = String::from_utf8_lossy(&modulus.stdout);
        let n = hex::decode(text.trim().trim_start_matches("Modulus=")).expect("a hex modulus");
        // With -outform DER, openssl writes the traditional PKCS#1 form.
        let der = std::fs::read(&path).expect("read the key");
        SigningKey {
            kid: kid.to_string(),
            kind: KeyKind::Rsa(RsaKeyPair::from_der(&der).expect("an RSA key")),
            jwk: json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": URL_SAFE_NO_PAD.encode(n), "e": "AQAB"}),
        }
    }

    pub fn p256(kid: &str) -> SigningKey {
        let random = SystemRandom::new();
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &random).expect("a key");
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &random)
                .expect("a key");
        let point = pair.public_key().as_ref().to_vec();
        SigningKey {
            kid: kid.to_string(),
            jwk: json!({"kty": "EC", "crv": "P-256", "kid": kid, "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..])}),
            kind: KeyKind::P256(pair),
        }
    }

    pub fn algorithm(&self) -> &'static str {
        match self.kind {
            KeyKind::Rsa(_) => "RS256",
            KeyKind::P256(_) => "ES256",
        }
    }

    /// A compact JWS of `claims` with this key, its `kid` and `alg` in the header.
    pub fn sign(&self, claims: &Value) -> String {
        self.sign_with_header(
            &json!({"alg": self.algorithm(), "kid": self.kid, "typ": "JWT"}),
            claims,
        )
    }

    /// As [`sign`](Self::sign), with the header given (a lying `alg`, a missing `kid`).
    pub fn sign_with_header(&self, header: &Value, claims: &Value) -> String {
        let signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(header).expect("JSON")),
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).expect("JSON"))
        );
        let random = SystemRandom::new();
        let signature = match &self.kind {
            KeyKind::Rsa(pair) => {
                let mut signature = vec![0; pair.public().modulus_len()];
                pair.sign(
                    &ring::signature::RSA_PKCS1_SHA256,
                    &random,
                    signed.as_bytes(),
                    &mut signature,
                )
                .expect("RSA signing");
                signature
            }
            KeyKind::P256(pair) => pair
                .sign(&random, signed.as_bytes())
                .expect("ECDSA signing")
                .as_ref()
                .to_vec(),
        };
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature))
    }

    /// The public JWK (what the issuer publishes).
    pub fn jwk(&self) -> &Value {
        &self.jwk
    }
}

/// The issuer's HTTPS endpoint; stops when dropped.
pub struct OidcServer {
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    jwks: Arc<Mutex<Value>>,
    fetches: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl OidcServer {
    /// Serves over TLS with a certificate from `ca`, publishing `keys`.
    pub async fn start(ca: &Ca, keys: &[&SigningKey], directory: &Path) -> OidcServer {
        let (certificate, key) =
            ca.server_certificate(&["127.0.0.1"], Validity::Current, directory, "oidc");
        let tls = {
            use rustls::pki_types::pem::PemObject;
            use rustls::pki_types::{CertificateDer, PrivateKeyDer};
            let chain = CertificateDer::pem_file_iter(&certificate)
                .expect("read the certificate")
                .collect::<Result<Vec<_>, _>>()
                .expect("PEM");
            let key = PrivateKeyDer::from_pem_file(&key).expect("read the key");
            rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("protocols")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("a server config")
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("https://{}", listener.local_addr().expect("address"));
        let jwks = Arc::new(Mutex::new(
            json!({"keys": keys.iter().map(|key| key.jwk().clone()).collect::<Vec<_>>()}),
        ));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (task_jwks, task_fetches, issuer) = (jwks.clone(), fetches.clone(), url.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let (jwks, fetches, issuer) =
                    (task_jwks.clone(), task_fetches.clone(), issuer.clone());
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(
                        move |request: http::Request<hyper::body::Incoming>| {
                            let body = match request.uri().path() {
                                "/jwks" => {
                                    fetches.fetch_add(1, Ordering::SeqCst);
                                    jwks.lock()
                                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                                        .to_string()
                                }
                                "/.well-known/openid-configuration" => {
                                    json!({"issuer": issuer, "jwks_uri": format!("{issuer}/jwks")})
                                        .to_string()
                                }
                                _ => String::new(),
                            };
                            let status = if body.is_empty() { 404 } else { 200 };
                            async move {
                                Ok::<_, std::convert::Infallible>(
                                    http::Response::builder()
                                        .status(status)
                                        .header("content-type", "application/json")
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
        OidcServer {
            url,
            jwks,
            fetches,
            task,
        }
    }

    pub fn jwks_url(&self) -> String {
        format!("{}/jwks", self.url)
    }

    /// Publishes `keys` from now on (a rotation).
    pub fn publish(&self, keys: &[&SigningKey]) {
        *self
            .jwks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) =
            json!({"keys": keys.iter().map(|key| key.jwk().clone()).collect::<Vec<_>>()});
    }

    /// How many times the JWKS was fetched.
    pub fn jwks_fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

impl Drop for OidcServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs() as i64)
        .unwrap_or_default()
}

/// Claims shaped like a Kubernetes projected service-account token (audience `valet`).
pub fn kubernetes_claims(issuer: &str, namespace: &str, service_account: &str, pod: &str) -> Value {
    let now = now();
    json!({
        "aud": ["valet"],
        "exp": now + 3600,
        "iat": now,
        "nbf": now,
        "iss": issuer,
        "jti": "5c9a2f9e-6f3d-4c59-9b57-1d3c1e8a4f10",
        "kubernetes.io": {
            "namespace": namespace,
            "node": {"name": "node-1", "uid": "0b6a3c4e-1111-4f0e-8d9a-2b3c4d5e6f70"},
            "pod": {"name": pod, "uid": "7d0c8e1a-2222-4b5c-9d6e-7f8091a2b3c4"},
            "serviceaccount": {"name": service_account, "uid": "e2f3a4b5-3333-4c6d-8e9f-0a1b2c3d4e5f"}
        },
        "sub": format!("system:serviceaccount:{namespace}:{service_account}")
    })
}

/// Claims shaped like a GitHub Actions OIDC token (per GitHub's documentation).
pub fn github_actions_claims(repository: &str, git_ref: &str, environment: Option<&str>) -> Value {
    let now = now();
    let subject = match environment {
        Some(environment) => format!("repo:{repository}:environment:{environment}"),
        None => format!("repo:{repository}:ref:{git_ref}"),
    };
    let mut claims = json!({
        "jti": "example-id",
        "sub": subject,
        "aud": "valet",
        "ref": git_ref,
        "sha": "example-sha",
        "repository": repository,
        "repository_owner": repository.split('/').next().unwrap_or_default(),
        "actor_id": "12",
        "repository_visibility": "private",
        "repository_id": "74",
        "repository_owner_id": "65",
        "run_id": "example-run-id",
        "run_number": "10",
        "run_attempt": "2",
        "runner_environment": "github-hosted",
        "actor": "octocat",
        "workflow": "deploy",
        "head_ref": "",
        "base_ref": "",
        "event_name": "workflow_dispatch",
        "ref_type": "branch",
        "job_workflow_ref": format!("{repository}/.github/workflows/deploy.yml@{git_ref}"),
        "iss": "https://token.actions.githubusercontent.com",
        "nbf": now - 5,
        "exp": now + 300,
        "iat": now - 5
    });
    if let Some(environment) = environment {
        claims["environment"] = json!(environment);
    }
    claims
}

/// Claims shaped like a GitLab CI `id_tokens` token.
pub fn gitlab_claims(project_path: &str, git_ref: &str, environment: &str) -> Value {
    let now = now();
    json!({
        "namespace_id": "72",
        "namespace_path": project_path.split('/').next().unwrap_or_default(),
        "project_id": "20",
        "project_path": project_path,
        "user_id": "5",
        "user_login": "deployer",
        "pipeline_id": "574",
        "pipeline_source": "push",
        "job_id": "302",
        "ref": git_ref,
        "ref_type": "branch",
        "ref_protected": "true",
        "environment": environment,
        "environment_protected": "true",
        "jti": "235b3a54-b797-45c7-ae9a-f72d7bc6ef5b",
        "iss": "https://gitlab.example.com",
        "iat": now,
        "nbf": now - 5,
        "exp": now + 300,
        "sub": format!("project_path:{project_path}:ref_type:branch:ref:{git_ref}"),
        "aud": "valet"
    })
}

/// Claims shaped like a SPIFFE JWT-SVID.
pub fn spiffe_claims(issuer: &str, spiffe_id: &str) -> Value {
    let now = now();
    json!({"aud": ["valet"], "exp": now + 300, "iat": now, "iss": issuer, "sub": spiffe_id})
}
