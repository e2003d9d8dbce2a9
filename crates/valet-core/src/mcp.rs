//! MCP rules on MCP objects, not bytes: which tools, resources and prompts a grant may use, with
//! per-tool argument constraints; the check of every JSON-RPC message an agent POSTs (a batch is
//! checked message by message, and refused whole if one is refused); the filtering of the
//! server's `*/list` replies (a JSON body or an SSE stream, chunk by chunk) so a forbidden tool is
//! never offered, with the server's requests to act (sampling, elicitation, roots) dropped; and
//! the canonical text the gateway forwards, built from what it parsed. No I/O: the gateway wires
//! this to HTTP.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde_json::{Map, Value};

use crate::config::Glob;
use crate::rules::ValueRule;

/// What a grant of an MCP scope may use.
#[derive(Debug, Clone)]
pub struct McpAllow {
    pub tools: Vec<ToolRule>,
    /// Resource URI patterns: `*` any run of characters, `{param}` the grant's parameter.
    pub resources: Vec<String>,
    /// Prompt rules: a name (or glob) and, like a tool's, rules for its arguments.
    pub prompts: Vec<ToolRule>,
    /// Requests the server may send the agent's client (and the answers the client may send).
    pub client_requests: BTreeSet<ClientRequest>,
    /// Most messages one POST may batch.
    pub max_batch: usize,
}

impl Default for McpAllow {
    fn default() -> McpAllow {
        McpAllow {
            tools: Vec::new(),
            resources: Vec::new(),
            prompts: Vec::new(),
            client_requests: BTreeSet::new(),
            max_batch: DEFAULT_MAX_BATCH,
        }
    }
}

impl McpAllow {
    /// Every rule, for refusals: `tools [list_*, create_custom_domain]; resources […]; prompts […]`.
    pub fn summary(&self) -> String {
        let tools: Vec<String> = self
            .tools
            .iter()
            .map(|rule| rule.name.as_str().to_string())
            .collect();
        let prompts: Vec<&str> = self.prompts.iter().map(|rule| rule.name.as_str()).collect();
        format!(
            "tools [{}]; resources [{}]; prompts [{}]",
            tools.join(", "),
            self.resources.join(", "),
            prompts.join(", ")
        )
    }
}

/// One allowed tool or prompt (or glob of them) and what its arguments may be.
#[derive(Debug, Clone)]
pub struct ToolRule {
    /// `"tool"` (`[[scope.mcp.tool]]`) or `"prompt"` (`prompts`, `[[scope.mcp.prompt]]`).
    pub kind: &'static str,
    /// Position in its list, for refusals and records (`tool[1]`, `prompt[0]`).
    pub index: usize,
    pub name: Glob,
    /// Constraints on arguments, by name; an argument not listed is allowed unless forbidden.
    pub arguments: BTreeMap<String, ArgumentRule>,
    pub required: BTreeSet<String>,
    pub forbidden: BTreeSet<String>,
    /// When set, each call needs a person's approval of that exact call.
    pub approval: Option<crate::approval::ApprovalPolicy>,
    /// Calls one grant may make through this rule.
    pub max_calls: Option<u64>,
    /// A stated reason this rule's breadth is acceptable (silences its lint).
    pub allow_broad: Option<String>,
}

impl fmt::Display for ToolRule {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "{}[{}] {}",
            self.kind,
            self.index,
            self.name.as_str()
        )
    }
}

impl ToolRule {
    /// The grant's counter for this rule (`rule_calls` key) and its limit.
    pub fn counter(&self) -> crate::grant::RuleCounter {
        crate::grant::RuleCounter {
            key: format!("tool[{}]", self.index),
            label: self.to_string(),
            max_calls: self.max_calls,
        }
    }
}

/// A request an MCP server may send its client, asking it to act.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ClientRequest {
    /// `sampling/createMessage`: run the client's model.
    Sampling,
    /// `elicitation/create`: ask the user.
    Elicitation,
    /// `roots/list`: list the client's roots.
    Roots,
}

impl ClientRequest {
    pub fn parse(name: &str) -> Option<ClientRequest> {
        match name {
            "sampling" => Some(ClientRequest::Sampling),
            "elicitation" => Some(ClientRequest::Elicitation),
            "roots" => Some(ClientRequest::Roots),
            _ => None,
        }
    }

