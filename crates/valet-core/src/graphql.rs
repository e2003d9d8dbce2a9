//! The GraphQL check: read the request the canonical call parsed, check every top-level field of
//! every operation — aliases resolved to field names, fragments and inline fragments expanded,
//! arguments resolved with their variables — and build the canonical request the upstream
//! receives instead, its document printed by [`print`]. `operationName` is never trusted: every
//! operation in the document counts, whichever one the upstream would run. The work per request is
//! bounded (tokens, nesting, expanded selections).

pub mod print;

use std::collections::{BTreeMap, BTreeSet};

use apollo_parser::{Parser, cst};
use serde_json::{Map, Value};

use crate::rules::{ArgumentPath, GraphqlAllow};

/// Largest batch accepted in one request.
pub const MAX_BATCH: usize = 32;
/// Most selections one document may expand to (fragments counted every time they are spread).
pub const MAX_EXPANDED_SELECTIONS: usize = 10_000;
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

/// One top-level field as it will execute: alias, name, and every argument with variables
/// substituted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldCall {
    pub operation: &'static str,
    pub alias: Option<String>,
    pub field: String,
    pub arguments: Map<String, Value>,
}

impl std::fmt::Display for FieldCall {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{} ", self.operation)?;
        if let Some(alias) = &self.alias {
            write!(formatter, "{alias}: ")?;
        }
        write!(formatter, "{}", self.field)?;
        if !self.arguments.is_empty() {
            let arguments: Vec<String> = self
                .arguments
                .iter()
                .map(|(name, value)| format!("{name}: {value}"))
                .collect();
            write!(formatter, "({})", arguments.join(", "))?;
        }
        Ok(())
    }
}

/// A request that passed the check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedGraphql {
    /// The body the upstream receives: canonical JSON built from what was checked, each document
    /// printed canonically.
    pub body: Vec<u8>,
    /// Every field asked for, once each, for rules and audit records.
    pub fields: Vec<AskedField>,
    /// Every top-level field call, in document order, for people to read.
    pub calls: Vec<FieldCall>,
    /// The operations of the request (`query Name`, `mutation`), for audit records.
    pub operations: Vec<String>,
    /// The request as a person reads it, whole: each printed document, its operation name and
    /// its variables.
    pub rendering: String,
}

impl CheckedGraphql {
    /// How many top-level fields will execute (aliases counted; `__typename` is not work): what
    /// counts against a rule's `max_calls`.
    pub fn executed_fields(&self) -> u64 {
        self.calls
            .iter()
            .filter(|call| call.field != "__typename")
            .count()
            .max(1) as u64
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
    #[error(
        "the document expands to more than {MAX_EXPANDED_SELECTIONS} selections (fragments counted each time they are spread); split it"
    )]
    TooLarge,
    #[error("{field} is not allowed; allowed: {allowed}")]
    FieldNotAllowed { field: AskedField, allowed: String },
    #[error("{call} is not allowed: argument {argument} must be {rule}, and here it is {given}")]
    ArgumentNotAllowed {
        call: String,
        argument: String,
        rule: String,
        given: String,
    },
    #[error("a batch of {0} operations is above the limit of {MAX_BATCH}")]
    BatchTooLarge(usize),
    #[error(
        "the request object has {key:?}; a GraphQL request carries only \"query\", \"operationName\" and \"variables\"{extensions}"
    )]
    UnexpectedKey {
        key: String,
        extensions: &'static str,
    },
    #[error(
        "the JSON has key {key:?} more than once (or in two spellings of case): servers read repeated keys differently"
    )]
    RepeatedKey { key: String },
    #[error("operationName {0:?} names no operation of the document")]
    UnknownOperationName(String),
}

impl GraphqlDenial {
    /// What was asked, when the denial is about one field.
    pub fn asked(&self) -> Option<String> {
        match self {
            GraphqlDenial::FieldNotAllowed { field, .. } => Some(field.to_string()),
            GraphqlDenial::ArgumentNotAllowed { call, .. } => Some(call.clone()),
            GraphqlDenial::Subscription => Some("subscription".to_string()),
            _ => None,
        }
    }
}

