//! Errors of valetd and the one place they become gRPC statuses. Denials name the rule and what is
//! allowed; internal failures reach the caller as an opaque sentence plus the request id, and the
//! full error is logged under that id.

use tonic::{Code, Status};
use valet_core::config::ConfigErrors;
use valet_core::grant::{InactiveReason, TransitionError};
use valet_core::keyring::KeyError;
use valet_core::policy::{AccessError, RequestError};
use valet_store::StoreError;

use crate::audit_sink::AuditError;

/// Why valetd could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot read config file {path}: {detail}")]
    ConfigUnreadable { path: String, detail: String },
    #[error("config file {path} is invalid: {errors}")]
    ConfigInvalid { path: String, errors: ConfigErrors },
    #[error("credential {name:?} ({source_description}) cannot be read: {detail}")]
    CredentialUnreadable {
        name: String,
        source_description: String,
        detail: String,
    },
    #[error(
        "no key-encryption key: set [seal] key_file or key_env in the config (make a key with `openssl rand -base64 32`), or run `valetd --dev` for development only"
    )]
    NoSealKey,
    #[error("the key-encryption key ({source_description}) cannot be used: {detail}")]
    SealKeyUnreadable {
        source_description: String,
        detail: String,
    },
    #[error("data dir {path} cannot be used: {detail}")]
    DataDir { path: String, detail: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error("cannot listen on {address}: {detail}")]
    Listen { address: String, detail: String },
    #[error("the gRPC server failed: {0}")]
    Transport(String),
}

impl ServerError {
    /// Exit code for `valetd`: 64 for usage and config mistakes, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            ServerError::ConfigUnreadable { .. }
            | ServerError::ConfigInvalid { .. }
            | ServerError::NoSealKey => 64,
            _ => 1,
        }
    }
}

/// Why one RPC failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{reason}")]
    Unauthenticated { reason: &'static str },
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
    #[error("{field}: {problem}")]
    InvalidField {
        field: &'static str,
        problem: String,
    },
    #[error("the new config was not applied, the running config stays in force: {0}")]
    Reload(Box<ServerError>),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Approval(#[from] valet_core::approval::ApprovalError),
    #[error(transparent)]
    Aws(#[from] Box<crate::aws::AwsError>),
    #[error(
        "grant {grant_id} is revoked in Valet, but AWS keeps honouring its credentials until {until}: writing the deny failed: {error}; revoke the grant again to retry"
    )]
    AwsRevocation {
        grant_id: String,
        until: String,
        error: Box<crate::aws::AwsError>,
    },
}

impl ApiError {
    /// The status a caller receives. `request_id` ties an opaque internal error to the log.
    pub fn into_status(self, request_id: &str) -> Status {
        let code = match &self {
            ApiError::Unauthenticated { .. } => Code::Unauthenticated,
            ApiError::Request(error) if error.is_invalid_argument() => Code::InvalidArgument,
            ApiError::Request(_) | ApiError::Access(_) => Code::PermissionDenied,
            ApiError::Transition(_) | ApiError::Inactive(_) => Code::FailedPrecondition,
            ApiError::GrantNotFound { .. } => Code::NotFound,
            ApiError::InvalidField { .. } => Code::InvalidArgument,
            ApiError::Reload(_) => Code::FailedPrecondition,
            ApiError::Aws(error) if error.is_invalid_argument() => Code::InvalidArgument,
            ApiError::Aws(error) | ApiError::AwsRevocation { error, .. }
                if error.is_transient() =>
            {
                Code::Unavailable
            }
            ApiError::Aws(_) | ApiError::AwsRevocation { .. } => Code::FailedPrecondition,
            ApiError::Store(StoreError::Conflict { .. } | StoreError::KeyRingConflict) => {
                Code::Aborted
            }
            ApiError::Approval(error) => {
                use valet_core::approval::ApprovalError;
                match error {
                    ApprovalError::SelfApproval { .. }
                    | ApprovalError::AgentCannotApprove { .. }
                    | ApprovalError::NotAnApprover { .. } => Code::PermissionDenied,
                    ApprovalError::ReasonRequired { .. } => Code::InvalidArgument,
                    _ => Code::FailedPrecondition,
                }
            }
            ApiError::Store(StoreError::ApprovalNotFound { id }) => {
                return Status::not_found(format!(
                    "approval {id} does not exist (ended approvals are swept)"
                ));
            }
            ApiError::Store(StoreError::NotFound { id }) => {
                return Status::not_found(format!("grant {id} does not exist"));
            }
            ApiError::Store(_) | ApiError::Audit(_) => {
                tracing::error!(request_id, error = %self, "request failed closed: store or audit unavailable");
                return Status::unavailable(format!(
                    "valetd cannot record this decision durably, so it refused it (fail closed); request id {request_id}: {self}"
                ));
            }
            ApiError::Key(_) => {
                tracing::error!(request_id, error = %self, "internal key error");
                return Status::internal(format!("internal error; request id {request_id}"));
            }
        };
        Status::new(code, self.to_string())
    }
}

impl From<crate::aws::AwsError> for ApiError {
    fn from(error: crate::aws::AwsError) -> ApiError {
        ApiError::Aws(Box::new(error))
    }
}