    /// The capability a client declares for it.
    pub fn capability(self) -> &'static str {
        match self {
            ClientRequest::Sampling => "sampling",
            ClientRequest::Elicitation => "elicitation",
            ClientRequest::Roots => "roots",
        }
    }

    fn of_method(method: &str) -> Option<ClientRequest> {
        match method {
            "sampling/createMessage" => Some(ClientRequest::Sampling),
            "elicitation/create" => Some(ClientRequest::Elicitation),
            "roots/list" => Some(ClientRequest::Roots),
            _ => None,
        }
    }
}

const ALL_CLIENT_REQUESTS: [ClientRequest; 3] = [
    ClientRequest::Sampling,
    ClientRequest::Elicitation,
    ClientRequest::Roots,
];

/// Whether a resource pattern is well formed: every `{param}` names a scope parameter.
pub fn check_resource_pattern<T>(
    pattern: &str,
    params: &BTreeMap<String, T>,
) -> Result<(), String> {
    if pattern.is_empty() || pattern.chars().any(char::is_control) {
        return Err(
            "a URI pattern without control characters, such as deploy://projects/{project}/*"
                .into(),
        );
    }
    let mut rest = pattern;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            return Err("every { closed by }".into());
        };
        let name = &rest[open + 1..open + close];
        if !params.contains_key(name) {
            let declared: Vec<&String> = params.keys().collect();
            return Err(format!(
                "placeholders naming this scope's params {declared:?}; {{{name}}} is not one"
            ));
        }
        rest = &rest[open + close + 1..];
    }
    Ok(())
}

/// What one argument may be.
#[derive(Debug, Clone)]
pub enum ArgumentRule {
    /// A string (or a number or boolean written out) the value rule permits.
    Value(ValueRule),
    /// A number within bounds (inclusive).
    Number { min: Option<f64>, max: Option<f64> },
}

impl fmt::Display for ArgumentRule {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgumentRule::Value(rule) => write!(formatter, "{rule}"),
            ArgumentRule::Number { min, max } => match (min, max) {
                (Some(min), Some(max)) => write!(formatter, "a number from {min} to {max}"),
                (Some(min), None) => write!(formatter, "a number of at least {min}"),
                (None, Some(max)) => write!(formatter, "a number of at most {max}"),
                (None, None) => write!(formatter, "a number"),
            },
        }
    }
}

/// Methods a client may send that make the server do nothing on the agent's behalf.
pub const HARMLESS_METHODS: [&str; 13] = [
    "initialize",
    "server/discover",
    "ping",
    "tools/list",
    "resources/list",
    "resources/templates/list",
    "prompts/list",
    "completion/complete",
    "logging/setLevel",
    "notifications/initialized",
    "notifications/cancelled",
    "notifications/progress",
    "notifications/roots/list_changed",
];

/// The `_meta` members forwarded with a request: progress, and the 2026-07-28 envelope.
const FORWARDED_META: [&str; 5] = [
    "progressToken",
    "io.modelcontextprotocol/protocolVersion",
    "io.modelcontextprotocol/clientInfo",
    "io.modelcontextprotocol/clientCapabilities",
    "io.modelcontextprotocol/logLevel",
];

/// Why a message is refused; names the message and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum McpDenial {
    #[error("the body is not one JSON-RPC message or a batch of them: {0}")]
    NotJsonRpc(String),
    #[error("method {method:?} is not allowed through the gateway; allowed: tools/call, resources/read and prompts/get as the scope says, and {}", HARMLESS_METHODS.join(", "))]
    Method { method: String },
    #[error("tool {tool:?} is not allowed; allowed tools: [{allowed}]")]
    Tool { tool: String, allowed: String },
    #[error("tool {tool:?}: {reason}")]
    Argument { tool: String, reason: String },
    #[error("resource {uri:?} is not allowed; allowed: [{allowed}]")]
    Resource { uri: String, allowed: String },
    #[error("prompt {prompt:?} is not allowed; allowed: [{allowed}]")]
    Prompt { prompt: String, allowed: String },
    #[error("prompt {prompt:?}: {reason}")]
    PromptArgument { prompt: String, reason: String },
    #[error(
        "a batch of {messages} messages is above the scope's limit of {max} ([scope.mcp] max_batch); send fewer at a time"
    )]
    BatchTooLarge { messages: usize, max: usize },
    #[error(
        "the id {0:?} is used by more than one message of the batch; replies are matched to requests by id, so each needs its own"
    )]
    RepeatedId(String),
    #[error("message {index} of the batch: {denial}")]
    InBatch {
        index: usize,
        denial: Box<McpDenial>,
    },
}

