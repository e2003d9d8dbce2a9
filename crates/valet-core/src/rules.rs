//! What a scope lets a call through the gateway do: allow rules of method, path pattern and
//! GraphQL fields, and the path pattern language (`*` one segment, `**` the rest, `{param}` a
//! segment that must equal the grant's parameter of that name).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// One `[[scope.allow]]` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowRule {
    /// Position in the scope's list, for denials and audit records (`allow[2]`).
    pub index: usize,
    /// Uppercase methods; never empty.
    pub methods: BTreeSet<String>,
    pub path: PathPattern,
    /// Present for GraphQL endpoints: the top-level fields each operation type may use.
    pub graphql: Option<GraphqlAllow>,
    /// Largest request body accepted, in bytes.
    pub max_body: u64,
    /// Calls one grant may make through this rule.
    pub max_calls: Option<u64>,
    /// When set, each call needs a person's approval of that exact call.
    pub approval: Option<crate::approval::ApprovalPolicy>,
    /// The query parameters the rule allows, each with the values it may take. Any other
    /// parameter is refused; none is allowed unless listed.
    pub query: BTreeMap<String, ValueRule>,
}

/// Bodies larger than this are refused unless a rule says otherwise.
pub const DEFAULT_MAX_BODY: u64 = 1024 * 1024;

/// Allowed top-level fields per operation type. Subscriptions are never allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GraphqlAllow {
    pub query: BTreeSet<String>,
    pub mutation: BTreeSet<String>,
    /// Constraints on arguments, by `field.argument[.key…]` (`customDomainCreate.input.projectId`),
    /// checked on every call of the field with variables resolved.
    pub arguments: BTreeMap<ArgumentPath, ValueRule>,
}

/// Where an argument constraint applies: a top-level field's name and the path into its
/// arguments (`input.environmentId` is the `environmentId` key of the `input` argument).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ArgumentPath {
    pub field: String,
    pub path: Vec<String>,
}

impl ArgumentPath {
    /// Parses `field.argument[.key…]`.
    pub fn parse(text: &str) -> Option<ArgumentPath> {
        let mut parts = text.split('.');
        let field = parts.next()?.to_string();
        let path: Vec<String> = parts.map(str::to_string).collect();
        let name_like = |name: &str| {
            !name.is_empty()
                && name
                    .chars()
                    .all(|character| character.is_ascii_alphanumeric() || character == '_')
        };
        (name_like(&field) && !path.is_empty() && path.iter().all(|part| name_like(part)))
            .then_some(ArgumentPath { field, path })
    }
}

impl fmt::Display for ArgumentPath {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}.{}", self.field, self.path.join("."))
    }
}

/// What values a query parameter or an argument may take.
#[derive(Debug, Clone)]
pub enum ValueRule {
    /// Exactly this value.
    Exact(String),
    /// One of these values.
    OneOf(BTreeSet<String>),
    /// A value the whole of which matches this pattern.
    Pattern(regex::Regex),
    /// Equal to the grant's parameter of this name (`"{project}"` in config).
    Param(String),
}

impl PartialEq for ValueRule {
    fn eq(&self, other: &ValueRule) -> bool {
        self.to_string() == other.to_string()
    }
}

impl Eq for ValueRule {}

impl ValueRule {
    /// Whether `value` is allowed for a grant with `params`.
    pub fn permits(&self, value: &str, params: &BTreeMap<String, String>) -> bool {
        match self {
            ValueRule::Exact(expected) => value == expected,
            ValueRule::OneOf(values) => values.contains(value),
            ValueRule::Pattern(pattern) => pattern.is_match(value),
            ValueRule::Param(name) => params.get(name).is_some_and(|bound| bound == value),
        }
    }

    /// The grant parameter the rule binds, if it binds one.
    pub fn param(&self) -> Option<&str> {
        match self {
            ValueRule::Param(name) => Some(name),
            _ => None,
        }
    }
}

