//! Abuse limits on valetd's listeners: idle and half-sent connections beyond the connection
//! limit, and a process out of file descriptors, leave valetd answering with a bounded log.

use std::io::Write;
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use futures::StreamExt;

use valet_client::{Client, ClientConfig, TokenRequest};
use valet_core::Secret;
use valet_tests::{AGENT_KEY, Deployment, eventually, standard_config};

/// Opens `count` connections to `address` and sends each the start of `prefix`, never the rest.
fn hold(address: &str, count: usize, prefix: &[u8]) -> Vec<TcpStream> {
    let address = address.trim_start_matches("http://").parse().unwrap();
    (0..count)
        .filter_map(|_| {
            let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2)).ok()?;
            let _ = stream.write_all(prefix);
            Some(stream)
        })
        .collect()
}

#[tokio::test]
async fn idle_and_half_sent_connections_and_a_file_descriptor_limit_leave_valetd_answering() {
    let config = standard_config("").replace(
        "grant_retention = \"1h\"",
        "grant_retention = \"1h\"\nmax_connections = 100\nidle_timeout = \"2s\"\ngateway_listen = \"127.0.0.1:0\"",
    );
    let deployment = Deployment::new(&config);
    let valetd = deployment.start(&[]);
    let gateway = valetd.gateway.clone().expect("a gateway");
    let agent = valetd.client(AGENT_KEY).await;
    agent
        .request_token(TokenRequest::new("limited", "before"))
        .await
        .unwrap();
    let audit_before = std::fs::read_to_string(deployment.path("audit/audit.jsonl"))
        .unwrap()
        .lines()
        .count();

    // Fewer file descriptors than the connections about to arrive: accepting must fail for a
    // while, and valetd must back off rather than spin.
    let pid = valetd.pid().unwrap().to_string();
    let limited = Command::new("prlimit")
        .args(["--pid", &pid, "--nofile=160:160"])
        .status()
        .expect("run prlimit (util-linux)");
    assert!(
        limited.success(),
        "prlimit could not lower valetd's file limit"
    );

    let held_grpc = hold(&valetd.address, 150, b"PRI * HTTP/2.0\r\n");
    let held_gateway = hold(&gateway, 150, b"GET /healthz HTTP/1.1\r\nHost: valet\r\n");
    assert!(
        held_grpc.len() + held_gateway.len() >= 250,
        "could not open the connections"
    );

    // While those are still open, a new client is served once idle ones are closed.
    let answered = eventually(Duration::from_secs(60), || async {
        let key = Secret::from(AGENT_KEY.to_string());
        let connect = Client::connect(ClientConfig::new(valetd.address.clone(), key));
        let Ok(Ok(client)) = tokio::time::timeout(Duration::from_secs(5), connect).await else {
            return false;
        };
        let request = client.request_token(TokenRequest::new("limited", "during"));
        matches!(
            tokio::time::timeout(Duration::from_secs(5), request).await,
            Ok(Ok(_))
        )
    })
    .await;
    assert!(
        answered,
        "valetd stopped answering:\n{}",
        tail(&valetd.output())
    );
    drop(held_grpc);
    drop(held_gateway);

    let output = valetd.output();
    let accept_warnings = output.matches("accepting a connection failed").count();
    assert!(
        accept_warnings <= 10,
        "{accept_warnings} accept warnings: the accept loop must back off and log sparingly"
    );
    assert!(
        output.len() < 4_000_000,
        "valetd logged {} bytes",
        output.len()
    );
    // Connections that never authenticated write nothing to the audit log.
    let audit_after = std::fs::read_to_string(deployment.path("audit/audit.jsonl"))
        .unwrap()
        .lines()
        .count();
    assert!(
        audit_after - audit_before <= 4,
        "{} audit records for connections that sent nothing",
        audit_after - audit_before
    );
}

fn tail(text: &str) -> &str {
    &text[text.len().saturating_sub(4000)..]
}