impl McpDenial {
    /// What was asked, for refusals and records (`tools/call delete_volume`).
    pub fn asked(&self) -> String {
        match self {
            McpDenial::NotJsonRpc(_) => "a body that is not JSON-RPC".into(),
            McpDenial::BatchTooLarge { messages, .. } => format!("a batch of {messages} messages"),
            McpDenial::RepeatedId(id) => format!("a batch with id {id:?} twice"),
            McpDenial::Method { method } => method.clone(),
            McpDenial::Tool { tool, .. } | McpDenial::Argument { tool, .. } => {
                format!("tools/call {tool}")
            }
            McpDenial::Resource { uri, .. } => format!("resources/read {uri}"),
            McpDenial::Prompt { prompt, .. } | McpDenial::PromptArgument { prompt, .. } => {
                format!("prompts/get {prompt}")
            }
            McpDenial::InBatch { index, denial } => {
                format!("{} (batch message {index})", denial.asked())
            }
        }
    }
}

/// What a person approves for one tool call: the tool and its arguments exactly as they will
/// execute, shown whole. Its digest covers the canonical `{"arguments": …, "name": …}`, so a
/// retry of the same call (with another JSON-RPC id) is the same call, and any other argument is
/// not.
pub fn call_fingerprint(
    upstream: &str,
    rule: &ToolRule,
    message: &CheckedMessage,
) -> crate::approval::CallFingerprint {
    let params = message.message.get("params");
    let name = params
        .and_then(|params| params.get("name"))
        .cloned()
        .unwrap_or(Value::Null);
    let arguments = params
        .and_then(|params| params.get("arguments"))
        .cloned()
        .unwrap_or_else(|| Value::Object(Map::new()));
    let canonical = crate::json::canonical(&serde_json::json!({
        "name": name,
        "arguments": arguments,
    }));
    let digest = ring::digest::digest(&ring::digest::SHA256, &canonical);
    let mut rendering = format!(
        "{} {}\narguments:",
        message.method,
        crate::json::render(&name)
    );
    for line in crate::json::render(&arguments).lines() {
        rendering.push_str("\n  ");
        rendering.push_str(line);
    }
    crate::approval::CallFingerprint {
        method: message.method.clone(),
        target: message.target.clone().unwrap_or_default(),
        content_type: "application/json".into(),
        body_sha256: hex::encode(digest.as_ref()),
        graphql: Vec::new(),
        upstream: upstream.to_string(),
        calls: Vec::new(),
        body_bytes: canonical.len() as u64,
        rendering,
        headers: Vec::new(),
        rule: rule.to_string(),
    }
}

/// The audit entry of one forwarded message: method, target, the rule that allowed it, and for
/// a tool call the digest of its arguments and, in clear, the arguments its rule binds.
pub fn audit_entry(message: &CheckedMessage, allow: &McpAllow) -> Value {
    let mut entry = Map::new();
    entry.insert("method".into(), Value::from(message.method.clone()));
    if let Some(id) = message.message.get("id") {
        entry.insert("id".into(), id.clone());
    }
    if let Some(target) = &message.target {
        entry.insert("target".into(), Value::from(target.clone()));
    }
    if let Some(rule) = message.tool_rule.and_then(|index| allow.tools.get(index)) {
        entry.insert("rule".into(), Value::from(rule.to_string()));
        let arguments = message
            .message
            .get("params")
            .and_then(|params| params.get("arguments"))
            .cloned()
            .unwrap_or_else(|| Value::Object(Map::new()));
        let digest = ring::digest::digest(&ring::digest::SHA256, arguments.to_string().as_bytes());
        entry.insert(
            "arguments_sha256".into(),
            Value::from(hex::encode(digest.as_ref())),
        );
        let bound: Map<String, Value> = arguments
            .as_object()
            .map(|arguments| {
                arguments
                    .iter()
                    .filter(|(name, _)| rule.arguments.contains_key(*name))
                    .map(|(name, value)| (name.clone(), value.clone()))
                    .collect()
            })
            .unwrap_or_default();
        entry.insert("bound_arguments".into(), Value::Object(bound));
    }
    Value::Object(entry)
}

