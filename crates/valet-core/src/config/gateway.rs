//! The gateway's part of the config: `[[upstream]]` (where calls go and how the root credential
//! is added) and `[[scope.allow]]` (which calls a scope lets through).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use super::raw::{RawAllow, RawUpstream, RawValueRule, RawValueTable};
use super::{Credential, ParamRule, ProblemKind, Problems, invalid};
use crate::rules::{
    AllowRule, ArgumentPath, DEFAULT_MAX_BODY, GraphqlAllow, PathPattern, ValueRule,
};

/// An API the gateway forwards to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub name: String,
    /// What the upstream speaks: HTTP (REST, GraphQL) at `/u/<name>/…`, or MCP at `/mcp/<name>`.
    pub kind: UpstreamKind,
    /// Where calls go: a URL with the root credential injected on the leg, or (MCP only) a
    /// server valetd runs with the root credential in its environment.
    pub target: Target,
    /// The root credential injected on the upstream leg or into the server's environment.
    pub credential: String,
    /// Extra headers added to every forwarded call.
    pub headers: Vec<(String, String)>,
    /// A PEM file of CA certificates for an upstream behind a private CA.
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    /// Request headers forwarded from the agent beyond the fixed allowlist, lowercase.
    pub forward_headers: BTreeSet<String>,
}

/// What an upstream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamKind {
    Http,
    Mcp,
}

/// Where an upstream's calls go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Url {
        base_url: BaseUrl,
        inject: Injection,
    },
    /// An MCP server valetd starts and speaks to over stdio.
    Process(StdioServer),
}

/// An MCP server run by valetd: the root credential lives only in its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StdioServer {
    pub command: String,
    pub args: Vec<String>,
    /// Environment variables, each a template where `{secret}` is the credential; nothing of
    /// valetd's own environment is passed but `PATH`, `HOME` and `LANG`.
    pub env: Vec<(String, String)>,
    pub working_dir: Option<PathBuf>,
    /// Processes kept at once (one per grant in use).
    pub max_processes: usize,
    /// Processes one principal's grants keep at once.
    pub max_processes_per_principal: usize,
    /// Processes one principal's calls may start, over time.
    pub starts_per_principal: crate::rate::Rate,
    /// The server keeps no per-grant state: every grant shares one process.
    pub shared: bool,
    /// A process unused this long is stopped.
    pub idle_timeout: Duration,
}

pub const DEFAULT_MAX_PROCESSES: usize = 4;
/// Process starts a principal may cause by default: a start costs a runtime and its imports
/// (a second or more of CPU for a Python server).
pub const DEFAULT_STARTS_PER_PRINCIPAL: crate::rate::Rate = crate::rate::Rate {
    count: 10,
    per: Duration::from_secs(60),
};
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Request headers the gateway forwards from the agent to any upstream: end-to-end headers that
/// describe the body or the client, and conditional requests. Everything else is dropped.
pub const FORWARDED_HEADERS: [&str; 10] = [
    "accept",
    "accept-language",
    "content-language",
    "user-agent",
    "idempotency-key",
    "x-idempotency-key",
    "if-match",
    "if-none-match",
    "if-modified-since",
    "if-unmodified-since",
];

/// Headers no upstream config may forward: they change the method, the path, the host, the
/// encoding or the range the upstream acts on, or carry credentials or connection state.
pub fn never_forwarded(name: &str) -> Option<&'static str> {
    let name = name.to_ascii_lowercase();
    let reason = match name.as_str() {
        "x-http-method-override" | "x-http-method" | "x-method-override" => {
            "it overrides the method the upstream executes"
        }
        "x-original-url" | "x-rewrite-url" | "x-original-uri" => {
            "it rewrites the path the upstream executes"
        }
        "host" | "forwarded" | "x-forwarded-host" | "x-forwarded-for" | "x-forwarded-proto"
        | "x-forwarded-prefix" | "x-real-ip" => "the gateway sets where a call comes from itself",
        "accept-encoding" | "te" | "range" | "if-range" => {
            "the gateway asks the upstream for the whole answer, unencoded, so it can mask it"
        }
        "content-type" | "content-encoding" => {
            "the gateway sets the body's type itself, from the call it read and checked"
        }
        "content-length" | "transfer-encoding" | "connection" | "keep-alive" | "upgrade"
        | "proxy-connection" | "trailer" => "it describes one connection, not the request",
        name if is_credential_header(name) => "it carries a credential",
        _ => return None,
    };
    Some(reason)
}
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    pub https: bool,
    /// `host[:port]`.
    pub authority: String,
    /// Prefix for every forwarded path, without a trailing slash ("" or "/api").
    pub path: String,
}

