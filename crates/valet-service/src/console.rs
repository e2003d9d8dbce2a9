//! The web console's part of the service: login links for operators (`valet console`), the
//! sessions they open, CSRF checks, and the read-only views the console shows beyond the
//! existing operations (one grant, its audit trail, the chain's verification). Every action the
//! console takes is an existing operation called with the session's [`Caller`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use valet_core::UnixTime;
use valet_core::audit::{self, AuditAction, AuditEvent, ChainKey, Outcome};
use valet_core::config::Role;
use valet_core::console::{
    ConsoleKey, ConsolePass, LOGIN_LINK_SECONDS, MAX_CODE_ATTEMPTS, PassKind,
};
use valet_core::grant::Grant;
use valet_core::identity::AuthenticatedBy;
use valet_core::policy;

use crate::{Attribution, Caller, ServiceError, Valet, WrittenRecord, context};

/// How many of the latest audit records a grant's trail is looked for in.
pub const TRAIL_WINDOW: usize = 20_000;
/// How a console session is named in audit records' `auth_method`.
pub const CONSOLE_SESSION: &str = "console_session";

/// What the console keeps beyond the store: its key, and the last verification of the chain.
pub(crate) struct ConsoleState {
    key: ConsoleKey,
    chain_key: Arc<ChainKey>,
    last_check: Mutex<Option<ChainCheck>>,
    /// The console's base URL, once its listener is bound; the console is off without it.
    url: std::sync::OnceLock<String>,
}

impl ConsoleState {
    pub(crate) fn new(seal_key: &valet_core::keyring::SealKey) -> ConsoleState {
        ConsoleState {
            key: ConsoleKey::from_seal_key(seal_key),
            chain_key: Arc::new(ChainKey::from_seal_key(seal_key)),
            last_check: Mutex::new(None),
            url: std::sync::OnceLock::new(),
        }
    }
}

/// A login link's pass and where it leads.
pub struct ConsoleLogin {
    /// `{console_url}/login?link=PASS`: one login within a minute, together with `code`.
    pub url: String,
    /// The code the login page asks for: shown only where `valet console` runs, so the link
    /// alone (in a process list, a shell history, a log) opens nothing.
    pub code: String,
    pub expires_at: UnixTime,
}

/// An open console session, as operators list it.
pub struct OpenSession {
    pub pass: ConsolePass,
    /// `Err` with the reason when the credential that opened it is no longer accepted (the
    /// session ends at its next request).
    pub credential_accepted: Result<(), String>,
}

/// Where each console session's sealed pass is kept (with a marker per session), so operators
/// can list them.
const SESSION_PREFIX: &str = "console-session/";

/// A session a login link opened.
pub struct OpenedSession {
    /// The session cookie's value.
    pub cookie: String,
    pub pass: ConsolePass,
}

/// An authenticated console request: the caller every operation is called with, and its session.
pub struct ConsoleCaller {
    pub caller: Caller,
    pub session: ConsolePass,
}

/// One verification of the audit chain against the head valetd recorded.
#[derive(Debug, Clone)]
pub struct ChainCheck {
    pub at: UnixTime,
    /// The head valetd recorded in the store, which the chain must end at.
    pub head: audit::ChainHead,
    /// The summary, or where and why the chain is broken.
    pub outcome: Result<audit::ChainSummary, String>,
}

/// Who a refused console request is attributed to before any session is known.
struct Visitor<'a> {
    request_id: &'a str,
    source: Option<std::net::IpAddr>,
}

impl Attribution for Visitor<'_> {
    fn attribute(&self, event: AuditEvent) -> AuditEvent {
        let event = event.with("request_id", self.request_id);
        match self.source {
            Some(source) => event.with("source", source.to_string()),
            None => event,
        }
    }

    fn request_id(&self) -> &str {
        self.request_id
    }
}

impl Valet {
    /// Says the console is served, at `base` (`https://host:port`, no trailing `/`): login links
    /// and the approval webhook's links lead there. Set once, when its listener is bound.
    pub fn serve_console_at(&self, base: String) {
        let _ = self.console.url.set(base);
    }

