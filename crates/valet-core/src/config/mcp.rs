//! MCP in the config: `kind = "mcp"` upstreams (a remote server over Streamable HTTP, or a
//! stdio server valetd runs with `command`, `args`, `env`) and `[scope.mcp]` (the tools,
//! resources and prompts a scope allows, with per-tool argument rules, approval and counts).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use super::gateway::{
    DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_PROCESSES, DEFAULT_STARTS_PER_PRINCIPAL, StdioServer,
    UpstreamKind,
};
use super::raw::{
    RawArgumentRule, RawArgumentTable, RawMcpScope, RawUpstream, RawValueRule, RawValueTable,
};
use super::{ParamRule, ProblemKind, Problems, invalid};
use crate::mcp::{ArgumentRule, ClientRequest, McpAllow, ToolRule};

/// Most processes one stdio upstream may keep.
const MAX_PROCESSES_LIMIT: i64 = 256;
/// The largest `[scope.mcp] max_batch`.
const MAX_BATCH_LIMIT: i64 = 100;

/// `kind`, and the keys that belong to one kind only.
pub(super) fn upstream_kind(
    raw: &mut RawUpstream,
    at: &str,
    problems: &mut Problems,
) -> Option<UpstreamKind> {
    let kind = match raw.kind.as_deref() {
        None | Some("http") => Some(UpstreamKind::Http),
        Some("mcp") => Some(UpstreamKind::Mcp),
        Some(other) => {
            problems.push(
                format!("{at}.kind"),
                invalid(
                    other,
                    "upstream kind",
                    "\"http\" (REST and GraphQL, the default) or \"mcp\"",
                ),
            );
            None
        }
    };
    let stdio = raw.command.is_some();
    if stdio && kind == Some(UpstreamKind::Http) {
        problems.push(
            format!("{at}.command"),
            invalid(
                "…",
                "command",
                "only on an upstream of kind = \"mcp\": valetd runs MCP servers, not HTTP APIs",
            ),
        );
    }
    if stdio && raw.base_url.is_some() {
        problems.push(
            at.to_string(),
            ProblemKind::BothSet {
                first: "base_url",
                second: "command",
            },
        );
    }
    if stdio && raw.inject.is_some() {
        problems.push(
            format!("{at}.inject"),
            invalid(
                "…",
                "injection",
                "none for an MCP server valetd runs: the credential goes in its env as \"{secret}\"",
            ),
        );
    }
    if !stdio {
        let stdio_only = [
            (!raw.args.is_empty(), "args"),
            (!raw.env.is_empty(), "env"),
            (raw.working_dir.is_some(), "working_dir"),
            (raw.max_processes.is_some(), "max_processes"),
            (
                raw.max_processes_per_principal.is_some(),
                "max_processes_per_principal",
            ),
            (raw.starts_per_principal.is_some(), "starts_per_principal"),
            (raw.shared.is_some(), "shared"),
            (raw.idle_timeout.is_some(), "idle_timeout"),
        ];
        for (set, key) in stdio_only {
            if set {
                problems.push(
                    format!("{at}.{key}"),
                    invalid(
                        "…",
                        key,
                        "only with command = \"…\", for an MCP server valetd runs",
                    ),
                );
            }
        }
    }
    kind
}

