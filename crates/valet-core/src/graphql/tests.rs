//! The GraphQL check: what is allowed, every way a refused field can be dressed up, the canonical
//! request the upstream receives, argument rules, and the bound on work.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::rules::{ArgumentPath, ValueRule};

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
        arguments: BTreeMap::new(),
    }
}

fn bound() -> GraphqlAllow {
    let mut allow = railway();
    allow.arguments.insert(
        ArgumentPath::parse("customDomainCreate.input.environmentId").unwrap(),
        ValueRule::Param("environment_id".into()),
    );
    allow.arguments.insert(
        ArgumentPath::parse("project.id").unwrap(),
        ValueRule::Param("project_id".into()),
    );
    allow
}

fn params() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("environment_id".to_string(), "env-staging".to_string()),
        ("project_id".to_string(), "p-shop".to_string()),
    ])
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
    let persisted =
        serde_json::json!({"extensions": {"persistedQuery": {"version": 1, "sha256Hash": "abc"}}});
    assert!(matches!(
        check(persisted.to_string().as_bytes(), &allow),
        Err(GraphqlDenial::UnexpectedKey { .. })
    ));
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

#[test]
fn repeated_and_case_variant_keys_are_refused() {
    let allow = railway();
    let repeated = br#"{"query": "{ projects { id } }", "query": "mutation { volumeDelete(volumeId: \"v\") }"}"#;
    assert!(matches!(
        check(repeated, &allow),
        Err(GraphqlDenial::RepeatedKey { .. })
    ));
    let cased = br#"{"query": "{ projects { id } }", "Query": "mutation { volumeDelete(volumeId: \"v\") }"}"#;
    assert!(matches!(
        check(cased, &allow),
        Err(GraphqlDenial::RepeatedKey { .. })
    ));
    let nested = br#"{"query": "mutation($i: DomainInput!) { customDomainCreate(input: $i) { id } }", "variables": {"i": {"environmentId": "a", "environmentId": "b"}}}"#;
    assert!(matches!(
        check(nested, &allow),
        Err(GraphqlDenial::RepeatedKey { .. })
    ));
    let argument = body("{ project(id: \"a\", id: \"b\") { id } }");
    assert!(matches!(
        check(&argument, &allow),
        Err(GraphqlDenial::RepeatedKey { .. })
    ));
    assert!(matches!(
        check(
            br#"{"query": "{ projects { id } }", "debug": true}"#,
            &allow
        ),
        Err(GraphqlDenial::UnexpectedKey { .. })
    ));
    assert!(matches!(
        check(
            br#"{"query": "query A { projects { id } }", "operationName": "B"}"#,
            &allow
        ),
        Err(GraphqlDenial::UnknownOperationName(_))
    ));
}

#[test]
fn the_upstream_receives_only_the_request_that_was_checked() {
    let sent = br#"{"variables": {"id": "p-shop"}, "query": "query P($id: String!) { project(id: $id) { id } }", "operationName": "P"}"#;
    let checked = check_body(sent, &bound(), &params()).unwrap();
    assert_eq!(
        String::from_utf8(checked.body.clone()).unwrap(),
        r#"{"operationName":"P","query":"query P($id: String!) {\n  project(id: $id) {\n    id\n  }\n}","variables":{"id":"p-shop"}}"#
    );
    assert_eq!(
        checked.rendering,
        "document:\n  query P($id: String!) {\n    project(id: $id) {\n      id\n    }\n  }\noperationName: \"P\"\nvariables:\n  {\n    \"id\": \"p-shop\"\n  }"
    );
    assert_eq!(checked.operations, ["query P"]);
    assert_eq!(
        checked.calls[0].to_string(),
        "query project(id: \"p-shop\")"
    );
}

