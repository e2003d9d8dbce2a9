//! The Rust client for agent runtimes and tools: connect (over TLS for `https://`, with a
//! principal key or a client certificate), request, renew, revoke and introspect tokens, verify
//! tokens offline against the broker's JWKS, and hold a task guard that revokes everything a task
//! was given when the task ends.

mod guard;
mod identity;
mod tls;
mod verifier;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use valet_core::Secret;
pub use valet_core::token::Claims;
pub use valet_proto::v1;
use valet_proto::v1::admin_client::AdminClient;
use valet_proto::v1::broker_client::BrokerClient;

pub use guard::TaskGuard;
pub use identity::{
    Credential, GITHUB_REQUEST_TOKEN_ENV, GITHUB_REQUEST_URL_ENV, IDENTITY_AUDIENCE_ENV,
    IDENTITY_TOKEN_FILE_ENV, PrincipalKey,
};
pub use verifier::OfflineVerifier;

/// The environment variable naming the server URL.
pub const SERVER_ENV: &str = "VALET_SERVER";
/// The environment variable holding the principal key.
pub const KEY_ENV: &str = "VALET_KEY";
/// The environment variable naming the CA bundle that verifies valetd's certificate (system
/// roots when unset).
pub const CA_FILE_ENV: &str = "VALET_CA_FILE";
/// The environment variables naming the client certificate and its key (PEM) for mTLS.
pub const CLIENT_CERT_ENV: &str = "VALET_CLIENT_CERT";
pub const CLIENT_KEY_ENV: &str = "VALET_CLIENT_KEY";
/// Every environment variable from which the CLI or this client reads a principal's credential.
/// A process run on a grant's behalf (`valet exec`) gets none of them: it holds the grant's token,
/// never the credential that could ask for more.
pub const PRINCIPAL_CREDENTIAL_ENV: &[&str] = &[
    KEY_ENV,
    CLIENT_CERT_ENV,
    CLIENT_KEY_ENV,
    IDENTITY_TOKEN_FILE_ENV,
    GITHUB_REQUEST_URL_ENV,
    GITHUB_REQUEST_TOKEN_ENV,
];
/// Where valetd listens when nothing else is said.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7470";

/// What can go wrong talking to valetd.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no principal credential: set {KEY_ENV} (or --key-file), {IDENTITY_TOKEN_FILE_ENV}, or a client certificate ({CLIENT_CERT_ENV} and {CLIENT_KEY_ENV})"
    )]
    NoKey,
    #[error("the principal key contains characters that cannot be sent in a header")]
    KeyNotSendable,
    #[error("{detail}")]
    IdentityToken { detail: String },
    #[error(
        "{server:?} is not a valid server URL (expected https://HOST:PORT, or http://HOST:PORT for a plaintext loopback listener): {detail}"
    )]
    BadServerUrl { server: String, detail: String },
    #[error("cannot use {what} {path}: {detail}")]
    TlsFile {
        what: &'static str,
        path: String,
        detail: String,
    },
    #[error(
        "cannot reach valetd at {server}: {detail} (set {SERVER_ENV} or --server to the broker's address)"
    )]
    Unreachable { server: String, detail: String },
    /// valetd answered with an error; the message says what was wrong and what is allowed.
    #[error("{}", .0.message())]
    Status(tonic::Status),
    /// The connection failed during a call (a TLS refusal arrives here under TLS 1.3).
    #[error("the connection to valetd failed: {detail}")]
    Transport { detail: String },
    #[error("the token was refused: {0}")]
    Verify(#[from] valet_core::token::VerifyError),
    #[error("the broker answered without a {what}")]
    IncompleteReply { what: &'static str },
    #[error("grant {grant_id} was not approved: {reason}")]
    NotApproved { grant_id: String, reason: String },
    #[error("grant {grant_id} is still waiting for approval {approval_id}")]
    StillPending {
        grant_id: String,
        approval_id: String,
    },
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        // A status made by the client's own transport, not sent by valetd: say what failed.
        match std::error::Error::source(&status) {
            Some(cause) => ClientError::Transport {
                detail: tls::explain(&format!("{}: {}", status.message(), source_chain(cause))),
            },
            _ => ClientError::Status(status),
        }
    }
}

impl ClientError {
    /// The gRPC code when valetd answered with an error.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            ClientError::Status(status) => Some(status.code()),
            ClientError::Transport { .. } => Some(tonic::Code::Unavailable),
            _ => None,
        }
    }
}

/// How to reach valetd and as whom.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub server: String,
    /// How the principal proves who it is.
    pub credential: Credential,
    pub tls: TlsOptions,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
}

