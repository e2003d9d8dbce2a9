//! AWS settings in the config: `[[credential]] kind = "aws"` and scopes with
//! `provider = "aws-sts"`, checked down to whether the session policy they render fits in STS.

use std::collections::BTreeMap;
use std::time::Duration;

use regex::Regex;

use super::raw::{RawConditionValues, RawCredential, RawScope};
use super::{AllowedValues, Credential, ParamRule, ProblemKind, Problems, invalid, refuse_keys};
use crate::aws::policy::{MAX_SESSION_POLICY_CHARS, Template};
use crate::aws::{MAX_SESSION_SECONDS, session_policy};

/// An IAM user's (or role's) long-lived access key, which valetd uses to call STS and IAM.
/// The secret access key comes from the credential's `env` or `file`, like any root credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsCredential {
    /// Filled in from `access_key_id_env` when the config is loaded.
    pub access_key_id: String,
    pub access_key_id_env: Option<String>,
    pub region: String,
    /// Where STS and IAM are called instead of AWS's public endpoints (a local peer, a VPC
    /// endpoint, a proxy).
    pub endpoint: Option<String>,
}

/// What a scope with `provider = "aws-sts"` grants: one role, narrowed by a session policy.
#[derive(Debug, Clone)]
pub struct AwsStsScope {
    pub role_arn: String,
    pub actions: Vec<String>,
    pub resources: Vec<Template>,
    /// operator → condition key → values, as in an IAM policy's `Condition` block.
    pub conditions: BTreeMap<String, BTreeMap<String, ConditionValues>>,
    pub revoke: AwsRevoke,
}

#[derive(Debug, Clone)]
pub enum ConditionValues {
    One(Template),
    Many(Vec<Template>),
}

/// What revoking a grant of the scope does at AWS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AwsRevoke {
    /// Nothing: the credentials work until they expire (STS cannot end one session).
    AtExpiry,
    /// An inline deny on the role for the revoked session's `aws:SourceIdentity`.
    RolePolicy,
}

impl AwsRevoke {
    pub fn as_str(self) -> &'static str {
        match self {
            AwsRevoke::AtExpiry => "expiry",
            AwsRevoke::RolePolicy => "role-policy",
        }
    }
}

const AWS_KEYS_RULE: &str = "only in a credential with kind = \"aws\"";

/// The AWS part of a credential: `Some` for `kind = "aws"`. Reports keys that do not belong.
pub(super) fn build_credential(
    raw: &mut RawCredential,
    at: &str,
    problems: &mut Problems,
) -> Option<AwsCredential> {
    let kind = raw.kind.take().unwrap_or_else(|| "secret".to_string());
    match kind.as_str() {
        "secret" => {
            refuse_keys(
                [
                    ("access_key_id", raw.access_key_id.is_some()),
                    ("access_key_id_env", raw.access_key_id_env.is_some()),
                    ("region", raw.region.is_some()),
                    ("endpoint", raw.endpoint.is_some()),
                ],
                (at, "key for this credential", AWS_KEYS_RULE),
                problems,
            );
            None
        }
        "aws" => {
            let region = problems
                .required(raw.region.take(), &format!("{at}.region"))
                .and_then(|region| {
                    if Regex::new(r"^[a-z]{2}(-[a-z]+)+-[0-9]{1,2}$")
                        .is_ok_and(|rule| rule.is_match(&region))
                    {
                        Some(region)
                    } else {
                        problems.push(
                            format!("{at}.region"),
                            invalid(&region, "AWS region", "a region name such as \"eu-west-1\""),
                        );
                        None
                    }
                });
            let (access_key_id, access_key_id_env) =
                match (raw.access_key_id.take(), raw.access_key_id_env.take()) {
                    (Some(_), Some(_)) => {
                        problems.push(
                            at,
                            ProblemKind::BothSet {
                                first: "access_key_id",
                                second: "access_key_id_env",
                            },
                        );
                        (None, None)
                    }
                    (None, None) => {
                        problems.push(
                            at,
                            ProblemKind::NeitherSet {
                                first: "access_key_id",
                                second: "access_key_id_env",
                            },
                        );
                        (None, None)
                    }
                    (Some(id), None) if !is_access_key_id(&id) => {
                        problems.push(
                        format!("{at}.access_key_id"),
                        invalid(
                            &id,
                            "AWS access key id",
                            "16 to 128 characters from A-Z and 0-9, such as AKIAIOSFODNN7EXAMPLE",
                        ),
                    );
                        (None, None)
                    }
                    (Some(id), None) => (Some(id), None),
                    (None, Some(name)) if !super::is_valid_env_name(&name) => {
                        problems.push(
                            format!("{at}.access_key_id_env"),
                            invalid(
                                &name,
                                "environment variable name",
                                "letters, digits and '_', not starting with a digit",
                            ),
                        );
                        (None, None)
                    }
                    (None, Some(name)) => (Some(String::new()), Some(name)),
                };
            let endpoint = raw.endpoint.take().and_then(|endpoint| {
                if is_endpoint(&endpoint) {
                    Some(endpoint.trim_end_matches('/').to_string())
                } else {
                    problems.push(
                        format!("{at}.endpoint"),
                        invalid(
                            &endpoint,
                            "endpoint",
                            "http:// or https:// with a host and an optional port, no path or query",
                        ),
                    );
                    None
                }
            });
            Some(AwsCredential {
                access_key_id: access_key_id?,
                access_key_id_env,
                region: region?,
                endpoint,
            })
        }
        other => {
            problems.push(
                format!("{at}.kind"),
                invalid(
                    other,
                    "credential kind",
                    "\"secret\" (the default) or \"aws\"",
                ),
            );
            None
        }
    }
}

