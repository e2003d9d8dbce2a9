//! TLS for valetd's listeners: the server certificate and key, the client CA and whether a
//! client certificate is required, read from PEM files and swapped in whole on reload (the old
//! material stays in force when the new files are unusable), and the names a verified client
//! certificate carries.

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use valet_core::config::{ClientAuth, ServerTls};
use valet_core::identity::PresentedCertificate;

/// Why TLS material could not be loaded. Names the file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {detail}")]
    Unreadable {
        what: &'static str,
        path: String,
        detail: String,
    },
    #[error("{what} {path} holds no PEM {expected}")]
    Empty {
        what: &'static str,
        path: String,
        expected: &'static str,
    },
    #[error("{what} {path} is not usable: {detail}")]
    Invalid {
        what: &'static str,
        path: String,
        detail: String,
    },
}

/// What one successful load put in force, for the log and the audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// SHA-256 of the server's leaf certificate, hex.
    pub certificate_fingerprint: String,
    /// The leaf certificate's last valid moment, as written in it.
    pub not_after: String,
    /// How many CA certificates client certificates are verified against (0: none asked for).
    pub n_client_cas: usize,
    /// SHA-256 of each of them, hex: the service refuses, at every request, a certificate that
    /// was not issued by one of these.
    pub client_authorities: Vec<String>,
}

/// A client CA in force, as a presented chain is traced back to it: by verifying the chain,
/// signatures included, with this CA as its only root (never by names, nor by what else the
/// client put in its chain).
#[derive(Debug, Clone)]
pub struct ClientAuthority {
    fingerprint: String,
    not_after: i64,
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
}

/// The server configs of both listeners, built from one set of files.
struct Material {
    grpc: Arc<rustls::ServerConfig>,
    gateway: Arc<rustls::ServerConfig>,
    client_authorities: Arc<[ClientAuthority]>,
    /// SHA-256 over every file's bytes: a reload with unchanged files changes nothing.
    digest: [u8; 32],
}

/// The TLS material in force, shared by both listeners.
pub struct TlsMaterial {
    files: ServerTls,
    current: ArcSwap<Material>,
    /// The digest of the last files refused: they are reported once, not at every check.
    refused: std::sync::Mutex<Option<[u8; 32]>>,
}

/// Which listener a handshake is for: they differ in the protocols they offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Grpc,
    Gateway,
}

impl TlsMaterial {
    /// Loads the files; fails with what is wrong with them.
    pub fn load(files: &ServerTls) -> Result<(Arc<TlsMaterial>, Loaded), TlsError> {
        let (material, loaded) = build(files, &read_files(files)?)?;
        Ok((
            Arc::new(TlsMaterial {
                files: files.clone(),
                current: ArcSwap::from_pointee(material),
                refused: std::sync::Mutex::new(None),
            }),
            loaded,
        ))
    }

    /// Re-reads the files. `Ok(None)` when they are unchanged (or are the ones last refused);
    /// on error the running material stays in force.
    pub fn reload(&self) -> Result<Option<Loaded>, TlsError> {
        let mut refused = self
            .refused
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Read once: the digest and the material come from the same bytes.
        let contents = match read_files(&self.files) {
            Ok(contents) => contents,
            // An unreadable file is reported once until it can be read again.
            Err(error) if refused.is_none() => {
                *refused = Some([0; 32]);
                return Err(error);
            }
            Err(_) => return Ok(None),
        };
        let digest = contents.digest;
        if digest == self.current.load().digest {
            *refused = None;
            return Ok(None);
        }
        if Some(digest) == *refused {
            return Ok(None);
        }
        match build(&self.files, &contents) {
            Ok((material, loaded)) => {
                self.current.store(Arc::new(material));
                *refused = None;
                Ok(Some(loaded))
            }
            Err(error) => {
                *refused = Some(digest);
                Err(error)
            }
        }
    }

    /// The rustls config a new connection on `listener` is served with, and the client CAs it
    /// verifies client certificates against.
    pub fn for_handshake(
        &self,
        listener: Listener,
    ) -> (Arc<rustls::ServerConfig>, Arc<[ClientAuthority]>) {
        let material = self.current.load();
        let config = match listener {
            Listener::Grpc => material.grpc.clone(),
            Listener::Gateway => material.gateway.clone(),
        };
        (config, material.client_authorities.clone())
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Unreadable {
        what,
        path: path.display().to_string(),
        detail: error.to_string(),
    })
}

