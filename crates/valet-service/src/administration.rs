//! Running the broker: reloading the config and rotating the signing key.

use std::sync::Arc;

use valet_core::KeyId;
use valet_core::audit::{AuditAction, AuditEvent, Outcome};
use valet_core::config::{Config, Role};
use valet_core::grant::Grant;
use valet_core::policy::{self, LiveGrantDecision};

use crate::compare_and_swap::{Decision, Swapped, compare_and_swap};
use crate::loader;
use crate::{Attribution, Caller, ServiceError, Valet, context};

/// Who asked for a reload.
#[derive(Debug, Clone, Copy)]
pub enum ReloadTrigger<'a> {
    Caller(&'a Caller),
    /// SIGHUP to the process.
    Signal,
}

/// The config a reload put in force, and what it did to live grants.
#[derive(Debug, Clone)]
pub struct ReloadOutcome {
    pub config: Arc<Config>,
    pub n_credentials: usize,
    /// Keys that changed but take effect only at the next restart.
    pub restart_only: Vec<&'static str>,
    /// Live grants the new config no longer allows, now revoked.
    pub n_grants_ended: u64,
    /// Live grants whose lifetime a lowered cap cut short.
    pub n_grants_clamped: u64,
}

/// valetd acting on its own account (after a reload), for the records it writes.
pub(crate) struct OwnAccount<'a> {
    pub(crate) request_id: &'a str,
    pub(crate) trigger: &'a str,
}

impl Attribution for OwnAccount<'_> {
    fn attribute(&self, event: AuditEvent) -> AuditEvent {
        event
            .with("principal", "valetd")
            .with("trigger", self.trigger)
            .with("request_id", self.request_id)
    }

    fn request_id(&self) -> &str {
        self.request_id
    }
}

/// Grants read per page while re-deciding them.
const REDECIDE_PAGE: usize = 500;

impl Valet {
    /// Re-reads the config file and applies it atomically; on any problem the running config
    /// stays. Admins only (or a signal to the process).
    pub async fn reload(&self, trigger: ReloadTrigger<'_>) -> Result<ReloadOutcome, ServiceError> {
        match trigger {
            ReloadTrigger::Caller(caller) => {
                let context = context(AuditAction::ConfigReload)
                    .with("path", self.config_path.display().to_string());
                let outcome = async {
                    policy::require_role(&caller.principal, Role::Admin, "reloading the config")?;
                    self.reload_now("", Some(caller)).await
                }
                .await;
                self.answer(caller, context, outcome).await
            }
            ReloadTrigger::Signal => {
                let outcome = self.reload_now("SIGHUP", None).await;
                if let Err(error) = &outcome
                    && error.audit_outcome().is_some()
                {
                    let event = AuditEvent::new(AuditAction::ConfigReload, Outcome::Denied)
                        .with("path", self.config_path.display().to_string())
                        .with("principal", "SIGHUP")
                        .with("reason", error.to_string());
                    self.audit.record(event).await?;
                }
                outcome
            }
        }
    }

    async fn reload_now(
        &self,
        signal: &str,
        caller: Option<&Caller>,
    ) -> Result<ReloadOutcome, ServiceError> {
        let who = caller
            .map(|caller| caller.principal.name.as_str())
            .unwrap_or(signal);
        // Reading files (config, credentials) is blocking work: off the async workers.
        let path = self.config_path.clone();
        let overrides = self.overrides.clone();
        let loaded = tokio::task::spawn_blocking(move || loader::load_config(&path, &overrides))
            .await
            .map_err(|error| ServiceError::Internal(error.to_string()))?;
        let loaded = match loaded {
            Ok(loaded) => loaded,
            Err(error) => {
                tracing::error!(by = who, %error, "config reload refused; the running config stays in force");
                return Err(ServiceError::Reload(Box::new(error)));
            }
        };
        let running = self.config();
        // What only a restart changes keeps its running value, so the config in force says what
        // the process does (listeners, /healthz, the data dir).
        let mut loaded = loaded;
        let restart_only = loaded.config.server.keep_start_only_keys(&running.server);
        if !restart_only.is_empty() {
            tracing::warn!(
                keys = restart_only.join(", "),
                "these changes take effect at the next restart"
            );
        }
        let event = AuditEvent::new(AuditAction::ConfigReload, Outcome::Allowed)
            .with("path", self.config_path.display().to_string());
        match caller {
            Some(caller) => self.record(caller, event).await?,
            None => {
                self.audit.record(event.with("principal", who)).await?;
            }
        }
        self.vault.replace(loaded.credentials);
        self.metrics.config_changed(&loaded.config);
        self.config.store(Arc::new(loaded.config));
        let config = self.config();
        let trigger = format!("config reload by {who}");
        let request_id = caller
            .map(|caller| caller.request_id.as_str())
            .unwrap_or("");
        let own = OwnAccount {
            request_id,
            trigger: &trigger,
        };
        self.identity_keys.forget_files();
        self.identity_keys.forget_verified();
        self.reloaded.notify_waiters();
        let (n_grants_ended, n_grants_clamped) = self.redecide_live_grants(&config, &own).await?;
        tracing::info!(
            by = who,
            n_grants_ended,
            n_grants_clamped,
            "config reloaded; live grants the new config no longer allows were ended"
        );
        Ok(ReloadOutcome {
            config,
            n_credentials: self.vault.len(),
            restart_only,
            n_grants_ended,
            n_grants_clamped,
        })
    }

