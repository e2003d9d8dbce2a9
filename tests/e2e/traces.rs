//! Traces: with `[server] otlp_endpoint`, valetd exports a span per RPC and per gateway call over
//! OTLP/HTTP (JSON) to a collector — here a local receiver that keeps what it is sent — each
//! carrying the request id of its audit record, and no secret.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use valet_client::TokenRequest;
use valet_tests::upstream::{Upstream, call};
use valet_tests::{AGENT_KEY, Deployment, GITHUB_ROOT_SECRET, RAILWAY_ROOT_SECRET};

/// An OTLP/HTTP receiver on loopback: keeps every body POSTed to /v1/traces.
struct Collector {
    address: String,
    bodies: Arc<Mutex<Vec<String>>>,
}

impl Collector {
    async fn start() -> Collector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let bodies: Arc<Mutex<Vec<String>>> = Arc::default();
        let kept = bodies.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let kept = kept.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |request: http::Request<hyper::body::Incoming>| {
                            let kept = kept.clone();
                            async move {
                                let path = request.uri().path().to_string();
                                let body = request
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|body| body.to_bytes())
                                    .unwrap_or_default();
                                if path == "/v1/traces" {
                                    kept.lock()
                                        .unwrap()
                                        .push(String::from_utf8_lossy(&body).into_owned());
                                }
                                Ok::<_, Infallible>(
                                    http::Response::builder()
                                        .header("content-type", "application/json")
                                        .body(Full::new(Bytes::from_static(b"{}")))
                                        .unwrap(),
                                )
                            }
                        },
                    );
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Collector { address, bodies }
    }

    /// Every span received so far: (name, attributes as key → string value).
    fn spans(&self) -> Vec<(String, Vec<(String, String)>)> {
        let mut spans = Vec::new();
        for body in self.bodies.lock().unwrap().iter() {
            let request: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
            for resource in request["resourceSpans"].as_array().into_iter().flatten() {
                for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
                    for span in scope["spans"].as_array().into_iter().flatten() {
                        let attributes = span["attributes"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|attribute| {
                                let value = &attribute["value"];
                                let text = value["stringValue"]
                                    .as_str()
                                    .map(str::to_string)
                                    .unwrap_or_else(|| value.to_string());
                                (
                                    attribute["key"].as_str().unwrap_or_default().to_string(),
                                    text,
                                )
                            })
                            .collect();
                        spans.push((
                            span["name"].as_str().unwrap_or_default().to_string(),
                            attributes,
                        ));
                    }
                }
            }
        }
        spans
    }
}

fn has(attributes: &[(String, String)], key: &str, value: &str) -> bool {
    attributes.iter().any(|(k, v)| k == key && v == value)
}

#[tokio::test]
async fn rpcs_and_gateway_calls_are_exported_as_spans_carrying_their_request_id() {
    let collector = Collector::start().await;
    let upstream = Upstream::start().await;
    let config = crate::gateway::gateway_config(&upstream).replace(
        "gateway_listen = \"127.0.0.1:0\"\n",
        &format!(
            "gateway_listen = \"127.0.0.1:0\"\notlp_endpoint = \"http://{}\"\n",
            collector.address
        ),
    );
    let deployment = Deployment::new(&config);
    let valetd = deployment.start_with_env(&[("OTEL_BSP_SCHEDULE_DELAY", "100")]);
    let gateway = valetd.gateway.clone().expect("the gateway listens");
    let agent = valetd.client(AGENT_KEY).await;
    let issued = agent
        .request_token(
            TokenRequest::new("rest-projects", "task-traced").with_param("project", "shop"),
        )
        .await
        .unwrap();
    let answer = call(
        &gateway,
        "GET",
        "/u/rest/v1/projects/shop/info",
        issued.token_str(),
        "",
        &[],
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);

    let records = deployment.audit_records();
    let request_id_of = |action: &str| {
        records
            .iter()
            .find(|record| record["action"] == action && record["outcome"] == "allowed")
            .and_then(|record| record["request_id"].as_str())
            .unwrap_or_else(|| panic!("no {action} record with a request id"))
            .to_string()
    };
    let issue_request = request_id_of("token.issue");
    let call_request = request_id_of("gateway.call");

    let started = Instant::now();
    let found = loop {
        let spans = collector.spans();
        let rpc = spans.iter().any(|(name, attributes)| {
            name == "rpc"
                && has(attributes, "request_id", &issue_request)
                && has(attributes, "method", "/valet.v1.Broker/RequestToken")
        });
        let gateway_span = spans.iter().any(|(name, attributes)| {
            name == "gateway"
                && has(attributes, "request_id", &call_request)
                && has(attributes, "upstream", "rest")
        });
        if (rpc && gateway_span) || started.elapsed() > Duration::from_secs(15) {
            break (rpc, gateway_span, spans);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(found.0 && found.1, "spans received: {:#?}", found.2);

    let everything = collector.bodies.lock().unwrap().join("\n");
    for (what, needle) in [
        ("the railway root credential", RAILWAY_ROOT_SECRET),
        ("the github root credential", GITHUB_ROOT_SECRET),
        ("the agent's key", AGENT_KEY),
        ("the token", issued.token_str()),
    ] {
        assert!(!everything.contains(needle), "a span holds {what}");
    }
    assert!(
        everything.contains("\"valetd\""),
        "the service is named: {everything}"
    );
}
