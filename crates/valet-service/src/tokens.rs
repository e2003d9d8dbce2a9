//! Tokens: issuing one for a scope (or opening an approval request instead), renewing one, and
//! introspecting one. Each decides with valet-core, makes the grant durable, records the audit
//! record, and only then answers.

use std::time::Duration;

use valet_core::audit::{AuditAction, AuditEvent, Outcome};
use valet_core::grant::{Grant, InactiveReason};
use valet_core::policy::{self, TokenRequest};
use valet_core::token::{self, Expectations, Token};
use valet_core::{GrantId, Secret};

use crate::aws_grants::AwsGrant;
use crate::compare_and_swap::{Decision, Swapped, compare_and_swap, compare_and_swap_awaiting};
use crate::{Caller, ServiceError, Valet, context};

/// What a token request produced: a token, or a pending approval.
#[derive(Debug)]
pub enum Issued {
    Token {
        grant: Grant,
        token: Token,
        /// STS credentials, for a grant of an aws-sts scope.
        aws: Option<Box<AwsGrant>>,
    },
    Pending {
        grant: Grant,
        approval: Box<valet_core::approval::ApprovalRequest>,
    },
}

/// A renewed grant and, for its own principal, its fresh token. An operator renewing another
/// principal's grant extends it and receives no token: only the requester ever does.
#[derive(Debug)]
pub struct Renewed {
    pub grant: Grant,
    pub token: Option<Token>,
    pub aws: Option<AwsGrant>,
}

/// The answer to an introspection.
#[derive(Debug, Clone)]
pub struct Introspection {
    pub active: bool,
    pub grant: Option<Grant>,
    pub reason: Option<String>,
}

impl Valet {
    /// Issues a token: decide, store the grant durably, audit, then return grant and token. A
    /// scope that needs approval gets a pending grant and an approval request instead.
    pub async fn issue(
        &self,
        caller: &Caller,
        request: TokenRequest,
    ) -> Result<Issued, ServiceError> {
        let mut context = context(AuditAction::TokenIssue)
            .with(
                "scope",
                bounded(&request.scope, policy::limits::MAX_SCOPE_NAME_BYTES),
            )
            .with(
                "task_id",
                bounded(&request.task_id, policy::limits::MAX_TASK_ID_BYTES),
            );
        let outcome = self.issue_decided(caller, &request, &mut context).await;
        self.answer(caller, context, outcome).await
    }

    async fn issue_decided(
        &self,
        caller: &Caller,
        request: &TokenRequest,
        context: &mut AuditEvent,
    ) -> Result<Issued, ServiceError> {
        let config = self.config();
        let terms = policy::authorize(&config, &caller.principal, request)?;
        if let Some(scope) = config.scopes.get(&terms.scope)
            && let Some(approval) = &scope.approval
        {
            let (grant, pending) = self
                .request_token_approval(caller, request, terms, approval)
                .await?;
            return Ok(Issued::Pending {
                grant,
                approval: Box::new(pending),
            });
        }
        let ring = self.keys.ring()?;
        let signing_key = ring.current();
        let now = self.clock.now();
        let id = GrantId::generate(self.clock.now_millis())?;
        let mut grant = terms.into_grant(
            id.into_string(),
            &caller.principal.name,
            request,
            signing_key.kid(),
            now,
        );
        grant.authenticated_by = Some(caller.authentication.clone());
        context.set_grant(&grant);
        let token = token::issue(&grant.claims(&config.server.issuer, now), signing_key);
        // Native credentials are minted before anything is stored: a grant is recorded only
        // with what its requester actually receives.
        let aws = self.mint_aws(&config, &grant, now).await?.map(Box::new);
        if let Some(minted) = &aws {
            grant.aws = self.aws_issue(&config, &grant, minted)?;
        }
        let issued = AuditEvent::new(AuditAction::TokenIssue, Outcome::Allowed)
            .with_grant(&grant)
            .with("purpose", &grant.purpose)
            .with("key_id", signing_key.kid())
            .with("token_fingerprint", token.fingerprint());
        let issued = match &aws {
            Some(aws) => aws.describe(issued),
            None => issued,
        };
        match self.commit_issue(caller, &grant, issued).await {
            Ok(()) => Ok(Issued::Token { grant, token, aws }),
            Err(error @ ServiceError::Audit(_)) => {
                // The token is never handed out; make sure the grant cannot be used either.
                if let Ok(revoked) = grant.revoked(
                    "valetd",
                    "the audit record of its issue could not be written",
                    now,
                ) {
                    let _ = self.store.update_grant(&grant, &revoked).await;
                }
                Err(error)
            }
            Err(error) => Err(error),
        }
    }

