//! JSON read the way no parser can read differently: a key repeated in one object — exactly, or
//! in another spelling of case — is refused rather than resolved, because parsers keep the first,
//! the last, or (Go's `encoding/json`, for struct fields) whichever matches case-insensitively.

use serde_json::{Map, Value};

/// Why a body is not JSON the gateway can vouch for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    #[error(
        "the JSON has key {0:?} more than once (or in two spellings of case): servers read repeated keys differently"
    )]
    RepeatedKey(String),
    #[error("the body is not JSON: {0}")]
    Invalid(String),
}

/// Parses `bytes` as JSON, refusing repeated keys.
pub fn parse_strict(bytes: &[u8]) -> Result<Value, JsonError> {
    let value: StrictValue = serde_json::from_slice(bytes).map_err(|error| {
        let text = error.to_string();
        match text.strip_prefix(REPEATED_KEY) {
            Some(key) => {
                JsonError::RepeatedKey(key.split(" at line").next().unwrap_or(key).to_string())
            }
            None => JsonError::Invalid(text),
        }
    })?;
    Ok(value.0)
}

const REPEATED_KEY: &str = "repeated key ";

/// A JSON value read without ever keeping one of two equal keys.
struct StrictValue(Value);

impl<'de> serde::Deserialize<'de> for StrictValue {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("a JSON value")
    }

    fn visit_bool<E>(self, value: bool) -> Result<Value, E> {
        Ok(Value::Bool(value))
    }

    fn visit_i64<E>(self, value: i64) -> Result<Value, E> {
        Ok(Value::from(value))
    }

    fn visit_u64<E>(self, value: u64) -> Result<Value, E> {
        Ok(Value::from(value))
    }

    fn visit_f64<E: serde::de::Error>(self, value: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(value)
            .map(Value::Number)
            .ok_or_else(|| E::custom("a number JSON cannot carry"))
    }

    fn visit_str<E>(self, value: &str) -> Result<Value, E> {
        Ok(Value::String(value.to_string()))
    }

    fn visit_string<E>(self, value: String) -> Result<Value, E> {
        Ok(Value::String(value))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut sequence: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(StrictValue(item)) = sequence.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut entries: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = entries.next_key::<String>()? {
            if object
                .keys()
                .any(|seen: &String| seen.eq_ignore_ascii_case(&key))
            {
                return Err(serde::de::Error::custom(format!("{REPEATED_KEY}{key}")));
            }
            let StrictValue(value) = entries.next_value()?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_keys_in_any_spelling_of_case_are_refused_at_any_depth() {
        assert!(parse_strict(br#"{"a": 1, "b": {"c": [1, {"d": 2}]}}"#).is_ok());
        assert_eq!(
            parse_strict(br#"{"env": "staging", "env": "production"}"#),
            Err(JsonError::RepeatedKey("env".into()))
        );
        assert_eq!(
            parse_strict(br#"{"x": {"environment": "s", "Environment": "p"}}"#),
            Err(JsonError::RepeatedKey("Environment".into()))
        );
        assert!(matches!(parse_strict(b"{"), Err(JsonError::Invalid(_))));
    }
}
