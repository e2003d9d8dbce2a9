//! Grants of `aws-sts` scopes: minting their STS credentials (on issue, renewal and approval),
//! denying their sessions on revocation, and saying plainly what both mean at AWS.

use valet_core::audit::{AuditAction, AuditEvent, Outcome};
use valet_core::aws::{MAX_SESSION_SECONDS, MIN_SESSION_SECONDS, REVOCATION_POLICY_NAME};
use valet_core::clock::format_time;
use valet_core::config::{AwsRevoke, AwsStsScope, Config};
use valet_core::grant::Grant;
use valet_core::{UnixTime, aws};

use crate::Valet;
use crate::aws_client::{AwsCall, AwsError, StsCredentials};
use crate::error::ServiceError;

/// STS credentials for one grant, and what the requester should know about them.
#[derive(Debug, Clone)]
pub struct AwsGrant {
    pub credentials: StsCredentials,
    pub notice: String,
    session_policy: String,
}

impl AwsGrant {
    /// The session sealed for the grant's record (base64), bound to `grant_id`.
    fn seal(&self, keys: &crate::keys::Keys, grant_id: &str) -> Result<String, ServiceError> {
        use base64::Engine;
        let credentials = &self.credentials;
        let plain = serde_json::json!({
            "access_key_id": credentials.access_key_id,
            "secret_access_key": credentials.secret_access_key.expose_str().unwrap_or_default(),
            "session_token": credentials.session_token.expose_str().unwrap_or_default(),
            "expires_at": credentials.expires_at,
            "assumed_role_arn": credentials.assumed_role_arn,
            "region": credentials.region,
            "notice": self.notice,
            "session_policy": self.session_policy,
        })
        .to_string();
        let sealed = keys.seal(plain.as_bytes(), &format!("aws-session:{grant_id}"))?;
        let mut plain = plain.into_bytes();
        zeroize::Zeroize::zeroize(&mut plain);
        Ok(base64::engine::general_purpose::STANDARD.encode(sealed))
    }

    /// A session sealed by [`AwsGrant::seal`] for `grant_id`.
    fn open(
        sealed: &str,
        keys: &crate::keys::Keys,
        grant_id: &str,
    ) -> Result<AwsGrant, ServiceError> {
        use base64::Engine;
        let unreadable = || {
            ServiceError::Internal(format!(
                "grant {grant_id}'s sealed STS session cannot be read"
            ))
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(sealed)
            .map_err(|_| unreadable())?;
        let plain = keys.unseal(&bytes, &format!("aws-session:{grant_id}"))?;
        let value: serde_json::Value =
            serde_json::from_slice(plain.expose()).map_err(|_| unreadable())?;
        let text = |name: &str| value[name].as_str().unwrap_or_default().to_string();
        Ok(AwsGrant {
            credentials: StsCredentials {
                access_key_id: text("access_key_id"),
                secret_access_key: valet_core::Secret::from(text("secret_access_key")),
                session_token: valet_core::Secret::from(text("session_token")),
                expires_at: value["expires_at"].as_i64().ok_or_else(unreadable)?,
                assumed_role_arn: text("assumed_role_arn"),
                region: text("region"),
            },
            notice: text("notice"),
            session_policy: text("session_policy"),
        })
    }

    /// Audit fields: which session, which policy, until when. Never the secret parts.
    pub fn describe(&self, event: AuditEvent) -> AuditEvent {
        event
            .with("aws_session", &self.credentials.assumed_role_arn)
            .with("aws_access_key_id", &self.credentials.access_key_id)
            .with(
                "aws_credentials_expire_at",
                format_time(self.credentials.expires_at),
            )
            .with("aws_session_policy", &self.session_policy)
    }
}

impl Valet {
    /// Mints STS credentials for `grant` when its scope is an aws-sts scope; `None` otherwise.
    pub(crate) async fn mint_aws(
        &self,
        config: &Config,
        grant: &Grant,
        now: UnixTime,
    ) -> Result<Option<AwsGrant>, ServiceError> {
        let Some((scope, caller)) = self.aws_scope(config, &grant.scope)? else {
            return Ok(None);
        };
        let session_policy =
            aws::session_policy(scope, &grant.params).map_err(|error| AwsError::Policy {
                scope: grant.scope.clone(),
                error,
            })?;
        let lifetime = u64::try_from(grant.expires_at - now).unwrap_or(0);
        let duration = lifetime.clamp(MIN_SESSION_SECONDS, MAX_SESSION_SECONDS);
        let credentials = self
            .aws
            .assume_role(&caller, scope, &grant.id, &session_policy, duration, now)
            .await?;
        let mut notice = Vec::new();
        if credentials.expires_at > grant.expires_at {
            notice.push(format!(
                "STS sessions last at least {MIN_SESSION_SECONDS} s, so these credentials work until {}, {} s after the grant expires at {}; Valet treats the grant as ended at its own expiry.",
                format_time(credentials.expires_at),
                credentials.expires_at - grant.expires_at,
                format_time(grant.expires_at),
            ));
        }
        notice.push(revocation_notice(scope, &credentials));
        Ok(Some(AwsGrant {
            credentials,
            notice: notice.join(" "),
            session_policy,
        }))
    }

