//! The canonical printing of a GraphQL document: what the upstream executes and what a person
//! approving reads, the same text. Comments, commas and whitespace go (GraphQL ignores them);
//! every selection is on its own line; strings are written with one escaping — `\"`, `\\`, the
//! short escapes of control characters, and `\uXXXX` for every character that could disguise the
//! text — so two documents print alike only when they execute alike, and a printed document shows
//! a person everything it does. Block strings are printed as ordinary strings of the same value.

use apollo_parser::cst;

/// The document printed canonically; definitions in the order written.
pub fn document(document: &cst::Document) -> String {
    let mut printed = Vec::new();
    for definition in document.definitions() {
        let mut out = String::new();
        match definition {
            cst::Definition::OperationDefinition(operation) => {
                operation_definition(&mut out, &operation)
            }
            cst::Definition::FragmentDefinition(fragment) => {
                fragment_definition(&mut out, &fragment)
            }
            // The check refuses type-system definitions before anything is printed.
            _ => continue,
        }
        printed.push(out);
    }
    printed.join("\n\n")
}

fn operation_definition(out: &mut String, operation: &cst::OperationDefinition) {
    let kind = match operation.operation_type() {
        Some(kind) if kind.mutation_token().is_some() => "mutation",
        Some(kind) if kind.subscription_token().is_some() => "subscription",
        _ => "query",
    };
    out.push_str(kind);
    if let Some(name) = operation.name() {
        out.push(' ');
        out.push_str(&name.text());
    }
    if let Some(definitions) = operation.variable_definitions() {
        let definitions: Vec<String> = definitions
            .variable_definitions()
            .map(|definition| {
                let mut text = String::new();
                if let Some(name) = definition.variable().and_then(|variable| variable.name()) {
                    text.push('$');
                    text.push_str(&name.text());
                }
                text.push_str(": ");
                if let Some(ty) = definition.ty() {
                    type_reference(&mut text, &ty);
                }
                if let Some(default) = definition
                    .default_value()
                    .and_then(|default| default.value())
                {
                    text.push_str(" = ");
                    value(&mut text, &default);
                }
                directives(&mut text, definition.directives());
                text
            })
            .collect();
        if !definitions.is_empty() {
            out.push('(');
            out.push_str(&definitions.join(", "));
            out.push(')');
        }
    }
    directives(out, operation.directives());
    if let Some(selections) = operation.selection_set() {
        out.push(' ');
        selection_set(out, &selections, 0);
    }
}

fn fragment_definition(out: &mut String, fragment: &cst::FragmentDefinition) {
    out.push_str("fragment ");
    if let Some(name) = fragment.fragment_name().and_then(|name| name.name()) {
        out.push_str(&name.text());
    }
    if let Some(name) = fragment
        .type_condition()
        .and_then(|condition| condition.named_type())
        .and_then(|named| named.name())
    {
        out.push_str(" on ");
        out.push_str(&name.text());
    }
    directives(out, fragment.directives());
    if let Some(selections) = fragment.selection_set() {
        out.push(' ');
        selection_set(out, &selections, 0);
    }
}

fn selection_set(out: &mut String, selections: &cst::SelectionSet, depth: usize) {
    out.push_str("{\n");
    for selection in selections.selections() {
        indent(out, depth + 1);
        match selection {
            cst::Selection::Field(field) => {
                if let Some(alias) = field.alias().and_then(|alias| alias.name()) {
                    out.push_str(&alias.text());
                    out.push_str(": ");
                }
                if let Some(name) = field.name() {
                    out.push_str(&name.text());
                }
                arguments(out, field.arguments());
                directives(out, field.directives());
                if let Some(inner) = field.selection_set() {
                    out.push(' ');
                    selection_set(out, &inner, depth + 1);
                }
            }
            cst::Selection::FragmentSpread(spread) => {
                out.push_str("...");
                if let Some(name) = spread.fragment_name().and_then(|name| name.name()) {
                    out.push_str(&name.text());
                }
                directives(out, spread.directives());
            }
            cst::Selection::InlineFragment(inline) => {
                out.push_str("...");
                if let Some(name) = inline
                    .type_condition()
                    .and_then(|condition| condition.named_type())
                    .and_then(|named| named.name())
                {
                    out.push_str(" on ");
                    out.push_str(&name.text());
                }
                directives(out, inline.directives());
                if let Some(inner) = inline.selection_set() {
                    out.push(' ');
                    selection_set(out, &inner, depth + 1);
                }
            }
        }
        out.push('\n');
    }
    indent(out, depth);
    out.push('}');
}

