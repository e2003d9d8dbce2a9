//! Policy tests: cases written in TOML and run against a config, so "this agent can never delete
//! a volume without a person" is a test in CI. A case asks for a token (granted, needs approval,
//! refused), makes one gateway call (allow, needs approval, deny), or states who may reach an
//! environment at all. Token requests are decided by `policy::authorize`, calls by
//! [`super::explain_call`]: the code valetd and its gateway run.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

use crate::config::Config;
use crate::policy::{self, TokenRequest};

/// A file of cases.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseFile {
    /// The config the cases are about, relative to the case file (the command line may name
    /// another).
    pub config: Option<String>,
    #[serde(default, rename = "case")]
    pub cases: Vec<Case>,
}

/// One case. Exactly one of: `scope` without `call` (a token request), `scope` with `call` (a
/// gateway call on a grant of the scope), or `environment` (who may reach it).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    pub principal: Option<String>,
    pub scope: Option<String>,
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// `METHOD /path?query`.
    pub call: Option<String>,
    /// The call's body (JSON, sent as `application/json`).
    pub body: Option<String>,
    pub environment: Option<String>,
    /// With `environment`: the only principals that may request a scope of it.
    pub only: Option<Vec<String>>,
    /// `granted`, `needs_approval` or `refused` for a token request; `allow`, `needs_approval` or
    /// `deny` for a call; `needs_approval` for an environment (every scope of it needs a person
    /// before a token is issued).
    pub expect: Option<String>,
    /// Text the refusal must contain.
    pub reason_contains: Option<String>,
}

/// What a case found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub name: String,
    pub passed: bool,
    /// What happened, in words.
    pub detail: String,
}

/// Reads a case file.
pub fn parse(text: &str) -> Result<CaseFile, String> {
    toml::from_str(text).map_err(|error| format!("the case file is invalid: {error}"))
}

/// Runs every case against `config`.
pub fn run(config: &Config, file: &CaseFile) -> Vec<Outcome> {
    file.cases
        .iter()
        .map(|case| run_case(config, case))
        .collect()
}

fn run_case(config: &Config, case: &Case) -> Outcome {
    let outcome = |passed: bool, detail: String| Outcome {
        name: case.name.clone(),
        passed,
        detail,
    };
    match (&case.scope, &case.environment) {
        (Some(scope), None) => match &case.call {
            None => token_case(config, case, scope),
            Some(call) => call_case(config, case, scope, call),
        }
        .map_or_else(
            |error| outcome(false, error),
            |(passed, detail)| outcome(passed, detail),
        ),
        (None, Some(environment)) => {
            let (passed, detail) = environment_case(config, case, environment);
            outcome(passed, detail)
        }
        _ => outcome(
            false,
            "a case names a scope (with or without a call) or an environment, not both or neither"
                .to_string(),
        ),
    }
}

fn compare(case: &Case, got: &str, reason: &str) -> (bool, String) {
    let expected = case.expect.as_deref().unwrap_or_default();
    let reason_ok = case
        .reason_contains
        .as_deref()
        .is_none_or(|wanted| reason.contains(wanted));
    let passed = got == expected && reason_ok;
    let detail = if passed {
        format!(
            "{got}{}",
            if reason.is_empty() {
                String::new()
            } else {
                format!(": {reason}")
            }
        )
    } else if got != expected {
        format!(
            "expected {expected}, got {got}{}",
            if reason.is_empty() {
                String::new()
            } else {
                format!(": {reason}")
            }
        )
    } else {
        format!(
            "{got}, but the reason does not contain {:?}: {reason}",
            case.reason_contains.as_deref().unwrap_or_default()
        )
    };
    (passed, detail)
}

