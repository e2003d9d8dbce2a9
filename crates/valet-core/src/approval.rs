//! Human approval: a pending request for a token (scope level) or for one exact gateway call, the
//! rules for who may decide it (never the requester, never an agent, N distinct approvers, the
//! confirmation value typed), and its life: pending → approved → consumed, or denied, or expired.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::{UnixTime, add_duration, format_time};
use crate::config::{Principal, Role};

/// Who may approve, how many, how long, and what they must type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalPolicy {
    /// Empty: any operator or admin.
    pub approvers: Vec<Approver>,
    pub count: u32,
    pub timeout: Duration,
    pub confirm: Option<Confirm>,
}

pub const DEFAULT_APPROVAL_TIMEOUT: Duration = Duration::from_secs(15 * 60);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Approver {
    Principal(String),
    Role(Role),
}

impl fmt::Display for Approver {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Approver::Principal(name) => formatter.write_str(name),
            Approver::Role(role) => write!(formatter, "role:{role}"),
        }
    }
}

impl Approver {
    /// Parses `NAME` or `role:ROLE`.
    pub fn parse(text: &str) -> Option<Approver> {
        match text.strip_prefix("role:") {
            Some(role) => Role::ALL
                .into_iter()
                .find(|candidate| candidate.as_str() == role)
                .map(Approver::Role),
            None => {
                crate::config::is_valid_name(text).then(|| Approver::Principal(text.to_string()))
            }
        }
    }
}

/// What the approver must type to approve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confirm {
    Environment,
    Param(String),
}

impl fmt::Display for Confirm {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Confirm::Environment => formatter.write_str("environment"),
            Confirm::Param(name) => write!(formatter, "param {name}"),
        }
    }
}

/// What is being approved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalKind {
    /// A token for a scope that needs approval: the grant becomes active on approval.
    Token,
    /// One exact call through the gateway.
    Call,
}

/// The identity of one gateway call — its canonical call: method, target, content type and body
/// as the upstream receives them — and the whole of it as a person reads it. Any difference
/// makes it a different call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallFingerprint {
    pub method: String,
    /// Path and query as forwarded (canonical).
    pub target: String,
    /// The Content-Type the upstream receives (the gateway's own), empty without a body.
    #[serde(default)]
    pub content_type: String,
    /// SHA-256 of the body the upstream receives.
    pub body_sha256: String,
    /// GraphQL fields asked for (`mutation volumeDelete`), for one-line summaries.
    #[serde(default)]
    pub graphql: Vec<String>,
    /// The upstream the call goes to.
    #[serde(default)]
    pub upstream: String,
    /// GraphQL: every top-level field as it will execute (alias, name, every argument with its
    /// variables substituted), one per entry.
    #[serde(default)]
    pub calls: Vec<String>,
    /// The size of the body the upstream receives.
    #[serde(default)]
    pub body_bytes: u64,
    /// The body as a person reads it, whole (pretty JSON, form pairs, text; for GraphQL the
    /// printed document and its variables), already escaped for people; empty without a body.
    #[serde(default)]
    pub rendering: String,
    /// The request headers the upstream receives from the agent (lowercased names).
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// The rule that asked for the approval (`allow[1] POST /volumes/delete`): only that rule's
    /// calls can use it.
    #[serde(default)]
    pub rule: String,
}

