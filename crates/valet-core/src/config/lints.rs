//! What a valid config allows that an experienced admin would not: patterns that match anything,
//! AWS scopes that reach everything or can escalate, roles and environments that disagree,
//! approvals nobody can give, write access by wildcard, unchecked GraphQL, static keys where an
//! identity is offered. Each lint names its key path, the risk in one sentence and the fix; an
//! `allow_broad = "reason"` on the scope, param, rule or principal silences it, with the reason
//! kept and shown.

use std::collections::BTreeMap;

use super::{Config, Principal, Role, Scope};
use crate::approval::{ApprovalPolicy, Approver};

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lint {
    pub key_path: String,
    /// A stable name for the kind of finding (`param-matches-anything`).
    pub code: &'static str,
    /// What could go wrong, in one sentence.
    pub risk: String,
    /// What to change.
    pub fix: String,
    /// The stated reason, when an `allow_broad` silences it.
    pub silenced: Option<String>,
}

/// Values a parameter pattern is tried on: a pattern that takes all of them takes anything.
const PROBES: [&str; 5] = ["", "production", "../../etc/passwd", "a b", "*"];

/// Words that name an environment, from most to least specific, with what they mean.
const ENVIRONMENT_WORDS: [(&str, &str); 6] = [
    ("production", "production"),
    ("prod", "production"),
    ("staging", "staging"),
    ("stage", "staging"),
    ("development", "development"),
    ("dev", "development"),
];

impl Config {
    /// Every lint of this config, silenced ones included (with their reason).
    pub fn lints(&self) -> Vec<Lint> {
        let mut found = Vec::new();
        for scope in self.scopes.values() {
            lint_scope(self, scope, &mut found);
        }
        lint_environments(self, &mut found);
        for principal in self.principals.values() {
            lint_principal(self, principal, &mut found);
        }
        // Allowed by insecure_plaintext (without it, a problem, not a lint): still a risk.
        for (listener, address) in self
            .server
            .plaintext_listeners_off_loopback()
            .into_iter()
            .filter(|_| self.server.insecure_plaintext)
        {
            found.push(Lint {
                key_path: "server.insecure_plaintext".to_string(),
                code: "plaintext-off-loopback",
                risk: format!(
                    "the {listener} listener serves plaintext on {address}: keys and tokens cross that network in clear unless a proxy or mesh protects it"
                ),
                fix: "set server.tls_cert_file and tls_key_file".to_string(),
                silenced: None,
            });
        }
        found
    }
}

