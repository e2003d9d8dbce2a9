//! The outbound HTTP client valetd gives the service (webhooks, AWS, JWKS): http or https with the
//! public web roots (or a pinned CA), HTTP/1.1, no Nagle delay, a bounded connect time, one connection pool.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use valet_service::{Outbound, OutboundAnswer};

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// hyper's client behind the service's [`Outbound`].
pub struct HyperOutbound {
    client: HttpsClient,
}

impl HyperOutbound {
    pub fn new() -> Result<HyperOutbound, String> {
        HyperOutbound::with_roots(rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        })
    }

    fn with_roots(roots: rustls::RootCertStore) -> Result<HyperOutbound, String> {
        let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|error| error.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Ok(HyperOutbound {
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(60))
                .build(connector),
        })
    }
}

#[async_trait]
impl Outbound for HyperOutbound {
    async fn send(
        &self,
        request: http::Request<Bytes>,
        timeout: Duration,
        max_answer_bytes: usize,
    ) -> Result<OutboundAnswer, String> {
        let (parts, body) = request.into_parts();
        let request = http::Request::from_parts(parts, Full::new(body));
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|error| describe(&error))?;
            let status = response.status().as_u16();
            let body = Limited::new(response.into_body(), max_answer_bytes)
                .collect()
                .await
                .map_err(|error| format!("the answer could not be read: {error}"))?
                .to_bytes();
            Ok(OutboundAnswer { status, body })
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| format!("no answer within {} s", timeout.as_secs()))?
    }

    async fn send_trusting(
        &self,
        ca_pem: &[u8],
        request: http::Request<Bytes>,
        timeout: Duration,
        max_answer_bytes: usize,
    ) -> Result<OutboundAnswer, String> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        if request.uri().scheme_str() != Some("https") {
            return Err("only https:// is fetched with a pinned CA".to_string());
        }
        let mut roots = rustls::RootCertStore::empty();
        for certificate in CertificateDer::pem_slice_iter(ca_pem) {
            let certificate =
                certificate.map_err(|error| format!("the CA file is not PEM: {error}"))?;
            roots
                .add(certificate)
                .map_err(|error| format!("the CA file holds an unusable certificate: {error}"))?;
        }
        if roots.is_empty() {
            return Err("the CA file holds no certificate".to_string());
        }
        // Rare (JWKS refreshes are bounded): a client of its own, dropped after the answer.
        HyperOutbound::with_roots(roots)?
            .send(request, timeout, max_answer_bytes)
            .await
    }
}

fn describe(error: &hyper_util::client::legacy::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