impl CallFingerprint {
    /// Whether `other` is the same call, under the same rule: method, target, headers, content
    /// type and body.
    pub fn same_call(&self, other: &CallFingerprint) -> bool {
        self.method == other.method
            && self.target == other.target
            && self.headers == other.headers
            && self.content_type == other.content_type
            && self.body_sha256 == other.body_sha256
            && self.rule == other.rule
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalStatus {
    Pending,
    Approved,
    Denied,
    Expired,
    /// A call approval that has been used (once).
    Consumed,
}

impl fmt::Display for ApprovalStatus {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            ApprovalStatus::Pending => "pending",
            ApprovalStatus::Approved => "approved",
            ApprovalStatus::Denied => "denied",
            ApprovalStatus::Expired => "expired",
            ApprovalStatus::Consumed => "consumed",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub by: String,
    pub at: UnixTime,
    pub reason: String,
}

/// A request waiting for (or decided by) people. Holds no secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalRequest {
    pub id: String,
    pub kind: ApprovalKind,
    pub grant_id: String,
    pub requester: String,
    pub scope: String,
    pub environment: String,
    pub task_id: String,
    pub purpose: String,
    pub params: BTreeMap<String, String>,
    /// For token approvals: the lifetime asked for, in seconds (0: the scope's default).
    #[serde(default)]
    pub ttl_seconds: u64,
    pub call: Option<CallFingerprint>,
    pub created_at: UnixTime,
    /// Pending requests time out (and count as denied) at this moment; approved call approvals
    /// may be used until it.
    pub expires_at: UnixTime,
    pub required: u32,
    /// `NAME` or `role:ROLE`; empty means any operator or admin.
    pub approvers: Vec<String>,
    /// What the approver must type, and its expected value.
    pub confirm: Option<(String, String)>,
    pub approvals: Vec<Decision>,
    pub status: ApprovalStatus,
    pub status_reason: Option<String>,
    pub updated_at: UnixTime,
    /// A MAC over every other field under a key derived from the key-encryption key, set when
    /// the record is written and checked when it is read: a request marked approved in the store
    /// by someone without the key releases nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// Why a decision on an approval is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApprovalError {
    #[error(
        "approval {id} is for grant {grant_id}, which is {status}{reason}: nothing can be approved for it"
    )]
    GrantEnded {
        id: String,
        grant_id: String,
        status: crate::grant::GrantStatus,
        reason: String,
    },
    #[error("approval {id} is {status}; only pending requests can be decided")]
    NotPending { id: String, status: ApprovalStatus },
    #[error(
        "principal {principal:?} asked for approval {id} and cannot approve it: no self-approval"
    )]
    SelfApproval { id: String, principal: String },
    #[error("principal {principal:?} is an agent; agents never approve")]
    AgentCannotApprove { principal: String },
    #[error("principal {principal:?} may not decide approval {id}; its approvers: [{approvers}]")]
    NotAnApprover {
        id: String,
        principal: String,
        approvers: String,
    },
    #[error(
        "principal {principal:?} has already approved {id}; it needs {required} distinct approvers"
    )]
    AlreadyApproved {
        id: String,
        principal: String,
        required: u32,
    },
    #[error("approval {id} needs the {what} typed to confirm; {given}")]
    WrongConfirmation {
        id: String,
        what: String,
        given: String,
    },
    #[error("a reason is required to deny approval {id}")]
    ReasonRequired { id: String },
    #[error("approval {id} is {status}: {detail}")]
    NotUsable {
        id: String,
        status: ApprovalStatus,
        detail: String,
    },
    #[error(
        "approval {id} was given for a different request: {difference}; an approval covers exactly one request"
    )]
    DifferentRequest { id: String, difference: String },
}

impl ApprovalRequest {
    /// The status as of `now`: a pending request past its expiry has timed out.
    pub fn status_at(&self, now: UnixTime) -> ApprovalStatus {
        match self.status {
            ApprovalStatus::Pending | ApprovalStatus::Approved if now >= self.expires_at => {
                ApprovalStatus::Expired
            }
            status => status,
        }
    }

