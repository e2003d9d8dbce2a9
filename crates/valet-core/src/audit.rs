//! The audit chain: each record is one JSON line carrying the hash of the one before, so an edit,
//! a deletion or a reordering breaks the chain, and a cut tail shows against a kept chain head.
//!
//! A record's hash is SHA-256 over its exact bytes without the trailing members, so verification
//! needs no JSON canonicalisation: it recomputes over the bytes it reads. Anyone can recompute a
//! hash, so two things make the chain impossible to re-chain for whoever can write the file but
//! not unseal valetd's keys: every record carries a MAC of its hash under a key derived from the
//! key-encryption key (`"mac"`), and checkpoint records, signed with the token signing key, attest
//! the chain's head now and then and at the start of every rotated file — so an auditor without
//! the secret verifies a copy against the public JWKS.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::clock::{UnixTime, format_time};

/// The hash a chain starts from.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The last record of a chain: its sequence number (1-based; 0 for an empty chain) and hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainHead {
    pub sequence: u64,
    pub hash: String,
}

impl ChainHead {
    pub fn genesis() -> ChainHead {
        ChainHead {
            sequence: 0,
            hash: GENESIS_HASH.to_string(),
        }
    }
}

impl std::fmt::Display for ChainHead {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{}:{}", self.sequence, self.hash)
    }
}

impl std::str::FromStr for ChainHead {
    type Err = String;

    /// Parses `SEQUENCE:HASH`, the form `valet audit verify --head` takes.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (sequence, hash) = text.split_once(':').ok_or("expected SEQUENCE:HASH")?;
        let sequence = sequence
            .parse()
            .map_err(|_| "SEQUENCE must be a whole number")?;
        if hash.len() != 64 || !hash.bytes().all(|byte| byte.is_ascii_hexdigit()) {
            return Err("HASH must be 64 hex digits".to_string());
        }
        Ok(ChainHead {
            sequence,
            hash: hash.to_ascii_lowercase(),
        })
    }
}

/// Every kind of record the audit log holds. The names are the log's vocabulary: tools and
/// alert rules match on them, so a name never changes once released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuditAction {
    /// A caller could not be authenticated.
    Authenticate,
    TokenIssue,
    TokenRenew,
    TokenRevoke,
    TokenIntrospect,
    /// Waiting for a pending grant (`WaitForGrant`).
    TokenWait,
    /// New STS credentials for an active grant.
    AwsSession,
    /// What a revocation did at AWS.
    AwsRevoke,
    GrantsList,
    GrantsWatch,
    ApprovalRequest,
    ApprovalApprove,
    ApprovalDeny,
    ApprovalTimeout,
    /// An approved call approval released its call (or was refused for it).
    ApprovalUse,
    ApprovalsList,
    ApprovalGet,
    ApprovalWebhook,
    /// A request withdrawn because the grant it was for ended.
    ApprovalWithdraw,
    /// A grant's lifetime cut by a config reload that lowered a cap.
    GrantClamp,
    /// A grant the store lost in a crash, created again from its issue record.
    GrantRestore,
    /// A signed attestation of the chain's head (periodically, and at the start of a new file).
    Checkpoint,
    KeyRotate,
    ConfigReload,
    AuditHead,
    AuditTail,
    /// A call through the gateway: the decision before forwarding.
    GatewayCall,
    /// The closing record of a forwarded call: status, bytes, latency.
    GatewayResponse,
    /// The listeners' TLS certificate, key or client CA re-read (or refused) after a change.
    TlsReload,
    /// A single-use console login link made for an operator (`valet console`).
    ConsoleLoginLink,
    /// A console session opened from a login link (or the link refused).
    ConsoleLogin,
    /// A console session ended by its operator.
    ConsoleLogout,
    /// A console request refused before any operation: no session, a stale CSRF token.
    ConsoleRefuse,
    /// The open console sessions listed for an operator.
    ConsoleSessions,
    /// A console session ended by an operator other than its own, or because the credential
    /// that opened it is no longer accepted.
    ConsoleSessionEnd,
}

