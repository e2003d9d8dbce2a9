//! Identifiers passed between Valet's layers: grant, approval, task and key ids, each its own
//! type so one cannot stand in for another, each checked once where it enters from the wire.

use std::fmt;

use crate::policy::{RequestError, check_task_id, limits};
use crate::random::{self, RandomnessUnavailable};

/// The id of a grant (its token's `jti`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GrantId(String);

/// The id of an approval request (`ap_…`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ApprovalId(String);

/// The id of an agent's task.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TaskId(String);

/// The id of a signing key (`kid`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(String);

/// Longest approval id accepted from a caller.
pub const MAX_APPROVAL_ID_BYTES: usize = 64;

impl GrantId {
    /// A grant id from a caller, as `RequestToken` returned it.
    pub fn parse(text: &str) -> Result<GrantId, RequestError> {
        if text.is_empty()
            || text.len() > limits::MAX_GRANT_ID_BYTES
            || !text.bytes().all(|byte| byte.is_ascii_graphic())
        {
            return Err(RequestError::FieldInvalid {
                field: "grant_id",
                value: text.chars().take(limits::MAX_GRANT_ID_BYTES).collect(),
                allowed: "a grant id as RequestToken returned it (26 characters)",
            });
        }
        Ok(GrantId(text.to_string()))
    }

    /// A new, time-ordered grant id.
    pub fn generate(now_millis: u64) -> Result<GrantId, RandomnessUnavailable> {
        random::grant_id(now_millis).map(GrantId)
    }

    /// An id read from a record Valet wrote itself.
    pub fn from_record(id: &str) -> GrantId {
        GrantId(id.to_string())
    }
}

impl ApprovalId {
    /// An approval id from a caller, as valetd returned it.
    pub fn parse(text: &str) -> Result<ApprovalId, RequestError> {
        if text.is_empty()
            || text.len() > MAX_APPROVAL_ID_BYTES
            || !text.bytes().all(|byte| byte.is_ascii_graphic())
        {
            return Err(RequestError::FieldInvalid {
                field: "id",
                value: text.chars().take(MAX_APPROVAL_ID_BYTES).collect(),
                allowed: "an approval id as valetd returned it (ap_ and 26 characters)",
            });
        }
        Ok(ApprovalId(text.to_string()))
    }

    /// A new, time-ordered approval id.
    pub fn generate(now_millis: u64) -> Result<ApprovalId, RandomnessUnavailable> {
        random::grant_id(now_millis).map(|id| ApprovalId(format!("ap_{id}")))
    }
}

impl TaskId {
    /// A task id from a caller: printable, no spaces, bounded.
    pub fn parse(text: &str) -> Result<TaskId, RequestError> {
        check_task_id(text)?;
        Ok(TaskId(text.to_string()))
    }
}

impl KeyId {
    pub fn from_record(kid: &str) -> KeyId {
        KeyId(kid.to_string())
    }
}

macro_rules! id_text {
    ($($name:ident),*) => {$(
        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    )*};
}

id_text!(GrantId, ApprovalId, TaskId, KeyId);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_from_callers_are_checked_once_and_say_what_is_allowed() {
        assert!(GrantId::parse("01JD0000000000000000000000").is_ok());
        let error = GrantId::parse("").unwrap_err().to_string();
        assert!(error.contains("grant_id"), "{error}");
        assert!(GrantId::parse(&"x".repeat(65)).is_err());
        assert!(GrantId::parse("has space").is_err());
        assert!(ApprovalId::parse("ap_01JD").is_ok());
        assert!(ApprovalId::parse(&"a".repeat(65)).is_err());
        assert!(TaskId::parse("fix-dns-42").is_ok());
        assert!(TaskId::parse("two words").is_err());
        let generated = ApprovalId::generate(1).unwrap();
        assert!(generated.as_str().starts_with("ap_"));
    }
}
