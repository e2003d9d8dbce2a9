//! valetd's calls to AWS over the Query API: STS `AssumeRole` for a grant of an `aws-sts` scope,
//! and IAM `GetRolePolicy`/`PutRolePolicy` to deny a revoked grant's sessions. Requests are signed
//! with the scope's root key (SigV4, valet-core) and sent through the service's [`Outbound`];
//! answers are read as XML.

use std::time::Duration;

use bytes::Bytes;
use valet_core::aws::{self, RevocationUpdate, SessionPolicyError, sigv4};
use valet_core::config::{AwsCredential, AwsStsScope};
use valet_core::{Secret, UnixTime};

use crate::outbound::Outbound;

const STS_VERSION: &str = "2011-06-15";
const IAM_VERSION: &str = "2010-05-08";
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
const MAX_ANSWER_BYTES: usize = 1 << 20;

/// Temporary credentials STS minted for one grant. The secret parts cannot be printed.
#[derive(Debug, Clone)]
pub struct StsCredentials {
    pub access_key_id: String,
    pub secret_access_key: Secret,
    pub session_token: Secret,
    pub expires_at: UnixTime,
    pub assumed_role_arn: String,
    pub region: String,
}

/// Why a call to AWS failed. Never carries the root key: AWS does not echo it, and the redactor
/// masks every root credential in whatever valetd emits besides.
#[derive(Debug, thiserror::Error)]
pub enum AwsError {
    #[error("scope {scope:?}: {error}")]
    Policy {
        scope: String,
        error: SessionPolicyError,
    },
    #[error("scope {scope:?}: its AWS credential {credential:?} is not loaded")]
    NotLoaded { scope: String, credential: String },
    #[error("scope {scope:?}: AWS {operation} was refused: {code}: {message}")]
    Refused {
        scope: String,
        operation: &'static str,
        code: String,
        message: String,
        http_status: u16,
    },
    #[error("scope {scope:?}: AWS {operation} could not be reached at {endpoint}: {detail}")]
    Unreachable {
        scope: String,
        operation: &'static str,
        endpoint: String,
        detail: String,
    },
    #[error("scope {scope:?}: AWS {operation} answered something valetd cannot read: {detail}")]
    Malformed {
        scope: String,
        operation: &'static str,
        detail: String,
    },
}

impl AwsError {
    /// Whether trying again later may succeed (throttling, AWS-side trouble, no connection).
    pub fn is_transient(&self) -> bool {
        match self {
            AwsError::Refused {
                code, http_status, ..
            } => {
                *http_status >= 500
                    || matches!(
                        code.as_str(),
                        "Throttling"
                            | "ThrottlingException"
                            | "RequestLimitExceeded"
                            | "ServiceUnavailable"
                            | "IDPCommunicationError"
                    )
            }
            AwsError::Unreachable { .. } | AwsError::Malformed { .. } => true,
            AwsError::Policy { .. } | AwsError::NotLoaded { .. } => false,
        }
    }

    pub fn is_invalid_argument(&self) -> bool {
        matches!(self, AwsError::Policy { .. })
    }
}

/// What a call is about: the scope (for errors), the credential to sign with, its secret, and
/// the client that carries it.
pub struct AwsCall<'a> {
    pub scope: &'a str,
    pub credential: &'a AwsCredential,
    pub secret: Secret,
    pub outbound: &'a dyn Outbound,
}

/// The AWS client. Updates of a role's deny policy are serialised by the caller, through the
/// store's lock on the role (across every replica).
#[derive(Default)]
pub struct AwsClient;

