//! Scope evaluation and access rules: who may ask for what, for how long, with which parameters,
//! and who may see or end which grants. Deny by default, and every denial says why.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::clock::{UnixTime, add_duration};
use crate::config::{Config, Principal, Role, Scope, format_duration};
use crate::grant::{Grant, GrantStatus};

/// Bounds on what a request may carry. Named in the errors that enforce them.
pub mod limits {
    pub const MAX_TASK_ID_BYTES: usize = 128;
    pub const MAX_PURPOSE_BYTES: usize = 1024;
    pub const MAX_REASON_BYTES: usize = 512;
    pub const MAX_PARAMS: usize = 32;
    pub const MAX_PARAM_NAME_BYTES: usize = 64;
    pub const MAX_PARAM_VALUE_BYTES: usize = 256;
    pub const MAX_SCOPE_NAME_BYTES: usize = 64;
    pub const MAX_GRANT_ID_BYTES: usize = 64;
}

/// What an agent asks for.
#[derive(Debug, Clone, Default)]
pub struct TokenRequest {
    pub scope: String,
    pub task_id: String,
    pub purpose: String,
    /// `None`: the scope's default.
    pub ttl: Option<Duration>,
    pub params: BTreeMap<String, String>,
    /// `None`: the scope's audience.
    pub audience: Option<String>,
}

/// Why a request is refused. `Invalid*` variants are the caller's malformed input; the others are
/// policy denials. Each names the rule and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("scope {scope:?} does not exist; scopes you may request: [{allowed}]")]
    UnknownScope { scope: String, allowed: String },
    #[error(
        "principal {principal:?} may not request scope {scope:?}; scopes it may request: [{allowed}]"
    )]
    ScopeNotAllowed {
        principal: String,
        scope: String,
        allowed: String,
    },
    #[error("ttl {asked} exceeds {cap_name} {cap}")]
    TtlAboveMax {
        asked: String,
        cap_name: String,
        cap: String,
    },
    #[error("scope {scope:?} requires parameter {param:?} ({allowed})")]
    ParamMissing {
        scope: String,
        param: String,
        allowed: String,
    },
    #[error("scope {scope:?} has no parameter {param:?}; its parameters: [{known}]")]
    ParamUnknown {
        scope: String,
        param: String,
        known: String,
    },
    #[error("scope {scope:?} refuses {param}={value:?}: the parameter must be {allowed}")]
    ParamNotAllowed {
        scope: String,
        param: String,
        value: String,
        allowed: String,
    },
    #[error("scope {scope:?} issues tokens for audience {allowed:?} only; asked for {asked:?}")]
    AudienceNotAllowed {
        scope: String,
        asked: String,
        allowed: String,
    },
    #[error("scope {scope:?} does not allow renewal")]
    RenewalNotAllowed { scope: String },
    #[error("{field} is {n_bytes} bytes; at most {max} are allowed")]
    FieldTooLong {
        field: String,
        n_bytes: usize,
        max: usize,
    },
    #[error("{field} is required")]
    FieldMissing { field: &'static str },
    #[error("{field} has {count} entries; at most {max} are allowed")]
    TooManyEntries {
        field: &'static str,
        count: usize,
        max: usize,
    },
    #[error("{field} {value:?} is not valid; allowed: {allowed}")]
    FieldInvalid {
        field: &'static str,
        value: String,
        allowed: &'static str,
    },
}

impl RequestError {
    /// Whether this is malformed input (as opposed to a policy denial of well-formed input).
    pub fn is_invalid_argument(&self) -> bool {
        matches!(
            self,
            RequestError::FieldTooLong { .. }
                | RequestError::FieldMissing { .. }
                | RequestError::TooManyEntries { .. }
                | RequestError::FieldInvalid { .. }
                | RequestError::TtlAboveMax { .. }
                | RequestError::ParamMissing { .. }
                | RequestError::ParamUnknown { .. }
        )
    }
}

/// The terms of a grant to be issued: everything resolved, every limit applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantTerms {
    pub scope: String,
    pub environment: String,
    pub audience: String,
    pub ttl: Duration,
    pub max_lifetime: Duration,
    pub max_uses: Option<u64>,
    pub params: BTreeMap<String, String>,
}