/// The stdio server of an upstream with `command`.
pub(super) fn build_stdio_server(
    raw: &mut RawUpstream,
    at: &str,
    resolve: &dyn Fn(String) -> PathBuf,
    problems: &mut Problems,
) -> Option<StdioServer> {
    let command = raw.command.take()?;
    let mut valid = true;
    if command.trim().is_empty() || command.contains('\0') {
        problems.push(
            format!("{at}.command"),
            invalid(
                &command,
                "command",
                "a program name found on PATH or a path to one",
            ),
        );
        valid = false;
    }
    let mut env = Vec::new();
    let mut has_secret = false;
    for (name, template) in std::mem::take(&mut raw.env) {
        let well_formed = !name.is_empty()
            && name
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_')
            && !name.as_bytes()[0].is_ascii_digit();
        if !well_formed || template.contains('\0') {
            problems.push(
                format!("{at}.env.{name}"),
                invalid(
                    &name,
                    "environment variable",
                    "a name of letters, digits and '_' (not starting with a digit) and a value without NUL",
                ),
            );
            valid = false;
            continue;
        }
        has_secret |= template.contains("{secret}");
        env.push((name, template));
    }
    if !has_secret && valid {
        problems.push(
            format!("{at}.env"),
            invalid(
                "{…}",
                "environment",
                "at least one variable whose value contains {secret}: the server gets the root credential there and nowhere else",
            ),
        );
        valid = false;
    }
    let max_processes = match raw.max_processes.take() {
        None => Some(DEFAULT_MAX_PROCESSES),
        Some(count) if (1..=MAX_PROCESSES_LIMIT).contains(&count) => usize::try_from(count).ok(),
        Some(count) => {
            problems.push(
                format!("{at}.max_processes"),
                invalid(
                    &count.to_string(),
                    "process count",
                    &format!("a whole number from 1 to {MAX_PROCESSES_LIMIT}"),
                ),
            );
            None
        }
    };
    // Each principal: half the places by default, so two principals can always be served.
    let max_processes_per_principal = match raw.max_processes_per_principal.take() {
        None => max_processes.map(|max| max.div_ceil(2)),
        Some(count)
            if count >= 1
                && max_processes
                    .is_some_and(|max| usize::try_from(count).is_ok_and(|count| count <= max)) =>
        {
            usize::try_from(count).ok()
        }
        Some(count) => {
            problems.push(
                format!("{at}.max_processes_per_principal"),
                invalid(
                    &count.to_string(),
                    "process count",
                    "a whole number from 1 to the upstream's max_processes",
                ),
            );
            None
        }
    };
    let starts_per_principal = match raw.starts_per_principal.take() {
        None => Some(DEFAULT_STARTS_PER_PRINCIPAL),
        Some(text) => crate::rate::Rate::parse(&text).or_else(|| {
            problems.push(
                format!("{at}.starts_per_principal"),
                invalid(&text, "rate", crate::rate::RATE_RULE),
            );
            None
        }),
    };
    let idle_timeout = match raw.idle_timeout.take() {
        None => Some(DEFAULT_IDLE_TIMEOUT),
        Some(text) => problems.duration(Some(text), &format!("{at}.idle_timeout")),
    };
    let (
        true,
        Some(max_processes),
        Some(max_processes_per_principal),
        Some(starts_per_principal),
        Some(idle_timeout),
    ) = (
        valid,
        max_processes,
        max_processes_per_principal,
        starts_per_principal,
        idle_timeout,
    )
    else {
        return None;
    };
    // A path (not a bare program name found on PATH) is relative to the config's directory.
    let command = if command.contains('/') {
        resolve(command).display().to_string()
    } else {
        command
    };
    Some(StdioServer {
        command,
        args: std::mem::take(&mut raw.args),
        env,
        working_dir: raw.working_dir.take().map(resolve),
        max_processes,
        max_processes_per_principal,
        starts_per_principal,
        shared: raw.shared.take().unwrap_or(false),
        idle_timeout,
    })
}

/// `[scope.mcp]` of a scope whose upstream is an MCP server.
pub(super) fn build_mcp_scope(
    raw: RawMcpScope,
    at: &str,
    params: &BTreeMap<String, ParamRule>,
    problems: &mut Problems,
) -> McpAllow {
    let mut tools = Vec::new();
    for (index, raw_tool) in raw.tool.into_iter().enumerate() {
        let tool_at = format!("{at}.mcp.tool[{index}]");
        if let Some(rule) = build_call_rule("tool", index, raw_tool, &tool_at, params, problems) {
            tools.push(rule);
        }
    }
    let mut resources = Vec::new();
    for (index, pattern) in raw.resources.into_iter().enumerate() {
        let key = format!("{at}.mcp.resources[{index}]");
        match crate::mcp::check_resource_pattern(&pattern, params) {
            Ok(()) => resources.push(pattern),
            Err(reason) => problems.push(key, invalid(&pattern, "resource pattern", &reason)),
        }
    }
    // Prompts by name (`prompts = ["summarise"]`), then those with argument rules
    // (`[[scope.mcp.prompt]]`), numbered in that order.
    let mut prompts = Vec::new();
    let n_named = raw.prompts.len();
    for (index, name) in raw.prompts.into_iter().enumerate() {
        let raw_prompt = super::raw::RawTool {
            name: Some(name),
            ..Default::default()
        };
        let prompt_at = format!("{at}.mcp.prompts[{index}]");
        if let Some(rule) =
            build_call_rule("prompt", index, raw_prompt, &prompt_at, params, problems)
        {
            prompts.push(rule);
        }
    }
    for (index, raw_prompt) in raw.prompt.into_iter().enumerate() {
        let prompt_at = format!("{at}.mcp.prompt[{index}]");
        for (set, key) in [
            (raw_prompt.approval.is_some(), "approval"),
            (raw_prompt.max_calls.is_some(), "max_calls"),
        ] {
            if set {
                problems.push(
                    format!("{prompt_at}.{key}"),
                    invalid(
                        "…",
                        key,
                        "only on a [[scope.mcp.tool]]: getting a prompt makes the server act on nothing",
                    ),
                );
            }
        }
        if let Some(rule) = build_call_rule(
            "prompt",
            n_named + index,
            raw_prompt,
            &prompt_at,
            params,
            problems,
        ) {
            prompts.push(rule);
        }
    }
    let max_batch = match raw.max_batch {
        None => crate::mcp::DEFAULT_MAX_BATCH,
        Some(count) if (1..=MAX_BATCH_LIMIT).contains(&count) => count as usize,
        Some(count) => {
            problems.push(
                format!("{at}.mcp.max_batch"),
                invalid(
                    &count.to_string(),
                    "batch size",
                    &format!(
                        "a whole number from 1 to {MAX_BATCH_LIMIT} (messages one POST may batch)"
                    ),
                ),
            );
            crate::mcp::DEFAULT_MAX_BATCH
        }
    };
    let mut client_requests = BTreeSet::new();
    for (index, name) in raw.client_requests.into_iter().enumerate() {
        match ClientRequest::parse(&name) {
            Some(request) => {
                client_requests.insert(request);
            }
            None => problems.push(
                format!("{at}.mcp.client_requests[{index}]"),
                invalid(
                    &name,
                    "client request",
                    "\"sampling\", \"elicitation\" or \"roots\"",
                ),
            ),
        }
    }
    McpAllow {
        tools,
        resources,
        prompts,
        client_requests,
        max_batch,
    }
}