impl std::fmt::Display for BaseUrl {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            formatter,
            "{}://{}{}",
            if self.https { "https" } else { "http" },
            self.authority,
            self.path
        )
    }
}

/// How the root credential reaches the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Injection {
    /// A header whose value is the template with `{secret}` replaced.
    Header { name: String, template: String },
    /// A query parameter whose value is the template with `{secret}` replaced.
    Query { name: String, template: String },
}

impl Injection {
    /// The header or parameter name (never the value).
    pub fn name(&self) -> &str {
        match self {
            Injection::Header { name, .. } | Injection::Query { name, .. } => name,
        }
    }
}

/// The longest credential an upstream may carry: the gateway masks it in answers, and its
/// longest encoding (each byte escaped, up to nine bytes a byte) must fit the masking window.
pub const MAX_MASKED_CREDENTIAL_BYTES: usize = 512;

pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
const METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

pub(super) fn build_upstreams(
    raw_upstreams: Vec<RawUpstream>,
    credentials: &BTreeMap<String, Credential>,
    defined_credentials: &str,
    resolve: &dyn Fn(String) -> PathBuf,
    problems: &mut Problems,
) -> BTreeMap<String, Upstream> {
    let mut upstreams = BTreeMap::new();
    for (index, mut raw) in raw_upstreams.into_iter().enumerate() {
        let at = format!("upstream[{index}]");
        let name = problems.name(raw.name.take(), &format!("{at}.name"));
        let kind = super::mcp::upstream_kind(&mut raw, &at, problems);
        let stdio = raw.command.is_some();
        let process = if stdio {
            super::mcp::build_stdio_server(&mut raw, &at, resolve, problems).map(Target::Process)
        } else {
            None
        };
        let base_url = if stdio {
            None
        } else {
            problems.required(raw.base_url.take(), &format!("{at}.base_url"))
        };
        let base_url = base_url.and_then(|text| {
            let parsed = parse_base_url(&text);
            if parsed.is_none() {
                problems.push(
                    format!("{at}.base_url"),
                    invalid(
                        &text,
                        "base URL",
                        "http:// or https:// with a host, an optional port and path, and no query",
                    ),
                );
            }
            parsed
        });
        let credential = problems.required(raw.credential.take(), &format!("{at}.credential"));
        if let Some(credential) = credential
            .as_ref()
            .and_then(|name| credentials.get(name))
            .filter(|credential| credential.aws.is_some())
        {
            problems.push(
                format!("{at}.credential"),
                invalid(
                    &credential.name,
                    "credential for an upstream",
                    "a credential of kind \"secret\"; an AWS key is only ever used to mint STS credentials",
                ),
            );
        }
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
        let inject = if stdio {
            None
        } else {
            problems.required(raw.inject.take(), &format!("{at}.inject"))
        };
        let inject = inject.and_then(|inject| {
            let entries: Vec<(bool, String, String)> = inject
                .header
                .unwrap_or_default()
                .into_iter()
                .map(|(name, template)| (true, name, template))
                .chain(inject.query.unwrap_or_default().into_iter().map(|(name, template)| (false, name, template)))
                .collect();
            let [(is_header, name, template)] = <[_; 1]>::try_from(entries).ok().or_else(|| {
                problems.push(
                    format!("{at}.inject"),
                    invalid("…", "injection", "exactly one entry: header = { NAME = \"… {secret} …\" } or query = { NAME = \"{secret}\" }"),
                );
                None
            })?;
            if !template.contains("{secret}") {
                problems.push(format!("{at}.inject"), invalid(&template, "template", "text containing {secret}"));
                return None;
            }
            if is_header && !is_header_name(&name) {
                problems.push(format!("{at}.inject.header"), invalid(&name, "header name", "letters, digits and '-'"));
                return None;
            }
            Some(if is_header { Injection::Header { name, template } } else { Injection::Query { name, template } })
        });
        let mut headers = Vec::new();
        for (header, value) in std::mem::take(&mut raw.headers) {
            if !is_header_name(&header) || value.chars().any(char::is_control) {
                problems.push(format!("{at}.headers.{header}"), invalid(&header, "header", "a header name of letters, digits and '-' with a value without control characters"));
            } else if is_credential_header(&header) {
                problems.push(
                    format!("{at}.headers.{header}"),
                    invalid(
                        &header,
                        "extra header",
                        "not a credential header; the root credential goes in inject",
                    ),
                );
            } else {
                headers.push((header, value));
            }
        }
        let mut forward_headers = BTreeSet::new();
        for (position, header) in std::mem::take(&mut raw.forward_headers)
            .into_iter()
            .enumerate()
        {
            let key = format!("{at}.forward_headers[{position}]");
            if !is_header_name(&header) {
                problems.push(
                    key,
                    invalid(&header, "header name", "letters, digits and '-'"),
                );
            } else if let Some(reason) = never_forwarded(&header) {
                problems.push(
                    key,
                    invalid(
                        &header,
                        "forwarded header",
                        &format!("any header but this one: {reason}"),
                    ),
                );
            } else {
                forward_headers.insert(header.to_ascii_lowercase());
            }
        }
        let connect_timeout = match raw.connect_timeout {
            Some(text) => problems.duration(Some(text), &format!("{at}.connect_timeout")),
            None => Some(DEFAULT_CONNECT_TIMEOUT),
        };
        let timeout = match raw.timeout {
            Some(text) => problems.duration(Some(text), &format!("{at}.timeout")),
            None => Some(DEFAULT_UPSTREAM_TIMEOUT),
        };
        let target = match (process, base_url, inject) {
            (Some(process), _, _) => Some(process),
            (None, Some(base_url), Some(inject)) => Some(Target::Url { base_url, inject }),
            _ => None,
        };
        let (
            Some(name),
            Some(kind),
            Some(target),
            Some(credential),
            Some(connect_timeout),
            Some(timeout),
        ) = (name, kind, target, credential, connect_timeout, timeout)
        else {
            continue;
        };
        let upstream = Upstream {
            name: name.clone(),
            kind,
            target,
            credential,
            headers,
            ca_file: raw.ca_file.map(resolve),
            connect_timeout,
            timeout,
            forward_headers,
        };
        if upstreams.insert(name.clone(), upstream).is_some() {
            problems.push(format!("{at}.name"), ProblemKind::Duplicate { name });
        }
    }
    upstreams
}