#[test]
fn arguments_are_checked_with_variables_resolved_even_inside_input_objects() {
    let allow = bound();
    let mutation = |variables: serde_json::Value| {
        serde_json::json!({
            "query": "mutation M($input: DomainInput!) { customDomainCreate(input: $input) { id } }",
            "variables": variables,
        })
        .to_string()
        .into_bytes()
    };
    let staging = mutation(
        serde_json::json!({"input": {"environmentId": "env-staging", "projectId": "p-shop", "domain": "a.test"}}),
    );
    assert!(check_body(&staging, &allow, &params()).is_ok());
    let production = mutation(
        serde_json::json!({"input": {"environmentId": "env-prod", "projectId": "p-shop", "domain": "a.test"}}),
    );
    let error = check_body(&production, &allow, &params()).unwrap_err();
    assert!(
        error.to_string().contains("input.environmentId") && error.to_string().contains("env-prod"),
        "{error}"
    );
    let missing =
        mutation(serde_json::json!({"input": {"projectId": "p-shop", "domain": "a.test"}}));
    assert!(
        check_body(&missing, &allow, &params())
            .unwrap_err()
            .to_string()
            .contains("missing")
    );
    // An inline literal, an alias and a second call in the same document are each checked.
    let aliased = body(
        "mutation { a: customDomainCreate(input: {environmentId: \"env-staging\", projectId: \"p\", domain: \"x\"}) { id } b: customDomainCreate(input: {environmentId: \"env-prod\", projectId: \"p\", domain: \"y\"}) { id } }",
    );
    assert!(
        check_body(&aliased, &allow, &params())
            .unwrap_err()
            .to_string()
            .contains("b: customDomainCreate")
    );
    // A default value counts when the variable is not given.
    let defaulted = serde_json::json!({"query": "query Q($id: String = \"p-other\") { project(id: $id) { id } }"});
    assert!(check_body(defaulted.to_string().as_bytes(), &allow, &params()).is_err());
}

#[test]
fn fragments_that_fan_out_are_refused_within_the_budget() {
    // Each fragment spreads the next one twice: 2^30 fields if expanded.
    let mut query = String::from("query { ...F0 }");
    for level in 0..30 {
        query.push_str(&format!(
            " fragment F{level} on Query {{ ...F{next} ...F{next} }}",
            next = level + 1
        ));
    }
    query.push_str(" fragment F30 on Query { projects { id } }");
    let started = std::time::Instant::now();
    assert_eq!(
        check(&body(&query), &railway()),
        Err(GraphqlDenial::TooLarge)
    );
    // Not a timing assertion on speed: a budget, not minutes, ends the check.
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}

fn field_name() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "project",
        "projects",
        "customDomainCreate",
        "volumeDelete",
    ])
    .prop_map(String::from)
}

fn argument_value() -> impl Strategy<Value = String> {
    "[a-z0-9-]{0,12}"
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    /// parse → check → canonical body → parse again gives the same calls.
    #[test]
    fn the_canonical_request_reads_as_the_checked_one(
        fields in prop::collection::vec((field_name(), argument_value(), any::<bool>()), 1..5),
        mutation in any::<bool>(),
        operation_name in prop::option::of("[A-Z][a-z]{0,6}"),
    ) {
        let mut allow = railway();
        allow.mutation.insert("volumeDelete".into());
        allow.query.extend(["customDomainCreate".to_string(), "volumeDelete".to_string()]);
        allow.mutation.extend(["project".to_string(), "projects".to_string()]);
        let selections: Vec<String> = fields
            .iter()
            .enumerate()
            .map(|(index, (field, _, aliased))| {
                let alias = if *aliased { format!("a{index}: ") } else { String::new() };
                format!("{alias}{field}(id: $v{index}) {{ id }}")
            })
            .collect();
        let definitions: Vec<String> =
            (0..fields.len()).map(|index| format!("$v{index}: String")).collect();
        let kind = if mutation { "mutation" } else { "query" };
        let name = operation_name.clone().unwrap_or_default();
        let query = format!("{kind} {name}({}) {{ {} }}", definitions.join(", "), selections.join(" "));
        let variables: serde_json::Map<String, serde_json::Value> = fields
            .iter()
            .enumerate()
            .map(|(index, (_, value, _))| (format!("v{index}"), serde_json::Value::from(value.clone())))
            .collect();
        let mut request = serde_json::json!({"query": query, "variables": variables});
        if let Some(name) = &operation_name {
            request["operationName"] = serde_json::Value::from(name.clone());
        }
        let first = check_body(request.to_string().as_bytes(), &allow, &BTreeMap::new()).unwrap();
        let second = check_body(&first.body, &allow, &BTreeMap::new()).unwrap();
        prop_assert_eq!(&first.calls, &second.calls);
        prop_assert_eq!(&first.body, &second.body);
        prop_assert_eq!(first.calls.len(), fields.len());
    }

    /// Any bytes at all: a clear refusal or a check, never a panic.
    #[test]
    fn any_body_is_refused_or_checked_without_panicking(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = check_body(&bytes, &railway(), &BTreeMap::new());
    }

    /// Any GraphQL-looking text in a request: refused or checked, never a panic.
    #[test]
    fn any_document_is_refused_or_checked_without_panicking(query in "[ -~]{0,200}") {
        let _ = check_body(&body(&query), &railway(), &BTreeMap::new());
    }
}

