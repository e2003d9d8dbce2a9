//! The principal's bearer credential on every call: a static key, or a workload identity token
//! read from a file the platform keeps fresh (`VALET_IDENTITY_TOKEN_FILE`, the Kubernetes
//! projected-token convention) or requested from the GitHub Actions runner's OIDC endpoint, and
//! re-read before it goes stale.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use valet_core::Secret;

use crate::ClientError;

/// The environment variable naming a file holding the identity token.
pub const IDENTITY_TOKEN_FILE_ENV: &str = "VALET_IDENTITY_TOKEN_FILE";
/// The audience requested from the GitHub Actions runner (default `valet`).
pub const IDENTITY_AUDIENCE_ENV: &str = "VALET_IDENTITY_AUDIENCE";
/// Set by the GitHub Actions runner in jobs with `permissions: id-token: write`.
pub const GITHUB_REQUEST_URL_ENV: &str = "ACTIONS_ID_TOKEN_REQUEST_URL";
pub const GITHUB_REQUEST_TOKEN_ENV: &str = "ACTIONS_ID_TOKEN_REQUEST_TOKEN";

/// A token file is re-read when its copy is older than this (kubelet rotates projected tokens
/// well before they expire).
const FILE_REREAD: Duration = Duration::from_secs(30);
/// A token from the GitHub runner is requested again after this (they live about 5 minutes).
const GITHUB_REFRESH: Duration = Duration::from_secs(120);

/// How the principal proves who it is on each call.
#[derive(Debug, Clone)]
pub enum Credential {
    /// A static principal key.
    Key(Secret),
    /// An identity token in a file, re-read as the platform rotates it.
    IdentityTokenFile(PathBuf),
    /// An identity token requested from the GitHub Actions runner.
    GithubActions { audience: String },
    /// None: the client certificate alone says who the caller is.
    ClientCertificate,
}

impl Credential {
    /// The credential the environment offers, in order: `VALET_KEY`, `VALET_IDENTITY_TOKEN_FILE`,
    /// the GitHub Actions runner's OIDC endpoint. `None` when there is none.
    pub fn from_env() -> Option<Credential> {
        let var = |name: &str| {
            std::env::var(name)
                .ok()
                .filter(|value| !value.trim().is_empty())
        };
        if let Some(key) = var(crate::KEY_ENV) {
            return Some(Credential::Key(Secret::from(key.trim().to_string())));
        }
        if let Some(path) = var(IDENTITY_TOKEN_FILE_ENV) {
            return Some(Credential::IdentityTokenFile(PathBuf::from(path)));
        }
        if var(GITHUB_REQUEST_URL_ENV).is_some() && var(GITHUB_REQUEST_TOKEN_ENV).is_some() {
            return Some(Credential::GithubActions {
                audience: var(IDENTITY_AUDIENCE_ENV).unwrap_or_else(|| "valet".to_string()),
            });
        }
        None
    }
}

fn header(credential: &str) -> Result<MetadataValue<Ascii>, ClientError> {
    let mut header: MetadataValue<Ascii> = format!("Bearer {}", credential.trim())
        .parse()
        .map_err(|_| ClientError::KeyNotSendable)?;
    header.set_sensitive(true);
    Ok(header)
}

/// The current header, and when it was obtained.
type Current = Arc<Mutex<(Option<MetadataValue<Ascii>>, Instant)>>;

/// Adds the principal's bearer credential to every call (none when the client certificate alone
/// authenticates).
#[derive(Clone)]
pub struct PrincipalKey {
    current: Current,
    file: Option<PathBuf>,
}