impl AwsClient {
    /// STS `AssumeRole` for grant `grant_id`, narrowed by `policy`, for `duration_seconds`.
    pub async fn assume_role(
        &self,
        caller: &AwsCall<'_>,
        scope: &AwsStsScope,
        grant_id: &str,
        policy: &str,
        duration_seconds: u64,
        now: UnixTime,
    ) -> Result<StsCredentials, AwsError> {
        let identity = aws::source_identity(grant_id);
        let duration = duration_seconds.to_string();
        let answer = self
            .call(
                caller,
                Service::Sts,
                "AssumeRole",
                &[
                    ("RoleArn", &scope.role_arn),
                    ("RoleSessionName", &identity),
                    ("SourceIdentity", &identity),
                    ("Policy", policy),
                    ("DurationSeconds", &duration),
                ],
                now,
            )
            .await?;
        let malformed = |detail: String| AwsError::Malformed {
            scope: caller.scope.to_string(),
            operation: "AssumeRole",
            detail,
        };
        let document = roxmltree::Document::parse(&answer)
            .map_err(|error| malformed(format!("not XML: {error}")))?;
        let field = |name: &str| {
            document
                .descendants()
                .find(|node| node.has_tag_name(name))
                .and_then(|node| node.text())
                .map(str::trim)
                .map(str::to_string)
                .ok_or_else(|| malformed(format!("no {name} in the answer")))
        };
        let expiration = field("Expiration")?;
        let expires_at = humantime::parse_rfc3339_weak(expiration.trim_end_matches('Z'))
            .ok()
            .and_then(|at| at.duration_since(std::time::UNIX_EPOCH).ok())
            .and_then(|since| UnixTime::try_from(since.as_secs()).ok())
            .ok_or_else(|| malformed(format!("Expiration {expiration:?} is not a time")))?;
        Ok(StsCredentials {
            access_key_id: field("AccessKeyId")?,
            secret_access_key: Secret::from(field("SecretAccessKey")?),
            session_token: Secret::from(field("SessionToken")?),
            expires_at,
            assumed_role_arn: field("Arn")?,
            region: caller.credential.region.clone(),
        })
    }

    /// Denies every session of `grant_id` on the scope's role until `keep_until`, through the
    /// inline role policy Valet owns there.
    pub async fn deny_sessions(
        &self,
        caller: &AwsCall<'_>,
        role_arn: &str,
        grant_id: &str,
        keep_until: UnixTime,
        now: UnixTime,
    ) -> Result<RevocationUpdate, AwsError> {
        let role_name = role_arn.rsplit('/').next().unwrap_or(role_arn).to_string();

        let existing = match self
            .call(
                caller,
                Service::Iam,
                "GetRolePolicy",
                &[
                    ("RoleName", &role_name),
                    ("PolicyName", aws::REVOCATION_POLICY_NAME),
                ],
                now,
            )
            .await
        {
            Ok(answer) => Some(
                policy_document(&answer).map_err(|detail| AwsError::Malformed {
                    scope: caller.scope.to_string(),
                    operation: "GetRolePolicy",
                    detail,
                })?,
            ),
            Err(AwsError::Refused { code, .. }) if code == "NoSuchEntity" => None,
            Err(error) => return Err(error),
        };
        let other_policies_chars = self
            .other_inline_policies_chars(caller, &role_name, now)
            .await?;
        let update = aws::add_revoked_session(
            existing.as_deref(),
            &aws::source_identity(grant_id),
            keep_until,
            now,
            other_policies_chars,
        )
        .map_err(|detail| AwsError::Malformed {
            scope: caller.scope.to_string(),
            operation: "GetRolePolicy",
            detail,
        })?;
        self.call(
            caller,
            Service::Iam,
            "PutRolePolicy",
            &[
                ("RoleName", &role_name),
                ("PolicyName", aws::REVOCATION_POLICY_NAME),
                ("PolicyDocument", &update.document),
            ],
            now,
        )
        .await?;
        // Confirmed only when AWS reads it back: the revocation reports success on the
        // policy AWS holds, not on the one valetd sent.
        let written = self
            .call(
                caller,
                Service::Iam,
                "GetRolePolicy",
                &[
                    ("RoleName", &role_name),
                    ("PolicyName", aws::REVOCATION_POLICY_NAME),
                ],
                now,
            )
            .await?;
        let unconfirmed = |detail: String| AwsError::Malformed {
            scope: caller.scope.to_string(),
            operation: "GetRolePolicy",
            detail,
        };
        let document = policy_document(&written).map_err(&unconfirmed)?;
        let identity = aws::source_identity(grant_id);
        if !document.contains(&identity) && update.denied_all_issued_before.is_none() {
            return Err(unconfirmed(format!(
                "the deny written for {identity} does not read back from the role (another writer replaced it)"
            )));
        }
        Ok(update)
    }