pub(super) fn build_allow_rules(
    raw_rules: Vec<RawAllow>,
    at: &str,
    params: &BTreeMap<String, ParamRule>,
    problems: &mut Problems,
) -> Vec<AllowRule> {
    let mut rules = Vec::new();
    for (index, raw) in raw_rules.into_iter().enumerate() {
        let rule_at = format!("{at}.allow[{index}]");
        let graphql = raw.graphql.map(|graphql| {
            let mut fields = |list: Vec<String>, kind: &str| -> BTreeSet<String> {
                let mut set = BTreeSet::new();
                for field in list {
                    if is_graphql_name(&field) {
                        set.insert(field);
                    } else {
                        problems.push(
                            format!("{rule_at}.graphql.{kind}"),
                            invalid(
                                &field,
                                "GraphQL field name",
                                "a name such as customDomainCreate",
                            ),
                        );
                    }
                }
                set
            };
            let query = fields(graphql.query, "query");
            let mutation = fields(graphql.mutation, "mutation");
            let mut arguments = BTreeMap::new();
            for (text, raw) in graphql.arguments {
                let key = format!("{rule_at}.graphql.arguments.{text}");
                let Some(path) = ArgumentPath::parse(&text) else {
                    problems.push(
                        key,
                        invalid(&text, "argument path", "FIELD.ARGUMENT or FIELD.ARGUMENT.KEY…, such as customDomainCreate.input.environmentId"),
                    );
                    continue;
                };
                if !query.contains(&path.field) && !mutation.contains(&path.field) {
                    problems.push(
                        key.clone(),
                        invalid(&text, "argument path", "a path starting with a field this rule allows"),
                    );
                }
                if let Some(rule) = build_value_rule(raw, &key, params, problems) {
                    arguments.insert(path, rule);
                }
            }
            GraphqlAllow {
                query,
                mutation,
                arguments,
            }
        });
        let mut query = BTreeMap::new();
        for (name, raw) in raw.query {
            let key = format!("{rule_at}.query.{name}");
            if name.is_empty() || name.chars().any(|character| character.is_control()) {
                problems.push(
                    key,
                    invalid(
                        &name,
                        "query parameter name",
                        "a name without control characters",
                    ),
                );
                continue;
            }
            if let Some(rule) = build_value_rule(raw, &key, params, problems) {
                query.insert(name, rule);
            }
        }
        if graphql.is_some() && !query.is_empty() {
            problems.push(
                format!("{rule_at}.query"),
                invalid("…", "query parameters on a GraphQL rule", "none: GraphQL requests travel in the body, and the gateway forwards them with no query string"),
            );
        }
        let listed: Vec<String> = match (raw.method, raw.methods) {
            (Some(_), Some(_)) => {
                problems.push(
                    rule_at.clone(),
                    ProblemKind::BothSet {
                        first: "method",
                        second: "methods",
                    },
                );
                Vec::new()
            }
            (Some(method), None) => vec![method],
            (None, Some(methods)) => methods,
            (None, None) if graphql.is_some() => vec!["POST".to_string()],
            (None, None) => {
                problems.push(
                    rule_at.clone(),
                    ProblemKind::NeitherSet {
                        first: "method",
                        second: "methods",
                    },
                );
                Vec::new()
            }
        };
        let mut methods = BTreeSet::new();
        for method in listed {
            let upper = method.to_ascii_uppercase();
            if METHODS.contains(&upper.as_str()) {
                methods.insert(upper);
            } else {
                problems.push(
                    format!("{rule_at}.method"),
                    invalid(&method, "method", &METHODS.join(", ")),
                );
            }
        }
        let path = problems.required(raw.path, &format!("{rule_at}.path")).and_then(|text| match PathPattern::parse(&text) {
            Ok(pattern) => {
                for param in pattern.params() {
                    if !params.contains_key(param) {
                        let declared = params.keys().cloned().collect::<Vec<_>>().join(", ");
                        problems.push(
                            format!("{rule_at}.path"),
                            invalid(&text, "path pattern", &format!("placeholders naming this scope's params [{declared}]; {{{param}}} is not one")),
                        );
                    }
                }
                Some(pattern)
            }
            Err(error) => {
                problems.push(format!("{rule_at}.path"), invalid(&text, "path pattern", &error.to_string()));
                None
            }
        });
        let positive =
            |value: Option<i64>, key: &str, problems: &mut Problems| -> Option<Option<u64>> {
                match value {
                    None => Some(None),
                    Some(number) if number >= 1 => Some(u64::try_from(number).ok()),
                    Some(number) => {
                        problems.push(
                            format!("{rule_at}.{key}"),
                            invalid(
                                &number.to_string(),
                                key_what(key),
                                "a whole number of at least 1",
                            ),
                        );
                        None
                    }
                }
            };
        let approval = raw.approval.and_then(|raw| {
            super::approval::build_rule_policy(
                raw,
                &format!("{rule_at}.approval"),
                params,
                problems,
            )
        });
        let max_body = positive(raw.max_body, "max_body", problems);
        let max_calls = positive(raw.max_calls, "max_calls", problems);
        if let (Some(path), Some(max_body), Some(max_calls), false) =
            (path, max_body, max_calls, methods.is_empty())
        {
            rules.push(AllowRule {
                index,
                methods,
                path,
                graphql,
                max_body: max_body.unwrap_or(DEFAULT_MAX_BODY),
                max_calls,
                approval,
                query,
            });
        }
    }
    rules
}

