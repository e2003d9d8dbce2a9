//! valetd's own errors (why it could not start), and the one place a service error becomes a gRPC
//! status. Denials name the rule and what is allowed; internal failures reach the caller as an
//! opaque sentence plus the request id, and the full error is logged under that id.

use tonic::{Code, Status};
use valet_core::approval::ApprovalError;
use valet_service::{LoadError, ServiceError, Valet};
use valet_store::StoreError;

/// Why valetd could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("data dir {path} cannot be used: {detail}")]
    DataDir { path: String, detail: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error("cannot listen on {address}: {detail}")]
    Listen { address: String, detail: String },
    #[error(
        "the key-encryption key from {tried} does not open signing key {kid} in the store: the store was sealed under another key (a different seal key file, or a store from another deployment), or its record was altered. Point [seal] at the key this store was made with; a store cannot be re-sealed with a new key"
    )]
    WrongSealKey { kid: String, tried: String },
    #[error("{what} cannot be set up: {detail}")]
    Telemetry { what: String, detail: String },
    #[error("TLS cannot be set up: {0}")]
    Tls(#[from] valet_gateway::tls::TlsError),
    #[error("the gRPC server failed: {0}")]
    Transport(String),
}

impl ServerError {
    /// Exit code for `valetd`: 64 for usage and config mistakes, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            ServerError::Load(error) if error.is_usage_error() => 64,
            ServerError::Tls(_) => 64,
            _ => 1,
        }
    }
}

/// The status a caller receives for `error`, with every root credential the message might echo
/// redacted. `request_id` ties an opaque internal error to the log.
pub fn status_of(valet: &Valet, error: ServiceError, request_id: &str) -> Status {
    let status = status_unredacted(error, request_id);
    let clean = valet.redact(status.message());
    if clean == status.message() {
        status
    } else {
        Status::with_metadata(status.code(), clean, status.metadata().clone())
    }
}

fn status_unredacted(error: ServiceError, request_id: &str) -> Status {
    let code = match &error {
        ServiceError::Unauthenticated { .. } | ServiceError::Console(_) => Code::Unauthenticated,
        ServiceError::ConsoleOff => Code::FailedPrecondition,
        ServiceError::RateLimited { retry_after, .. } => {
            // The standard hint, in whole seconds, for clients that back off on their own.
            let mut metadata = tonic::metadata::MetadataMap::new();
            if let Ok(value) = retry_after.as_secs().max(1).to_string().parse() {
                metadata.insert("retry-after", value);
            }
            return Status::with_metadata(Code::ResourceExhausted, error.to_string(), metadata);
        }
        ServiceError::Request(error) if error.is_invalid_argument() => Code::InvalidArgument,
        ServiceError::Request(_) | ServiceError::Access(_) => Code::PermissionDenied,
        ServiceError::Transition(_) | ServiceError::Inactive(_) => Code::FailedPrecondition,
        ServiceError::GrantNotFound { .. }
        | ServiceError::ApprovalNotFound { .. }
        | ServiceError::ConsoleSessionNotFound { .. } => Code::NotFound,
        ServiceError::InvalidField { .. } => Code::InvalidArgument,
        ServiceError::Reload(_) => Code::FailedPrecondition,
        ServiceError::Aws(error) if error.is_invalid_argument() => Code::InvalidArgument,
        ServiceError::Aws(_) | ServiceError::AwsRevocation { .. } if error.is_transient() => {
            Code::Unavailable
        }
        ServiceError::Aws(_) | ServiceError::AwsRevocation { .. } => Code::FailedPrecondition,
        ServiceError::Store(StoreError::Conflict { .. } | StoreError::KeyRingConflict) => {
            Code::Aborted
        }
        ServiceError::Approval(error) => match error {
            ApprovalError::SelfApproval { .. }
            | ApprovalError::AgentCannotApprove { .. }
            | ApprovalError::NotAnApprover { .. } => Code::PermissionDenied,
            ApprovalError::ReasonRequired { .. } => Code::InvalidArgument,
            _ => Code::FailedPrecondition,
        },
        // Gateway refusals do not travel over gRPC; should one, it is a refusal.
        ServiceError::Call(_) => Code::PermissionDenied,
        ServiceError::Lagged { .. } => Code::DataLoss,
        ServiceError::Store(_) | ServiceError::Audit(_) => {
            tracing::error!(request_id, error = %error, "request failed closed: store or audit unavailable");
            return Status::unavailable(format!(
                "valetd cannot record this decision durably, so it refused it (fail closed); request id {request_id}: {error}"
            ));
        }
        ServiceError::Key(valet_core::keyring::KeyError::Unavailable { .. }) => {
            tracing::error!(request_id, error = %error, "refused: the key ring cannot be trusted");
            return Status::unavailable(format!("{error}; request id {request_id}"));
        }
        ServiceError::Key(_) | ServiceError::Internal(_) => {
            tracing::error!(request_id, error = %error, "internal error");
            return Status::internal(format!("internal error; request id {request_id}"));
        }
    };
    Status::new(code, error.to_string())
}