#[test]
fn documents_are_printed_canonically_for_the_upstream_and_the_approver() {
    let allow = railway();
    let printed = |query: &str| {
        let checked = check_body(
            serde_json::json!({ "query": query }).to_string().as_bytes(),
            &allow,
            &params(),
        )
        .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&checked.body).unwrap();
        body["query"].as_str().unwrap().to_string()
    };
    // Comments, commas and whitespace go; block strings become strings of the same value; every
    // character that could disguise a string is escaped.
    let sent = "# delete nothing\nmutation   Do ,{ customDomainCreate(input: {domain: \"\"\"a\n  b\"\"\", note: \"x\\u202Ey\u{202E}\"}) @include(if: true) { id , domain } }";
    assert_eq!(
        printed(sent),
        "mutation Do {\n  customDomainCreate(input: {domain: \"a\\nb\", note: \"x\\u202Ey\\u202E\"}) @include(if: true) {\n    id\n    domain\n  }\n}"
    );
    let fragments = "query Q($a: [ID!]! = [\"x\"]) { ...F ... on Query @skip(if: false) { projects { id } } } fragment F on Query { p: project(id: $a) { name } }";
    assert_eq!(
        printed(fragments),
        "query Q($a: [ID!]! = [\"x\"]) {\n  ...F\n  ... on Query @skip(if: false) {\n    projects {\n      id\n    }\n  }\n}\n\nfragment F on Query {\n  p: project(id: $a) {\n    name\n  }\n}"
    );
}

proptest! {
    /// Printing is canonical: a printed document prints as itself, and asks exactly what the
    /// document it was printed from asks.
    #[test]
    fn a_printed_document_prints_as_itself_and_asks_the_same(
        fields in prop::collection::vec(("[a-c]{1,3}", "[a-z \\\\\"\u{202E}\u{200B}\n]{0,6}", any::<bool>()), 1..4),
        comment in "[a-z ]{0,8}",
    ) {
        let mut query = format!("# {comment}\nquery {{");
        for (alias, text, block) in &fields {
            let argument = if *block {
                format!("\"\"\"{}\"\"\"", text.replace(['\\', '"'], ""))
            } else {
                serde_json::to_string(text).unwrap()
            };
            query.push_str(&format!(" {alias}: project(id: {argument}) {{ id }},"));
        }
        query.push('}');
        let allow = railway();
        let body = serde_json::json!({ "query": query }).to_string();
        let Ok(first) = check_body(body.as_bytes(), &allow, &params()) else {
            return Ok(());
        };
        let again = check_body(&first.body, &allow, &params()).unwrap();
        prop_assert_eq!(&again.body, &first.body);
        prop_assert_eq!(&again.calls, &first.calls);
        prop_assert_eq!(&again.rendering, &first.rendering);
    }
}
