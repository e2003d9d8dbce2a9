//! `valet-bench hostile`: a legitimate client issues tokens, introspects one and calls the
//! gateway while each attack runs from other loopback addresses (127.0.0.0/8 gives many); its
//! throughput and p99 under each attack against the same client unattacked, same run, and how
//! fast the audit log grew meanwhile.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use valet_client::{Client, ClientConfig, TokenRequest};
use valet_core::Secret;
use valet_tests::attacker;

use crate::load::{self, Measurement};
use crate::processes::{self, AGENT_KEY, Deployment, MCP_AGENT_KEY, Process};
use crate::report::Report;
use crate::scenarios::{Options, Setup, cap, http_client, http_client_from};

/// The legitimate client's concurrency.
const LEGITIMATE_CONCURRENCY: usize = 8;

/// One attack: its name, and what it does until stopped (counting what it sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attack {
    /// Connections that never send a request, held open, from a few addresses.
    IdleConnections,
    /// Connections that send half a request head and trickle the rest, from many addresses.
    HalfSentHeads,
    /// HTTP/2 connections that send no request but answer (and send) pings.
    IdleHttp2,
    /// Refused gateway calls of one valid token, each with a 30 KB query string.
    ExpensiveRefusals,
    /// Bad tokens, each from a new address.
    AddressRotation,
    /// One token's identical approval-gated MCP calls, 600 at once, each sent again when
    /// answered.
    HeldCalls,
    /// Console POSTs without a session, from one address.
    ConsolePosts,
    /// A fresh grant each second on each of 4 workers, each opening a session with the MCP
    /// server valetd runs (a process start each, were they not budgeted).
    ServerProcesses,
}

impl Attack {
    const ALL: [Attack; 8] = [
        Attack::IdleConnections,
        Attack::HalfSentHeads,
        Attack::IdleHttp2,
        Attack::ExpensiveRefusals,
        Attack::AddressRotation,
        Attack::HeldCalls,
        Attack::ConsolePosts,
        Attack::ServerProcesses,
    ];

    fn name(self) -> &'static str {
        match self {
            Attack::IdleConnections => "hostile: 1,200 idle connections (8 addresses)",
            Attack::HalfSentHeads => "hostile: half-sent request heads (many addresses)",
            Attack::IdleHttp2 => "hostile: idle HTTP/2 connections answering pings",
            Attack::ExpensiveRefusals => "hostile: refused calls with 30 KB queries (one token)",
            Attack::AddressRotation => "hostile: bad tokens from rotating addresses, 2,000/s",
            Attack::HeldCalls => "hostile: 600 identical approval-gated MCP calls (one token)",
            Attack::ConsolePosts => "hostile: console POSTs without a session (one address)",
            Attack::ServerProcesses => "hostile: a fresh grant a second on a stdio MCP server (x4)",
        }
    }
}

fn socket_address(address: &str) -> anyhow::Result<SocketAddr> {
    Ok(address.trim_start_matches("http://").parse()?)
}