impl fmt::Display for ValueRule {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ValueRule::Exact(value) => write!(formatter, "{value:?}"),
            ValueRule::OneOf(values) => write!(
                formatter,
                "one of [{}]",
                values.iter().cloned().collect::<Vec<_>>().join(", ")
            ),
            ValueRule::Pattern(pattern) => {
                let source = pattern.as_str();
                let source = source
                    .strip_prefix("^(?:")
                    .and_then(|inner| inner.strip_suffix(")$"))
                    .unwrap_or(source);
                write!(formatter, "matching {source}")
            }
            ValueRule::Param(name) => write!(formatter, "the grant's {{{name}}}"),
        }
    }
}

impl AllowRule {
    /// Whether method and path match, with `{param}` segments bound to `params`.
    pub fn matches(
        &self,
        method: &str,
        segments: &[String],
        params: &BTreeMap<String, String>,
    ) -> bool {
        self.methods.contains(method) && self.path.matches(segments, params)
    }
}

impl AllowRule {
    /// The grant's counter for this rule (`rule_calls` key) and its limit.
    pub fn counter(&self) -> crate::grant::RuleCounter {
        crate::grant::RuleCounter {
            key: self.index.to_string(),
            label: self.to_string(),
            max_calls: self.max_calls,
        }
    }
}

impl fmt::Display for AllowRule {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let methods: Vec<&str> = self.methods.iter().map(String::as_str).collect();
        write!(
            formatter,
            "allow[{}] {} {}",
            self.index,
            methods.join("|"),
            self.path
        )
    }
}

/// A parsed path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    source: String,
    segments: Vec<PatternSegment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PatternSegment {
    Literal(String),
    /// `*`: exactly one segment, any value.
    Any,
    /// `**`: the rest of the path, zero or more segments. Only last.
    Rest,
    /// `{name}`: one segment equal to the grant's parameter `name`.
    Param(String),
}

/// Why a path pattern is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("must start with '/'")]
    NotAbsolute,
    #[error("'**' may only be the last segment")]
    RestNotLast,
    #[error(
        "segment {segment:?} mixes a placeholder with other text; a segment is a literal, '*', '**' or one '{{param}}'"
    )]
    MixedSegment { segment: String },
    #[error("has an empty segment ('//'); paths are matched segment by segment")]
    EmptySegment,
    #[error("segment {segment:?} is '.' or '..'; patterns match normalised paths only")]
    DotSegment { segment: String },
}

impl PathPattern {
    /// The pattern as written in the config.
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn parse(source: &str) -> Result<PathPattern, PatternError> {
        let rest = source.strip_prefix('/').ok_or(PatternError::NotAbsolute)?;
        let mut segments = Vec::new();
        let parts: Vec<&str> = if rest.is_empty() {
            Vec::new()
        } else {
            rest.split('/').collect()
        };
        for (position, part) in parts.iter().enumerate() {
            let segment = match *part {
                "" => return Err(PatternError::EmptySegment),
                "." | ".." => {
                    return Err(PatternError::DotSegment {
                        segment: part.to_string(),
                    });
                }
                "*" => PatternSegment::Any,
                "**" if position + 1 == parts.len() => PatternSegment::Rest,
                "**" => return Err(PatternError::RestNotLast),
                part if part.starts_with('{') && part.ends_with('}') && part.len() > 2 => {
                    let name = &part[1..part.len() - 1];
                    if name.contains(['{', '}', '*']) {
                        return Err(PatternError::MixedSegment {
                            segment: part.to_string(),
                        });
                    }
                    PatternSegment::Param(name.to_string())
                }
                part if part.contains(['{', '}', '*']) => {
                    return Err(PatternError::MixedSegment {
                        segment: part.to_string(),
                    });
                }
                part => PatternSegment::Literal(part.to_string()),
            };
            segments.push(segment);
        }
        Ok(PathPattern {
            source: source.to_string(),
            segments,
        })
    }

    /// The `{param}` names the pattern uses.
    pub fn params(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|segment| match segment {
            PatternSegment::Param(name) => Some(name.as_str()),
            _ => None,
        })
    }

    /// Whether the (decoded, normalised) path segments match.
    pub fn matches(&self, segments: &[String], params: &BTreeMap<String, String>) -> bool {
        let mut remaining = segments;
        for pattern in &self.segments {
            match pattern {
                PatternSegment::Rest => return true,
                _ if remaining.is_empty() => return false,
                PatternSegment::Any => {}
                PatternSegment::Literal(literal) => {
                    if remaining[0] != *literal {
                        return false;
                    }
                }
                PatternSegment::Param(name) => {
                    if params.get(name) != Some(&remaining[0]) {
                        return false;
                    }
                }
            }
            remaining = &remaining[1..];
        }
        remaining.is_empty()
    }
}

