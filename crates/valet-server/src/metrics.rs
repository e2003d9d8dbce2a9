//! The Prometheus endpoint: `GET /metrics` on `[server] metrics_listen`, plaintext and without
//! authentication (it holds no secret, token, grant or task id: see valet-service's metrics for
//! what is counted and how every label is bounded). Off unless configured.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use valet_service::Valet;

/// Seconds: from a fast RPC to a slow upstream.
const SECONDS_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// How many records or writers one commit group carried.
const GROUP_BUCKETS: [f64; 11] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// Installs the process's Prometheus recorder (once; every `metrics::` call records into it from
/// then on).
pub fn install() -> Result<PrometheusHandle, String> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)
        .and_then(|builder| {
            builder.set_buckets_for_metric(Matcher::Suffix("_records".into()), &GROUP_BUCKETS)
        })
        .and_then(|builder| {
            builder.set_buckets_for_metric(Matcher::Suffix("_writers".into()), &GROUP_BUCKETS)
        })
        .map_err(|error| error.to_string())?
        .install_recorder()
        .map_err(|error| error.to_string())
}

/// Serves `GET /metrics` on `listener` until the process ends, within the listeners' connection
/// cap and idle timeout.
pub async fn serve(
    listener: TcpListener,
    limits: valet_gateway::listener::Limits,
    handle: PrometheusHandle,
    valet: Arc<Valet>,
) {
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(Duration::from_secs(5));
        loop {
            ticks.tick().await;
            upkeep.run_upkeep();
        }
    });
    let mut acceptor = valet_gateway::listener::Acceptor::start(listener, limits, "metrics", None);
    while let Some((stream, _)) = acceptor.accept().await {
        let handle = handle.clone();
        let valet = valet.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let handle = handle.clone();
                    let valet = valet.clone();
                    async move { Ok::<_, Infallible>(answer(request, &handle, &valet).await) }
                });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(error) = tokio::time::timeout(Duration::from_secs(60), connection).await {
                tracing::debug!(%error, "metrics connection timed out");
            }
        });
    }
}

async fn answer(
    request: Request<hyper::body::Incoming>,
    handle: &PrometheusHandle,
    valet: &Valet,
) -> Response<Full<Bytes>> {
    let plain = |status: StatusCode, text: String| {
        Response::builder()
            .status(status)
            .header("content-type", "text/plain; charset=utf-8")
            .body(Full::new(Bytes::from(text)))
            .unwrap_or_default()
    };
    if request.uri().path() != "/metrics" {
        return plain(
            StatusCode::NOT_FOUND,
            "valetd serves only GET /metrics here\n".into(),
        );
    }
    if request.method() != hyper::Method::GET {
        return plain(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{} /metrics: only GET is served\n", request.method()),
        );
    }
    valet.refresh_metrics().await;
    Response::builder()
        .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
        .body(Full::new(Bytes::from(handle.render())))
        .unwrap_or_default()
}