/// A value rule from config: `"exact"`, `"{param}"` (a param of the scope), `{ one_of = [...] }` or
/// `{ pattern = "..." }` (matching the whole value).
pub(super) fn build_value_rule(
    raw: RawValueRule,
    key: &str,
    params: &BTreeMap<String, ParamRule>,
    problems: &mut Problems,
) -> Option<ValueRule> {
    match raw {
        RawValueRule::Text(text) => {
            if let Some(name) = text
                .strip_prefix('{')
                .and_then(|rest| rest.strip_suffix('}'))
            {
                if params.contains_key(name) {
                    return Some(ValueRule::Param(name.to_string()));
                }
                let declared = params.keys().cloned().collect::<Vec<_>>().join(", ");
                problems.push(
                    key.to_string(),
                    invalid(
                        &text,
                        "binding",
                        &format!("{{param}} naming one of this scope's params [{declared}]"),
                    ),
                );
                return None;
            }
            Some(ValueRule::Exact(text))
        }
        RawValueRule::Table(RawValueTable {
            one_of: Some(values),
            pattern: None,
        }) if !values.is_empty() => Some(ValueRule::OneOf(values.into_iter().collect())),
        RawValueRule::Table(RawValueTable {
            one_of: None,
            pattern: Some(pattern),
        }) => match regex::Regex::new(&format!("^(?:{pattern})$")) {
            Ok(regex) => Some(ValueRule::Pattern(regex)),
            Err(error) => {
                problems.push(
                    key.to_string(),
                    invalid(&pattern, "pattern", &error.to_string()),
                );
                None
            }
        },
        RawValueRule::Table(_) => {
            problems.push(
                key.to_string(),
                invalid("…", "value rule", "\"exact value\", \"{param}\", { one_of = [\"a\", \"b\"] } or { pattern = \"[0-9]+\" }"),
            );
            None
        }
    }
}