fn token_case(config: &Config, case: &Case, scope: &str) -> Result<(bool, String), String> {
    let name = case
        .principal
        .as_deref()
        .ok_or("a token case names its principal")?;
    let principal = config
        .principals
        .get(name)
        .ok_or_else(|| format!("principal {name:?} is not in the config"))?;
    let request = TokenRequest {
        scope: scope.to_string(),
        task_id: "policy-test".to_string(),
        purpose: String::new(),
        ttl: None,
        params: case.params.clone(),
        audience: None,
    };
    let (got, reason) = match policy::authorize(config, principal, &request) {
        Err(error) => ("refused", error.to_string()),
        Ok(_) => match config
            .scopes
            .get(scope)
            .and_then(|scope| scope.approval.as_ref())
        {
            Some(approval) => ("needs_approval", super::approval_words(approval)),
            None => ("granted", String::new()),
        },
    };
    Ok(compare(case, got, &reason))
}

fn call_case(
    config: &Config,
    case: &Case,
    scope_name: &str,
    call: &str,
) -> Result<(bool, String), String> {
    let scope = config
        .scopes
        .get(scope_name)
        .ok_or_else(|| format!("scope {scope_name:?} is not in the config"))?;
    if let Some(name) = &case.principal {
        let principal = config
            .principals
            .get(name)
            .ok_or_else(|| format!("principal {name:?} is not in the config"))?;
        if !principal.scopes.contains(scope_name) {
            return Ok(compare(
                case,
                "deny",
                &format!("principal {name:?} may not request scope {scope_name:?}"),
            ));
        }
    }
    let (method, target) = call
        .trim()
        .split_once(' ')
        .ok_or_else(|| format!("call {call:?} is not \"METHOD /path\""))?;
    let body = case.body.as_deref().unwrap_or_default().as_bytes();
    let content_type = (!body.is_empty()).then_some("application/json");
    let verdict = super::explain_call(
        scope,
        &case.params,
        method,
        target.trim(),
        content_type,
        body,
    );
    let (got, reason) = match verdict {
        super::CallVerdict::Allow { rule } => ("allow", rule),
        super::CallVerdict::NeedsApproval { rule, approval } => {
            ("needs_approval", format!("{rule}: {approval}"))
        }
        super::CallVerdict::Deny { reason } => ("deny", reason),
    };
    Ok(compare(case, got, &reason))
}

fn environment_case(config: &Config, case: &Case, environment: &str) -> (bool, String) {
    let reaching: BTreeMap<&str, Vec<&str>> = config
        .principals
        .values()
        .filter_map(|principal| {
            let scopes: Vec<&str> = principal
                .scopes
                .iter()
                .filter(|name| {
                    config
                        .scopes
                        .get(name.as_str())
                        .is_some_and(|scope| scope.environment == environment)
                })
                .map(String::as_str)
                .collect();
            (!scopes.is_empty()).then_some((principal.name.as_str(), scopes))
        })
        .collect();
    if let Some(only) = &case.only {
        let allowed: BTreeSet<&str> = only.iter().map(String::as_str).collect();
        let beyond: Vec<&str> = reaching
            .keys()
            .copied()
            .filter(|name| !allowed.contains(name))
            .collect();
        return if beyond.is_empty() {
            (
                true,
                format!(
                    "{environment} is reached by [{}] only",
                    reaching.keys().copied().collect::<Vec<_>>().join(", ")
                ),
            )
        } else {
            (
                false,
                format!("{environment} is also reached by [{}]", beyond.join(", ")),
            )
        };
    }
    match case.expect.as_deref() {
        Some("needs_approval") => {
            let unguarded: Vec<String> = reaching
                .iter()
                .flat_map(|(principal, scopes)| {
                    scopes
                        .iter()
                        .filter(|name| {
                            config
                                .scopes
                                .get(**name)
                                .is_some_and(|scope| scope.approval.is_none())
                        })
                        .map(move |name| format!("{principal} via {name}"))
                })
                .collect();
            if unguarded.is_empty() {
                (
                    true,
                    format!("every token for {environment} needs approval"),
                )
            } else {
                (
                    false,
                    format!(
                        "tokens for {environment} are issued without approval to [{}]",
                        unguarded.join(", ")
                    ),
                )
            }
        }
        other => (
            false,
            format!(
                "an environment case takes only = [...] or expect = \"needs_approval\", not {other:?}"
            ),
        ),
    }
}