/// Sends `count` gateway requests without a token; returns each status and Retry-After.
async fn anonymous_gateway_calls(gateway: &str, count: usize) -> Vec<(u16, Option<String>)> {
    let address = gateway.trim_start_matches("http://").to_string();
    // Twenty at a time: a throttled answer waits a second before it is sent, and connections
    // that never authenticated are closed to make room past the source's share of them
    // (`max_unauthenticated_per_source`, 64 here) — on a loaded machine, closed connections
    // linger a moment before valetd sees them go.
    futures::stream::iter(0..count)
        .map(|_| one_anonymous_gateway_call(&address))
        .buffer_unordered(20)
        .collect()
        .await
}

async fn one_anonymous_gateway_call(address: &str) -> (u16, Option<String>) {
    let stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = http::Request::get("/u/railway/graphql")
        .header("host", "valet")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    (
        response.status().as_u16(),
        response
            .headers()
            .get("retry-after")
            .and_then(|value| value.to_str().ok())
            .map(str::to_string),
    )
}

#[tokio::test]
async fn floods_of_failed_authentication_are_throttled_and_summarised_not_written_one_by_one() {
    // The upstream is never reached: no call carries a token.
    let upstream = "\n[[upstream]]\nname = \"railway\"\nbase_url = \"http://127.0.0.1:9\"\ncredential = \"railway\"\n[upstream.inject]\nheader = { Authorization = \"Bearer {secret}\" }\n";
    let config = standard_config(upstream).replace(
        "grant_retention = \"1h\"",
        "grant_retention = \"1h\"\nfailed_authentication_limit = \"20/min\"\ngateway_listen = \"127.0.0.1:0\"",
    );
    let deployment = Deployment::new(&config);
    let valetd = deployment.start(&[]);
    let before = deployment.audit_records().len();

    // 300 calls with a key valetd does not know, from one source.
    let stranger = Client::connect(ClientConfig::new(
        valetd.address.clone(),
        Secret::from("vk_not_a_key".to_string()),
    ))
    .await
    .unwrap();
    // Fifty at a time (a throttled answer waits a second before it is sent; a source may have
    // 64 waiting at once).
    let started = std::time::Instant::now();
    let refusals: Vec<_> = futures::stream::iter(0..300)
        .map(|index| {
            let stranger = stranger.clone();
            async move {
                stranger
                    .request_token(TokenRequest::new("limited", format!("flood-{index}")))
                    .await
                    .expect_err("an unknown key is refused")
            }
        })
        .buffer_unordered(50)
        .collect()
        .await;
    // The budget of 20 failures (refilling at 20 a minute while the flood lasts), then
    // throttled, with a hint.
    let refilled = (started.elapsed().as_secs_f64() * 20.0 / 60.0).ceil() as usize;
    let unauthenticated = refusals
        .iter()
        .filter(|refusal| refusal.code() == Some(tonic::Code::Unauthenticated))
        .count();
    assert!(
        (20..=20 + refilled).contains(&unauthenticated),
        "{unauthenticated} failures before the throttle, budget 20 and {refilled} refilled"
    );
    let throttled: Vec<_> = refusals
        .iter()
        .filter(|refusal| refusal.code() == Some(tonic::Code::ResourceExhausted))
        .collect();
    assert_eq!(throttled.len(), 300 - unauthenticated, "{refusals:?}");
    assert!(
        throttled
            .iter()
            .all(|refusal| refusal.to_string().contains("retry in")),
        "{throttled:?}"
    );

    // A valid key from the same source still gets in.
    let agent = valetd.client(AGENT_KEY).await;
    agent
        .request_token(TokenRequest::new("limited", "neighbour"))
        .await
        .expect("a valid key is not locked out by its neighbour's failures");

    // Anonymous gateway calls from the throttled source: 429 with Retry-After (but for what
    // the budget refilled meanwhile).
    let gateway = valetd.gateway.clone().expect("a gateway");
    let answers = anonymous_gateway_calls(&gateway, 100).await;
    let refilled = (started.elapsed().as_secs_f64() * 20.0 / 60.0).ceil() as usize;
    let throttled = answers
        .iter()
        .filter(|(status, retry_after)| *status == 429 && retry_after.is_some())
        .count();
    let unauthenticated = answers.iter().filter(|(status, _)| *status == 401).count();
    assert!(
        throttled + unauthenticated == 100 && unauthenticated <= refilled,
        "{answers:?}"
    );

    // 400 refusals in all: a handful of records, not one per request.
    let during = deployment.audit_records().len() - before;
    assert!(
        during <= 6,
        "{during} audit records for 400 refused requests (expected the first of each kind)"
    );
    valetd.stop().await;
    let records = deployment.audit_records();
    let summaries: Vec<&serde_json::Value> = records
        .iter()
        .filter(|record| record["aggregated"] == "true")
        .collect();
    let counted: u64 = summaries
        .iter()
        .map(|record| {
            record["n_more"]
                .as_str()
                .and_then(|text| text.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum();
    let first_records = records[before..]
        .iter()
        .filter(|record| {
            record["outcome"] == "denied"
                && record["aggregated"].is_null()
                && record["principal"].is_null()
        })
        .count() as u64;
    assert_eq!(
        counted + first_records,
        400,
        "every refusal is accounted for: {summaries:?}"
    );
}

#[tokio::test]
async fn a_principal_over_its_rate_is_refused_with_a_retry_hint() {
    let config = standard_config("").replace(
        "name = \"agent\"\nroles = [\"agent\"]",
        "name = \"agent\"\nroles = [\"agent\"]\nrate = \"5/min\"",
    );
    let deployment = Deployment::new(&config);
    let valetd = deployment.start(&[]);
    let agent = valetd.client(AGENT_KEY).await;
    for index in 0..5 {
        agent
            .request_token(TokenRequest::new("limited", format!("rate-{index}")))
            .await
            .expect("within the rate");
    }
    let refused = agent
        .request_token(TokenRequest::new("limited", "rate-over"))
        .await
        .expect_err("over the rate");
    assert_eq!(
        refused.code(),
        Some(tonic::Code::ResourceExhausted),
        "{refused}"
    );
    let message = refused.to_string();
    assert!(
        message.contains("over its rate of 5/min") && message.contains("retry in "),
        "{message}"
    );
    // One request's worth of 5/min refills in 12 s, less the time the five took.
    match &refused {
        valet_client::ClientError::Status(status) => {
            let retry_after: u64 = status
                .metadata()
                .get("retry-after")
                .and_then(|value| value.to_str().ok())
                .and_then(|text| text.parse().ok())
                .expect("a retry-after hint");
            assert!((1..=12).contains(&retry_after), "{retry_after}");
        }
        other => panic!("expected a status, got {other:?}"),
    }
    // Other principals are not affected.
    valetd
        .client(valet_tests::OTHER_AGENT_KEY)
        .await
        .request_token(
            TokenRequest::new("deploy-staging", "unaffected").with_param("project", "web"),
        )
        .await
        .expect("another principal's rate is its own");
}

#[tokio::test]
async fn a_grpc_client_trickling_its_http2_preface_is_cut_off_at_the_header_read_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    // The idle timeout (2 minutes) never fires: a byte arrives every 0.8 s. The preface would
    // take over 18 s at that pace; valetd stops waiting for it after 10 s.
    let deployment = Deployment::new(&standard_config(""));
    let valetd = deployment.start(&[]);
    let address = valetd.address.trim_start_matches("http://").to_string();
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    let started = std::time::Instant::now();
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut closed = false;
    for byte in preface.iter().cycle().take(4 * preface.len()) {
        if stream.write_all(&[*byte]).await.is_err() {
            closed = true;
            break;
        }
        let mut answer = [0u8; 64];
        match tokio::time::timeout(Duration::from_millis(800), stream.read(&mut answer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            _ => {}
        }
    }
    assert!(closed, "valetd kept a trickling connection open");
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(16),
        "cut off only after {waited:?}, when the whole preface would have arrived"
    );

    // A client that sends its preface at once is served as before.
    let agent = valetd.client(AGENT_KEY).await;
    agent
        .request_token(TokenRequest::new("limited", "after-trickle"))
        .await
        .unwrap();
}
