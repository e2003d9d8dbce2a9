//! The broker's operations, independent of the wire: issue, renew, revoke, introspect, reload,
//! rotate. Each one decides with valet-core, makes the outcome durable in the store, records it in
//! the audit log, and only then returns — a failure at any step fails the whole operation.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use valet_core::audit::{AuditEvent, Outcome};
use valet_core::config::{Config, Principal, Role};
use valet_core::grant::{Grant, GrantStatus, InactiveReason};
use valet_core::policy::{self, RequestError, TokenRequest};
use valet_core::token::{self, Claims, Expectations};
use valet_core::{Clock, random};
use valet_store::{GrantFilter, Store, StoreError};

use crate::audit_sink::AuditSink;
use crate::error::ApiError;
use crate::keys::Keys;
use crate::loader;
use crate::redactor::Redactor;
use crate::sts::AwsGrant;

/// Who is calling, and under which request id.
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: Principal,
    pub request_id: String,
}

/// What a token request produced: a token, or a pending approval.
#[derive(Debug)]
pub enum Issued {
    Token {
        grant: Grant,
        token: String,
        /// STS credentials, for a grant of an aws-sts scope.
        aws: Option<Box<AwsGrant>>,
    },
    Pending {
        grant: Grant,
        approval: Box<valet_core::approval::ApprovalRequest>,
    },
}

/// The answer to an introspection.
#[derive(Debug, Clone)]
pub struct Introspection {
    pub active: bool,
    pub grant: Option<Grant>,
    pub reason: Option<String>,
}

/// How many times a compare-and-swap is retried against concurrent changes before giving up.
const MAX_CAS_ATTEMPTS: usize = 8;

/// The running broker: config, keys, store, audit log and clock.
pub struct Valet {
    pub(crate) config: ArcSwap<Config>,
    /// Root credentials, read at start and on reload, and kept out of everything valetd emits.
    pub redactor: Arc<Redactor>,
    pub(crate) config_path: PathBuf,
    pub(crate) overrides: loader::Overrides,
    pub keys: Keys,
    pub store: Arc<dyn Store>,
    pub audit: AuditSink,
    /// Announces new approval requests to the webhook.
    pub(crate) notifier: crate::approvals::Notifier,
    /// Calls to AWS for aws-sts scopes.
    pub(crate) aws: crate::aws::Aws,
    pub clock: Arc<dyn Clock>,
}

impl Valet {
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// How many root credentials are loaded (never their values).
    pub fn n_credentials(&self) -> usize {
        self.redactor.n_credentials()
    }

    pub(crate) async fn record(&self, caller: &Caller, event: AuditEvent) -> Result<(), ApiError> {
        let event = event
            .with("principal", &caller.principal.name)
            .with("request_id", &caller.request_id);
        self.audit.record(event).await?;
        Ok(())
    }

    /// Records a denial, then returns it as the error (unless the audit log itself fails).
    async fn deny<T>(
        &self,
        caller: &Caller,
        event: AuditEvent,
        error: ApiError,
    ) -> Result<T, ApiError> {
        self.record(caller, event.with("reason", error.to_string()))
            .await?;
        Err(error)
    }