    /// How many characters the role's other inline policies use (whitespace aside, as IAM
    /// counts them): IAM's 10,240-character limit is per role.
    async fn other_inline_policies_chars(
        &self,
        caller: &AwsCall<'_>,
        role_name: &str,
        now: UnixTime,
    ) -> Result<usize, AwsError> {
        let listed = self
            .call(
                caller,
                Service::Iam,
                "ListRolePolicies",
                &[("RoleName", role_name)],
                now,
            )
            .await?;
        let names: Vec<String> = roxmltree::Document::parse(&listed)
            .map_err(|error| AwsError::Malformed {
                scope: caller.scope.to_string(),
                operation: "ListRolePolicies",
                detail: format!("not XML: {error}"),
            })?
            .descendants()
            .filter(|node| node.has_tag_name("member"))
            .filter_map(|node| node.text().map(|text| text.trim().to_string()))
            .filter(|name| name != aws::REVOCATION_POLICY_NAME)
            .collect();
        let mut total = 0;
        for name in names {
            let answer = self
                .call(
                    caller,
                    Service::Iam,
                    "GetRolePolicy",
                    &[("RoleName", role_name), ("PolicyName", &name)],
                    now,
                )
                .await?;
            let document = policy_document(&answer).map_err(|detail| AwsError::Malformed {
                scope: caller.scope.to_string(),
                operation: "GetRolePolicy",
                detail,
            })?;
            total += document
                .chars()
                .filter(|character| !character.is_whitespace())
                .count();
        }
        Ok(total)
    }

    /// One signed Query API call; the answer's XML text on success.
    async fn call(
        &self,
        caller: &AwsCall<'_>,
        service: Service,
        operation: &'static str,
        parameters: &[(&str, &str)],
        now: UnixTime,
    ) -> Result<String, AwsError> {
        let credential = caller.credential;
        let (default_sts, default_iam) = aws::default_endpoints(&credential.region);
        let (endpoint, signing_region, service_name, version) = match service {
            Service::Sts => (
                credential.endpoint.clone().unwrap_or(default_sts),
                credential.region.as_str(),
                "sts",
                STS_VERSION,
            ),
            Service::Iam => (
                credential.endpoint.clone().unwrap_or(default_iam),
                aws::partition_of(&credential.region).1,
                "iam",
                IAM_VERSION,
            ),
        };
        let unreachable = |detail: String| AwsError::Unreachable {
            scope: caller.scope.to_string(),
            operation,
            endpoint: endpoint.clone(),
            detail,
        };
        let uri: http::Uri = format!("{endpoint}/")
            .parse()
            .map_err(|error| unreachable(format!("the endpoint is not a URL: {error}")))?;
        let host = uri
            .authority()
            .map(|authority| authority.as_str().to_string())
            .ok_or_else(|| unreachable("the endpoint has no host".to_string()))?;
        let body = [("Action", operation), ("Version", version)]
            .iter()
            .chain(parameters)
            .map(|(name, value)| format!("{}={}", form_encode(name), form_encode(value)))
            .collect::<Vec<_>>()
            .join("&");
        const CONTENT_TYPE: &str = "application/x-www-form-urlencoded; charset=utf-8";
        let signed = sigv4::sign(
            &sigv4::Request {
                method: "POST",
                host: &host,
                path: "/",
                query: "",
                headers: &[("content-type", CONTENT_TYPE)],
                body: body.as_bytes(),
            },
            &sigv4::Signer {
                access_key_id: &credential.access_key_id,
                secret_access_key: &caller.secret,
                session_token: None,
                region: signing_region,
                service: service_name,
            },
            now,
        );
        let mut request = http::Request::post(uri)
            .header(http::header::HOST, &host)
            .header(http::header::CONTENT_TYPE, CONTENT_TYPE)
            .header(http::header::USER_AGENT, "valetd");
        for (name, value) in &signed.headers {
            request = request.header(*name, value);
        }
        let request = request
            .body(Bytes::from(body))
            .map_err(|error| unreachable(error.to_string()))?;
        let answer = caller
            .outbound
            .send(request, CALL_TIMEOUT, MAX_ANSWER_BYTES)
            .await
            .map_err(&unreachable)?;
        let status = answer.status;
        let text = String::from_utf8_lossy(&answer.body).into_owned();
        if (200..300).contains(&status) {
            return Ok(text);
        }
        let (code, message) = error_of(&text).unwrap_or_else(|| {
            (
                format!("HTTP{status}"),
                text.chars().take(200).collect::<String>(),
            )
        });
        Err(AwsError::Refused {
            scope: caller.scope.to_string(),
            operation,
            code,
            message,
            http_status: status,
        })
    }
}