    /// Re-decides every live grant under `config` (valet-core's `policy::redecide`): revokes the
    /// ones it no longer allows, clamps the ones a lowered cap cuts short. Returns how many of
    /// each.
    async fn redecide_live_grants(
        &self,
        config: &Config,
        own: &OwnAccount<'_>,
    ) -> Result<(u64, u64), ServiceError> {
        let (mut n_ended, mut n_clamped) = (0, 0);
        let mut after: Option<String> = None;
        loop {
            let page = self
                .store
                .list_grants(
                    &valet_store::GrantFilter::default(),
                    self.clock.now(),
                    after.as_deref(),
                    REDECIDE_PAGE,
                )
                .await?;
            for grant in page.grants {
                if !grant.is_live(self.clock.now()) {
                    continue;
                }
                match policy::redecide(config, &grant) {
                    LiveGrantDecision::Keep => {}
                    LiveGrantDecision::Revoke(reason) => {
                        // A failure at AWS is recorded where it happens and does not stop the rest.
                        let (_, _at_aws) = self
                            .revoke(own, "valetd", grant, &reason, "config.reload")
                            .await?;
                        n_ended += 1;
                    }
                    LiveGrantDecision::Clamp(latest) => {
                        let swapped =
                            compare_and_swap(self.store.as_ref(), grant, |current: &Grant| {
                                let now = self.clock.now();
                                Ok(if current.is_live(now) && current.max_expires_at > latest {
                                    Decision::Write(current.clamped(latest, now), ())
                                } else {
                                    Decision::Keep(())
                                })
                            })
                            .await?;
                        if let Swapped::Written { after, .. } = swapped {
                            let event = AuditEvent::new(AuditAction::GrantClamp, Outcome::Allowed)
                                .with_grant(&after)
                                .with("reason", "config reload: a TTL cap was lowered below the grant's lifetime");
                            self.record(own, event).await?;
                            n_clamped += 1;
                        }
                    }
                }
            }
            match page.next_after {
                Some(next) => after = Some(next),
                None => return Ok((n_ended, n_clamped)),
            }
        }
    }

    /// Rotates the signing key: a new key signs from now on, the old one keeps verifying tokens
    /// it signed until they expire. Admins only. Returns (new key id, retired key id).
    pub async fn rotate_signing_key(
        &self,
        caller: &Caller,
    ) -> Result<(KeyId, KeyId), ServiceError> {
        let outcome = async {
            policy::require_role(&caller.principal, Role::Admin, "rotating the signing key")?;
            let (new_kid, retired_kid) = self.keys.rotate(self.config().server.max_ttl).await?;
            let event = AuditEvent::new(AuditAction::KeyRotate, Outcome::Allowed)
                .with("key_id", new_kid.as_str())
                .with("retired_key_id", retired_kid.as_str());
            self.record(caller, event).await?;
            Ok((new_kid, retired_kid))
        }
        .await;
        self.answer(caller, context(AuditAction::KeyRotate), outcome)
            .await
    }
}

impl Valet {
    /// Sets the client CAs the listeners trust now (SHA-256 of each, hex), at start and after
    /// every TLS reload: certificates issued by any other are refused from the next request on,
    /// on connections already open too.
    pub fn trust_client_authorities(&self, fingerprints: Vec<String>) {
        self.client_authorities
            .store(std::sync::Arc::new(fingerprints));
    }

    /// Resolves after the next applied config reload.
    pub async fn config_reloaded(&self) {
        self.reloaded.notified().await;
    }

    /// Records that the listeners re-read their TLS files after `trigger`: what is in force now
    /// (`Ok`, described by its fields) or why the new files were refused and the old ones kept.
    pub async fn record_tls_reload(
        &self,
        trigger: &str,
        outcome: Result<Vec<(&'static str, String)>, String>,
    ) -> Result<(), ServiceError> {
        let event = match outcome {
            Ok(fields) => fields.into_iter().fold(
                AuditEvent::new(AuditAction::TlsReload, Outcome::Allowed),
                |event, (field, value)| event.with(field, value),
            ),
            Err(reason) => AuditEvent::new(AuditAction::TlsReload, Outcome::Failed)
                .with("reason", reason)
                .with("kept", "the TLS material in force before"),
        };
        self.audit
            .record(event.with("principal", "valetd").with("trigger", trigger))
            .await?;
        Ok(())
    }
}