impl fmt::Display for PathPattern {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.source)
    }
}

/// Why a request path is refused before any rule is consulted. Each names the rule of path
/// syntax it breaks and why: a path that common servers read in different ways is refused, never
/// forwarded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path has an empty segment ('//'), which upstreams read in different ways")]
    EmptySegment,
    #[error(
        "the path has a segment of only dots ('.', '..', '...', also when percent-encoded), which would change which resource it names"
    )]
    DotSegment,
    #[error(
        "the path has an encoded '/' or '\\' (%2F, %5C), which upstreams read in different ways"
    )]
    EncodedSeparator,
    #[error(
        "the path has a ';' (also %3B): servlet containers and others cut matrix parameters off a segment, so the upstream would read another path"
    )]
    MatrixParameter,
    #[error(
        "the path has an encoded '%' (%25): a server that decodes twice would read another path"
    )]
    DoubleEncoding,
    #[error(
        "the path has a character outside ASCII (also percent-encoded): servers normalise Unicode in different ways"
    )]
    NonAscii,
    #[error(
        "a path segment ends in a dot or a space: some servers strip it, so the upstream would read another path"
    )]
    TrailingDotOrSpace,
    #[error(
        "the path has a backslash, a control character, a character URLs do not allow unencoded, or an invalid percent-encoding"
    )]
    BadCharacter,
    #[error(
        "the path and query are {0} bytes as forwarded; at most {max} are (the upstream receives them with the credential, and stays far below the limits servers set, so no limit an agent reaches depends on the credential)",
        max = crate::canonical::MAX_TARGET_BYTES
    )]
    TooLong(usize),
}

/// A path that passed every check: its decoded segments (what rules match) and the canonical form
/// the upstream receives (re-encoded from the segments, so the upstream reads exactly what was
/// checked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedPath {
    pub segments: Vec<String>,
    trailing_slash: bool,
}

impl CheckedPath {
    /// The path as the upstream receives it.
    pub fn canonical(&self) -> String {
        let mut path = String::from("/");
        path.push_str(
            &self
                .segments
                .iter()
                .map(|segment| encode_component(segment))
                .collect::<Vec<_>>()
                .join("/"),
        );
        if self.trailing_slash && !self.segments.is_empty() {
            path.push('/');
        }
        path
    }
}

/// Checks a raw request path (no query), refusing every path whose meaning could differ between
/// the gateway and the upstream.
pub fn check_path(raw_path: &str) -> Result<CheckedPath, PathError> {
    let rest = raw_path.strip_prefix('/').unwrap_or(raw_path);
    if rest.is_empty() {
        return Ok(CheckedPath {
            segments: Vec::new(),
            trailing_slash: false,
        });
    }
    let mut segments = Vec::new();
    let parts: Vec<&str> = rest.split('/').collect();
    let mut trailing_slash = false;
    for (position, part) in parts.iter().enumerate() {
        if part.is_empty() {
            // A single trailing slash ("/v1/projects/") is common and unambiguous.
            if position + 1 == parts.len() && position > 0 {
                trailing_slash = true;
                continue;
            }
            return Err(PathError::EmptySegment);
        }
        if part.contains('\\') {
            return Err(PathError::BadCharacter);
        }
        if part.contains(';') {
            return Err(PathError::MatrixParameter);
        }
        if !part.bytes().all(is_path_byte) {
            return Err(if part.bytes().any(|byte| byte >= 0x80) {
                PathError::NonAscii
            } else {
                PathError::BadCharacter
            });
        }
        let decoded = percent_decode(part)?;
        if decoded.chars().all(|character| character == '.') {
            return Err(PathError::DotSegment);
        }
        if decoded.contains(['/', '\\']) {
            return Err(PathError::EncodedSeparator);
        }
        if decoded.contains(';') {
            return Err(PathError::MatrixParameter);
        }
        if decoded.contains('%') {
            return Err(PathError::DoubleEncoding);
        }
        if !decoded.is_ascii() {
            return Err(PathError::NonAscii);
        }
        if decoded
            .chars()
            .any(|character| character.is_ascii_control())
        {
            return Err(PathError::BadCharacter);
        }
        if decoded.ends_with(['.', ' ']) {
            return Err(PathError::TrailingDotOrSpace);
        }
        segments.push(decoded);
    }
    Ok(CheckedPath {
        segments,
        trailing_slash,
    })
}