/// Checks a GraphQL request (the JSON value the canonical call read) against `allow` for a grant
/// with `params`, and builds the canonical request the upstream receives.
pub fn check_request(
    value: &Value,
    allow: &GraphqlAllow,
    params: &BTreeMap<String, String>,
) -> Result<CheckedGraphql, GraphqlDenial> {
    let (requests, batch) = match value {
        Value::Array(items) if items.is_empty() => {
            return Err(GraphqlDenial::NotARequest("an empty batch".into()));
        }
        Value::Array(items) if items.len() > MAX_BATCH => {
            return Err(GraphqlDenial::BatchTooLarge(items.len()));
        }
        Value::Array(items) => (items.iter().collect::<Vec<_>>(), true),
        object @ Value::Object(_) => (vec![object], false),
        _ => {
            return Err(GraphqlDenial::NotARequest(
                "not a JSON object or array".into(),
            ));
        }
    };
    let mut canonical = Vec::with_capacity(requests.len());
    let mut renderings = Vec::with_capacity(requests.len());
    let mut calls = Vec::new();
    let mut operations = Vec::new();
    let mut budget = MAX_EXPANDED_SELECTIONS;
    for (index, request) in requests.into_iter().enumerate() {
        let Value::Object(fields) = request else {
            return Err(GraphqlDenial::NotARequest(
                "a batch item is not an object".into(),
            ));
        };
        let mut request = GraphqlRequest::from_object(fields.clone())?;
        let document = read_document(&request, &mut budget)?;
        operations.extend(document.operations);
        calls.extend(document.calls);
        request.query = document.printed;
        let rendering = request.render();
        renderings.push(if batch {
            format!("request {} of the batch:\n{rendering}", index + 1)
        } else {
            rendering
        });
        canonical.push(request.canonical());
    }
    let asked: BTreeSet<AskedField> = calls
        .iter()
        .map(|call| AskedField {
            operation: call.operation,
            field: call.field.clone(),
        })
        .collect();
    for field in &asked {
        check_field_allowed(field, allow)?;
    }
    for call in &calls {
        check_arguments(call, allow, params)?;
    }
    let body = if batch {
        Value::Array(canonical)
    } else {
        canonical.into_iter().next().unwrap_or(Value::Null)
    };
    Ok(CheckedGraphql {
        body: crate::json::canonical(&body),
        fields: asked.into_iter().collect(),
        calls,
        operations,
        rendering: renderings.join("\n"),
    })
}

/// Reads `body` the way the canonical call reads a JSON body, then checks it: for tests, the
/// policy explainer and benchmarks, which start from bytes.
pub fn check_body(
    body: &[u8],
    allow: &GraphqlAllow,
    params: &BTreeMap<String, String>,
) -> Result<CheckedGraphql, GraphqlDenial> {
    let value = crate::json::parse_strict(body).map_err(|error| match error {
        crate::json::JsonError::RepeatedKey(key) => GraphqlDenial::RepeatedKey { key },
        other => GraphqlDenial::NotARequest(other.to_string()),
    })?;
    check_request(&value, allow, params)
}

/// Checks a request body against the allowed fields; returns every field asked for.
pub fn check(body: &[u8], allow: &GraphqlAllow) -> Result<Vec<AskedField>, GraphqlDenial> {
    check_body(body, allow, &BTreeMap::new()).map(|checked| checked.fields)
}

/// One GraphQL-over-HTTP request object, as checked.
struct GraphqlRequest {
    query: String,
    operation_name: Option<String>,
    variables: Map<String, Value>,
    variables_given: bool,
}

