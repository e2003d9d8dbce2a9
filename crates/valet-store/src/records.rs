//! How records are written in every engine: JSON values, and what a record that does not read
//! back says.

use crate::StoreError;

pub(crate) fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // These records are plain structs of strings and numbers; serializing them cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    what: &'static str,
    key: &[u8],
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|error| StoreError::Corrupt {
        what,
        key: String::from_utf8_lossy(key).into_owned(),
        detail: error.to_string(),
    })
}