impl GrantTerms {
    /// The grant record these terms produce when issued at `now`.
    pub fn into_grant(
        self,
        id: String,
        principal: &str,
        request: &TokenRequest,
        key_id: &str,
        now: UnixTime,
    ) -> Grant {
        Grant {
            id,
            principal: principal.to_string(),
            task_id: request.task_id.clone(),
            purpose: request.purpose.clone(),
            scope: self.scope,
            environment: self.environment,
            audience: self.audience,
            params: self.params,
            issued_at: now,
            expires_at: add_duration(now, self.ttl),
            max_expires_at: add_duration(now, self.max_lifetime),
            uses: 0,
            max_uses: self.max_uses,
            status: GrantStatus::Active,
            status_reason: None,
            key_id: key_id.to_string(),
            updated_at: now,
            rule_calls: BTreeMap::new(),
            aws: None,
            authenticated_by: None,
            mac: None,
        }
    }
}

/// Decides a token request: returns the grant's terms, or the first rule that refuses it.
pub fn authorize(
    config: &Config,
    principal: &Principal,
    request: &TokenRequest,
) -> Result<GrantTerms, RequestError> {
    check_text("scope", &request.scope, limits::MAX_SCOPE_NAME_BYTES, true)?;
    check_task_id(&request.task_id)?;
    check_text(
        "purpose",
        &request.purpose,
        limits::MAX_PURPOSE_BYTES,
        false,
    )?;
    let allowed = principal
        .scopes
        .iter()
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    let Some(scope) = config.scopes.get(&request.scope) else {
        return Err(RequestError::UnknownScope {
            scope: request.scope.clone(),
            allowed,
        });
    };
    if !principal.scopes.contains(&scope.name) {
        return Err(RequestError::ScopeNotAllowed {
            principal: principal.name.clone(),
            scope: scope.name.clone(),
            allowed,
        });
    }
    if let Some(asked) = &request.audience
        && !asked.is_empty()
        && *asked != scope.audience
    {
        return Err(RequestError::AudienceNotAllowed {
            scope: scope.name.clone(),
            asked: asked.clone(),
            allowed: scope.audience.clone(),
        });
    }
    let ttl = resolve_ttl(config, scope, request.ttl)?;
    let params = check_params(scope, &request.params)?;
    Ok(GrantTerms {
        scope: scope.name.clone(),
        environment: scope.environment.clone(),
        audience: scope.audience.clone(),
        ttl,
        max_lifetime: scope.max_ttl.min(config.server.max_ttl),
        max_uses: scope.max_uses,
        params,
    })
}

/// The TTL a request gets: the asked one or the scope's default, refused (never clamped) above
/// the scope's or the server's cap.
pub fn resolve_ttl(
    config: &Config,
    scope: &Scope,
    asked: Option<Duration>,
) -> Result<Duration, RequestError> {
    let ttl = asked.unwrap_or(scope.default_ttl);
    if ttl.is_zero() {
        return Err(RequestError::FieldInvalid {
            field: "ttl",
            value: "0s".into(),
            allowed: "a positive duration",
        });
    }
    let (cap_name, cap) = if scope.max_ttl <= config.server.max_ttl {
        (format!("scope {:?} max_ttl", scope.name), scope.max_ttl)
    } else {
        ("server max_ttl".to_string(), config.server.max_ttl)
    };
    if ttl > cap {
        return Err(RequestError::TtlAboveMax {
            asked: format_duration(ttl),
            cap_name,
            cap: format_duration(cap),
        });
    }
    Ok(ttl)
}

/// Decides whether `principal` may renew `grant` under the current config, and for how long.
pub fn authorize_renewal(
    config: &Config,
    grant: &Grant,
    asked: Option<Duration>,
) -> Result<Duration, RequestError> {
    let scope = config
        .scopes
        .get(&grant.scope)
        .ok_or_else(|| RequestError::UnknownScope {
            scope: grant.scope.clone(),
            allowed: String::new(),
        })?;
    if !scope.renewable {
        return Err(RequestError::RenewalNotAllowed {
            scope: scope.name.clone(),
        });
    }
    resolve_ttl(config, scope, asked)
}

