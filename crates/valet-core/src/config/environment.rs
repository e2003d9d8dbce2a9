//! What a valid config needs from the machine it runs on: the key-encryption key, the root
//! credentials, the TLS and JWKS files, etcd's secrets. The check is one rule for valetd's start
//! and `valet config check`; the reading itself is injected (an [`Environment`]), so this module
//! does no I/O.

use std::path::Path;

use super::{Config, ConfigProblem, KeySource, ProblemKind, StoreConfig};
use crate::Secret;

/// Reads files and environment variables for [`Config::check_environment`].
pub trait Environment {
    fn read(&self, path: &Path) -> Result<Vec<u8>, String>;
    /// The variable's value; `None` when unset or not UTF-8.
    fn var(&self, name: &str) -> Option<String>;
    /// Whether `path` is a file its owner, group or others may execute (reading none of it).
    fn executable(&self, path: &Path) -> Result<(), String>;
}

/// What kind of PEM block a file must hold.
#[derive(Clone, Copy)]
enum Pem {
    Certificate,
    PrivateKey,
}

impl Config {
    /// Everything valetd would refuse at start that the file alone cannot show: a key-encryption
    /// key that is missing, unreadable or not 32 base64 bytes (unless `dev`), root credentials
    /// that cannot be read or are empty, an AWS access key id variable that is unset or wrong,
    /// TLS, client-CA, issuer and etcd files that cannot be read or hold no PEM block of their
    /// kind, JWKS files without a usable key, MCP server programs that cannot be found, and
    /// listeners serving plaintext off loopback that the config (or `dev`) does not allow.
    /// Every problem, each under its key path.
    pub fn check_environment(
        &self,
        environment: &dyn Environment,
        dev: bool,
    ) -> Vec<ConfigProblem> {
        let mut found = Found {
            environment,
            problems: self.server.plaintext_problems(dev),
        };
        match &self.seal {
            None if !dev => found.problems.push(ConfigProblem {
                key_path: "seal".to_string(),
                kind: ProblemKind::NoSealKey,
            }),
            None => {}
            Some(source) => match read_secret(environment, source) {
                Err(detail) => found.unusable(
                    "seal".into(),
                    format!("the key-encryption key ({source})"),
                    detail,
                ),
                Ok(text) => {
                    if let Err(error) = crate::keyring::SealKey::from_base64(&text) {
                        found.unusable(
                            "seal".into(),
                            format!("the key-encryption key ({source})"),
                            error.to_string(),
                        );
                    }
                }
            },
        }
        for credential in self.credentials.values() {
            let at = format!("credential {:?}", credential.name);
            let fronted = self
                .upstreams
                .values()
                .any(|upstream| upstream.credential == credential.name);
            match read_secret(environment, &credential.source) {
                Err(detail) => found.unusable(at.clone(), credential.source.to_string(), detail),
                // The gateway keeps an upstream's credential out of answers by masking it, which
                // it does for credentials up to a bound (their encodings must fit its window).
                Ok(secret) if fronted && secret.expose().len() > super::MAX_MASKED_CREDENTIAL_BYTES => {
                    found.unusable(
                        at.clone(),
                        credential.source.to_string(),
                        format!(
                            "it is {} bytes, and an upstream's credential may be at most {} (the gateway masks it in every answer)",
                            secret.expose().len(),
                            super::MAX_MASKED_CREDENTIAL_BYTES
                        ),
                    )
                }
                Ok(_) => {}
            }
            if let Some(aws) = &credential.aws
                && let Some(name) = &aws.access_key_id_env
            {
                match environment.var(name) {
                    None => found.unusable(
                        at.clone(),
                        format!("access key id from environment variable {name}"),
                        "the variable is not set or not UTF-8".into(),
                    ),
                    Some(value) if !super::is_access_key_id(value.trim()) => found.unusable(
                        at.clone(),
                        format!("access key id from environment variable {name}"),
                        "it is not an AWS access key id (16 to 128 characters from A-Z and 0-9)"
                            .into(),
                    ),
                    Some(_) => {}
                }
            }
        }
        if let Some(tls) = &self.server.tls {
            found.pem("server.tls_cert_file", &tls.cert_file, Pem::Certificate);
            found.pem("server.tls_key_file", &tls.key_file, Pem::PrivateKey);
            if let Some(ca) = &tls.client_ca_file {
                found.pem("server.client_ca_file", ca, Pem::Certificate);
            }
        }
        for issuer in self.issuers.values() {
            match &issuer.keys {
                super::KeySet::Url {
                    ca_file: Some(ca), ..
                } => found.pem(
                    &format!("issuer {:?}.ca_file", issuer.name),
                    ca,
                    Pem::Certificate,
                ),
                super::KeySet::Url { .. } => {}
                super::KeySet::File(path) => {
                    let at = format!("issuer {:?}.jwks_file", issuer.name);
                    match environment.read(path) {
                        Err(detail) => {
                            found.unusable(at, format!("file {}", path.display()), detail)
                        }
                        Ok(bytes) => {
                            if let Err(detail) = crate::identity::jwt::parse_jwks(&bytes) {
                                found.unusable(at, format!("file {}", path.display()), detail);
                            }
                        }
                    }
                }
            }
        }
        for upstream in self.upstreams.values() {
            if let super::Target::Process(server) = &upstream.target
                && let Err(detail) = find_program(environment, &server.command)
            {
                found.unusable(
                    format!("upstream {:?}.command", upstream.name),
                    format!("program {:?}", server.command),
                    detail,
                );
            }
        }
        if let StoreConfig::Etcd(etcd) = &self.store {
            if let Some(ca) = &etcd.ca_file {
                found.pem("store.ca_file", ca, Pem::Certificate);
            }
            if let Some((cert, key)) = &etcd.client_certificate {
                found.pem("store.cert_file", cert, Pem::Certificate);
                found.pem("store.key_file", key, Pem::PrivateKey);
            }
            if let Some(source) = &etcd.password
                && let Err(detail) = read_secret(environment, source)
            {
                found.unusable("store.password".into(), source.to_string(), detail);
            }
        }
        found.problems
    }
}