fn key_what(key: &str) -> &'static str {
    if key == "max_body" {
        "byte count"
    } else {
        "call count"
    }
}

fn parse_base_url(text: &str) -> Option<BaseUrl> {
    let (https, rest) = if let Some(rest) = text.strip_prefix("https://") {
        (true, rest)
    } else {
        (false, text.strip_prefix("http://")?)
    };
    if rest.contains(['?', '#', '@', ' ']) {
        return None;
    }
    let (authority, path) = match rest.find('/') {
        Some(position) => (&rest[..position], rest[position..].trim_end_matches('/')),
        None => (rest, ""),
    };
    if authority.is_empty()
        || path.contains("//")
        || path
            .split('/')
            .any(|segment| segment == "." || segment == "..")
    {
        return None;
    }
    Some(BaseUrl {
        https,
        authority: authority.to_string(),
        path: path.to_string(),
    })
}

fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-')
}

/// Headers that carry credentials: stripped from the agent's request, never set as extras.
pub fn is_credential_header(name: &str) -> bool {
    matches!(
        name.to_ascii_lowercase().as_str(),
        "authorization" | "proxy-authorization" | "cookie" | "x-api-key" | "valet-approval"
    )
}

fn is_graphql_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(first) if first.is_ascii_alphabetic() || first == b'_')
        && bytes.all(|byte| byte.is_ascii_alphanumeric() || byte == b'_')
}
