//! Every finding the lints exist for, flagged; and an `allow_broad` reason silencing one.

use std::path::Path;

use crate::config::Config;

const BASE: &str = r#"
[server]
data_dir = "data"
issuer = "https://valet.test"
max_ttl = "1h"
[audit]
path = "audit.jsonl"
[[credential]]
name = "railway"
file = "railway.secret"
[[credential]]
name = "aws"
kind = "aws"
access_key_id = "AKIAIOSFODNN7EXAMPLE"
env = "AWS_SECRET"
region = "eu-west-1"
[[upstream]]
name = "railway"
base_url = "https://backboard.railway.app"
credential = "railway"
[upstream.inject]
header = { Authorization = "Bearer {secret}" }
"#;

fn lints_of(extra: &str) -> Vec<(String, &'static str, Option<String>)> {
    let config = Config::parse(&format!("{BASE}{extra}"), Path::new("/"))
        .unwrap_or_else(|errors| panic!("{errors}"));
    config
        .lints()
        .into_iter()
        .map(|lint| (lint.key_path, lint.code, lint.silenced))
        .collect()
}

fn has(lints: &[(String, &'static str, Option<String>)], key_path: &str, code: &str) -> bool {
    lints
        .iter()
        .any(|(path, found, _)| path == key_path && *found == code)
}

#[test]
fn what_quietly_widens_access_or_can_never_work_is_flagged() {
    let lints = lints_of(
        r#"
[[scope]]
name = "anything"
credential = "railway"
environment = "staging"
audience = "railway"
default_ttl = "5m"
max_ttl = "1h"
[scope.params.project]
pattern = ".*"
[scope.params.empty]
pattern = ""

[[scope]]
name = "reports"
credential = "aws"
provider = "aws-sts"
environment = "staging"
default_ttl = "5m"
max_ttl = "30m"
role_arn = "arn:aws:iam::123456789012:role/valet-production-admin"
actions = ["*", "iam:PassRole"]
resources = ["*", "arn:aws:s3:::data/{team}*", "arn:aws:{service}:eu-west-1:{account}:x"]
[scope.params.team]
pattern = "[a-z]{0,20}"
[scope.params.service]
values = ["s3"]
[scope.params.account]
values = ["123456789012"]

[[scope]]
name = "prod-a"
credential = "railway"
environment = "Production"
audience = "railway"
default_ttl = "5m"
max_ttl = "30m"
[scope.approval]
approvers = ["helper", "nobody"]

[[scope]]
name = "prod-b"
credential = "railway"
environment = "production"
audience = "railway"
default_ttl = "5m"
max_ttl = "30m"

[[scope]]
name = "gateway"
upstream = "railway"
environment = "staging"
default_ttl = "5m"
max_ttl = "30m"
[[scope.allow]]
methods = ["GET", "DELETE"]
path = "/v1/**"
[[scope.allow]]
method = "POST"
path = "/graphql/v2"

[[principal]]
name = "helper"
roles = ["agent"]
key_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
scopes = ["anything", "prod-b"]

[[principal]]
name = "boss"
roles = ["agent", "admin"]
key_sha256 = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752"
"#,
    );
    for (key_path, code) in [
        ("scope[0].params.project", "param-matches-anything"),
        ("scope[0].params.empty", "param-can-be-empty"),
        ("scope[0]", "ttl-cap-at-server-max"),
        ("scope[1].actions", "aws-any-action-any-resource"),
        ("scope[1].actions", "aws-privilege-escalation"),
        ("scope[1].resources[1]", "empty-param-beside-wildcard"),
        ("scope[1].resources[2]", "param-in-arn-service-or-account"),
        ("scope[1].role_arn", "aws-role-environment-mismatch"),
        ("scope[2].environment", "environment-case-variant"),
        ("scope[3].environment", "environment-case-variant"),
        ("scope[2].approval", "approver-is-an-agent"),
        ("scope[2].approval", "approver-undefined"),
        ("scope[2].approval", "approval-never-given"),
        ("scope[4].allow[0]", "write-method-wildcard-path"),
        ("scope[4].allow[1]", "graphql-unchecked"),
        ("principal[0].key_sha256", "key-across-environments"),
        ("principal[1].roles", "agent-and-admin"),
    ] {
        assert!(
            has(&lints, key_path, code),
            "{key_path} {code} in {lints:#?}"
        );
    }
}

#[test]
fn an_allow_broad_reason_silences_its_finding_and_is_kept() {
    let lints = lints_of(
        r#"
[[scope]]
name = "anything"
credential = "railway"
environment = "staging"
audience = "railway"
default_ttl = "5m"
max_ttl = "30m"
[scope.params.project]
pattern = ".*"
allow_broad = "projects are created by the agent itself; any name is fine here"
"#,
    );
    let (_, _, silenced) = lints
        .iter()
        .find(|(path, code, _)| {
            path == "scope[0].params.project" && *code == "param-matches-anything"
        })
        .expect("still listed");
    assert_eq!(
        silenced.as_deref(),
        Some("projects are created by the agent itself; any name is fine here")
    );
    let errors = Config::parse(
        &format!("{BASE}\n[[scope]]\nname = \"s\"\ncredential = \"railway\"\nenvironment = \"x\"\naudience = \"a\"\ndefault_ttl = \"5m\"\nmax_ttl = \"30m\"\nallow_broad = \"ok\"\n"),
        Path::new("/"),
    )
    .unwrap_err()
    .to_string();
    assert!(errors.contains("scope[0].allow_broad"), "{errors}");
}

#[test]
fn the_example_configs_pass_strict_or_say_why() {
    for (name, text) in super::super::tests::EXAMPLES {
        let config = Config::parse(text, Path::new("/repo/deploy/examples")).unwrap();
        let active: Vec<_> = config
            .lints()
            .into_iter()
            .filter(|lint| lint.silenced.is_none())
            .collect();
        assert!(active.is_empty(), "{name}: {active:#?}");
    }
}

#[test]
fn an_mcp_scope_allowing_every_tool_or_an_unbound_delete_is_flagged() {
    let lints = lints_of(
        r#"
[[upstream]]
name = "tools"
kind = "mcp"
command = "deploy-mcp"
env = { TOKEN = "{secret}" }
credential = "railway"
[[scope]]
name = "mcp-wide"
upstream = "tools"
environment = "staging"
default_ttl = "5m"
max_ttl = "10m"
[scope.mcp]
resources = ["*"]
[[scope.mcp.tool]]
name = "*"
[[scope.mcp.tool]]
name = "delete_volume"
[[scope.mcp.tool]]
name = "delete_domain"
approval = true
[[scope.mcp.tool]]
name = "remove_cache"
allow_broad = "caches rebuild themselves in a minute"
"#,
    );
    assert!(
        has(&lints, "scope[0].mcp.tool[0]", "mcp-every-tool"),
        "{lints:?}"
    );
    assert!(
        has(
            &lints,
            "scope[0].mcp.tool[1]",
            "mcp-destructive-tool-unbound"
        ),
        "{lints:?}"
    );
    assert!(
        !has(
            &lints,
            "scope[0].mcp.tool[2]",
            "mcp-destructive-tool-unbound"
        ),
        "{lints:?}"
    );
    assert!(
        has(&lints, "scope[0].mcp.resources[0]", "mcp-every-resource"),
        "{lints:?}"
    );
    let silenced = lints
        .iter()
        .find(|(path, _, _)| path == "scope[0].mcp.tool[3]")
        .expect("the remove_cache lint is listed, silenced");
    assert_eq!(
        silenced.2.as_deref(),
        Some("caches rebuild themselves in a minute")
    );
}

#[test]
fn a_tool_prompt_or_graphql_field_binding_no_argument_to_the_grants_tenant_is_flagged() {
    let lints = lints_of(
        r#"
[[upstream]]
name = "tools"
kind = "mcp"
command = "deploy-mcp"
env = { TOKEN = "{secret}" }
credential = "railway"
[[scope]]
name = "per-project"
upstream = "tools"
environment = "staging"
default_ttl = "5m"
max_ttl = "10m"
[scope.params.project]
pattern = "p-[a-z]+"
[scope.mcp]
prompts = ["summarise"]
[[scope.mcp.tool]]
name = "list_*"
[[scope.mcp.tool]]
name = "list_volumes"
arguments = { projectId = "{project}" }
[[scope.mcp.prompt]]
name = "status"
arguments = { projectId = "{project}" }
[[scope]]
name = "graph"
upstream = "railway"
environment = "staging"
default_ttl = "5m"
max_ttl = "10m"
[scope.params.project_id]
pattern = "p-[a-z]+"
[[scope.allow]]
path = "/graphql"
[scope.allow.graphql]
query = ["project", "projects"]
arguments = { "project.id" = "{project_id}" }
"#,
    );
    let flagged = |path: &str| has(&lints, path, "tenant-argument-unbound");
    assert!(flagged("scope[0].mcp.tool[0]"), "{lints:?}");
    assert!(!flagged("scope[0].mcp.tool[1]"), "{lints:?}");
    assert!(flagged("scope[0].mcp.prompt[0]"), "{lints:?}");
    assert!(!flagged("scope[0].mcp.prompt[1]"), "{lints:?}");
    let graphql: Vec<_> = lints
        .iter()
        .filter(|(path, code, _)| path == "scope[1].allow[0]" && *code == "tenant-argument-unbound")
        .collect();
    assert_eq!(graphql.len(), 1, "only `projects` binds nothing: {lints:?}");
}