impl AuditAction {
    pub const ALL: [AuditAction; 35] = [
        AuditAction::Authenticate,
        AuditAction::TokenIssue,
        AuditAction::TokenRenew,
        AuditAction::TokenRevoke,
        AuditAction::TokenIntrospect,
        AuditAction::TokenWait,
        AuditAction::AwsSession,
        AuditAction::AwsRevoke,
        AuditAction::GrantsList,
        AuditAction::GrantsWatch,
        AuditAction::ApprovalRequest,
        AuditAction::ApprovalApprove,
        AuditAction::ApprovalDeny,
        AuditAction::ApprovalTimeout,
        AuditAction::ApprovalUse,
        AuditAction::ApprovalsList,
        AuditAction::ApprovalGet,
        AuditAction::ApprovalWebhook,
        AuditAction::ApprovalWithdraw,
        AuditAction::GrantClamp,
        AuditAction::GrantRestore,
        AuditAction::Checkpoint,
        AuditAction::KeyRotate,
        AuditAction::ConfigReload,
        AuditAction::AuditHead,
        AuditAction::AuditTail,
        AuditAction::GatewayCall,
        AuditAction::GatewayResponse,
        AuditAction::TlsReload,
        AuditAction::ConsoleLoginLink,
        AuditAction::ConsoleLogin,
        AuditAction::ConsoleLogout,
        AuditAction::ConsoleRefuse,
        AuditAction::ConsoleSessions,
        AuditAction::ConsoleSessionEnd,
    ];

    /// The action's name in the log.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditAction::Authenticate => "principal.authenticate",
            AuditAction::TokenIssue => "token.issue",
            AuditAction::TokenRenew => "token.renew",
            AuditAction::TokenRevoke => "token.revoke",
            AuditAction::TokenIntrospect => "token.introspect",
            AuditAction::TokenWait => "token.wait",
            AuditAction::AwsSession => "aws.session",
            AuditAction::AwsRevoke => "aws.revoke",
            AuditAction::GrantsList => "grants.list",
            AuditAction::GrantsWatch => "grants.watch",
            AuditAction::ApprovalRequest => "approval.request",
            AuditAction::ApprovalApprove => "approval.approve",
            AuditAction::ApprovalDeny => "approval.deny",
            AuditAction::ApprovalTimeout => "approval.timeout",
            AuditAction::ApprovalUse => "approval.use",
            AuditAction::ApprovalsList => "approvals.list",
            AuditAction::ApprovalGet => "approval.get",
            AuditAction::ApprovalWebhook => "approval.webhook",
            AuditAction::ApprovalWithdraw => "approval.withdraw",
            AuditAction::GrantClamp => "grant.clamp",
            AuditAction::GrantRestore => "grant.restore",
            AuditAction::Checkpoint => "audit.checkpoint",
            AuditAction::KeyRotate => "key.rotate",
            AuditAction::ConfigReload => "config.reload",
            AuditAction::AuditHead => "audit.head",
            AuditAction::AuditTail => "audit.tail",
            AuditAction::GatewayCall => "gateway.call",
            AuditAction::GatewayResponse => "gateway.response",
            AuditAction::TlsReload => "tls.reload",
            AuditAction::ConsoleLoginLink => "console.login_link",
            AuditAction::ConsoleLogin => "console.login",
            AuditAction::ConsoleLogout => "console.logout",
            AuditAction::ConsoleRefuse => "console.refuse",
            AuditAction::ConsoleSessions => "console.sessions",
            AuditAction::ConsoleSessionEnd => "console.session_end",
        }
    }
}

impl std::fmt::Display for AuditAction {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// Whether the decision let the action happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Allowed,
    Denied,
    Failed,
}

/// One decision to record. Holds ids, names and reasons — never a secret or a token.
#[derive(Debug, Clone)]
pub struct AuditEvent {
    fields: Map<String, Value>,
}

impl AuditEvent {
    /// An event for `action` (e.g. `token.issue`) with its outcome.
    pub fn new(action: AuditAction, outcome: Outcome) -> AuditEvent {
        let mut fields = Map::new();
        fields.insert("action".into(), Value::from(action.as_str()));
        fields.insert(
            "outcome".into(),
            serde_json::to_value(outcome).unwrap_or(Value::Null),
        );
        AuditEvent { fields }
    }