impl PrincipalKey {
    /// Prepares `credential`: reads the token file or asks the GitHub runner now, so a missing
    /// credential is reported at connect, not at the first call.
    pub(crate) async fn new(credential: &Credential) -> Result<PrincipalKey, ClientError> {
        let (first, file) = match credential {
            Credential::Key(key) => (
                Some(header(
                    key.expose_str().ok_or(ClientError::KeyNotSendable)?,
                )?),
                None,
            ),
            Credential::ClientCertificate => (None, None),
            Credential::IdentityTokenFile(path) => {
                (Some(read_token_file(path)?), Some(path.clone()))
            }
            Credential::GithubActions { audience } => {
                (Some(header(&github_token(audience).await?)?), None)
            }
        };
        let current: Current = Arc::new(Mutex::new((first, Instant::now())));
        if let Credential::GithubActions { audience } = credential {
            let weak = Arc::downgrade(&current);
            let audience = audience.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(GITHUB_REFRESH).await;
                    let Some(current) = weak.upgrade() else {
                        return;
                    };
                    match github_token(&audience)
                        .await
                        .and_then(|token| header(&token))
                    {
                        Ok(fresh) => {
                            *current
                                .lock()
                                .unwrap_or_else(|poisoned| poisoned.into_inner()) =
                                (Some(fresh), Instant::now());
                        }
                        Err(error) => {
                            tracing::warn!(%error, "cannot refresh the GitHub Actions identity token; keeping the current one")
                        }
                    }
                }
            });
        }
        Ok(PrincipalKey { current, file })
    }
}

fn read_token_file(path: &std::path::Path) -> Result<MetadataValue<Ascii>, ClientError> {
    let text = std::fs::read_to_string(path).map_err(|error| ClientError::IdentityToken {
        detail: format!(
            "cannot read {IDENTITY_TOKEN_FILE_ENV} file {}: {error}",
            path.display()
        ),
    })?;
    if text.trim().is_empty() {
        return Err(ClientError::IdentityToken {
            detail: format!("the identity token file {} is empty", path.display()),
        });
    }
    header(&text)
}

impl Interceptor for PrincipalKey {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(path) = &self.file
            && current.1.elapsed() >= FILE_REREAD
        {
            // A file that cannot be read now keeps the copy in hand (valetd judges its age).
            match read_token_file(path) {
                Ok(fresh) => *current = (Some(fresh), Instant::now()),
                Err(error) => tracing::warn!(%error, "keeping the identity token read before"),
            }
        }
        if let Some(header) = &current.0 {
            request
                .metadata_mut()
                .insert("authorization", header.clone());
        }
        Ok(request)
    }
}

/// Asks the GitHub Actions runner for an OIDC token for `audience`.
async fn github_token(audience: &str) -> Result<String, ClientError> {
    let failed = |detail: String| ClientError::IdentityToken {
        detail: format!("cannot get a GitHub Actions identity token: {detail}"),
    };
    let url = std::env::var(GITHUB_REQUEST_URL_ENV).map_err(|_| {
        failed(format!(
            "{GITHUB_REQUEST_URL_ENV} is not set (the job needs `permissions: id-token: write`)"
        ))
    })?;
    let bearer = std::env::var(GITHUB_REQUEST_TOKEN_ENV)
        .map_err(|_| failed(format!("{GITHUB_REQUEST_TOKEN_ENV} is not set")))?;
    let separator = if url.contains('?') { '&' } else { '?' };
    let audience: String = audience
        .bytes()
        .map(|byte| {
            if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
                (byte as char).to_string()
            } else {
                format!("%{byte:02X}")
            }
        })
        .collect();
    let request = http::Request::get(format!("{url}{separator}audience={audience}"))
        .header(http::header::AUTHORIZATION, format!("Bearer {bearer}"))
        .header(http::header::ACCEPT, "application/json")
        .body(Full::new(Bytes::new()))
        .map_err(|error| failed(error.to_string()))?;
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|error| failed(error.to_string()))?
    .with_root_certificates(rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    })
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(connector);
    let exchange = async {
        let response = client
            .request(request)
            .await
            .map_err(|error| failed(crate::source_chain(&error)))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), 64 * 1024)
            .collect()
            .await
            .map_err(|error| failed(error.to_string()))?
            .to_bytes();
        if !status.is_success() {
            return Err(failed(format!(
                "the runner answered HTTP {}",
                status.as_u16()
            )));
        }
        let value: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|_| failed("the runner's answer is not JSON".to_string()))?;
        value
            .get("value")
            .and_then(serde_json::Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| failed("the runner's answer has no \"value\"".to_string()))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| failed("no answer from the runner within 10 s".to_string()))?
}
