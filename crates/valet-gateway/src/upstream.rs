//! HTTP clients for upstreams: one connection pool per upstream, TLS with the public web roots or
//! the upstream's own CA file, connect timeout from its config. Rebuilt when its config changes.
//! Building one reads files, so it happens off the async workers and outside the cache's lock:
//! a call never waits for another upstream's CA file.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use valet_core::config::Upstream;

pub type UpstreamClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

#[derive(Default)]
pub struct Clients {
    cache: Mutex<HashMap<String, (Upstream, UpstreamClient)>>,
}

impl Clients {
    /// The client for `upstream`, built on first use and again after its config changed.
    pub async fn client_for(&self, upstream: &Upstream) -> Result<UpstreamClient, String> {
        if let Some((cached, client)) = self.lock().get(&upstream.name)
            && cached == upstream
        {
            return Ok(client.clone());
        }
        let config = upstream.clone();
        let client = tokio::task::spawn_blocking(move || build(&config))
            .await
            .map_err(|error| format!("building the client failed: {error}"))??;
        self.lock()
            .insert(upstream.name.clone(), (upstream.clone(), client.clone()));
        Ok(client)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Upstream, UpstreamClient)>> {
        self.cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn build(upstream: &Upstream) -> Result<UpstreamClient, String> {
    let mut roots = rustls::RootCertStore::empty();
    match &upstream.ca_file {
        Some(path) => {
            let certificates = CertificateDer::pem_file_iter(path)
                .map_err(|error| format!("cannot read ca_file {}: {error}", path.display()))?;
            for certificate in certificates {
                let certificate = certificate.map_err(|error| {
                    format!("ca_file {} has a bad certificate: {error}", path.display())
                })?;
                roots
                    .add(certificate)
                    .map_err(|error| format!("ca_file {}: {error}", path.display()))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|error| error.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(upstream.connect_timeout));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(std::time::Duration::from_secs(90))
        .build(connector))
}
