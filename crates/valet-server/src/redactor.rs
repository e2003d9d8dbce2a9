//! The last line of defence for invariant 1: any text valetd is about to emit (an audit record, an
//! error message) has every root credential it holds replaced by `<redacted>` — even when the
//! text came from a caller who pasted a secret into a request field.

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use valet_core::Secret;

/// Secrets shorter than this are not searched for: they would match ordinary text. Root
/// credentials are far longer in practice.
pub const MIN_REDACTED_BYTES: usize = 8;

/// The root credentials valetd holds, shared by everything that emits text.
#[derive(Default)]
pub struct Redactor {
    credentials: ArcSwap<BTreeMap<String, Secret>>,
}

impl Redactor {
    pub fn new(credentials: BTreeMap<String, Secret>) -> Arc<Redactor> {
        Arc::new(Redactor {
            credentials: ArcSwap::from_pointee(credentials),
        })
    }

    /// Replaces the credentials (on reload).
    pub fn replace(&self, credentials: BTreeMap<String, Secret>) {
        self.credentials.store(Arc::new(credentials));
    }

    pub fn n_credentials(&self) -> usize {
        self.credentials.load().len()
    }

    /// A root credential by name, for the gateway's upstream leg.
    pub fn credential(&self, name: &str) -> Option<Secret> {
        self.credentials.load().get(name).cloned()
    }

    /// `Some(clean text)` when `text` contained a credential, `None` when it is clean.
    pub fn redact(&self, text: &str) -> Option<String> {
        let credentials = self.credentials.load();
        let mut clean: Option<String> = None;
        for secret in credentials.values() {
            let Some(needle) = secret.expose_str() else {
                continue;
            };
            if needle.len() < MIN_REDACTED_BYTES {
                continue;
            }
            let current = clean.as_deref().unwrap_or(text);
            if current.contains(needle) {
                clean = Some(current.replace(needle, "<redacted>"));
            }
        }
        clean
    }

    /// A status with its message redacted.
    pub fn redact_status(&self, status: tonic::Status) -> tonic::Status {
        match self.redact(status.message()) {
            Some(clean) => tonic::Status::new(status.code(), clean),
            None => status,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_held_credential_is_replaced_and_clean_text_is_untouched() {
        let redactor = Redactor::new(BTreeMap::from([
            ("a".to_string(), Secret::from("root-secret-one".to_string())),
            ("b".to_string(), Secret::from("root-secret-two".to_string())),
            ("short".to_string(), Secret::from("abc".to_string())),
        ]));
        assert_eq!(
            redactor
                .redact("x root-secret-one y root-secret-two z")
                .as_deref(),
            Some("x <redacted> y <redacted> z")
        );
        assert_eq!(redactor.redact("nothing to see, abc"), None);
    }
}
