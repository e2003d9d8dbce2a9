//! The MCP check against messages shaped as MCP clients send them: allowed calls, forbidden
//! tools, arguments outside their binding, batch smuggling, and list filtering.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::json;

use super::*;

/// A POST body read as the canonical call reads it, then checked.
fn post(
    body: &[u8],
    allow: &McpAllow,
    params: &BTreeMap<String, String>,
) -> Result<(Vec<CheckedMessage>, Vec<u8>), McpDenial> {
    let value = crate::json::parse_strict(body)
        .map_err(|error| McpDenial::NotJsonRpc(error.to_string()))?;
    check_post(&value, allow, params)
}

fn allow() -> McpAllow {
    McpAllow {
        tools: vec![
            ToolRule {
                kind: "tool",
                index: 0,
                name: Glob::new("list_*"),
                arguments: BTreeMap::new(),
                required: BTreeSet::new(),
                forbidden: BTreeSet::new(),
                approval: None,
                max_calls: None,
                allow_broad: None,
            },
            ToolRule {
                kind: "tool",
                index: 1,
                name: Glob::new("create_custom_domain"),
                arguments: BTreeMap::from([
                    (
                        "projectId".to_string(),
                        ArgumentRule::Value(ValueRule::Param("project".into())),
                    ),
                    (
                        "environment".to_string(),
                        ArgumentRule::Value(ValueRule::Exact("staging".into())),
                    ),
                    (
                        "port".to_string(),
                        ArgumentRule::Number {
                            min: Some(1.0),
                            max: Some(65535.0),
                        },
                    ),
                ]),
                required: BTreeSet::from(["projectId".to_string(), "environment".to_string()]),
                forbidden: BTreeSet::from(["force".to_string()]),
                approval: None,
                max_calls: None,
                allow_broad: None,
            },
        ],
        resources: vec!["railway://projects/{project}/*".into()],
        prompts: vec![ToolRule {
            kind: "prompt",
            index: 0,
            name: Glob::new("summarise"),
            arguments: BTreeMap::new(),
            required: BTreeSet::new(),
            forbidden: BTreeSet::new(),
            approval: None,
            max_calls: None,
            allow_broad: None,
        }],
        client_requests: BTreeSet::new(),
        max_batch: DEFAULT_MAX_BATCH,
    }
}

fn params() -> BTreeMap<String, String> {
    BTreeMap::from([("project".to_string(), "p-1".to_string())])
}

fn call(name: &str, arguments: serde_json::Value) -> Vec<u8> {
    json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": name, "arguments": arguments}})
        .to_string()
        .into_bytes()
}

#[test]
fn allowed_calls_pass_and_are_forwarded_as_parsed() {
    let (checked, forwarded) = post(
        &call(
            "create_custom_domain",
            json!({"projectId": "p-1", "environment": "staging", "port": 443, "domain": "shop.example"}),
        ),
        &allow(),
        &params(),
    )
    .unwrap();
    assert_eq!(checked[0].target.as_deref(), Some("create_custom_domain"));
    assert_eq!(checked[0].tool_rule, Some(1));
    let forwarded: serde_json::Value = serde_json::from_slice(&forwarded).unwrap();
    assert_eq!(forwarded["params"]["arguments"]["domain"], "shop.example");
    // Members JSON-RPC does not define are dropped, not forwarded.
    let extra = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "smuggled": {"method": "tools/call"}});
    let (_, forwarded) = post(extra.to_string().as_bytes(), &allow(), &params()).unwrap();
    assert!(!String::from_utf8(forwarded).unwrap().contains("smuggled"));
    for harmless in [
        "initialize",
        "ping",
        "tools/list",
        "notifications/initialized",
    ] {
        let message = json!({"jsonrpc": "2.0", "id": 1, "method": harmless});
        assert!(
            post(message.to_string().as_bytes(), &allow(), &params()).is_ok(),
            "{harmless}"
        );
    }
}