    /// The record after `approver` approves; `Approved` once `required` distinct approvers have.
    pub fn approved_by(
        &self,
        approver: &Principal,
        confirmation: Option<&str>,
        reason: &str,
        now: UnixTime,
    ) -> Result<ApprovalRequest, ApprovalError> {
        self.check_decider(approver, now)?;
        if self
            .approvals
            .iter()
            .any(|decision| decision.by == approver.name)
        {
            return Err(ApprovalError::AlreadyApproved {
                id: self.id.clone(),
                principal: approver.name.clone(),
                required: self.required,
            });
        }
        if let Some((what, expected)) = &self.confirm
            && confirmation != Some(expected.as_str())
        {
            return Err(ApprovalError::WrongConfirmation {
                id: self.id.clone(),
                what: what.clone(),
                given: match confirmation {
                    None => "none was given (valet approve ID --confirm VALUE)".to_string(),
                    Some(_) => "the value given does not match".to_string(),
                },
            });
        }
        let mut next = self.clone();
        next.approvals.push(Decision {
            by: approver.name.clone(),
            at: now,
            reason: reason.to_string(),
        });
        next.updated_at = now;
        if next.approvals.len() as u32 >= self.required {
            next.status = ApprovalStatus::Approved;
            let names: Vec<&str> = next
                .approvals
                .iter()
                .map(|decision| decision.by.as_str())
                .collect();
            next.status_reason = Some(format!("approved by {}", names.join(", ")));
        }
        Ok(next)
    }

    /// The record after `approver` denies it, with a reason.
    pub fn denied_by(
        &self,
        approver: &Principal,
        reason: &str,
        now: UnixTime,
    ) -> Result<ApprovalRequest, ApprovalError> {
        self.check_decider(approver, now)?;
        if reason.trim().is_empty() {
            return Err(ApprovalError::ReasonRequired {
                id: self.id.clone(),
            });
        }
        Ok(ApprovalRequest {
            status: ApprovalStatus::Denied,
            status_reason: Some(format!("denied by {}: {reason}", approver.name)),
            updated_at: now,
            ..self.clone()
        })
    }

    /// The record after it timed out.
    pub fn timed_out(&self, now: UnixTime) -> Option<ApprovalRequest> {
        (self.status == ApprovalStatus::Pending && now >= self.expires_at).then(|| {
            ApprovalRequest {
                status: ApprovalStatus::Expired,
                status_reason: Some(format!(
                    "timed out at {} without {} approval(s): denied",
                    format_time(self.expires_at),
                    self.required
                )),
                updated_at: now,
                ..self.clone()
            }
        })
    }

    /// The record after the approved call `call` of grant `grant_id` used it — once.
    pub fn consumed_by(
        &self,
        grant_id: &str,
        call: &CallFingerprint,
        now: UnixTime,
    ) -> Result<ApprovalRequest, ApprovalError> {
        let status = self.status_at(now);
        if status != ApprovalStatus::Approved {
            let detail = match status {
                ApprovalStatus::Pending => "it is still waiting for approval".to_string(),
                ApprovalStatus::Consumed => {
                    "it was already used once: approvals cannot be replayed".to_string()
                }
                _ => self
                    .status_reason
                    .clone()
                    .unwrap_or_else(|| "it cannot be used".to_string()),
            };
            return Err(ApprovalError::NotUsable {
                id: self.id.clone(),
                status,
                detail,
            });
        }
        let difference = match &self.call {
            _ if self.grant_id != grant_id => Some("another grant".to_string()),
            None => Some("it approves a token, not a call".to_string()),
            Some(approved) if approved.method != call.method => Some(format!(
                "method {} instead of {}",
                call.method, approved.method
            )),
            Some(approved) if approved.target != call.target => Some(format!(
                "target {} instead of {}",
                call.target, approved.target
            )),
            Some(approved) if approved.rule != call.rule => Some(format!(
                "the call falls under {} and the approval was given for {}",
                call.rule, approved.rule
            )),
            Some(approved) if approved.headers != call.headers => Some(format!(
                "headers [{}] instead of [{}]",
                header_list(&call.headers),
                header_list(&approved.headers)
            )),
            Some(approved) if approved.content_type != call.content_type => Some(format!(
                "Content-Type {} instead of {}",
                or_none(&call.content_type),
                or_none(&approved.content_type)
            )),
            Some(approved) if approved.body_sha256 != call.body_sha256 => {
                Some("a different body (document or variables)".to_string())
            }
            Some(_) => None,
        };
        if let Some(difference) = difference {
            return Err(ApprovalError::DifferentRequest {
                id: self.id.clone(),
                difference,
            });
        }
        Ok(ApprovalRequest {
            status: ApprovalStatus::Consumed,
            status_reason: Some("used once".to_string()),
            updated_at: now,
            ..self.clone()
        })
    }

