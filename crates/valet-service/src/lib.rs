//! The application layer: every entry point (gRPC, the gateway, later MCP and the console) calls
//! the same coarse operations here with a [`Caller`], and gets a domain result or one
//! [`ServiceError`]. Each operation decides with valet-core, makes the outcome durable in the
//! store, records it in the audit log, and only then returns. Every refusal takes one path
//! ([`Valet::answer`]): the audit record first, then the error.
//!
//! No tonic and no hyper here: transports are adapters around this crate.

mod administration;
mod approvals;
mod audit_sink;
mod authenticated_store;
mod authentication_limits;
mod aws_client;
mod aws_grants;
mod caller;
mod compare_and_swap;
mod console;
mod deferred_grants;
mod error;
mod gateway;
mod identity_keys;
mod in_flight;
mod keys;
mod listing;
mod loader;
mod mcp;
mod metrics;
mod outbound;
mod redactor;
mod revocation;
mod tokens;
mod vault;
mod verified_tokens;
mod waiting;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use valet_core::Clock;
use valet_core::audit::{AuditAction, AuditEvent, Outcome};
use valet_core::config::Config;
use valet_core::keyring::SealKey;
use valet_store::Store;

pub use administration::{ReloadOutcome, ReloadTrigger};
pub use approvals::approval_json;
pub use audit_sink::{AuditError, AuditSink, DurableRecord, WrittenRecord};
pub use aws_client::{AwsError, StsCredentials};
pub use aws_grants::AwsGrant;
pub use caller::{Attribution, Caller, Presented};
pub use console::{
    CONSOLE_SESSION, ChainCheck, ConsoleCaller, ConsoleLogin, OpenSession, OpenedSession,
    TRAIL_WINDOW,
};
pub use deferred_grants::CHECKPOINT_INTERVAL;
pub use error::ServiceError;
pub use gateway::{
    BodySource, CallDecision, CallDenial, CallOutcome, CallRequest, CallSite, Upstreams,
};
pub use listing::ServiceStream;
pub use listing::{ApprovalListing, AuditTail, GrantEvent, GrantEventKind, GrantListing};
pub use loader::{LoadError, LoadedConfig, Overrides, load_config, load_seal_key, read_secret};
pub use mcp::{McpDecision, McpRequest};
pub use outbound::{Outbound, OutboundAnswer};
pub use redactor::Redactor;
pub use tokens::{Introspection, Issued, Renewed};
pub use vault::CredentialVault;
pub use waiting::GrantUpdate;

/// The running broker: config, credentials, keys, store, audit log and clock.
pub struct Valet {
    config: ArcSwap<Config>,
    /// Root credentials, read at start and on reload.
    vault: Arc<CredentialVault>,
    /// Keeps every root credential out of what valetd emits.
    redactor: Arc<Redactor>,
    config_path: PathBuf,
    overrides: Overrides,
    keys: Arc<keys::Keys>,
    store: Arc<dyn Store>,
    audit: AuditSink,
    /// Announces new approval requests to the webhook.
    notifier: approvals::Notifier,
    /// Calls to AWS for aws-sts scopes.
    aws: aws_client::AwsClient,
    /// Outbound HTTP (webhooks, AWS), provided by the process that runs the service.
    outbound: Arc<dyn Outbound>,
    clock: Arc<dyn Clock>,
    /// The identity issuers' keys.
    identity_keys: identity_keys::IdentityKeys,
    /// Failed-authentication budgets, principal rates, and refusal aggregation.
    limits: authentication_limits::AuthenticationLimits,
    /// Set once valetd begins to stop: long-lived streams end instead of holding it up.
    stopping: tokio::sync::watch::Sender<bool>,
    /// Woken after every applied config reload (the listeners re-read their TLS files then).
    reloaded: tokio::sync::Notify,
    /// Binds MCP sessions to the grants that opened them.
    mcp_sessions: valet_core::mcp::SessionKey,
    /// Grants whose issue record is, until the next checkpoint, their only durable copy.
    deferred: deferred_grants::DeferredGrants,
    /// What is counted for Prometheus.
    metrics: Arc<metrics::Metrics>,
    /// The web console's key and last chain verification.
    console: console::ConsoleState,
    /// SHA-256 of each client CA the listeners trust now, hex: a client certificate issued by
    /// none of them is refused at every request (a connection outlives a CA's removal).
    client_authorities: ArcSwap<Vec<String>>,
    /// Held while a call approval is looked for and opened: identical calls arriving at once on
    /// this replica point at one request instead of each opening its own.
    call_approvals: tokio::sync::Mutex<()>,
    /// Gateway and MCP calls forwarded and not yet answered, per grant and principal.
    in_flight: Arc<in_flight::InFlight>,
    /// `WaitForGrant` streams open, per grant and per principal (counted as calls in flight
    /// are, with caps of their own).
    waits: Arc<in_flight::InFlight>,
    /// Valet tokens whose signature was verified under the key ring in force.
    verified_tokens: verified_tokens::VerifiedTokens,
}

