//! The connection's transport: `http://` is plaintext, `https://` is TLS (verified against the
//! configured CA or the system's roots, with a client certificate when one is given) and never
//! falls back to plaintext; and TLS failures explained in words that say what to fix.

use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::{CA_FILE_ENV, CLIENT_CERT_ENV, ClientConfig, ClientError};

/// The endpoint for `config.server`, with TLS set up for `https://`.
pub(crate) fn endpoint(config: &ClientConfig) -> Result<Endpoint, ClientError> {
    let bad_url = |detail: String| ClientError::BadServerUrl {
        server: config.server.clone(),
        detail,
    };
    // URL schemes are case-insensitive: `HTTPS://` is TLS, as `https://` is (never plaintext).
    let (scheme, server) = match config.server.split_once("://") {
        Some((scheme, rest)) => {
            let scheme = scheme.to_ascii_lowercase();
            let server = format!("{scheme}://{rest}");
            (Some(scheme), server)
        }
        None => (None, config.server.clone()),
    };
    let endpoint = Endpoint::from_shared(server).map_err(|error| bad_url(error.to_string()));
    match scheme.as_deref() {
        Some("http") => {
            if config.tls.is_set() {
                return Err(bad_url(format!(
                    "a CA file or client certificate ({CA_FILE_ENV}, {CLIENT_CERT_ENV}) is set, but http:// is plaintext; use https://"
                )));
            }
            endpoint
        }
        Some("https") => {
            let mut tls = ClientTlsConfig::new();
            tls = match &config.tls.ca_file {
                Some(path) => {
                    let pem = read_pem_certificates("CA file", path)?;
                    tls.ca_certificate(Certificate::from_pem(pem))
                }
                None => tls.with_native_roots(),
            };
            if let Some((cert_path, key_path)) = &config.tls.client_certificate {
                let cert = read_pem_certificates("client certificate", cert_path)?;
                let key = read_pem_key(key_path)?;
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            endpoint?
                .tls_config(tls)
                .map_err(|error| bad_url(crate::source_chain(&error)))
        }
        Some(other) => Err(bad_url(format!(
            "the scheme {other}:// is not supported; use https:// (TLS) or http:// (plaintext)"
        ))),
        None => Err(bad_url(
            "there is no scheme; write https://HOST:PORT (or http://HOST:PORT for a plaintext loopback listener)".to_string(),
        )),
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|error| ClientError::TlsFile {
        what,
        path: path.display().to_string(),
        detail: error.to_string(),
    })
}

fn read_pem_certificates(what: &'static str, path: &Path) -> Result<Vec<u8>, ClientError> {
    let pem = read(what, path)?;
    let n_certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| ClientError::TlsFile {
            what,
            path: path.display().to_string(),
            detail: format!("bad PEM: {error}"),
        })?
        .len();
    if n_certificates == 0 {
        return Err(ClientError::TlsFile {
            what,
            path: path.display().to_string(),
            detail: "no PEM CERTIFICATE block in it".to_string(),
        });
    }
    Ok(pem)
}

fn read_pem_key(path: &Path) -> Result<Vec<u8>, ClientError> {
    let pem = read("client key", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|error| ClientError::TlsFile {
        what: "client key",
        path: path.display().to_string(),
        detail: format!("no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {error}"),
    })?;
    Ok(pem)
}

/// Adds to a transport error's text what it means and what to do, for the TLS failures people
/// meet: an unknown CA, an expired certificate, a name mismatch, a refused or missing client
/// certificate, and a listener that does not speak TLS.
pub(crate) fn explain(detail: &str) -> String {
    let hint = if detail.contains("UnknownIssuer") {
        format!(
            "valetd's certificate is not signed by a CA this client trusts; set {CA_FILE_ENV} (or --ca-file) to the CA bundle that issued it"
        )
    } else if detail.contains("certificate expired") || detail.contains("Expired,") {
        "valetd's certificate has expired (or this machine's clock is wrong); renew the certificate in server.tls_cert_file".to_string()
    } else if detail.contains("certificate not valid yet") {
        "valetd's certificate is not valid yet (or this machine's clock is wrong)".to_string()
    } else if detail.contains("certificate not valid for name") {
        "valetd's certificate does not name the host in the server URL; connect by a name (or IP) the certificate lists".to_string()
    } else if detail.contains("CertificateRequired") {
        format!(
            "valetd requires a client certificate; set {CLIENT_CERT_ENV} and VALET_CLIENT_KEY (or --client-cert and --client-key)"
        )
    } else if detail.contains("BadCertificate")
        || detail.contains("UnknownCA")
        || detail.contains("CertificateExpired")
        || detail.contains("DecryptError")
    {
        "valetd refused the client certificate: it must be unexpired and issued by the CA in valetd's server.client_ca_file".to_string()
    } else if detail.contains("InvalidContentType")
        || detail.contains("corrupt message")
        || detail.contains("received corrupt")
    {
        "the server did not answer in TLS; if it serves plaintext on loopback, use http://"
            .to_string()
    } else if detail.contains("frame with invalid size") || detail.contains("http2 error") {
        "the server may be serving TLS; use https://".to_string()
    } else {
        return detail.to_string();
    };
    format!("{detail} ({hint})")
}
