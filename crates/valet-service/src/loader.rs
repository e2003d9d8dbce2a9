//! Reading what the config points at: the config file itself, root credentials and the
//! key-encryption key. Every secret read here goes straight into a `Secret`.

use std::collections::BTreeMap;
use std::path::Path;

use valet_core::Secret;
use valet_core::config::{Config, KeySource};
use valet_core::keyring::SealKey;

/// Why a config, a credential or the key-encryption key cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read config file {path}: {detail}")]
    ConfigUnreadable { path: String, detail: String },
    #[error("config file {path} is invalid: {errors}")]
    ConfigInvalid {
        path: String,
        errors: valet_core::config::ConfigErrors,
    },
    #[error("credential {name:?} ({source_description}) cannot be read: {detail}")]
    CredentialUnreadable {
        name: String,
        source_description: String,
        detail: String,
    },
    #[error(
        "no key-encryption key: set [seal] key_file or key_env in the config (make a key with `openssl rand -base64 32`), or run `valetd --dev` for development only"
    )]
    NoSealKey,
    #[error("the key-encryption key ({source_description}) cannot be used: {detail}")]
    SealKeyUnreadable {
        source_description: String,
        detail: String,
    },
}

impl LoadError {
    /// Whether the operator's config (rather than the environment) is at fault.
    pub fn is_usage_error(&self) -> bool {
        matches!(
            self,
            LoadError::ConfigUnreadable { .. }
                | LoadError::ConfigInvalid { .. }
                | LoadError::NoSealKey
        )
    }
}

/// A validated config with the root credentials it names, read and ready.
pub struct LoadedConfig {
    pub config: Config,
    pub credentials: BTreeMap<String, Secret>,
}

/// Command-line values that win over the config file, at start and at every reload.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<std::net::SocketAddr>,
    pub data_dir: Option<std::path::PathBuf>,
    pub gateway_listen: Option<std::net::SocketAddr>,
    /// This replica's name in distributed mode, overriding `[store] replica`.
    pub replica: Option<String>,
    /// Development mode: a missing `[seal]` is allowed (the key is generated into the data dir).
    pub dev: bool,
}

/// The machine's files and environment variables, as the config's checks read them.
pub struct SystemEnvironment;

impl valet_core::config::Environment for SystemEnvironment {
    fn read(&self, path: &Path) -> Result<Vec<u8>, String> {
        std::fs::read(path).map_err(|error| error.to_string())
    }

    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }

    fn executable(&self, path: &Path) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        let metadata = std::fs::metadata(path).map_err(|error| error.to_string())?;
        if !metadata.is_file() {
            return Err("it is not a file".into());
        }
        if metadata.permissions().mode() & 0o111 == 0 {
            return Err("it is not executable (no x permission)".into());
        }
        Ok(())
    }
}

/// Reads and validates the config file and every credential it names.
pub fn load_config(path: &Path, overrides: &Overrides) -> Result<LoadedConfig, LoadError> {
    let display = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|error| LoadError::ConfigUnreadable {
        path: display.clone(),
        detail: error.to_string(),
    })?;
    let base_dir = path
        .canonicalize()
        .ok()
        .and_then(|absolute| absolute.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| Path::new(".").to_path_buf());
    let mut config =
        Config::parse(&text, &base_dir).map_err(|errors| LoadError::ConfigInvalid {
            path: display.clone(),
            errors,
        })?;
    if let Some(listen) = overrides.listen {
        config.server.listen = listen;
    }
    if let Some(data_dir) = &overrides.data_dir {
        config.server.data_dir = data_dir.clone();
    }
    if let Some(gateway_listen) = overrides.gateway_listen {
        config.server.gateway_listen = Some(gateway_listen);
    }
    if let (Some(replica), valet_core::config::StoreConfig::Etcd(etcd)) =
        (&overrides.replica, &mut config.store)
    {
        etcd.replica = Some(replica.clone());
    }
    // Everything the file points at, checked at once, by the rule `valet config check` uses.
    let problems = config.check_environment(&SystemEnvironment, overrides.dev);
    if !problems.is_empty() {
        return Err(LoadError::ConfigInvalid {
            path: display,
            errors: valet_core::config::ConfigErrors(problems),
        });
    }
    for credential in config.credentials.values_mut() {
        let Some(aws) = &mut credential.aws else {
            continue;
        };
        let Some(name) = &aws.access_key_id_env else {
            continue;
        };
        let unreadable = |detail: &str| LoadError::CredentialUnreadable {
            name: credential.name.clone(),
            source_description: format!("access key id from environment variable {name}"),
            detail: detail.to_string(),
        };
        let value =
            std::env::var(name).map_err(|_| unreadable("the variable is not set or not UTF-8"))?;
        let value = value.trim();
        if !valet_core::config::is_access_key_id(value) {
            return Err(unreadable(
                "it is not an AWS access key id (16 to 128 characters from A-Z and 0-9)",
            ));
        }
        aws.access_key_id = value.to_string();
    }
    let mut credentials = BTreeMap::new();
    for credential in config.credentials.values() {
        let secret =
            read_secret(&credential.source).map_err(|detail| LoadError::CredentialUnreadable {
                name: credential.name.clone(),
                source_description: credential.source.to_string(),
                detail,
            })?;
        credentials.insert(credential.name.clone(), secret);
    }
    Ok(LoadedConfig {
        config,
        credentials,
    })
}

/// Reads a secret from a file (trailing newline removed) or an environment variable.
pub fn read_secret(source: &KeySource) -> Result<Secret, String> {
    valet_core::config::read_secret(&SystemEnvironment, source)
}

/// The key-encryption key: from the config, or in development mode from (or into) the data dir.
pub fn load_seal_key(config: &Config, dev: bool) -> Result<SealKey, LoadError> {
    let source = match (&config.seal, dev) {
        (Some(source), _) => source.clone(),
        (None, false) => return Err(LoadError::NoSealKey),
        (None, true) => {
            let path = config.server.data_dir.join("dev-seal.key");
            if !path.exists() {
                let key =
                    SealKey::generate_base64().map_err(|error| LoadError::SealKeyUnreadable {
                        source_description: format!("file {}", path.display()),
                        detail: error.to_string(),
                    })?;
                write_private_file(&path, key.expose()).map_err(|error| {
                    LoadError::SealKeyUnreadable {
                        source_description: format!("file {}", path.display()),
                        detail: error.to_string(),
                    }
                })?;
            }
            tracing::warn!(
                path = %path.display(),
                "DEVELOPMENT MODE: the key-encryption key is generated into the data dir, next to what it protects. \
                 Never run production like this: set [seal] key_file or key_env."
            );
            KeySource::File(path)
        }
    };
    let text = read_secret(&source).map_err(|detail| LoadError::SealKeyUnreadable {
        source_description: source.to_string(),
        detail,
    })?;
    SealKey::from_base64(&text).map_err(|error| LoadError::SealKeyUnreadable {
        source_description: source.to_string(),
        detail: error.to_string(),
    })
}

fn write_private_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}
