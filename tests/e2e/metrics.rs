//! Prometheus metrics: scraped from a real valetd during a scenario (issue, refuse, revoke,
//! gateway calls, an approval waiting), the counters move as the scenario says, the gauges read
//! the state, and no label or value holds a secret, a key, a token, a grant or a task id.

use valet_client::TokenRequest;
use valet_tests::upstream::{Upstream, call, raw_request};
use valet_tests::{
    AGENT_KEY, Deployment, GITHUB_ROOT_SECRET, OPERATOR_KEY, RAILWAY_ROOT_SECRET, SEAL_KEY,
};

/// The gateway tests' deployment, with metrics served and a scope that needs approval.
fn config(upstream: &Upstream) -> String {
    let with_approval = format!(
        "{}\n[[scope]]\nname = \"prod-approval\"\ncredential = \"railway\"\nenvironment = \"production\"\naudience = \"railway\"\ndefault_ttl = \"5m\"\nmax_ttl = \"10m\"\n[scope.approval]\ntimeout = \"5m\"\n",
        crate::gateway::gateway_config(upstream)
    );
    with_approval
        .replace(
            "gateway_listen = \"127.0.0.1:0\"\n",
            "gateway_listen = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\n",
        )
        .replacen(
            "\"nowhere-read\"]",
            "\"nowhere-read\", \"prod-approval\"]",
            1,
        )
}

/// The value of the sample `name` whose labels include every one of `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .find(|line| {
            labels
                .iter()
                .all(|(key, value)| line.contains(&format!("{key}=\"{value}\"")))
        })
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

async fn scrape(address: &str) -> String {
    let (status, body) = raw_request(address, "GET", "/metrics", &[], b"").await;
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test]
async fn counters_move_with_the_scenario_and_no_label_holds_a_secret() {
    let upstream = Upstream::start().await;
    let deployment = Deployment::new(&config(&upstream));
    let valetd = deployment.start(&[]);
    let metrics = valetd.metrics.clone().expect("the metrics listener is up");
    let gateway = valetd.gateway.clone().expect("the gateway listens");
    let agent = valetd.client(AGENT_KEY).await;

    let staging =
        |task: &str| TokenRequest::new("deploy-staging", task).with_param("project", "shop");
    let kept = agent
        .request_token(staging("task-metrics-kept"))
        .await
        .unwrap();
    let revoked = agent
        .request_token(staging("task-metrics-revoked"))
        .await
        .unwrap();
    agent.revoke(&revoked.grant.id, "done").await.unwrap();
    let refused = agent
        .request_token(TokenRequest::new(
            "scope-nobody-declared",
            "task-metrics-refused",
        ))
        .await;
    assert!(refused.is_err());
    let rest = agent
        .request_token(
            TokenRequest::new("rest-projects", "task-metrics-rest").with_param("project", "shop"),
        )
        .await
        .unwrap();
    let allowed = call(
        &gateway,
        "GET",
        "/u/rest/v1/projects/shop/info",
        rest.token_str(),
        "",
        &[],
    )
    .await;
    assert_eq!(allowed.status, 200, "{}", allowed.body);
    let denied = call(
        &gateway,
        "DELETE",
        "/u/rest/v1/projects/shop/info",
        rest.token_str(),
        "",
        &[],
    )
    .await;
    assert_eq!(denied.status, 403, "{}", denied.body);
    let pending = agent
        .request_token(TokenRequest::new("prod-approval", "task-metrics-pending"))
        .await
        .unwrap();
    assert!(pending.is_pending());

    // The gateway's closing record is written after the answer: wait for it to be counted.
    let mut text = scrape(&metrics).await;
    let waited = std::time::Instant::now();
    while sample(
        &text,
        "valet_gateway_call_seconds_count",
        &[("upstream", "rest")],
    )
    .is_none()
        && waited.elapsed() < std::time::Duration::from_secs(10)
    {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        text = scrape(&metrics).await;
    }
    let value = |name: &str, labels: &[(&str, &str)]| {
        sample(&text, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?} in:\n{text}"))
    };
    assert_eq!(
        value(
            "valet_tokens_issued_total",
            &[("scope", "deploy-staging"), ("environment", "staging")]
        ),
        2.0
    );
    assert_eq!(
        value(
            "valet_tokens_denied_total",
            &[("scope", "other"), ("reason", "invalid_request")]
        ),
        1.0,
        "a scope nobody declared is labelled other, never by what the caller sent"
    );
    assert_eq!(
        value("valet_revocations_total", &[("via", "token.revoke")]),
        1.0
    );
    assert_eq!(
        value("valet_grants_active", &[("environment", "staging")]),
        2.0,
        "kept and rest are live; the revoked one is not"
    );
    assert_eq!(value("valet_approvals_pending", &[]), 1.0);
    assert_eq!(
        value(
            "valet_gateway_calls_total",
            &[
                ("upstream", "rest"),
                ("rule", "allow[0]"),
                ("outcome", "allowed")
            ]
        ),
        1.0
    );
    assert_eq!(
        value(
            "valet_gateway_calls_total",
            &[
                ("upstream", "rest"),
                ("outcome", "denied"),
                ("reason", "denied")
            ]
        ),
        1.0
    );
    assert!(value("valet_gateway_call_seconds_count", &[("upstream", "rest")]) >= 1.0);
    assert!(
        value(
            "valet_rpc_seconds_count",
            &[("method", "/valet.v1.Broker/RequestToken"), ("code", "0")]
        ) >= 4.0
    );
    assert!(value("valet_audit_commit_records_count", &[]) >= 1.0);
    assert!(value("valet_audit_commit_seconds_bucket", &[("le", "+Inf")]) >= 1.0);
    assert_eq!(value("valet_store_up", &[]), 1.0);
    assert!(value("valet_audit_head_sequence", &[]) >= 8.0);

    // A revocation moves the live gauge down at the next scrape (a path a client made up is
    // labelled other: valet-server's unit test of the method labels).
    agent.revoke(&kept.grant.id, "done").await.unwrap();
    let text = scrape(&metrics).await;
    assert_eq!(
        sample(&text, "valet_grants_active", &[("environment", "staging")]),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "valet_revocations_total", &[("via", "token.revoke")]),
        Some(2.0)
    );

    // Nothing secret, nothing unbounded: no root credential, key, token, grant id or task id.
    let operator_key = OPERATOR_KEY;
    for (what, needle) in [
        ("the railway root credential", RAILWAY_ROOT_SECRET),
        ("the github root credential", GITHUB_ROOT_SECRET),
        ("the seal key", SEAL_KEY),
        ("the agent's key", AGENT_KEY),
        ("the operator's key", operator_key),
        ("a token", kept.token_str()),
        ("a token", rest.token_str()),
        ("a grant id", kept.grant.id.as_str()),
        ("a grant id", pending.grant.id.as_str()),
        ("a task id", "task-metrics"),
        ("a scope nobody declared", "scope-nobody-declared"),
    ] {
        assert!(!text.contains(needle), "the metrics hold {what}:\n{text}");
    }

    // Only GET /metrics is served.
    let (status, _) = raw_request(&metrics, "POST", "/metrics", &[], b"").await;
    assert_eq!(status, 405);
    let (status, _) = raw_request(&metrics, "GET", "/debug", &[], b"").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn without_metrics_listen_there_is_no_metrics_listener() {
    let deployment = Deployment::standard();
    let valetd = deployment.start(&[]);
    assert!(valetd.metrics.is_none());
    assert!(!valetd.output().contains("metrics listening"));
}
