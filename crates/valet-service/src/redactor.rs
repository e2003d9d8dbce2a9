//! The last line of defence for invariant 1: any text valetd is about to emit (an audit record, an
//! error message) has every root credential in the vault replaced by `<redacted>` — even when the
//! text came from a caller who pasted a secret into a request field.

use std::sync::Arc;

use crate::vault::CredentialVault;

/// Secrets shorter than this are not searched for: they would match ordinary text. Root
/// credentials are far longer in practice.
pub const MIN_REDACTED_BYTES: usize = 8;

/// Redacts the vault's credentials from text.
pub struct Redactor {
    vault: Arc<CredentialVault>,
}

impl Redactor {
    pub fn new(vault: Arc<CredentialVault>) -> Redactor {
        Redactor { vault }
    }

    /// `Some(clean text)` when `text` contained a credential, `None` when it is clean.
    pub fn redact(&self, text: &str) -> Option<String> {
        let credentials = self.vault.all();
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
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use valet_core::Secret;

    use super::*;

    #[test]
    fn every_held_credential_is_replaced_and_clean_text_is_untouched() {
        let redactor = Redactor::new(CredentialVault::new(BTreeMap::from([
            ("a".to_string(), Secret::from("root-secret-one".to_string())),
            ("b".to_string(), Secret::from("root-secret-two".to_string())),
            ("short".to_string(), Secret::from("abc".to_string())),
        ])));
        assert_eq!(
            redactor
                .redact("x root-secret-one y root-secret-two z")
                .as_deref(),
            Some("x <redacted> y <redacted> z")
        );
        assert_eq!(redactor.redact("nothing to see, abc"), None);
    }
}