    /// The console's base URL, when it is served.
    pub fn console_url(&self) -> Option<&str> {
        self.console.url.get().map(String::as_str)
    }

    /// A single-use login link to the console for the caller, an operator: good for one login
    /// within [`LOGIN_LINK_SECONDS`].
    pub async fn create_console_login(
        &self,
        caller: &Caller,
    ) -> Result<ConsoleLogin, ServiceError> {
        let outcome = async {
            policy::require_role(&caller.principal, Role::Operator, "opening the web console")?;
            let base = self.console_url().ok_or(ServiceError::ConsoleOff)?;
            let pass = ConsolePass::new(
                &caller.principal,
                &caller.credential,
                self.clock.now(),
                LOGIN_LINK_SECONDS,
            )
            .map_err(|error| ServiceError::Internal(error.to_string()))?;
            let text = self.console.key.seal(PassKind::LoginLink, &pass)?;
            Ok((pass, format!("{base}/login?link={text}")))
        }
        .await;
        let (pass, url) = self
            .answer(caller, context(AuditAction::ConsoleLoginLink), outcome)
            .await?;
        let event = AuditEvent::new(AuditAction::ConsoleLoginLink, Outcome::Allowed)
            .with("link_id", &pass.id)
            .with(
                "expires_at",
                valet_core::clock::format_time(pass.expires_at),
            );
        self.record(caller, event).await?;
        Ok(ConsoleLogin {
            url,
            code: self.console.key.login_code(&pass.id),
            expires_at: pass.expires_at,
        })
    }

    /// Opens a session from a login link and its code, once: a link already used, expired,
    /// altered, for a principal whose roles changed, or whose credential is no longer accepted is
    /// refused (and the refusal recorded). A wrong code is counted against the link: after
    /// [`MAX_CODE_ATTEMPTS`] the link is used up.
    pub async fn open_console_session(
        &self,
        link: &str,
        code: &str,
        source: Option<std::net::IpAddr>,
        request_id: &str,
    ) -> Result<OpenedSession, ServiceError> {
        let visitor = Visitor { request_id, source };
        let mut context = context(AuditAction::ConsoleLogin);
        let outcome = async {
            let now = self.clock.now();
            let link = self
                .console
                .key
                .open(PassKind::LoginLink, link, now)
                .map_err(|error| self.count_failed_authentication(source, error.into()))?;
            context.set("principal", &link.principal);
            context.set("link_id", &link.id);
            let principal = self.console_principal(&link)?;
            // Every code typed takes one of the link's attempts before it is compared (across
            // replicas): however many arrive at once, at most MAX_CODE_ATTEMPTS are compared.
            let attempt = self.take_code_attempt(&link).await?;
            if !self.console.key.login_code_matches(&link.id, code) {
                let failure = self.wrong_code(&link, attempt).await?;
                return Err(self.count_failed_authentication(source, failure));
            }
            link.credential
                .still_accepted(
                    &self.config(),
                    &link.principal,
                    &self.client_authorities.load(),
                    now,
                )
                .map_err(|reason| ServiceError::Unauthenticated {
                    reason: format!(
                        "the credential this login link was made with is no longer accepted: {reason}"
                    ),
                })?;
            if !self
                .store
                .claim_once(&format!("console-link/{}", link.id), link.expires_at)
                .await?
            {
                return Err(ServiceError::Unauthenticated {
                    reason: "this login link was used already (or used up by wrong codes): each opens one session; get a new one with `valet console`".into(),
                });
            }
            let ttl = self.config().server.console_session_ttl.as_secs() as i64;
            let session = ConsolePass::new(&principal, &link.credential, now, ttl)
                .map_err(|error| ServiceError::Internal(error.to_string()))?;
            let sealed = self.console.key.seal(PassKind::Session, &session)?;
            self.store
                .claim_once_with(
                    &format!("{SESSION_PREFIX}{}", session.id),
                    session.expires_at,
                    sealed.as_bytes(),
                )
                .await?;
            Ok((link, session, sealed))
        }
        .await;
        let (link, session, sealed) = self.answer(&visitor, context, outcome).await?;
        let event = AuditEvent::new(AuditAction::ConsoleLogin, Outcome::Allowed)
            .with("principal", &session.principal)
            .with("link_id", &link.id)
            .with("session_id", &session.id)
            .with("credential", session.credential.describe())
            .with(
                "expires_at",
                valet_core::clock::format_time(session.expires_at),
            );
        self.record(&visitor, event).await?;
        Ok(OpenedSession {
            cookie: sealed,
            pass: session,
        })
    }