/// The bytes of every file, read once, and their digest (each file's length and bytes in turn).
struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
    digest: [u8; 32],
}

fn read_files(files: &ServerTls) -> Result<Contents, TlsError> {
    let cert = read("server.tls_cert_file", &files.cert_file)?;
    let key = read("server.tls_key_file", &files.key_file)?;
    let client_ca = match &files.client_ca_file {
        Some(path) => Some(read("server.client_ca_file", path)?),
        None => None,
    };
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    for bytes in [Some(&cert), Some(&key), client_ca.as_ref()]
        .into_iter()
        .flatten()
    {
        context.update(&(bytes.len() as u64).to_be_bytes());
        context.update(bytes);
    }
    let mut digest = [0; 32];
    digest.copy_from_slice(context.finish().as_ref());
    Ok(Contents {
        cert,
        key,
        client_ca,
        digest,
    })
}

fn certificates(
    what: &'static str,
    path: &Path,
    bytes: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certificates = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsError::Invalid {
            what,
            path: path.display().to_string(),
            detail: format!("bad PEM: {error}"),
        })?;
    if certificates.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.display().to_string(),
            expected: "CERTIFICATE block",
        });
    }
    Ok(certificates)
}

fn build(files: &ServerTls, contents: &Contents) -> Result<(Material, Loaded), TlsError> {
    let digest = contents.digest;
    let chain = certificates("server.tls_cert_file", &files.cert_file, &contents.cert)?;
    let key_path = files.key_file.display().to_string();
    let key = PrivateKeyDer::from_pem_slice(&contents.key).map_err(|error| match error {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::Empty {
            what: "server.tls_key_file",
            path: key_path.clone(),
            expected: "PRIVATE KEY block (PKCS#8, PKCS#1 or SEC1)",
        },
        other => TlsError::Invalid {
            what: "server.tls_key_file",
            path: key_path.clone(),
            detail: format!("bad PEM: {other}"),
        },
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let leaf = chain[0].clone();
    let mut client_authorities = Vec::new();
    let (verifier, n_client_cas) = match (&files.client_ca_file, &contents.client_ca) {
        (Some(path), Some(bytes)) => {
            let cas = certificates("server.client_ca_file", path, bytes)?;
            for ca in &cas {
                let (_, parsed) =
                    x509_parser::parse_x509_certificate(ca).map_err(|error| TlsError::Invalid {
                        what: "server.client_ca_file",
                        path: path.display().to_string(),
                        detail: format!("a certificate does not parse: {error}"),
                    })?;
                let mut only_root = rustls::RootCertStore::empty();
                only_root
                    .add(ca.clone())
                    .map_err(|error| TlsError::Invalid {
                        what: "server.client_ca_file",
                        path: path.display().to_string(),
                        detail: error.to_string(),
                    })?;
                let verifier = WebPkiClientVerifier::builder_with_provider(
                    Arc::new(only_root),
                    provider.clone(),
                )
                .build()
                .map_err(|error| TlsError::Invalid {
                    what: "server.client_ca_file",
                    path: path.display().to_string(),
                    detail: error.to_string(),
                })?;
                client_authorities.push(ClientAuthority {
                    fingerprint: fingerprint(ca),
                    not_after: parsed.validity().not_after.timestamp(),
                    verifier,
                });
            }
            let mut roots = rustls::RootCertStore::empty();
            for ca in &cas {
                roots.add(ca.clone()).map_err(|error| TlsError::Invalid {
                    what: "server.client_ca_file",
                    path: path.display().to_string(),
                    detail: error.to_string(),
                })?;
            }
            let builder =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
            let builder = match files.client_auth {
                ClientAuth::Optional => builder.allow_unauthenticated(),
                ClientAuth::Required => builder,
            };
            let verifier = builder.build().map_err(|error| TlsError::Invalid {
                what: "server.client_ca_file",
                path: path.display().to_string(),
                detail: error.to_string(),
            })?;
            (Some(verifier), cas.len())
        }
        _ => (None, 0),
    };
    let server_config = |protocols: &[&[u8]]| -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|error| TlsError::Invalid {
                what: "server.tls_cert_file",
                path: files.cert_file.display().to_string(),
                detail: error.to_string(),
            })?;
        let builder = match &verifier {
            Some(verifier) => builder.with_client_cert_verifier(verifier.clone()),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|error| TlsError::Invalid {
                what: "server.tls_key_file",
                path: key_path.clone(),
                detail: format!("does not fit the certificate in server.tls_cert_file: {error}"),
            })?;
        config.alpn_protocols = protocols.iter().map(|protocol| protocol.to_vec()).collect();
        if verifier.is_some() {
            // No session resumption where client certificates authenticate: a resumed session
            // carries the certificate of its first handshake, without a look at it. (Every
            // request re-checks the certificate anyway; see `certificate_still_valid`.)
            config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
            config.send_tls13_tickets = 0;
        }
        Ok(Arc::new(config))
    };
    let material = Material {
        grpc: server_config(&[b"h2"])?,
        gateway: server_config(&[b"h2", b"http/1.1"])?,
        client_authorities: client_authorities.clone().into(),
        digest,
    };
    let not_after = x509_parser::parse_x509_certificate(&leaf)
        .map(|(_, certificate)| certificate.validity().not_after.to_string())
        .map_err(|error| TlsError::Invalid {
            what: "server.tls_cert_file",
            path: files.cert_file.display().to_string(),
            detail: format!("the first certificate does not parse: {error}"),
        })?;
    Ok((
        material,
        Loaded {
            certificate_fingerprint: fingerprint(&leaf),
            not_after,
            n_client_cas,
            client_authorities: client_authorities
                .into_iter()
                .map(|authority| authority.fingerprint)
                .collect(),
        },
    ))
}

