//! The credential vault: the root credentials valetd holds, by name, replaced atomically on
//! reload. Only the gateway's upstream leg and the AWS signer take a credential out of it.

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use valet_core::Secret;

/// Root credentials by name.
#[derive(Default)]
pub struct CredentialVault {
    credentials: ArcSwap<BTreeMap<String, Secret>>,
}

impl CredentialVault {
    pub fn new(credentials: BTreeMap<String, Secret>) -> Arc<CredentialVault> {
        Arc::new(CredentialVault {
            credentials: ArcSwap::from_pointee(credentials),
        })
    }

    /// Replaces every credential at once (on reload).
    pub fn replace(&self, credentials: BTreeMap<String, Secret>) {
        self.credentials.store(Arc::new(credentials));
    }

    /// A root credential by name.
    pub fn get(&self, name: &str) -> Option<Secret> {
        self.credentials.load().get(name).cloned()
    }

    pub fn len(&self) -> usize {
        self.credentials.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every credential, for the redactor's scan.
    pub fn all(&self) -> Arc<BTreeMap<String, Secret>> {
        self.credentials.load_full()
    }
}