    fn check_decider(&self, approver: &Principal, now: UnixTime) -> Result<(), ApprovalError> {
        let status = self.status_at(now);
        if status != ApprovalStatus::Pending {
            return Err(ApprovalError::NotPending {
                id: self.id.clone(),
                status,
            });
        }
        if approver.name == self.requester {
            return Err(ApprovalError::SelfApproval {
                id: self.id.clone(),
                principal: approver.name.clone(),
            });
        }
        if !approver.has_role(Role::Operator) {
            return Err(ApprovalError::AgentCannotApprove {
                principal: approver.name.clone(),
            });
        }
        let listed = self
            .approvers
            .iter()
            .filter_map(|text| Approver::parse(text))
            .any(|listed| match listed {
                Approver::Principal(name) => name == approver.name,
                Approver::Role(role) => approver.has_role(role),
            });
        if !self.approvers.is_empty() && !listed {
            return Err(ApprovalError::NotAnApprover {
                id: self.id.clone(),
                principal: approver.name.clone(),
                approvers: self.approvers.join(", "),
            });
        }
        Ok(())
    }

    /// What a person is asked to approve, every part of it, for people to read: the call that
    /// will execute (method, upstream, path, query, body; for GraphQL every field as it will run)
    /// or the token asked for, with environment, requester, task and purpose. The CLI, the
    /// webhook and the console all show this text, and characters that could disguise it (control
    /// and bidirectional-override characters) are escaped.
    pub fn render(&self) -> String {
        let mut lines = Vec::new();
        match (&self.kind, &self.call) {
            (ApprovalKind::Call, Some(call)) => {
                lines.push(format!(
                    "{} asks to call {} (environment {}) with grant {}:",
                    self.requester, call.upstream, self.environment, self.grant_id
                ));
                lines.push(format!("  {} {}", call.method, call.target));
                for (name, value) in &call.headers {
                    lines.push(format!("  {name}: {value}"));
                }
                if !call.content_type.is_empty() {
                    lines.push(format!("  content-type: {}", call.content_type));
                }
                if !call.calls.is_empty() {
                    lines.push("  executes:".to_string());
                    for field in &call.calls {
                        lines.push(format!("    {field}"));
                    }
                }
                if call.body_bytes > 0 {
                    lines.push(format!(
                        "  body ({} bytes, sha256 {}):",
                        call.body_bytes, call.body_sha256
                    ));
                    for line in call.rendering.lines() {
                        lines.push(format!("    {line}"));
                    }
                }
            }
            _ => {
                lines.push(format!(
                    "{} asks for a token for scope {} (environment {}), for up to {}:",
                    self.requester,
                    self.scope,
                    self.environment,
                    if self.ttl_seconds == 0 {
                        "the scope's default lifetime".to_string()
                    } else {
                        format!("{} s", self.ttl_seconds)
                    }
                ));
                for (name, value) in &self.params {
                    lines.push(format!("  {name} = {value}"));
                }
            }
        }
        lines.push(format!("  task {}", self.task_id));
        if !self.purpose.is_empty() {
            lines.push(format!("  purpose: {}", self.purpose));
        }
        lines
            .iter()
            .map(|line| escape_for_people(line))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The record once the grant it is for ended (revoked, or removed by a config reload): a
    /// request still waiting, or approved but not yet used, can never release anything.
    pub fn withdrawn(&self, reason: &str, now: UnixTime) -> Option<ApprovalRequest> {
        matches!(
            self.status_at(now),
            ApprovalStatus::Pending | ApprovalStatus::Approved
        )
        .then(|| ApprovalRequest {
            status: ApprovalStatus::Denied,
            status_reason: Some(format!("withdrawn: {reason}")),
            updated_at: now,
            ..self.clone()
        })
    }

    /// Refuses a decision when the grant the request is for is no longer live (pending for a
    /// token request, active for a call).
    pub fn check_grant_live(
        &self,
        grant: &crate::grant::Grant,
        now: UnixTime,
    ) -> Result<(), ApprovalError> {
        use crate::grant::GrantStatus;
        let status = grant.status_at(now);
        let live = match self.kind {
            ApprovalKind::Token => status == GrantStatus::Pending,
            ApprovalKind::Call => status == GrantStatus::Active,
        };
        if live {
            return Ok(());
        }
        Err(ApprovalError::GrantEnded {
            id: self.id.clone(),
            grant_id: grant.id.clone(),
            status,
            reason: grant
                .status_reason
                .as_deref()
                .map(|reason| format!(" ({reason})"))
                .unwrap_or_default(),
        })
    }

    /// The command an approver runs to approve this request, with the value it asks to be typed
    /// (`valet approve ap_… --confirm staging`), so the requester can hand it on as it is.
    pub fn approve_command(&self) -> String {
        match &self.confirm {
            None => format!("valet approve {}", self.id),
            Some((_, expected)) => {
                format!(
                    "valet approve {} --confirm {}",
                    self.id,
                    shell_word(expected)
                )
            }
        }
    }

    /// One line for people: what is asked, by whom.
    pub fn summary(&self) -> String {
        match (&self.kind, &self.call) {
            (ApprovalKind::Call, Some(call)) => {
                let fields = if call.graphql.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", call.graphql.join(", "))
                };
                format!(
                    "{} asks to call {} {}{fields} with grant {} (scope {}, environment {})",
                    self.requester,
                    call.method,
                    call.target,
                    self.grant_id,
                    self.scope,
                    self.environment
                )
            }
            _ => format!(
                "{} asks for a token for scope {} (environment {}, task {})",
                self.requester, self.scope, self.environment, self.task_id
            ),
        }
    }
}