/// Binds an MCP session to the grant that opened it: the agent gets the server's session id with
/// a MAC over the grant and that id (under a key derived from the key-encryption key, so every
/// replica computes the same), and a session id presented with another grant's token is refused
/// instead of reaching the server's session state.
pub struct SessionKey(ring::hmac::Key);

impl SessionKey {
    pub fn from_seal_key(seal_key: &crate::keyring::SealKey) -> SessionKey {
        SessionKey(seal_key.derive_mac_key("valet mcp sessions"))
    }

    fn message(grant_id: &str, server_session: &str) -> Vec<u8> {
        let mut message = Vec::with_capacity(grant_id.len() + server_session.len() + 1);
        message.extend_from_slice(grant_id.as_bytes());
        message.push(0);
        message.extend_from_slice(server_session.as_bytes());
        message
    }

    /// The session id the agent sees for the server's `server_session`.
    pub fn bind(&self, grant_id: &str, server_session: &str) -> String {
        let tag = ring::hmac::sign(&self.0, &Self::message(grant_id, server_session));
        format!("{server_session}.{}", hex::encode(tag.as_ref()))
    }

    /// The server's session id behind `presented`, when this grant opened it.
    pub fn unbind(&self, grant_id: &str, presented: &str) -> Option<String> {
        let (server_session, tag) = presented.rsplit_once('.')?;
        let tag = hex::decode(tag).ok()?;
        ring::hmac::verify(&self.0, &Self::message(grant_id, server_session), &tag)
            .ok()
            .map(|()| server_session.to_string())
    }
}

/// One checked message, for the audit log and the approval: what will execute.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedMessage {
    pub method: String,
    /// The tool, resource URI or prompt it acts on, when it acts on one.
    pub target: Option<String>,
    /// The index of the tool rule that allowed a `tools/call`.
    pub tool_rule: Option<usize>,
    /// The message as it will be forwarded (re-serialised from what was parsed).
    pub message: Value,
}

/// Most messages one POST may batch unless the upstream's config says otherwise.
pub const DEFAULT_MAX_BATCH: usize = 16;

/// Checks a POSTed body (the JSON the canonical call read): one JSON-RPC message, or a batch of at
/// most the scope's `max_batch` with no id twice. Returns each message as it will be forwarded, and the
/// canonical body built from them.
pub fn check_post(
    value: &Value,
    allow: &McpAllow,
    params: &BTreeMap<String, String>,
) -> Result<(Vec<CheckedMessage>, Vec<u8>), McpDenial> {
    let max_batch = allow.max_batch;
    let (messages, batch) = match value {
        Value::Array(items) if items.is_empty() => {
            return Err(McpDenial::NotJsonRpc("an empty batch".into()));
        }
        Value::Array(items) if items.len() > max_batch => {
            return Err(McpDenial::BatchTooLarge {
                messages: items.len(),
                max: max_batch,
            });
        }
        Value::Array(items) => (items.iter().collect::<Vec<_>>(), true),
        object @ Value::Object(_) => (vec![object], false),
        _ => {
            return Err(McpDenial::NotJsonRpc(
                "neither an object nor an array".into(),
            ));
        }
    };
    let mut checked = Vec::new();
    // Ids are compared as text: a server may read "1" and 1 as one id, and replies are matched
    // to requests by id (a repeated id would let one reply pass as another's).
    let mut ids = std::collections::HashSet::new();
    for (index, message) in messages.into_iter().enumerate() {
        let result =
            check_message(message.clone(), allow, params).and_then(|message| {
                match message.message.get("id").map(id_text) {
                    Some(id) if !ids.insert(id.clone()) => Err(McpDenial::RepeatedId(id)),
                    _ => Ok(message),
                }
            });
        match result {
            Ok(message) => checked.push(message),
            Err(denial) if batch => {
                return Err(McpDenial::InBatch {
                    index,
                    denial: Box::new(denial),
                });
            }
            Err(denial) => return Err(denial),
        }
    }
    let forwarded = if batch {
        Value::Array(
            checked
                .iter()
                .map(|message| message.message.clone())
                .collect(),
        )
    } else {
        checked[0].message.clone()
    };
    Ok((checked, crate::json::canonical(&forwarded)))
}