#[test]
fn forbidden_tools_arguments_and_methods_are_refused_with_the_reason() {
    let refusal = |body: Vec<u8>| post(&body, &allow(), &params()).unwrap_err().to_string();
    assert!(
        refusal(call("delete_volume", json!({"volumeId": "v"}))).contains(
            "tool \"delete_volume\" is not allowed; allowed tools: [list_*, create_custom_domain]"
        )
    );
    assert!(
        refusal(call(
            "create_custom_domain",
            json!({"projectId": "p-2", "environment": "staging"})
        ))
        .contains("argument \"projectId\" must be the grant's {project}")
    );
    assert!(
        refusal(call(
            "create_custom_domain",
            json!({"projectId": "p-1", "environment": "production"})
        ))
        .contains("must be \"staging\"")
    );
    assert!(
        refusal(call("create_custom_domain", json!({"projectId": "p-1"})))
            .contains("\"environment\" is required")
    );
    assert!(
        refusal(call(
            "create_custom_domain",
            json!({"projectId": "p-1", "environment": "staging", "force": true})
        ))
        .contains("may not be given")
    );
    assert!(
        refusal(call(
            "create_custom_domain",
            json!({"projectId": "p-1", "environment": "staging", "port": 70000})
        ))
        .contains("a number from 1 to 65535")
    );
    let sampling =
        json!({"jsonrpc": "2.0", "id": 2, "method": "sampling/createMessage", "params": {}});
    assert!(
        refusal(sampling.to_string().into_bytes())
            .contains("method \"sampling/createMessage\" is not allowed")
    );
    let read = json!({"jsonrpc": "2.0", "id": 3, "method": "resources/read", "params": {"uri": "railway://projects/p-2/volumes"}});
    assert!(
        refusal(read.to_string().into_bytes())
            .contains("resource \"railway://projects/p-2/volumes\" is not allowed")
    );
    let prompt = json!({"jsonrpc": "2.0", "id": 4, "method": "prompts/get", "params": {"name": "exfiltrate"}});
    assert!(refusal(prompt.to_string().into_bytes()).contains("prompt \"exfiltrate\""));
    for broken in [
        &b"not json"[..],
        b"[]",
        b"42",
        br#"{"jsonrpc":"1.0","method":"ping"}"#,
        br#"{"jsonrpc":"2.0","id":1,"id":2,"method":"ping"}"#,
    ] {
        assert!(
            post(broken, &allow(), &params()).is_err(),
            "{}",
            String::from_utf8_lossy(broken)
        );
    }
}

#[test]
fn a_batch_is_refused_whole_when_one_message_is_refused() {
    let batch = json!([
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "list_projects"}},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "delete_volume", "arguments": {"volumeId": "prod-db"}}}
    ]);
    let refusal = post(batch.to_string().as_bytes(), &allow(), &params()).unwrap_err();
    assert!(
        matches!(refusal, McpDenial::InBatch { index: 1, .. }),
        "{refusal}"
    );
    let fine = json!([
        {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "list_projects"}}
    ]);
    let (checked, _) = post(fine.to_string().as_bytes(), &allow(), &params()).unwrap();
    assert_eq!(checked.len(), 2);
}

#[test]
fn lists_offer_only_what_the_grant_may_use() {
    let mut tools = json!({"tools": [{"name": "list_projects"}, {"name": "delete_volume"}, {"name": "create_custom_domain"}]});
    filter_list("tools/list", &mut tools, &allow(), &params());
    assert_eq!(
        tools,
        json!({"tools": [{"name": "list_projects"}, {"name": "create_custom_domain"}]})
    );
    let mut resources = json!({"resources": [{"uri": "railway://projects/p-1/volumes"}, {"uri": "railway://projects/p-2/volumes"}]});
    filter_list("resources/list", &mut resources, &allow(), &params());
    assert_eq!(
        resources,
        json!({"resources": [{"uri": "railway://projects/p-1/volumes"}]})
    );
    let mut templates = json!({"resourceTemplates": [{"uriTemplate": "railway://projects/{id}"}]});
    filter_list(
        "resources/templates/list",
        &mut templates,
        &allow(),
        &params(),
    );
    assert_eq!(templates, json!({"resourceTemplates": []}));
}

