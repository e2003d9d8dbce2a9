//! Wiring: load the config, open the store, the audit log and the key ring, serve gRPC, sweep
//! expired state, reload on SIGHUP, and stop cleanly on SIGTERM or SIGINT.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use valet_core::config::{Config, EtcdConfig, StoreConfig};
use valet_core::{Clock, SystemClock};
use valet_gateway::tls::TlsMaterial;
use valet_proto::v1::admin_server::AdminServer;
use valet_proto::v1::broker_server::BrokerServer;
use valet_service::{LoadError, Overrides, Parts, ReloadTrigger, Valet};
use valet_store::{EtcdOptions, EtcdStore, SledStore, Store};

use crate::admin::AdminService;
use crate::broker::BrokerService;
use crate::error::ServerError;
use crate::layers;

/// The largest request message valetd decodes. Requests are small; this bounds memory per call.
const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// How long in-flight requests get to finish after SIGTERM or SIGINT.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How often the TLS files are checked for changes.
const TLS_FILE_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// How often expired grants, revocations and retired keys are swept.
const SWEEP_INTERVAL: Duration = Duration::from_secs(30);

/// How valetd was started.
#[derive(Debug, Clone)]
pub struct Options {
    pub config_path: PathBuf,
    /// Development mode: generate a key-encryption key into the data dir when none is configured.
    pub dev: bool,
    pub overrides: Overrides,
}

/// Log output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

/// Opens the configured engine: sled in the data dir, or the etcd cluster.
async fn open_store(config: &Config) -> Result<Arc<dyn Store>, ServerError> {
    match &config.store {
        StoreConfig::Sled => Ok(Arc::new(SledStore::open(
            &config.server.data_dir.join("store"),
        )?)),
        StoreConfig::Etcd(etcd) => {
            let password = match &etcd.password {
                None => None,
                Some(source) => Some(valet_service::read_secret(source).map_err(|detail| {
                    LoadError::CredentialUnreadable {
                        name: "store.password".to_string(),
                        source_description: source.to_string(),
                        detail,
                    }
                })?),
            };
            let store = EtcdStore::connect(EtcdOptions {
                endpoints: etcd.endpoints.clone(),
                prefix: etcd.prefix.clone(),
                username: etcd.username.clone(),
                password,
                replica: replica_name(config),
                retention: config.server.grant_retention,
                ca_file: etcd.ca_file.clone(),
                client_certificate: etcd.client_certificate.clone(),
                lock_lease: EtcdOptions::DEFAULT_LOCK_LEASE,
            })
            .await?;
            tracing::info!(
                endpoints = etcd.endpoints.join(","),
                prefix = etcd.prefix,
                replica = replica_name(config),
                "state in etcd"
            );
            Ok(Arc::new(store))
        }
    }
}

/// This replica's name: `store.replica`, or the host name.
pub fn replica_name(config: &Config) -> String {
    match &config.store {
        StoreConfig::Etcd(EtcdConfig {
            replica: Some(replica),
            ..
        }) => replica.clone(),
        _ => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|name| name.trim().to_string())
            .ok()
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| "valetd".to_string()),
    }
}

/// Plaintext listeners off loopback that the config or `--dev` allows: says so loudly (and
/// `/healthz` says so for as long as it lasts). Ones not allowed were refused with the config's
/// problems.
fn warn_plaintext(config: &Config, dev: bool) {
    let exposed = config.server.plaintext_listeners_off_loopback();
    if exposed.is_empty() || !(config.server.insecure_plaintext || dev) {
        return;
    }
    let allowed_by = if config.server.insecure_plaintext {
        "[server] insecure_plaintext = true"
    } else {
        "--dev"
    };
    for (listener, address) in exposed {
        tracing::warn!(listener, %address, allowed_by, "INSECURE: the {listener} listener serves plaintext on {address}, which is not a loopback address; keys and tokens cross that network in clear");
    }
}

/// File descriptors valetd uses besides its listeners' connections: the store, the audit log,
/// key files, the runtime's own.
const FILES_BESIDES_CONNECTIONS: u64 = 256;