/// Splits a raw request path into decoded segments (see [`check_path`]).
pub fn normalized_segments(raw_path: &str) -> Result<Vec<String>, PathError> {
    check_path(raw_path).map(|path| path.segments)
}

/// Bytes a path segment may carry unencoded (RFC 3986 pchar without `;`), and `%` for escapes.
fn is_path_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric()
        || matches!(
            byte,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b'='
                | b':'
                | b'@'
                | b'%'
        )
}

/// Percent-encodes every byte outside RFC 3986's unreserved set.
pub fn encode_component(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Why a query string is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error(
        "query parameter {name:?} is not allowed by this rule; it allows {allowed} (parameters that are not listed could change what the upstream does: _method, operation overrides)"
    )]
    NotAllowed { name: String, allowed: String },
    #[error("query parameter {name:?} is given more than once; servers read repeats differently")]
    Repeated { name: String },
    #[error("query parameter {name:?} = {value:?} is not allowed; it must be {rule}")]
    ValueNotAllowed {
        name: String,
        value: String,
        rule: String,
    },
    #[error(
        "the query string has a part without '=' or with an invalid percent-encoding; send name=value pairs"
    )]
    Malformed,
    #[error("this route takes no query string: its requests are sent in the body")]
    NotTaken,
}

/// A checked query string: decoded pairs in the order sent, and the canonical form the upstream
/// receives.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckedQuery {
    pub pairs: Vec<(String, String)>,
}

impl CheckedQuery {
    /// `name=value&…`, each part percent-encoded the same way; `None` when there are no pairs.
    pub fn canonical(&self) -> Option<String> {
        crate::canonical::query_string(&self.pairs)
    }
}