    /// A token for an active grant, for its own principal (after an approval), recorded as
    /// issued (`token.issue`, `via: "wait"`), with STS credentials for a grant of an aws-sts
    /// scope (a new session, recorded in the audit log).
    pub(crate) async fn token_for(
        &self,
        caller: &Caller,
        grant: &Grant,
    ) -> Result<(Token, Option<AwsGrant>), ServiceError> {
        policy::may_receive_token(&caller.principal, grant)?;
        let config = self.config();
        let ring = self.keys.ring()?;
        let now = self.clock.now();
        let token = token::issue(&grant.claims(&config.server.issuer, now), ring.current());
        // Every token handed out is issued, on the record, before it leaves: here the one a
        // grant's wait releases (after an approval, or again for an active grant).
        let issued = AuditEvent::new(AuditAction::TokenIssue, Outcome::Allowed)
            .with_grant(grant)
            .with("purpose", &grant.purpose)
            .with("key_id", ring.current().kid())
            .with("token_fingerprint", token.fingerprint())
            .with("via", "wait");
        self.record(caller, issued).await?;
        // The session already issued, while it is valid: waiting again does not mint another.
        if let Some(issued) = self.issued_session(grant, now) {
            let event = issued.describe(
                AuditEvent::new(AuditAction::AwsSession, Outcome::Allowed)
                    .with_grant(grant)
                    .with("session", "already issued"),
            );
            self.record(caller, event).await?;
            return Ok((token, Some(issued)));
        }
        let aws = self.mint_aws(&config, grant, now).await?;
        if let Some(minted) = &aws {
            // The grant keeps what its new session was issued on, for its revocation, and the
            // session itself, sealed, for the next wait.
            let stored = self.fetch_grant(&grant.id).await?;
            compare_and_swap(self.store.as_ref(), stored, |current: &Grant| {
                Ok(Decision::Write(
                    Grant {
                        aws: self.aws_issue(&config, current, minted)?,
                        ..current.clone()
                    },
                    (),
                ))
            })
            .await?;
        }
        if let Some(aws) = &aws {
            let event = aws.describe(
                AuditEvent::new(AuditAction::AwsSession, Outcome::Allowed).with_grant(grant),
            );
            self.record(caller, event).await?;
        }
        Ok((token, aws))
    }

    /// Renews a grant: a later expiry (within its max lifetime) and a fresh token.
    pub async fn renew(
        &self,
        caller: &Caller,
        grant_id: &str,
        ttl: Option<Duration>,
    ) -> Result<Renewed, ServiceError> {
        let mut context = context(AuditAction::TokenRenew);
        let outcome = self
            .renew_decided(caller, grant_id, ttl, &mut context)
            .await;
        self.answer(caller, context, outcome).await
    }

    async fn renew_decided(
        &self,
        caller: &Caller,
        grant_id: &str,
        ttl: Option<Duration>,
        context: &mut AuditEvent,
    ) -> Result<Renewed, ServiceError> {
        let grant_id = GrantId::parse(grant_id)?;
        let config = self.config();
        let current = self.grant_for_action(caller, &grant_id, context).await?;
        let ttl = policy::authorize_renewal(&config, &current, ttl)?;
        context.set_grant(&current);
        let for_requester = policy::may_receive_token(&caller.principal, &current).is_ok();
        if !for_requester
            && config
                .scopes
                .get(&current.scope)
                .is_some_and(|scope| scope.aws.is_some())
        {
            // Renewing an aws-sts grant mints a new STS session, which only the requester may
            // receive; an operator cannot extend credentials it would not hand over.
            return Err(policy::AccessError::NotRequester {
                grant_id: current.id.clone(),
            }
            .into());
        }
        let config = &config;
        let swapped = compare_and_swap_awaiting(self.store.as_ref(), current, |current: Grant| {
            Box::pin(async move {
                let ring = self.keys.ring()?;
                let now = self.clock.now();
                let mut renewed = current.renewed(ttl, ring.current().kid(), now)?;
                // STS sessions cannot be extended: a renewal is a new session for the new
                // lifetime, minted before the renewal is stored.
                let aws = match for_requester {
                    true => self.mint_aws(config, &renewed, now).await?,
                    false => None,
                };
                if let Some(minted) = &aws {
                    renewed.aws = self.aws_issue(config, &renewed, minted)?;
                }
                Ok(Decision::Write(renewed, (ring, aws, now)))
            })
        })
        .await?;
        let Swapped::Written {
            after: renewed,
            extra: (ring, aws, now),
        } = swapped
        else {
            return Err(ServiceError::Internal(
                "a renewal decided to write nothing".into(),
            ));
        };
        let token = for_requester
            .then(|| token::issue(&renewed.claims(&config.server.issuer, now), ring.current()));
        let event = AuditEvent::new(AuditAction::TokenRenew, Outcome::Allowed)
            .with_grant(&renewed)
            .with("key_id", ring.current().kid())
            .with(
                "token_fingerprint",
                token.as_ref().map(Token::fingerprint).unwrap_or_default(),
            );
        let event = match &aws {
            Some(aws) => aws.describe(event),
            None => event,
        };
        self.record(caller, event).await?;
        Ok(Renewed {
            grant: renewed,
            token,
            aws,
        })
    }