    /// Adds a text field; empty values are left out.
    pub fn with(mut self, key: &str, value: impl Into<String>) -> AuditEvent {
        let value = value.into();
        if !value.is_empty() {
            self.fields.insert(key.into(), Value::from(value));
        }
        self
    }

    /// Adds any JSON value.
    pub fn with_value(mut self, key: &str, value: Value) -> AuditEvent {
        self.fields.insert(key.into(), value);
        self
    }

    /// Adds a text field in place; empty values are left out.
    pub fn set(&mut self, key: &str, value: impl Into<String>) {
        let value = value.into();
        if !value.is_empty() {
            self.fields.insert(key.into(), Value::from(value));
        }
    }

    /// Records the grant's identifying fields in place.
    pub fn set_grant(&mut self, grant: &crate::grant::Grant) {
        let event = std::mem::replace(self, AuditEvent { fields: Map::new() });
        *self = event.with_grant(grant);
    }

    /// A text field's value.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.get(key).and_then(Value::as_str)
    }

    /// Sets the outcome.
    pub fn set_outcome(&mut self, outcome: Outcome) {
        self.fields.insert(
            "outcome".into(),
            serde_json::to_value(outcome).unwrap_or(Value::Null),
        );
    }

    /// Records the grant's identifying fields.
    pub fn with_grant(self, grant: &crate::grant::Grant) -> AuditEvent {
        self.with("grant_id", &grant.id)
            .with("grant_principal", &grant.principal)
            .with("task_id", &grant.task_id)
            .with("scope", &grant.scope)
            .with("environment", &grant.environment)
            .with_value("expires_at", Value::from(format_time(grant.expires_at)))
    }

    /// The event with `redact` applied to every text value (it returns `None` to keep a value).
    pub fn redacted(mut self, redact: impl Fn(&str) -> Option<String>) -> AuditEvent {
        fn clean(value: &mut Value, redact: &dyn Fn(&str) -> Option<String>) {
            match value {
                Value::String(text) => {
                    if let Some(clean) = redact(text) {
                        *text = clean;
                    }
                }
                Value::Array(items) => items.iter_mut().for_each(|item| clean(item, redact)),
                Value::Object(fields) => fields.values_mut().for_each(|item| clean(item, redact)),
                Value::Null | Value::Bool(_) | Value::Number(_) => {}
            }
        }
        for value in self.fields.values_mut() {
            clean(value, &redact);
        }
        self
    }

    /// The event with every text value longer than `max_bytes` (except the top-level fields
    /// `exempt`) cut to an excerpt that names its length and SHA-256: what a record keeps of a
    /// value a caller chose is bounded, and still binds the whole value.
    pub fn bounded(mut self, max_bytes: usize, exempt: &[&str]) -> AuditEvent {
        fn bound(value: &mut Value, max_bytes: usize) {
            match value {
                Value::String(text) if text.len() > max_bytes => {
                    let mut cut = max_bytes;
                    while !text.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    *text = format!(
                        "{}… [{} bytes, sha256 {}]",
                        &text[..cut],
                        text.len(),
                        sha256_hex(text.as_bytes())
                    );
                }
                Value::Array(items) => items.iter_mut().for_each(|item| bound(item, max_bytes)),
                Value::Object(fields) => {
                    fields.values_mut().for_each(|item| bound(item, max_bytes))
                }
                Value::String(_) | Value::Null | Value::Bool(_) | Value::Number(_) => {}
            }
        }
        for (key, value) in self.fields.iter_mut() {
            if !exempt.contains(&key.as_str()) {
                bound(value, max_bytes);
            }
        }
        self
    }

    pub fn action(&self) -> &str {
        self.text("action").unwrap_or_default()
    }

    /// A text field, if the event has it.
    pub fn text(&self, key: &str) -> Option<&str> {
        self.fields.get(key).and_then(Value::as_str)
    }

    /// Any field, if the event has it.
    pub fn value(&self, key: &str) -> Option<&Value> {
        self.fields.get(key)
    }
}

/// The key that authenticates the chain: a MAC key derived from the key-encryption key.
pub struct ChainKey(ring::hmac::Key);

