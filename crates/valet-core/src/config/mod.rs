//! The validated config: typed values built from the raw file, with every problem reported at
//! once under its key path (`scope[2].max_ttl: 2h exceeds server.max_ttl 1h`).

mod approval;
mod aws;
mod environment;
mod gateway;
mod identity;
mod lints;
mod mcp;
mod raw;
mod store;

pub use aws::{AwsCredential, AwsRevoke, AwsStsScope, ConditionValues, is_access_key_id};
pub use environment::{Environment, read_secret};
pub use gateway::{
    BaseUrl, FORWARDED_HEADERS, Injection, MAX_MASKED_CREDENTIAL_BYTES, StdioServer, Target,
    Upstream, UpstreamKind, is_credential_header, never_forwarded,
};
pub use identity::{
    CertificateMatch, ClientAuth, Glob, IdentityMatch, Issuer, KeySet, ServerTls, is_spiffe_id,
};
pub use lints::Lint;
pub use store::{EtcdConfig, StoreConfig};

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use regex::Regex;

/// Names of principals, scopes and credentials: what the config may call things.
pub const NAME_RULE: &str = "1 to 64 characters from a-z, A-Z, 0-9, '.', '_', '-'";

/// A config that passed validation. Cheap to share; swapped atomically on reload.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    /// Where the key-encryption key comes from; `None` is allowed only in development mode.
    pub seal: Option<KeySource>,
    pub audit: AuditConfig,
    pub principals: BTreeMap<String, Principal>,
    pub credentials: BTreeMap<String, Credential>,
    pub scopes: BTreeMap<String, Scope>,
    pub upstreams: BTreeMap<String, Upstream>,
    /// Where new pending approvals are announced (a JSON POST each).
    pub approvals_webhook: Option<String>,
    /// Bounds on call approvals waiting for a person.
    pub approval_limits: ApprovalLimits,
    /// Which engine keeps the state.
    pub store: StoreConfig,
    /// Platforms whose identity tokens authenticate principals, by name.
    pub issuers: BTreeMap<String, Issuer>,
}

/// How many call approvals may wait for a person at once: per grant, and per principal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApprovalLimits {
    pub per_grant: u32,
    pub per_principal: u32,
}

impl Default for ApprovalLimits {
    fn default() -> ApprovalLimits {
        ApprovalLimits {
            per_grant: 5,
            per_principal: 50,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// The `iss` of every token.
    pub issuer: String,
    /// The global cap on any token's lifetime, renewals included.
    pub max_ttl: Duration,
    /// How long expired and revoked grants stay listable before they are swept.
    pub grant_retention: Duration,
    /// Where the HTTP gateway listens; no gateway when `None`.
    pub gateway_listen: Option<SocketAddr>,
    /// Where Prometheus metrics are served (`GET /metrics`, no authentication, no secrets); off
    /// when `None`.
    pub metrics_listen: Option<SocketAddr>,
    /// Where the web console is served (TLS with the other listeners when `[server] tls_*` is
    /// set); off when `None`.
    pub console_listen: Option<SocketAddr>,
    /// The console's address as operators' browsers reach it (`https://valet.example.com`), for
    /// login links and the approval webhook's links; derived from `console_listen` when `None`.
    pub console_url: Option<String>,
    /// How long a console session lasts from its login.
    pub console_session_ttl: Duration,
    /// An OTLP/HTTP collector (`http://HOST:PORT`): spans of RPCs and gateway calls are exported
    /// to `{otlp_endpoint}/v1/traces`; none when `None`.
    pub otlp_endpoint: Option<String>,
    /// The listeners may serve plaintext on addresses other than loopback (the operator has
    /// said that something else protects the network: a TLS-terminating proxy, a mesh).
    pub insecure_plaintext: bool,
    /// The most connections each listener keeps open at once.
    pub max_connections: usize,
    /// The most connections each listener keeps open from one source (an IPv4 address, an IPv6
    /// /64).
    pub max_connections_per_source: usize,
    /// The most connections that have not authenticated each listener keeps from one source.
    pub max_unauthenticated_per_source: usize,
    /// A connection that neither reads nor writes for this long is closed.
    pub idle_timeout: Duration,
    /// TLS on both listeners; plaintext when `None`.
    pub tls: Option<ServerTls>,
    /// Failed authentications allowed per source address; beyond, the source is refused
    /// before its credentials are looked at, until its budget refills.
    pub failed_authentication_limit: crate::rate::Rate,
    /// Failed authentications allowed across all sources; beyond, every source's failures are
    /// refused before their credentials are looked at (valid keys and certificates still pass).
    pub failed_authentication_limit_total: crate::rate::Rate,
}

/// Failed authentications per source when the config does not say.
pub const DEFAULT_FAILED_AUTHENTICATION_LIMIT: crate::rate::Rate = crate::rate::Rate {
    count: 60,
    per: Duration::from_secs(60),
};

/// How long a console session lasts when the config does not say.
pub const DEFAULT_CONSOLE_SESSION_TTL: Duration = Duration::from_secs(15 * 60);

/// Connections per listener when the config does not say.
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;
/// How long a connection may sit idle when the config does not say.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);

impl ServerConfig {
    /// Gives this (reloaded) config the running values of the keys that take effect only at
    /// start; returns the keys whose values differed.
    pub fn keep_start_only_keys(&mut self, running: &ServerConfig) -> Vec<&'static str> {
        fn keep<T: PartialEq + Clone>(
            reloaded: &mut T,
            running: &T,
            key: &'static str,
            differed: &mut Vec<&'static str>,
        ) {
            if reloaded != running {
                differed.push(key);
                *reloaded = running.clone();
            }
        }
        let mut differed = Vec::new();
        keep(
            &mut self.listen,
            &running.listen,
            "server.listen",
            &mut differed,
        );
        keep(
            &mut self.data_dir,
            &running.data_dir,
            "server.data_dir",
            &mut differed,
        );
        keep(
            &mut self.gateway_listen,
            &running.gateway_listen,
            "server.gateway_listen",
            &mut differed,
        );
        keep(
            &mut self.metrics_listen,
            &running.metrics_listen,
            "server.metrics_listen",
            &mut differed,
        );
        keep(
            &mut self.console_listen,
            &running.console_listen,
            "server.console_listen",
            &mut differed,
        );
        keep(
            &mut self.otlp_endpoint,
            &running.otlp_endpoint,
            "server.otlp_endpoint",
            &mut differed,
        );
        keep(
            &mut self.insecure_plaintext,
            &running.insecure_plaintext,
            "server.insecure_plaintext",
            &mut differed,
        );
        keep(
            &mut self.max_connections,
            &running.max_connections,
            "server.max_connections",
            &mut differed,
        );
        keep(
            &mut self.max_connections_per_source,
            &running.max_connections_per_source,
            "server.max_connections_per_source",
            &mut differed,
        );
        keep(
            &mut self.max_unauthenticated_per_source,
            &running.max_unauthenticated_per_source,
            "server.max_unauthenticated_per_source",
            &mut differed,
        );
        keep(
            &mut self.idle_timeout,
            &running.idle_timeout,
            "server.idle_timeout",
            &mut differed,
        );
        // Which files hold the TLS material is fixed at start; what they hold is re-read.
        keep(&mut self.tls, &running.tls, "server.tls_*", &mut differed);
        differed
    }

    /// The console's base URL as browsers reach it (no trailing `/`): `console_url`, or the
    /// address the console listener `bound` to, with the scheme TLS gives it.
    pub fn console_base_url(&self, bound: SocketAddr) -> String {
        match &self.console_url {
            Some(url) => url.clone(),
            None => {
                let scheme = if self.tls.is_some() { "https" } else { "http" };
                format!("{scheme}://{bound}")
            }
        }
    }

    /// The listeners (`"gRPC"`, `"gateway"`, `"console"`) that serve plaintext on an address that is not a
    /// loopback address: each of these carries bearer keys and tokens in clear across a network.
    /// None when TLS is configured (it covers both listeners).
    /// The key path of each listener's address, by the name
    /// [`ServerConfig::plaintext_listeners_off_loopback`] gives it.
    fn listener_key_path(listener: &str) -> &'static str {
        match listener {
            "gateway" => "server.gateway_listen",
            "console" => "server.console_listen",
            _ => "server.listen",
        }
    }

