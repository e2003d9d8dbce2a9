//! IAM policy documents Valet writes: the session policy an `aws-sts` scope renders for one grant
//! (its `{param}` placeholders bound to the grant's values), and the inline role policy that
//! denies the sessions of revoked grants until they would have expired anyway.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use crate::UnixTime;
use crate::clock::format_time;
use crate::config::{AwsStsScope, ConditionValues};

/// STS refuses a session policy whose plain text is longer than this.
pub const MAX_SESSION_POLICY_CHARS: usize = 2_048;
/// IAM refuses inline role policies whose text adds up to more than this.
pub const MAX_ROLE_POLICY_CHARS: usize = 10_240;
/// How far AWS's clock may be from valetd's: denies last this much longer, and the fallback
/// denies sessions issued up to this much after valetd's now.
pub const CLOCK_SKEW_SECONDS: UnixTime = 60;
/// The inline role policy Valet owns on roles whose scopes use `revoke = "role-policy"`.
pub const REVOCATION_POLICY_NAME: &str = "valet-revoked-sessions";

const POLICY_VERSION: &str = "2012-10-17";
const UNTIL_PREFIX: &str = "ValetRevokedUntil";
const BEFORE_PREFIX: &str = "ValetRevokedBefore";
/// Revoked sessions are grouped by the hour after which none of them can still be in use.
const BUCKET_SECONDS: i64 = 3_600;

/// Characters a bound parameter value may not contain: IAM wildcards and policy variables would
/// widen the resource, quotes and backslashes would change the JSON.
const FORBIDDEN_IN_BOUND_VALUES: &[char] = &['*', '?', '$', '"', '\\', '{', '}'];

/// A policy string with `{param}` placeholders. `${aws:...}` IAM policy variables pass through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub source: String,
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param(String),
}

impl Template {
    /// Parses `text`; the error says which brace is unmatched or which name is not a param name.
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut segments = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            let is_policy_variable = rest[..open].ends_with('$');
            let Some(close) = rest[open..].find('}') else {
                return Err("has a '{' without a matching '}'".to_string());
            };
            let inner = &rest[open + 1..open + close];
            if is_policy_variable {
                literal.push_str(&rest[..open + close + 1]);
            } else {
                if !crate::config::is_valid_param_name(inner) {
                    return Err(format!(
                        "has placeholder {{{inner}}}; a placeholder names a scope param (a-z, 0-9, '_')"
                    ));
                }
                literal.push_str(&rest[..open]);
                if !literal.is_empty() {
                    segments.push(Segment::Literal(std::mem::take(&mut literal)));
                }
                segments.push(Segment::Param(inner.to_string()));
            }
            rest = &rest[open + close + 1..];
        }
        if rest.contains('}') {
            return Err("has a '}' without a matching '{'".to_string());
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            segments.push(Segment::Literal(literal));
        }
        Ok(Template {
            source: text.to_string(),
            segments,
        })
    }

    /// The params this template names, in order of appearance.
    pub fn params(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|segment| match segment {
            Segment::Param(name) => Some(name.as_str()),
            Segment::Literal(_) => None,
        })
    }

    fn render(&self, params: &BTreeMap<String, String>) -> Result<String, SessionPolicyError> {
        let mut out = String::new();
        for segment in &self.segments {
            match segment {
                Segment::Literal(text) => out.push_str(text),
                Segment::Param(name) => {
                    let value =
                        params
                            .get(name)
                            .ok_or_else(|| SessionPolicyError::MissingParam {
                                param: name.clone(),
                            })?;
                    if let Some(bad) = value
                        .chars()
                        .find(|c| FORBIDDEN_IN_BOUND_VALUES.contains(c) || c.is_control())
                    {
                        return Err(SessionPolicyError::UnsafeParamValue {
                            param: name.clone(),
                            character: bad,
                        });
                    }
                    out.push_str(value);
                }
            }
        }
        Ok(out)
    }
}

/// Why a session policy cannot be rendered for a grant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionPolicyError {
    #[error("param {param:?} is used in the scope's resources or conditions but was not given")]
    MissingParam { param: String },
    #[error(
        "param {param:?} contains {character:?}, which would widen the IAM policy; values bound into a policy may not contain * ? $ \" \\ {{ }} or control characters"
    )]
    UnsafeParamValue { param: String, character: char },
    #[error(
        "the session policy would be {length} characters; STS takes at most {MAX_SESSION_POLICY_CHARS}"
    )]
    TooLong { length: usize },
}

/// The session policy for one grant of an `aws-sts` scope: compact JSON, keys in a fixed order,
/// so the same scope and params always give the same text.
pub fn session_policy(
    scope: &AwsStsScope,
    params: &BTreeMap<String, String>,
) -> Result<String, SessionPolicyError> {
    let mut statement = Map::new();
    statement.insert("Effect".into(), json!("Allow"));
    statement.insert("Action".into(), json!(scope.actions));
    let resources = scope
        .resources
        .iter()
        .map(|template| template.render(params))
        .collect::<Result<Vec<_>, _>>()?;
    statement.insert("Resource".into(), json!(resources));
    if !scope.conditions.is_empty() {
        let mut conditions = Map::new();
        for (operator, keys) in &scope.conditions {
            let mut rendered = Map::new();
            for (key, values) in keys {
                let value = match values {
                    ConditionValues::One(template) => Value::String(template.render(params)?),
                    ConditionValues::Many(templates) => Value::Array(
                        templates
                            .iter()
                            .map(|template| template.render(params).map(Value::String))
                            .collect::<Result<_, _>>()?,
                    ),
                };
                rendered.insert(key.clone(), value);
            }
            conditions.insert(operator.clone(), Value::Object(rendered));
        }
        statement.insert("Condition".into(), Value::Object(conditions));
    }
    let document = json!({ "Version": POLICY_VERSION, "Statement": [statement] }).to_string();
    let length = document.chars().count();
    if length > MAX_SESSION_POLICY_CHARS {
        return Err(SessionPolicyError::TooLong { length });
    }
    Ok(document)
}