/// Whether the program an MCP upstream runs can be found: a path must be an executable file; a
/// bare name must be one in a directory of `PATH`.
fn find_program(environment: &dyn Environment, command: &str) -> Result<(), String> {
    if command.contains('/') {
        return environment.executable(Path::new(command));
    }
    let path = environment.var("PATH").unwrap_or_default();
    if path
        .split(':')
        .filter(|directory| !directory.is_empty())
        .any(|directory| {
            environment
                .executable(&Path::new(directory).join(command))
                .is_ok()
        })
    {
        return Ok(());
    }
    Err(format!(
        "it is not an executable file in any directory of PATH ({path})"
    ))
}

/// The problems found so far, and how to read what is checked.
struct Found<'a> {
    environment: &'a dyn Environment,
    problems: Vec<ConfigProblem>,
}

impl Found<'_> {
    fn unusable(&mut self, key_path: String, what: String, detail: String) {
        self.problems.push(ConfigProblem {
            key_path,
            kind: ProblemKind::Unusable { what, detail },
        });
    }

    fn pem(&mut self, key_path: &str, path: &Path, kind: Pem) {
        if let Err(detail) = check_pem(self.environment, path, kind) {
            self.unusable(
                key_path.to_string(),
                format!("file {}", path.display()),
                detail,
            );
        }
    }
}

/// Reads a secret the way valetd does: a file with its trailing newline removed, or a variable;
/// empty is an error.
pub fn read_secret(environment: &dyn Environment, source: &KeySource) -> Result<Secret, String> {
    let secret = match source {
        KeySource::File(path) => {
            let mut bytes = environment.read(path)?;
            while bytes
                .last()
                .is_some_and(|byte| *byte == b'\n' || *byte == b'\r')
            {
                bytes.pop();
            }
            Secret::new(bytes)
        }
        KeySource::Env(name) => Secret::from(
            environment
                .var(name)
                .ok_or_else(|| "the variable is not set or not UTF-8".to_string())?,
        ),
    };
    if secret.is_empty() {
        return Err("it is empty".to_string());
    }
    Ok(secret)
}

fn check_pem(environment: &dyn Environment, path: &Path, kind: Pem) -> Result<(), String> {
    let bytes = environment.read(path)?;
    let text = String::from_utf8_lossy(&bytes);
    let found = match kind {
        Pem::Certificate => text.contains("-----BEGIN CERTIFICATE-----"),
        Pem::PrivateKey => {
            text.contains("-----BEGIN PRIVATE KEY-----")
                || text.contains("-----BEGIN RSA PRIVATE KEY-----")
                || text.contains("-----BEGIN EC PRIVATE KEY-----")
        }
    };
    if found {
        Ok(())
    } else {
        Err(match kind {
            Pem::Certificate => "it holds no PEM CERTIFICATE block".to_string(),
            Pem::PrivateKey => "it holds no PEM private key (PKCS#8, PKCS#1 or SEC1)".to_string(),
        })
    }
}
