//! One JSON POST to a webhook (http or https, public web roots), bounded in time.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

const TIMEOUT: Duration = Duration::from_secs(10);

/// Posts `body` to `url`; `Ok(status)` for a 2xx answer, otherwise what went wrong.
pub async fn post_json(url: &str, body: &str) -> Result<u16, String> {
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|error| error.to_string())?
    .with_root_certificates(rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    })
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let request = http::Request::post(url)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::USER_AGENT, "valetd")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|error| error.to_string())?;
    match tokio::time::timeout(TIMEOUT, client.request(request)).await {
        Ok(Ok(response)) if response.status().is_success() => Ok(response.status().as_u16()),
        Ok(Ok(response)) => Err(format!("the webhook answered {}", response.status())),
        Ok(Err(error)) => Err(format!("the webhook could not be reached: {error}")),
        Err(_) => Err(format!(
            "the webhook did not answer within {} s",
            TIMEOUT.as_secs()
        )),
    }
}