/// Whether `text` has the shape of an AWS access key id.
pub fn is_access_key_id(text: &str) -> bool {
    (16..=128).contains(&text.len())
        && text
            .bytes()
            .all(|byte| byte.is_ascii_uppercase() || byte.is_ascii_digit())
}

fn is_endpoint(text: &str) -> bool {
    let Some(rest) = text
        .strip_prefix("http://")
        .or_else(|| text.strip_prefix("https://"))
    else {
        return false;
    };
    let authority = rest.trim_end_matches('/');
    !authority.is_empty()
        && authority.bytes().all(|byte| {
            byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'-' | b':' | b'[' | b']')
        })
}

/// The AWS part of a scope, for `provider = "aws-sts"`. Reports AWS keys in other scopes, and
/// scopes that would hand an AWS root key to anything but STS.
pub(super) fn build_scope(
    raw: &mut RawScope,
    at: &str,
    credential: Option<&Credential>,
    (params, has_upstream): (&BTreeMap<String, ParamRule>, bool),
    max_ttl: Option<Duration>,
    problems: &mut Problems,
) -> Option<AwsStsScope> {
    let provider = raw.provider.take().unwrap_or_else(|| "valet".to_string());
    let credential_is_aws = credential.is_some_and(|credential| credential.aws.is_some());
    match provider.as_str() {
        "valet" => {
            refuse_keys(
                [
                    ("role_arn", raw.role_arn.is_some()),
                    ("actions", raw.actions.is_some()),
                    ("resources", raw.resources.is_some()),
                    ("conditions", raw.conditions.is_some()),
                    ("revoke", raw.revoke.is_some()),
                ],
                (
                    at,
                    "key for this scope",
                    "only in a scope with provider = \"aws-sts\"",
                ),
                problems,
            );
            if let Some(credential) = credential.filter(|_| credential_is_aws) {
                problems.push(
                    format!("{at}.credential"),
                    invalid(
                        &credential.name,
                        "credential for this scope",
                        "a credential of kind \"secret\"; an AWS key is only ever used to mint STS credentials (set provider = \"aws-sts\")",
                    ),
                );
            }
            None
        }
        "aws-sts" => build_sts_scope(
            raw,
            at,
            (credential, credential_is_aws),
            (params, has_upstream),
            max_ttl,
            problems,
        ),
        other => {
            problems.push(
                format!("{at}.provider"),
                invalid(other, "provider", "\"valet\" (the default) or \"aws-sts\""),
            );
            None
        }
    }
}