/// TLS settings for an `https://` server URL.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// PEM CA bundle that verifies valetd's certificate; the system's roots when `None`.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) and key, for a principal known by its certificate or a
    /// listener that requires one.
    pub client_certificate: Option<(PathBuf, PathBuf)>,
}

impl TlsOptions {
    /// Reads `VALET_CA_FILE`, `VALET_CLIENT_CERT` and `VALET_CLIENT_KEY`.
    pub fn from_env() -> Result<TlsOptions, ClientError> {
        let var = |name: &str| {
            std::env::var_os(name)
                .filter(|value| !value.is_empty())
                .map(PathBuf::from)
        };
        let client_certificate = match (var(CLIENT_CERT_ENV), var(CLIENT_KEY_ENV)) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            (Some(cert), None) => {
                return Err(ClientError::TlsFile {
                    what: "client certificate",
                    path: cert.display().to_string(),
                    detail: format!(
                        "{CLIENT_KEY_ENV} is not set; a client certificate needs its key"
                    ),
                });
            }
            (None, Some(key)) => {
                return Err(ClientError::TlsFile {
                    what: "client key",
                    path: key.display().to_string(),
                    detail: format!(
                        "{CLIENT_CERT_ENV} is not set; a client key needs its certificate"
                    ),
                });
            }
        };
        Ok(TlsOptions {
            ca_file: var(CA_FILE_ENV),
            client_certificate,
        })
    }

    fn is_set(&self) -> bool {
        self.ca_file.is_some() || self.client_certificate.is_some()
    }
}

impl ClientConfig {
    pub fn new(server: impl Into<String>, key: Secret) -> ClientConfig {
        ClientConfig {
            server: server.into(),
            credential: Credential::Key(key),
            tls: TlsOptions::default(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
        }
    }

    pub fn with_tls(mut self, tls: TlsOptions) -> ClientConfig {
        self.tls = tls;
        self
    }

    /// A config for `server` with `credential`.
    pub fn with_credential(server: impl Into<String>, credential: Credential) -> ClientConfig {
        ClientConfig {
            credential,
            ..ClientConfig::new(server, Secret::from(String::new()))
        }
    }

    /// Reads `VALET_SERVER` (default `http://127.0.0.1:7470`), the credential (`VALET_KEY`,
    /// `VALET_IDENTITY_TOKEN_FILE`, or the GitHub Actions runner's OIDC endpoint; see
    /// [`Credential::from_env`]) and the TLS variables (`VALET_CA_FILE`, `VALET_CLIENT_CERT`,
    /// `VALET_CLIENT_KEY`). A client certificate may stand in for the credential.
    pub fn from_env() -> Result<ClientConfig, ClientError> {
        let server = std::env::var(SERVER_ENV).unwrap_or_else(|_| DEFAULT_SERVER.to_string());
        let tls = TlsOptions::from_env()?;
        let credential = match Credential::from_env() {
            Some(credential) => credential,
            None if tls.client_certificate.is_some() => Credential::ClientCertificate,
            None => return Err(ClientError::NoKey),
        };
        Ok(ClientConfig::with_credential(server, credential).with_tls(tls))
    }
}

type Authenticated = InterceptedService<Channel, PrincipalKey>;

/// A connection to valetd. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct Client {
    server: String,
    broker: BrokerClient<Authenticated>,
    admin: AdminClient<Authenticated>,
    verifier: OfflineVerifier,
}

/// A token and the grant it stands for. The token is a `Secret`: it does not print.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    pub grant: v1::Grant,
    /// Empty while the grant waits for approval.
    pub token: Secret,
    /// Set when the scope needs approval: wait with [`Client::wait_for_grant`].
    pub approval: Option<v1::Approval>,
    /// Set for a scope with provider "aws-sts": the STS credentials of the grant.
    pub aws: Option<AwsSession>,
}

/// Temporary AWS credentials from STS, narrowed to the grant's scope. The secret parts do not
/// print.
#[derive(Debug, Clone)]
pub struct AwsSession {
    pub access_key_id: String,
    pub secret_access_key: Secret,
    pub session_token: Secret,
    /// When AWS stops honouring them, in Unix seconds.
    pub expires_at: i64,
    pub region: String,
    pub assumed_role_arn: String,
    /// What their lifetime and revocation mean, in plain words.
    pub notice: String,
}

impl AwsSession {
    fn from_wire(wire: Option<v1::AwsCredentials>) -> Option<AwsSession> {
        let wire = wire?;
        Some(AwsSession {
            access_key_id: wire.access_key_id,
            secret_access_key: Secret::from(wire.secret_access_key),
            session_token: Secret::from(wire.session_token),
            expires_at: wire.expires_at.map(|at| at.seconds).unwrap_or(0),
            region: wire.region,
            assumed_role_arn: wire.assumed_role_arn,
            notice: wire.notice,
        })
    }