    /// Issues a token: decide, store the grant durably, audit, then return grant and token.
    pub async fn issue(&self, caller: &Caller, request: TokenRequest) -> Result<Issued, ApiError> {
        let config = self.config();
        let denied = || {
            AuditEvent::new("token.issue", Outcome::Denied)
                .with(
                    "scope",
                    request
                        .scope
                        .chars()
                        .take(policy::limits::MAX_SCOPE_NAME_BYTES)
                        .collect::<String>(),
                )
                .with(
                    "task_id",
                    request
                        .task_id
                        .chars()
                        .take(policy::limits::MAX_TASK_ID_BYTES)
                        .collect::<String>(),
                )
        };
        let terms = match policy::authorize(&config, &caller.principal, &request) {
            Ok(terms) => terms,
            Err(error) => return self.deny(caller, denied(), error.into()).await,
        };
        if let Some(scope) = config.scopes.get(&terms.scope)
            && let Some(policy) = &scope.approval
        {
            let (grant, pending) = self
                .request_token_approval(caller, &request, terms, scope, policy)
                .await?;
            return Ok(Issued::Pending {
                grant,
                approval: Box::new(pending),
            });
        }
        let ring = self.keys.ring();
        let signing_key = ring.current();
        let now = self.clock.now();
        let id = random::grant_id(self.clock.now_millis())
            .map_err(|error| ApiError::Key(error.into()))?;
        let grant = terms.into_grant(id, &caller.principal.name, &request, signing_key.kid(), now);
        let token = token::sign(&claims_of(&grant, &config.server.issuer, now), signing_key);
        // Native credentials are minted before anything is stored: a grant is recorded only
        // with what its requester actually receives.
        let failed = AuditEvent::new("token.issue", Outcome::Failed).with_grant(&grant);
        let aws = self
            .mint_aws_or_record(caller, &config, &grant, failed, now)
            .await?
            .map(Box::new);
        let issued = AuditEvent::new("token.issue", Outcome::Allowed)
            .with_grant(&grant)
            .with("purpose", &grant.purpose)
            .with("key_id", signing_key.kid())
            .with("token_fingerprint", token::fingerprint(&token));
        let issued = match &aws {
            Some(aws) => aws.describe(issued),
            None => issued,
        };
        // Both records must be durable before the token is handed out; they commit concurrently
        // (each in its own group commit), so the caller waits for the slower, not the sum.
        let (stored, audited) =
            tokio::join!(self.store.create_grant(&grant), self.record(caller, issued));
        match (stored, audited) {
            (Ok(()), Ok(())) => {}
            (Err(error), audited) => {
                if audited.is_ok() {
                    // The audit log says issued; say also that it was not, and why.
                    let failed = AuditEvent::new("token.issue", Outcome::Failed)
                        .with("grant_id", &grant.id)
                        .with(
                            "reason",
                            format!(
                                "the grant could not be stored, so no token was handed out: {error}"
                            ),
                        );
                    let _ = self.record(caller, failed).await;
                }
                return Err(error.into());
            }
            (Ok(()), Err(error)) => {
                // The token is never handed out; make sure the grant cannot be used either.
                if let Ok(revoked) = grant.revoked(
                    "valetd",
                    "the audit record of its issue could not be written",
                    now,
                ) {
                    let _ = self.store.update_grant(&grant, &revoked).await;
                }
                return Err(error);
            }
        }
        Ok(Issued::Token { grant, token, aws })
    }

    /// A token for an active grant, for its own principal (after an approval), with STS
    /// credentials for a grant of an aws-sts scope (a new session, recorded in the audit log).
    pub async fn token_for(
        &self,
        caller: &Caller,
        grant: &Grant,
    ) -> Result<(String, Option<AwsGrant>), ApiError> {
        let config = self.config();
        let ring = self.keys.ring();
        let now = self.clock.now();
        let token = token::sign(
            &claims_of(grant, &config.server.issuer, now),
            ring.current(),
        );
        let aws = self.mint_aws(&config, grant, now).await?;
        if let Some(aws) = &aws {
            let event =
                aws.describe(AuditEvent::new("aws.session", Outcome::Allowed).with_grant(grant));
            self.record(caller, event).await?;
        }
        Ok((token, aws))
    }

    /// Renews a grant: a later expiry (within its max lifetime) and a fresh token.
    pub async fn renew(
        &self,
        caller: &Caller,
        grant_id: &str,
        ttl: Option<std::time::Duration>,
    ) -> Result<(Grant, String, Option<AwsGrant>), ApiError> {
        let config = self.config();
        let mut current = self.owned_grant(caller, grant_id, "token.renew").await?;
        let denied =
            |grant: &Grant| AuditEvent::new("token.renew", Outcome::Denied).with_grant(grant);
        let ttl = match policy::authorize_renewal(&config, &current, ttl) {
            Ok(ttl) => ttl,
            Err(error) => return self.deny(caller, denied(&current), error.into()).await,
        };
        for _ in 0..MAX_CAS_ATTEMPTS {
            let ring = self.keys.ring();
            let now = self.clock.now();
            let renewed = match current.renewed(ttl, ring.current().kid(), now) {
                Ok(renewed) => renewed,
                Err(error) => return self.deny(caller, denied(&current), error.into()).await,
            };
            // STS sessions cannot be extended: a renewal is a new session for the new lifetime.
            let failed = AuditEvent::new("token.renew", Outcome::Failed).with_grant(&current);
            let aws = self
                .mint_aws_or_record(caller, &config, &renewed, failed, now)
                .await?;
            match self.store.update_grant(&current, &renewed).await {
                Ok(()) => {
                    let token = token::sign(
                        &claims_of(&renewed, &config.server.issuer, now),
                        ring.current(),
                    );
                    let event = AuditEvent::new("token.renew", Outcome::Allowed)
                        .with_grant(&renewed)
                        .with("key_id", ring.current().kid())
                        .with("token_fingerprint", token::fingerprint(&token));
                    let event = match &aws {
                        Some(aws) => aws.describe(event),
                        None => event,
                    };
                    self.record(caller, event).await?;
                    return Ok((renewed, token, aws));
                }
                Err(StoreError::Conflict { .. }) => current = self.fetch(grant_id).await?,
                Err(error) => return Err(error.into()),
            }
        }
        Err(StoreError::Conflict {
            id: grant_id.to_string(),
        }
        .into())
    }