    /// What `grant`'s new STS credentials were issued on, for its record: the revocation of a
    /// grant lands on the role its sessions assumed, whatever the config says later.
    pub(crate) fn aws_issue(
        &self,
        config: &Config,
        grant: &Grant,
        minted: &AwsGrant,
    ) -> Result<Option<valet_core::grant::AwsIssue>, ServiceError> {
        let Some(scope) = config.scopes.get(&grant.scope) else {
            return Ok(None);
        };
        let Some(aws_scope) = scope.aws.as_ref() else {
            return Ok(None);
        };
        let sessions_until = grant
            .aws
            .as_ref()
            .map(|issue| issue.sessions_until)
            .unwrap_or(0)
            .max(minted.credentials.expires_at);
        Ok(Some(valet_core::grant::AwsIssue {
            role_arn: aws_scope.role_arn.clone(),
            credential: scope.credential.clone(),
            revoke: aws_scope.revoke.as_str().to_string(),
            sessions_until,
            sealed_session: Some(minted.seal(&self.keys, &grant.id)?),
        }))
    }

    /// The session already issued for `grant`, when it is still valid at `now`.
    pub(crate) fn issued_session(&self, grant: &Grant, now: UnixTime) -> Option<AwsGrant> {
        let sealed = grant.aws.as_ref()?.sealed_session.as_deref()?;
        AwsGrant::open(sealed, &self.keys, &grant.id)
            .ok()
            .filter(|session| session.credentials.expires_at > now)
    }