    /// Is this token active? Verifies it, reads its grant, and counts a use when uses are
    /// limited. An inactive token is an answer, not a refusal: it is recorded as denied and
    /// reported with its reason.
    pub async fn introspect(
        &self,
        caller: &Caller,
        token: &Token,
    ) -> Result<Introspection, ServiceError> {
        let mut context =
            context(AuditAction::TokenIntrospect).with("token_fingerprint", token.fingerprint());
        let outcome = self.introspect_decided(caller, token, &mut context).await;
        self.answer(caller, context, outcome).await
    }

    async fn introspect_decided(
        &self,
        caller: &Caller,
        token: &Token,
        context: &mut AuditEvent,
    ) -> Result<Introspection, ServiceError> {
        let config = self.config();
        let now = self.clock.now();
        let inactive = async |context: &AuditEvent, grant: Option<Grant>, reason: String| {
            let mut event = context.clone().with("reason", &reason);
            if let Some(grant) = &grant {
                event.set_grant(grant);
            }
            self.record(caller, event).await?;
            Ok::<_, ServiceError>(Introspection {
                active: false,
                grant,
                reason: Some(reason),
            })
        };
        let expectations = Expectations {
            issuer: &config.server.issuer,
            audience: None,
            now,
            leeway_seconds: 0,
        };
        let claims = match token::verify(token.expose(), self.keys.ring()?.as_ref(), expectations) {
            Ok(claims) => claims,
            Err(error) => return inactive(context, None, error.to_string()).await,
        };
        context.set("grant_id", &claims.jti);
        let Some(current) = self.store.get_grant(&claims.jti).await? else {
            let reason = format!("grant {} is not known (it ended and was swept)", claims.jti);
            return inactive(context, None, reason).await;
        };
        context.set_grant(&current);
        policy::may_act_on(&caller.principal, &current)?;
        let swapped = compare_and_swap(self.store.as_ref(), current, |current: &Grant| {
            Ok(match current.used(now) {
                Err(reason) => Decision::Keep(Some(reason)),
                Ok(_) if current.max_uses.is_none() => Decision::Keep(None),
                Ok(used) => Decision::Write(used, None::<InactiveReason>),
            })
        })
        .await?;
        match swapped {
            Swapped::Kept {
                current,
                extra: Some(reason),
            } => inactive(context, Some(current), reason.to_string()).await,
            Swapped::Kept {
                current: grant,
                extra: None,
            }
            | Swapped::Written { after: grant, .. } => Ok(Introspection {
                active: true,
                grant: Some(grant),
                reason: None,
            }),
        }
    }

    /// Reads a grant the caller may act on (its own, or any for operators).
    pub(crate) async fn grant_for_action(
        &self,
        caller: &Caller,
        grant_id: &GrantId,
        context: &mut AuditEvent,
    ) -> Result<Grant, ServiceError> {
        context.set("grant_id", grant_id.as_str());
        let grant = self.fetch_grant(grant_id.as_str()).await?;
        context.set_grant(&grant);
        policy::may_act_on(&caller.principal, &grant)?;
        Ok(grant)
    }

    pub(crate) async fn fetch_grant(&self, grant_id: &str) -> Result<Grant, ServiceError> {
        self.store
            .get_grant(grant_id)
            .await?
            .ok_or_else(|| ServiceError::GrantNotFound {
                id: grant_id.to_string(),
            })
    }

    /// A root credential by name, for the gateway's upstream leg.
    pub(crate) fn credential(&self, name: &str) -> Option<Secret> {
        self.vault.get(name)
    }
}

/// `text` cut to `max` characters, for audit fields taken from a refused request.
pub(crate) fn bounded(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}