impl ApprovalRequest {
    /// The request for a pending grant of a scope that needs approval.
    pub fn for_token(
        id: crate::ids::ApprovalId,
        pending: &crate::grant::Grant,
        policy: &ApprovalPolicy,
        ttl_seconds: u64,
        now: UnixTime,
    ) -> ApprovalRequest {
        ApprovalRequest {
            ttl_seconds,
            ..ApprovalRequest::for_grant(
                id,
                ApprovalKind::Token,
                pending,
                &pending.environment,
                policy,
                None,
                now,
            )
        }
    }

    /// The request for one exact gateway call of an active grant. `environment` is the scope's
    /// environment as configured now.
    pub fn for_call(
        id: crate::ids::ApprovalId,
        grant: &crate::grant::Grant,
        environment: &str,
        policy: &ApprovalPolicy,
        call: CallFingerprint,
        now: UnixTime,
    ) -> ApprovalRequest {
        ApprovalRequest::for_grant(
            id,
            ApprovalKind::Call,
            grant,
            environment,
            policy,
            Some(call),
            now,
        )
    }

    fn for_grant(
        id: crate::ids::ApprovalId,
        kind: ApprovalKind,
        grant: &crate::grant::Grant,
        environment: &str,
        policy: &ApprovalPolicy,
        call: Option<CallFingerprint>,
        now: UnixTime,
    ) -> ApprovalRequest {
        ApprovalRequest {
            id: id.into_string(),
            kind,
            grant_id: grant.id.clone(),
            requester: grant.principal.clone(),
            scope: grant.scope.clone(),
            environment: environment.to_string(),
            task_id: grant.task_id.clone(),
            purpose: grant.purpose.clone(),
            params: grant.params.clone(),
            ttl_seconds: 0,
            call,
            created_at: now,
            expires_at: expiry(policy, now),
            required: policy.count,
            approvers: policy.approvers.iter().map(ToString::to_string).collect(),
            confirm: policy
                .confirm
                .as_ref()
                .map(|confirm| confirm.expected(environment, &grant.params)),
            approvals: Vec::new(),
            status: ApprovalStatus::Pending,
            status_reason: None,
            updated_at: now,
            mac: None,
        }
    }
}