fn check_params(
    scope: &Scope,
    given: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, RequestError> {
    if given.len() > limits::MAX_PARAMS {
        return Err(RequestError::TooManyEntries {
            field: "params",
            count: given.len(),
            max: limits::MAX_PARAMS,
        });
    }
    for (name, value) in given {
        check_text("param name", name, limits::MAX_PARAM_NAME_BYTES, true)?;
        check_text(
            &format!("param {name:?}"),
            value,
            limits::MAX_PARAM_VALUE_BYTES,
            false,
        )?;
        if !scope.params.contains_key(name) {
            let known = scope.params.keys().cloned().collect::<Vec<_>>().join(", ");
            return Err(RequestError::ParamUnknown {
                scope: scope.name.clone(),
                param: name.clone(),
                known,
            });
        }
    }
    let mut resolved = BTreeMap::new();
    for (name, rule) in &scope.params {
        match given.get(name) {
            None if rule.required => {
                return Err(RequestError::ParamMissing {
                    scope: scope.name.clone(),
                    param: name.clone(),
                    allowed: rule.allowed.to_string(),
                });
            }
            None => {}
            Some(value) if !rule.allowed.permits(value) => {
                return Err(RequestError::ParamNotAllowed {
                    scope: scope.name.clone(),
                    param: name.clone(),
                    value: value.clone(),
                    allowed: rule.allowed.to_string(),
                });
            }
            Some(value) => {
                resolved.insert(name.clone(), value.clone());
            }
        }
    }
    Ok(resolved)
}

/// Task ids: printable, no spaces, bounded.
pub fn check_task_id(task_id: &str) -> Result<(), RequestError> {
    check_text("task_id", task_id, limits::MAX_TASK_ID_BYTES, true)?;
    if !task_id.bytes().all(|byte| byte.is_ascii_graphic()) {
        return Err(RequestError::FieldInvalid {
            field: "task_id",
            value: task_id.chars().take(limits::MAX_TASK_ID_BYTES).collect(),
            allowed: "printable ASCII without spaces",
        });
    }
    Ok(())
}

/// A revocation reason: required, bounded.
pub fn check_reason(reason: &str) -> Result<(), RequestError> {
    check_text("reason", reason, limits::MAX_REASON_BYTES, true)
}

/// Checks a free-text field's presence and size.
pub fn check_text(
    field: &str,
    value: &str,
    max: usize,
    required: bool,
) -> Result<(), RequestError> {
    if value.len() > max {
        return Err(RequestError::FieldTooLong {
            field: field.to_string(),
            n_bytes: value.len(),
            max,
        });
    }
    if required && value.is_empty() {
        return Err(RequestError::FieldMissing {
            field: static_field(field),
        });
    }
    // What an operator will read must read as it is: no control character, and none of the
    // characters that reorder or hide text (bidirectional overrides, zero-width characters).
    if value
        .chars()
        .any(|character| character != '\t' && crate::approval::is_disguising(character))
    {
        return Err(RequestError::FieldInvalid {
            field: static_field(field),
            value: crate::approval::escape_for_people(value),
            allowed: "text without control characters, bidirectional overrides or zero-width characters",
        });
    }
    Ok(())
}

fn static_field(field: &str) -> &'static str {
    match field {
        "scope" => "scope",
        "task_id" => "task_id",
        "purpose" => "purpose",
        "reason" => "reason",
        "param name" => "param name",
        "grant_id" => "grant_id",
        "token" => "token",
        _ => "param value",
    }
}

/// A principal lacking the role an action needs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    #[error("principal {principal:?} has roles [{has}]; {action} needs role {needed}")]
    RoleRequired {
        principal: String,
        has: String,
        action: &'static str,
        needed: Role,
    },
    #[error(
        "principal {principal:?} may act only on its own grants; grant {grant_id} belongs to another principal (operators may act on every grant)"
    )]
    NotOwnGrant { principal: String, grant_id: String },
    #[error("grant {grant_id} belongs to another principal; only the requester receives its token")]
    NotRequester { grant_id: String },
    #[error(
        "principal {principal:?} may look only at its own {what}; operators may look at every principal's"
    )]
    NotOwnRecord {
        principal: String,
        what: &'static str,
    },
}

