//! The canonical call: the one reading of a request through the gateway. The service makes it once
//! from the bytes received — method, canonical path and query, a content type from a short list,
//! and the body parsed into a value — or refuses the request. Rules check it, a person approving
//! reads it rendered whole, and the upstream receives it re-serialised: the gateway's own bytes
//! under the gateway's own Content-Type, never the agent's. Anything another decoder could read
//! differently (repeated or case-folded names, other charsets, form names that servers rewrite)
//! is refused here, before any rule runs.

use serde_json::Value;

use crate::call::CallRefusal;
use crate::json::{self, JsonError};
use crate::rules::{CheckedPath, QueryError, encode_component, percent_decode};

/// Longest path and query the upstream receives. With the credential (up to three times its
/// 512 bytes, percent-encoded, when it travels in the query) it stays far below the request-line
/// limits of common servers (8 KiB for nginx and Apache), so no limit an agent can push against
/// depends on the credential's length.
pub const MAX_TARGET_BYTES: usize = 4096;
/// Longest value of one forwarded agent header, and of all of them together (names included):
/// with the credential's header, far below common header limits (Node's 16 KiB in all, Apache's
/// 8 KiB a line).
pub const MAX_HEADER_BYTES: usize = 2048;
pub const MAX_HEADERS_BYTES: usize = 8192;

/// Longest rendering a person is asked to approve; a larger call cannot be approved.
pub const MAX_RENDERING: usize = 16 * 1024;
/// Most pairs in a form body (Express's `qs` and PHP stop reading at 1000 and drop the rest).
pub const MAX_FORM_PAIRS: usize = 1000;

/// Starts of a `+json` type's name that servers matching types by prefix read as another type
/// (Symfony reads `application/x-www-form-urlencoded+json` as a form).
const PREFIX_READ: [&str; 4] = [
    "x-www-form-urlencoded",
    "octet-stream",
    "form-data",
    "graphql",
];

/// The body types the gateway reads, for refusals.
pub const ACCEPTED: &str = "application/json (or application/*+json, such as application/merge-patch+json), application/x-www-form-urlencoded, text/plain and application/octet-stream, with no charset but utf-8";

/// One request through the gateway, read once: what every rule checks, what a person approving
/// reads, and what the upstream receives.
#[derive(Debug, Clone, PartialEq)]
pub struct CanonicalCall {
    pub method: String,
    /// The path as the agent sent it (after the upstream's name), for what refusals name.
    pub sent_path: String,
    /// The path checked: its segments, which rules match, and its canonical form.
    pub path: CheckedPath,
    /// The query's pairs, decoded, in the order sent.
    pub query: Vec<(String, String)>,
    /// The request headers the upstream will receive from the agent (the gateway's allowlist
    /// and the upstream's `forward_headers`), lowercased names, in the order sent.
    pub headers: Vec<(String, String)>,
    pub body: Body,
}

/// The headers the upstream receives from the agent, read once: each given at most once, as
/// visible text (servers read a repeated header as the first, the last or both).
fn read_headers(headers: &[(String, &[u8])]) -> Result<Vec<(String, String)>, CallRefusal> {
    let mut read: Vec<(String, String)> = Vec::new();
    for (name, value) in headers {
        let name = name.to_ascii_lowercase();
        if read.iter().any(|(seen, _)| *seen == name) {
            return Err(CallRefusal::BadHeader {
                header: name,
                reason: "it is sent more than once; servers read a repeated header differently, so send it once".into(),
            });
        }
        let value = std::str::from_utf8(value)
            .ok()
            .filter(|value| {
                value
                    .bytes()
                    .all(|byte| byte == b'\t' || (0x20..0x7f).contains(&byte))
            })
            .ok_or_else(|| CallRefusal::BadHeader {
                header: name.clone(),
                reason: "its value has characters other than visible ASCII, spaces and tabs".into(),
            })?;
        if value.len() > MAX_HEADER_BYTES {
            return Err(CallRefusal::BadHeader {
                header: name,
                reason: format!(
                    "its value is {} bytes; at most {MAX_HEADER_BYTES} are forwarded (so the request stays below every common header limit, whatever the credential's length)",
                    value.len()
                ),
            });
        }
        read.push((name, value.to_string()));
    }
    let total: usize = read
        .iter()
        .map(|(name, value)| name.len() + value.len() + 4)
        .sum();
    if total > MAX_HEADERS_BYTES {
        return Err(CallRefusal::BadHeader {
            header: "(all forwarded)".into(),
            reason: format!(
                "the forwarded headers are {total} bytes together; at most {MAX_HEADERS_BYTES} are (so the request stays below every common header limit, whatever the credential's length)"
            ),
        });
    }
    Ok(read)
}