/// SHA-256 of a certificate's DER, hex.
fn fingerprint(certificate: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, certificate))
}

/// What the service needs of a client certificate chain rustls has verified against the client
/// CAs `authorities`: the leaf's names, the validity window of the whole chain and of the CAs it
/// was verified up to, and which CAs those are. `None` when the leaf does not parse (rustls
/// parsed it already, so this does not happen in practice; the caller is then treated as having
/// presented no certificate).
pub fn presented_certificate(
    chain: &[CertificateDer<'_>],
    authorities: &[ClientAuthority],
) -> Option<PresentedCertificate> {
    use x509_parser::extensions::GeneralName;
    let leaf = chain.first()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf).ok()?;
    let mut presented = PresentedCertificate {
        fingerprint: fingerprint(leaf),
        not_before: i64::MIN,
        not_after: i64::MAX,
        ..PresentedCertificate::default()
    };
    if let Ok(Some(names)) = parsed.subject_alternative_name() {
        for name in &names.value.general_names {
            match name {
                GeneralName::URI(uri) => presented.uris.push(uri.to_string()),
                GeneralName::DNSName(dns) => presented.dns_names.push(dns.to_string()),
                _ => {}
            }
        }
    }
    for common_name in parsed.subject().iter_common_name() {
        if let Ok(text) = common_name.as_str() {
            presented.common_names.push(text.to_string());
        }
    }
    // Every certificate the client sent narrows the window (one that played no part in the
    // verified path can only end it sooner).
    for certificate in chain {
        let Ok((_, parsed)) = x509_parser::parse_x509_certificate(certificate) else {
            continue;
        };
        let validity = parsed.validity();
        presented.not_before = presented.not_before.max(validity.not_before.timestamp());
        presented.not_after = presented.not_after.min(validity.not_after.timestamp());
    }
    // The CAs it chains to are those under which the chain verifies, each on its own: a CA
    // certificate appended to the chain, or a new CA key under the old CA's name, is not one.
    let now = rustls::pki_types::UnixTime::now();
    for authority in authorities {
        if authority
            .verifier
            .verify_client_cert(leaf, &chain[1..], now)
            .is_ok()
        {
            presented.not_after = presented.not_after.min(authority.not_after);
            presented.authorities.push(authority.fingerprint.clone());
        }
    }
    Some(presented)
}
