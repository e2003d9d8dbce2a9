//! Under hostile load, legitimate callers are still served: each attack runs from other loopback
//! addresses while a legitimate client asks for a token, calls the gateway and reads its health,
//! and must be answered — not fast, but at all, within seconds. What an attack costs the audit
//! log is bounded too.

use std::net::SocketAddr;
use std::time::Duration;

use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use valet_client::TokenRequest;
use valet_tests::attacker;
use valet_tests::upstream::{Upstream, call};
use valet_tests::{AGENT_KEY, Deployment, Valetd, standard_config};

/// A gateway route the legitimate client calls, to a local upstream.
fn config(upstream: &str, server: &str) -> String {
    let extra = format!(
        r#"
[[upstream]]
name = "fast"
base_url = "{upstream}"
credential = "railway"
[upstream.inject]
header = {{ Authorization = "Bearer {{secret}}" }}

[[scope]]
name = "fast"
upstream = "fast"
environment = "staging"
default_ttl = "5m"
max_ttl = "10m"
[[scope.allow]]
method = "GET"
path = "/ok"
[[scope.allow]]
method = "GET"
path = "/slow"
"#
    );
    standard_config(&extra)
        .replace(
            "grant_retention = \"1h\"",
            &format!("grant_retention = \"1h\"\ngateway_listen = \"127.0.0.1:0\"\n{server}"),
        )
        .replace(
            "scopes = [\"deploy-staging\", \"limited\", \"short\"]",
            "scopes = [\"deploy-staging\", \"limited\", \"short\", \"fast\"]",
        )
}

/// How many answers had each status.
fn counted(statuses: Vec<u16>) -> std::collections::BTreeMap<u16, usize> {
    let mut counted = std::collections::BTreeMap::new();
    for status in statuses {
        *counted.entry(status).or_default() += 1;
    }
    counted
}

/// A token of the agent's for the `fast` scope.
async fn fast_token(valetd: &Valetd, task: &str) -> String {
    valetd
        .client(AGENT_KEY)
        .await
        .request_token(TokenRequest::new("fast", task))
        .await
        .unwrap()
        .token_str()
        .to_string()
}

fn address(url: &str) -> SocketAddr {
    url.trim_start_matches("http://").parse().unwrap()
}

/// The legitimate client, served within seconds: a token over gRPC, a gateway call with it,
/// and the gateway's health.
async fn legitimate_client_is_served(valetd: &Valetd, task: &str) {
    let gateway = valetd.gateway.clone().expect("a gateway");
    // Within 8 s: before valetd's 10 s request-head deadline would have freed places anyway.
    let served = tokio::time::timeout(Duration::from_secs(8), async {
        let client = valetd.client(AGENT_KEY).await;
        let token = client
            .request_token(TokenRequest::new("fast", task))
            .await
            .expect("a token for the legitimate client")
            .token_str()
            .to_string();
        let answer = call(&gateway, "GET", "/u/fast/ok", &token, "", &[]).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        let health = call(&gateway, "GET", "/healthz", "", "", &[]).await;
        assert_eq!(health.status, 200, "{}", health.body);
    })
    .await;
    assert!(
        served.is_ok(),
        "the legitimate client was not served within 8 s"
    );
}