impl CanonicalCall {
    /// Reads a request: its query string and its body under every Content-Type header it carried.
    /// A query or body that another server could read differently is refused here.
    pub fn read(
        method: &str,
        sent_path: &str,
        path: CheckedPath,
        raw_query: Option<&str>,
        headers: &[(String, &[u8])],
        content_types: &[&str],
        body: &[u8],
    ) -> Result<CanonicalCall, CallRefusal> {
        let query = read_query(raw_query).map_err(CallRefusal::BadQuery)?;
        let read = Body::read(content_types, body).map_err(|error| match error {
            BodyError::RepeatedHeader(_)
            | BodyError::NoContentType
            | BodyError::UnknownContentType(_)
            | BodyError::BadParameter { .. } => CallRefusal::BadHeader {
                header: "Content-Type".into(),
                reason: error.to_string(),
            },
            other => CallRefusal::BadBody(other.to_string()),
        })?;
        let headers = read_headers(headers)?;
        let target =
            path.canonical().len() + query_string(&query).map_or(0, |query| query.len() + 1);
        if target > MAX_TARGET_BYTES {
            return Err(CallRefusal::BadPath(crate::rules::PathError::TooLong(
                target,
            )));
        }
        let call = CanonicalCall {
            method: method.to_string(),
            sent_path: sent_path.to_string(),
            path,
            query,
            headers,
            body: read,
        };
        call.refuse_merged_names()?;
        Ok(call)
    }

    /// Frameworks merge the query and the body's top-level names into one set of parameters
    /// (PHP's `$_REQUEST`, Go's `r.FormValue`, Express's `req.param`, Laravel's `input()`) and
    /// disagree on which wins; and method-override middleware reads `_method` from a body. A body
    /// name that is also a query name (in any spelling of case), or that overrides the method, is
    /// refused: the rules check the query and the method, and the upstream would act on the body.
    fn refuse_merged_names(&self) -> Result<(), CallRefusal> {
        let query: std::collections::HashSet<String> = self
            .query
            .iter()
            .map(|(name, _)| json::fold(name))
            .collect();
        for name in self.body_names() {
            let folded = json::fold(name);
            if folded == "_method" {
                return Err(CallRefusal::BadBody(format!(
                    "the body names {name:?}, which method-override middleware reads as the method to run; the method is the request's own"
                )));
            }
            if query.contains(&folded) {
                return Err(CallRefusal::BadBody(format!(
                    "the body names {name:?}, which is also a query parameter: frameworks merge the two and disagree on which wins; send it in one place"
                )));
            }
        }
        Ok(())
    }

    /// The names at the top of the body: a form's pairs, a JSON object's members.
    pub fn body_names(&self) -> Vec<&str> {
        match &self.body {
            Body::Form(pairs) => pairs.iter().map(|(name, _)| name.as_str()).collect(),
            Body::Json {
                value: Value::Object(object),
                ..
            } => object.keys().map(String::as_str).collect(),
            _ => Vec::new(),
        }
    }

    /// What was asked, for refusals and their records: `GET /items?state=open`.
    pub fn asked(&self) -> String {
        let mut asked = format!("{} {}", self.method, self.sent_path);
        if let Some(query) = query_string(&self.query) {
            asked.push('?');
            asked.push_str(&query);
        }
        asked
    }
}

/// A request body as the gateway read it, and as the upstream will receive it.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    Empty,
    /// `application/json` or `application/<name>+json`: I-JSON with no case-folded names.
    Json {
        media_type: String,
        value: Value,
    },
    /// `application/x-www-form-urlencoded`: `name=value` pairs, in the order sent.
    Form(Vec<(String, String)>),
    /// `text/plain`, UTF-8.
    Text(String),
    /// `application/octet-stream`: bytes the gateway does not interpret (and no person can read).
    Bytes(Vec<u8>),
}

/// Why a body cannot be read as one canonical call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("the request has a body but no Content-Type; send one of {ACCEPTED}")]
    NoContentType,
    #[error("Content-Type {0:?} is not one the gateway reads; send one of {ACCEPTED}")]
    UnknownContentType(String),
    #[error("Content-Type {given:?}: {reason}")]
    BadParameter { given: String, reason: String },
    #[error(
        "the request carries {0} Content-Type headers; send one, so every server reads the same type"
    )]
    RepeatedHeader(usize),
    #[error("{0}")]
    Json(JsonError),
    #[error(
        "the body is JSON sent as {0}, which some servers read as JSON anyway: send it as application/json (or an application/*+json type), where it is read by JSON's rules"
    )]
    JsonUnderAnotherType(String),
    #[error("the form body is refused: {0}")]
    Form(String),
    #[error("the text body is refused: {0}")]
    Text(String),
}