/// An id as text, quotes off: `"1"` and `1` are one id.
fn id_text(id: &Value) -> String {
    match id {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

fn check_message(
    message: Value,
    allow: &McpAllow,
    params: &BTreeMap<String, String>,
) -> Result<CheckedMessage, McpDenial> {
    let Value::Object(object) = message else {
        return Err(McpDenial::NotJsonRpc(
            "a batch item is not an object".into(),
        ));
    };
    if object.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(McpDenial::NotJsonRpc("\"jsonrpc\" is not \"2.0\"".into()));
    }
    // Only the members JSON-RPC defines are forwarded: nothing the check did not read.
    let mut forwarded = Map::new();
    forwarded.insert("jsonrpc".into(), Value::from("2.0"));
    if let Some(id) = object.get("id") {
        if !(id.is_string() || id.is_i64() || id.is_u64()) {
            return Err(McpDenial::NotJsonRpc(
                "an id must be a string or an integer".into(),
            ));
        }
        forwarded.insert("id".into(), id.clone());
    }
    let Some(method) = object.get("method").and_then(Value::as_str) else {
        // A response to a request the server made (sampling, elicitation, roots): relayed only
        // when the scope lets the server ask the client anything.
        if allow.client_requests.is_empty() || !object.contains_key("id") {
            return Err(McpDenial::Method {
                method: "(a response to a request of the server; the scope allows the server no requests to the client: [scope.mcp] client_requests)".into(),
            });
        }
        match (object.get("result"), object.get("error")) {
            (Some(result), None) => forwarded.insert("result".into(), result.clone()),
            (None, Some(error)) => forwarded.insert("error".into(), error.clone()),
            _ => {
                return Err(McpDenial::NotJsonRpc(
                    "a response has exactly one of result and error".into(),
                ));
            }
        };
        return Ok(CheckedMessage {
            method: "(response)".into(),
            target: None,
            tool_rule: None,
            message: Value::Object(forwarded),
        });
    };
    forwarded.insert("method".into(), Value::from(method));
    let params_value = object.get("params").cloned().unwrap_or(Value::Null);
    if !params_value.is_null() && !params_value.is_object() {
        return Err(McpDenial::NotJsonRpc("params must be an object".into()));
    }
    // Forwarded params: for a method that acts, only the members the check read; for the
    // others, what was sent less the `_meta` members and client capabilities not allowed.
    let acting: &[&str] = match method {
        "tools/call" | "prompts/get" => &["name", "arguments"],
        "resources/read" => &["uri"],
        _ => &[],
    };
    if let Value::Object(sent) = &params_value {
        let mut kept = Map::new();
        for (key, value) in sent {
            if key == "_meta" {
                if let Some(meta) = forwarded_meta(value, allow) {
                    kept.insert(key.clone(), meta);
                }
            } else if key == "capabilities" && method == "initialize" {
                kept.insert(key.clone(), filtered_capabilities(value, allow));
            } else if acting.is_empty() || acting.contains(&key.as_str()) {
                kept.insert(key.clone(), value.clone());
            }
        }
        forwarded.insert("params".into(), Value::Object(kept));
    }
    let (target, tool_rule) = match method {
        "tools/call" => {
            let (name, rule) = check_named_call("tool", &params_value, &allow.tools, params)?;
            (Some(name), Some(rule))
        }
        "resources/read" => {
            let uri = params_value
                .get("uri")
                .and_then(Value::as_str)
                .ok_or_else(|| McpDenial::NotJsonRpc("resources/read needs params.uri".into()))?;
            if !allow
                .resources
                .iter()
                .any(|pattern| uri_matches(pattern, uri, params))
            {
                return Err(McpDenial::Resource {
                    uri: uri.to_string(),
                    allowed: allow.resources.join(", "),
                });
            }
            (Some(uri.to_string()), None)
        }
        "prompts/get" => {
            let (name, _) = check_named_call("prompt", &params_value, &allow.prompts, params)?;
            (Some(name), None)
        }
        harmless if HARMLESS_METHODS.contains(&harmless) => (None, None),
        other => {
            return Err(McpDenial::Method {
                method: other.to_string(),
            });
        }
    };
    Ok(CheckedMessage {
        method: method.to_string(),
        target,
        tool_rule,
        message: Value::Object(forwarded),
    })
}

/// The `_meta` members forwarded: progress and the protocol envelope, with the client's
/// capabilities narrowed to what the scope allows.
fn forwarded_meta(meta: &Value, allow: &McpAllow) -> Option<Value> {
    let Value::Object(meta) = meta else {
        return None;
    };
    let kept: Map<String, Value> = meta
        .iter()
        .filter(|(key, _)| FORWARDED_META.contains(&key.as_str()))
        .map(|(key, value)| {
            if key == "io.modelcontextprotocol/clientCapabilities" {
                (key.clone(), filtered_capabilities(value, allow))
            } else {
                (key.clone(), value.clone())
            }
        })
        .collect();
    (!kept.is_empty()).then_some(Value::Object(kept))
}

/// A client's capabilities without the ones that invite requests the scope does not allow.
fn filtered_capabilities(capabilities: &Value, allow: &McpAllow) -> Value {
    let mut capabilities = capabilities.clone();
    if let Value::Object(object) = &mut capabilities {
        for request in ALL_CLIENT_REQUESTS {
            if !allow.client_requests.contains(&request) {
                object.remove(request.capability());
            }
        }
    }
    capabilities
}

fn allowed_names(rules: &[ToolRule]) -> String {
    rules
        .iter()
        .map(|rule| rule.name.as_str().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A `tools/call` or `prompts/get`: its name must match one of `rules`, and its arguments that
/// rule's argument rules. Returns the name and the index of the rule that allowed it.
fn check_named_call(
    kind: &'static str,
    call: &Value,
    rules: &[ToolRule],
    params: &BTreeMap<String, String>,
) -> Result<(String, usize), McpDenial> {
    let method = if kind == "tool" {
        "tools/call"
    } else {
        "prompts/get"
    };
    let name = call
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| McpDenial::NotJsonRpc(format!("{method} needs params.name")))?;
    let refused = |reason: String| match kind {
        "tool" => McpDenial::Argument {
            tool: name.to_string(),
            reason,
        },
        _ => McpDenial::PromptArgument {
            prompt: name.to_string(),
            reason,
        },
    };
    let arguments = match call.get("arguments") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(arguments)) => arguments.clone(),
        Some(_) => return Err(refused("arguments must be an object".into())),
    };
    let mut first_refusal = None;
    for (index, rule) in rules.iter().enumerate() {
        if !rule.name.matches(name) {
            continue;
        }
        match check_arguments(rule, &arguments, params) {
            Ok(()) => return Ok((name.to_string(), index)),
            Err(reason) => {
                first_refusal.get_or_insert(format!("{rule}: {reason}"));
            }
        }
    }
    Err(match first_refusal {
        Some(reason) => refused(reason),
        None if kind == "tool" => McpDenial::Tool {
            tool: name.to_string(),
            allowed: allowed_names(rules),
        },
        None => McpDenial::Prompt {
            prompt: name.to_string(),
            allowed: allowed_names(rules),
        },
    })
}