    /// A problem for every listener serving plaintext off loopback, unless the config allows
    /// it (`insecure_plaintext`) or `dev` does: one rule for valetd's start and `valet config
    /// check`.
    pub fn plaintext_problems(&self, dev: bool) -> Vec<ConfigProblem> {
        if self.insecure_plaintext || dev {
            return Vec::new();
        }
        self.plaintext_listeners_off_loopback()
            .into_iter()
            .map(|(listener, address)| ConfigProblem {
                key_path: Self::listener_key_path(listener).to_string(),
                kind: ProblemKind::PlaintextOffLoopback { listener, address },
            })
            .collect()
    }

    pub fn plaintext_listeners_off_loopback(&self) -> Vec<(&'static str, SocketAddr)> {
        if self.tls.is_some() {
            return Vec::new();
        }
        std::iter::once(("gRPC", self.listen))
            .chain(self.gateway_listen.map(|address| ("gateway", address)))
            .chain(self.console_listen.map(|address| ("console", address)))
            .filter(|(_, address)| !address.ip().is_loopback())
            .collect()
    }
}

/// Where a secret is read from. Secrets are never inline in the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    File(PathBuf),
    Env(String),
}

impl fmt::Display for KeySource {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::File(path) => write!(formatter, "file {}", path.display()),
            KeySource::Env(name) => write!(formatter, "environment variable {name}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AuditConfig {
    pub path: PathBuf,
}

/// What a principal is allowed to do at the API, beyond requesting its listed scopes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Requests tokens for its listed scopes; sees and revokes only its own grants.
    Agent,
    /// Lists, watches and revokes every grant.
    Operator,
    /// An operator who may also rotate signing keys and reload the config.
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Agent, Role::Operator, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    fn parse(text: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|role| role.as_str() == text)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

#[derive(Debug, Clone)]
pub struct Principal {
    pub name: String,
    pub roles: BTreeSet<Role>,
    /// SHA-256 of the principal's bearer key; the key itself is never configured. `None` for a
    /// principal that authenticates only by certificate or identity token.
    pub key_sha256: Option<[u8; 32]>,
    /// Client-certificate identities that authenticate this principal.
    pub certificates: Vec<CertificateMatch>,
    /// Identity tokens (JWTs from an `[[issuer]]`) that authenticate this principal.
    pub identities: Vec<IdentityMatch>,
    /// The most requests it may make; `None`: unlimited.
    pub rate: Option<crate::rate::Rate>,
    /// Its place in the file (`principal[N]`), for key paths.
    pub position: usize,
    /// Why its lints are silenced (`allow_broad = "…"`), when they are.
    pub allow_broad: Option<String>,
    pub scopes: BTreeSet<String>,
}

/// A principal with a placeholder key hash and `roles`, for tests across valet-core.
#[cfg(test)]
pub(crate) fn principal_for_tests(name: &str, roles: &[Role]) -> Principal {
    Principal {
        name: name.into(),
        roles: roles.iter().copied().collect(),
        key_sha256: Some([0; 32]),
        certificates: Vec::new(),
        identities: Vec::new(),
        rate: None,
        position: 0,
        allow_broad: None,
        scopes: BTreeSet::new(),
    }
}

impl Principal {
    /// Whether the principal acts with `role`'s rights; admins hold operator rights too.
    pub fn has_role(&self, role: Role) -> bool {
        self.roles.contains(&role) || (role == Role::Operator && self.roles.contains(&Role::Admin))
    }
}

#[derive(Debug, Clone)]
pub struct Credential {
    pub name: String,
    /// Where the secret comes from (for an AWS credential: the secret access key).
    pub source: KeySource,
    /// Set for `kind = "aws"`.
    pub aws: Option<AwsCredential>,
}

#[derive(Debug, Clone)]
pub struct Scope {
    /// Its place in the file (`scope[N]`), for key paths.
    pub position: usize,
    /// Lints silenced with a stated reason (`allow_broad = "…"`), by key path relative to the
    /// scope: `""` for the scope, `params.NAME`, `allow[N]`.
    pub allow_broad: BTreeMap<String, String>,
    pub name: String,
    pub credential: String,
    pub environment: String,
    pub audience: String,
    pub default_ttl: Duration,
    pub max_ttl: Duration,
    pub max_uses: Option<u64>,
    pub renewable: bool,
    pub params: BTreeMap<String, ParamRule>,
    /// The upstream whose calls this scope allows through the gateway.
    pub upstream: Option<String>,
    /// Which calls; empty when the scope has no upstream.
    pub allow: Vec<crate::rules::AllowRule>,
    /// For a scope whose upstream is an MCP server: the tools, resources and prompts it allows.
    pub mcp: Option<crate::mcp::McpAllow>,
    /// When set, tokens for this scope are issued only after people approve.
    pub approval: Option<crate::approval::ApprovalPolicy>,
    /// Set for `provider = "aws-sts"`: grants carry STS credentials for this role and policy.
    pub aws: Option<AwsStsScope>,
}

/// What values a requester may give one parameter.
#[derive(Debug, Clone)]
pub struct ParamRule {
    pub required: bool,
    pub allowed: AllowedValues,
}

#[derive(Debug, Clone)]
pub enum AllowedValues {
    /// The whole value must match this pattern (anchored).
    Pattern { source: String, regex: Regex },
    /// The value must be one of these.
    OneOf(BTreeSet<String>),
}

impl AllowedValues {
    pub fn permits(&self, value: &str) -> bool {
        match self {
            AllowedValues::Pattern { regex, .. } => regex.is_match(value),
            AllowedValues::OneOf(values) => values.contains(value),
        }
    }
}

impl fmt::Display for AllowedValues {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllowedValues::Pattern { source, .. } => write!(formatter, "a value matching {source}"),
            AllowedValues::OneOf(values) => {
                let list: Vec<&str> = values.iter().map(String::as_str).collect();
                write!(formatter, "one of [{}]", list.join(", "))
            }
        }
    }
}