#[test]
fn replies_are_filtered_whole_or_event_by_event_however_they_are_chunked() {
    let batch = json!([
        {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        {"jsonrpc": "2.0", "id": "b", "method": "tools/call", "params": {"name": "list_projects"}}
    ]);
    let (checked, _) = post(batch.to_string().as_bytes(), &allow(), &params()).unwrap();
    let filter = ReplyFilter::new(&checked, allow(), params());
    let listed = json!({"jsonrpc": "2.0", "id": 1, "result": {"tools": [{"name": "delete_volume"}, {"name": "list_projects"}]}});
    let filtered: serde_json::Value =
        serde_json::from_slice(&filter.json_body(listed.to_string().as_bytes())).unwrap();
    assert_eq!(
        filtered["result"]["tools"],
        json!([{"name": "list_projects"}])
    );

    // An SSE reply, split at awkward places: a progress notification passes, a sampling request
    // is dropped, the list is filtered, other fields are kept.
    let stream = format!(
        "event: message\nid: e1\ndata: {}\n\nevent: message\ndata: {}\n\nid: e3\ndata: {}\n\n",
        json!({"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": 1}}),
        json!({"jsonrpc": "2.0", "id": 99, "method": "sampling/createMessage", "params": {}}),
        listed
    );
    for split in [1, 7, 40, stream.len() - 1] {
        let mut filter = ReplyFilter::new(&checked, allow(), params());
        let (first, second) = stream.as_bytes().split_at(split);
        let mut out = filter.sse_chunk(first);
        out.extend(filter.sse_chunk(second));
        out.extend(filter.finish());
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("notifications/progress") && text.contains("id: e1"),
            "{text}"
        );
        assert!(!text.contains("sampling/createMessage"), "{text}");
        assert!(
            text.contains("list_projects") && !text.contains("delete_volume"),
            "{text}"
        );
        assert!(text.contains("id: e3"), "{text}");
    }
}

#[test]
fn only_what_was_checked_is_forwarded_and_client_capabilities_are_narrowed() {
    let body = json!({
        "jsonrpc": "2.0", "id": 3, "method": "tools/call",
        "params": {
            "name": "list_projects",
            "arguments": {},
            "task": {"ttl": 1},
            "_meta": {
                "progressToken": "p1",
                "io.modelcontextprotocol/protocolVersion": "2026-07-28",
                "io.modelcontextprotocol/clientCapabilities": {"sampling": {}, "elicitation": {}, "experimental": {}},
                "vendor/override": {"name": "delete_volume"},
            },
        },
    });
    let (_, forwarded) = post(body.to_string().as_bytes(), &allow(), &params()).unwrap();
    let forwarded: serde_json::Value = serde_json::from_slice(&forwarded).unwrap();
    let params_forwarded = &forwarded["params"];
    assert_eq!(params_forwarded["name"], "list_projects");
    assert!(params_forwarded.get("task").is_none(), "{forwarded}");
    let meta = &params_forwarded["_meta"];
    assert_eq!(meta["progressToken"], "p1");
    assert!(meta.get("vendor/override").is_none(), "{forwarded}");
    assert_eq!(
        meta["io.modelcontextprotocol/clientCapabilities"],
        json!({"experimental": {}})
    );
    let initialize = json!({
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {"roots": {}, "sampling": {}}, "clientInfo": {"name": "c", "version": "1"}},
    });
    let mut allowing_roots = allow();
    allowing_roots.client_requests.insert(ClientRequest::Roots);
    let (_, forwarded) = post(
        initialize.to_string().as_bytes(),
        &allowing_roots,
        &params(),
    )
    .unwrap();
    let forwarded: serde_json::Value = serde_json::from_slice(&forwarded).unwrap();
    assert_eq!(forwarded["params"]["capabilities"], json!({"roots": {}}));
}