fn check_arguments(
    rule: &ToolRule,
    arguments: &Map<String, Value>,
    params: &BTreeMap<String, String>,
) -> Result<(), String> {
    // A name a server could read as one the rule names is refused, not taken as another argument.
    crate::json::refuse_lookalike_names(
        arguments,
        rule.arguments
            .keys()
            .chain(&rule.required)
            .chain(&rule.forbidden)
            .map(String::as_str),
    )?;
    for required in &rule.required {
        if !arguments.contains_key(required) {
            return Err(format!("argument {required:?} is required"));
        }
    }
    for (name, value) in arguments {
        if rule.forbidden.contains(name) {
            return Err(format!("argument {name:?} may not be given"));
        }
        let Some(constraint) = rule.arguments.get(name) else {
            continue;
        };
        let permitted = match constraint {
            ArgumentRule::Value(value_rule) => {
                let text = match value {
                    Value::String(text) => Some(text.clone()),
                    Value::Number(number) => Some(number.to_string()),
                    Value::Bool(flag) => Some(flag.to_string()),
                    _ => None,
                };
                text.is_some_and(|text| value_rule.permits(&text, params))
            }
            ArgumentRule::Number { min, max } => value.as_f64().is_some_and(|number| {
                min.is_none_or(|min| number >= min) && max.is_none_or(|max| number <= max)
            }),
        };
        if !permitted {
            return Err(format!(
                "argument {name:?} must be {constraint}, and here it is {value}"
            ));
        }
    }
    // A constrained argument that is absent is not checked: list it in `required` to insist.
    Ok(())
}

