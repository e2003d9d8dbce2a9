//! What the console reads from a request besides its path: form bodies and query strings
//! (`application/x-www-form-urlencoded`) and the session cookie.

use std::collections::BTreeMap;

/// The largest form body the console reads; every console form is a few fields of text.
pub const MAX_FORM_BYTES: usize = 16 * 1024;

/// Decoded `name=value` pairs; a name given twice keeps its first value (nothing the console
/// sends repeats a name, so a repeat is ignored rather than guessed at).
#[derive(Debug, Default)]
pub struct Fields(BTreeMap<String, String>);

impl Fields {
    /// Parses `a=1&b=two+words`; pairs that are not valid percent-encoded UTF-8 are dropped.
    pub fn parse(text: &str) -> Fields {
        let mut fields = BTreeMap::new();
        for pair in text.split('&').filter(|pair| !pair.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let (Some(name), Some(value)) = (decode(name), decode(value)) else {
                continue;
            };
            fields.entry(name).or_insert(value);
        }
        Fields(fields)
    }

    /// The value of `name`, or "" when absent.
    pub fn get(&self, name: &str) -> &str {
        self.0.get(name).map(String::as_str).unwrap_or("")
    }

    /// The value of `name` when present and not empty.
    pub fn non_empty(&self, name: &str) -> Option<String> {
        Some(self.get(name).trim().to_string()).filter(|value| !value.is_empty())
    }
}

fn decode(text: &str) -> Option<String> {
    let spaced = text.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .ok()
        .map(|text| text.into_owned())
}

/// What a query value keeps as it is: RFC 3986's unreserved characters.
const QUERY_VALUE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Percent-encodes `text` for a query string value.
pub fn encode(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, QUERY_VALUE).to_string()
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(cookie, _)| *cookie == name)
        .map(|(_, value)| value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_fields_decode_plus_and_percent_and_keep_the_first_of_a_repeat() {
        let fields =
            Fields::parse("reason=ticket+OPS%2D42&confirm=production&confirm=staging&bad=%FF");
        assert_eq!(fields.get("reason"), "ticket OPS-42");
        assert_eq!(fields.get("confirm"), "production");
        assert_eq!(fields.get("bad"), "");
        assert_eq!(fields.get("missing"), "");
        assert_eq!(fields.non_empty("reason").as_deref(), Some("ticket OPS-42"));
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut headers = http::HeaderMap::new();
        headers.append(
            http::header::COOKIE,
            "a=1; valet_console=abc.def".parse().unwrap(),
        );
        assert_eq!(cookie(&headers, "valet_console"), Some("abc.def"));
        assert_eq!(cookie(&headers, "other"), None);
    }

    #[test]
    fn encoding_round_trips_through_parsing() {
        let text = "deploy & ship = 100% \"done\"";
        assert_eq!(Fields::parse(&format!("x={}", encode(text))).get("x"), text);
    }
}