impl std::fmt::Debug for ChainKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("ChainKey(<redacted>)")
    }
}

impl ChainKey {
    pub fn from_seal_key(seal_key: &crate::keyring::SealKey) -> ChainKey {
        ChainKey(seal_key.derive_mac_key("valet audit chain"))
    }

    /// The MAC of a record's hash, in hex.
    fn mac(&self, hash: &str) -> String {
        hex::encode(ring::hmac::sign(&self.0, hash.as_bytes()).as_ref())
    }

    fn verifies(&self, hash: &str, mac: &str) -> bool {
        hex::decode(mac).is_ok_and(|tag| ring::hmac::verify(&self.0, hash.as_bytes(), &tag).is_ok())
    }
}

/// Chains `event` after `head` at `now`: returns the line to append (no newline) and the new head.
/// With `key`, the record carries the MAC that only a holder of the key-encryption key can make.
pub fn chain(
    head: &ChainHead,
    event: &AuditEvent,
    now: UnixTime,
    key: Option<&ChainKey>,
) -> (String, ChainHead) {
    let sequence = head.sequence + 1;
    let mut body = Map::new();
    body.insert("seq".into(), Value::from(sequence));
    body.insert("time".into(), Value::from(format_time(now)));
    body.insert("prev".into(), Value::from(head.hash.clone()));
    for (key, value) in &event.fields {
        if !matches!(key.as_str(), "seq" | "time" | "prev" | "hash" | "mac") {
            body.insert(key.clone(), value.clone());
        }
    }
    let body_text = Value::Object(body).to_string();
    let hash = sha256_hex(body_text.as_bytes());
    let mut line = body_text;
    line.pop();
    line.push_str(&format!(",\"hash\":\"{hash}\""));
    if let Some(key) = key {
        line.push_str(&format!(",\"mac\":\"{}\"", key.mac(&hash)));
    }
    line.push('}');
    (line, ChainHead { sequence, hash })
}

/// What a checkpoint signs: the chain head it attests.
fn checkpoint_message(attests: &ChainHead) -> String {
    format!(
        "valet audit checkpoint v1:{}:{}",
        attests.sequence, attests.hash
    )
}

/// A checkpoint record attesting `attests` (the head just before it), signed with `key`.
pub fn checkpoint(attests: &ChainHead, key: &crate::keyring::SigningKey) -> AuditEvent {
    use base64::Engine;
    let signature = key.sign(checkpoint_message(attests).as_bytes());
    AuditEvent::new(AuditAction::Checkpoint, Outcome::Allowed)
        .with("principal", "valetd")
        .with_value("attests_seq", Value::from(attests.sequence))
        .with("attests_hash", &attests.hash)
        .with("kid", key.kid())
        .with(
            "signature",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(signature),
        )
}

/// Public signing keys by `kid`: the JWKS, as a lookup.
pub type PublicKeys<'a> = &'a dyn Fn(&str) -> Option<[u8; 32]>;

/// What verification may use beyond the records themselves.
#[derive(Default)]
pub struct Verification<'a> {
    /// The chain key: every record's MAC is checked (only valetd, or an operator holding the
    /// key-encryption key, has it).
    pub key: Option<&'a ChainKey>,
    /// Public signing keys by `kid` (the JWKS): checkpoints are checked against them.
    pub public_keys: Option<PublicKeys<'a>>,
    /// A head valetd recorded (fetched from it, or given): the chain must hold it — reach its
    /// sequence, with its hash there. Records after it were written after it was read; they
    /// are counted ([`ChainSummary::n_after_head`]), not covered by it.
    pub expected_head: Option<&'a ChainHead>,
}

/// What a good chain looked like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainSummary {
    pub n_records: u64,
    pub head: ChainHead,
    /// The first record's sequence (1, or the first of a rotated file, which a checkpoint opens).
    pub first_sequence: u64,
    /// Whether every record's MAC was checked with the chain key.
    pub macs_checked: bool,
    /// The last record a valid signed checkpoint attests, if any was checked.
    pub attested_through: Option<u64>,
    /// Checkpoints signed by a key the verifier did not have (retired from the JWKS, say).
    pub n_unverified_checkpoints: u64,
    /// Records after the expected head: written after it was read (a live log grows), chained
    /// to it but not covered by it.
    pub n_after_head: u64,
}

