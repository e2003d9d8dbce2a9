//! AWS's rules, with no I/O: the session policy a scope renders for STS `AssumeRole`, the role
//! policy that denies revoked sessions, and Signature Version 4 request signing.

pub mod policy;
pub mod sigv4;

pub use policy::{
    MAX_ROLE_POLICY_CHARS, MAX_SESSION_POLICY_CHARS, REVOCATION_POLICY_NAME, RevocationUpdate,
    SessionPolicyError, add_revoked_session, session_policy, source_identity,
};

/// STS never issues a role session shorter than this.
pub const MIN_SESSION_SECONDS: u64 = 900;
/// Nor longer than this (and the role's own `MaxSessionDuration` may be lower).
pub const MAX_SESSION_SECONDS: u64 = 43_200;

/// The AWS partition a region belongs to, and the region IAM (a global service) is signed for.
pub fn partition_of(region: &str) -> (&'static str, &'static str) {
    if region.starts_with("us-gov-") {
        ("aws-us-gov", "us-gov-west-1")
    } else if region.starts_with("cn-") {
        ("aws-cn", "cn-north-1")
    } else {
        ("aws", "us-east-1")
    }
}

/// The public endpoints of STS (regional) and IAM (one per partition) for a region.
pub fn default_endpoints(region: &str) -> (String, String) {
    let sts = match partition_of(region).0 {
        "aws-cn" => format!("https://sts.{region}.amazonaws.com.cn"),
        _ => format!("https://sts.{region}.amazonaws.com"),
    };
    let iam = match partition_of(region).0 {
        "aws-us-gov" => "https://iam.us-gov.amazonaws.com".to_string(),
        "aws-cn" => "https://iam.cn-north-1.amazonaws.com.cn".to_string(),
        _ => "https://iam.amazonaws.com".to_string(),
    };
    (sts, iam)
}