    /// The environment the AWS CLI and SDKs read credentials from.
    pub fn environment(&self) -> Vec<(&'static str, String)> {
        let expose = |secret: &Secret| secret.expose_str().unwrap_or_default().to_string();
        vec![
            ("AWS_ACCESS_KEY_ID", self.access_key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", expose(&self.secret_access_key)),
            ("AWS_SESSION_TOKEN", expose(&self.session_token)),
            ("AWS_REGION", self.region.clone()),
            ("AWS_DEFAULT_REGION", self.region.clone()),
        ]
    }
}

/// A revoked grant, and what the revocation means outside Valet when that needs saying.
#[derive(Debug, Clone)]
pub struct Revoked {
    pub grant: v1::Grant,
    pub notice: Option<String>,
}

impl IssuedToken {
    /// Whether the grant is waiting for people to approve it.
    pub fn is_pending(&self) -> bool {
        self.approval.is_some() && self.token.is_empty()
    }

    /// The token text, to hand to the tool that needs it.
    pub fn token_str(&self) -> &str {
        self.token.expose_str().unwrap_or_default()
    }
}

/// A token request; build with [`TokenRequest::new`] and the `with_*` methods.
#[derive(Debug, Clone, Default)]
pub struct TokenRequest {
    pub scope: String,
    pub task_id: String,
    pub purpose: String,
    pub ttl: Option<Duration>,
    pub params: BTreeMap<String, String>,
    pub audience: Option<String>,
}

impl TokenRequest {
    pub fn new(scope: impl Into<String>, task_id: impl Into<String>) -> TokenRequest {
        TokenRequest {
            scope: scope.into(),
            task_id: task_id.into(),
            ..TokenRequest::default()
        }
    }

    pub fn with_purpose(mut self, purpose: impl Into<String>) -> TokenRequest {
        self.purpose = purpose.into();
        self
    }

    pub fn with_ttl(mut self, ttl: Duration) -> TokenRequest {
        self.ttl = Some(ttl);
        self
    }

    pub fn with_param(mut self, name: impl Into<String>, value: impl Into<String>) -> TokenRequest {
        self.params.insert(name.into(), value.into());
        self
    }
}

impl Client {
    /// Connects to valetd; fails fast with the address tried when it cannot be reached.
    pub async fn connect(config: ClientConfig) -> Result<Client, ClientError> {
        let endpoint = tls::endpoint(&config)?
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout)
            .tcp_nodelay(true);
        let channel = endpoint
            .connect()
            .await
            .map_err(|error| ClientError::Unreachable {
                server: config.server.clone(),
                detail: tls::explain(&source_chain(&error)),
            })?;
        let interceptor = PrincipalKey::new(&config.credential).await?;
        let broker = BrokerClient::with_interceptor(channel.clone(), interceptor.clone());
        let admin = AdminClient::with_interceptor(channel, interceptor);
        Ok(Client {
            server: config.server,
            verifier: OfflineVerifier::new(broker.clone()),
            broker,
            admin,
        })
    }

    /// The server this client talks to.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Requests a token for one scope and task.
    pub async fn request_token(&self, request: TokenRequest) -> Result<IssuedToken, ClientError> {
        let reply = self
            .broker
            .clone()
            .request_token(v1::RequestTokenRequest {
                scope: request.scope,
                task_id: request.task_id,
                purpose: request.purpose,
                ttl_seconds: request.ttl.map(|ttl| ttl.as_secs().max(1)).unwrap_or(0),
                params: request.params.into_iter().collect(),
                audience: request.audience.unwrap_or_default(),
            })
            .await?
            .into_inner();
        Ok(IssuedToken {
            grant: reply
                .grant
                .ok_or(ClientError::IncompleteReply { what: "grant" })?,
            token: Secret::from(reply.token),
            approval: reply.approval,
            aws: AwsSession::from_wire(reply.aws),
        })
    }