fn lint_scope(config: &Config, scope: &Scope, found: &mut Vec<Lint>) {
    let at = format!("scope[{}]", scope.position);
    let mut push = |relative: &str, code: &'static str, risk: String, fix: String| {
        let silenced = scope
            .allow_broad
            .get(relative)
            .or_else(|| scope.allow_broad.get(""))
            .cloned();
        let key_path = if relative.is_empty() {
            at.clone()
        } else {
            format!("{at}.{relative}")
        };
        found.push(Lint {
            key_path,
            code,
            risk,
            fix,
            silenced,
        });
    };
    let mut can_be_empty = Vec::new();
    for (name, rule) in &scope.params {
        let relative = format!("params.{name}");
        let matched: Vec<&str> = PROBES
            .iter()
            .copied()
            .filter(|probe| rule.allowed.permits(probe))
            .collect();
        if matched.len() == PROBES.len() {
            push(
                &relative,
                "param-matches-anything",
                format!(
                    "param {name:?} of scope {:?} takes any value ({}), so the scope is only as narrow as the rest of its rules",
                    scope.name, rule.allowed
                ),
                "give a pattern of the values the task needs (such as \"[a-z][a-z0-9-]{0,31}\") or values = [...]".to_string(),
            );
        } else if rule.allowed.permits("") {
            can_be_empty.push(name.clone());
            push(
                &relative,
                "param-can-be-empty",
                format!(
                    "param {name:?} of scope {:?} may be empty, and an empty value widens every path or resource it is part of",
                    scope.name
                ),
                "make the pattern require at least one character (+ instead of *)".to_string(),
            );
        }
    }
    if scope.max_ttl >= config.server.max_ttl {
        push(
            "",
            "ttl-cap-at-server-max",
            format!(
                "scope {:?} caps tokens at the server's own maximum ({}), so nothing about the task bounds their lifetime",
                scope.name,
                super::format_duration(config.server.max_ttl)
            ),
            "set the scope's max_ttl to what its tasks need, below server.max_ttl".to_string(),
        );
    }
    if let Some(allow) = &scope.mcp {
        for rule in &allow.tools {
            let relative = format!("mcp.tool[{}]", rule.index);
            if rule.name.as_str().chars().all(|character| character == '*') {
                push(
                    &relative,
                    "mcp-every-tool",
                    format!(
                        "scope {:?} allows every tool of MCP upstream {:?}, including any the server adds later (deletes among them)",
                        scope.name,
                        scope.upstream.as_deref().unwrap_or_default()
                    ),
                    "list the tools the task needs by name or a narrow glob (list_*), with argument rules for those that change things".to_string(),
                );
            } else if rule.approval.is_none()
                && rule.arguments.is_empty()
                && ["delete", "destroy", "drop", "remove"]
                    .iter()
                    .any(|word| rule.name.as_str().to_ascii_lowercase().contains(word))
            {
                push(
                    &relative,
                    "mcp-destructive-tool-unbound",
                    format!(
                        "tool {:?} sounds destructive and runs with any arguments and no approval",
                        rule.name.as_str()
                    ),
                    "bind its arguments to the grant's params, or set approval = true".to_string(),
                );
            }
        }
        for rule in allow.tools.iter().chain(&allow.prompts) {
            let relative = format!("mcp.{}[{}]", rule.kind, rule.index);
            if let Some((param, risk)) = unbound_tenant(scope, rule) {
                push(
                    &relative,
                    "tenant-argument-unbound",
                    risk,
                    format!(
                        "bind the argument that names the {param} to the grant (arguments = {{ {param}Id = \"{{{param}}}\" }}, as the server names it), or say why the {} may reach every {param} (allow_broad)",
                        rule.kind
                    ),
                );
            }
        }
        for (index, resource) in allow.resources.iter().enumerate() {
            if resource.chars().all(|character| character == '*') {
                push(
                    &format!("mcp.resources[{index}]"),
                    "mcp-every-resource",
                    format!("scope {:?} lets a grant read every resource of its MCP server", scope.name),
                    "write the URIs the task reads, with {param} for the grant's part (deploy://projects/{project}/*)".to_string(),
                );
            }
        }
    }
    if let Some(aws) = &scope.aws {
        let actions: Vec<String> = aws
            .actions
            .iter()
            .map(|action| action.to_lowercase())
            .collect();
        let any_resource = aws.resources.iter().any(|resource| resource.source == "*");
        if actions.iter().any(|action| action == "*") && any_resource {
            push(
                "actions",
                "aws-any-action-any-resource",
                format!(
                    "scope {:?} allows every AWS action on every resource: the role's own policy is the only limit",
                    scope.name
                ),
                "list the actions and the resource ARNs the task needs".to_string(),
            );
        }
        for action in &actions {
            if action == "*"
                || action.starts_with("iam:")
                || action == "sts:*"
                || action == "sts:assumerole"
            {
                push(
                    "actions",
                    "aws-privilege-escalation",
                    format!(
                        "scope {:?} allows {action}, with which a grant can give itself more than the scope says (new policies, users or roles)",
                        scope.name
                    ),
                    "remove iam:* and sts:AssumeRole from the actions; grant IAM changes through a person".to_string(),
                );
                break;
            }
        }
        for (index, resource) in aws.resources.iter().enumerate() {
            let relative = format!("resources[{index}]");
            let parts: Vec<&str> = resource.source.split(':').collect();
            if parts.len() >= 5 && (parts[2].contains('{') || parts[4].contains('{')) {
                push(
                    &relative,
                    "param-in-arn-service-or-account",
                    format!(
                        "resource {:?} takes a param in its service or account position, so a requester chooses which service or account the grant reaches",
                        resource.source
                    ),
                    "write the service and account literally; use params only in the resource part"
                        .to_string(),
                );
            }
            for name in &can_be_empty {
                let placeholder = format!("{{{name}}}");
                if resource.source.contains(&format!("{placeholder}*"))
                    || resource.source.contains(&format!("*{placeholder}"))
                {
                    push(
                        &relative,
                        "empty-param-beside-wildcard",
                        format!(
                            "resource {:?} puts param {name:?}, which may be empty, next to a wildcard: an empty value renders it as a wildcard over every sibling",
                            resource.source
                        ),
                        format!("make param {name:?} require at least one character"),
                    );
                }
            }
        }
        let role = aws
            .role_arn
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_lowercase();
        if let (Some(role_environment), Some(scope_environment)) = (
            environment_named(&role),
            environment_named(&scope.environment.to_lowercase()),
        ) && role_environment != scope_environment
        {
            push(
                "role_arn",
                "aws-role-environment-mismatch",
                format!(
                    "scope {:?} is for {} but assumes role {:?}, whose name says {role_environment}",
                    scope.name, scope.environment, aws.role_arn
                ),
                "assume a role of the scope's own environment".to_string(),
            );
        }
    }
    for rule in &scope.allow {
        let relative = format!("allow[{}]", rule.index);
        let writes: Vec<&String> = rule
            .methods
            .iter()
            .filter(|method| matches!(method.as_str(), "POST" | "PUT" | "PATCH" | "DELETE"))
            .collect();
        if !writes.is_empty() && rule.path.source().ends_with("**") && rule.graphql.is_none() {
            push(
                &relative,
                "write-method-wildcard-path",
                format!(
                    "rule {} lets {} reach every path under {}, whatever the call does",
                    rule.index,
                    writes
                        .iter()
                        .map(|method| method.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    rule.path.source()
                ),
                "list the paths each write method needs, or split reads (GET under **) from writes"
                    .to_string(),
            );
        }
        if let Some(graphql) = &rule.graphql
            && let Some(param) = tenant_params(scope).first()
        {
            for field in graphql.query.iter().chain(&graphql.mutation) {
                let bound = graphql.arguments.iter().any(|(path, value)| {
                    path.field == *field
                        && value
                            .param()
                            .is_some_and(|name| tenant_params(scope).contains(&name))
                });
                if !bound && field != "__typename" {
                    push(
                        &relative,
                        "tenant-argument-unbound",
                        format!(
                            "rule {} allows the GraphQL field {field} with no argument bound to the grant's {param}: a grant for one {param} can ask it about another",
                            rule.index
                        ),
                        format!(
                            "bind its argument to the grant ([scope.allow.graphql.arguments] \"{field}.id\" = \"{{{param}}}\", as the schema names it), or say why it may reach every {param} (allow_broad)"
                        ),
                    );
                }
            }
        }
        if rule.methods.contains("POST")
            && rule.graphql.is_none()
            && rule.path.source().to_lowercase().contains("graphql")
        {
            push(
                &relative,
                "graphql-unchecked",
                format!(
                    "rule {} allows POST to {} without a graphql section: every query and every mutation passes unread",
                    rule.index,
                    rule.path.source()
                ),
                "add graphql = { query = [...], mutation = [...] } listing the fields the task needs".to_string(),
            );
        }
    }
    let policies = std::iter::once(("approval".to_string(), scope.approval.as_ref())).chain(
        scope.allow.iter().map(|rule| {
            (
                format!("allow[{}].approval", rule.index),
                rule.approval.as_ref(),
            )
        }),
    );
    for (relative, policy) in policies {
        let Some(policy) = policy else { continue };
        for lint in lint_approvers(config, scope, policy) {
            push(&relative, lint.0, lint.1, lint.2);
        }
    }
}