/// The `SourceIdentity` (and role session name) of a grant's sessions.
pub fn source_identity(grant_id: &str) -> String {
    format!("valet-{grant_id}")
}

/// The revocation policy after one more revoked session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationUpdate {
    pub document: String,
    /// Set when the sessions listed one by one no longer fit in IAM's limit, so every session of
    /// the role issued before this moment is denied instead (what the AWS console's "revoke active
    /// sessions" does). Other grants of the role then need a renewal for fresh credentials.
    pub denied_all_issued_before: Option<UnixTime>,
}

/// Adds the session `identity` (denied until `keep_until`) to the role policy `existing`
/// (Valet's own earlier text, or `None`), dropping entries past their time. Statements Valet did
/// not write are kept as they are.
pub fn add_revoked_session(
    existing: Option<&str>,
    identity: &str,
    keep_until: UnixTime,
    now: UnixTime,
    other_policies_chars: usize,
) -> Result<RevocationUpdate, String> {
    // IAM's limit counts every inline policy of the role together (whitespace aside).
    let room = MAX_ROLE_POLICY_CHARS.saturating_sub(other_policies_chars);
    let mut foreign = Vec::new();
    let mut by_identity: BTreeMap<UnixTime, Vec<String>> = BTreeMap::new();
    let mut issued_before: Option<(UnixTime, UnixTime)> = None;
    if let Some(text) = existing {
        let document: Value = serde_json::from_str(text).map_err(|error| {
            format!("the role policy {REVOCATION_POLICY_NAME} is not valid JSON: {error}")
        })?;
        let statements = match &document["Statement"] {
            Value::Array(statements) => statements.clone(),
            Value::Object(_) => vec![document["Statement"].clone()],
            _ => Vec::new(),
        };
        for statement in statements {
            let sid = statement["Sid"].as_str().unwrap_or_default();
            if let Some(until) = parse_until(sid.strip_prefix(UNTIL_PREFIX)) {
                if until > now {
                    let identities = statement["Condition"]["StringEquals"]["aws:SourceIdentity"]
                        .as_array()
                        .map(|values| {
                            values
                                .iter()
                                .filter_map(|value| value.as_str().map(str::to_string))
                                .collect::<Vec<_>>()
                        })
                        .unwrap_or_default();
                    by_identity.entry(until).or_default().extend(identities);
                }
            } else if let Some((before, until)) = sid
                .strip_prefix(BEFORE_PREFIX)
                .and_then(|rest| rest.split_once("Until"))
                .and_then(|(before, until)| Some((before.parse().ok()?, until.parse().ok()?)))
            {
                if until > now {
                    issued_before = Some((before, until));
                }
            } else {
                foreign.push(statement);
            }
        }
    }
    // AWS's clock and ours may differ: a deny lasts a little past the last session.
    let bucket = ceil_to_bucket(keep_until + CLOCK_SKEW_SECONDS);
    let identities = by_identity.entry(bucket).or_default();
    if !identities.iter().any(|known| known == identity) {
        identities.push(identity.to_string());
    }
    let render = |by_identity: &BTreeMap<UnixTime, Vec<String>>,
                  issued_before: Option<(UnixTime, UnixTime)>| {
        let mut statements = foreign.clone();
        for (until, identities) in by_identity {
            statements.push(json!({
                "Sid": format!("{UNTIL_PREFIX}{until}"),
                "Effect": "Deny",
                "Action": "*",
                "Resource": "*",
                "Condition": { "StringEquals": { "aws:SourceIdentity": identities } },
            }));
        }
        if let Some((before, until)) = issued_before {
            statements.push(json!({
                "Sid": format!("{BEFORE_PREFIX}{before}Until{until}"),
                "Effect": "Deny",
                "Action": "*",
                "Resource": "*",
                "Condition": { "DateLessThan": { "aws:TokenIssueTime": format_time(before) } },
            }));
        }
        json!({ "Version": POLICY_VERSION, "Statement": statements }).to_string()
    };
    let document = render(&by_identity, issued_before);
    if document.chars().count() <= room {
        return Ok(RevocationUpdate {
            document,
            denied_all_issued_before: None,
        });
    }
    // Too many sessions to name: deny every session issued before now, for as long as the
    // longest-lived of them could last, and start the list afresh.
    let until = by_identity
        .keys()
        .copied()
        .chain(issued_before.map(|(_, until)| until))
        .max()
        .unwrap_or(bucket);
    // Issued before a moment a little ahead of ours: a session AWS stamped a moment later than
    // our clock reads is still covered.
    let before = now + CLOCK_SKEW_SECONDS;
    let document = render(&BTreeMap::new(), Some((before, until)));
    if document.chars().count() > room {
        return Err(format!(
            "the role's inline policies (the role policy {REVOCATION_POLICY_NAME}'s statements Valet did not write, and {other_policies_chars} characters of other inline policies) leave no room within IAM's {MAX_ROLE_POLICY_CHARS} characters per role"
        ));
    }
    Ok(RevocationUpdate {
        document,
        denied_all_issued_before: Some(before),
    })
}

fn parse_until(text: Option<&str>) -> Option<UnixTime> {
    text?.parse().ok()
}

fn ceil_to_bucket(at: UnixTime) -> UnixTime {
    at.div_euclid(BUCKET_SECONDS) * BUCKET_SECONDS
        + if at.rem_euclid(BUCKET_SECONDS) == 0 {
            0
        } else {
            BUCKET_SECONDS
        }
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