/// Checks the pairs of a query string, as the canonical call read them, against the parameters
/// `allowed` names, for a grant with `params`: a name not listed (in any other spelling too) or a
/// value outside its rule is refused.
pub fn check_query(
    pairs: &[(String, String)],
    allowed: &BTreeMap<String, ValueRule>,
    params: &BTreeMap<String, String>,
) -> Result<CheckedQuery, QueryError> {
    let allowed_text = || {
        if allowed.is_empty() {
            "no query parameters".to_string()
        } else {
            allowed
                .iter()
                .map(|(name, rule)| format!("{name} ({rule})"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    for (name, value) in pairs {
        let Some(rule) = allowed.get(name) else {
            return Err(QueryError::NotAllowed {
                name: name.clone(),
                allowed: allowed_text(),
            });
        };
        if value.chars().any(char::is_control) || !rule.permits(value, params) {
            return Err(QueryError::ValueNotAllowed {
                name: name.clone(),
                value: value.clone(),
                rule: rule.to_string(),
            });
        }
    }
    Ok(CheckedQuery {
        pairs: pairs.to_vec(),
    })
}

/// Decodes `%XX` escapes; the result must be UTF-8.
pub(crate) fn percent_decode(text: &str) -> Result<String, PathError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = bytes
                .get(index + 1..index + 3)
                .ok_or(PathError::BadCharacter)?;
            let value = std::str::from_utf8(hex)
                .ok()
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                .ok_or(PathError::BadCharacter)?;
            out.push(value);
            index += 3;
        } else {
            out.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8(out).map_err(|_| PathError::NonAscii)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segments(path: &str) -> Vec<String> {
        normalized_segments(path).unwrap()
    }

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn patterns_match_literals_wildcards_and_bound_params() {
        let pattern = PathPattern::parse("/v1/projects/{project}/services/*").unwrap();
        let bound = params(&[("project", "shop")]);
        assert!(pattern.matches(&segments("/v1/projects/shop/services/web"), &bound));
        assert!(
            !pattern.matches(&segments("/v1/projects/bank/services/web"), &bound),
            "a param must equal the grant's"
        );
        assert!(!pattern.matches(&segments("/v1/projects/shop/services"), &bound));
        assert!(!pattern.matches(&segments("/v1/projects/shop/services/web/logs"), &bound));
        assert!(
            !pattern.matches(&segments("/v1/projects/shop/services/web"), &params(&[])),
            "an unbound param matches nothing"
        );
        let rest = PathPattern::parse("/v1/**").unwrap();
        assert!(rest.matches(&segments("/v1"), &bound));
        assert!(rest.matches(&segments("/v1/a/b/c"), &bound));
        assert!(!rest.matches(&segments("/v2/a"), &bound));
        assert!(
            PathPattern::parse("/")
                .unwrap()
                .matches(&segments("/"), &bound)
        );
    }

    #[test]
    fn bad_patterns_say_what_is_wrong() {
        assert_eq!(PathPattern::parse("v1"), Err(PatternError::NotAbsolute));
        assert_eq!(PathPattern::parse("/**/x"), Err(PatternError::RestNotLast));
        assert!(matches!(
            PathPattern::parse("/a{b}"),
            Err(PatternError::MixedSegment { .. })
        ));
        assert_eq!(PathPattern::parse("/a//b"), Err(PatternError::EmptySegment));
        assert!(matches!(
            PathPattern::parse("/a/../b"),
            Err(PatternError::DotSegment { .. })
        ));
    }

    #[test]
    fn paths_that_could_be_read_two_ways_are_refused() {
        assert_eq!(
            normalized_segments("/v1//projects"),
            Err(PathError::EmptySegment)
        );
        assert_eq!(
            normalized_segments("/v1/../admin"),
            Err(PathError::DotSegment)
        );
        assert_eq!(
            normalized_segments("/v1/%2e%2E/admin"),
            Err(PathError::DotSegment)
        );
        assert_eq!(normalized_segments("/v1/./x"), Err(PathError::DotSegment));
        assert_eq!(
            normalized_segments("/v1/a%2Fb"),
            Err(PathError::EncodedSeparator)
        );
        assert_eq!(
            normalized_segments("/v1/a%5cb"),
            Err(PathError::EncodedSeparator)
        );
        assert_eq!(
            normalized_segments("/v1/a\\b"),
            Err(PathError::BadCharacter)
        );
        assert_eq!(normalized_segments("/v1/%zz"), Err(PathError::BadCharacter));
        assert_eq!(normalized_segments("/v1/%00"), Err(PathError::BadCharacter));
        assert_eq!(
            normalized_segments("/v1/caf%C3%A9/"),
            Err(PathError::NonAscii)
        );
        assert_eq!(normalized_segments("/v1/café"), Err(PathError::NonAscii));
        assert_eq!(
            normalized_segments("/v1/a;jsessionid=x"),
            Err(PathError::MatrixParameter)
        );
        assert_eq!(
            normalized_segments("/v1/a%3bx"),
            Err(PathError::MatrixParameter)
        );
        assert_eq!(
            normalized_segments("/v1/%252e%252e/x"),
            Err(PathError::DoubleEncoding)
        );
        assert_eq!(normalized_segments("/v1/.../x"), Err(PathError::DotSegment));
        assert_eq!(
            normalized_segments("/v1/admin./x"),
            Err(PathError::TrailingDotOrSpace)
        );
        assert_eq!(
            normalized_segments("/v1/admin%20/x"),
            Err(PathError::TrailingDotOrSpace)
        );
        assert_eq!(
            normalized_segments("/v1/a\"b"),
            Err(PathError::BadCharacter)
        );
        assert_eq!(
            normalized_segments("/v1/projects/"),
            Ok(vec!["v1".to_string(), "projects".to_string()])
        );
    }

    #[test]
    fn the_upstream_receives_the_path_re_encoded_from_what_was_checked() {
        assert_eq!(check_path("/v1/%61bc/").unwrap().canonical(), "/v1/abc/");
        assert_eq!(
            check_path("/v1/a:b@c+d").unwrap().canonical(),
            "/v1/a%3Ab%40c%2Bd"
        );
        assert_eq!(check_path("/").unwrap().canonical(), "/");
    }

    /// A raw query read as the canonical call reads it, then checked against `allowed`.
    fn query(
        raw: &str,
        allowed: &BTreeMap<String, ValueRule>,
        bound: &BTreeMap<String, String>,
    ) -> Result<CheckedQuery, QueryError> {
        crate::canonical::read_query(Some(raw))
            .and_then(|pairs| check_query(&pairs, allowed, bound))
    }

    #[test]
    fn query_parameters_are_allowed_only_by_name_with_their_values() {
        let allowed = BTreeMap::from([
            (
                "page".to_string(),
                ValueRule::Pattern(regex::Regex::new("^(?:[0-9]{1,4})$").unwrap()),
            ),
            ("project".to_string(), ValueRule::Param("project".into())),
        ]);
        let bound = params(&[("project", "shop")]);
        let checked = query("page=2&project=shop", &allowed, &bound).unwrap();
        assert_eq!(checked.canonical().as_deref(), Some("page=2&project=shop"));
        assert!(matches!(
            query("_method=DELETE", &allowed, &bound),
            Err(QueryError::NotAllowed { .. })
        ));
        assert!(matches!(
            query("page=1&page=2", &allowed, &bound),
            Err(QueryError::Repeated { .. })
        ));
        assert!(matches!(
            query("project=bank", &allowed, &bound),
            Err(QueryError::ValueNotAllowed { .. })
        ));
        assert!(matches!(
            query("page", &allowed, &bound),
            Err(QueryError::Malformed)
        ));
        assert!(matches!(
            query("page=1", &BTreeMap::new(), &bound),
            Err(QueryError::NotAllowed { .. })
        ));
        // '+' is itself, and is re-encoded so no server reads it as a space.
        let plus = BTreeMap::from([("q".to_string(), ValueRule::Exact("a+b".into()))]);
        assert_eq!(
            query("q=a+b", &plus, &bound)
                .unwrap()
                .canonical()
                .as_deref(),
            Some("q=a%2Bb")
        );
    }

    mod properties {
        use proptest::prelude::*;

        use super::super::*;

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

            /// Any path: refused or checked, never a panic; a checked path's canonical form reads
            /// back as the same segments, so what the upstream receives is what was checked.
            #[test]
            fn a_checked_path_reads_back_as_itself(raw in "(/[a-zA-Z0-9._~%;:@!$&'()*+,=\\\\ -]{0,12}){0,6}/?") {
                if let Ok(checked) = check_path(&raw) {
                    let again = check_path(&checked.canonical()).expect("the canonical form passes");
                    prop_assert_eq!(&again.segments, &checked.segments);
                    prop_assert_eq!(again.canonical(), checked.canonical());
                    for segment in &checked.segments {
                        prop_assert!(!segment.chars().all(|character| character == '.'));
                        prop_assert!(segment.is_ascii() && !segment.contains([';', '%', '/', '\\']));
                    }
                }
            }

            /// Any bytes: refused or checked, never a panic.
            #[test]
            fn any_path_is_refused_or_checked(raw in "\\PC{0,64}") {
                let _ = check_path(&raw);
            }

            /// A checked query string's canonical form reads back as the same pairs.
            #[test]
            fn a_checked_query_reads_back_as_itself(pairs in prop::collection::vec(("[a-c]", "[ -~]{0,8}"), 0..4)) {
                let allowed: BTreeMap<String, ValueRule> = ["a", "b", "c"]
                    .into_iter()
                    .map(|name| (name.to_string(), ValueRule::Pattern(regex::Regex::new("^(?:[ -~]*)$").unwrap())))
                    .collect();
                let raw = pairs
                    .iter()
                    .map(|(name, value)| format!("{name}={}", encode_component(value)))
                    .collect::<Vec<_>>()
                    .join("&");
                if let Ok(checked) = super::query(&raw, &allowed, &BTreeMap::new()) {
                    let canonical = checked.canonical().unwrap_or_default();
                    let again = super::query(&canonical, &allowed, &BTreeMap::new()).unwrap();
                    prop_assert_eq!(again, checked);
                }
            }
        }
    }
}