/// The key approval records are authenticated with.
pub struct ApprovalKey(ring::hmac::Key);

impl ApprovalKey {
    pub fn from_seal_key(seal_key: &crate::keyring::SealKey) -> ApprovalKey {
        ApprovalKey(seal_key.derive_mac_key("valet approval records"))
    }

    /// `approval` with its MAC set, computed over every other field.
    pub fn sealed(&self, approval: &ApprovalRequest) -> ApprovalRequest {
        let mut sealed = ApprovalRequest {
            mac: None,
            ..approval.clone()
        };
        let input = serde_json::to_vec(&sealed).unwrap_or_default();
        sealed.mac = Some(hex::encode(ring::hmac::sign(&self.0, &input).as_ref()));
        sealed
    }

    /// Whether `approval` carries the MAC valetd writes.
    pub fn verifies(&self, approval: &ApprovalRequest) -> bool {
        let Some(tag) = approval
            .mac
            .as_deref()
            .and_then(|mac| hex::decode(mac).ok())
        else {
            return false;
        };
        let unsealed = ApprovalRequest {
            mac: None,
            ..approval.clone()
        };
        let input = serde_json::to_vec(&unsealed).unwrap_or_default();
        ring::hmac::verify(&self.0, &input, &tag).is_ok()
    }
}

impl Confirm {
    /// What the approver must type, and its expected value, for a grant in `environment` with
    /// `params`.
    pub fn expected(
        &self,
        environment: &str,
        params: &BTreeMap<String, String>,
    ) -> (String, String) {
        match self {
            Confirm::Environment => ("environment".to_string(), environment.to_string()),
            Confirm::Param(name) => (name.clone(), params.get(name).cloned().unwrap_or_default()),
        }
    }
}

/// `text` as one shell word: as it is when it holds only safe characters, else single-quoted.
fn shell_word(text: &str) -> String {
    if !text.is_empty()
        && text
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b"-_./:@=+".contains(&byte))
    {
        text.to_string()
    } else {
        format!("'{}'", escape_for_people(text).replace('\'', "'\\''"))
    }
}

/// Whether `character` could disguise what a text says: a control character, a bidirectional
/// override, embedding, isolate or mark, or a character with no width of its own (Unicode's
/// default-ignorable code points: zero-width spaces and joiners, soft hyphens, variation
/// selectors, tags, fillers).
pub fn is_disguising(character: char) -> bool {
    character.is_control()
        || matches!(
            character,
            '\u{00AD}'
                | '\u{034F}'
                | '\u{061C}'
                | '\u{115F}'..='\u{1160}'
                | '\u{17B4}'..='\u{17B5}'
                | '\u{180B}'..='\u{180F}'
                | '\u{200B}'..='\u{200F}'
                | '\u{2028}'..='\u{202E}'
                | '\u{2060}'..='\u{206F}'
                | '\u{3164}'
                | '\u{FE00}'..='\u{FE0F}'
                | '\u{FEFF}'
                | '\u{FFA0}'
                | '\u{FFF0}'..='\u{FFFB}'
                | '\u{1BCA0}'..='\u{1BCA3}'
                | '\u{1D173}'..='\u{1D17A}'
                | '\u{E0000}'..='\u{E0FFF}'
        )
}

/// `text` with every character that could disguise what it says ([`is_disguising`]) written as
/// `\u{XXXX}`: what every place an operator reads agent-supplied text shows (the CLI, the
/// console, the webhook).
pub fn escape_for_people(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for character in text.chars() {
        if is_disguising(character) {
            out.push_str(&format!("\\u{{{:04X}}}", u32::from(character)));
        } else {
            out.push(character);
        }
    }
    out
}

fn header_list(headers: &[(String, String)]) -> String {
    headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn or_none(text: &str) -> &str {
    if text.is_empty() { "(none)" } else { text }
}

/// When a new request made at `now` under `policy` times out.
pub fn expiry(policy: &ApprovalPolicy, now: UnixTime) -> UnixTime {
    add_duration(now, policy.timeout)
}

#[cfg(test)]
mod tests;