/// Words that make a parameter name a tenant: what one grant is for and another is not.
const TENANT_WORDS: [&str; 12] = [
    "tenant",
    "project",
    "namespace",
    "environment",
    "org",
    "account",
    "team",
    "workspace",
    "customer",
    "cluster",
    "owner",
    "repo",
];

/// The scope's parameters that name a tenant (a project, a namespace, an environment…).
fn tenant_params(scope: &Scope) -> Vec<&str> {
    scope
        .params
        .keys()
        .filter(|name| {
            let name = name.to_ascii_lowercase();
            TENANT_WORDS.iter().any(|word| name.contains(word))
        })
        .map(String::as_str)
        .collect()
}

/// When the scope has tenant parameters and an MCP tool or prompt rule binds none of them to an
/// argument: the parameter, and the risk in a sentence.
fn unbound_tenant(scope: &Scope, rule: &crate::mcp::ToolRule) -> Option<(String, String)> {
    let tenants = tenant_params(scope);
    let param = tenants.first()?;
    let bound = rule.arguments.values().any(|argument| {
        matches!(argument, crate::mcp::ArgumentRule::Value(value)
            if value.param().is_some_and(|name| tenants.contains(&name)))
    });
    (!bound).then(|| {
        (
            param.to_string(),
            format!(
                "{rule} binds no argument to the grant's {param}: a grant for one {param} can {} it for another",
                if rule.kind == "tool" { "call" } else { "get" }
            ),
        )
    })
}

/// Approvers who can never approve, and a policy that can then never be satisfied.
fn lint_approvers(
    config: &Config,
    scope: &Scope,
    policy: &ApprovalPolicy,
) -> Vec<(&'static str, String, String)> {
    let mut lints = Vec::new();
    if policy.approvers.is_empty() {
        return lints;
    }
    let mut able = 0usize;
    for approver in &policy.approvers {
        let can = match approver {
            Approver::Role(Role::Agent) => false,
            Approver::Role(_) => true,
            Approver::Principal(name) => match config.principals.get(name) {
                None => {
                    lints.push((
                        "approver-undefined",
                        format!(
                            "approver {name:?} of scope {:?} is not a principal of this config",
                            scope.name
                        ),
                        "name a defined principal, or role:operator / role:admin".to_string(),
                    ));
                    false
                }
                Some(principal)
                    if !principal.has_role(Role::Operator)
                        && principal.roles.contains(&Role::Agent) =>
                {
                    lints.push((
                        "approver-is-an-agent",
                        format!("approver {name:?} of scope {:?} is an agent, and agents cannot approve", scope.name),
                        "name an operator or admin as the approver".to_string(),
                    ));
                    false
                }
                Some(_) => true,
            },
        };
        if can {
            able += 1;
        }
    }
    if able < policy.count as usize {
        lints.push((
            "approval-never-given",
            format!(
                "scope {:?} needs {} approval(s) but only {able} of its approvers can give one: it can never be granted",
                scope.name, policy.count
            ),
            "list approvers who can approve (operators, admins, or principals with those roles)".to_string(),
        ));
    }
    lints
}

