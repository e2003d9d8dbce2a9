//! The config file as written: plain strings and options, before any validation.
//!
//! Everything is lenient here (durations and addresses are strings) so that validation can report
//! every problem at once with its key path, instead of stopping at the first type error.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
pub struct RawConfig {
    pub server: Option<RawServer>,
    pub seal: Option<RawSeal>,
    pub audit: Option<RawAudit>,
    #[serde(default)]
    pub principal: Vec<RawPrincipal>,
    #[serde(default)]
    pub credential: Vec<RawCredential>,
    #[serde(default)]
    pub scope: Vec<RawScope>,
    #[serde(default)]
    pub upstream: Vec<RawUpstream>,
    pub approvals: Option<RawApprovals>,
    pub store: Option<RawStore>,
    #[serde(default)]
    pub issuer: Vec<RawIssuer>,
}

/// `[[issuer]]`: a platform whose identity tokens valetd accepts.
#[derive(Debug, Default, Deserialize)]
pub struct RawIssuer {
    pub name: Option<String>,
    pub issuer: Option<String>,
    #[serde(default)]
    pub audiences: Vec<String>,
    pub jwks_url: Option<String>,
    pub jwks_file: Option<String>,
    pub ca_file: Option<String>,
    #[serde(default)]
    pub algorithms: Vec<String>,
    pub clock_skew: Option<String>,
    pub max_token_age: Option<String>,
}