#[derive(Clone, Copy)]
enum Service {
    Sts,
    Iam,
}

/// Form-encodes `text` the way AWS's own SDKs do: unreserved characters as they are, space as
/// `+`, every other byte as `%XX`. (Some servers re-encode the parsed form to check the signature,
/// so the bytes must be the canonical ones, not merely valid.)
fn form_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(char::from(byte))
            }
            b' ' => out.push('+'),
            other => out.push_str(&format!("%{other:02X}")),
        }
    }
    out
}

/// The code and message of an AWS error answer (`<Error><Code>…</Code><Message>…</Message>`).
fn error_of(text: &str) -> Option<(String, String)> {
    let document = roxmltree::Document::parse(text).ok()?;
    let text_of = |name: &str| {
        document
            .descendants()
            .find(|node| node.has_tag_name(name))
            .and_then(|node| node.text())
            .map(|text| text.trim().to_string())
    };
    Some((text_of("Code")?, text_of("Message").unwrap_or_default()))
}

/// The policy document of a `GetRolePolicy` answer; IAM sends it URL-encoded.
fn policy_document(answer: &str) -> Result<String, String> {
    let document =
        roxmltree::Document::parse(answer).map_err(|error| format!("not XML: {error}"))?;
    let text = document
        .descendants()
        .find(|node| node.has_tag_name("PolicyDocument"))
        .and_then(|node| node.text())
        .ok_or("no PolicyDocument in the answer")?
        .trim();
    if text.starts_with('{') {
        return Ok(text.to_string());
    }
    percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .map(|decoded| decoded.into_owned())
        .map_err(|error| format!("the PolicyDocument is not URL-encoded UTF-8: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_are_encoded_like_the_aws_sdks_do() {
        assert_eq!(
            form_encode(r#"{"Resource":["arn:aws:s3:::b/*"]} ~x"#),
            "%7B%22Resource%22%3A%5B%22arn%3Aaws%3As3%3A%3A%3Ab%2F%2A%22%5D%7D+~x"
        );
    }

    #[test]
    fn aws_error_answers_are_read() {
        let answer = r#"<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <Error><Type>Sender</Type><Code>AccessDenied</Code><Message>not authorized to perform sts:AssumeRole</Message></Error>
  <RequestId>c6104cbe</RequestId></ErrorResponse>"#;
        assert_eq!(
            error_of(answer),
            Some((
                "AccessDenied".to_string(),
                "not authorized to perform sts:AssumeRole".to_string()
            ))
        );
        assert_eq!(error_of("<html>bad gateway</html>"), None);
    }

    #[test]
    fn policy_documents_are_decoded() {
        let answer = "<GetRolePolicyResponse><GetRolePolicyResult><PolicyDocument>%7B%22Version%22%3A%222012-10-17%22%7D</PolicyDocument></GetRolePolicyResult></GetRolePolicyResponse>";
        assert_eq!(
            policy_document(answer).unwrap(),
            r#"{"Version":"2012-10-17"}"#
        );
    }

    #[test]
    fn throttling_is_transient_and_a_refusal_is_not() {
        let refused = |code: &str, http_status| AwsError::Refused {
            scope: "s".into(),
            operation: "AssumeRole",
            code: code.into(),
            message: String::new(),
            http_status,
        };
        assert!(refused("Throttling", 400).is_transient());
        assert!(refused("InternalFailure", 500).is_transient());
        assert!(!refused("AccessDenied", 403).is_transient());
    }
}