    /// Takes the next of `link`'s code attempts (across replicas), or refuses: the link is used
    /// up once all are taken.
    async fn take_code_attempt(&self, link: &ConsolePass) -> Result<usize, ServiceError> {
        for attempt in 1..=MAX_CODE_ATTEMPTS {
            let name = format!("console-link-attempt/{}/{attempt}", link.id);
            if self.store.claim_once(&name, link.expires_at).await? {
                return Ok(attempt);
            }
        }
        Err(ServiceError::Unauthenticated {
            reason: format!(
                "this login link took {MAX_CODE_ATTEMPTS} codes and is used up; get a new one with `valet console`"
            ),
        })
    }

    /// A wrong code on attempt `attempt` of `link`: the refusal to answer with (the last attempt
    /// uses the link up).
    async fn wrong_code(
        &self,
        link: &ConsolePass,
        attempt: usize,
    ) -> Result<ServiceError, ServiceError> {
        if attempt == MAX_CODE_ATTEMPTS {
            self.store
                .claim_once(&format!("console-link/{}", link.id), link.expires_at)
                .await?;
            return Ok(ServiceError::Unauthenticated {
                reason: format!(
                    "the code does not match, and this login link took {MAX_CODE_ATTEMPTS} codes and is used up; get a new one with `valet console`"
                ),
            });
        }
        Ok(ServiceError::Unauthenticated {
            reason: format!(
                "the code does not match this login link (attempt {attempt} of {MAX_CODE_ATTEMPTS}): type the code `valet console` showed where it ran"
            ),
        })
    }

    /// The caller a session cookie stands for: refused when it is not valetd's, expired, ended,
    /// its principal's roles changed, or the credential that opened it is no longer accepted
    /// (a rotated key, a removed certificate CA or identity binding, an expired credential) —
    /// which ends the session, recorded once. Not recorded otherwise (pages are read often);
    /// actions are. An invalid cookie counts against its source's failed-authentication
    /// budget, and a valid one against its principal's rate, as a key does over gRPC.
    pub async fn console_caller(
        &self,
        cookie: &str,
        source: Option<std::net::IpAddr>,
        request_id: &str,
    ) -> Result<ConsoleCaller, ServiceError> {
        let now = self.clock.now();
        let session = self
            .console
            .key
            .open(PassKind::Session, cookie, now)
            .map_err(|error| self.count_failed_authentication(source, error.into()))?;
        let principal = self.console_principal(&session)?;
        self.admit_principal(&principal, "console", request_id, self.clock.now_millis())
            .await?;
        let caller = Caller {
            principal,
            authentication: AuthenticatedBy {
                method: CONSOLE_SESSION.to_string(),
                issuer: Some(session.credential.describe()),
                subject: None,
                fingerprint: Some(session.id.clone()),
            },
            credential: session.credential.clone(),
            request_id: request_id.to_string(),
        };
        self.console_session_in_force(&session, &caller).await?;
        Ok(ConsoleCaller { caller, session })
    }