    /// Revokes one grant. Revoking a grant that is no longer active changes nothing in Valet;
    /// for a revoked grant of an aws-sts scope it writes the deny at AWS again. Returns what the
    /// revocation means outside Valet, when that needs saying.
    pub async fn revoke_grant(
        &self,
        caller: &Caller,
        grant_id: &str,
        reason: &str,
    ) -> Result<(Grant, Option<String>), ApiError> {
        policy::check_text("reason", reason, policy::limits::MAX_REASON_BYTES, false)?;
        let grant = self.owned_grant(caller, grant_id, "token.revoke").await?;
        let (grant, at_aws) = self
            .revoke(caller, grant, reason_or_default(reason), "token.revoke")
            .await?;
        Ok((grant, at_aws?))
    }

    /// Revokes every grant of a task the caller may act on.
    pub async fn revoke_task(
        &self,
        caller: &Caller,
        task_id: &str,
        reason: &str,
    ) -> Result<Vec<Grant>, ApiError> {
        policy::check_task_id(task_id)?;
        policy::check_text("reason", reason, policy::limits::MAX_REASON_BYTES, false)?;
        let mut revoked = Vec::new();
        for grant in self.store.task_grants(task_id).await? {
            if policy::may_act_on(&caller.principal, &grant).is_err()
                || grant.status_at(self.clock.now()) != GrantStatus::Active
            {
                continue;
            }
            revoked.push(
                self.revoke(caller, grant, reason_or_default(reason), "task.revoke")
                    .await?
                    .0,
            );
        }
        Ok(revoked)
    }