/// One thing wrong with a config, at one key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub key_path: String,
    pub kind: ProblemKind,
}

/// The kinds of mistake a config can hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProblemKind {
    #[error("the file is not valid TOML or a value has the wrong type:{0}")]
    Syntax(String),
    #[error("unknown key; see docs/configuration.md for the keys this section takes")]
    UnknownKey,
    #[error("missing; this key is required")]
    Missing,
    #[error("{value:?} is not a valid {what}; expected {expected}")]
    Invalid {
        value: String,
        what: &'static str,
        expected: String,
    },
    #[error("{name:?} is defined more than once")]
    Duplicate { name: String },
    #[error(
        "valetd will not serve {listener} in plaintext on {address}, which is not a loopback address: principal keys and tokens would cross the network in clear. Listen on 127.0.0.1 (or ::1), set `[server] tls_cert_file` and `tls_key_file` to serve TLS, or, when a TLS-terminating proxy or a service mesh protects that network, set `[server] insecure_plaintext = true` (--dev allows it too)"
    )]
    PlaintextOffLoopback {
        listener: &'static str,
        address: SocketAddr,
    },
    #[error("names credential {name:?}, which is not defined; defined credentials: [{defined}]")]
    UnknownCredential { name: String, defined: String },
    #[error("names scope {name:?}, which is not defined; defined scopes: [{defined}]")]
    UnknownScope { name: String, defined: String },
    #[error("{asked} exceeds {cap_key} {cap}")]
    DurationAboveCap {
        asked: String,
        cap_key: String,
        cap: String,
    },
    #[error("set both {first} and {second}; set exactly one")]
    BothSet {
        first: &'static str,
        second: &'static str,
    },
    #[error("set neither {first} nor {second}; set exactly one")]
    NeitherSet {
        first: &'static str,
        second: &'static str,
    },
    #[error("the same key hash as principal {other:?}; every principal needs its own key")]
    SharedKey { other: String },
    #[error(
        "{identity} already authenticates principal {other:?}; an identity names one principal"
    )]
    SharedIdentity { identity: String, other: String },
    #[error("{what} is unusable: {detail}")]
    Unusable { what: String, detail: String },
    #[error(
        "no key-encryption key: set [seal] key_file or key_env in the config (make a key with `openssl rand -base64 32`); for development only, `valetd --dev` generates one (check such a config with `valet config check --dev`)"
    )]
    NoSealKey,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}: {}", self.key_path, self.kind)
    }
}