    /// After `grant` was revoked (or ended while its sessions live on): deny its sessions at AWS
    /// on the role they were issued on, when that is how the scope said to revoke them. Returns
    /// what the revocation means at AWS, for the caller; `None` for a grant of a Valet scope.
    pub(crate) async fn deny_aws(
        &self,
        grant: &Grant,
        now: UnixTime,
    ) -> Result<Option<(String, AuditEvent)>, ServiceError> {
        let config = self.config();
        // What the sessions were issued on; for a record from before grants kept it, the config.
        let issue = match &grant.aws {
            Some(issue) => issue.clone(),
            None => {
                let Some(scope) = config.scopes.get(&grant.scope) else {
                    return Ok(None);
                };
                let Some(aws_scope) = &scope.aws else {
                    return Ok(None);
                };
                valet_core::grant::AwsIssue {
                    role_arn: aws_scope.role_arn.clone(),
                    credential: scope.credential.clone(),
                    revoke: aws_scope.revoke.as_str().to_string(),
                    sealed_session: None,
                    // The newest session was minted at the latest now, for at least the minimum
                    // session length, and never past the grant's expiry when that is later.
                    sessions_until: grant
                        .expires_at
                        .max(now + i64::try_from(MIN_SESSION_SECONDS).unwrap_or(900)),
                }
            }
        };
        let keep_until = issue.sessions_until;
        let event = |event: AuditEvent| {
            event
                .with_grant(grant)
                .with("aws_role_arn", &issue.role_arn)
                .with("aws_revoke", &issue.revoke)
        };
        if keep_until <= now {
            return Ok(Some((
                format!(
                    "Revoked in Valet. Every STS session of the grant expired by {}; there is nothing left to deny at AWS.",
                    format_time(keep_until)
                ),
                event(AuditEvent::new(AuditAction::AwsRevoke, Outcome::Allowed))
                    .with("in_force_at_aws", "none: every session expired"),
            )));
        }
        if issue.revoke != AwsRevoke::RolePolicy.as_str() {
            return Ok(Some((
                format!(
                    "Revoked in Valet. AWS keeps honouring the grant's STS credentials until they expire (by {}): the scope uses revoke = \"expiry\", and STS cannot end one session.",
                    format_time(keep_until)
                ),
                event(AuditEvent::new(AuditAction::AwsRevoke, Outcome::Allowed))
                    .with("in_force_at_aws", format_time(keep_until)),
            )));
        }
        let credential = config
            .credentials
            .get(&issue.credential)
            .and_then(|credential| credential.aws.as_ref());
        let secret = self.vault.get(&issue.credential);
        let (Some(credential), Some(secret)) = (credential, secret) else {
            return Err(ServiceError::AwsRevocation {
                grant_id: grant.id.clone(),
                until: format_time(keep_until),
                error: Box::new(AwsError::NotLoaded {
                    scope: grant.scope.clone(),
                    credential: issue.credential.clone(),
                }),
            });
        };
        let caller = AwsCall {
            scope: &grant.scope,
            credential,
            secret,
            outbound: self.outbound.as_ref(),
        };
        // The role's deny policy is read, changed and written back: every replica takes the
        // role's lock in the store first, so no two revocations lose each other's entries.
        let _role_lock = self
            .store
            .lock(&format!("aws-role/{}", issue.role_arn))
            .await?;
        let update = self
            .aws
            .deny_sessions(&caller, &issue.role_arn, &grant.id, keep_until, now)
            .await
            .map_err(|error| ServiceError::AwsRevocation {
                grant_id: grant.id.clone(),
                until: format_time(keep_until),
                error: Box::new(error),
            })?;
        let notice = match update.denied_all_issued_before {
            None => format!(
                "Revoked in Valet and at AWS: the role policy {REVOCATION_POLICY_NAME} on {} denies the grant's sessions (aws:SourceIdentity {}).",
                issue.role_arn,
                aws::source_identity(&grant.id)
            ),
            Some(before) => format!(
                "Revoked in Valet and at AWS. Too many revoked sessions to name one by one, so the role policy {REVOCATION_POLICY_NAME} on {} now denies every session of the role issued before {}; other grants of the role get working credentials again by renewing.",
                issue.role_arn,
                format_time(before)
            ),
        };
        let event = event(AuditEvent::new(AuditAction::AwsRevoke, Outcome::Allowed))
            .with("aws_policy_name", REVOCATION_POLICY_NAME)
            .with(
                "aws_denied_issued_before",
                update
                    .denied_all_issued_before
                    .map(format_time)
                    .unwrap_or_default(),
            );
        Ok(Some((notice, event)))
    }

    fn aws_scope<'a>(
        &'a self,
        config: &'a Config,
        scope_name: &str,
    ) -> Result<Option<(&'a AwsStsScope, AwsCall<'a>)>, ServiceError> {
        let Some(scope) = config.scopes.get(scope_name) else {
            return Ok(None);
        };
        let Some(aws_scope) = &scope.aws else {
            return Ok(None);
        };
        let credential = config
            .credentials
            .get(&scope.credential)
            .and_then(|credential| credential.aws.as_ref());
        let secret = self.vault.get(&scope.credential);
        match (credential, secret) {
            (Some(credential), Some(secret)) => Ok(Some((
                aws_scope,
                AwsCall {
                    scope: &scope.name,
                    credential,
                    secret,
                    outbound: self.outbound.as_ref(),
                },
            ))),
            _ => Err(AwsError::NotLoaded {
                scope: scope_name.to_string(),
                credential: scope.credential.clone(),
            }
            .into()),
        }
    }
}

fn revocation_notice(scope: &AwsStsScope, credentials: &StsCredentials) -> String {
    match scope.revoke {
        AwsRevoke::AtExpiry => format!(
            "Revoking the grant does not stop these credentials before {} (the scope uses revoke = \"expiry\"; STS cannot end one session).",
            format_time(credentials.expires_at)
        ),
        AwsRevoke::RolePolicy => format!(
            "Revoking the grant denies its sessions at once through the role policy {REVOCATION_POLICY_NAME} on {}.",
            scope.role_arn
        ),
    }
}