    /// Revokes every active grant matching `filter`: the panic button. Operators only.
    pub async fn revoke_all(
        &self,
        caller: &Caller,
        filter: GrantFilter,
        reason: &str,
    ) -> Result<Vec<Grant>, ApiError> {
        policy::require_role(
            &caller.principal,
            Role::Operator,
            "revoking all grants of a target",
        )?;
        policy::check_reason(reason)?;
        let filter = GrantFilter {
            status: Some(GrantStatus::Active),
            ..filter
        };
        let mut revoked = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self
                .store
                .list_grants(&filter, self.clock.now(), after.as_deref(), 500)
                .await?;
            for grant in page.grants {
                revoked.push(self.revoke(caller, grant, reason, "revoke_all").await?.0);
            }
            match page.next_after {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        Ok(revoked)
    }

    /// Revokes `current` in Valet (the outer result), then at AWS for an aws-sts scope (the
    /// inner one: a failure there is audited and reported, and never stops a batch revocation).
    async fn revoke(
        &self,
        caller: &Caller,
        mut current: Grant,
        reason: &str,
        action: &str,
    ) -> Result<(Grant, Result<Option<String>, ApiError>), ApiError> {
        for _ in 0..MAX_CAS_ATTEMPTS {
            let now = self.clock.now();
            let Ok(revoked) = current.revoked(&caller.principal.name, reason, now) else {
                if current.status == GrantStatus::Revoked {
                    let at_aws = self.revoke_at_aws(caller, &current, now).await?;
                    return Ok((current, at_aws));
                }
                return Ok((current, Ok(None)));
            };
            match self.store.update_grant(&current, &revoked).await {
                Ok(()) => {
                    let event = AuditEvent::new("token.revoke", Outcome::Allowed)
                        .with_grant(&revoked)
                        .with("via", action)
                        .with("reason", reason);
                    self.record(caller, event).await?;
                    let at_aws = self.revoke_at_aws(caller, &revoked, now).await?;
                    return Ok((revoked, at_aws));
                }
                Err(StoreError::Conflict { .. }) => current = self.fetch(&current.id).await?,
                Err(error) => return Err(error.into()),
            }
        }
        Err(StoreError::Conflict { id: current.id }.into())
    }

    async fn revoke_at_aws(
        &self,
        caller: &Caller,
        revoked: &Grant,
        now: valet_core::UnixTime,
    ) -> Result<Result<Option<String>, ApiError>, ApiError> {
        match self.deny_aws(revoked, now).await {
            Ok(None) => Ok(Ok(None)),
            Ok(Some((notice, event))) => {
                self.record(caller, event).await?;
                Ok(Ok(Some(notice)))
            }
            Err(error) => {
                tracing::error!(grant_id = %revoked.id, %error, "the revocation could not be written at AWS");
                let failed = AuditEvent::new("aws.revoke", Outcome::Failed)
                    .with_grant(revoked)
                    .with("reason", error.to_string());
                self.record(caller, failed).await?;
                Ok(Err(error))
            }
        }
    }

    /// Is this token active? Verifies it, reads its grant, and counts a use when uses are limited.
    pub async fn introspect(
        &self,
        caller: &Caller,
        token: &str,
    ) -> Result<Introspection, ApiError> {
        let config = self.config();
        let now = self.clock.now();
        let denied = || {
            AuditEvent::new("token.introspect", Outcome::Denied)
                .with("token_fingerprint", token::fingerprint(token))
        };
        let expectations = Expectations {
            issuer: &config.server.issuer,
            audience: None,
            now,
            leeway_seconds: 0,
        };
        let claims = match token::verify(token, self.keys.ring().as_ref(), expectations) {
            Ok(claims) => claims,
            Err(error) => {
                self.record(caller, denied().with("reason", error.to_string()))
                    .await?;
                return Ok(Introspection {
                    active: false,
                    grant: None,
                    reason: Some(error.to_string()),
                });
            }
        };
        let Some(mut current) = self.store.get_grant(&claims.jti).await? else {
            let reason = format!("grant {} is not known (it ended and was swept)", claims.jti);
            self.record(
                caller,
                denied()
                    .with("grant_id", &claims.jti)
                    .with("reason", &reason),
            )
            .await?;
            return Ok(Introspection {
                active: false,
                grant: None,
                reason: Some(reason),
            });
        };
        if let Err(error) = policy::may_act_on(&caller.principal, &current) {
            return self
                .deny(caller, denied().with_grant(&current), error.into())
                .await;
        }
        for _ in 0..MAX_CAS_ATTEMPTS {
            let inactive = |grant: Grant, reason: InactiveReason| Introspection {
                active: false,
                grant: Some(grant),
                reason: Some(reason.to_string()),
            };
            let used = match current.used(now) {
                Ok(used) => used,
                Err(reason) => {
                    self.record(
                        caller,
                        denied()
                            .with_grant(&current)
                            .with("reason", reason.to_string()),
                    )
                    .await?;
                    return Ok(inactive(current, reason));
                }
            };
            if current.max_uses.is_none() {
                return Ok(Introspection {
                    active: true,
                    grant: Some(current),
                    reason: None,
                });
            }
            match self.store.update_grant(&current, &used).await {
                Ok(()) => {
                    return Ok(Introspection {
                        active: true,
                        grant: Some(used),
                        reason: None,
                    });
                }
                Err(StoreError::Conflict { .. }) => current = self.fetch(&claims.jti).await?,
                Err(error) => return Err(error.into()),
            }
        }
        Err(StoreError::Conflict { id: claims.jti }.into())
    }

    /// Re-reads the config file and applies it atomically; on any problem the running config stays.
    pub async fn reload(&self, caller: Option<&Caller>) -> Result<Arc<Config>, ApiError> {
        let outcome = loader::load_config(&self.config_path, &self.overrides);
        let who = caller
            .map(|caller| caller.principal.name.as_str())
            .unwrap_or("SIGHUP");
        let event = |outcome| {
            let event = AuditEvent::new("config.reload", outcome)
                .with("path", self.config_path.display().to_string());
            match caller {
                Some(caller) => event
                    .with("principal", &caller.principal.name)
                    .with("request_id", &caller.request_id),
                None => event.with("principal", who),
            }
        };
        match outcome {
            Ok(loaded) => {
                let running = self.config();
                if loaded.config.server.listen != running.server.listen
                    || loaded.config.server.data_dir != running.server.data_dir
                {
                    tracing::warn!(
                        "server.listen and server.data_dir changes take effect at the next restart"
                    );
                }
                self.audit.record(event(Outcome::Allowed)).await?;
                self.redactor.replace(loaded.credentials);
                self.config.store(Arc::new(loaded.config));
                tracing::info!(by = who, "config reloaded");
                Ok(self.config())
            }
            Err(error) => {
                self.audit
                    .record(event(Outcome::Denied).with("reason", error.to_string()))
                    .await?;
                tracing::error!(by = who, %error, "config reload refused; the running config stays in force");
                Err(ApiError::Reload(Box::new(error)))
            }
        }
    }

    /// Rotates the signing key. Admins only.
    pub async fn rotate_signing_key(&self, caller: &Caller) -> Result<(String, String), ApiError> {
        if let Err(error) =
            policy::require_role(&caller.principal, Role::Admin, "rotating the signing key")
        {
            return self
                .deny(
                    caller,
                    AuditEvent::new("key.rotate", Outcome::Denied),
                    error.into(),
                )
                .await;
        }
        let (new_kid, retired_kid) = self.keys.rotate(self.config().server.max_ttl).await?;
        let event = AuditEvent::new("key.rotate", Outcome::Allowed)
            .with("key_id", &new_kid)
            .with("retired_key_id", &retired_kid);
        self.record(caller, event).await?;
        Ok((new_kid, retired_kid))
    }

    /// Requires a role, recording the denial when it is missing.
    pub async fn require_role(
        &self,
        caller: &Caller,
        role: Role,
        action: &'static str,
    ) -> Result<(), ApiError> {
        match policy::require_role(&caller.principal, role, action) {
            Ok(()) => Ok(()),
            Err(error) => {
                self.deny(
                    caller,
                    AuditEvent::new("access", Outcome::Denied).with("attempted", action),
                    error.into(),
                )
                .await
            }
        }
    }

    async fn fetch(&self, grant_id: &str) -> Result<Grant, ApiError> {
        self.store
            .get_grant(grant_id)
            .await?
            .ok_or_else(|| ApiError::GrantNotFound {
                id: grant_id.to_string(),
            })
    }

    /// Reads a grant the caller may act on (its own, or any for operators).
    async fn owned_grant(
        &self,
        caller: &Caller,
        grant_id: &str,
        action: &str,
    ) -> Result<Grant, ApiError> {
        if grant_id.is_empty() || grant_id.len() > policy::limits::MAX_GRANT_ID_BYTES {
            return Err(RequestError::FieldInvalid {
                field: "grant_id",
                value: grant_id
                    .chars()
                    .take(policy::limits::MAX_GRANT_ID_BYTES)
                    .collect(),
                allowed: "a grant id as RequestToken returned it (26 characters)",
            }
            .into());
        }
        let grant = self.fetch(grant_id).await?;
        if let Err(error) = policy::may_act_on(&caller.principal, &grant) {
            return self
                .deny(
                    caller,
                    AuditEvent::new(action, Outcome::Denied).with_grant(&grant),
                    error.into(),
                )
                .await;
        }
        Ok(grant)
    }
}

fn reason_or_default(reason: &str) -> &str {
    if reason.is_empty() {
        "no reason given"
    } else {
        reason
    }
}

/// The claims of a grant's token, issued at `now`.
fn claims_of(grant: &Grant, issuer: &str, now: valet_core::UnixTime) -> Claims {
    Claims {
        iss: issuer.to_string(),
        sub: grant.principal.clone(),
        aud: grant.audience.clone(),
        iat: now,
        nbf: now,
        exp: grant.expires_at,
        jti: grant.id.clone(),
        task: grant.task_id.clone(),
        scope: grant.scope.clone(),
        env: grant.environment.clone(),
        params: grant.params.clone(),
    }
}