#[test]
fn server_requests_and_client_answers_pass_only_where_the_scope_allows() {
    let answer = json!({"jsonrpc": "2.0", "id": "s1", "result": {"roots": []}});
    assert!(post(answer.to_string().as_bytes(), &allow(), &params()).is_err());
    let mut allowing = allow();
    allowing.client_requests.insert(ClientRequest::Elicitation);
    let (checked, forwarded) = post(answer.to_string().as_bytes(), &allowing, &params()).unwrap();
    assert_eq!(checked[0].method, "(response)");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&forwarded).unwrap(),
        answer
    );

    let call_checked = post(&call("list_projects", json!({})), &allow(), &params())
        .unwrap()
        .0;
    let stream = "event: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":9,\"method\":\"elicitation/create\",\"params\":{}}\n\nevent: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":9,\"method\":\"sampling/createMessage\",\"params\":{}}\n\n";
    let mut refusing = ReplyFilter::new(&call_checked, allow(), params());
    assert!(refusing.sse_chunk(stream.as_bytes()).is_empty());
    let mut permitting = ReplyFilter::new(&call_checked, allowing, params());
    let passed = String::from_utf8(permitting.sse_chunk(stream.as_bytes())).unwrap();
    assert!(passed.contains("elicitation/create"), "{passed}");
    assert!(!passed.contains("sampling/createMessage"), "{passed}");
}

#[test]
fn an_approval_fingerprint_covers_the_tool_and_exact_arguments_not_the_id() {
    let checked = |id: u64, volume: &str| {
        let body = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": "delete_volume", "arguments": {"volumeId": volume}}});
        let mut allowing = allow();
        allowing.tools.push(ToolRule {
            kind: "tool",
            index: 2,
            name: Glob::new("delete_volume"),
            arguments: BTreeMap::new(),
            required: BTreeSet::new(),
            forbidden: BTreeSet::new(),
            approval: None,
            max_calls: None,
            allow_broad: None,
        });
        post(body.to_string().as_bytes(), &allowing, &params())
            .unwrap()
            .0
            .remove(0)
    };
    let rule = &allow().tools[0];
    let first = call_fingerprint("deploy", rule, &checked(1, "v-1"));
    let retried = call_fingerprint("deploy", rule, &checked(2, "v-1"));
    let other = call_fingerprint("deploy", rule, &checked(1, "v-2"));
    assert_eq!(first, retried);
    assert_ne!(first.body_sha256, other.body_sha256);
    assert_eq!(first.target, "delete_volume");
    assert_eq!(
        first.rendering,
        "tools/call \"delete_volume\"\narguments:\n  {\n    \"volumeId\": \"v-1\"\n  }"
    );
}

#[test]
fn a_session_id_works_only_with_the_grant_that_opened_it() {
    let seal = crate::keyring::SealKey::from_base64(&crate::Secret::from(
        "q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80=".to_string(),
    ))
    .unwrap();
    let key = SessionKey::from_seal_key(&seal);
    let bound = key.bind("grant-a", "srv.session-1");
    assert_eq!(
        key.unbind("grant-a", &bound).as_deref(),
        Some("srv.session-1")
    );
    assert_eq!(key.unbind("grant-b", &bound), None);
    assert_eq!(key.unbind("grant-a", "srv.session-1"), None);
    assert_eq!(key.unbind("grant-a", "no-tag"), None);
}

#[test]
fn sse_line_ends_are_read_as_the_client_reads_them() {
    let checked = post(&call("list_projects", json!({})), &allow(), &params())
        .unwrap()
        .0;
    // A lone CR ends a line and a blank line ends an event for every SSE client: a server
    // request behind CR line ends, or a CRLF split between chunks, is still seen and dropped.
    let hidden = "data: {\"jsonrpc\":\"2.0\",\"id\":\"s\",\"method\":\"sampling/createMessage\",\"params\":{}}\r\r";
    let mut filter = ReplyFilter::new(&checked, allow(), params());
    assert!(filter.sse_chunk(hidden.as_bytes()).is_empty());
    let mut filter = ReplyFilter::new(&checked, allow(), params());
    let first =
        filter.sse_chunk(b"event: message\r\ndata: {\"jsonrpc\":\"2.0\",\"id\":7,\"result\":{}}\r");
    assert!(first.is_empty());
    let passed = String::from_utf8(filter.sse_chunk(b"\n\r\n")).unwrap();
    assert_eq!(
        passed,
        "event: message\ndata: {\"id\":7,\"jsonrpc\":\"2.0\",\"result\":{}}\n\n"
    );
    // Data that is not JSON keeps its lines, so the client reads what the filter read.
    let mut filter = ReplyFilter::new(&checked, allow(), params());
    let passed = String::from_utf8(filter.sse_chunk(b"data: not\ndata: json\n\n")).unwrap();
    assert_eq!(passed, "data: not\ndata: json\n\n");
}
