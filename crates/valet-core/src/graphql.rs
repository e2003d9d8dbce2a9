//! The GraphQL check: parse the exact bytes that will be forwarded, split batches, and require
//! every top-level field of every operation — aliases resolved to field names, fragments and
//! inline fragments expanded — to be allowed. `operationName` is never trusted: every operation
//! in the document counts, whichever one the upstream would run.

use std::collections::{BTreeMap, BTreeSet};

use crate::rules::GraphqlAllow;
use apollo_parser::{Parser, cst};

/// Largest batch accepted in one request.
pub const MAX_BATCH: usize = 32;
const MAX_FRAGMENT_DEPTH: usize = 32;
const RECURSION_LIMIT: usize = 128;
const TOKEN_LIMIT: usize = 20_000;

/// One field the request asks for, e.g. `mutation volumeDelete`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct AskedField {
    pub operation: &'static str,
    pub field: String,
}

impl std::fmt::Display for AskedField {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{} {}", self.operation, self.field)
    }
}

/// Why a GraphQL request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GraphqlDenial {
    #[error(
        "the body is not a GraphQL request: {0}; send JSON {{\"query\": \"...\"}} or a batch array of them"
    )]
    NotARequest(String),
    #[error(
        "the request carries no query document (persisted-query hashes are not accepted: the gateway must see what runs)"
    )]
    NoDocument,
    #[error("the GraphQL document does not parse: {0}")]
    Unparseable(String),
    #[error("the document defines {0}; only operations and fragments are accepted")]
    NotExecutable(&'static str),
    #[error("subscriptions are not allowed through the gateway")]
    Subscription,
    #[error("fragment {0:?} is used but not defined")]
    UnknownFragment(String),
    #[error("fragment {0:?} spreads itself (directly or through others)")]
    FragmentCycle(String),
    #[error("fragments nest deeper than {MAX_FRAGMENT_DEPTH}")]
    TooDeep,
    #[error("{field} is not allowed; allowed: {allowed}")]
    FieldNotAllowed { field: AskedField, allowed: String },
    #[error("a batch of {0} operations is above the limit of {MAX_BATCH}")]
    BatchTooLarge(usize),
}

impl GraphqlDenial {
    /// What was asked, when the denial is about one field.
    pub fn asked(&self) -> Option<String> {
        match self {
            GraphqlDenial::FieldNotAllowed { field, .. } => Some(field.to_string()),
            GraphqlDenial::Subscription => Some("subscription".to_string()),
            _ => None,
        }
    }
}

/// Checks a request body against the allowed fields; returns every field asked for.
pub fn check(body: &[u8], allow: &GraphqlAllow) -> Result<Vec<AskedField>, GraphqlDenial> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|error| GraphqlDenial::NotARequest(error.to_string()))?;
    let requests = match value {
        serde_json::Value::Array(items) if items.is_empty() => {
            return Err(GraphqlDenial::NotARequest("an empty batch".into()));
        }
        serde_json::Value::Array(items) if items.len() > MAX_BATCH => {
            return Err(GraphqlDenial::BatchTooLarge(items.len()));
        }
        serde_json::Value::Array(items) => items,
        object @ serde_json::Value::Object(_) => vec![object],
        _ => {
            return Err(GraphqlDenial::NotARequest(
                "not a JSON object or array".into(),
            ));
        }
    };
    let mut asked = BTreeSet::new();
    for request in requests {
        let serde_json::Value::Object(fields) = request else {
            return Err(GraphqlDenial::NotARequest(
                "a batch item is not an object".into(),
            ));
        };
        let query = match fields.get("query") {
            Some(serde_json::Value::String(query)) if !query.trim().is_empty() => query,
            Some(serde_json::Value::String(_)) | None | Some(serde_json::Value::Null) => {
                return Err(GraphqlDenial::NoDocument);
            }
            Some(_) => {
                return Err(GraphqlDenial::NotARequest(
                    "\"query\" is not a string".into(),
                ));
            }
        };
        asked.extend(fields_of_document(query)?);
    }
    for field in &asked {
        let allowed = match field.operation {
            "query" => field.field == "__typename" || allow.query.contains(&field.field),
            "mutation" => field.field == "__typename" || allow.mutation.contains(&field.field),
            _ => false,
        };
        if !allowed {
            let list = if field.operation == "mutation" {
                &allow.mutation
            } else {
                &allow.query
            };
            let allowed = if list.is_empty() {
                format!("no {} fields", field.operation)
            } else {
                format!(
                    "{} [{}]",
                    field.operation,
                    list.iter().cloned().collect::<Vec<_>>().join(", ")
                )
            };
            return Err(GraphqlDenial::FieldNotAllowed {
                field: field.clone(),
                allowed,
            });
        }
    }
    Ok(asked.into_iter().collect())
}

