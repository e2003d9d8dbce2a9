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
}

/// Bodies larger than this are refused unless a rule says otherwise.
pub const DEFAULT_MAX_BODY: u64 = 1024 * 1024;

/// Allowed top-level fields per operation type. Subscriptions are never allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GraphqlAllow {
    pub query: BTreeSet<String>,
    pub mutation: BTreeSet<String>,
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

/// Why a request path is refused before any rule is consulted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path has an empty segment ('//'), which upstreams read in different ways")]
    EmptySegment,
    #[error(
        "the path has a '.' or '..' segment (also when percent-encoded), which would change which resource it names"
    )]
    DotSegment,
    #[error(
        "the path has an encoded '/' or '\\' (%2F, %5C), which upstreams read in different ways"
    )]
    EncodedSeparator,
    #[error("the path has a backslash, a control character or an invalid percent-encoding")]
    BadCharacter,
}

/// Splits a raw request path (no query) into decoded segments, refusing every path whose meaning
/// could differ between the gateway and the upstream. A path that passes is forwarded byte for
/// byte as it came, so the rule check and the upstream see the same resource.
pub fn normalized_segments(raw_path: &str) -> Result<Vec<String>, PathError> {
    let rest = raw_path.strip_prefix('/').unwrap_or(raw_path);
    if rest.is_empty() {
        return Ok(Vec::new());
    }
    let mut segments = Vec::new();
    let parts: Vec<&str> = rest.split('/').collect();
    for (position, part) in parts.iter().enumerate() {
        if part.is_empty() {
            // A single trailing slash ("/v1/projects/") is common and unambiguous.
            if position + 1 == parts.len() && position > 0 {
                continue;
            }
            return Err(PathError::EmptySegment);
        }
        if part.contains('\\') {
            return Err(PathError::BadCharacter);
        }
        let decoded = percent_decode(part)?;
        if decoded == "." || decoded == ".." {
            return Err(PathError::DotSegment);
        }
        if decoded.contains(['/', '\\']) {
            return Err(PathError::EncodedSeparator);
        }
        if decoded.chars().any(char::is_control) {
            return Err(PathError::BadCharacter);
        }
        segments.push(decoded);
    }
    Ok(segments)
}

fn percent_decode(text: &str) -> Result<String, PathError> {
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
    String::from_utf8(out).map_err(|_| PathError::BadCharacter)
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
            Ok(vec!["v1".to_string(), "café".to_string()])
        );
    }
}