impl GraphqlRequest {
    fn from_object(fields: Map<String, Value>) -> Result<GraphqlRequest, GraphqlDenial> {
        let mut request = GraphqlRequest {
            query: String::new(),
            operation_name: None,
            variables: Map::new(),
            variables_given: false,
        };
        for (key, value) in fields {
            match (key.as_str(), value) {
                ("query", Value::String(query)) if !query.trim().is_empty() => {
                    request.query = query
                }
                ("query", Value::String(_) | Value::Null) => return Err(GraphqlDenial::NoDocument),
                ("query", _) => {
                    return Err(GraphqlDenial::NotARequest(
                        "\"query\" is not a string".into(),
                    ));
                }
                ("operationName", Value::String(name)) => request.operation_name = Some(name),
                ("operationName", Value::Null) => {}
                ("operationName", _) => {
                    return Err(GraphqlDenial::NotARequest(
                        "\"operationName\" is not a string".into(),
                    ));
                }
                ("variables", Value::Object(variables)) => {
                    request.variables = variables;
                    request.variables_given = true;
                }
                ("variables", Value::Null) => {}
                ("variables", _) => {
                    return Err(GraphqlDenial::NotARequest(
                        "\"variables\" is not an object".into(),
                    ));
                }
                ("extensions", _) => {
                    return Err(GraphqlDenial::UnexpectedKey {
                        key,
                        extensions: " (extensions such as persisted queries are not forwarded: the gateway forwards only what it checked)",
                    });
                }
                _ => {
                    return Err(GraphqlDenial::UnexpectedKey {
                        key,
                        extensions: "",
                    });
                }
            }
        }
        if request.query.is_empty() {
            return Err(GraphqlDenial::NoDocument);
        }
        Ok(request)
    }

    /// The request as a person reads it: the printed document, then its operation name and
    /// variables when given.
    fn render(&self) -> String {
        let mut lines = vec!["document:".to_string()];
        lines.extend(self.query.lines().map(|line| format!("  {line}")));
        if let Some(name) = &self.operation_name {
            lines.push(format!(
                "operationName: {}",
                crate::json::render(&Value::from(name.as_str()))
            ));
        }
        if self.variables_given {
            lines.push("variables:".to_string());
            let variables = crate::json::render(&Value::Object(self.variables.clone()));
            lines.extend(variables.lines().map(|line| format!("  {line}")));
        }
        lines.join("\n")
    }

    /// The request the upstream receives.
    fn canonical(self) -> Value {
        let mut object = Map::new();
        object.insert("query".into(), Value::String(self.query));
        if let Some(name) = self.operation_name {
            object.insert("operationName".into(), Value::String(name));
        }
        if self.variables_given {
            object.insert("variables".into(), Value::Object(self.variables));
        }
        Value::Object(object)
    }
}

/// What one document asks, and the document printed canonically.
struct Document {
    calls: Vec<FieldCall>,
    operations: Vec<String>,
    printed: String,
}