/// How many files the budgets let valetd hold open at once: on each listener its connections
/// and those held before closing, an upstream connection per gateway call in flight, three
/// pipes per MCP server process, and [`FILES_BESIDES_CONNECTIONS`].
fn files_needed(config: &valet_core::config::Config) -> u64 {
    let server = &config.server;
    let listeners = 1 + [
        server.gateway_listen,
        server.console_listen,
        server.metrics_listen,
    ]
    .iter()
    .filter(|address| address.is_some())
    .count();
    let per_listener = (server.max_connections + valet_gateway::budget::MAX_HELD) as u64;
    let upstream_connections = if server.gateway_listen.is_some() {
        server.max_connections as u64
    } else {
        0
    };
    let server_pipes: u64 = config
        .upstreams
        .values()
        .filter_map(|upstream| match &upstream.target {
            valet_core::config::Target::Process(server) => Some(3 * server.max_processes as u64),
            valet_core::config::Target::Url { .. } => None,
        })
        .sum();
    listeners as u64 * per_listener
        + upstream_connections
        + server_pipes
        + FILES_BESIDES_CONNECTIONS
}

/// Raises the open-file limit to what the budgets need (up to the hard limit, as a service
/// manager allows it), and warns when even the hard limit is lower: past it, accepting fails
/// and the listener backs off instead of serving within its budgets.
fn raise_open_file_limit(config: &valet_core::config::Config) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let needed = files_needed(config);
    let limit = getrlimit(Resource::Nofile);
    let current = limit.current.unwrap_or(u64::MAX);
    if current >= needed {
        return;
    }
    let hard = limit.maximum.unwrap_or(u64::MAX);
    let raised = needed.min(hard);
    let outcome = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(raised),
            maximum: limit.maximum,
        },
    );
    match outcome {
        Ok(()) if raised >= needed => {
            tracing::info!(
                from = current,
                to = raised,
                "raised the open-file limit to what the connection budgets need"
            );
        }
        Ok(()) | Err(_) => {
            let now = if outcome.is_ok() { raised } else { current };
            tracing::warn!(
                limit = now,
                needed,
                "the open-file limit is below what the connection budgets need (each listener's server.max_connections plus the connections held before closing, upstream connections, MCP server pipes): raise the hard limit (LimitNOFILE= in systemd, ulimit -Hn) or lower server.max_connections"
            );
        }
    }
}