/// `[[principal.identity]]`: the identity tokens that authenticate a principal.
#[derive(Debug, Default, Deserialize)]
pub struct RawIdentityMatch {
    pub issuer: Option<String>,
    pub subject: Option<String>,
    #[serde(default)]
    pub claims: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawStore {
    pub engine: Option<String>,
    pub endpoints: Option<Vec<String>>,
    pub prefix: Option<String>,
    pub username: Option<String>,
    pub password_env: Option<String>,
    pub password_file: Option<String>,
    pub replica: Option<String>,
    pub ca_file: Option<String>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    pub allow_insecure: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawApprovals {
    pub webhook: Option<String>,
    pub max_pending_per_grant: Option<i64>,
    pub max_pending_per_principal: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawApproval {
    #[serde(default)]
    pub approvers: Vec<String>,
    pub count: Option<i64>,
    pub timeout: Option<String>,
    pub confirm: Option<String>,
}

/// `approval = true`, or a table with the same keys as `[scope.approval]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawRuleApproval {
    Flag(bool),
    Policy(RawApproval),
}

#[derive(Debug, Default, Deserialize)]
pub struct RawServer {
    pub listen: Option<String>,
    pub data_dir: Option<String>,
    pub issuer: Option<String>,
    pub max_ttl: Option<String>,
    pub grant_retention: Option<String>,
    pub gateway_listen: Option<String>,
    pub metrics_listen: Option<String>,
    pub console_listen: Option<String>,
    pub console_url: Option<String>,
    pub console_session_ttl: Option<String>,
    pub otlp_endpoint: Option<String>,
    pub insecure_plaintext: Option<bool>,
    pub max_connections: Option<i64>,
    pub max_connections_per_source: Option<i64>,
    pub max_unauthenticated_per_source: Option<i64>,
    pub idle_timeout: Option<String>,
    pub tls_cert_file: Option<String>,
    pub tls_key_file: Option<String>,
    pub client_ca_file: Option<String>,
    pub client_auth: Option<String>,
    pub failed_authentication_limit: Option<String>,
    pub failed_authentication_limit_total: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawSeal {
    pub key_file: Option<String>,
    pub key_env: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawAudit {
    pub path: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawPrincipal {
    pub name: Option<String>,
    #[serde(default)]
    pub roles: Vec<String>,
    pub key_sha256: Option<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub certificate: Vec<RawCertificateMatch>,
    #[serde(default)]
    pub identity: Vec<RawIdentityMatch>,
    pub rate: Option<String>,
    pub allow_broad: Option<String>,
}

/// `[[principal.certificate]]`: one client-certificate identity that authenticates a principal.
#[derive(Debug, Default, Deserialize)]
pub struct RawCertificateMatch {
    pub spiffe_id: Option<String>,
    pub dns_name: Option<String>,
    pub common_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawCredential {
    pub name: Option<String>,
    pub env: Option<String>,
    pub file: Option<String>,
    pub kind: Option<String>,
    pub access_key_id: Option<String>,
    pub access_key_id_env: Option<String>,
    pub region: Option<String>,
    pub endpoint: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawScope {
    pub name: Option<String>,
    pub credential: Option<String>,
    pub environment: Option<String>,
    pub audience: Option<String>,
    pub default_ttl: Option<String>,
    pub max_ttl: Option<String>,
    pub max_uses: Option<i64>,
    pub renewable: Option<bool>,
    #[serde(default)]
    pub params: BTreeMap<String, RawParam>,
    pub upstream: Option<String>,
    #[serde(default)]
    pub allow: Vec<RawAllow>,
    pub approval: Option<RawApproval>,
    pub provider: Option<String>,
    pub role_arn: Option<String>,
    pub actions: Option<Vec<String>>,
    pub resources: Option<Vec<String>>,
    pub conditions: Option<BTreeMap<String, BTreeMap<String, RawConditionValues>>>,
    pub revoke: Option<String>,
    pub allow_broad: Option<String>,
    /// `[scope.mcp]`: what a scope for an MCP upstream may use.
    pub mcp: Option<RawMcpScope>,
}

/// `[scope.mcp]`.
#[derive(Debug, Default, Deserialize)]
pub struct RawMcpScope {
    #[serde(default)]
    pub tool: Vec<RawTool>,
    #[serde(default)]
    pub resources: Vec<String>,
    #[serde(default)]
    pub prompts: Vec<String>,
    /// `[[scope.mcp.prompt]]`: prompts with rules for their arguments.
    #[serde(default)]
    pub prompt: Vec<RawTool>,
    /// Requests the server may send the agent's client: "sampling", "elicitation", "roots".
    #[serde(default)]
    pub client_requests: Vec<String>,
    /// Most messages one POST may batch (default 16).
    pub max_batch: Option<i64>,
}

/// `[[scope.mcp.tool]]`.
#[derive(Debug, Default, Deserialize)]
pub struct RawTool {
    pub name: Option<String>,
    #[serde(default)]
    pub arguments: BTreeMap<String, RawArgumentRule>,
    #[serde(default)]
    pub required: Vec<String>,
    #[serde(default)]
    pub forbidden: Vec<String>,
    pub approval: Option<RawRuleApproval>,
    pub max_calls: Option<i64>,
    pub allow_broad: Option<String>,
}

/// What one tool argument may be: a value rule, or a table that may also bound a number.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawArgumentRule {
    Text(String),
    Table(RawArgumentTable),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawArgumentTable {
    pub one_of: Option<Vec<String>>,
    pub pattern: Option<String>,
    pub min: Option<f64>,
    pub max: Option<f64>,
}

/// An IAM condition's value: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawConditionValues {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
pub struct RawUpstream {
    pub name: Option<String>,
    /// "http" (the default) or "mcp".
    pub kind: Option<String>,
    pub base_url: Option<String>,
    /// An MCP server valetd runs and talks to over stdio.
    pub command: Option<String>,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub working_dir: Option<String>,
    pub max_processes: Option<i64>,
    pub max_processes_per_principal: Option<i64>,
    pub starts_per_principal: Option<String>,
    pub shared: Option<bool>,
    pub idle_timeout: Option<String>,
    pub credential: Option<String>,
    pub inject: Option<RawInject>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    pub ca_file: Option<String>,
    pub connect_timeout: Option<String>,
    pub timeout: Option<String>,
    #[serde(default)]
    pub forward_headers: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawInject {
    pub header: Option<BTreeMap<String, String>>,
    pub query: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawAllow {
    pub method: Option<String>,
    pub methods: Option<Vec<String>>,
    pub path: Option<String>,
    pub graphql: Option<RawGraphql>,
    pub max_body: Option<i64>,
    pub max_calls: Option<i64>,
    pub approval: Option<RawRuleApproval>,
    #[serde(default)]
    pub query: BTreeMap<String, RawValueRule>,
    pub allow_broad: Option<String>,
}

/// The values a query parameter or an argument may take: `"exact"`, `"{param}"`,
/// `{ one_of = [...] }` or `{ pattern = "..." }`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawValueRule {
    Text(String),
    Table(RawValueTable),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawValueTable {
    pub one_of: Option<Vec<String>>,
    pub pattern: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawGraphql {
    #[serde(default)]
    pub query: Vec<String>,
    #[serde(default)]
    pub mutation: Vec<String>,
    #[serde(default)]
    pub arguments: BTreeMap<String, RawValueRule>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawParam {
    pub pattern: Option<String>,
    pub values: Option<Vec<String>>,
    pub required: Option<bool>,
    pub allow_broad: Option<String>,
}

/// Parses TOML text into the raw model, collecting the path of every key the model does not know.
pub fn parse(text: &str) -> Result<(RawConfig, Vec<String>), toml::de::Error> {
    let mut unknown = Vec::new();
    let deserializer = toml::Deserializer::parse(text)?;
    let raw = serde_ignored::deserialize(deserializer, |path| {
        unknown.push(key_path(&path.to_string()))
    })?;
    Ok((raw, unknown))
}

/// Turns serde_ignored's `scope.0.max_tll` into the config's own form, `scope[0].max_tll`.
fn key_path(dotted: &str) -> String {
    let mut out = String::new();
    for part in dotted.split('.').filter(|part| *part != "?") {
        if part.chars().all(|character| character.is_ascii_digit()) && !part.is_empty() {
            out.push_str(&format!("[{part}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(part);
        }
    }
    out
}
