//! The `[store]` section: the embedded engine (sled, the default) or etcd for several replicas.

use std::path::PathBuf;

use super::raw::RawStore;
use super::{KeySource, ProblemKind, Problems, invalid, refuse_keys};

/// Which engine keeps valetd's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// sled, in `server.data_dir`: one valetd, no other service.
    Sled,
    /// etcd, shared by every replica.
    Etcd(EtcdConfig),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// `http://HOST:PORT` of each member.
    pub endpoints: Vec<String>,
    /// Key prefix of this deployment, such as `/valet/prod`.
    pub prefix: String,
    pub username: Option<String>,
    /// The etcd password's source; required with `username`.
    pub password: Option<KeySource>,
    /// This replica's name in records that are per replica (its audit chain head); defaults to
    /// the host name.
    pub replica: Option<String>,
    /// For `https://` endpoints: the CA that signed the members' certificates.
    pub ca_file: Option<PathBuf>,
    /// A client certificate and its key, for clusters that require one.
    pub client_certificate: Option<(PathBuf, PathBuf)>,
}

/// Whether `host:port` names this machine (127.0.0.0/8, ::1, localhost).
fn is_loopback(host_port: &str) -> bool {
    let host = host_port
        .rsplit_once(':')
        .map(|(host, _)| host)
        .unwrap_or(host_port)
        .trim_start_matches('[')
        .trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|address| address.is_loopback())
}

pub(super) fn build(raw: Option<RawStore>, problems: &mut Problems) -> Option<StoreConfig> {
    let Some(raw) = raw else {
        return Some(StoreConfig::Sled);
    };
    match raw.engine.as_deref().unwrap_or("sled") {
        "sled" => {
            refuse_keys(
                [
                    ("endpoints", raw.endpoints.is_some()),
                    ("prefix", raw.prefix.is_some()),
                    ("username", raw.username.is_some()),
                    ("password_env", raw.password_env.is_some()),
                    ("password_file", raw.password_file.is_some()),
                    ("replica", raw.replica.is_some()),
                    ("ca_file", raw.ca_file.is_some()),
                    ("cert_file", raw.cert_file.is_some()),
                    ("key_file", raw.key_file.is_some()),
                    ("allow_insecure", raw.allow_insecure.is_some()),
                ],
                (
                    "store",
                    "key for the sled engine",
                    "only with engine = \"etcd\"",
                ),
                problems,
            );
            Some(StoreConfig::Sled)
        }
        "etcd" => {
            let endpoints = match raw.endpoints {
                None => {
                    problems.push("store.endpoints", ProblemKind::Missing);
                    Vec::new()
                }
                Some(endpoints) if endpoints.is_empty() => {
                    problems.push(
                        "store.endpoints",
                        invalid("[]", "endpoint list", "at least one etcd member URL"),
                    );
                    Vec::new()
                }
                Some(endpoints) => endpoints,
            };
            let tls = endpoints
                .first()
                .is_some_and(|first| first.starts_with("https://"));
            let scheme = if tls { "https://" } else { "http://" };
            for (index, endpoint) in endpoints.iter().enumerate() {
                let host = endpoint.strip_prefix(scheme).unwrap_or_default();
                if host.is_empty() || host.contains('/') || !host.contains(':') {
                    problems.push(
                        format!("store.endpoints[{index}]"),
                        invalid(
                            endpoint,
                            "etcd endpoint",
                            &format!("{scheme}HOST:PORT, the same scheme for every member"),
                        ),
                    );
                }
            }
            if tls && raw.ca_file.is_none() {
                problems.push(
                    "store.ca_file",
                    invalid(
                        "",
                        "CA file",
                        "the PEM file of the CA that signed the etcd members' certificates (https endpoints need one)",
                    ),
                );
            }
            if !tls && (raw.ca_file.is_some() || raw.cert_file.is_some()) {
                problems.push(
                    "store.endpoints",
                    invalid(
                        "http://",
                        "scheme with TLS settings",
                        "https:// endpoints when ca_file or cert_file is set",
                    ),
                );
            }
            let client_certificate = match (raw.cert_file, raw.key_file) {
                (Some(cert), Some(key)) => Some((PathBuf::from(cert), PathBuf::from(key))),
                (None, None) => None,
                _ => {
                    problems.push(
                        "store",
                        invalid(
                            "cert_file/key_file",
                            "client certificate",
                            "cert_file and key_file together, or neither",
                        ),
                    );
                    None
                }
            };
            let prefix = raw.prefix.unwrap_or_else(|| "/valet".to_string());
            if !prefix.starts_with('/')
                || prefix.len() > 128
                || prefix.chars().any(char::is_control)
            {
                problems.push(
                    "store.prefix",
                    invalid(
                        &prefix,
                        "key prefix",
                        "a path such as \"/valet/prod\", at most 128 characters",
                    ),
                );
            }
            let password = match (raw.password_env, raw.password_file) {
                (Some(_), Some(_)) => {
                    problems.push(
                        "store",
                        ProblemKind::BothSet {
                            first: "password_env",
                            second: "password_file",
                        },
                    );
                    None
                }
                (Some(name), None) => Some(KeySource::Env(name)),
                (None, Some(path)) => Some(KeySource::File(path.into())),
                (None, None) => None,
            };
            if raw.username.is_some() != password.is_some() {
                problems.push(
                    "store.username",
                    invalid(
                        raw.username.as_deref().unwrap_or(""),
                        "etcd login",
                        "username together with password_env or password_file",
                    ),
                );
            }
            // Write access to etcd is control of the broker (whoever can write records can end
            // grants, and a store that a stranger can reach without proving who they are is
            // one a stranger controls). Off loopback, etcd needs TLS and a login or a client
            // certificate, unless the operator says in config that it is acceptable.
            let off_loopback: Vec<&String> = endpoints
                .iter()
                .filter(|endpoint| !is_loopback(endpoint.strip_prefix(scheme).unwrap_or(endpoint)))
                .collect();
            let authenticated = raw.username.is_some() || client_certificate.is_some();
            if !off_loopback.is_empty()
                && (!tls || !authenticated)
                && raw.allow_insecure != Some(true)
            {
                let missing = match (tls, authenticated) {
                    (false, false) => "TLS and authentication",
                    (false, true) => "TLS",
                    _ => "authentication (username and password, or a client certificate)",
                };
                problems.push(
                    "store.endpoints",
                    invalid(
                        off_loopback[0],
                        "etcd endpoint off loopback without TLS and authentication",
                        &format!(
                            "https:// with ca_file, and username or cert_file; write access to etcd is control of the broker. This one lacks {missing} (allow_insecure = true accepts it, knowingly)"
                        ),
                    ),
                );
            }
            if let Some(replica) = &raw.replica
                && !super::is_valid_name(replica)
            {
                problems.push(
                    "store.replica",
                    invalid(replica, "replica name", super::NAME_RULE),
                );
            }
            Some(StoreConfig::Etcd(EtcdConfig {
                endpoints,
                prefix: prefix.trim_end_matches('/').to_string(),
                username: raw.username,
                password,
                replica: raw.replica,
                ca_file: raw.ca_file.map(PathBuf::from),
                client_certificate,
            }))
        }
        other => {
            problems.push(
                "store.engine",
                invalid(other, "store engine", "\"sled\" (the default) or \"etcd\""),
            );
            None
        }
    }
}