    /// Whether `session` still stands, checked at every use (every page, every action, and
    /// every few seconds of an event stream): not ended, its principal's roles unchanged, and the
    /// credential that opened it still accepted. A session whose credential is no longer
    /// accepted is ended on every replica, recorded once (attributed to `caller`).
    pub async fn console_session_in_force(
        &self,
        session: &ConsolePass,
        caller: &Caller,
    ) -> Result<(), ServiceError> {
        let now = self.clock.now();
        if now >= session.expires_at {
            return Err(valet_core::console::ConsoleError::Expired {
                what: "console session",
                at: valet_core::clock::format_time(session.expires_at),
            }
            .into());
        }
        self.console_principal(session)?;
        // The credential first, so a session it ended keeps saying why.
        let Err(reason) = self
            .credential_still_accepted(&session.principal, &session.credential)
            .await
        else {
            // The credential stands: the session does, unless it was ended.
            if self
                .store
                .claimed(&format!("console-session-ended/{}", session.id))
                .await?
            {
                return Err(ServiceError::Unauthenticated {
                    reason:
                        "this console session was ended (logged out, or by an operator); log in again with `valet console`"
                            .into(),
                });
            }
            return Ok(());
        };
        let reason = format!(
            "this console session ended: the credential it was opened with is no longer accepted ({reason}); log in again with `valet console`"
        );
        if self
            .store
            .claim_once(
                &format!("console-session-ended/{}", session.id),
                session.expires_at,
            )
            .await?
        {
            let event = AuditEvent::new(AuditAction::ConsoleSessionEnd, Outcome::Allowed)
                .with("session_id", &session.id)
                .with("session_principal", &session.principal)
                .with("reason", &reason);
            self.record(caller, event).await?;
        }
        Err(ServiceError::Unauthenticated { reason })
    }

    /// The console sessions open now, oldest first: operators only. Each is read back from the
    /// store with its MAC checked; one that does not check is left out, and said loudly.
    pub async fn console_sessions(
        &self,
        caller: &Caller,
    ) -> Result<Vec<OpenSession>, ServiceError> {
        let outcome = async {
            policy::require_role(
                &caller.principal,
                Role::Operator,
                "listing console sessions",
            )?;
            self.open_sessions().await
        }
        .await;
        let sessions = self
            .answer(caller, context(AuditAction::ConsoleSessions), outcome)
            .await?;
        let event = AuditEvent::new(AuditAction::ConsoleSessions, Outcome::Allowed)
            .with("n_sessions", sessions.len().to_string());
        self.record(caller, event).await?;
        Ok(sessions)
    }

    async fn open_sessions(&self) -> Result<Vec<OpenSession>, ServiceError> {
        let now = self.clock.now();
        let config = self.config();
        let trusted = self.client_authorities.load();
        let mut sessions = Vec::new();
        for (name, sealed) in self.store.claims_under(SESSION_PREFIX).await? {
            let text = String::from_utf8_lossy(&sealed);
            let pass = match self.console.key.open(PassKind::Session, &text, now) {
                Ok(pass) if name == format!("{SESSION_PREFIX}{}", pass.id) => pass,
                Ok(_) | Err(valet_core::console::ConsoleError::NotValetd { .. }) => {
                    tracing::error!(
                        marker = name,
                        "A CONSOLE SESSION RECORD IN THE STORE DOES NOT CARRY VALETD'S MAC (or names another session): it was written or altered by someone without the key-encryption key; it is left out"
                    );
                    continue;
                }
                // Expired, not yet swept.
                Err(_) => continue,
            };
            if self
                .store
                .claimed(&format!("console-session-ended/{}", pass.id))
                .await?
            {
                continue;
            }
            let credential_accepted =
                pass.credential
                    .still_accepted(&config, &pass.principal, &trusted, now);
            sessions.push(OpenSession {
                pass,
                credential_accepted,
            });
        }
        sessions.sort_by(|left, right| {
            (left.pass.issued_at, &left.pass.id).cmp(&(right.pass.issued_at, &right.pass.id))
        });
        Ok(sessions)
    }