fn indent(out: &mut String, depth: usize) {
    for _ in 0..depth {
        out.push_str("  ");
    }
}

fn arguments(out: &mut String, arguments: Option<cst::Arguments>) {
    let Some(arguments) = arguments else {
        return;
    };
    let printed: Vec<String> = arguments
        .arguments()
        .map(|argument| {
            let mut text = String::new();
            if let Some(name) = argument.name() {
                text.push_str(&name.text());
            }
            text.push_str(": ");
            if let Some(given) = argument.value() {
                value(&mut text, &given);
            }
            text
        })
        .collect();
    if !printed.is_empty() {
        out.push('(');
        out.push_str(&printed.join(", "));
        out.push(')');
    }
}

fn directives(out: &mut String, directives: Option<cst::Directives>) {
    let Some(directives) = directives else {
        return;
    };
    for directive in directives.directives() {
        out.push_str(" @");
        if let Some(name) = directive.name() {
            out.push_str(&name.text());
        }
        arguments(out, directive.arguments());
    }
}

fn type_reference(out: &mut String, ty: &cst::Type) {
    match ty {
        cst::Type::NamedType(named) => {
            if let Some(name) = named.name() {
                out.push_str(&name.text());
            }
        }
        cst::Type::ListType(list) => {
            out.push('[');
            if let Some(inner) = list.ty() {
                type_reference(out, &inner);
            }
            out.push(']');
        }
        cst::Type::NonNullType(non_null) => {
            if let Some(named) = non_null.named_type() {
                type_reference(out, &cst::Type::NamedType(named));
            } else if let Some(list) = non_null.list_type() {
                type_reference(out, &cst::Type::ListType(list));
            }
            out.push('!');
        }
    }
}

fn value(out: &mut String, given: &cst::Value) {
    match given {
        cst::Value::Variable(variable) => {
            out.push('$');
            if let Some(name) = variable.name() {
                out.push_str(&name.text());
            }
        }
        cst::Value::StringValue(text) => string(out, &String::from(text)),
        cst::Value::IntValue(number) => {
            if let Some(token) = number.int_token() {
                out.push_str(token.text());
            }
        }
        cst::Value::FloatValue(number) => {
            if let Some(token) = number.float_token() {
                out.push_str(token.text());
            }
        }
        cst::Value::BooleanValue(boolean) => out.push_str(if boolean.true_token().is_some() {
            "true"
        } else {
            "false"
        }),
        cst::Value::NullValue(_) => out.push_str("null"),
        cst::Value::EnumValue(name) => {
            if let Some(name) = name.name() {
                out.push_str(&name.text());
            }
        }
        cst::Value::ListValue(list) => {
            out.push('[');
            for (index, item) in list.values().enumerate() {
                if index > 0 {
                    out.push_str(", ");
                }
                value(out, &item);
            }
            out.push(']');
        }
        cst::Value::ObjectValue(object) => {
            out.push('{');
            for (index, field) in object.object_fields().enumerate() {
                if index > 0 {
                    out.push_str(", ");
                }
                if let Some(name) = field.name() {
                    out.push_str(&name.text());
                }
                out.push_str(": ");
                if let Some(inner) = field.value() {
                    value(out, &inner);
                }
            }
            out.push('}');
        }
    }
}

/// A string value written with the one escaping of this printer.
fn string(out: &mut String, text: &str) {
    out.push('"');
    for character in text.chars() {
        match character {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            character if crate::approval::is_disguising(character) => {
                let mut units = [0u16; 2];
                for unit in character.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{:04X}", unit));
                }
            }
            character => out.push(character),
        }
    }
    out.push('"');
}