fn read_document(request: &GraphqlRequest, budget: &mut usize) -> Result<Document, GraphqlDenial> {
    let tree = Parser::new(&request.query)
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
    let mut definitions = Vec::new();
    for definition in document.definitions() {
        match definition {
            cst::Definition::OperationDefinition(operation) => definitions.push(operation),
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
    if definitions.is_empty() {
        return Err(GraphqlDenial::NoDocument);
    }
    let mut calls = Vec::new();
    let mut operations = Vec::new();
    let mut names = BTreeSet::new();
    for operation in definitions {
        let kind = match operation.operation_type() {
            None => "query",
            Some(kind) if kind.query_token().is_some() => "query",
            Some(kind) if kind.mutation_token().is_some() => "mutation",
            Some(_) => return Err(GraphqlDenial::Subscription),
        };
        let name = operation.name().map(|name| name.text().to_string());
        operations.push(match &name {
            Some(name) => format!("{kind} {name}"),
            None => kind.to_string(),
        });
        names.extend(name);
        let variables = operation_variables(&operation, &request.variables)?;
        let Some(selection_set) = operation.selection_set() else {
            continue;
        };
        let mut fields = Vec::new();
        collect_fields(
            &selection_set,
            &fragments,
            &mut Vec::new(),
            budget,
            Some(&mut fields),
        )?;
        for field in fields {
            calls.push(field_call(kind, &field, &variables)?);
        }
    }
    if let Some(name) = &request.operation_name
        && !names.contains(name)
    {
        return Err(GraphqlDenial::UnknownOperationName(name.clone()));
    }
    Ok(Document {
        calls,
        operations,
        printed: print::document(&document),
    })
}

/// The values of an operation's variables: given, or their defaults, or null.
fn operation_variables(
    operation: &cst::OperationDefinition,
    given: &Map<String, Value>,
) -> Result<Map<String, Value>, GraphqlDenial> {
    let mut values = Map::new();
    let Some(definitions) = operation.variable_definitions() else {
        return Ok(values);
    };
    for definition in definitions.variable_definitions() {
        let Some(name) = definition
            .variable()
            .and_then(|variable| variable.name())
            .map(|name| name.text().to_string())
        else {
            continue;
        };
        let value = match given.get(&name) {
            Some(value) => value.clone(),
            None => match definition
                .default_value()
                .and_then(|default| default.value())
            {
                Some(default) => literal(&default, &Map::new())?,
                None => Value::Null,
            },
        };
        values.insert(name, value);
    }
    Ok(values)
}

/// Walks a selection set with fragment spreads and inline fragments expanded, counting every
/// selection visited against `budget`. With `fields`, the walk is at the top level of an
/// operation and collects its fields; below them (`None`) it only counts, since nested selections
/// are the upstream's to resolve but cost it work too.
fn collect_fields(
    selection_set: &cst::SelectionSet,
    fragments: &BTreeMap<String, cst::SelectionSet>,
    expanding: &mut Vec<String>,
    budget: &mut usize,
    mut fields: Option<&mut Vec<cst::Field>>,
) -> Result<(), GraphqlDenial> {
    if expanding.len() > MAX_FRAGMENT_DEPTH {
        return Err(GraphqlDenial::TooDeep);
    }
    for selection in selection_set.selections() {
        *budget = budget.checked_sub(1).ok_or(GraphqlDenial::TooLarge)?;
        match selection {
            cst::Selection::Field(field) => {
                if let Some(inner) = field.selection_set() {
                    collect_fields(&inner, fragments, expanding, budget, None)?;
                }
                if let Some(fields) = fields.as_deref_mut() {
                    fields.push(field);
                }
            }
            cst::Selection::InlineFragment(inline) => {
                if let Some(inner) = inline.selection_set() {
                    expanding.push("(inline)".to_string());
                    collect_fields(&inner, fragments, expanding, budget, fields.as_deref_mut())?;
                    expanding.pop();
                }
            }
            cst::Selection::FragmentSpread(spread) => {
                let name = fragment_name(&spread);
                let inner = enter_fragment(&name, fragments, expanding)?;
                collect_fields(inner, fragments, expanding, budget, fields.as_deref_mut())?;
                expanding.pop();
            }
        }
    }
    Ok(())
}

fn fragment_name(spread: &cst::FragmentSpread) -> String {
    spread
        .fragment_name()
        .and_then(|name| name.name())
        .map(|name| name.text().to_string())
        .unwrap_or_default()
}

/// The fragment's selections, after checking it is defined and not already being expanded (the
/// caller pops `expanding` when done).
fn enter_fragment<'a>(
    name: &str,
    fragments: &'a BTreeMap<String, cst::SelectionSet>,
    expanding: &mut Vec<String>,
) -> Result<&'a cst::SelectionSet, GraphqlDenial> {
    if expanding.iter().any(|entered| entered == name) {
        return Err(GraphqlDenial::FragmentCycle(name.to_string()));
    }
    let inner = fragments
        .get(name)
        .ok_or_else(|| GraphqlDenial::UnknownFragment(name.to_string()))?;
    expanding.push(name.to_string());
    Ok(inner)
}

fn field_call(
    operation: &'static str,
    field: &cst::Field,
    variables: &Map<String, Value>,
) -> Result<FieldCall, GraphqlDenial> {
    let mut arguments = Map::new();
    if let Some(list) = field.arguments() {
        for argument in list.arguments() {
            let (Some(name), Some(value)) = (argument.name(), argument.value()) else {
                continue;
            };
            let name = name.text().to_string();
            if arguments.contains_key(&name) {
                return Err(GraphqlDenial::RepeatedKey { key: name });
            }
            arguments.insert(name, literal(&value, variables)?);
        }
    }
    Ok(FieldCall {
        operation,
        alias: field
            .alias()
            .and_then(|alias| alias.name())
            .map(|name| name.text().to_string()),
        // The field's name counts, never its alias.
        field: field
            .name()
            .map(|name| name.text().to_string())
            .unwrap_or_default(),
        arguments,
    })
}