    /// Ends console session `id` on every replica, for an operator (any principal's session);
    /// recorded with who ended it.
    pub async fn end_console_session_by_id(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<(), ServiceError> {
        let mut context = context(AuditAction::ConsoleSessionEnd);
        let outcome = async {
            policy::require_role(&caller.principal, Role::Operator, "ending console sessions")?;
            if id.is_empty() || id.len() > 64 || !id.bytes().all(|byte| byte.is_ascii_hexdigit()) {
                return Err(ServiceError::InvalidField {
                    field: "session_id",
                    problem:
                        "a session id is 32 hex characters, as `valet console sessions` lists it"
                            .into(),
                });
            }
            context.set("session_id", id);
            let session = self
                .open_sessions()
                .await?
                .into_iter()
                .find(|open| open.pass.id == id)
                .ok_or_else(|| ServiceError::ConsoleSessionNotFound { id: id.to_string() })?;
            self.store
                .claim_once(
                    &format!("console-session-ended/{id}"),
                    session.pass.expires_at,
                )
                .await?;
            Ok(session.pass)
        }
        .await;
        let pass = self.answer(caller, context, outcome).await?;
        let event = AuditEvent::new(AuditAction::ConsoleSessionEnd, Outcome::Allowed)
            .with("session_id", &pass.id)
            .with("session_principal", &pass.principal)
            .with("reason", "ended by an operator");
        self.record(caller, event).await
    }

    /// The CSRF token every form of `session` carries.
    pub fn console_csrf(&self, session: &ConsolePass) -> String {
        self.console.key.csrf_token(&session.id)
    }

    /// Refuses (and records) an action whose CSRF token is not its session's.
    pub async fn check_console_csrf(
        &self,
        console: &ConsoleCaller,
        presented: &str,
        action: &str,
    ) -> Result<(), ServiceError> {
        if self
            .console
            .key
            .csrf_matches(&console.session.id, presented)
        {
            return Ok(());
        }
        let context = context(AuditAction::ConsoleRefuse).with("console_action", action);
        let error = ServiceError::Unauthenticated {
            reason: "the form's CSRF token is not this session's (a stale page, or a request made by another site); reload the page and try again".into(),
        };
        self.answer(&console.caller, context, Err(error)).await
    }

    /// A console page asked for without a session: counted against the source's failed
    /// authentication budget (past it, throttled like any other refusal) but not recorded, since
    /// no action was refused (a browser sent to the login page).
    pub fn refuse_console_page(
        &self,
        source: Option<std::net::IpAddr>,
        error: ServiceError,
    ) -> ServiceError {
        match error {
            ServiceError::Unauthenticated { .. } => self.count_failed_authentication(source, error),
            other => other,
        }
    }

    /// Records a console action refused before any session was known (no cookie, a bad one).
    pub async fn refuse_console_request(
        &self,
        request_id: &str,
        source: Option<std::net::IpAddr>,
        action: &str,
        error: ServiceError,
    ) -> ServiceError {
        let visitor = Visitor { request_id, source };
        // Without a session, it is a failed authentication: counted against the source's budget
        // (and all sources'), and aggregated like the other listeners' refusals — the first of
        // its kind from a source in a window is recorded, the rest go into the summary.
        let error = match error {
            ServiceError::Unauthenticated { .. } => self.count_failed_authentication(source, error),
            other => other,
        };
        let subject = source.map_or_else(|| "(unknown)".to_string(), |source| source.to_string());
        if !self.limits.note_refusal(
            subject,
            AuditAction::ConsoleRefuse,
            error.kind(),
            &error.to_string(),
            action,
            self.clock.now_millis(),
        ) {
            return error;
        }
        let context = context(AuditAction::ConsoleRefuse).with("console_action", action);
        match self.answer(&visitor, context, Err::<(), _>(error)).await {
            Err(error) => error,
            Ok(()) => ServiceError::Internal("a refusal was answered as a success".into()),
        }
    }

    /// Ends `console`'s session on every replica (its cookie is refused from now on).
    pub async fn end_console_session(&self, console: &ConsoleCaller) -> Result<(), ServiceError> {
        self.store
            .claim_once(
                &format!("console-session-ended/{}", console.session.id),
                console.session.expires_at,
            )
            .await?;
        let event = AuditEvent::new(AuditAction::ConsoleLogout, Outcome::Allowed)
            .with("session_id", &console.session.id);
        self.record(&console.caller, event).await
    }

    /// One grant, for an operator.
    pub async fn console_grant(&self, caller: &Caller, id: &str) -> Result<Grant, ServiceError> {
        let outcome = async {
            policy::require_role(&caller.principal, Role::Operator, "reading a grant")?;
            let id = valet_core::GrantId::parse(id)?;
            self.store
                .get_grant(id.as_str())
                .await?
                .ok_or_else(|| ServiceError::GrantNotFound {
                    id: id.as_str().to_string(),
                })
        }
        .await;
        self.answer(caller, context(AuditAction::GrantsList), outcome)
            .await
    }

    /// The audit records of grant `id` among the latest [`TRAIL_WINDOW`], oldest first.
    /// Operators only.
    pub async fn grant_trail(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<Vec<WrittenRecord>, ServiceError> {
        let outcome =
            policy::require_role(&caller.principal, Role::Operator, "reading the audit log")
                .map_err(ServiceError::from)
                .and_then(|()| Ok(valet_core::GrantId::parse(id)?));
        let id = self
            .answer(caller, context(AuditAction::AuditTail), outcome)
            .await?;
        let records = self.audit.last_records(TRAIL_WINDOW).await?;
        Ok(records
            .into_iter()
            // Only lines that mention the id are parsed, then checked field by field.
            .filter(|record| record.line.contains(id.as_str()))
            .filter(|record| {
                serde_json::from_str::<serde_json::Value>(&record.line)
                    .ok()
                    .and_then(|value| {
                        value
                            .get("grant_id")
                            .and_then(|grant| grant.as_str().map(|grant| grant == id.as_str()))
                    })
                    .unwrap_or(false)
            })
            .collect())
    }

    /// Verifies this replica's audit file up to the head valetd recorded in the store: every
    /// record's MAC under the chain key, every checkpoint's signature, the chain's links, and
    /// that it ends exactly at that head. Operators only; the result is kept for the console.
    pub async fn verify_audit_chain(&self, caller: &Caller) -> Result<ChainCheck, ServiceError> {
        let head = self.audit_head(caller).await?;
        let public_keys: BTreeMap<String, [u8; 32]> = self
            .jwks()
            .into_iter()
            .filter_map(|jwk| {
                let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(&jwk.x)
                    .ok()?;
                Some((jwk.kid, <[u8; 32]>::try_from(bytes).ok()?))
            })
            .collect();
        let path = self.audit.path().to_path_buf();
        let chain_key = self.console.chain_key.clone();
        let expected = head.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let text = std::fs::read_to_string(&path)
                .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
            // Records past the recorded head are being written as this runs: the chain is
            // checked to the head, which moves on with every group commit.
            let lines: Vec<&str> = text
                .lines()
                .take_while(|line| {
                    crate::audit_sink::sequence_of(line)
                        .is_some_and(|sequence| sequence <= expected.sequence)
                })
                .collect();
            let lookup = |kid: &str| public_keys.get(kid).copied();
            let verification = audit::Verification {
                key: Some(chain_key.as_ref()),
                public_keys: Some(&lookup),
                expected_head: (expected.sequence > 0).then_some(&expected),
            };
            audit::verify_with(lines, &verification).map_err(|error| error.to_string())
        })
        .await
        .map_err(|error| ServiceError::Internal(error.to_string()))?;
        let check = ChainCheck {
            at: self.clock.now(),
            head,
            outcome,
        };
        if let Ok(mut last) = self.console.last_check.lock() {
            *last = Some(check.clone());
        }
        Ok(check)
    }

    /// The last verification [`Valet::verify_audit_chain`] made, if any.
    pub fn last_audit_verification(&self) -> Option<ChainCheck> {
        self.console
            .last_check
            .lock()
            .ok()
            .and_then(|last| last.clone())
    }

    /// The principal a pass was made for, as the config has it now; refused if it is gone or its
    /// roles changed.
    fn console_principal(
        &self,
        pass: &ConsolePass,
    ) -> Result<valet_core::config::Principal, ServiceError> {
        let config = self.config();
        let principal = config.principals.get(&pass.principal).ok_or_else(|| {
            ServiceError::Unauthenticated {
                reason: format!(
                    "principal {:?} is no longer in the config; its console sessions ended",
                    pass.principal
                ),
            }
        })?;
        pass.still_fits(principal).map_err(ServiceError::Console)?;
        Ok(principal.clone())
    }
}
