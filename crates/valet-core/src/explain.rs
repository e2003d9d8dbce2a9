//! What a principal may do, in words and as data: the scopes it may request and with which
//! params, and what a grant of each allows (REST methods and paths, GraphQL fields and bound
//! arguments, AWS actions and resources as the session policy renders them), the approvals and
//! TTL caps; and, for one concrete call, whether the gateway would forward it — decided by the
//! functions the gateway itself runs (`rules::check_path`, `call::candidate_rules`,
//! `call::choose_rule`).

pub mod cases;

use std::collections::BTreeMap;

use serde::Serialize;

use crate::approval::ApprovalPolicy;
use crate::config::{Config, Scope, format_duration};

#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    pub principal: String,
    pub roles: Vec<String>,
    /// How it may authenticate: a key, certificate names, identity tokens.
    pub credentials: Vec<String>,
    pub scopes: Vec<ScopeExplanation>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScopeExplanation {
    pub scope: String,
    pub environment: String,
    pub audience: String,
    pub default_ttl: String,
    pub max_ttl: String,
    pub max_uses: Option<u64>,
    pub renewable: bool,
    pub params: BTreeMap<String, String>,
    /// Who must approve a token, when anyone must.
    pub approval: Option<String>,
    pub upstream: Option<String>,
    pub rules: Vec<RuleExplanation>,
    pub aws: Option<AwsExplanation>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RuleExplanation {
    pub rule: String,
    pub methods: Vec<String>,
    pub path: String,
    pub graphql_queries: Vec<String>,
    pub graphql_mutations: Vec<String>,
    /// Bound GraphQL arguments, `field.argument = rule`.
    pub arguments: Vec<String>,
    /// Allowed query parameters, `name = rule`.
    pub query: Vec<String>,
    pub max_body: u64,
    pub max_calls: Option<u64>,
    /// Who must approve each call, when anyone must.
    pub approval: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AwsExplanation {
    pub role_arn: String,
    pub actions: Vec<String>,
    /// As written, with `{param}` placeholders.
    pub resources: Vec<String>,
    /// The session policy a grant with the given params would carry; absent when a param it
    /// needs was not given.
    pub session_policy: Option<serde_json::Value>,
    pub revoke: String,
}

fn approval_words(policy: &ApprovalPolicy) -> String {
    let approvers = if policy.approvers.is_empty() {
        "any operator or admin".to_string()
    } else {
        policy
            .approvers
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut words = format!(
        "{} approval(s) from {approvers} within {}",
        policy.count,
        format_duration(policy.timeout)
    );
    if let Some(confirm) = &policy.confirm {
        let (what, _) = confirm.expected("", &BTreeMap::new());
        words.push_str(&format!(", typing the {what} to confirm"));
    }
    words
}

/// What `principal` may request (only `scope` when given), and what grants with `params` allow.
pub fn explain(
    config: &Config,
    principal: &str,
    scope: Option<&str>,
    params: &BTreeMap<String, String>,
) -> Result<Explanation, String> {
    let found = config.principals.get(principal).ok_or_else(|| {
        format!(
            "principal {principal:?} is not in this config; principals: [{}]",
            config
                .principals
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    if let Some(scope) = scope
        && !found.scopes.contains(scope)
    {
        return Err(format!(
            "principal {principal:?} may not request scope {scope:?}; it may request [{}]",
            found.scopes.iter().cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    let mut credentials = Vec::new();
    if found.key_sha256.is_some() {
        credentials.push("a static principal key".to_string());
    }
    credentials.extend(
        found
            .certificates
            .iter()
            .map(|matcher| format!("a client certificate with {matcher}")),
    );
    credentials.extend(
        found
            .identities
            .iter()
            .map(|matcher| format!("an {matcher}")),
    );
    let scopes = found
        .scopes
        .iter()
        .filter(|name| scope.is_none_or(|wanted| wanted == name.as_str()))
        .filter_map(|name| config.scopes.get(name))
        .map(|scope| explain_scope(scope, params))
        .collect();
    Ok(Explanation {
        principal: found.name.clone(),
        roles: found
            .roles
            .iter()
            .map(|role| role.as_str().to_string())
            .collect(),
        credentials,
        scopes,
    })
}

fn explain_scope(scope: &Scope, params: &BTreeMap<String, String>) -> ScopeExplanation {
    let rules = scope
        .allow
        .iter()
        .map(|rule| RuleExplanation {
            rule: format!("allow[{}]", rule.index),
            methods: rule.methods.iter().cloned().collect(),
            path: rule.path.source().to_string(),
            graphql_queries: rule
                .graphql
                .as_ref()
                .map(|graphql| graphql.query.iter().cloned().collect())
                .unwrap_or_default(),
            graphql_mutations: rule
                .graphql
                .as_ref()
                .map(|graphql| graphql.mutation.iter().cloned().collect())
                .unwrap_or_default(),
            arguments: rule
                .graphql
                .as_ref()
                .map(|graphql| {
                    graphql
                        .arguments
                        .iter()
                        .map(|(path, value)| format!("{path} = {value}"))
                        .collect()
                })
                .unwrap_or_default(),
            query: rule
                .query
                .iter()
                .map(|(name, value)| format!("{name} = {value}"))
                .collect(),
            max_body: rule.max_body,
            max_calls: rule.max_calls,
            approval: rule.approval.as_ref().map(approval_words),
        })
        .collect();
    let aws = scope.aws.as_ref().map(|aws| AwsExplanation {
        role_arn: aws.role_arn.clone(),
        actions: aws.actions.clone(),
        resources: aws
            .resources
            .iter()
            .map(|resource| resource.source.clone())
            .collect(),
        session_policy: crate::aws::policy::session_policy(aws, params)
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok()),
        revoke: aws.revoke.as_str().to_string(),
    });
    ScopeExplanation {
        scope: scope.name.clone(),
        environment: scope.environment.clone(),
        audience: scope.audience.clone(),
        default_ttl: format_duration(scope.default_ttl),
        max_ttl: format_duration(scope.max_ttl),
        max_uses: scope.max_uses,
        renewable: scope.renewable,
        params: scope
            .params
            .iter()
            .map(|(name, rule)| {
                (
                    name.clone(),
                    format!(
                        "{}{}",
                        rule.allowed,
                        if rule.required { "" } else { " (optional)" }
                    ),
                )
            })
            .collect(),
        approval: scope.approval.as_ref().map(approval_words),
        upstream: scope.upstream.clone(),
        rules,
        aws,
    }
}

/// The explanation in words, for people.
pub fn words(explanation: &Explanation) -> String {
    let mut out = format!(
        "principal {} (roles: {}) authenticates with {}\n",
        explanation.principal,
        explanation.roles.join(", "),
        if explanation.credentials.is_empty() {
            "nothing (it cannot authenticate)".to_string()
        } else {
            explanation.credentials.join("; ")
        }
    );
    if explanation.scopes.is_empty() {
        out.push_str("  it may request no scope\n");
    }
    for scope in &explanation.scopes {
        out.push_str(&format!(
            "\nscope {} — environment {}, audience {}\n  tokens: {} by default, at most {}{}{}\n",
            scope.scope,
            scope.environment,
            scope.audience,
            scope.default_ttl,
            scope.max_ttl,
            if scope.renewable {
                ", renewable"
            } else {
                ", not renewable"
            },
            scope
                .max_uses
                .map(|uses| format!(", at most {uses} introspections"))
                .unwrap_or_default()
        ));
        for (name, allowed) in &scope.params {
            out.push_str(&format!("  param {name}: {allowed}\n"));
        }
        match &scope.approval {
            Some(approval) => out.push_str(&format!("  needs approval: {approval}\n")),
            None => out.push_str("  issued without approval\n"),
        }
        if let Some(upstream) = &scope.upstream {
            out.push_str(&format!(
                "  through the gateway to upstream {upstream}, only:\n"
            ));
        }
        for rule in &scope.rules {
            out.push_str(&format!(
                "    {} {} {}",
                rule.rule,
                rule.methods.join("|"),
                rule.path
            ));
            if !rule.graphql_queries.is_empty() || !rule.graphql_mutations.is_empty() {
                out.push_str(&format!(
                    " — GraphQL query [{}], mutation [{}]",
                    rule.graphql_queries.join(", "),
                    rule.graphql_mutations.join(", ")
                ));
            }
            for argument in &rule.arguments {
                out.push_str(&format!("; {argument}"));
            }
            if !rule.query.is_empty() {
                out.push_str(&format!("; query {}", rule.query.join(", ")));
            }
            if let Some(calls) = rule.max_calls {
                out.push_str(&format!("; at most {calls} calls per grant"));
            }
            if let Some(approval) = &rule.approval {
                out.push_str(&format!("; each call needs {approval}"));
            }
            out.push('\n');
        }
        if let Some(aws) = &scope.aws {
            out.push_str(&format!(
                "  AWS: assumes {}, allows {} on {} (revocation: {})\n",
                aws.role_arn,
                aws.actions.join(", "),
                aws.resources.join(", "),
                aws.revoke
            ));
            match &aws.session_policy {
                Some(policy) => out.push_str(&format!("  session policy: {policy}\n")),
                None => out.push_str("  session policy: give every param (--param) to render it\n"),
            }
        }
    }
    out
}

/// What the gateway would do with one call on a grant of `scope` with `params`.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum CallVerdict {
    Allow { rule: String },
    NeedsApproval { rule: String, approval: String },
    Deny { reason: String },
}

/// Decides `method target` (path and query) with `body` as the gateway does.
pub fn explain_call(
    scope: &Scope,
    params: &BTreeMap<String, String>,
    method: &str,
    target: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> CallVerdict {
    // An MCP scope decides on the JSON-RPC in the body, as the gateway does at /mcp/<upstream>.
    if let Some(allow) = &scope.mcp {
        if !method.eq_ignore_ascii_case("POST") {
            return CallVerdict::Deny {
                reason: format!(
                    "{method} is not served for an MCP upstream: the gateway takes POST (JSON-RPC) at /mcp/<upstream>"
                ),
            };
        }
        return explain_mcp(allow, params, body);
    }
    let method = method.to_ascii_uppercase();
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    };
    let deny = |reason: String| CallVerdict::Deny { reason };
    let checked = match crate::rules::check_path(path) {
        Ok(checked) => checked,
        Err(error) => return deny(error.to_string()),
    };
    let candidates =
        match crate::call::candidate_rules(scope, &method, path, &checked.segments, params) {
            Ok(candidates) => candidates,
            Err(refusal) => return deny(refusal.to_string()),
        };
    if body.len() as u64 > crate::call::max_body(&candidates) {
        return deny(format!(
            "the body is {} bytes; the rules allow at most {}",
            body.len(),
            crate::call::max_body(&candidates)
        ));
    }
    let content_types: Vec<&str> = content_type.into_iter().collect();
    let call = match crate::canonical::CanonicalCall::read(
        &method,
        path,
        checked,
        query,
        &[],
        &content_types,
        body,
    ) {
        Ok(call) => call,
        Err(refusal) => return deny(refusal.to_string()),
    };
    match crate::call::choose_rule(scope, &candidates, &call, params) {
        Err(refusal) => deny(refusal.to_string()),
        Ok((rule, _)) => match &rule.approval {
            Some(approval) => CallVerdict::NeedsApproval {
                rule: rule.to_string(),
                approval: approval_words(approval),
            },
            None => CallVerdict::Allow {
                rule: rule.to_string(),
            },
        },
    }
}

/// Decides one POST of JSON-RPC to an MCP upstream: every message checked, a tool call needing
/// approval named with what its approval asks.
fn explain_mcp(
    allow: &crate::mcp::McpAllow,
    params: &BTreeMap<String, String>,
    body: &[u8],
) -> CallVerdict {
    let value = match crate::json::parse_strict(body) {
        Ok(value) => value,
        Err(error) => {
            return CallVerdict::Deny {
                reason: error.to_string(),
            };
        }
    };
    let checked = match crate::mcp::check_post(&value, allow, params) {
        Ok((checked, _)) => checked,
        Err(denial) => {
            return CallVerdict::Deny {
                reason: denial.to_string(),
            };
        }
    };
    let rules: Vec<&crate::mcp::ToolRule> = checked
        .iter()
        .filter_map(|message| message.tool_rule.map(|index| &allow.tools[index]))
        .collect();
    let names = |rules: &[&crate::mcp::ToolRule]| {
        if rules.is_empty() {
            "no tool call (nothing the server acts on)".to_string()
        } else {
            rules
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    match rules
        .iter()
        .find_map(|rule| rule.approval.as_ref().map(|approval| (rule, approval)))
    {
        Some((rule, approval)) => CallVerdict::NeedsApproval {
            rule: rule.to_string(),
            approval: approval_words(approval),
        },
        None => CallVerdict::Allow {
            rule: names(&rules),
        },
    }
}

#[cfg(test)]
mod tests;