/// Keeps `count` connections to `target` open from `sources` addresses, each doing `hold`
/// with its stream; reconnects whatever valetd closes, until stopped.
fn hold_connections<F, Fut>(
    tasks: &mut tokio::task::JoinSet<()>,
    target: SocketAddr,
    block: u8,
    sources: u32,
    count: u32,
    sent: Arc<AtomicU64>,
    hold: F,
) where
    F: Fn(TcpStream) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    for n in 0..count {
        let (hold, sent) = (hold.clone(), sent.clone());
        let source = attacker::address(block, n % sources);
        tasks.spawn(async move {
            loop {
                match attacker::connect_from(source, target).await {
                    Ok(stream) => {
                        sent.fetch_add(1, Ordering::Relaxed);
                        hold(stream).await;
                        // Closed by valetd: back, a moment later (a holder, not a flood).
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
    }
}

/// Reads until the peer closes.
async fn drain(mut stream: TcpStream) {
    let mut buffer = [0u8; 4096];
    while matches!(stream.read(&mut buffer).await, Ok(n) if n > 0) {}
}

/// Starts `attack` against the running valetd, on the attacker's own runtime (`attacker`: one
/// thread, so it competes with valetd and the legitimate client for the machine's cores as a
/// process of its own would, not for the legitimate client's scheduler); it runs until the
/// returned set is dropped. `token` is a valid token of the agent's, for the attacks that hold
/// one.
fn start(
    attack: Attack,
    target: &Target,
    attacker: &tokio::runtime::Runtime,
    token: &str,
    sent: Arc<AtomicU64>,
) -> anyhow::Result<tokio::task::JoinSet<()>> {
    let _attacker = attacker.enter();
    let mut tasks = tokio::task::JoinSet::new();
    let grpc = socket_address(&target.valetd.address)?;
    let gateway_text = target
        .valetd
        .gateway
        .clone()
        .ok_or_else(|| anyhow::anyhow!("valetd started without a gateway"))?;
    let gateway = socket_address(&gateway_text)?;
    match attack {
        Attack::IdleConnections => {
            for target in [grpc, gateway] {
                hold_connections(&mut tasks, target, 10, 8, 600, sent.clone(), drain);
            }
        }
        Attack::HalfSentHeads => {
            hold_connections(
                &mut tasks,
                gateway,
                11,
                2000,
                2000,
                sent,
                |mut stream| async move {
                    if stream
                        .write_all(b"GET /healthz HTTP/1.1\r\nHost: valet\r\nX-Trickle: ")
                        .await
                        .is_err()
                    {
                        return;
                    }
                    loop {
                        tokio::time::sleep(Duration::from_secs(2)).await;
                        if stream.write_all(b"a").await.is_err() {
                            return;
                        }
                    }
                },
            );
        }
        Attack::IdleHttp2 => {
            for target in [grpc, gateway] {
                hold_connections(&mut tasks, target, 12, 8, 300, sent.clone(), |stream| {
                    attacker::ping_only(stream, Duration::from_secs(1))
                });
            }
        }
        Attack::ExpensiveRefusals => {
            let token = token.to_string();
            let url = Arc::new(format!(
                "http://{gateway_text}/u/fast/not-allowed?q={}",
                // As long as valetd reads a request head (32 KiB), headers included.
                "x".repeat(30_000)
            ));
            let client = http_client_from(Some(attacker::address(15, 1)));
            for _ in 0..16 {
                let (client, url, token, sent) =
                    (client.clone(), url.clone(), token.clone(), sent.clone());
                tasks.spawn(async move {
                    loop {
                        let request = http::Request::get(url.as_str())
                            .header("authorization", format!("Bearer {token}"))
                            .body(Full::new(Bytes::new()));
                        let Ok(request) = request else { return };
                        if let Ok(response) = client.request(request).await {
                            let _ = response.into_body().collect().await;
                        }
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        }
        Attack::AddressRotation => {
            // 2,000 attempts a second, each from an address not used for a while: far more
            // addresses than any per-address budget could stop.
            for worker in 0..16u32 {
                let sent = sent.clone();
                tasks.spawn(async move {
                    let mut n = worker;
                    let mut pace = tokio::time::interval(Duration::from_millis(8));
                    loop {
                        pace.tick().await;
                        n = n.wrapping_add(16);
                        let source = attacker::address(13, n % 60_000);
                        let Ok(mut stream) = attacker::connect_from(source, gateway).await else {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        };
                        let request = format!(
                            "GET /u/fast/ok HTTP/1.1\r\nHost: valet\r\nAuthorization: Bearer not-a-token-{n}\r\nConnection: close\r\n\r\n"
                        );
                        if stream.write_all(request.as_bytes()).await.is_ok() {
                            let mut answer = Vec::new();
                            let _ = tokio::time::timeout(
                                Duration::from_secs(5),
                                stream.read_to_end(&mut answer),
                            )
                            .await;
                        }
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        }
        Attack::HeldCalls => {
            let token = target.held_token.clone();
            let url = Arc::new(format!("http://{gateway_text}/mcp/deploy"));
            let client = http_client_from(Some(attacker::address(16, 1)));
            for _ in 0..600 {
                let (client, url, token, sent) =
                    (client.clone(), url.clone(), token.clone(), sent.clone());
                tasks.spawn(async move {
                    loop {
                        let Ok(request) = tool_call(&url, &token, "delete_volume", HELD_CALL)
                        else {
                            return;
                        };
                        match client.request(request).await {
                            Ok(response) => {
                                let _ = response.into_body().collect().await;
                            }
                            // Its connection refused or closed (one address holds at most a
                            // quarter of valetd's connections): it connects again shortly, as
                            // a client library's pool does.
                            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                        }
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        }
        Attack::ConsolePosts => {
            let console = socket_address(
                target
                    .valetd
                    .console
                    .as_deref()
                    .ok_or_else(|| anyhow::anyhow!("valetd started without a console"))?,
            )?;
            for _ in 0..16 {
                let sent = sent.clone();
                tasks.spawn(async move {
                    loop {
                        let posted = async {
                            let stream = attacker::connect_from(attacker::address(14, 1), console)
                                .await
                                .ok()?;
                            let (mut sender, connection) = hyper::client::conn::http1::handshake(
                                hyper_util::rt::TokioIo::new(stream),
                            )
                            .await
                            .ok()?;
                            tokio::spawn(connection);
                            loop {
                                let request = http::Request::post("/revoke-all")
                                    .header("host", "valet")
                                    .header("content-type", "application/x-www-form-urlencoded")
                                    .body(Full::new(Bytes::from_static(b"scope=gateway")))
                                    .ok()?;
                                let response = sender.send_request(request).await.ok()?;
                                let _ = response.into_body().collect().await;
                                sent.fetch_add(1, Ordering::Relaxed);
                            }
                        };
                        let _: Option<()> = posted.await;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                });
            }
        }
        Attack::ServerProcesses => {
            let url = Arc::new(format!("http://{gateway_text}/mcp/deploy-stdio"));
            let address = target.valetd.address.clone();
            let client = http_client_from(Some(attacker::address(17, 1)));
            for worker in 0..4u64 {
                let (client, url, address, sent) =
                    (client.clone(), url.clone(), address.clone(), sent.clone());
                tasks.spawn(async move {
                    let Ok(agent) = client_of(&address, MCP_AGENT_KEY).await else {
                        return;
                    };
                    let mut pace = tokio::time::interval(Duration::from_secs(1));
                    for n in 0u64.. {
                        pace.tick().await;
                        let Ok(grant) = agent
                            .request_token(TokenRequest::new(
                                "mcp-stdio",
                                format!("fresh-{worker}-{n}"),
                            ))
                            .await
                        else {
                            continue;
                        };
                        let Ok(request) =
                            tool_call(&url, grant.token_str(), "list_projects", LIST_CALL)
                        else {
                            return;
                        };
                        if let Ok(response) = client.request(request).await {
                            let _ = response.into_body().collect().await;
                        }
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        }
    }
    Ok(tasks)
}

/// An MCP tool call (2026-07-28: stateless, its envelope in each request).
const HELD_CALL: &str = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_volume","arguments":{"volumeId":"v-prod-db"},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}"#;
const LIST_CALL: &str = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"list_projects","arguments":{},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}"#;
const MCP_HEADERS: &[(&str, &str)] = &[
    ("accept", "application/json, text/event-stream"),
    ("mcp-protocol-version", "2026-07-28"),
    ("mcp-method", "tools/call"),
];

/// A POST of the MCP tool call `body` (naming `tool`) to `url` with `token`.
fn tool_call(
    url: &str,
    token: &str,
    tool: &str,
    body: &'static str,
) -> http::Result<http::Request<Full<Bytes>>> {
    let mut request = http::Request::post(url)
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .header("mcp-name", tool);
    for (name, value) in MCP_HEADERS {
        request = request.header(*name, *value);
    }
    request.body(Full::new(Bytes::from_static(body.as_bytes())))
}

/// The valetd the scenario attacks, its deployment, and what it serves the attacker.
struct Target {
    deployment: Deployment,
    valetd: Process,
    /// A token of the attacker's for the approval-gated MCP calls.
    held_token: String,
    _mcp_server: Process,
    _directory: tempfile::TempDir,
}

async fn client_of(address: &str, key: &str) -> anyhow::Result<Client> {
    Ok(Client::connect(ClientConfig::new(
        format!("http://{address}"),
        Secret::from(key.to_string()),
    ))
    .await?)
}

/// The legitimate client: token requests, introspections of one token and gateway calls, in
/// turn, from 127.0.0.1.
async fn legitimate(target: &Target, options: &Options) -> anyhow::Result<Measurement> {
    let client = client_of(&target.valetd.address, AGENT_KEY).await?;
    let token = Arc::new(
        client
            .request_token(TokenRequest::new("gateway", "hostile-legitimate"))
            .await?
            .token_str()
            .to_string(),
    );
    let gateway = target
        .valetd
        .gateway
        .clone()
        .ok_or_else(|| anyhow::anyhow!("valetd started without a gateway"))?;
    let url = Arc::new(format!("http://{gateway}/u/fast/ok"));
    let http = http_client();
    let counter = Arc::new(AtomicU64::new(0));
    Ok(load::run(
        LEGITIMATE_CONCURRENCY,
        options.duration,
        cap(options),
        move |worker| {
            let (client, token, url, http) =
                (client.clone(), token.clone(), url.clone(), http.clone());
            let n = counter.fetch_add(1, Ordering::Relaxed);
            async move {
                let call = async {
                    match n % 3 {
                        0 => client
                            .request_token(TokenRequest::new(
                                "bench",
                                format!("legit-{worker}-{n}"),
                            ))
                            .await
                            .map(|_| ())
                            .map_err(|error| error.to_string()),
                        1 => match client.introspect(&token).await {
                            Ok(reply) if reply.active => Ok(()),
                            Ok(reply) => Err(format!("inactive: {}", reply.reason)),
                            Err(error) => Err(error.to_string()),
                        },
                        _ => {
                            let request = http::Request::get(url.as_str())
                                .header("authorization", format!("Bearer {token}"))
                                .body(Full::new(Bytes::new()))
                                .map_err(|error| error.to_string())?;
                            let response = http
                                .request(request)
                                .await
                                .map_err(|error| error.to_string())?;
                            let status = response.status();
                            let _ = response.into_body().collect().await;
                            if status.is_success() {
                                Ok(())
                            } else {
                                Err(format!("gateway status {status}"))
                            }
                        }
                    }
                };
                // Served at all, within seconds: an operation that hangs is an error.
                tokio::time::timeout(Duration::from_secs(10), call)
                    .await
                    .map_err(|_| "no answer within 10 s".to_string())?
            }
        },
    )
    .await)
}

fn audit_bytes(target: &Target) -> u64 {
    std::fs::metadata(target.deployment.directory.path().join("audit.jsonl"))
        .map(|metadata| metadata.len())
        .unwrap_or(0)
}

/// The attacker's runtime, stopped without waiting when the run ends (a runtime cannot be
/// dropped inside another's task).
struct Attacker(Option<tokio::runtime::Runtime>);

impl Attacker {
    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.0
            .as_ref()
            .expect("the attacker's runtime lives until dropped")
    }
}

impl Drop for Attacker {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// The legitimate client unattacked, then under each attack.
pub async fn hostile(setup: &Setup, options: &Options) -> anyhow::Result<Vec<Report>> {
    let directory = tempfile::tempdir()?;
    let (mcp_server, mcp_url) =
        processes::start_mcp_server(&directory.path().join("executed.jsonl"))?;
    let deployment = Deployment::hostile(
        &setup.upstream.address,
        &mcp_url,
        &directory.path().join("stdio.jsonl"),
    )?;
    let (valetd, _) = deployment.start()?;
    let held_token = client_of(&valetd.address, MCP_AGENT_KEY)
        .await?
        .request_token(TokenRequest::new("mcp-held", "hostile-held"))
        .await?
        .token_str()
        .to_string();
    let target = Target {
        deployment,
        valetd,
        held_token,
        _mcp_server: mcp_server,
        _directory: directory,
    };
    let attacker = Attacker(Some(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?,
    ));
    let attacker = attacker.runtime();
    let token = client_of(&target.valetd.address, AGENT_KEY)
        .await?
        .request_token(TokenRequest::new("gateway", "hostile-refusals"))
        .await?
        .token_str()
        .to_string();
    let settle = if options.smoke {
        Duration::from_millis(500)
    } else {
        Duration::from_secs(3)
    };
    let mut reports = Vec::new();
    let chosen = Attack::ALL.into_iter().filter(|attack| {
        options
            .attack
            .as_deref()
            .is_none_or(|text| attack.name().contains(text))
    });
    for attack in chosen {
        // The client unattacked right before each attack: this machine drifts by ±20 % over
        // minutes, so each attack is compared with its own baseline.
        let unattacked = legitimate(&target, options).await?;
        let sent = Arc::new(AtomicU64::new(0));
        let tasks = start(attack, &target, attacker, &token, sent.clone())?;
        // Let it take hold, then see what it alone costs the audit log.
        tokio::time::sleep(settle).await;
        let audit_before = audit_bytes(&target);
        let alone = Instant::now();
        // A minute and a bit: refusal windows close, and their summaries are written, each minute.
        tokio::time::sleep(if options.smoke {
            settle
        } else {
            Duration::from_secs(65)
        })
        .await;
        let minutes = alone.elapsed().as_secs_f64() / 60.0;
        let audit_growth = audit_bytes(&target).saturating_sub(audit_before);
        let measured = legitimate(&target, options).await?;
        {
            let _attacker = attacker.enter();
            drop(tasks);
        }
        let mut notes = serde_json::Map::new();
        let p99_ratio = measured.percentile_ms(0.99) / unattacked.percentile_ms(0.99).max(1e-9);
        notes.insert(
            "p99_ratio".into(),
            Value::from((p99_ratio * 100.0).round() / 100.0),
        );
        notes.insert(
            "audit_growth_kib_per_min".into(),
            Value::from(((audit_growth as f64 / 1024.0) / minutes.max(1e-9)).round()),
        );
        notes.insert(
            "attacker_connections_or_requests".into(),
            Value::from(sent.load(Ordering::Relaxed)),
        );
        let report = Report {
            scenario: attack.name().to_string(),
            concurrency: LEGITIMATE_CONCURRENCY,
            measured,
            baseline_name: "unattacked".to_string(),
            baseline: Some(unattacked.clone()),
            notes,
        };
        report.print(options.json);
        reports.push(report);
        // Let what the attack left close before the next one.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(reports)
}