impl Body {
    /// Reads `bytes` as the type `content_types` names (every Content-Type header the request
    /// carried).
    pub fn read(content_types: &[&str], bytes: &[u8]) -> Result<Body, BodyError> {
        let content_type = match content_types {
            [] if bytes.is_empty() => return Ok(Body::Empty),
            [] => return Err(BodyError::NoContentType),
            [one] => *one,
            several => return Err(BodyError::RepeatedHeader(several.len())),
        };
        let media_type = media_type(content_type)?;
        if bytes.is_empty() {
            return Ok(Body::Empty);
        }
        let read = match media_type.as_str() {
            "application/x-www-form-urlencoded" => read_form(bytes).map(Body::Form)?,
            "text/plain" => read_text(bytes).map(Body::Text)?,
            "application/octet-stream" => Body::Bytes(bytes.to_vec()),
            _ => {
                return json::parse_strict(bytes)
                    .map(|value| Body::Json { media_type, value })
                    .map_err(BodyError::Json);
            }
        };
        // Some servers read a body as JSON whatever its type says (and skip a byte order mark):
        // JSON travels as JSON, under a JSON type, where it is read by JSON's rules.
        let unmarked = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        if serde_json::from_slice::<serde::de::IgnoredAny>(unmarked).is_ok() {
            return Err(BodyError::JsonUnderAnotherType(media_type));
        }
        Ok(read)
    }

    /// The Content-Type the upstream receives, set by the gateway.
    pub fn content_type(&self) -> Option<String> {
        match self {
            Body::Empty => None,
            Body::Json { media_type, .. } => Some(media_type.clone()),
            Body::Form(_) => Some("application/x-www-form-urlencoded".into()),
            Body::Text(_) => Some("text/plain; charset=utf-8".into()),
            Body::Bytes(_) => Some("application/octet-stream".into()),
        }
    }

    /// The bytes the upstream receives.
    pub fn bytes(&self) -> Vec<u8> {
        match self {
            Body::Empty => Vec::new(),
            Body::Json { value, .. } => json::canonical(value),
            Body::Form(pairs) => pairs
                .iter()
                .map(|(name, value)| {
                    format!("{}={}", encode_component(name), encode_component(value))
                })
                .collect::<Vec<_>>()
                .join("&")
                .into_bytes(),
            Body::Text(text) => text.clone().into_bytes(),
            Body::Bytes(bytes) => bytes.clone(),
        }
    }

    /// The parsed JSON, for a JSON body.
    pub fn json(&self) -> Option<&Value> {
        match self {
            Body::Json { value, .. } => Some(value),
            _ => None,
        }
    }