/// Requires `role` (admins hold operator rights).
pub fn require_role(
    principal: &Principal,
    role: Role,
    action: &'static str,
) -> Result<(), AccessError> {
    if principal.has_role(role) {
        Ok(())
    } else {
        Err(AccessError::RoleRequired {
            principal: principal.name.clone(),
            has: principal
                .roles
                .iter()
                .map(|role| role.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            action,
            needed: role,
        })
    }
}

/// Operators act on every grant; anyone else only on their own.
pub fn may_act_on(principal: &Principal, grant: &Grant) -> Result<(), AccessError> {
    if principal.has_role(Role::Operator) || grant.principal == principal.name {
        Ok(())
    } else {
        Err(AccessError::NotOwnGrant {
            principal: principal.name.clone(),
            grant_id: grant.id.clone(),
        })
    }
}

/// Only the principal that asked for a grant ever receives a token for it.
pub fn may_receive_token(principal: &Principal, grant: &Grant) -> Result<(), AccessError> {
    if grant.principal == principal.name {
        Ok(())
    } else {
        Err(AccessError::NotRequester {
            grant_id: grant.id.clone(),
        })
    }
}

/// Which principal's records a listing shows. Operators see every principal's (or the one they
/// name); anyone else sees only their own, and naming another principal is refused.
pub fn visible_principal(
    principal: &Principal,
    asked: Option<&str>,
    what: &'static str,
) -> Result<Option<String>, AccessError> {
    if principal.has_role(Role::Operator) {
        return Ok(asked.map(str::to_string));
    }
    match asked {
        Some(name) if name != principal.name => Err(AccessError::NotOwnRecord {
            principal: principal.name.clone(),
            what,
        }),
        _ => Ok(Some(principal.name.clone())),
    }
}

/// Whether `principal` may see an approval request asked by `requester`.
pub fn may_see_approval(principal: &Principal, requester: &str) -> Result<(), AccessError> {
    visible_principal(principal, Some(requester), "approval requests").map(|_| ())
}

/// How long a pending grant lives once approved, as `authorize` would have decided it under the
/// config in force now: the TTL asked at request time (`ttl_seconds`, 0 for the scope's default)
/// capped by the scope's and the server's max TTL, and the grant's max lifetime. A scope that no
/// longer exists cannot be settled.
pub fn settlement_lifetime(
    config: &Config,
    scope_name: &str,
    ttl_seconds: u64,
) -> Result<(Duration, Duration), RequestError> {
    let scope = config
        .scopes
        .get(scope_name)
        .ok_or_else(|| RequestError::UnknownScope {
            scope: scope_name.to_string(),
            allowed: String::new(),
        })?;
    let max_lifetime = scope.max_ttl.min(config.server.max_ttl);
    let ttl = match ttl_seconds {
        0 => scope.default_ttl,
        seconds => Duration::from_secs(seconds),
    };
    Ok((ttl.min(max_lifetime), max_lifetime))
}

/// What a config reload means for a live (active or pending) grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveGrantDecision {
    Keep,
    /// The config no longer allows the grant at all; the reason starts `config reload: `.
    Revoke(String),
    /// A cap was lowered below the grant's lifetime: it ends no later than this.
    Clamp(UnixTime),
}

/// Re-decides a live grant under a reloaded config: revoked when its principal is gone or no
/// longer lists the scope, when the scope is gone or now names another environment or audience,
/// or when a parameter no longer passes its rule; clamped when the TTL caps were lowered below its
/// lifetime (counted from its issue, as `authorize` counts it).
pub fn redecide(config: &Config, grant: &Grant) -> LiveGrantDecision {
    let revoke = |why: String| LiveGrantDecision::Revoke(format!("config reload: {why}"));
    let Some(principal) = config.principals.get(&grant.principal) else {
        return revoke(format!("principal {:?} no longer exists", grant.principal));
    };
    if !principal.scopes.contains(&grant.scope) {
        return revoke(format!(
            "principal {:?} may no longer request scope {:?}",
            grant.principal, grant.scope
        ));
    }
    let Some(scope) = config.scopes.get(&grant.scope) else {
        return revoke(format!("scope {:?} no longer exists", grant.scope));
    };
    if scope.environment != grant.environment {
        return revoke(format!(
            "scope {:?} is now for environment {:?}, and the grant was for {:?}",
            scope.name, scope.environment, grant.environment
        ));
    }
    if scope.audience != grant.audience {
        return revoke(format!(
            "scope {:?} is now for audience {:?}, and the grant was for {:?}",
            scope.name, scope.audience, grant.audience
        ));
    }
    if let Err(error) = check_params(scope, &grant.params) {
        return revoke(error.to_string());
    }
    if grant.status == GrantStatus::Pending {
        // Its lifetime is the approval's timeout; the caps apply when it is approved.
        return LiveGrantDecision::Keep;
    }
    let latest = add_duration(grant.issued_at, scope.max_ttl.min(config.server.max_ttl));
    if grant.expires_at > latest || grant.max_expires_at > latest {
        return LiveGrantDecision::Clamp(latest);
    }
    LiveGrantDecision::Keep
}

#[cfg(test)]
mod tests;
