//! JSON read the way no mainstream decoder can read differently, in one pass: I-JSON (RFC 7493:
//! UTF-8, no repeated member names, numbers a double holds exactly) and, beyond it, no two names of
//! one object that are equal under Unicode case folding — Go's `encoding/json` matches names to
//! struct fields that way (`ſ` reads as `s`, the Kelvin sign as `k`), and keeps the last; Node,
//! Python, PHP and Ruby keep the last repeated name, some Java and Rust decoders the first. Each
//! object's names are checked against a set of their foldings, so the cost is linear in the body.
//! The canonical form the gateway forwards and the rendering a person reads are written here too.

use std::collections::HashSet;

use serde_json::{Map, Value};

/// Why a body is not JSON the gateway can vouch for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    #[error(
        "the JSON has the name {0:?} more than once in one object (exactly, or in another spelling of case that decoders such as Go's fold together): servers read repeated names differently"
    )]
    RepeatedKey(String),
    #[error(
        "the JSON has the number {0}, outside what a double holds exactly (integers up to ±9007199254740991): decoders would read different numbers; send it as a string"
    )]
    NumberOutOfRange(String),
    #[error("the body is not JSON: {0}")]
    Invalid(String),
}

/// The largest integer every mainstream decoder reads exactly (2^53 − 1).
pub const MAX_EXACT_INTEGER: u64 = (1 << 53) - 1;

/// Parses `bytes` as strict JSON (see the module's description).
pub fn parse_strict(bytes: &[u8]) -> Result<Value, JsonError> {
    let value: StrictValue = serde_json::from_slice(bytes).map_err(|error| {
        let text = error.to_string();
        if let Some(key) = text.strip_prefix(REPEATED_KEY) {
            return JsonError::RepeatedKey(cut_position(key));
        }
        if let Some(number) = text.strip_prefix(OUT_OF_RANGE) {
            return JsonError::NumberOutOfRange(cut_position(number));
        }
        JsonError::Invalid(text)
    })?;
    Ok(value.0)
}