    /// Waits up to `timeout` for a pending grant: its token once approved, `NotApproved` when
    /// denied or timed out, `StillPending` when the wait ends first.
    pub async fn wait_for_grant(
        &self,
        grant_id: &str,
        timeout: Duration,
    ) -> Result<IssuedToken, ClientError> {
        let mut updates = self
            .broker
            .clone()
            .wait_for_grant(v1::WaitForGrantRequest {
                grant_id: grant_id.to_string(),
                timeout_seconds: timeout.as_secs().max(1),
            })
            .await?
            .into_inner();
        let mut last = None;
        while let Some(update) = updates.message().await? {
            let grant = update
                .grant
                .clone()
                .ok_or(ClientError::IncompleteReply { what: "grant" })?;
            match v1::GrantStatus::try_from(grant.status).unwrap_or(v1::GrantStatus::Unspecified) {
                v1::GrantStatus::Active if !update.token.is_empty() => {
                    return Ok(IssuedToken {
                        grant,
                        token: Secret::from(update.token),
                        approval: update.approval,
                        aws: AwsSession::from_wire(update.aws),
                    });
                }
                v1::GrantStatus::Pending => last = Some(update),
                _ => {
                    let reason = update
                        .approval
                        .as_ref()
                        .map(|approval| approval.status_reason.clone())
                        .filter(|reason| !reason.is_empty())
                        .unwrap_or_else(|| grant.status_reason.clone());
                    return Err(ClientError::NotApproved {
                        grant_id: grant.id,
                        reason,
                    });
                }
            }
        }
        let approval_id = last
            .and_then(|update| update.approval)
            .map(|approval| approval.id)
            .unwrap_or_default();
        Err(ClientError::StillPending {
            grant_id: grant_id.to_string(),
            approval_id,
        })
    }

    /// Extends a grant's life (within its scope's max TTL) and returns a fresh token for it.
    pub async fn renew(
        &self,
        grant_id: &str,
        ttl: Option<Duration>,
    ) -> Result<IssuedToken, ClientError> {
        let reply = self
            .broker
            .clone()
            .renew_token(v1::RenewTokenRequest {
                grant_id: grant_id.to_string(),
                ttl_seconds: ttl.map(|ttl| ttl.as_secs().max(1)).unwrap_or(0),
            })
            .await?
            .into_inner();
        Ok(IssuedToken {
            grant: reply
                .grant
                .ok_or(ClientError::IncompleteReply { what: "grant" })?,
            token: Secret::from(reply.token),
            approval: None,
            aws: AwsSession::from_wire(reply.aws),
        })
    }

    /// Revokes one grant; in force when this returns.
    pub async fn revoke(&self, grant_id: &str, reason: &str) -> Result<Revoked, ClientError> {
        let reply = self
            .broker
            .clone()
            .revoke_token(v1::RevokeTokenRequest {
                grant_id: grant_id.to_string(),
                reason: reason.to_string(),
            })
            .await?
            .into_inner();
        Ok(Revoked {
            grant: reply
                .grant
                .ok_or(ClientError::IncompleteReply { what: "grant" })?,
            notice: (!reply.notice.is_empty()).then_some(reply.notice),
        })
    }

    /// Revokes every grant of a task; returns the revoked grant ids.
    pub async fn revoke_task(
        &self,
        task_id: &str,
        reason: &str,
    ) -> Result<Vec<String>, ClientError> {
        let reply = self
            .broker
            .clone()
            .revoke_task(v1::RevokeTaskRequest {
                task_id: task_id.to_string(),
                reason: reason.to_string(),
            })
            .await?
            .into_inner();
        Ok(reply.grant_ids)
    }

    /// Asks valetd whether a token is active (counts a use when its scope limits uses).
    pub async fn introspect(&self, token: &str) -> Result<v1::IntrospectResponse, ClientError> {
        Ok(self
            .broker
            .clone()
            .introspect(v1::IntrospectRequest {
                token: token.to_string(),
            })
            .await?
            .into_inner())
    }

    /// Verifies a token without asking valetd, against its cached JWKS (refreshed on an unknown
    /// key id). Says nothing about revocation: use `introspect` for that.
    pub async fn verify_offline(
        &self,
        token: &str,
        audience: Option<&str>,
    ) -> Result<Claims, ClientError> {
        self.verifier.verify(token, audience).await
    }

    /// The offline verifier, to share with code that only verifies.
    pub fn verifier(&self) -> OfflineVerifier {
        self.verifier.clone()
    }

    /// The operator API (list, watch, revoke-all, rotate, reload, audit head).
    pub fn admin(&self) -> AdminClient<Authenticated> {
        self.admin.clone()
    }

    /// The raw broker API.
    pub fn broker(&self) -> BrokerClient<Authenticated> {
        self.broker.clone()
    }

    /// Starts a task: tokens requested through the guard belong to `task_id`, and all of them
    /// are revoked when the guard ends or is dropped.
    pub fn task(&self, task_id: impl Into<String>) -> TaskGuard {
        TaskGuard::new(self.clone(), task_id.into())
    }
}

fn source_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        // Many errors already print their cause; say each thing once.
        let said = cause.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = cause.source();
    }
    text
}