/// A GraphQL value as JSON, with variables substituted.
fn literal(value: &cst::Value, variables: &Map<String, Value>) -> Result<Value, GraphqlDenial> {
    Ok(match value {
        cst::Value::Variable(variable) => {
            let name = variable
                .name()
                .map(|name| name.text().to_string())
                .unwrap_or_default();
            variables.get(&name).cloned().unwrap_or(Value::Null)
        }
        cst::Value::StringValue(text) => Value::String(String::from(text)),
        cst::Value::IntValue(number) => {
            number_of(number.int_token().map(|token| token.text().to_string()))?
        }
        cst::Value::FloatValue(number) => {
            number_of(number.float_token().map(|token| token.text().to_string()))?
        }
        cst::Value::BooleanValue(boolean) => Value::Bool(boolean.true_token().is_some()),
        cst::Value::NullValue(_) => Value::Null,
        cst::Value::EnumValue(name) => Value::String(
            name.name()
                .map(|name| name.text().to_string())
                .unwrap_or_default(),
        ),
        cst::Value::ListValue(list) => Value::Array(
            list.values()
                .map(|item| literal(&item, variables))
                .collect::<Result<_, _>>()?,
        ),
        cst::Value::ObjectValue(object) => {
            let mut fields = Map::new();
            for field in object.object_fields() {
                let (Some(name), Some(value)) = (field.name(), field.value()) else {
                    continue;
                };
                let name = name.text().to_string();
                if fields.contains_key(&name) {
                    return Err(GraphqlDenial::RepeatedKey { key: name });
                }
                fields.insert(name, literal(&value, variables)?);
            }
            Value::Object(fields)
        }
    })
}

fn number_of(text: Option<String>) -> Result<Value, GraphqlDenial> {
    text.and_then(|text| serde_json::from_str::<serde_json::Number>(&text).ok())
        .map(Value::Number)
        .ok_or_else(|| GraphqlDenial::Unparseable("a number is out of range".into()))
}

fn check_field_allowed(field: &AskedField, allow: &GraphqlAllow) -> Result<(), GraphqlDenial> {
    let allowed = match field.operation {
        "query" => field.field == "__typename" || allow.query.contains(&field.field),
        "mutation" => field.field == "__typename" || allow.mutation.contains(&field.field),
        _ => false,
    };
    if allowed {
        return Ok(());
    }
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
    Err(GraphqlDenial::FieldNotAllowed {
        field: field.clone(),
        allowed,
    })
}

/// Every constraint on `call`'s field holds, on its resolved arguments.
fn check_arguments(
    call: &FieldCall,
    allow: &GraphqlAllow,
    params: &BTreeMap<String, String>,
) -> Result<(), GraphqlDenial> {
    for (path, rule) in allow
        .arguments
        .iter()
        .filter(|(path, _)| path.field == call.field)
    {
        let refused = |given: String| GraphqlDenial::ArgumentNotAllowed {
            call: call.to_string(),
            argument: path.path.join("."),
            rule: rule.to_string(),
            given,
        };
        let found = argument_at(&call.arguments, path).map_err(|reason| {
            GraphqlDenial::ArgumentNotAllowed {
                call: call.to_string(),
                argument: path.path.join("."),
                rule: rule.to_string(),
                given: reason,
            }
        })?;
        match found {
            None | Some(Value::Null) => return Err(refused("missing".into())),
            Some(Value::String(text)) if rule.permits(text, params) => {}
            Some(value @ (Value::Number(_) | Value::Bool(_)))
                if rule.permits(&value.to_string(), params) => {}
            Some(value) => return Err(refused(value.to_string())),
        }
    }
    Ok(())
}

/// The value at `path` in a call's arguments. Every object on the way is checked for names a
/// decoder could read as the one the path names (case-folded, outside ASCII): such a name is a
/// refusal, not another argument.
fn argument_at<'a>(
    arguments: &'a Map<String, Value>,
    path: &ArgumentPath,
) -> Result<Option<&'a Value>, String> {
    let mut object = arguments;
    let mut parts = path.path.iter().peekable();
    while let Some(part) = parts.next() {
        crate::json::refuse_lookalike_names(object, std::iter::once(part.as_str()))?;
        let Some(value) = object.get(part) else {
            return Ok(None);
        };
        if parts.peek().is_none() {
            return Ok(Some(value));
        }
        match value.as_object() {
            Some(inner) => object = inner,
            None => return Ok(None),
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests;