/// The environment a name speaks of, if any.
fn environment_named(text: &str) -> Option<&'static str> {
    ENVIRONMENT_WORDS
        .iter()
        .find(|(word, _)| {
            text.split(|character: char| !character.is_ascii_alphanumeric())
                .any(|part| part == *word)
        })
        .map(|(_, meaning)| *meaning)
}

/// Environments that differ only in case are two environments to Valet and one to people.
fn lint_environments(config: &Config, found: &mut Vec<Lint>) {
    let mut by_lowercase: BTreeMap<String, Vec<&Scope>> = BTreeMap::new();
    for scope in config.scopes.values() {
        by_lowercase
            .entry(scope.environment.to_lowercase())
            .or_default()
            .push(scope);
    }
    for scopes in by_lowercase.values() {
        let spellings: std::collections::BTreeSet<&str> = scopes
            .iter()
            .map(|scope| scope.environment.as_str())
            .collect();
        if spellings.len() < 2 {
            continue;
        }
        for scope in scopes {
            found.push(Lint {
                key_path: format!("scope[{}].environment", scope.position),
                code: "environment-case-variant",
                risk: format!(
                    "environment {:?} of scope {:?} differs only in case from [{}]: Valet keeps them apart (a revoke-all or an approval policy for one misses the other)",
                    scope.environment,
                    scope.name,
                    spellings.iter().copied().collect::<Vec<_>>().join(", ")
                ),
                fix: "spell each environment one way (lower case)".to_string(),
                silenced: scope.allow_broad.get("").cloned(),
            });
        }
    }
}

fn lint_principal(config: &Config, principal: &Principal, found: &mut Vec<Lint>) {
    let at = format!("principal[{}]", principal.position);
    let mut push = |suffix: &str, code: &'static str, risk: String, fix: String| {
        found.push(Lint {
            key_path: format!("{at}{suffix}"),
            code,
            risk,
            fix,
            silenced: principal.allow_broad.clone(),
        });
    };
    if principal.roles.contains(&Role::Agent) && principal.roles.contains(&Role::Admin) {
        push(
            ".roles",
            "agent-and-admin",
            format!(
                "principal {:?} is both an agent and an admin: the credential an agent holds can also reload the config and rotate keys",
                principal.name
            ),
            "give agents and admins separate principals".to_string(),
        );
    }
    if principal.key_sha256.is_some() {
        let environments: std::collections::BTreeSet<&str> = principal
            .scopes
            .iter()
            .filter_map(|name| config.scopes.get(name))
            .map(|scope| scope.environment.as_str())
            .collect();
        if environments.len() > 1 {
            push(
                ".key_sha256",
                "key-across-environments",
                format!(
                    "principal {:?} reaches environments [{}] with one static key: a key leaked from the least guarded one reaches them all",
                    principal.name,
                    environments.iter().copied().collect::<Vec<_>>().join(", ")
                ),
                "give each environment its own principal (and key), or an identity instead of a key".to_string(),
            );
        }
    }
    let client_ca = config
        .server
        .tls
        .as_ref()
        .is_some_and(|tls| tls.client_ca_file.is_some());
    if (!config.issuers.is_empty() || client_ca)
        && principal.key_sha256.is_some()
        && principal.has_role(Role::Agent)
        && principal.identities.is_empty()
        && principal.certificates.is_empty()
    {
        let offered = match (config.issuers.is_empty(), client_ca) {
            (false, true) => "workload identity tokens ([[issuer]]) and client certificates",
            (false, false) => "workload identity tokens ([[issuer]])",
            _ => "client certificates (server.client_ca_file)",
        };
        push(
            ".key_sha256",
            "static-key-where-identity-offered",
            format!(
                "agent {:?} authenticates with a static key, a long-lived secret in the agent's reach, while this deployment accepts {offered}",
                principal.name
            ),
            "give it a [[principal.identity]] or [[principal.certificate]] and remove key_sha256 (docs/identity.md)".to_string(),
        );
    }
}

#[cfg(test)]
mod tests;