/// Runs valetd until SIGTERM or SIGINT.
pub async fn run(options: Options) -> Result<(), ServerError> {
    let loaded = valet_service::load_config(&options.config_path, &options.overrides)?;
    let config = loaded.config.clone();
    warn_plaintext(&config, options.dev);
    if let Some(endpoint) = &config.server.otlp_endpoint {
        crate::telemetry::export_traces(endpoint).map_err(|detail| ServerError::Telemetry {
            what: format!("the OTLP trace exporter for [server] otlp_endpoint {endpoint:?}"),
            detail,
        })?;
        tracing::info!(%endpoint, "exporting traces to {endpoint}/v1/traces");
    }
    raise_open_file_limit(&config);
    let data_dir = &config.server.data_dir;
    std::fs::create_dir_all(data_dir).map_err(|error| ServerError::DataDir {
        path: data_dir.display().to_string(),
        detail: error.to_string(),
    })?;
    let seal_key = valet_service::load_seal_key(&config, options.dev)?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let store = open_store(&config).await?;
    let outbound = crate::outbound::HyperOutbound::new().map_err(ServerError::Transport)?;
    let valet = Valet::open(Parts {
        loaded,
        config_path: options.config_path.clone(),
        overrides: options.overrides.clone(),
        seal_key,
        store,
        clock,
        outbound: Arc::new(outbound),
        replica: match &config.store {
            StoreConfig::Etcd(_) => Some(replica_name(&config)),
            StoreConfig::Sled => None,
        },
    })
    .await
    .map_err(|error| match error {
        // Name the key that was tried, so the operator knows which file or variable to fix.
        valet_service::ServiceError::Key(valet_core::keyring::KeyError::UnsealFailed { kid }) => {
            ServerError::WrongSealKey {
                kid,
                tried: match &config.seal {
                    Some(source) => format!("{source} ([seal])"),
                    None => format!(
                        "file {} (the --dev key)",
                        config.server.data_dir.join("dev-seal.key").display()
                    ),
                },
            }
        }
        other => ServerError::Service(other),
    })?;

    let (listener, address) = bind(config.server.listen).await?;

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<BrokerServer<BrokerService>>()
        .await;
    health_reporter
        .set_serving::<AdminServer<AdminService>>()
        .await;
    tokio::spawn(report_store_health(valet.clone(), health_reporter.clone()));
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(valet_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|error| ServerError::Transport(error.to_string()))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|error| ServerError::Transport(error.to_string()))?;

    let broker = BrokerServer::new(BrokerService {
        valet: valet.clone(),
    })
    .max_decoding_message_size(MAX_REQUEST_BYTES);
    let admin = AdminServer::new(AdminService {
        valet: valet.clone(),
    })
    .max_decoding_message_size(MAX_REQUEST_BYTES);

    let tls = match &config.server.tls {
        None => None,
        Some(files) => {
            let (material, loaded) = TlsMaterial::load(files)?;
            valet.trust_client_authorities(loaded.client_authorities.clone());
            tracing::info!(
                certificate_sha256 = loaded.certificate_fingerprint,
                not_after = loaded.not_after,
                n_client_cas = loaded.n_client_cas,
                client_auth = files.client_auth.as_str(),
                "TLS on both listeners"
            );
            tokio::spawn(follow_tls_files(valet.clone(), material.clone()));
            Some(material)
        }
    };
    let limits = valet_gateway::listener::Limits {
        caps: valet_gateway::budget::ConnectionCaps {
            max_connections: config.server.max_connections,
            per_source: config.server.max_connections_per_source,
            unauthenticated_per_source: config.server.max_unauthenticated_per_source,
        },
        idle_timeout: config.server.idle_timeout,
    };
    let (stopping_sender, mut stopping) = tokio::sync::watch::channel(false);
    if let Some(gateway_address) = config.server.gateway_listen {
        let (gateway_listener, bound) = bind(gateway_address).await?;
        let gateway = valet_gateway::Gateway::new(valet.clone());
        let mut gateway_stopping = stopping.clone();
        tokio::spawn(
            gateway.serve(gateway_listener, limits, tls.clone(), async move {
                let _ = gateway_stopping.wait_for(|stopping| *stopping).await;
            }),
        );
        tracing::info!(address = %bound, n_upstreams = config.upstreams.len(), "gateway listening on {bound}");
    }
    if let Some(metrics_address) = config.server.metrics_listen {
        let handle = crate::metrics::install().map_err(|detail| ServerError::Telemetry {
            what: "the Prometheus metrics recorder".to_string(),
            detail,
        })?;
        let (metrics_listener, bound) = bind(metrics_address).await?;
        valet.enable_metrics();
        tokio::spawn(crate::metrics::serve(
            metrics_listener,
            limits,
            handle,
            valet.clone(),
        ));
        tokio::spawn({
            let valet = valet.clone();
            async move { valet.follow_grants_for_metrics().await }
        });
        tracing::info!(address = %bound, "metrics listening on {bound}");
    }
    if let Some(console_address) = config.server.console_listen {
        let (console_listener, bound) = bind(console_address).await?;
        let url = config.server.console_base_url(bound);
        valet.serve_console_at(url.clone());
        tokio::spawn(crate::console::serve(
            console_listener,
            limits,
            tls.clone(),
            valet.clone(),
        ));
        tracing::info!(address = %bound, %url, "console listening on {bound}");
    }
    tokio::spawn(sweep_forever(valet.clone()));
    tokio::spawn(checkpoint_grants_forever(valet.clone()));
    tokio::spawn(follow_key_ring(valet.clone()));
    tokio::spawn(expire_approvals_forever(valet.clone()));
    tokio::spawn(record_refusal_summaries_forever(valet.clone()));
    tokio::spawn(reload_on_sighup(valet.clone()));

    tracing::info!(%address, n_scopes = config.scopes.len(), n_principals = config.principals.len(), "valetd listening on {address}");
    let stopping_valet = valet.clone();
    let signal = async move {
        shutdown_signal().await;
        // Watches, tails and waits end now (telling their clients to reconnect), so the
        // graceful shutdown waits only for requests that finish on their own.
        stopping_valet.begin_shutdown();
        let _ = stopping_sender.send(true);
    };
    // Nagle's algorithm is off on every accepted connection (a 40 ms stall per small unary
    // request otherwise, found by valet-bench); the limited listener sets it.
    let incoming = crate::connections::incoming(listener, limits, tls);
    let serve = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(valet_gateway::KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(valet_gateway::KEEPALIVE_TIMEOUT))
        // Bounded per connection, as the HTTP listeners are: streams at once, and the head of
        // each (tonic leaves both unlimited).
        .max_concurrent_streams(valet_gateway::MAX_CONCURRENT_STREAMS)
        .http2_max_header_list_size(valet_gateway::MAX_REQUEST_HEAD as u32)
        .layer(layers::stack(valet.clone()))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(broker)
        .add_service(admin)
        .serve_with_incoming_shutdown(incoming, signal);
    // A client that never closes its connection must not keep valetd from stopping.
    let grace_over = async {
        let _ = stopping.wait_for(|stopping| *stopping).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        served = serve => served.map_err(|error| ServerError::Transport(error.to_string()))?,
        _ = grace_over => tracing::warn!(grace = ?SHUTDOWN_GRACE, "connections still open after the shutdown grace period; stopping anyway"),
    }
    // Refusals counted since their window opened are recorded before valetd goes.
    if let Err(error) = valet.record_refusal_summaries(true).await {
        tracing::error!(%error, "cannot record the last refusal summaries");
    }
    // Last: the store catches up with the audit log's head, so the next start has nothing to
    // re-read (and the log may be moved aside for rotation).
    if let Err(error) = valet.checkpoint_grants_at_stop().await {
        tracing::error!(%error, "cannot record the last grants checkpoint; the next start restores from the audit log");
    }
    tracing::info!("valetd stopped");
    tokio::task::spawn_blocking(crate::telemetry::flush_traces)
        .await
        .ok();
    Ok(())
}