/// Where and how a chain is broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}{}: {kind}", sequence.map(|sequence| format!(" (record {sequence})")).unwrap_or_default())]
pub struct ChainBreak {
    /// 1-based line number in the file.
    pub line: u64,
    pub sequence: Option<u64>,
    pub kind: BreakKind,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BreakKind {
    #[error("not an audit record (expected one JSON object ending in a \"hash\" member)")]
    NotARecord,
    #[error("the record's hash does not match its contents: it was edited")]
    HashMismatch,
    #[error(
        "expected record {expected} here, found {found}: records were deleted, inserted or reordered"
    )]
    SequenceGap { expected: u64, found: u64 },
    #[error(
        "the record does not follow the one before it (its prev hash differs): records were deleted, inserted or reordered"
    )]
    PrevMismatch,
    #[error(
        "the chain ends at record {found_sequence} but the head valetd keeps is record {expected}: the tail was cut"
    )]
    TailCut { expected: u64, found_sequence: u64 },
    #[error(
        "the chain's head is {found} but valetd's kept head is {expected}: the log was rewritten"
    )]
    HeadMismatch { expected: String, found: String },
    #[error(
        "the record's MAC is missing or wrong: it was not written by the valetd holding this key-encryption key (forged, or re-chained)"
    )]
    MacMismatch,
    #[error(
        "the file starts at record {found} without a rotation checkpoint attesting the record before it: records were cut from its start"
    )]
    NoStart { found: u64 },
    #[error(
        "the file starts at record {first}, after the head given (record {expected}): it cannot show that head is in the chain (verify the file rotated before it against that head)"
    )]
    HeadBeforeFile { expected: u64, first: u64 },
    #[error(
        "a checkpoint's signature does not verify, or it attests a head the chain does not have: the log was rewritten"
    )]
    CheckpointMismatch,
}

/// Verifies a chain line by line; with `expected_head`, also that nothing was cut from its end.
/// Chains may start at any sequence (after rotation), given the first record's `prev` is trusted.
/// Structure only: [`verify_with`] authenticates.
pub fn verify<'a>(
    lines: impl IntoIterator<Item = &'a str>,
    expected_head: Option<&ChainHead>,
) -> Result<ChainSummary, ChainBreak> {
    verify_lines(lines, expected_head, None, None, false)
}

/// Verifies a piece of a chain that follows a record the caller trusts (the lines start with it):
/// its structure and every record's MAC under `key`, without asking that it start the chain.
pub fn verify_continuation<'a>(
    lines: impl IntoIterator<Item = &'a str>,
    key: &ChainKey,
) -> Result<ChainSummary, ChainBreak> {
    verify_lines(lines, None, Some(key), None, false)
}

/// Verifies a whole chain: its structure; with a key, every record's MAC; with public keys, every
/// checkpoint's signature and what it attests; and that the chain starts at record 1 or at a
/// rotation checkpoint, and — with an expected head — holds it (records after it are counted).
pub fn verify_with<'a>(
    lines: impl IntoIterator<Item = &'a str>,
    verification: &Verification<'_>,
) -> Result<ChainSummary, ChainBreak> {
    verify_lines(
        lines,
        verification.expected_head,
        verification.key,
        verification.public_keys,
        true,
    )
}