/// Whether `uri` matches `pattern` (`*` any run, `{param}` the grant's value).
fn uri_matches(pattern: &str, uri: &str, params: &BTreeMap<String, String>) -> bool {
    let mut rendered = String::new();
    let mut rest = pattern;
    while let Some(open) = rest.find('{') {
        rendered.push_str(&rest[..open]);
        let Some(close) = rest[open..].find('}') else {
            return false;
        };
        let name = &rest[open + 1..open + close];
        match params.get(name) {
            // A bound value may not itself widen the pattern.
            Some(value) if !value.contains('*') => rendered.push_str(value),
            _ => return false,
        }
        rest = &rest[open + close + 1..];
    }
    rendered.push_str(rest);
    Glob::new(rendered).matches(uri)
}

/// Keeps in a `tools/list`, `resources/list` or `prompts/list` result only what the grant may
/// use, so a forbidden tool is never offered to the model.
pub fn filter_list(
    method: &str,
    result: &mut Value,
    allow: &McpAllow,
    params: &BTreeMap<String, String>,
) {
    let key = match method {
        "tools/list" => "tools",
        "resources/list" => "resources",
        "prompts/list" => "prompts",
        // Templates are patterns the gateway cannot compare to its own: none is offered.
        "resources/templates/list" => {
            if let Some(list) = result
                .get_mut("resourceTemplates")
                .and_then(Value::as_array_mut)
            {
                list.clear();
            }
            return;
        }
        _ => return,
    };
    if let Some(list) = result.get_mut(key).and_then(Value::as_array_mut) {
        list.retain(|item| offered(key, item, allow, params));
    }
}

/// Whether one listed tool, resource or prompt may be offered to a grant.
fn offered(kind: &str, item: &Value, allow: &McpAllow, params: &BTreeMap<String, String>) -> bool {
    let text = |field: &str| item.get(field).and_then(Value::as_str);
    match kind {
        "tools" => {
            text("name").is_some_and(|name| allow.tools.iter().any(|rule| rule.name.matches(name)))
        }
        "resources" => text("uri").is_some_and(|uri| {
            allow
                .resources
                .iter()
                .any(|pattern| uri_matches(pattern, uri, params))
        }),
        _ => text("name")
            .is_some_and(|name| allow.prompts.iter().any(|rule| rule.name.matches(name))),
    }
}

/// Filters what an MCP server sends back to one POST — a JSON body or an SSE stream, in chunks as
/// they arrive: list results narrowed to what the grant may use, server requests dropped.
pub struct ReplyFilter {
    /// The method of each request in the POST, by its id (as JSON text).
    methods: BTreeMap<String, String>,
    allow: McpAllow,
    params: BTreeMap<String, String>,
    /// An SSE event not yet complete, its line ends already made `\n`.
    pending: Vec<u8>,
    /// The last byte seen was a `\r`: a `\n` right after it ends the same line.
    after_cr: bool,
}

impl ReplyFilter {
    /// A filter for the replies to `checked`, owning what the grant may use.
    pub fn new(
        checked: &[CheckedMessage],
        allow: McpAllow,
        params: BTreeMap<String, String>,
    ) -> ReplyFilter {
        let methods = checked
            .iter()
            .filter_map(|message| {
                message
                    .message
                    .get("id")
                    .map(|id| (id.to_string(), message.method.clone()))
            })
            .collect();
        ReplyFilter {
            methods,
            allow,
            params,
            pending: Vec::new(),
            after_cr: false,
        }
    }