/// What it takes to start the service.
pub struct Parts {
    pub loaded: LoadedConfig,
    pub config_path: PathBuf,
    pub overrides: Overrides,
    pub seal_key: SealKey,
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub outbound: Arc<dyn Outbound>,
    /// Set when several replicas share the state: every audit record names the replica.
    pub replica: Option<String>,
}

impl Valet {
    /// Opens the audit log (checked against the store's chain head) and the key ring (created
    /// on first start), and starts the webhook notifier.
    pub async fn open(parts: Parts) -> Result<Arc<Valet>, ServiceError> {
        let vault = CredentialVault::new(parts.loaded.credentials);
        let redactor = Arc::new(Redactor::new(vault.clone()));
        let chain_key = valet_core::audit::ChainKey::from_seal_key(&parts.seal_key);
        let mcp_sessions = valet_core::mcp::SessionKey::from_seal_key(&parts.seal_key);
        let console = console::ConsoleState::new(&parts.seal_key);
        let deferred = deferred_grants::DeferredGrants::new(
            valet_core::audit::ChainKey::from_seal_key(&parts.seal_key),
        );
        let store: Arc<dyn Store> = Arc::new(authenticated_store::AuthenticatedStore::new(
            parts.store,
            valet_core::grant::GrantKey::from_seal_key(&parts.seal_key),
            valet_core::approval::ApprovalKey::from_seal_key(&parts.seal_key),
        ));
        let keys =
            Arc::new(keys::Keys::open(store.clone(), parts.seal_key, parts.clock.clone()).await?);
        let metrics = Arc::new(metrics::Metrics::new(&parts.loaded.config));
        let audit = AuditSink::open(
            &parts.loaded.config.audit.path,
            store.clone(),
            parts.clock.clone(),
            redactor.clone(),
            chain_key,
            keys.clone(),
            metrics.clone(),
        )
        .await?;
        let audit = match parts.replica {
            Some(replica) => audit.for_replica(replica),
            None => audit,
        };
        let valet = Arc::new_cyclic(|weak| Valet {
            config: ArcSwap::from_pointee(parts.loaded.config),
            vault,
            redactor,
            config_path: parts.config_path,
            overrides: parts.overrides,
            keys,
            store,
            audit,
            notifier: approvals::Notifier::start(weak.clone()),
            aws: aws_client::AwsClient,
            outbound: parts.outbound,
            clock: parts.clock,
            reloaded: tokio::sync::Notify::new(),
            mcp_sessions,
            identity_keys: identity_keys::IdentityKeys::default(),
            limits: authentication_limits::AuthenticationLimits::default(),
            call_approvals: tokio::sync::Mutex::new(()),
            in_flight: Arc::default(),
            waits: Arc::default(),
            verified_tokens: verified_tokens::VerifiedTokens::default(),
            stopping: tokio::sync::watch::Sender::new(false),
            deferred,
            metrics,
            console,
            client_authorities: ArcSwap::from_pointee(Vec::new()),
        });
        valet.restore_deferred_grants().await?;
        Ok(valet)
    }

