//! Running the broker: reloading the config and rotating the signing key.

use std::sync::Arc;

use valet_core::KeyId;
use valet_core::audit::{AuditAction, AuditEvent, Outcome};
use valet_core::config::{Config, Role};
use valet_core::policy;

use crate::loader;
use crate::{Caller, ServiceError, Valet, context};

/// Who asked for a reload.
#[derive(Debug, Clone, Copy)]
pub enum ReloadTrigger<'a> {
    Caller(&'a Caller),
    /// SIGHUP to the process.
    Signal,
}

/// The config a reload put in force.
#[derive(Debug, Clone)]
pub struct ReloadOutcome {
    pub config: Arc<Config>,
    pub n_credentials: usize,
    /// Keys that changed but take effect only at the next restart.
    pub restart_only: Vec<&'static str>,
}

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
        let mut restart_only = Vec::new();
        if loaded.config.server.listen != running.server.listen {
            restart_only.push("server.listen");
        }
        if loaded.config.server.data_dir != running.server.data_dir {
            restart_only.push("server.data_dir");
        }
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
        self.config.store(Arc::new(loaded.config));
        tracing::info!(by = who, "config reloaded");
        Ok(ReloadOutcome {
            config: self.config(),
            n_credentials: self.vault.len(),
            restart_only,
        })
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