fn verify_lines<'a>(
    lines: impl IntoIterator<Item = &'a str>,
    expected_head: Option<&ChainHead>,
    key: Option<&ChainKey>,
    public_keys: Option<PublicKeys<'_>>,
    whole: bool,
) -> Result<ChainSummary, ChainBreak> {
    let mut head: Option<ChainHead> = None;
    let mut n_records = 0u64;
    let mut line_number = 0u64;
    let mut first_sequence = 0;
    let mut first_prev = String::new();
    let mut attested_through = None;
    let mut n_unverified_checkpoints = 0;
    for line in lines {
        line_number += 1;
        if line.trim().is_empty() {
            continue;
        }
        let fail = |sequence: Option<u64>, kind: BreakKind| ChainBreak {
            line: line_number,
            sequence,
            kind,
        };
        let (sequence, prev, hash, mac, body) = match parse_record(line) {
            ParsedLine::Record {
                sequence,
                prev,
                hash,
                mac,
                body,
            } => (sequence, prev, hash, mac, body),
            ParsedLine::Edited { sequence } => {
                return Err(fail(Some(sequence), BreakKind::HashMismatch));
            }
            ParsedLine::NotARecord => return Err(fail(None, BreakKind::NotARecord)),
        };
        if let Some(key) = key
            && !mac.as_deref().is_some_and(|mac| key.verifies(&hash, mac))
        {
            return Err(fail(Some(sequence), BreakKind::MacMismatch));
        }
        let is_checkpoint = body.get("action").and_then(Value::as_str) == Some("audit.checkpoint");
        let mut checkpoint_verified = false;
        if is_checkpoint && let Some(public_keys) = public_keys {
            match check_checkpoint(&body, &prev, sequence, public_keys) {
                CheckpointCheck::Valid(attests) => {
                    attested_through = Some(attests);
                    checkpoint_verified = true;
                }
                CheckpointCheck::UnknownKey => n_unverified_checkpoints += 1,
                CheckpointCheck::Invalid => {
                    return Err(fail(Some(sequence), BreakKind::CheckpointMismatch));
                }
            }
        }
        if let Some(previous) = &head {
            if sequence != previous.sequence + 1 {
                return Err(fail(
                    Some(sequence),
                    BreakKind::SequenceGap {
                        expected: previous.sequence + 1,
                        found: sequence,
                    },
                ));
            }
            if prev != previous.hash {
                return Err(fail(Some(sequence), BreakKind::PrevMismatch));
            }
        } else {
            first_sequence = sequence;
            first_prev = prev.clone();
            if sequence == 1 && prev != GENESIS_HASH {
                return Err(fail(Some(sequence), BreakKind::PrevMismatch));
            }
            // A file that does not start the chain must open with a checkpoint attesting the
            // record before it, authenticated by the key or by its signature.
            let opens_rotation = is_checkpoint
                && body.get("attests_seq").and_then(Value::as_u64) == Some(sequence - 1)
                && body.get("attests_hash").and_then(Value::as_str) == Some(prev.as_str())
                && (key.is_some() || checkpoint_verified);
            if whole && sequence > 1 && !opens_rotation {
                return Err(fail(Some(sequence), BreakKind::NoStart { found: sequence }));
            }
        }
        if let Some(expected) = expected_head
            && sequence == expected.sequence
            && hash != expected.hash
        {
            return Err(fail(
                Some(sequence),
                BreakKind::HeadMismatch {
                    expected: expected.to_string(),
                    found: ChainHead { sequence, hash }.to_string(),
                },
            ));
        }
        head = Some(ChainHead { sequence, hash });
        n_records += 1;
    }
    let head = head.unwrap_or_else(ChainHead::genesis);
    if let Some(expected) = expected_head {
        if head.sequence < expected.sequence {
            return Err(ChainBreak {
                line: line_number,
                sequence: Some(head.sequence),
                kind: BreakKind::TailCut {
                    expected: expected.sequence,
                    found_sequence: head.sequence,
                },
            });
        }
        // A file that starts right after the head holds it as its first record's `prev`.
        if n_records > 0 && first_sequence == expected.sequence + 1 && first_prev != expected.hash {
            return Err(ChainBreak {
                line: 1,
                sequence: Some(first_sequence),
                kind: BreakKind::HeadMismatch {
                    expected: expected.to_string(),
                    found: ChainHead {
                        sequence: expected.sequence,
                        hash: first_prev,
                    }
                    .to_string(),
                },
            });
        }
        if n_records > 0 && first_sequence > expected.sequence + 1 {
            return Err(ChainBreak {
                line: 1,
                sequence: Some(first_sequence),
                kind: BreakKind::HeadBeforeFile {
                    expected: expected.sequence,
                    first: first_sequence,
                },
            });
        }
    }
    let n_after_head = expected_head.map_or(0, |expected| {
        head.sequence.saturating_sub(expected.sequence)
    });
    Ok(ChainSummary {
        n_records,
        head,
        first_sequence,
        macs_checked: key.is_some(),
        attested_through,
        n_unverified_checkpoints,
        n_after_head,
    })
}