/// Every problem found in a config. Never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigProblem>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n_problems = self.0.len();
        write!(
            formatter,
            "the config has {n_problems} problem{}:",
            if n_problems == 1 { "" } else { "s" }
        )?;
        for problem in &self.0 {
            write!(formatter, "\n  {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl Config {
    /// Parses and validates config text. Relative paths are resolved against `base_dir`, the
    /// directory of the config file, so a config means the same wherever valetd is started.
    pub fn parse(text: &str, base_dir: &Path) -> Result<Config, ConfigErrors> {
        let (raw, unknown_keys) = raw::parse(text).map_err(|error| {
            ConfigErrors(vec![ConfigProblem {
                key_path: "(file)".to_string(),
                kind: ProblemKind::Syntax(
                    // The parser's own lines (where, the line itself, a caret), indented under it.
                    error
                        .to_string()
                        .trim()
                        .lines()
                        .map(|line| format!("\n    {line}"))
                        .collect(),
                ),
            }])
        })?;
        let mut problems = Problems::default();
        for key_path in unknown_keys {
            problems.push(key_path, ProblemKind::UnknownKey);
        }
        let config = build(raw, base_dir, &mut problems);
        match config {
            Some(config) if problems.0.is_empty() => Ok(config),
            _ => Err(ConfigErrors(problems.0)),
        }
    }
}

#[derive(Default)]
pub(super) struct Problems(Vec<ConfigProblem>);

impl Problems {
    fn push(&mut self, key_path: impl Into<String>, kind: ProblemKind) {
        self.0.push(ConfigProblem {
            key_path: key_path.into(),
            kind,
        });
    }

    fn required<T>(&mut self, value: Option<T>, key_path: &str) -> Option<T> {
        if value.is_none() {
            self.push(key_path, ProblemKind::Missing);
        }
        value
    }

    fn name(&mut self, value: Option<String>, key_path: &str) -> Option<String> {
        let value = self.required(value, key_path)?;
        if is_valid_name(&value) {
            Some(value)
        } else {
            self.push(key_path, invalid(&value, "name", NAME_RULE));
            None
        }
    }

    fn duration(&mut self, value: Option<String>, key_path: &str) -> Option<Duration> {
        let value = value?;
        match humantime::parse_duration(&value) {
            Ok(duration) if !duration.is_zero() => Some(duration),
            _ => {
                self.push(
                    key_path,
                    invalid(
                        &value,
                        "duration",
                        "a positive duration such as \"90s\", \"5m\" or \"1h\"",
                    ),
                );
                None
            }
        }
    }

    fn cap(&mut self, key_path: &str, asked: Duration, cap_key: &str, cap: Duration) {
        if asked > cap {
            self.push(
                key_path,
                ProblemKind::DurationAboveCap {
                    asked: format_duration(asked),
                    cap_key: cap_key.to_string(),
                    cap: format_duration(cap),
                },
            );
        }
    }
}

/// Reports each key that is set where it does not belong.
pub(super) fn refuse_keys<const N: usize>(
    keys: [(&str, bool); N],
    (at, what, expected): (&str, &'static str, &str),
    problems: &mut Problems,
) {
    for (key, set) in keys {
        if set {
            problems.push(format!("{at}.{key}"), invalid(key, what, expected));
        }
    }
}

/// `text` as a listener's socket address, or a problem at `key` with `example`.
fn socket_address(
    text: &str,
    key: &str,
    example: &str,
    problems: &mut Problems,
) -> Option<SocketAddr> {
    let parsed = text.parse::<SocketAddr>().ok();
    if parsed.is_none() {
        problems.push(
            key.to_string(),
            invalid(
                text,
                "socket address",
                &format!("IP:PORT, such as \"{example}\""),
            ),
        );
    }
    parsed
}

fn invalid(value: &str, what: &'static str, expected: &str) -> ProblemKind {
    ProblemKind::Invalid {
        value: value.to_string(),
        what,
        expected: expected.to_string(),
    }
}

/// Formats a duration the way the config writes it ("1h 30m").
pub fn format_duration(duration: Duration) -> String {
    humantime::format_duration(duration).to_string()
}

/// Whether `name` is a valid principal, scope or credential name.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'))
}

const DEFAULT_LISTEN: &str = "127.0.0.1:7470";
const DEFAULT_GRANT_RETENTION: Duration = Duration::from_secs(3600);

fn build(raw: raw::RawConfig, base_dir: &Path, problems: &mut Problems) -> Option<Config> {
    let resolve = |path: String| -> PathBuf {
        let path = PathBuf::from(path);
        if path.is_absolute() {
            path
        } else {
            base_dir.join(path)
        }
    };

    let raw_server = problems.required(raw.server, "server").unwrap_or_default();
    let server_tls = identity::build_server_tls(&raw_server, &resolve, problems);
    let client_ca = server_tls
        .as_ref()
        .is_some_and(|tls| tls.client_ca_file.is_some());
    let listen_text = raw_server
        .listen
        .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
    let listen = socket_address(&listen_text, "server.listen", "127.0.0.1:7470", problems);
    let data_dir = problems
        .required(raw_server.data_dir, "server.data_dir")
        .map(resolve);
    let issuer = problems.required(raw_server.issuer, "server.issuer");
    if let Some(issuer) = &issuer
        && (issuer.is_empty() || issuer.len() > 256)
    {
        problems.push(
            "server.issuer",
            invalid(issuer, "issuer", "1 to 256 characters"),
        );
    }
    let server_max_ttl_raw = problems.required(raw_server.max_ttl, "server.max_ttl");
    let server_max_ttl = problems.duration(server_max_ttl_raw, "server.max_ttl");
    let grant_retention = match raw_server.grant_retention {
        Some(text) => problems.duration(Some(text), "server.grant_retention"),
        None => Some(DEFAULT_GRANT_RETENTION),
    };

    let seal = match raw.seal {
        None => None,
        Some(raw_seal) => key_source(
            raw_seal.key_file,
            raw_seal.key_env,
            ("seal.key_file", "seal.key_env"),
            "seal",
            problems,
        )
        .map(|source| match source {
            KeySource::File(path) => KeySource::File(resolve(path.to_string_lossy().into_owned())),
            other => other,
        }),
    };

    let store = store::build(raw.store, problems).map(|store| match store {
        StoreConfig::Etcd(mut etcd) => {
            let resolve_path = |path: &PathBuf| resolve(path.to_string_lossy().into_owned());
            if let Some(KeySource::File(path)) = &etcd.password {
                etcd.password = Some(KeySource::File(resolve_path(path)));
            }
            etcd.ca_file = etcd.ca_file.as_ref().map(resolve_path);
            etcd.client_certificate = etcd
                .client_certificate
                .as_ref()
                .map(|(cert, key)| (resolve_path(cert), resolve_path(key)));
            StoreConfig::Etcd(etcd)
        }
        sled => sled,
    });
    let audit_path = problems
        .required(raw.audit, "audit")
        .and_then(|raw_audit| problems.required(raw_audit.path, "audit.path"))
        .map(resolve);

    let mut credentials = BTreeMap::new();
    for (index, mut raw_credential) in raw.credential.into_iter().enumerate() {
        let at = format!("credential[{index}]");
        let aws = aws::build_credential(&mut raw_credential, &at, problems);
        let name = problems.name(raw_credential.name, &format!("{at}.name"));
        let source = key_source(
            raw_credential.file,
            raw_credential.env,
            ("file", "env"),
            &at,
            problems,
        )
        .map(|source| match source {
            KeySource::File(path) => KeySource::File(resolve(path.to_string_lossy().into_owned())),
            other => other,
        });
        if let (Some(name), Some(source)) = (name, source)
            && credentials
                .insert(
                    name.clone(),
                    Credential {
                        name: name.clone(),
                        source,
                        aws,
                    },
                )
                .is_some()
        {
            problems.push(format!("{at}.name"), ProblemKind::Duplicate { name });
        }
    }
    let defined_credentials = credentials.keys().cloned().collect::<Vec<_>>().join(", ");

    let upstreams = gateway::build_upstreams(
        raw.upstream,
        &credentials,
        &defined_credentials,
        &resolve,
        problems,
    );
    let gateway_listen = raw_server.gateway_listen.and_then(|text| {
        socket_address(&text, "server.gateway_listen", "127.0.0.1:7471", problems)
    });
    let metrics_listen = raw_server.metrics_listen.and_then(|text| {
        socket_address(&text, "server.metrics_listen", "127.0.0.1:7472", problems)
    });
    let console_listen = raw_server.console_listen.and_then(|text| {
        socket_address(&text, "server.console_listen", "127.0.0.1:7473", problems)
    });
    let console_url = raw_server.console_url.and_then(|text| {
        let trimmed = text.trim_end_matches('/');
        let well_formed = ["http://", "https://"].iter().any(|scheme| {
            trimmed.strip_prefix(scheme).is_some_and(|rest| {
                !rest.is_empty()
                    && !rest.contains(['?', '#', ' ', '@', '"', '<', '>'])
                    && rest.split('/').next().is_some_and(|host| !host.is_empty())
            })
        });
        if !well_formed {
            problems.push(
                "server.console_url",
                invalid(
                    &text,
                    "console URL",
                    "http(s)://HOST[:PORT][/PATH] as operators' browsers reach the console, such as \"https://valet.example.com:7473\"",
                ),
            );
            return None;
        }
        if console_listen.is_none() {
            problems.push(
                "server.console_url",
                invalid(
                    &text,
                    "console URL",
                    "set only with server.console_listen (the console is off without it)",
                ),
            );
        }
        Some(trimmed.to_string())
    });
    let console_session_ttl = match raw_server.console_session_ttl {
        None => Some(DEFAULT_CONSOLE_SESSION_TTL),
        Some(text) => problems
            .duration(Some(text.clone()), "server.console_session_ttl")
            .and_then(|ttl| {
                if ttl >= Duration::from_secs(1) && ttl <= Duration::from_secs(12 * 3600) {
                    Some(ttl)
                } else {
                    problems.push(
                        "server.console_session_ttl",
                        invalid(&text, "session lifetime", "from 1s to 12h"),
                    );
                    None
                }
            }),
    };
    let otlp_endpoint = raw_server.otlp_endpoint.and_then(|text| {
        let trimmed = text.trim_end_matches('/');
        let well_formed = ["http://", "https://"].iter().any(|scheme| {
            trimmed.strip_prefix(scheme).is_some_and(|rest| {
                !rest.is_empty()
                    && !rest.contains(['?', '#', ' ', '@'])
                    && rest.split('/').next().is_some_and(|host| !host.is_empty())
            })
        });
        if well_formed {
            Some(trimmed.to_string())
        } else {
            problems.push(
                "server.otlp_endpoint",
                invalid(
                    &text,
                    "OTLP/HTTP endpoint",
                    "http://HOST:PORT or https://HOST:PORT (spans go to its /v1/traces), such as \"http://127.0.0.1:4318\"",
                ),
            );
            None
        }
    });
    let max_connections = match raw_server.max_connections {
        None => DEFAULT_MAX_CONNECTIONS,
        Some(number) if (1..=1_000_000).contains(&number) => number as usize,
        Some(number) => {
            problems.push(
                "server.max_connections",
                invalid(
                    &number.to_string(),
                    "connection limit",
                    "a whole number from 1 to 1000000 (each connection holds a file descriptor)",
                ),
            );
            DEFAULT_MAX_CONNECTIONS
        }
    };
    // Per source: a quarter of the listener's places, and an eighth before authenticating.
    let mut per_source = |value: Option<i64>, key: &str, default: usize, at_most: usize| match value
    {
        None => default.clamp(1, at_most),
        Some(number) if number >= 1 && (number as u64) <= at_most as u64 => number as usize,
        Some(number) => {
            problems.push(
                key,
                invalid(
                    &number.to_string(),
                    "connection limit",
                    &format!("a whole number from 1 to {at_most}"),
                ),
            );
            default.clamp(1, at_most)
        }
    };
    let max_connections_per_source = per_source(
        raw_server.max_connections_per_source,
        "server.max_connections_per_source",
        max_connections / 4,
        max_connections,
    );
    let max_unauthenticated_per_source = per_source(
        raw_server.max_unauthenticated_per_source,
        "server.max_unauthenticated_per_source",
        max_connections / 8,
        max_connections_per_source,
    );
    let idle_timeout = match raw_server.idle_timeout {
        None => Some(DEFAULT_IDLE_TIMEOUT),
        Some(text) => problems
            .duration(Some(text.clone()), "server.idle_timeout")
            .and_then(|timeout| {
                if timeout >= Duration::from_secs(1) && timeout <= Duration::from_secs(3600) {
                    Some(timeout)
                } else {
                    problems.push(
                        "server.idle_timeout",
                        invalid(&text, "idle timeout", "from 1s to 1h"),
                    );
                    None
                }
            }),
    };
    let failed_authentication_limit = match raw_server.failed_authentication_limit {
        None => DEFAULT_FAILED_AUTHENTICATION_LIMIT,
        Some(text) => crate::rate::Rate::parse(&text).unwrap_or_else(|| {
            problems.push(
                "server.failed_authentication_limit",
                invalid(&text, "rate", crate::rate::RATE_RULE),
            );
            DEFAULT_FAILED_AUTHENTICATION_LIMIT
        }),
    };
    // Across all sources: twenty sources' worth by default, over the same period.
    let failed_authentication_limit_total = match raw_server.failed_authentication_limit_total {
        None => crate::rate::Rate {
            count: failed_authentication_limit.count.saturating_mul(20),
            per: failed_authentication_limit.per,
        },
        Some(text) => crate::rate::Rate::parse(&text).unwrap_or_else(|| {
            problems.push(
                "server.failed_authentication_limit_total",
                invalid(&text, "rate", crate::rate::RATE_RULE),
            );
            failed_authentication_limit
        }),
    };
    let raw_approvals = raw.approvals.unwrap_or_default();
    let mut approval_limits = ApprovalLimits::default();
    for (value, key, slot) in [
        (
            raw_approvals.max_pending_per_grant,
            "approvals.max_pending_per_grant",
            &mut approval_limits.per_grant,
        ),
        (
            raw_approvals.max_pending_per_principal,
            "approvals.max_pending_per_principal",
            &mut approval_limits.per_principal,
        ),
    ] {
        match value.map(u32::try_from) {
            None => {}
            Some(Ok(number)) if (1..=10_000).contains(&number) => *slot = number,
            Some(_) => problems.push(
                key.to_string(),
                invalid(
                    &value.unwrap_or_default().to_string(),
                    "limit",
                    "a whole number from 1 to 10000",
                ),
            ),
        }
    }
    let approvals_webhook = raw_approvals
        .webhook
        .and_then(|url| approval::build_webhook(url, problems));
    let mut scopes = BTreeMap::new();
    for (index, raw_scope) in raw.scope.into_iter().enumerate() {
        let at = format!("scope[{index}]");
        if let Some(scope) = build_scope(
            raw_scope,
            &at,
            server_max_ttl,
            (&credentials, &defined_credentials),
            &upstreams,
            problems,
        ) {
            let name = scope.name.clone();
            if scopes.insert(name.clone(), scope).is_some() {
                problems.push(format!("{at}.name"), ProblemKind::Duplicate { name });
            }
        }
    }
    let defined_scopes = scopes.keys().cloned().collect::<Vec<_>>().join(", ");

    let mut issuers = BTreeMap::new();
    let mut issuer_names = BTreeSet::new();
    for (index, raw_issuer) in raw.issuer.into_iter().enumerate() {
        let at = format!("issuer[{index}]");
        if let Some(issuer) = identity::build_issuer(raw_issuer, &at, &resolve, problems) {
            if !issuer_names.insert(issuer.issuer.clone()) {
                problems.push(
                    format!("{at}.issuer"),
                    ProblemKind::Duplicate {
                        name: issuer.issuer.clone(),
                    },
                );
            }
            if let Some(previous) = issuers.insert(issuer.name.clone(), issuer) {
                problems.push(
                    format!("{at}.name"),
                    ProblemKind::Duplicate {
                        name: previous.name,
                    },
                );
            }
        }
    }
    let mut principals: BTreeMap<String, Principal> = BTreeMap::new();
    for (index, raw_principal) in raw.principal.into_iter().enumerate() {
        let at = format!("principal[{index}]");
        let name = problems.name(raw_principal.name, &format!("{at}.name"));
        // A credential that was written but is invalid is reported where it is written.
        let had_credential = raw_principal.key_sha256.is_some()
            || !raw_principal.certificate.is_empty()
            || !raw_principal.identity.is_empty();
        let rate = raw_principal.rate.as_ref().and_then(|text| {
            let rate = crate::rate::Rate::parse(text);
            if rate.is_none() {
                problems.push(
                    format!("{at}.rate"),
                    invalid(text, "rate", crate::rate::RATE_RULE),
                );
            }
            rate
        });
        let mut identities = Vec::new();
        for (match_index, raw_match) in raw_principal.identity.into_iter().enumerate() {
            let match_at = format!("{at}.identity[{match_index}]");
            if let Some(matcher) =
                identity::build_identity_match(raw_match, &match_at, &issuers, problems)
            {
                if let Some(other) = principals
                    .values()
                    .find(|other| other.identities.contains(&matcher))
                {
                    problems.push(
                        match_at,
                        ProblemKind::SharedIdentity {
                            identity: matcher.to_string(),
                            other: other.name.clone(),
                        },
                    );
                }
                identities.push(matcher);
            }
        }
        let mut roles = BTreeSet::new();
        if raw_principal.roles.is_empty() {
            problems.push(
                format!("{at}.roles"),
                invalid(
                    "[]",
                    "role list",
                    "at least one of \"agent\", \"operator\", \"admin\"",
                ),
            );
        }
        for (role_index, role_text) in raw_principal.roles.iter().enumerate() {
            match Role::parse(role_text) {
                Some(role) => {
                    roles.insert(role);
                }
                None => problems.push(
                    format!("{at}.roles[{role_index}]"),
                    invalid(role_text, "role", "\"agent\", \"operator\" or \"admin\""),
                ),
            }
        }
        let key_sha256 = raw_principal.key_sha256.and_then(|text| {
            let decoded = hex::decode(text.trim()).ok().and_then(|bytes| <[u8; 32]>::try_from(bytes).ok());
            if decoded.is_none() {
                problems.push(
                    format!("{at}.key_sha256"),
                    invalid(&text, "key hash", "64 hex digits: the SHA-256 of the principal's key (`valet keygen` prints it)"),
                );
            }
            decoded
        });
        let mut certificates = Vec::new();
        for (match_index, raw_match) in raw_principal.certificate.into_iter().enumerate() {
            let match_at = format!("{at}.certificate[{match_index}]");
            if !client_ca {
                problems.push(
                    &match_at,
                    invalid(
                        "certificate",
                        "principal certificate without a client CA",
                        "server.client_ca_file set: certificates are verified against it",
                    ),
                );
            }
            if let Some(matcher) = identity::build_certificate_match(raw_match, &match_at, problems)
            {
                if let Some(other) = principals
                    .values()
                    .find(|other| other.certificates.contains(&matcher))
                {
                    problems.push(
                        match_at,
                        ProblemKind::SharedIdentity {
                            identity: matcher.to_string(),
                            other: other.name.clone(),
                        },
                    );
                }
                certificates.push(matcher);
            }
        }
        let mut allowed_scopes = BTreeSet::new();
        for (scope_index, scope_name) in raw_principal.scopes.into_iter().enumerate() {
            if !scopes.contains_key(&scope_name) {
                problems.push(
                    format!("{at}.scopes[{scope_index}]"),
                    ProblemKind::UnknownScope {
                        name: scope_name.clone(),
                        defined: defined_scopes.clone(),
                    },
                );
            }
            allowed_scopes.insert(scope_name);
        }
        let Some(name) = name else {
            continue;
        };
        if key_sha256.is_none()
            && certificates.is_empty()
            && identities.is_empty()
            && !had_credential
        {
            problems.push(
                at.clone(),
                invalid(
                    &name,
                    "principal without a credential",
                    "key_sha256 (from `valet keygen`), a [[principal.certificate]] or a [[principal.identity]]",
                ),
            );
        }
        if let Some(key_sha256) = key_sha256
            && let Some(other) = principals
                .values()
                .find(|other| other.key_sha256 == Some(key_sha256))
        {
            problems.push(
                format!("{at}.key_sha256"),
                ProblemKind::SharedKey {
                    other: other.name.clone(),
                },
            );
        }
        let principal = Principal {
            name: name.clone(),
            roles,
            key_sha256,
            certificates,
            identities,
            rate,
            position: index,
            allow_broad: reasoned_exception(raw_principal.allow_broad, &at, problems),
            scopes: allowed_scopes,
        };
        if principals.insert(name.clone(), principal).is_some() {
            problems.push(format!("{at}.name"), ProblemKind::Duplicate { name });
        }
    }

    Some(Config {
        server: ServerConfig {
            listen: listen?,
            data_dir: data_dir?,
            issuer: issuer?,
            max_ttl: server_max_ttl?,
            grant_retention: grant_retention?,
            gateway_listen,
            metrics_listen,
            console_listen,
            console_url,
            console_session_ttl: console_session_ttl?,
            otlp_endpoint,
            insecure_plaintext: raw_server.insecure_plaintext.unwrap_or(false),
            max_connections,
            max_connections_per_source,
            max_unauthenticated_per_source,
            idle_timeout: idle_timeout?,
            tls: server_tls,
            failed_authentication_limit,
            failed_authentication_limit_total,
        },
        seal,
        audit: AuditConfig { path: audit_path? },
        principals,
        credentials,
        scopes,
        upstreams,
        approvals_webhook,
        approval_limits,
        store: store?,
        issuers,
    })
}

fn key_source(
    file: Option<String>,
    env: Option<String>,
    (file_key, env_key): (&'static str, &'static str),
    at: &str,
    problems: &mut Problems,
) -> Option<KeySource> {
    let short = |key: &'static str| key.rsplit('.').next().unwrap_or(key);
    match (file, env) {
        (Some(_), Some(_)) => {
            problems.push(
                at,
                ProblemKind::BothSet {
                    first: short(file_key),
                    second: short(env_key),
                },
            );
            None
        }
        (None, None) => {
            problems.push(
                at,
                ProblemKind::NeitherSet {
                    first: short(file_key),
                    second: short(env_key),
                },
            );
            None
        }
        (Some(path), None) if path.is_empty() => {
            problems.push(
                format!("{at}.{}", short(file_key)),
                invalid("", "path", "a file path"),
            );
            None
        }
        (None, Some(name)) if !is_valid_env_name(&name) => {
            problems.push(
                format!("{at}.{}", short(env_key)),
                invalid(
                    &name,
                    "environment variable name",
                    "letters, digits and '_', not starting with a digit",
                ),
            );
            None
        }
        (Some(path), None) => Some(KeySource::File(PathBuf::from(path))),
        (None, Some(name)) => Some(KeySource::Env(name)),
    }
}

fn is_valid_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(first) if first.is_ascii_alphabetic() || first == b'_')
        && bytes.all(|byte| byte.is_ascii_alphanumeric() || byte == b'_')
}