fn build_sts_scope(
    raw: &mut RawScope,
    at: &str,
    (credential, credential_is_aws): (Option<&Credential>, bool),
    (params, has_upstream): (&BTreeMap<String, ParamRule>, bool),
    max_ttl: Option<Duration>,
    problems: &mut Problems,
) -> Option<AwsStsScope> {
    if let Some(credential) = credential.filter(|_| !credential_is_aws) {
        problems.push(
            format!("{at}.credential"),
            invalid(
                &credential.name,
                "credential for an aws-sts scope",
                "a credential with kind = \"aws\"",
            ),
        );
    }
    if has_upstream {
        problems.push(
            format!("{at}.upstream"),
            invalid(
                "upstream",
                "key for this scope",
                "no upstream: an aws-sts scope hands out STS credentials, not gateway calls",
            ),
        );
    }
    if raw.max_uses.is_some() {
        problems.push(
            format!("{at}.max_uses"),
            invalid(
                "max_uses",
                "key for this scope",
                "no use limit: AWS does not count the uses of STS credentials (limit the time instead)",
            ),
        );
    }
    if let Some(max_ttl) = max_ttl
        && max_ttl.as_secs() > MAX_SESSION_SECONDS
    {
        problems.push(
            format!("{at}.max_ttl"),
            ProblemKind::DurationAboveCap {
                asked: super::format_duration(max_ttl),
                cap_key: "STS's longest role session".to_string(),
                cap: "12h".to_string(),
            },
        );
    }
    let role_arn = problems
        .required(raw.role_arn.take(), &format!("{at}.role_arn"))
        .and_then(|arn| {
            if Regex::new(r"^arn:aws(-us-gov|-cn)?:iam::[0-9]{12}:role/[A-Za-z0-9+=,.@_/-]{1,512}$")
                .is_ok_and(|rule| rule.is_match(&arn))
            {
                Some(arn)
            } else {
                problems.push(
                    format!("{at}.role_arn"),
                    invalid(
                        &arn,
                        "role ARN",
                        "arn:aws:iam::ACCOUNT:role/NAME (12-digit account id)",
                    ),
                );
                None
            }
        });
    let action_rule = Regex::new(r"^(\*|[a-z0-9-]+:[A-Za-z0-9*?]+)$").ok()?;
    let actions = non_empty(raw.actions.take(), &format!("{at}.actions"), problems);
    for (index, action) in actions.iter().enumerate() {
        if !action_rule.is_match(action) {
            problems.push(
                format!("{at}.actions[{index}]"),
                invalid(
                    action,
                    "IAM action",
                    "SERVICE:ACTION, wildcards * and ? allowed, such as \"s3:GetObject\" or \"s3:List*\"",
                ),
            );
        }
    }
    let mut used_params = Vec::new();
    let mut template = |text: &str,
                        key_path: String,
                        problems: &mut Problems|
     -> Option<Template> {
        match Template::parse(text) {
            Ok(template) => {
                for name in template.params() {
                    match params.get(name) {
                        None => problems.push(
                            key_path.clone(),
                            invalid(
                                text,
                                "policy value",
                                &format!("placeholders naming params of this scope; {{{name}}} is not one"),
                            ),
                        ),
                        Some(rule) if !rule.required => problems.push(
                            key_path.clone(),
                            invalid(
                                text,
                                "policy value",
                                &format!("placeholders naming required params; {{{name}}} is optional (set required = true)"),
                            ),
                        ),
                        Some(_) => used_params.push(name.to_string()),
                    }
                }
                Some(template)
            }
            Err(why) => {
                problems.push(
                    key_path,
                    invalid(
                        text,
                        "policy value",
                        &format!("text with {{param}} placeholders, but it {why}"),
                    ),
                );
                None
            }
        }
    };
    let mut resources = Vec::new();
    for (index, text) in non_empty(raw.resources.take(), &format!("{at}.resources"), problems)
        .iter()
        .enumerate()
    {
        let key_path = format!("{at}.resources[{index}]");
        if text != "*" && !(text.starts_with("arn:") && text.matches(':').count() >= 5) {
            problems.push(
                key_path,
                invalid(
                    text,
                    "resource",
                    "\"*\" or an ARN (arn:PARTITION:SERVICE:REGION:ACCOUNT:RESOURCE), {param} placeholders allowed",
                ),
            );
            continue;
        }
        if let Some(template) = template(text, key_path, problems) {
            resources.push(template);
        }
    }
    let operator_rule = Regex::new(r"^((ForAllValues|ForAnyValue):)?[A-Za-z]+$").ok()?;
    let key_rule = Regex::new(r"^[A-Za-z0-9][A-Za-z0-9:/_.-]*$").ok()?;
    let mut conditions = BTreeMap::new();
    for (operator, keys) in raw.conditions.take().unwrap_or_default() {
        let operator_at = format!("{at}.conditions.{operator}");
        if !operator_rule.is_match(&operator) {
            problems.push(
                operator_at.clone(),
                invalid(
                    &operator,
                    "condition operator",
                    "an IAM condition operator such as StringEquals or ForAnyValue:StringLike",
                ),
            );
        }
        let mut rendered = BTreeMap::new();
        for (key, values) in keys {
            let key_at = format!("{operator_at}.\"{key}\"");
            if !key_rule.is_match(&key) {
                problems.push(
                    key_at.clone(),
                    invalid(
                        &key,
                        "condition key",
                        "an IAM condition key such as aws:RequestedRegion or s3:prefix",
                    ),
                );
            }
            let values = match values {
                RawConditionValues::One(text) => {
                    template(&text, key_at, problems).map(ConditionValues::One)
                }
                RawConditionValues::Many(texts) => texts
                    .iter()
                    .enumerate()
                    .map(|(index, text)| template(text, format!("{key_at}[{index}]"), problems))
                    .collect::<Option<Vec<_>>>()
                    .map(ConditionValues::Many),
            };
            if let Some(values) = values {
                rendered.insert(key, values);
            }
        }
        conditions.insert(operator, rendered);
    }
    let revoke = match raw.revoke.take().as_deref() {
        None | Some("expiry") => Some(AwsRevoke::AtExpiry),
        Some("role-policy") => Some(AwsRevoke::RolePolicy),
        Some(other) => {
            problems.push(
                format!("{at}.revoke"),
                invalid(
                    other,
                    "revocation",
                    "\"expiry\" (the default) or \"role-policy\"",
                ),
            );
            None
        }
    };
    let scope = AwsStsScope {
        role_arn: role_arn?,
        actions,
        resources,
        conditions,
        revoke: revoke?,
    };
    check_fits(&scope, at, params, &used_params, problems);
    Some(scope)
}