/// The top-level fields of every operation in one document.
fn fields_of_document(query: &str) -> Result<BTreeSet<AskedField>, GraphqlDenial> {
    let tree = Parser::new(query)
        .recursion_limit(RECURSION_LIMIT)
        .token_limit(TOKEN_LIMIT)
        .parse();
    if let Some(error) = tree.errors().next() {
        return Err(GraphqlDenial::Unparseable(format!(
            "{} at byte {}",
            error.message(),
            error.index()
        )));
    }
    let document = tree.document();
    let mut fragments: BTreeMap<String, cst::SelectionSet> = BTreeMap::new();
    let mut operations = Vec::new();
    for definition in document.definitions() {
        match definition {
            cst::Definition::OperationDefinition(operation) => operations.push(operation),
            cst::Definition::FragmentDefinition(fragment) => {
                let name = fragment
                    .fragment_name()
                    .and_then(|name| name.name())
                    .map(|name| name.text().to_string())
                    .unwrap_or_default();
                if let Some(selection_set) = fragment.selection_set() {
                    fragments.insert(name, selection_set);
                }
            }
            _ => return Err(GraphqlDenial::NotExecutable("type-system definitions")),
        }
    }
    if operations.is_empty() {
        return Err(GraphqlDenial::NoDocument);
    }
    let mut asked = BTreeSet::new();
    for operation in operations {
        let kind = match operation.operation_type() {
            None => "query",
            Some(kind) if kind.query_token().is_some() => "query",
            Some(kind) if kind.mutation_token().is_some() => "mutation",
            Some(_) => return Err(GraphqlDenial::Subscription),
        };
        let Some(selection_set) = operation.selection_set() else {
            continue;
        };
        let mut names = BTreeSet::new();
        collect_fields(&selection_set, &fragments, &mut Vec::new(), &mut names)?;
        asked.extend(names.into_iter().map(|field| AskedField {
            operation: kind,
            field,
        }));
    }
    Ok(asked)
}