/// One `[[scope.mcp.tool]]` (or a prompt rule): its name or glob, its argument rules, approval
/// and count.
fn build_call_rule(
    kind: &'static str,
    index: usize,
    raw_tool: super::raw::RawTool,
    tool_at: &str,
    params: &BTreeMap<String, ParamRule>,
    problems: &mut Problems,
) -> Option<ToolRule> {
    let name = problems.required(raw_tool.name, &format!("{tool_at}.name"))?;
    if !is_tool_glob(&name) {
        problems.push(
            format!("{tool_at}.name"),
            invalid(
                &name,
                if kind == "tool" { "tool name" } else { "prompt name" },
                "a name or glob of letters, digits, '_', '-', '.', '/' and '*', such as list_* or create_custom_domain",
            ),
        );
        return None;
    }
    let mut arguments = BTreeMap::new();
    for (argument, rule) in raw_tool.arguments {
        let key = format!("{tool_at}.arguments.{argument}");
        if let Some(rule) = build_argument_rule(rule, &key, params, problems) {
            arguments.insert(argument, rule);
        }
    }
    let required: BTreeSet<String> = raw_tool.required.into_iter().collect();
    let forbidden: BTreeSet<String> = raw_tool.forbidden.into_iter().collect();
    for both in required.intersection(&forbidden) {
        problems.push(
            format!("{tool_at}.forbidden"),
            invalid(
                both,
                "forbidden argument",
                "an argument that is not also required",
            ),
        );
    }
    for constrained in arguments.keys().filter(|name| forbidden.contains(*name)) {
        problems.push(
            format!("{tool_at}.arguments.{constrained}"),
            invalid(
                constrained,
                "argument rule",
                "a rule for an argument that is not forbidden",
            ),
        );
    }
    let approval = raw_tool.approval.and_then(|raw| {
        super::approval::build_rule_policy(raw, &format!("{tool_at}.approval"), params, problems)
    });
    let max_calls = match raw_tool.max_calls {
        None => None,
        Some(count) if count >= 1 => u64::try_from(count).ok(),
        Some(count) => {
            problems.push(
                format!("{tool_at}.max_calls"),
                invalid(
                    &count.to_string(),
                    "call count",
                    "a whole number of at least 1",
                ),
            );
            None
        }
    };
    let allow_broad = super::reasoned_exception(raw_tool.allow_broad, tool_at, problems);
    Some(ToolRule {
        kind,
        index,
        name: super::Glob::new(name),
        arguments,
        required,
        forbidden,
        approval,
        max_calls,
        allow_broad,
    })
}

/// `"exact"`, `"{param}"`, `{ one_of = […] }`, `{ pattern = "…" }`, or `{ min = …, max = … }`.
fn build_argument_rule(
    raw: RawArgumentRule,
    key: &str,
    params: &BTreeMap<String, ParamRule>,
    problems: &mut Problems,
) -> Option<ArgumentRule> {
    match raw {
        RawArgumentRule::Text(text) => {
            super::gateway::build_value_rule(RawValueRule::Text(text), key, params, problems)
                .map(ArgumentRule::Value)
        }
        RawArgumentRule::Table(RawArgumentTable {
            one_of: None,
            pattern: None,
            min,
            max,
        }) if min.is_some() || max.is_some() => {
            if let (Some(min), Some(max)) = (min, max)
                && min > max
            {
                problems.push(
                    key.to_string(),
                    invalid(
                        &format!("min = {min}, max = {max}"),
                        "bounds",
                        "min no greater than max",
                    ),
                );
                return None;
            }
            if min.is_some_and(|min| !min.is_finite()) || max.is_some_and(|max| !max.is_finite()) {
                problems.push(key.to_string(), invalid("…", "bounds", "finite numbers"));
                return None;
            }
            Some(ArgumentRule::Number { min, max })
        }
        RawArgumentRule::Table(RawArgumentTable {
            one_of,
            pattern,
            min: None,
            max: None,
        }) => super::gateway::build_value_rule(
            RawValueRule::Table(RawValueTable { one_of, pattern }),
            key,
            params,
            problems,
        )
        .map(ArgumentRule::Value),
        RawArgumentRule::Table(_) => {
            problems.push(
                key.to_string(),
                invalid(
                    "…",
                    "argument rule",
                    "\"exact value\", \"{param}\", { one_of = [\"a\", \"b\"] }, { pattern = \"[0-9]+\" } or { min = 1, max = 10 }",
                ),
            );
            None
        }
    }
}

fn is_tool_glob(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name.bytes().all(|byte| {
            byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'-' | b'.' | b'/' | b'*')
        })
}