enum CheckpointCheck {
    /// The signature verifies and the attested head is the record before: attests through it.
    Valid(u64),
    UnknownKey,
    Invalid,
}

/// A checkpoint at `sequence` whose record before has hash `prev` must attest exactly that head,
/// signed by a key the verifier knows.
fn check_checkpoint(
    body: &Map<String, Value>,
    prev: &str,
    sequence: u64,
    public_keys: &dyn Fn(&str) -> Option<[u8; 32]>,
) -> CheckpointCheck {
    use base64::Engine;
    let (Some(attests_seq), Some(attests_hash), Some(kid), Some(signature)) = (
        body.get("attests_seq").and_then(Value::as_u64),
        body.get("attests_hash").and_then(Value::as_str),
        body.get("kid").and_then(Value::as_str),
        body.get("signature").and_then(Value::as_str),
    ) else {
        return CheckpointCheck::Invalid;
    };
    if attests_seq + 1 != sequence || attests_hash != prev {
        return CheckpointCheck::Invalid;
    }
    let Some(public_key) = public_keys(kid) else {
        return CheckpointCheck::UnknownKey;
    };
    let Ok(signature) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(signature) else {
        return CheckpointCheck::Invalid;
    };
    let attests = ChainHead {
        sequence: attests_seq,
        hash: attests_hash.to_string(),
    };
    let verified = ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public_key)
        .verify(checkpoint_message(&attests).as_bytes(), &signature)
        .is_ok();
    if verified {
        CheckpointCheck::Valid(attests_seq)
    } else {
        CheckpointCheck::Invalid
    }
}

/// One line, read.
enum ParsedLine {
    Record {
        sequence: u64,
        prev: String,
        hash: String,
        mac: Option<String>,
        body: Map<String, Value>,
    },
    Edited {
        sequence: u64,
    },
    NotARecord,
}

/// Reads one line: its body, and the hash (checked over the line's own bytes) and MAC that close
/// it.
fn parse_record(line: &str) -> ParsedLine {
    const MAC_SUFFIX_LEN: usize = ",\"mac\":\"\"".len() + 64;
    const HASH_SUFFIX_LEN: usize = ",\"hash\":\"\"".len() + 64;
    let line = line.trim_end_matches(['\r', '\n']);
    let Some(open) = line.strip_suffix('}') else {
        return ParsedLine::NotARecord;
    };
    let split = |text: &'_ str, length: usize, prefix: &str| -> Option<(String, String)> {
        if text.len() < length || !text.is_char_boundary(text.len() - length) {
            return None;
        }
        let (rest, suffix) = text.split_at(text.len() - length);
        let value = suffix.strip_prefix(prefix)?.strip_suffix('"')?;
        value
            .bytes()
            .all(|byte| byte.is_ascii_hexdigit())
            .then(|| (rest.to_string(), value.to_string()))
    };
    let (open, mac) = match split(open, MAC_SUFFIX_LEN, ",\"mac\":\"") {
        Some((rest, mac)) => (rest, Some(mac)),
        None => (open.to_string(), None),
    };
    let Some((body_open, stated_hash)) = split(&open, HASH_SUFFIX_LEN, ",\"hash\":\"") else {
        return ParsedLine::NotARecord;
    };
    let body = format!("{body_open}}}");
    let Ok(parsed) = serde_json::from_str::<Map<String, Value>>(&body) else {
        return ParsedLine::NotARecord;
    };
    let (Some(sequence), Some(prev)) = (
        parsed.get("seq").and_then(Value::as_u64),
        parsed
            .get("prev")
            .and_then(Value::as_str)
            .map(str::to_string),
    ) else {
        return ParsedLine::NotARecord;
    };
    if sha256_hex(body.as_bytes()) != stated_hash {
        return ParsedLine::Edited { sequence };
    }
    ParsedLine::Record {
        sequence,
        prev,
        hash: stated_hash,
        mac,
        body: parsed,
    }
}

/// SHA-256 of `bytes`, hex: how records name a value they do not keep whole.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

#[cfg(test)]
mod tests;