/// Field names of a selection set, with fragment spreads and inline fragments expanded.
fn collect_fields(
    selection_set: &cst::SelectionSet,
    fragments: &BTreeMap<String, cst::SelectionSet>,
    expanding: &mut Vec<String>,
    names: &mut BTreeSet<String>,
) -> Result<(), GraphqlDenial> {
    if expanding.len() > MAX_FRAGMENT_DEPTH {
        return Err(GraphqlDenial::TooDeep);
    }
    for selection in selection_set.selections() {
        match selection {
            cst::Selection::Field(field) => {
                // The field's name counts, never its alias.
                if let Some(name) = field.name() {
                    names.insert(name.text().to_string());
                }
            }
            cst::Selection::InlineFragment(inline) => {
                if let Some(inner) = inline.selection_set() {
                    expanding.push("(inline)".to_string());
                    collect_fields(&inner, fragments, expanding, names)?;
                    expanding.pop();
                }
            }
            cst::Selection::FragmentSpread(spread) => {
                let name = spread
                    .fragment_name()
                    .and_then(|name| name.name())
                    .map(|name| name.text().to_string())
                    .unwrap_or_default();
                if expanding.contains(&name) {
                    return Err(GraphqlDenial::FragmentCycle(name));
                }
                let inner = fragments
                    .get(&name)
                    .ok_or_else(|| GraphqlDenial::UnknownFragment(name.clone()))?;
                expanding.push(name);
                collect_fields(inner, fragments, expanding, names)?;
                expanding.pop();
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn railway() -> GraphqlAllow {
        GraphqlAllow {
            query: ["project", "projects"]
                .into_iter()
                .map(String::from)
                .collect(),
            mutation: ["customDomainCreate"]
                .into_iter()
                .map(String::from)
                .collect(),
        }
    }

    fn body(query: &str) -> Vec<u8> {
        serde_json::json!({ "query": query })
            .to_string()
            .into_bytes()
    }

    fn denied_field(result: Result<Vec<AskedField>, GraphqlDenial>) -> String {
        match result {
            Err(GraphqlDenial::FieldNotAllowed { field, .. }) => field.to_string(),
            other => panic!("expected a field denial, got {other:?}"),
        }
    }

    #[test]
    fn allowed_queries_and_mutations_pass_and_report_their_fields() {
        let asked = check(&body("query { project(id: \"p\") { name } } mutation M { customDomainCreate(input: {}) { id } }"), &railway()).unwrap();
        let rendered: Vec<String> = asked.iter().map(ToString::to_string).collect();
        assert_eq!(rendered, ["mutation customDomainCreate", "query project"]);
        assert!(
            check(
                &body("{ __typename projects { edges { node { id } } } }"),
                &railway()
            )
            .is_ok()
        );
    }

    #[test]
    fn a_mutation_not_listed_is_denied_however_it_is_dressed_up() {
        let allow = railway();
        assert_eq!(
            denied_field(check(
                &body("mutation { volumeDelete(volumeId: \"v\") }"),
                &allow
            )),
            "mutation volumeDelete"
        );
        // An alias that looks allowed.
        assert_eq!(
            denied_field(check(
                &body("mutation { customDomainCreate: volumeDelete(volumeId: \"v\") }"),
                &allow
            )),
            "mutation volumeDelete"
        );
        // A fragment and an inline fragment.
        let fragment = "mutation { ...F } fragment F on Mutation { volumeDelete(volumeId: \"v\") }";
        assert_eq!(
            denied_field(check(&body(fragment), &allow)),
            "mutation volumeDelete"
        );
        let inline = "mutation { ... on Mutation { ... { environmentDelete(id: \"e\") } } }";
        assert_eq!(
            denied_field(check(&body(inline), &allow)),
            "mutation environmentDelete"
        );
        // operationName pointing at the harmless operation of two.
        let two = serde_json::json!({"query": "query Safe { project(id: \"p\") { id } } mutation Evil { volumeDelete(volumeId: \"v\") }", "operationName": "Safe"});
        assert_eq!(
            denied_field(check(two.to_string().as_bytes(), &allow)),
            "mutation volumeDelete"
        );
        // A batch whose second item is the destructive one.
        let batch = serde_json::json!([{"query": "{ project(id: \"p\") { id } }"}, {"query": "mutation { volumeDelete(volumeId: \"v\") }"}]);
        assert_eq!(
            denied_field(check(batch.to_string().as_bytes(), &allow)),
            "mutation volumeDelete"
        );
    }

    #[test]
    fn what_cannot_be_checked_is_denied() {
        let allow = railway();
        assert!(matches!(
            check(b"not json", &allow),
            Err(GraphqlDenial::NotARequest(_))
        ));
        assert!(matches!(
            check(&body("mutation { volumeDelete("), &allow),
            Err(GraphqlDenial::Unparseable(_))
        ));
        let persisted = serde_json::json!({"extensions": {"persistedQuery": {"version": 1, "sha256Hash": "abc"}}});
        assert_eq!(
            check(persisted.to_string().as_bytes(), &allow),
            Err(GraphqlDenial::NoDocument)
        );
        assert_eq!(
            check(&body("subscription { project { id } }"), &allow),
            Err(GraphqlDenial::Subscription)
        );
        assert!(matches!(
            check(&body("{ ...Missing }"), &allow),
            Err(GraphqlDenial::UnknownFragment(_))
        ));
        assert!(matches!(
            check(
                &body("{ ...A } fragment A on Query { ...B } fragment B on Query { ...A }"),
                &allow
            ),
            Err(GraphqlDenial::FragmentCycle(_))
        ));
        assert_eq!(
            check(&body("{ __schema { types { name } } }"), &allow).map_err(|error| error.asked()),
            Err(Some("query __schema".into()))
        );
        assert!(matches!(
            check(&body("type Query { x: Int }"), &allow),
            Err(GraphqlDenial::NotExecutable(_))
        ));
        let huge: Vec<serde_json::Value> = (0..40)
            .map(|_| serde_json::json!({"query": "{ project { id } }"}))
            .collect();
        assert_eq!(
            check(
                serde_json::Value::Array(huge).to_string().as_bytes(),
                &allow
            ),
            Err(GraphqlDenial::BatchTooLarge(40))
        );
    }

    #[test]
    fn introspection_passes_only_when_listed() {
        let mut allow = railway();
        allow.query.insert("__schema".into());
        assert!(check(&body("{ __schema { types { name } } }"), &allow).is_ok());
    }
}