    /// One message from the server: `None` when it must not reach the client.
    fn message(&self, mut message: Value) -> Option<Value> {
        // A request of the server asking the client to act reaches it only if the scope allows.
        if let Some(method) = message.get("method").and_then(Value::as_str)
            && let Some(request) = ClientRequest::of_method(method)
            && !self.allow.client_requests.contains(&request)
        {
            return None;
        }
        let method = message
            .get("id")
            .and_then(|id| self.methods.get(&id.to_string()))
            .cloned();
        if let (Some(method), Some(result)) = (method, message.get_mut("result")) {
            filter_list(&method, result, &self.allow, &self.params);
        }
        Some(message)
    }

    /// A whole JSON reply (one message or a batch). What is not JSON passes unchanged: the
    /// client gets the server's own error.
    pub fn json_body(&self, body: &[u8]) -> Vec<u8> {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Array(messages)) => Value::Array(
                messages
                    .into_iter()
                    .filter_map(|message| self.message(message))
                    .collect(),
            )
            .to_string()
            .into_bytes(),
            Ok(message) => match self.message(message) {
                Some(message) => message.to_string().into_bytes(),
                None => Vec::new(),
            },
            Err(_) => body.to_vec(),
        }
    }

    /// The next chunk of an SSE reply; returns the complete events it finished, filtered. Line
    /// ends are read as the SSE standard (and so every client) reads them: `\r\n`, `\n` and a
    /// lone `\r` alike, even when a `\r\n` is split between chunks — a server cannot hide a
    /// message behind line ends the filter reads differently from the agent's client.
    pub fn sse_chunk(&mut self, chunk: &[u8]) -> Vec<u8> {
        for &byte in chunk {
            match byte {
                b'\n' if self.after_cr => self.after_cr = false,
                b'\r' => {
                    self.pending.push(b'\n');
                    self.after_cr = true;
                }
                byte => {
                    self.pending.push(byte);
                    self.after_cr = false;
                }
            }
        }
        let mut out = Vec::new();
        while let Some(end) = self
            .pending
            .windows(2)
            .position(|pair| pair == b"\n\n")
            .map(|at| at + 2)
        {
            let event: Vec<u8> = self.pending.drain(..end).collect();
            out.extend(self.sse_event(&event));
        }
        out
    }

    /// What is left when the stream ends (an event without its closing blank line).
    pub fn finish(&mut self) -> Vec<u8> {
        let event = std::mem::take(&mut self.pending);
        if event.iter().all(u8::is_ascii_whitespace) {
            return Vec::new();
        }
        self.sse_event(&event)
    }

    /// One event (line ends already `\n`): its `data` fields joined are one JSON-RPC message,
    /// filtered; other fields (`event`, `id`, `retry`, comments) are kept. Fields are split as
    /// the SSE standard splits them (a line without a colon is a field with an empty value), so
    /// the data read here is the data the client reads. Data that is not JSON is passed line by
    /// line as it came.
    fn sse_event(&self, event: &[u8]) -> Vec<u8> {
        let text = String::from_utf8_lossy(event);
        let mut fields = Vec::new();
        let mut data = Vec::new();
        for line in text.split('\n').filter(|line| !line.is_empty()) {
            let (name, value) = line.split_once(':').unwrap_or((line, ""));
            if name == "data" {
                data.push(value.strip_prefix(' ').unwrap_or(value).to_string());
            } else {
                fields.push(line.to_string());
            }
        }
        if data.is_empty() {
            return event.to_vec();
        }
        let data = match serde_json::from_str::<Value>(&data.join("\n")) {
            Ok(message) => match self.message(message) {
                Some(message) => vec![message.to_string()],
                None => return Vec::new(),
            },
            Err(_) => data,
        };
        let mut out = String::new();
        for field in fields {
            out.push_str(&field);
            out.push('\n');
        }
        for line in data {
            out.push_str("data: ");
            out.push_str(&line);
            out.push('\n');
        }
        out.push('\n');
        out.into_bytes()
    }
}

#[cfg(test)]
mod tests;