    /// The config in force.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    pub fn now(&self) -> valet_core::UnixTime {
        self.clock.now()
    }

    /// The signing keys' public halves, for JWKS documents.
    pub fn jwks(&self) -> Vec<valet_core::keyring::Jwk> {
        self.keys.ring().map(|ring| ring.jwks()).unwrap_or_default()
    }

    /// How many root credentials are loaded (never their values).
    pub fn n_credentials(&self) -> usize {
        self.vault.len()
    }

    /// Removes every root credential from text about to leave valetd.
    pub fn redact(&self, text: &str) -> String {
        self.redactor
            .redact(text)
            .unwrap_or_else(|| text.to_string())
    }

    /// Whether the store answers: the broker's readiness.
    /// valetd is stopping: every follow stream (watches, tails, waits) ends now.
    pub fn begin_shutdown(&self) {
        self.stopping.send_replace(true);
    }

    /// Resolves once valetd has begun to stop.
    pub async fn shutting_down(&self) {
        let mut stopping = self.stopping.subscribe();
        let _ = stopping.wait_for(|stopping| *stopping).await;
    }

    pub async fn store_reachable(&self) -> bool {
        self.store.audit_head().await.is_ok()
    }

    /// Changes in the store, for followers (watches, the key ring).
    pub fn store_changes(&self) -> tokio::sync::broadcast::Receiver<valet_store::StoreChange> {
        self.store.subscribe()
    }

    /// Re-reads the key ring after a change in the store (a rotation elsewhere, a sweep, or a gap
    /// in the change stream: then everything is re-read, never trusted).
    pub async fn refresh_keys(&self) -> Result<(), ServiceError> {
        self.keys.refresh().await
    }

    /// Whether the key ring could not be read back as valetd wrote it at the last attempt (then
    /// nothing is signed or verified, and the process should retry [`Valet::refresh_keys`]).
    pub fn key_ring_untrusted(&self) -> bool {
        self.keys.untrusted()
    }

    /// Deletes ended grants, revocations and keys past their retention; re-reads the key ring.
    pub async fn sweep(&self) -> Result<valet_store::SweepReport, ServiceError> {
        let retention = self.config().server.grant_retention;
        let report = self.store.sweep(self.clock.now(), retention).await?;
        self.keys.refresh().await?;
        Ok(report)
    }

    /// Refuses a request its transport could not decode (a field outside its range), through
    /// the same path as every other refusal.
    pub async fn refuse<T>(
        &self,
        caller: &Caller,
        action: AuditAction,
        error: ServiceError,
    ) -> Result<T, ServiceError> {
        self.answer(caller, context(action), Err(error)).await
    }

    /// Writes `event` as `who`'s, durable on return.
    pub(crate) async fn record(
        &self,
        who: &impl Attribution,
        event: AuditEvent,
    ) -> Result<(), ServiceError> {
        self.audit.record(who.attribute(event)).await?;
        Ok(())
    }

    /// Writes `event` as `who`'s; returns once it is written (a crash of valetd no longer loses
    /// it), with the handle that completes once it is on disk.
    pub(crate) async fn record_written(
        &self,
        who: &impl Attribution,
        event: AuditEvent,
    ) -> Result<DurableRecord, ServiceError> {
        let (_, durable) = self.audit.record_written(who.attribute(event)).await?;
        Ok(durable)
    }

    /// The one path every answer of an operation takes. A refusal is recorded first (`context`,
    /// with the reason, outcome `denied`), then returned; a failure outside Valet (AWS) is
    /// recorded as `failed`; a store or audit failure is logged under the request id, since the
    /// record itself is what failed. Success passes through: operations record what they did.
    pub(crate) async fn answer<T>(
        &self,
        caller: &impl Attribution,
        context: AuditEvent,
        outcome: Result<T, ServiceError>,
    ) -> Result<T, ServiceError> {
        let error = match outcome {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        let Some(audited) = error.audit_outcome() else {
            ::metrics::counter!("valet_failed_closed_total", "reason" => error.kind()).increment(1);
            tracing::error!(request_id = caller.request_id(), error = %self.redact(&error.to_string()), "operation failed closed");
            return Err(error);
        };
        let mut event = context;
        event.set_outcome(audited);
        let event = gateway::describe_refusal(event.with("reason", error.to_string()), &error);
        self.record(caller, event).await?;
        Err(error)
    }
}

/// A record of `action` that [`Valet::answer`] completes if the operation is refused.
pub(crate) fn context(action: AuditAction) -> AuditEvent {
    AuditEvent::new(action, Outcome::Denied)
}
