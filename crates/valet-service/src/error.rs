//! The one error type of the application layer. Every variant names a domain fact; the transports
//! map it once each (gRPC status in valet-server, HTTP response in valet-gateway).

use valet_core::approval::ApprovalError;
use valet_core::audit::Outcome;
use valet_core::call::CallRefusal;
use valet_core::grant::{InactiveReason, TransitionError};
use valet_core::keyring::KeyError;
use valet_core::policy::{AccessError, RequestError};
use valet_store::StoreError;

use crate::audit_sink::AuditError;
use crate::aws_client::AwsError;
use crate::loader::LoadError;

/// How long a throttled refusal waits before it is answered.
pub const LOOP_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// Why an operation did not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{reason}")]
    Unauthenticated { reason: String },
    /// A source over its failed-authentication budget, a principal over its rate, a grant over
    /// its refusals (all answered after [`LOOP_PAUSE`]), or a caller at a cap on what it holds
    /// at once (answered at once). Made with [`ServiceError::throttled`] or
    /// [`ServiceError::at_capacity`].
    #[error("{reason}")]
    RateLimited {
        reason: String,
        retry_after: std::time::Duration,
        /// How long the adapter waits before answering.
        answer_after: std::time::Duration,
    },
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error(transparent)]
    Access(#[from] AccessError),
    #[error(transparent)]
    Transition(#[from] TransitionError),
    #[error(transparent)]
    Inactive(#[from] InactiveReason),
    #[error("grant {id} does not exist (it may have expired and been swept)")]
    GrantNotFound { id: String },
    #[error("approval {id} does not exist (ended approvals are swept)")]
    ApprovalNotFound { id: String },
    #[error(
        "no open console session {id}: `valet console sessions` lists the open ones (ended and expired sessions are not)"
    )]
    ConsoleSessionNotFound { id: String },
    #[error("{field}: {problem}")]
    InvalidField {
        field: &'static str,
        problem: String,
    },
    #[error("the new config was not applied, the running config stays in force: {0}")]
    Reload(Box<LoadError>),
    #[error(transparent)]
    Approval(#[from] ApprovalError),
    #[error(transparent)]
    Call(#[from] CallRefusal),
    #[error(transparent)]
    Aws(Box<AwsError>),
    #[error(
        "grant {grant_id} is revoked in Valet, but AWS keeps honouring its credentials until {until}: writing the deny failed: {error}; revoke the grant again to retry"
    )]
    AwsRevocation {
        grant_id: String,
        until: String,
        error: Box<AwsError>,
    },
    #[error(transparent)]
    Store(StoreError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A follower of a change stream fell behind and missed changes.
    #[error("the watcher fell {n_missed} changes behind; {advice}")]
    Lagged { n_missed: u64, advice: &'static str },
    /// Work that had to leave the async workers did not come back (a panic or shutdown).
    #[error("internal error: {0}")]
    Internal(String),
    /// A console login link or session refused.
    #[error(transparent)]
    Console(#[from] valet_core::console::ConsoleError),
    #[error(
        "the web console is off on this valetd: set [server] console_listen (and console_url when browsers reach it through another address)"
    )]
    ConsoleOff,
}

impl ServiceError {
    /// How this error is recorded in the audit log: refusals as `denied`, failures outside Valet
    /// as `failed`; `None` when the store or the audit log itself failed (it is logged instead).
    pub fn audit_outcome(&self) -> Option<Outcome> {
        match self {
            ServiceError::Store(_)
            | ServiceError::Audit(_)
            | ServiceError::Internal(_)
            | ServiceError::Lagged { .. } => None,
            ServiceError::Aws(_) | ServiceError::AwsRevocation { .. } | ServiceError::Key(_) => {
                Some(Outcome::Failed)
            }
            ServiceError::Call(refusal) if refusal.is_upstream_failure() => Some(Outcome::Failed),
            _ => Some(Outcome::Denied),
        }
    }

    /// A caller refused for what it keeps doing (over a rate or a budget): answered after
    /// [`LOOP_PAUSE`], so a caller that loops on its refusals does so at the pace of its
    /// connections (which are budgeted), not of the CPU.
    pub fn throttled(reason: String, retry_after: std::time::Duration) -> Self {
        ServiceError::RateLimited {
            reason,
            retry_after,
            answer_after: LOOP_PAUSE,
        }
    }

    /// A caller at a cap on what it holds at once (calls in flight, held calls): answered at
    /// once, so it can finish what it holds.
    pub fn at_capacity(reason: String, retry_after: std::time::Duration) -> Self {
        ServiceError::RateLimited {
            reason,
            retry_after,
            answer_after: std::time::Duration::ZERO,
        }
    }

    /// How long an adapter waits before giving this answer (zero but for throttled callers).
    pub fn answer_after(&self) -> std::time::Duration {
        match self {
            ServiceError::RateLimited { answer_after, .. } => *answer_after,
            _ => std::time::Duration::ZERO,
        }
    }

    /// One word for what kind of refusal or failure this is: the `refusal` field of its audit
    /// record and the `reason` label of its metrics. Always one of [`ServiceError::KINDS`].
    pub fn kind(&self) -> &'static str {
        match self {
            ServiceError::Unauthenticated { .. } => "unauthenticated",
            ServiceError::RateLimited { .. } => "rate_limited",
            ServiceError::Request(_) => "invalid_request",
            ServiceError::Access(_) => "not_allowed",
            ServiceError::Transition(_) => "invalid_transition",
            ServiceError::Inactive(_) => "inactive",
            ServiceError::GrantNotFound { .. } => "unknown_grant",
            ServiceError::ApprovalNotFound { .. } => "unknown_approval",
            ServiceError::ConsoleSessionNotFound { .. } => "unknown_console_session",
            ServiceError::InvalidField { .. } => "invalid_field",
            ServiceError::Reload(_) => "reload_refused",
            ServiceError::Approval(_) => "approval_refused",
            ServiceError::Call(refusal) => refusal.kind(),
            ServiceError::Aws(_) => "aws_failed",
            ServiceError::AwsRevocation { .. } => "aws_revocation_failed",
            ServiceError::Store(_) => "store_unavailable",
            ServiceError::Audit(_) => "audit_unavailable",
            ServiceError::Key(_) => "key_unavailable",
            ServiceError::Lagged { .. } => "lagged",
            ServiceError::Internal(_) => "internal",
            ServiceError::Console(_) => "console_session",
            ServiceError::ConsoleOff => "console_off",
        }
    }

    /// Every [`ServiceError::kind`] that is not a gateway refusal's ([`CallRefusal::KINDS`]).
    pub const KINDS: [&'static str; 21] = [
        "unauthenticated",
        "rate_limited",
        "invalid_request",
        "not_allowed",
        "invalid_transition",
        "inactive",
        "unknown_grant",
        "unknown_approval",
        "unknown_console_session",
        "invalid_field",
        "reload_refused",
        "approval_refused",
        "aws_failed",
        "aws_revocation_failed",
        "store_unavailable",
        "audit_unavailable",
        "key_unavailable",
        "lagged",
        "internal",
        "console_session",
        "console_off",
    ];

    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            ServiceError::Store(StoreError::Conflict { .. } | StoreError::KeyRingConflict)
        )
    }

    /// Whether the caller may succeed by trying again later.
    pub fn is_transient(&self) -> bool {
        match self {
            ServiceError::Aws(error) | ServiceError::AwsRevocation { error, .. } => {
                error.is_transient()
            }
            ServiceError::Store(StoreError::Conflict { .. } | StoreError::KeyRingConflict) => false,
            ServiceError::Store(_) | ServiceError::Audit(_) => true,
            _ => false,
        }
    }
}

impl From<StoreError> for ServiceError {
    fn from(error: StoreError) -> ServiceError {
        match error {
            StoreError::ApprovalNotFound { id } => ServiceError::ApprovalNotFound { id },
            StoreError::NotFound { id } => ServiceError::GrantNotFound { id },
            error => ServiceError::Store(error),
        }
    }
}

impl From<AwsError> for ServiceError {
    fn from(error: AwsError) -> ServiceError {
        ServiceError::Aws(Box::new(error))
    }
}

impl From<valet_core::random::RandomnessUnavailable> for ServiceError {
    fn from(error: valet_core::random::RandomnessUnavailable) -> ServiceError {
        ServiceError::Key(error.into())
    }
}