/// A listener on `address`, and the address it bound (the port, when `address` asked for 0).
async fn bind(
    address: std::net::SocketAddr,
) -> Result<(TcpListener, std::net::SocketAddr), ServerError> {
    let failed = |error: std::io::Error| ServerError::Listen {
        address: address.to_string(),
        detail: error.to_string(),
    };
    let listener = TcpListener::bind(address).await.map_err(failed)?;
    let bound = listener.local_addr().map_err(failed)?;
    Ok((listener, bound))
}

/// Brings the embedded store up to the audit log every [`valet_service::CHECKPOINT_INTERVAL`]:
/// grants issued since are made durable in the store (one flush for all of them).
async fn checkpoint_grants_forever(valet: Arc<Valet>) {
    let mut ticks = tokio::time::interval(valet_service::CHECKPOINT_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Ten attempts a second while the store is down: said once when it starts failing, and once
    // when it works again, not on every tick.
    let mut failing = false;
    loop {
        ticks.tick().await;
        match valet.checkpoint_grants().await {
            Ok(n_restored) => {
                if failing {
                    failing = false;
                    tracing::info!("grants checkpoints work again");
                }
                if n_restored > 0 {
                    tracing::warn!(
                        n_restored,
                        "grants the store had lost were created again from their issue records"
                    )
                }
            }
            Err(error) if !failing => {
                failing = true;
                tracing::error!(%error, "grants checkpoint failed; the grants stay restorable from the audit log; retrying every 100 ms")
            }
            Err(_) => {}
        }
    }
}

/// Records the summaries of authentication refusal windows as they close.
async fn record_refusal_summaries_forever(valet: Arc<Valet>) {
    let mut ticks = tokio::time::interval(Duration::from_secs(5));
    loop {
        ticks.tick().await;
        if let Err(error) = valet.record_refusal_summaries(false).await {
            tracing::error!(%error, "cannot record refusal summaries; will retry");
        }
    }
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = terminate => tracing::info!("SIGTERM: finishing in-flight requests, then stopping"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: finishing in-flight requests, then stopping"),
    }
}

/// Re-reads the TLS files when they change (checked every couple of seconds) and after every
/// config reload (SIGHUP or `valet config reload`). New material applies to new connections; the
/// old stays in force when the new files are unusable. Both outcomes are audited.
async fn follow_tls_files(valet: Arc<Valet>, material: Arc<TlsMaterial>) {
    loop {
        let trigger = tokio::select! {
            _ = valet.config_reloaded() => "config reload",
            _ = tokio::time::sleep(TLS_FILE_CHECK_INTERVAL) => "file change",
        };
        let outcome = match material.reload() {
            Ok(None) => continue,
            Ok(Some(loaded)) => {
                valet.trust_client_authorities(loaded.client_authorities.clone());
                tracing::info!(
                    trigger,
                    certificate_sha256 = loaded.certificate_fingerprint,
                    not_after = loaded.not_after,
                    n_client_cas = loaded.n_client_cas,
                    "TLS files re-read; new connections use them"
                );
                Ok(vec![
                    ("certificate_sha256", loaded.certificate_fingerprint),
                    ("not_after", loaded.not_after),
                    ("n_client_cas", loaded.n_client_cas.to_string()),
                ])
            }
            Err(error) => {
                tracing::error!(trigger, %error, "the new TLS files are unusable; the ones in force stay");
                Err(error.to_string())
            }
        };
        if let Err(error) = valet.record_tls_reload(trigger, outcome).await {
            tracing::error!(%error, "cannot audit a TLS reload");
        }
    }
}

async fn reload_on_sighup(valet: Arc<Valet>) {
    let Ok(mut hangups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
    else {
        tracing::error!("cannot listen for SIGHUP; reload with `valet config reload` instead");
        return;
    };
    while hangups.recv().await.is_some() {
        // Errors are logged and audited inside reload; the running config stays.
        let _ = valet.reload(ReloadTrigger::Signal).await;
    }
}

/// The broker's health follows the store: `valet.v1.Broker` is NOT_SERVING while the store cannot
/// be read (etcd without quorum, say), so a load balancer's readiness check takes the replica out;
/// the overall service ("") stays SERVING while the process runs, for liveness checks.
async fn report_store_health(valet: Arc<Valet>, reporter: tonic_health::server::HealthReporter) {
    let mut ticks = tokio::time::interval(Duration::from_secs(2));
    let mut serving = true;
    loop {
        ticks.tick().await;
        let reachable = valet.store_reachable().await;
        if reachable != serving {
            serving = reachable;
            if serving {
                tracing::info!("the store is reachable again; the broker reports SERVING");
                reporter.set_serving::<BrokerServer<BrokerService>>().await;
            } else {
                tracing::error!(
                    "the store is unreachable; the broker reports NOT_SERVING and fails closed"
                );
                reporter
                    .set_not_serving::<BrokerServer<BrokerService>>()
                    .await;
            }
        }
    }
}

/// Keeps the key ring current with the store: a rotation on another replica, a sweep, or a gap
/// in the store's change stream (then everything is re-read, never trusted).
async fn follow_key_ring(valet: Arc<Valet>) {
    let mut changes = valet.store_changes();
    loop {
        // While the ring cannot be trusted (the store was unreachable, or held a record valetd
        // did not write), it is re-read every second until it can be: no change may arrive.
        let untrusted = valet.key_ring_untrusted();
        let reload = tokio::select! {
            change = changes.recv() => match change {
                Ok(valet_store::StoreChange::KeyRingChanged | valet_store::StoreChange::Resync) => true,
                Ok(_) => false,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => true,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            _ = tokio::time::sleep(Duration::from_secs(1)), if untrusted => true,
        };
        if reload && let Err(error) = valet.refresh_keys().await {
            tracing::error!(%error, "cannot reload the key ring after a change in the store");
        }
    }
}

async fn sweep_forever(valet: Arc<Valet>) {
    let mut ticks = tokio::time::interval(SWEEP_INTERVAL);
    loop {
        ticks.tick().await;
        match valet.sweep().await {
            Ok(report) => {
                if report.n_grants + report.n_revocations + report.n_keys > 0 {
                    tracing::info!(
                        n_grants = report.n_grants,
                        n_revocations = report.n_revocations,
                        n_keys = report.n_keys,
                        "swept ended records"
                    );
                }
            }
            Err(error) => tracing::error!(%error, "sweep failed; will retry"),
        }
    }
}

/// Approval timeouts are enforced at once by the status checks; this records them (audit, grant
/// denied) within a second.
async fn expire_approvals_forever(valet: Arc<Valet>) {
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    loop {
        ticks.tick().await;
        if let Err(error) = valet.expire_approvals().await {
            tracing::error!(%error, "cannot time out pending approvals; will retry");
        }
    }
}