#[tokio::test]
async fn requests_whose_answers_their_client_never_takes_hold_no_places() {
    let upstream = Upstream::start().await;
    let deployment = Deployment::new(&config(&upstream.url(), "max_connections = 60"));
    let valetd = deployment.start(&[]);
    let grpc = address(&valetd.address);
    // Health checks need no credential: sixty held from twelve addresses.
    let mut held = Vec::new();
    for n in 0..60u32 {
        if let Ok(stream) = attacker::connect_from(attacker::address(24, n % 12), grpc).await {
            held.push(tokio::spawn(attacker::hold_request(
                stream,
                "/grpc.health.v1.Health/Check",
                None,
            )));
        }
    }
    // And one principal's key on as many: at most half the places are its.
    for n in 0..60u32 {
        if let Ok(stream) = attacker::connect_from(attacker::address(25, n % 12), grpc).await {
            held.push(tokio::spawn(attacker::hold_request(
                stream,
                "/valet.v1.Broker/WhoAmI",
                Some(valet_tests::OTHER_AGENT_KEY),
            )));
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    legitimate_client_is_served(&valetd, "beside-held-answers").await;
    for task in held {
        task.abort();
    }
    valetd.stop().await;
}

#[tokio::test]
async fn connections_held_idle_half_sent_or_pinging_leave_legitimate_callers_served() {
    let upstream = Upstream::start().await;
    let deployment = Deployment::new(&config(
        &upstream.url(),
        "max_connections = 60\nidle_timeout = \"20s\"",
    ));
    let valetd = deployment.start(&[]);
    let grpc = address(&valetd.address);
    let gateway = address(valetd.gateway.as_deref().unwrap());

    // Connections that never send a request, from four addresses, and half-sent request heads
    // from many: far more than the listeners' 60 places.
    let mut held = Vec::new();
    for n in 0..120u32 {
        for target in [grpc, gateway] {
            if let Ok(stream) = attacker::connect_from(attacker::address(20, n % 4), target).await {
                held.push(stream);
            }
        }
    }
    for n in 0..120u32 {
        if let Ok(mut stream) = attacker::connect_from(attacker::address(21, n), gateway).await {
            let _ = stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: valet\r\nX-Slow: ")
                .await;
            held.push(stream);
        }
    }
    assert!(
        held.len() >= 300,
        "could not open the attacker's connections"
    );
    legitimate_client_is_served(&valetd, "while-held").await;

    // HTTP/2 connections that only ping are closed at the idle timeout all the same.
    let pinging: Vec<_> = (0..10u32)
        .map(|n| {
            tokio::spawn(async move {
                let stream = attacker::connect_from(attacker::address(22, n), gateway)
                    .await
                    .unwrap();
                attacker::ping_only(stream, Duration::from_millis(200)).await;
            })
        })
        .collect();
    for connection in pinging {
        tokio::time::timeout(Duration::from_secs(60), connection)
            .await
            .expect("a connection that only pings was kept past the idle timeout")
            .unwrap();
    }
    legitimate_client_is_served(&valetd, "after-pings").await;
    drop(held);
    valetd.stop().await;
}

#[tokio::test]
async fn refused_calls_with_huge_queries_cost_the_audit_log_little() {
    let upstream = Upstream::start().await;
    let deployment = Deployment::new(&config(&upstream.url(), ""));
    let valetd = deployment.start(&[]);
    let gateway = valetd.gateway.clone().unwrap();
    let token = fast_token(&valetd, "refused-in-a-loop").await;
    let audit = deployment.audit_path();
    let before = std::fs::metadata(&audit).unwrap().len();
    let query = "x".repeat(30_000);
    for _ in 0..200 {
        let refused = call(
            &gateway,
            "GET",
            &format!("/u/fast/not-allowed?q={query}"),
            &token,
            "",
            &[],
        )
        .await;
        assert_eq!(refused.status, 403, "{}", refused.body);
    }
    // A longer head than valetd reads is refused before anything looks at it.
    let too_long = call(
        &gateway,
        "GET",
        &format!("/u/fast/ok?q={}", "x".repeat(40_000)),
        &token,
        "",
        &[],
    )
    .await;
    assert_eq!(too_long.status, 431, "{}", too_long.body);
    legitimate_client_is_served(&valetd, "after-refusals").await;
    valetd.stop().await;
    let grown = std::fs::metadata(&audit).unwrap().len() - before;
    // Each refusal with a 64 KB query once cost about 190 KB: 200 of them, 39–77 MB.
    assert!(
        grown < 64 * 1024,
        "200 refused calls grew the audit log by {grown} bytes"
    );
    let records = deployment.audit_records();
    let summary = records
        .iter()
        .find(|record| record["aggregated"] == "true" && record["grant_id"].is_string())
        .expect("a summary of the grant's refusals");
    assert_eq!(summary["n_more"], "199", "{summary}");
    let first = records
        .iter()
        .find(|record| record["action"] == "gateway.call" && record["outcome"] == "denied")
        .unwrap();
    let kept = first["query"].as_str().unwrap();
    assert!(
        kept.len() < 1024 && kept.contains("30002 bytes, sha256 "),
        "{kept}"
    );
}

#[tokio::test]
async fn a_grant_refused_in_a_loop_is_refused_unread_at_the_pace_of_its_connections() {
    let upstream = Upstream::start().await;
    let deployment = Deployment::new(&config(&upstream.url(), ""));
    let valetd = deployment.start(&[]);
    let gateway = valetd.gateway.clone().unwrap();
    let token = fast_token(&valetd, "refused-until-unread").await;
    let refused = |gateway: String, token: String| async move {
        call(&gateway, "GET", "/u/fast/not-allowed", &token, "", &[]).await
    };
    // Sixteen at a time until the grant has met its 600 refusals a minute (it refills while
    // the loop runs, so a few more).
    let mut unread = None;
    for _ in 0..200 {
        let answers: Vec<_> =
            futures::future::join_all((0..16).map(|_| refused(gateway.clone(), token.clone())))
                .await;
        if let Some(answer) = answers.into_iter().find(|answer| answer.status != 403) {
            unread = Some(answer);
            break;
        }
    }
    let unread = unread.expect("the grant's refusals were budgeted");
    assert_eq!(unread.status, 429, "{}", unread.body);
    assert!(unread.body.contains("refused unread"), "{}", unread.body);
    // Such an answer waits a second before it is sent, so a loop runs at the pace of its
    // (budgeted) connections. (The budget refills, 10 a second: those are refused at once.)
    let mut paused = None;
    for _ in 0..20 {
        let started = std::time::Instant::now();
        let answer = refused(gateway.clone(), token.clone()).await;
        if answer.status == 429 {
            paused = Some(started.elapsed());
            break;
        }
    }
    let paused = paused.expect("the grant is still refused unread");
    assert!(
        paused >= Duration::from_millis(990),
        "answered after {paused:?}"
    );
    legitimate_client_is_served(&valetd, "beside-the-refused-loop").await;
    valetd.stop().await;
}

#[tokio::test]
async fn a_neighbour_throttled_on_the_same_address_does_not_shut_out_a_valid_credential() {
    let upstream = Upstream::start().await;
    let deployment = Deployment::new(&config(
        &upstream.url(),
        "failed_authentication_limit = \"20/min\"",
    ));
    let valetd = deployment.start(&[]);
    let gateway = address(valetd.gateway.as_deref().unwrap());
    // Eighty loops of bad tokens from 127.0.0.1, past the source's budget: more throttled
    // answers waiting than the source may have, so some of its connections are closed.
    let until = std::time::Instant::now() + Duration::from_secs(8);
    let flood: Vec<_> = (0..80)
        .map(|n| {
            tokio::spawn(async move {
                while std::time::Instant::now() < until {
                    let source = "127.0.0.1".parse().unwrap();
                    let Ok(mut stream) = attacker::connect_from(source, gateway).await else {
                        continue;
                    };
                    let request = format!(
                        "GET /u/fast/ok HTTP/1.1\r\nHost: valet\r\nAuthorization: Bearer bad-{n}\r\nConnection: close\r\n\r\n"
                    );
                    if stream.write_all(request.as_bytes()).await.is_ok() {
                        let mut answer = Vec::new();
                        let _ = stream.read_to_end(&mut answer).await;
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A client with a valid key and token on the same address is served meanwhile.
    legitimate_client_is_served(&valetd, "behind-the-same-address").await;
    for loop_ in flood {
        loop_.await.unwrap();
    }
    valetd.stop().await;
}

#[tokio::test]
async fn bad_tokens_from_rotating_addresses_spend_one_budget_and_few_records() {
    let upstream = Upstream::start().await;
    let deployment = Deployment::new(&config(
        &upstream.url(),
        "failed_authentication_limit = \"20/min\"\nfailed_authentication_limit_total = \"200/min\"",
    ));
    let valetd = deployment.start(&[]);
    let gateway = address(valetd.gateway.as_deref().unwrap());
    let before = deployment.audit_records().len();
    let started = std::time::Instant::now();
    // A hundred at a time: each throttled answer waits a second before it is sent.
    let statuses: Vec<u16> = futures::stream::iter(0..1500u32)
        .map(|n| async move {
            let Ok(mut stream) = attacker::connect_from(attacker::address(23, n), gateway).await
            else {
                return 0;
            };
            let request = format!(
                "GET /u/fast/ok HTTP/1.1\r\nHost: valet\r\nAuthorization: Bearer not-a-token-{n}\r\nConnection: close\r\n\r\n"
            );
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut answer = Vec::new();
            let _ = stream.read_to_end(&mut answer).await;
            String::from_utf8_lossy(&answer)
                .split_whitespace()
                .nth(1)
                .and_then(|code| code.parse().ok())
                .unwrap_or(0)
        })
        .buffer_unordered(100)
        .collect()
        .await;
    let statuses = counted(statuses);
    // The budget of all sources ran out: the rest were refused as throttled. (It refills at
    // 200 a minute while the loop runs: slower on a busy machine, a few more get through.)
    let refilled = (started.elapsed().as_secs_f64() * 200.0 / 60.0).ceil() as usize;
    assert!(
        statuses.get(&401).copied().unwrap_or(0) <= 201 + refilled,
        "{statuses:?} in {:?}",
        started.elapsed()
    );
    assert!(
        statuses.get(&429).copied().unwrap_or(0) >= 1200 - refilled,
        "{statuses:?}"
    );
    let records = deployment.audit_records().len() - before;
    assert!(
        records <= 210,
        "{records} audit records for 1,500 refusals from 1,500 addresses"
    );
    // A valid token from one of those addresses is still served.
    let token = fast_token(&valetd, "neighbour").await;
    let mut stream = attacker::connect_from(attacker::address(23, 7), gateway)
        .await
        .unwrap();
    let request = format!(
        "GET /u/fast/ok HTTP/1.1\r\nHost: valet\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer[..answer.len().min(300)])
    );
    legitimate_client_is_served(&valetd, "after-rotation").await;
    valetd.stop().await;
}

#[tokio::test]
async fn console_posts_without_a_session_are_budgeted_and_summarised() {
    let upstream = Upstream::start().await;
    let deployment = Deployment::new(&config(&upstream.url(), "console_listen = \"127.0.0.1:0\""));
    let valetd = deployment.start(&[]);
    let console = valetd.console.clone().expect("the console listens");
    let before = deployment.audit_records().len();
    // Thirty at a time: each throttled answer waits a second before it is sent.
    let started = std::time::Instant::now();
    let console = format!("http://{console}");
    let statuses: Vec<u16> = futures::stream::iter(0..300)
        .map(|_| {
            let console = console.clone();
            async move {
                call(
                    &console,
                    "POST",
                    "/revoke-all",
                    "",
                    "scope=deploy-staging",
                    &[("content-type", "application/x-www-form-urlencoded")],
                )
                .await
                .status
            }
        })
        .buffer_unordered(30)
        .collect()
        .await;
    let statuses = counted(statuses);
    // The source's failure budget (60/min, refilling while the flood lasts) spent, the rest
    // are throttled.
    let refilled = (started.elapsed().as_secs_f64() * 60.0 / 60.0).ceil() as usize;
    let unauthenticated = statuses.get(&401).copied().unwrap_or(0);
    assert!(
        (60..=60 + refilled).contains(&unauthenticated),
        "{statuses:?}, {refilled} refilled"
    );
    assert_eq!(
        statuses.get(&429).copied(),
        Some(300 - unauthenticated),
        "{statuses:?}"
    );
    // Pages asked for without a session from that source are counted and throttled too (the
    // budget refills a place a second, so one of them may pass as a plain 401).
    let mut pages = Vec::new();
    for _ in 0..3 {
        pages.push(
            call(&console, "GET", "/approvals", "", "", &[])
                .await
                .status,
        );
    }
    assert!(pages.contains(&429), "{pages:?}");
    let records = deployment.audit_records().len() - before;
    assert!(
        records <= 3,
        "{records} audit records for 300 refused console posts"
    );
    legitimate_client_is_served(&valetd, "after-console-flood").await;
    valetd.stop().await;
}

#[tokio::test]
async fn one_token_cannot_hold_the_gateway_open_on_a_slow_upstream() {
    let upstream = Upstream::start().await;
    // A grant may have a quarter of max_connections in flight: 16 here.
    let deployment = Deployment::new(&config(
        &upstream.url(),
        "max_connections = 64\nmax_connections_per_source = 64\nmax_unauthenticated_per_source = 64",
    ));
    let valetd = deployment.start(&[]);
    let gateway = valetd.gateway.clone().unwrap();
    let token = fast_token(&valetd, "slow-flood").await;
    // Twenty-four calls at once to an upstream that answers after 10 s: the grant's 16 places
    // fill, the rest are answered at once.
    let calls: Vec<_> = (0..24)
        .map(|_| {
            let (gateway, token) = (gateway.clone(), token.clone());
            tokio::spawn(
                async move { call(&gateway, "GET", "/u/fast/slow", &token, "", &[]).await },
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (done, waiting): (Vec<_>, Vec<_>) = calls.into_iter().partition(|call| call.is_finished());
    assert_eq!((done.len(), waiting.len()), (8, 16));
    for call in done {
        let call = call.await.unwrap();
        assert_eq!(call.status, 429, "{}", call.body);
        assert!(call.body.contains("in flight already"), "{}", call.body);
    }
    legitimate_client_is_served(&valetd, "beside-the-slow-calls").await;
    for call in waiting {
        assert_eq!(call.await.unwrap().status, 200);
    }
    valetd.stop().await;
}

#[tokio::test]
async fn waits_for_a_pending_grant_are_budgeted_and_end_with_their_client() {
    let config = standard_config(
        r#"
[[scope]]
name = "gated"
credential = "railway"
environment = "production"
audience = "railway"
default_ttl = "5m"
max_ttl = "10m"
[scope.approval]
timeout = "10m"
"#,
    )
    .replace(
        "scopes = [\"deploy-staging\", \"limited\", \"short\"]",
        "scopes = [\"deploy-staging\", \"limited\", \"short\", \"gated\"]",
    );
    let deployment = Deployment::new(&config);
    let valetd = deployment.start(&[]);
    let agent = valetd.client(AGENT_KEY).await;
    let pending = agent
        .request_token(TokenRequest::new("gated", "waits"))
        .await
        .unwrap();
    assert!(pending.is_pending());
    let wait = || {
        let mut broker = agent.broker();
        let grant_id = pending.grant.id.clone();
        async move {
            broker
                .wait_for_grant(valet_client::v1::WaitForGrantRequest {
                    grant_id,
                    timeout_seconds: 3600,
                })
                .await
        }
    };
    // Eight waits on one grant stay open; a ninth is refused at once, saying why.
    let mut open = Vec::new();
    for _ in 0..8 {
        let mut stream = wait()
            .await
            .expect("a wait within the grant's budget")
            .into_inner();
        // Each answers with the grant as it stands, then waits.
        stream.message().await.unwrap().unwrap();
        open.push(stream);
    }
    let refused = wait().await.expect_err("past the grant's waits");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert!(
        refused
            .message()
            .contains("waits for this grant are open already (at most 8)"),
        "{}",
        refused.message()
    );
    // A client that goes away frees its waits (not at the wait's end, an hour off).
    drop(open);
    assert!(
        valet_tests::eventually(Duration::from_secs(10), || async { wait().await.is_ok() }).await,
        "the waits of a client that went away were freed"
    );
    agent
        .request_token(TokenRequest::new("limited", "after-waits"))
        .await
        .expect("the principal is served");
}