fn build_scope(
    mut raw_scope: raw::RawScope,
    at: &str,
    server_max_ttl: Option<Duration>,
    (credentials, defined_credentials): (&BTreeMap<String, Credential>, &str),
    upstreams: &BTreeMap<String, Upstream>,
    problems: &mut Problems,
) -> Option<Scope> {
    let name = problems.name(raw_scope.name.take(), &format!("{at}.name"));
    let is_aws_sts = raw_scope.provider.as_deref() == Some("aws-sts");
    let has_upstream = raw_scope.upstream.is_some();
    let upstream = raw_scope
        .upstream
        .take()
        .and_then(|name| match upstreams.get(&name) {
            Some(upstream) => Some(upstream),
            None => {
                let defined = upstreams.keys().cloned().collect::<Vec<_>>().join(", ");
                problems.push(
                    format!("{at}.upstream"),
                    invalid(
                        &name,
                        "upstream",
                        &format!("one of the defined upstreams [{defined}]"),
                    ),
                );
                None
            }
        });
    // A gateway scope draws on its upstream's credential and is for its upstream's audience;
    // saying so again is allowed, saying something else is an error.
    let credential = match (raw_scope.credential.take(), upstream) {
        (Some(credential), Some(upstream)) if credential != upstream.credential => {
            problems.push(
                format!("{at}.credential"),
                invalid(
                    &credential,
                    "credential",
                    &format!(
                        "the upstream's credential {:?} (or leave it out)",
                        upstream.credential
                    ),
                ),
            );
            None
        }
        (None, Some(upstream)) => Some(upstream.credential.clone()),
        (credential, _) => problems.required(credential, &format!("{at}.credential")),
    };
    let raw_audience = match (raw_scope.audience.take(), upstream) {
        (Some(audience), Some(upstream)) if audience != upstream.name => {
            problems.push(
                format!("{at}.audience"),
                invalid(
                    &audience,
                    "audience",
                    &format!("the upstream's name {:?} (or leave it out)", upstream.name),
                ),
            );
            None
        }
        (None, Some(upstream)) => Some(upstream.name.clone()),
        // STS credentials are for AWS; the grant's own token names that as its audience.
        (None, None) if is_aws_sts => Some("aws".to_string()),
        (None, None) => {
            problems.push(format!("{at}.audience"), ProblemKind::Missing);
            None
        }
        (audience, _) => audience,
    };
    if let Some(credential) = &credential
        && !credentials.contains_key(credential)
    {
        problems.push(
            format!("{at}.credential"),
            ProblemKind::UnknownCredential {
                name: credential.clone(),
                defined: defined_credentials.to_string(),
            },
        );
    }
    let environment = problems.name(raw_scope.environment.take(), &format!("{at}.environment"));
    let audience = match raw_audience {
        Some(audience) if audience.is_empty() || audience.len() > 256 => {
            problems.push(
                format!("{at}.audience"),
                invalid(&audience, "audience", "1 to 256 characters"),
            );
            None
        }
        audience => audience,
    };
    let max_ttl_raw = problems.required(raw_scope.max_ttl.take(), &format!("{at}.max_ttl"));
    let max_ttl = problems.duration(max_ttl_raw, &format!("{at}.max_ttl"));
    let default_ttl_raw =
        problems.required(raw_scope.default_ttl.take(), &format!("{at}.default_ttl"));
    let default_ttl = problems.duration(default_ttl_raw, &format!("{at}.default_ttl"));
    if let (Some(max_ttl), Some(server_max_ttl)) = (max_ttl, server_max_ttl) {
        problems.cap(
            &format!("{at}.max_ttl"),
            max_ttl,
            "server.max_ttl",
            server_max_ttl,
        );
    }
    if let (Some(default_ttl), Some(max_ttl)) = (default_ttl, max_ttl) {
        problems.cap(
            &format!("{at}.default_ttl"),
            default_ttl,
            &format!("{at}.max_ttl"),
            max_ttl,
        );
    }
    let max_uses = match raw_scope.max_uses {
        None => None,
        Some(count) if count >= 1 => u64::try_from(count).ok(),
        Some(count) => {
            problems.push(
                format!("{at}.max_uses"),
                invalid(
                    &count.to_string(),
                    "use count",
                    "a whole number of at least 1",
                ),
            );
            None
        }
    };
    let mut params = BTreeMap::new();
    let mut allow_broad = BTreeMap::new();
    if let Some(reason) = reasoned_exception(raw_scope.allow_broad.take(), at, problems) {
        allow_broad.insert(String::new(), reason);
    }
    for (param_name, raw_param) in &mut raw_scope.params {
        let param_at = format!("{at}.params.{param_name}");
        if let Some(reason) = reasoned_exception(raw_param.allow_broad.take(), &param_at, problems)
        {
            allow_broad.insert(format!("params.{param_name}"), reason);
        }
    }
    for (rule_index, raw_rule) in raw_scope.allow.iter_mut().enumerate() {
        let rule_at = format!("{at}.allow[{rule_index}]");
        if let Some(reason) = reasoned_exception(raw_rule.allow_broad.take(), &rule_at, problems) {
            allow_broad.insert(format!("allow[{rule_index}]"), reason);
        }
    }
    for (param_name, raw_param) in std::mem::take(&mut raw_scope.params) {
        let param_at = format!("{at}.params.{param_name}");
        if !is_valid_param_name(&param_name) {
            problems.push(
                param_at.clone(),
                invalid(
                    &param_name,
                    "parameter name",
                    "1 to 64 characters from a-z, 0-9, '_', starting with a letter",
                ),
            );
            continue;
        }
        let allowed = match (raw_param.pattern, raw_param.values) {
            (Some(_), Some(_)) => {
                problems.push(
                    param_at.clone(),
                    ProblemKind::BothSet {
                        first: "pattern",
                        second: "values",
                    },
                );
                continue;
            }
            (None, None) => {
                problems.push(
                    param_at.clone(),
                    ProblemKind::NeitherSet {
                        first: "pattern",
                        second: "values",
                    },
                );
                continue;
            }
            (Some(pattern), None) => match Regex::new(&format!("^(?:{pattern})$")) {
                Ok(regex) => AllowedValues::Pattern {
                    source: pattern,
                    regex,
                },
                Err(error) => {
                    problems.push(
                        format!("{param_at}.pattern"),
                        invalid(
                            &pattern,
                            "pattern",
                            &format!("a regular expression ({})", first_line(&error.to_string())),
                        ),
                    );
                    continue;
                }
            },
            (None, Some(values)) if values.is_empty() => {
                problems.push(
                    format!("{param_at}.values"),
                    invalid("[]", "value list", "at least one value"),
                );
                continue;
            }
            (None, Some(values)) => AllowedValues::OneOf(values.into_iter().collect()),
        };
        params.insert(
            param_name,
            ParamRule {
                required: raw_param.required.unwrap_or(true),
                allowed,
            },
        );
    }
    let scope_aws = aws::build_scope(
        &mut raw_scope,
        at,
        credential.as_ref().and_then(|name| credentials.get(name)),
        (&params, has_upstream),
        max_ttl,
        problems,
    );
    let scope_approval = raw_scope
        .approval
        .take()
        .and_then(|raw| approval::build_policy(raw, &format!("{at}.approval"), &params, problems));
    let n_raw_rules = raw_scope.allow.len();
    let allow =
        gateway::build_allow_rules(std::mem::take(&mut raw_scope.allow), at, &params, problems);
    let is_mcp = upstream.is_some_and(|upstream| upstream.kind == UpstreamKind::Mcp);
    let scope_mcp = match (raw_scope.mcp.take(), is_mcp) {
        (Some(raw), true) => Some(mcp::build_mcp_scope(raw, at, &params, problems)),
        (None, true) => {
            problems.push(
                format!("{at}.mcp"),
                invalid(
                    "(missing)",
                    "[scope.mcp]",
                    "a [scope.mcp] table with at least one [[scope.mcp.tool]], resources or prompts: an MCP scope allows nothing by default",
                ),
            );
            None
        }
        (Some(_), false) => {
            problems.push(
                format!("{at}.mcp"),
                invalid(
                    "[scope.mcp]",
                    "table",
                    "[scope.mcp] only in a scope whose upstream is of kind = \"mcp\"",
                ),
            );
            None
        }
        (None, false) => None,
    };
    if let (
        Some(allowed),
        Some(Upstream {
            target: Target::Process(_),
            ..
        }),
    ) = (&scope_mcp, upstream)
        && !allowed.client_requests.is_empty()
    {
        problems.push(
            format!("{at}.mcp.client_requests"),
            invalid(
                "[…]",
                "client request list",
                "none for an MCP server valetd runs: valetd declares no client capabilities to it, so it never asks; client_requests apply to remote servers",
            ),
        );
    }
    for rule in scope_mcp
        .iter()
        .flat_map(|allowed| allowed.tools.iter().chain(&allowed.prompts))
    {
        if let Some(reason) = &rule.allow_broad {
            allow_broad.insert(format!("mcp.{}[{}]", rule.kind, rule.index), reason.clone());
        }
    }
    if let Some(allowed) = &scope_mcp
        && allowed.tools.is_empty()
        && allowed.resources.is_empty()
        && allowed.prompts.is_empty()
    {
        problems.push(
            format!("{at}.mcp"),
            invalid(
                "{}",
                "[scope.mcp]",
                "at least one [[scope.mcp.tool]], resources or prompts entry: an MCP scope allows nothing by default",
            ),
        );
    }
    match upstream {
        Some(_) if is_mcp && n_raw_rules > 0 => problems.push(
            format!("{at}.allow"),
            invalid(
                "[[scope.allow]]",
                "rule list",
                "none in a scope for an MCP upstream: its tools go in [[scope.mcp.tool]]",
            ),
        ),
        Some(_) if is_mcp => {}
        None if n_raw_rules > 0 => problems.push(
            format!("{at}.allow"),
            invalid(
                "[[scope.allow]]",
                "rule list",
                "rules only in a scope with an upstream (set upstream = NAME)",
            ),
        ),
        Some(_) if n_raw_rules == 0 => problems.push(
            format!("{at}.allow"),
            invalid(
                "[]",
                "rule list",
                "at least one [[scope.allow]] rule: a gateway scope allows nothing by default",
            ),
        ),
        _ => {}
    }
    // The parameter the root credential goes in is the gateway's to set, never the agent's.
    if let Some(Upstream {
        target:
            Target::Url {
                inject: Injection::Query { name: injected, .. },
                ..
            },
        ..
    }) = upstream
    {
        for rule in &allow {
            if rule.query.contains_key(injected) {
                problems.push(
                    format!("{at}.allow[{}].query.{injected}", rule.index),
                    invalid(
                        injected,
                        "query parameter",
                        "any parameter but the one the upstream's root credential is injected in",
                    ),
                );
            }
        }
    }
    Some(Scope {
        position: at
            .trim_start_matches("scope[")
            .trim_end_matches(']')
            .parse()
            .unwrap_or_default(),
        allow_broad,
        name: name?,
        credential: credential?,
        environment: environment?,
        audience: audience?,
        default_ttl: default_ttl?,
        max_ttl: max_ttl?,
        max_uses,
        renewable: raw_scope.renewable.unwrap_or(true),
        upstream: upstream.map(|upstream| upstream.name.clone()),
        allow,
        mcp: scope_mcp,
        approval: scope_approval,
        aws: scope_aws,
        params,
    })
}

/// An `allow_broad = "reason"`: the reason must say something (at least 10 characters).
fn reasoned_exception(reason: Option<String>, at: &str, problems: &mut Problems) -> Option<String> {
    let reason = reason?;
    if reason.trim().chars().count() < 10 {
        problems.push(
            format!("{at}.allow_broad"),
            invalid(
                &reason,
                "reason",
                "a sentence of at least 10 characters saying why this breadth is acceptable (it is shown wherever the lint would be)",
            ),
        );
        return None;
    }
    Some(reason.trim().to_string())
}

fn first_line(text: &str) -> &str {
    text.lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .unwrap_or(text)
        .trim()
}

/// Whether `name` may name a scope parameter (it becomes a token claim key).
pub fn is_valid_param_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    name.len() <= 64
        && matches!(bytes.next(), Some(first) if first.is_ascii_lowercase())
        && bytes.all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'_')
}

#[cfg(test)]
mod tests;