/// Renders the session policy with every param at its longest and reports when STS would
/// refuse it, so an oversized scope fails at config check rather than at a request.
fn check_fits(
    scope: &AwsStsScope,
    at: &str,
    params: &BTreeMap<String, ParamRule>,
    used: &[String],
    problems: &mut Problems,
) {
    let mut longest = BTreeMap::new();
    for name in used {
        let Some(rule) = params.get(name) else {
            continue;
        };
        let length = match &rule.allowed {
            AllowedValues::OneOf(values) => values.iter().map(String::len).max(),
            AllowedValues::Pattern { source, .. } => {
                regex_syntax::parse(&format!("^(?:{source})$"))
                    .ok()
                    .and_then(|hir| hir.properties().maximum_len())
            }
        };
        match length {
            Some(length) => {
                longest.insert(name.clone(), "x".repeat(length));
            }
            None => {
                problems.push(
                    format!("{at}.params.{name}.pattern"),
                    invalid(
                        &rule.allowed.to_string(),
                        "pattern for a param bound into an AWS policy",
                        "a pattern with a length bound, such as [a-z0-9-]{1,40}, so the session policy can be checked to fit STS's limit",
                    ),
                );
                return;
            }
        }
    }
    if let Err(crate::aws::SessionPolicyError::TooLong { length }) = session_policy(scope, &longest)
    {
        problems.push(
            format!("{at}.resources"),
            invalid(
                &format!("{length} characters"),
                "session policy size",
                &format!(
                    "at most {MAX_SESSION_POLICY_CHARS} characters with every param at its longest (STS's limit): list fewer actions or resources, or bound the params tighter"
                ),
            ),
        );
    }
}

fn non_empty(values: Option<Vec<String>>, key_path: &str, problems: &mut Problems) -> Vec<String> {
    match values {
        None => {
            problems.push(key_path, ProblemKind::Missing);
            Vec::new()
        }
        Some(values) if values.is_empty() => {
            problems.push(key_path, invalid("[]", "list", "at least one entry"));
            Vec::new()
        }
        Some(values) => values,
    }
}