/// The canonical bytes of a value: compact, names sorted, strings escaped only where JSON
/// requires it — what the gateway forwards.
pub fn canonical(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

/// A value as a person reads it: pretty-printed, one member per line, with every character that
/// could disguise the text written as `\u{XXXX}`. Distinct values render distinctly: JSON's own
/// escaping of `\` keeps a written-out `\u{…}` apart from the character it names.
pub fn render(value: &Value) -> String {
    let pretty = serde_json::to_string_pretty(value).unwrap_or_default();
    pretty
        .lines()
        .map(crate::approval::escape_for_people)
        .collect::<Vec<_>>()
        .join("\n")
}

/// `name` folded as decoders that match names case-insensitively fold it: each character to its
/// lowercase after its uppercase, so the members of one Unicode simple case-folding orbit (`s`,
/// `S`, `ſ`; `k`, `K`, the Kelvin sign; `σ`, `ς`, `Σ`) fold together. Folding more than a
/// decoder does only refuses more, never less.
pub fn fold(name: &str) -> String {
    if name.is_ascii() {
        return name.to_ascii_lowercase();
    }
    let mut folded = String::with_capacity(name.len());
    for character in name.chars() {
        let mut upper = character.to_uppercase();
        let single_upper = match (upper.next(), upper.next()) {
            (Some(upper), None) => upper,
            _ => character,
        };
        let mut lower = single_upper.to_lowercase();
        match (lower.next(), lower.next()) {
            (Some(lower), None) => folded.push(lower),
            _ => folded.extend(character.to_lowercase()),
        }
    }
    folded
}

const REPEATED_KEY: &str = "repeated key ";
const OUT_OF_RANGE: &str = "number out of range ";

fn cut_position(text: &str) -> String {
    text.split(" at line").next().unwrap_or(text).to_string()
}

/// A JSON value read without ever keeping one of two equal names.
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

    fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<Value, E> {
        if value.unsigned_abs() > MAX_EXACT_INTEGER {
            return Err(E::custom(format!("{OUT_OF_RANGE}{value}")));
        }
        Ok(Value::from(value))
    }

    fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<Value, E> {
        if value > MAX_EXACT_INTEGER {
            return Err(E::custom(format!("{OUT_OF_RANGE}{value}")));
        }
        Ok(Value::from(value))
    }

    fn visit_f64<E: serde::de::Error>(self, value: f64) -> Result<Value, E> {
        // An integer written beyond 64 bits arrives here, as a double that no longer equals it;
        // so does every number of that size, which decoders reading integers disagree on.
        if value.abs() > MAX_EXACT_INTEGER as f64 {
            return Err(E::custom(format!("{OUT_OF_RANGE}{value}")));
        }
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
        let mut folded_names = HashSet::new();
        while let Some(key) = entries.next_key::<String>()? {
            if !folded_names.insert(fold(&key)) {
                return Err(serde::de::Error::custom(format!("{REPEATED_KEY}{key}")));
            }
            let StrictValue(value) = entries.next_value()?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

/// Refuses the names of an object a rule constrains that decoders could read as a name the rule
/// names: a name equal under case folding to a constrained one without being it (`nameſpace`
/// for `namespace`), and any name outside ASCII (some decoders normalise Unicode as well).
pub fn refuse_lookalike_names<'a>(
    object: &Map<String, Value>,
    constrained: impl Iterator<Item = &'a str>,
) -> Result<(), String> {
    let constrained: Vec<&str> = constrained.collect();
    if constrained.is_empty() {
        return Ok(());
    }
    for name in object.keys() {
        if !name.is_ascii() {
            return Err(format!(
                "{name:?} is a name outside ASCII in an object whose names a rule constrains; decoders fold and normalise such names in different ways"
            ));
        }
        let folded = fold(name);
        if let Some(rule_name) = constrained
            .iter()
            .find(|rule_name| **rule_name != name && fold(rule_name) == folded)
        {
            return Err(format!(
                "{name:?} is not {rule_name:?}, but decoders that match names case-insensitively would read it as {rule_name:?}"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_names_in_any_spelling_of_case_are_refused_at_any_depth() {
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

    #[test]
    fn names_go_folds_together_are_one_name() {
        // U+017F LATIN SMALL LETTER LONG S folds to s; U+212A KELVIN SIGN to k.
        assert_eq!(
            parse_strict("{\"namespace\": \"staging\", \"name\u{17F}pace\": \"prod\"}".as_bytes()),
            Err(JsonError::RepeatedKey("name\u{17F}pace".into()))
        );
        assert_eq!(
            parse_strict("{\"kind\": 1, \"\u{212A}ind\": 2}".as_bytes()),
            Err(JsonError::RepeatedKey("\u{212A}ind".into()))
        );
        assert_eq!(fold("\u{3A3}\u{3C2}\u{3C3}"), "\u{3C3}\u{3C3}\u{3C3}");
        assert_eq!(fold("Stra\u{DF}e"), "stra\u{DF}e");
    }

    #[test]
    fn integers_beyond_what_a_double_holds_are_refused() {
        assert!(
            parse_strict(b"[9007199254740991, -9007199254740991, 12345.678, 1.5e-300]").is_ok()
        );
        assert!(matches!(
            parse_strict(b"[1.5e300]"),
            Err(JsonError::NumberOutOfRange(_))
        ));
        assert!(matches!(
            parse_strict(b"[9007199254740992]"),
            Err(JsonError::NumberOutOfRange(_))
        ));
        assert!(matches!(
            parse_strict(b"{\"id\": 123456789012345678901234567890}"),
            Err(JsonError::NumberOutOfRange(_))
        ));
        assert!(matches!(
            parse_strict(b"[-9007199254740993]"),
            Err(JsonError::NumberOutOfRange(_))
        ));
    }

    #[test]
    fn lone_surrogates_and_other_invalid_text_are_refused() {
        assert!(matches!(
            parse_strict(br#"["\ud800"]"#),
            Err(JsonError::Invalid(_))
        ));
        assert!(matches!(
            parse_strict(b"[\"\xff\"]"),
            Err(JsonError::Invalid(_))
        ));
        assert!(matches!(parse_strict(b"[NaN]"), Err(JsonError::Invalid(_))));
    }

    #[test]
    fn many_distinct_names_cost_linear_time() {
        // 400 KB of distinct names: a quadratic check took seconds to minutes.
        let mut body = String::from("{");
        for index in 0..30_000 {
            if index > 0 {
                body.push(',');
            }
            body.push_str(&format!("\"key{index}\":{index}"));
        }
        body.push('}');
        let value = parse_strict(body.as_bytes()).unwrap();
        assert_eq!(value.as_object().unwrap().len(), 30_000);
    }

    #[test]
    fn lookalike_names_of_constrained_objects_are_refused() {
        let object = |text: &str| {
            parse_strict(text.as_bytes())
                .unwrap()
                .as_object()
                .unwrap()
                .clone()
        };
        let constrained = ["namespace"];
        assert!(
            refuse_lookalike_names(
                &object(r#"{"namespace": "s", "replicas": 3}"#),
                constrained.into_iter()
            )
            .is_ok()
        );
        let error = refuse_lookalike_names(
            &object("{\"name\u{17F}pace\": \"p\"}"),
            constrained.into_iter(),
        )
        .unwrap_err();
        assert!(error.contains("outside ASCII"), "{error}");
        let error =
            refuse_lookalike_names(&object(r#"{"NameSpace": "p"}"#), constrained.into_iter())
                .unwrap_err();
        assert!(error.contains("would read it as \"namespace\""), "{error}");
        // Unconstrained objects keep any names.
        assert!(refuse_lookalike_names(&object("{\"caf\u{E9}\": 1}"), std::iter::empty()).is_ok());
    }

    #[test]
    fn renderings_tell_a_character_from_its_written_out_name() {
        let raw = Value::from("a\u{202E}b");
        let written = Value::from("a\\u{202E}b");
        assert_ne!(render(&raw), render(&written));
        assert_eq!(render(&raw), "\"a\\u{202E}b\"");
        assert_eq!(canonical(&raw), "\"a\u{202E}b\"".as_bytes());
    }

    proptest::proptest! {
        #[test]
        fn parse_canonical_parse_is_stable(value in arbitrary_json()) {
            let bytes = canonical(&value);
            if let Ok(parsed) = parse_strict(&bytes) {
                proptest::prop_assert_eq!(canonical(&parsed), bytes.clone());
                proptest::prop_assert_eq!(parse_strict(&canonical(&parsed)).unwrap(), parsed);
            }
        }

        #[test]
        fn the_rendering_determines_the_canonical_bytes(left in arbitrary_json(), right in arbitrary_json()) {
            if render(&left) == render(&right) {
                proptest::prop_assert_eq!(canonical(&left), canonical(&right));
            }
            // And a rendering reads back to its value when it holds nothing escaped for people.
            let rendered = render(&left);
            if !rendered.contains("\\u{") {
                proptest::prop_assert_eq!(serde_json::from_str::<Value>(&rendered).unwrap(), left);
            }
        }
    }

    fn arbitrary_json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            (-(MAX_EXACT_INTEGER as i64)..=(MAX_EXACT_INTEGER as i64)).prop_map(Value::from),
            "[a-zA-Z\u{17F}\u{212A}\u{202E}\u{200B}\\\\\"{}u ]{0,8}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map("[a-c\u{17F}]{1,3}", inner, 0..4)
                    .prop_map(|map| Value::Object(map.into_iter().collect())),
            ]
        })
    }
}