    /// The body as a person reads it, whole: pretty JSON, one form pair per line, the text's lines.
    /// `None` for bytes the gateway does not read (they cannot be shown to a person). Distinct
    /// bodies of one type render distinctly.
    pub fn render(&self) -> Option<String> {
        match self {
            Body::Empty => Some(String::new()),
            Body::Json { value, .. } => Some(json::render(value)),
            Body::Form(pairs) => Some(
                pairs
                    .iter()
                    .map(|(name, value)| {
                        format!(
                            "{} = {}",
                            json::render(&Value::from(name.as_str())),
                            json::render(&Value::from(value.as_str()))
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n"),
            ),
            // Text holds no character that needs escaping (see `read_text`), so its lines are
            // shown as they are.
            Body::Text(text) => Some(text.clone()),
            Body::Bytes(_) => None,
        }
    }
}

/// The media type of a Content-Type, lowercased, when it is one the gateway reads: parameters
/// other than `charset=utf-8` are refused (a server could decode by them).
pub fn media_type(content_type: &str) -> Result<String, BodyError> {
    let mut parts = content_type.split(';');
    let media_type = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
    let known = matches!(
        media_type.as_str(),
        "application/json"
            | "application/x-www-form-urlencoded"
            | "text/plain"
            | "application/octet-stream"
    ) || media_type
        .strip_prefix("application/")
        .and_then(|subtype| subtype.strip_suffix("+json"))
        .is_some_and(|name| {
            !name.is_empty()
                && name
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || b".-_".contains(&byte))
                // Servers that match a type by its start would read these as another type.
                && !PREFIX_READ.iter().any(|other| name.starts_with(other))
        });
    if !known {
        return Err(BodyError::UnknownContentType(content_type.to_string()));
    }
    let mut charset_seen = false;
    for parameter in parts
        .map(str::trim)
        .filter(|parameter| !parameter.is_empty())
    {
        let (name, value) = parameter.split_once('=').unwrap_or((parameter, ""));
        let value = value.trim().trim_matches('"');
        let refused = |reason: &str| BodyError::BadParameter {
            given: content_type.to_string(),
            reason: reason.to_string(),
        };
        if !name.trim().eq_ignore_ascii_case("charset") {
            return Err(refused(
                "parameters other than charset=utf-8 are refused: a server could read the body by them",
            ));
        }
        if charset_seen {
            return Err(refused("charset is given twice"));
        }
        charset_seen = true;
        if !value.eq_ignore_ascii_case("utf-8") || media_type == "application/octet-stream" {
            return Err(refused(
                "the body must be UTF-8 (charset=utf-8, or no charset); other charsets decode differently",
            ));
        }
    }
    Ok(media_type)
}

/// A form body in the subset every mainstream decoder reads alike: `name=value` pairs (`+` a
/// space, as forms encode it), names without `[`, `]`, `.` or spaces (PHP and `qs` turn those
/// into arrays, objects or other names), no name twice in any spelling of case, at most
/// [`MAX_FORM_PAIRS`] pairs, no control characters.
fn read_form(bytes: &[u8]) -> Result<Vec<(String, String)>, BodyError> {
    let text = std::str::from_utf8(bytes).map_err(|_| BodyError::Form("it is not UTF-8".into()))?;
    let mut pairs = Vec::new();
    let mut names = std::collections::HashSet::new();
    for part in text.split('&') {
        if pairs.len() == MAX_FORM_PAIRS {
            return Err(BodyError::Form(format!(
                "it has more than {MAX_FORM_PAIRS} pairs (decoders stop reading there and drop the rest)"
            )));
        }
        let (name, value) = part
            .split_once('=')
            .ok_or_else(|| BodyError::Form(format!("{:?} is not a name=value pair", cut(part))))?;
        let decode = |text: &str| {
            percent_decode(&text.replace('+', " ")).map_err(|_| {
                BodyError::Form(format!("{:?} has an invalid percent-encoding", cut(text)))
            })
        };
        let (name, value) = (decode(name)?, decode(value)?);
        if name.is_empty() || name.contains(['[', ']', '.', ' ']) {
            return Err(BodyError::Form(format!(
                "the name {name:?} is empty or has '[', ']', '.' or a space, which PHP and Express's qs read as arrays, objects or another name"
            )));
        }
        if name.chars().any(char::is_control) {
            return Err(BodyError::Form(format!(
                "the name {name:?} has a control character"
            )));
        }
        if !names.insert(json::fold(&name)) {
            return Err(BodyError::Form(format!(
                "the name {name:?} is given more than once (or in another spelling of case); servers read repeats differently"
            )));
        }
        pairs.push((name, value));
    }
    Ok(pairs)
}

/// A text body a person can read as it is: UTF-8, with no control character but line feeds and
/// tabs, and none of the characters that disguise text (see
/// [`crate::approval::is_disguising`]).
fn read_text(bytes: &[u8]) -> Result<String, BodyError> {
    let text = std::str::from_utf8(bytes).map_err(|_| BodyError::Text("it is not UTF-8".into()))?;
    if let Some(character) = text.chars().find(|character| {
        !matches!(character, '\n' | '\t') && crate::approval::is_disguising(*character)
    }) {
        return Err(BodyError::Text(format!(
            "it has the character U+{:04X}, which would disguise what a person reads; text bodies carry printable text, line feeds and tabs",
            u32::from(character)
        )));
    }
    Ok(text.to_string())
}

fn cut(text: &str) -> String {
    text.chars().take(64).collect()
}

/// A query string read once: decoded `name=value` pairs in the order sent (`+` is itself, as
/// RFC 3986 reads it), no name twice in any spelling of case. Which names and values are allowed
/// is the rule's to say.
pub fn read_query(raw: Option<&str>) -> Result<Vec<(String, String)>, QueryError> {
    let Some(raw) = raw.filter(|raw| !raw.is_empty()) else {
        return Ok(Vec::new());
    };
    let mut pairs = Vec::new();
    let mut names = std::collections::HashSet::new();
    for part in raw.split('&') {
        let (name, value) = part.split_once('=').ok_or(QueryError::Malformed)?;
        let name = percent_decode(name).map_err(|_| QueryError::Malformed)?;
        let value = percent_decode(value).map_err(|_| QueryError::Malformed)?;
        if !names.insert(json::fold(&name)) {
            return Err(QueryError::Repeated { name });
        }
        pairs.push((name, value));
    }
    Ok(pairs)
}

/// A query as the upstream receives it: `name=value&…`, each part percent-encoded the same way;
/// `None` when there are no pairs.
pub fn query_string(pairs: &[(String, String)]) -> Option<String> {
    (!pairs.is_empty()).then(|| {
        pairs
            .iter()
            .map(|(name, value)| format!("{}={}", encode_component(name), encode_component(value)))
            .collect::<Vec<_>>()
            .join("&")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(content_type: &str, body: &str) -> Result<Body, BodyError> {
        Body::read(&[content_type], body.as_bytes())
    }

    #[test]
    fn json_types_are_read_as_json_and_forwarded_under_their_own_type() {
        let body = read(
            "Application/Merge-Patch+JSON; charset=UTF-8",
            r#"{"b": 1, "a": [true]}"#,
        )
        .unwrap();
        assert_eq!(
            body.content_type().as_deref(),
            Some("application/merge-patch+json")
        );
        assert_eq!(body.bytes(), br#"{"a":[true],"b":1}"#);
        assert!(matches!(
            read("application/vnd.api+json", r#"{"id": "a", "id": "b"}"#),
            Err(BodyError::Json(JsonError::RepeatedKey(_)))
        ));
    }

    #[test]
    fn unknown_types_charsets_and_parameters_are_refused() {
        assert!(matches!(
            read("application/xml", "<a/>"),
            Err(BodyError::UnknownContentType(_))
        ));
        assert!(matches!(
            read("text/json", "{}"),
            Err(BodyError::UnknownContentType(_))
        ));
        assert!(matches!(
            read("application/json; charset=utf-16", "{}"),
            Err(BodyError::BadParameter { .. })
        ));
        assert!(matches!(
            read("application/json; boundary=x", "{}"),
            Err(BodyError::BadParameter { .. })
        ));
        assert!(matches!(
            Body::read(&[], b"{}"),
            Err(BodyError::NoContentType)
        ));
        assert!(matches!(
            Body::read(
                &["application/json", "application/x-www-form-urlencoded"],
                b"{}"
            ),
            Err(BodyError::RepeatedHeader(2))
        ));
        assert_eq!(Body::read(&[], b""), Ok(Body::Empty));
    }

    #[test]
    fn forms_are_read_in_the_subset_every_decoder_agrees_on() {
        let body = read(
            "application/x-www-form-urlencoded",
            "volume_id=v+1&note=a%26b",
        )
        .unwrap();
        assert_eq!(
            body,
            Body::Form(vec![
                ("volume_id".into(), "v 1".into()),
                ("note".into(), "a&b".into())
            ])
        );
        assert_eq!(body.bytes(), b"volume_id=v%201&note=a%26b");
        for refused in [
            "a=1&a=2", "a=1&A=2", "a[b]=1", "a.b=1", "a%20b=1", "novalue", "a=%ZZ", "a%00=1",
        ] {
            assert!(
                matches!(
                    read("application/x-www-form-urlencoded", refused),
                    Err(BodyError::Form(_))
                ),
                "{refused}"
            );
        }
        let many: Vec<String> = (0..=MAX_FORM_PAIRS)
            .map(|index| format!("k{index}=v"))
            .collect();
        assert!(read("application/x-www-form-urlencoded", &many.join("&")).is_err());
    }

    #[test]
    fn a_json_body_sent_as_a_form_is_another_call() {
        let text = r#"{"volumeId":"scratch","note":"x&volumeId=prod"}"#;
        let as_json = read("application/json", text).unwrap();
        assert!(read("application/x-www-form-urlencoded", text).is_err());
        assert_eq!(as_json.content_type().as_deref(), Some("application/json"));
    }

    #[test]
    fn text_is_printable_and_bytes_are_never_shown() {
        assert_eq!(
            read("text/plain", "line one\n\tline two")
                .unwrap()
                .render()
                .unwrap(),
            "line one\n\tline two"
        );
        assert!(matches!(
            read("text/plain", "a\u{202E}b"),
            Err(BodyError::Text(_))
        ));
        assert!(matches!(
            read("text/plain", "a\rb"),
            Err(BodyError::Text(_))
        ));
        assert_eq!(
            Body::read(&["application/octet-stream"], &[0, 1, 2])
                .unwrap()
                .render(),
            None
        );
    }

    #[test]
    fn json_under_another_type_meets_json_s_rules() {
        for content_type in [
            "text/plain",
            "application/octet-stream",
            "application/x-www-form-urlencoded",
        ] {
            for body in [
                r#"{"a": 1, "A": 2}"#,
                r#"{"a": "="}"#,
                "\u{FEFF}{\"_method\": \"DELETE\"}",
                "42",
            ] {
                assert!(
                    matches!(
                        read(content_type, body),
                        Err(BodyError::JsonUnderAnotherType(_)
                            | BodyError::Form(_)
                            | BodyError::Text(_))
                    ),
                    "{content_type} {body}"
                );
            }
        }
        assert!(read("text/plain", "deploy the {shop} service").is_ok());
        for prefixed in [
            "application/x-www-form-urlencoded+json",
            "application/octet-stream+json",
            "application/graphql+json",
        ] {
            assert!(
                matches!(read(prefixed, "{}"), Err(BodyError::UnknownContentType(_))),
                "{prefixed}"
            );
        }
        assert!(read("application/json-patch+json", "[]").is_ok());
    }

    fn call(
        query: &str,
        content_type: &str,
        body: &str,
        headers: &[(&str, &str)],
    ) -> Result<CanonicalCall, CallRefusal> {
        let headers: Vec<(String, &[u8])> = headers
            .iter()
            .map(|(name, value)| (name.to_string(), value.as_bytes()))
            .collect();
        CanonicalCall::read(
            "POST",
            "/deploy",
            crate::rules::check_path("/deploy").unwrap(),
            Some(query),
            &headers,
            &[content_type],
            body.as_bytes(),
        )
    }

    #[test]
    fn a_body_name_that_is_also_a_query_name_or_overrides_the_method_is_refused() {
        let form = "application/x-www-form-urlencoded";
        assert!(call("env=staging", form, "note=ok", &[]).is_ok());
        for body in ["env=production", "Env=production", "_method=DELETE"] {
            assert!(
                matches!(
                    call("env=staging", form, body, &[]),
                    Err(CallRefusal::BadBody(_))
                ),
                "{body}"
            );
        }
        assert!(matches!(
            call(
                "env=staging",
                "application/json",
                r#"{"ENV": "production"}"#,
                &[]
            ),
            Err(CallRefusal::BadBody(_))
        ));
        assert!(call("env=staging", "application/json", r#"[{"env": "x"}]"#, &[]).is_ok());
    }

    #[test]
    fn forwarded_headers_are_read_once_as_text() {
        let read = call(
            "",
            "application/json",
            "{}",
            &[("X-Api-Version", "2023-01-01")],
        )
        .unwrap();
        assert_eq!(
            read.headers,
            [("x-api-version".to_string(), "2023-01-01".to_string())]
        );
        assert!(matches!(
            call(
                "",
                "application/json",
                "{}",
                &[("if-match", "a"), ("If-Match", "b")]
            ),
            Err(CallRefusal::BadHeader { .. })
        ));
        assert!(matches!(
            call("", "application/json", "{}", &[("if-match", "a\u{7f}")]),
            Err(CallRefusal::BadHeader { .. })
        ));
    }

    #[test]
    fn queries_keep_no_name_twice() {
        assert_eq!(
            read_query(Some("state=open&labels=a+b")).unwrap(),
            vec![
                ("state".into(), "open".into()),
                ("labels".into(), "a+b".into())
            ]
        );
        assert!(matches!(
            read_query(Some("a=1&A=2")),
            Err(QueryError::Repeated { .. })
        ));
        assert_eq!(
            query_string(&read_query(Some("q=a+b&x=%41")).unwrap()).as_deref(),
            Some("q=a%2Bb&x=A")
        );
    }

    proptest::proptest! {
        #[test]
        fn a_form_reads_back_as_itself(pairs in proptest::collection::btree_map("[a-z_]{1,6}", "[ -~]{0,8}", 0..6)) {
            let body = Body::Form(pairs.into_iter().collect());
            let bytes = body.bytes();
            let again = Body::read(&["application/x-www-form-urlencoded"], &bytes);
            if !bytes.is_empty() {
                proptest::prop_assert_eq!(again.unwrap(), body);
            }
        }
    }
}
