//! One canonical call, tried as an attacker would against real servers in four language families
//! — Express (body-parser, qs), FastAPI with pydantic, Go's net/http and encoding/json, PHP's
//! json_decode and $_POST — and the GraphQL and MCP servers behind the gateway. Every assertion
//! about what ran is read from the upstream's own execution log: an approved call runs exactly as
//! the approver read it; a retyped, repeated, case-folded or oversized variant is refused before
//! any upstream sees it; counts count what executes.

use std::time::Duration;

use valet_client::{TokenRequest, v1};
use valet_tests::frameworks::Framework;
use valet_tests::upstream::{Call, call};
use valet_tests::{AGENT_KEY, Deployment, OPERATOR_KEY, Valetd, standard_config};

/// The REST servers, by the name their upstream and scope carry.
const REST: [&str; 4] = ["express", "fastapi", "go", "php"];

fn upstream(name: &str, url: &str, kind: &str) -> String {
    format!(
        r#"
[[upstream]]
name = "{name}"
{kind}base_url = "{url}"
credential = "railway"
[upstream.inject]
header = {{ Authorization = "Bearer {{secret}}" }}
"#
    )
}

fn config(servers: &[(&str, &Framework)], go_mcp: &str, graphql: &[(&str, &Framework)]) -> String {
    let mut extra = String::new();
    let mut scopes = vec![];
    for (name, server) in servers {
        extra.push_str(&upstream(
            &format!("rest-{name}"),
            &server.url,
            "forward_headers = [\"x-api-version\"]\n",
        ));
        extra.push_str(&format!(
            r#"
[[scope]]
name = "{name}-volumes"
upstream = "rest-{name}"
environment = "staging"
default_ttl = "5m"
max_ttl = "10m"
[[scope.allow]]
method = "POST"
path = "/volumes/delete"
max_body = 65536
approval = {{ timeout = "5m" }}
[[scope.allow]]
method = "POST"
path = "/deployments/scale"
max_body = 1048576

[[scope]]
name = "{name}-deploy"
upstream = "rest-{name}"
environment = "staging"
default_ttl = "5m"
max_ttl = "10m"
[scope.params.env]
values = ["staging", "production"]
[[scope.allow]]
method = "POST"
path = "/deploy"
query = {{ env = "{{env}}" }}
"#
        ));
        scopes.push(format!("\"{name}-volumes\", \"{name}-deploy\""));
    }
    // Two rules on one route, under different approval policies.
    extra.push_str(
        r#"
[[scope]]
name = "go-two-rules"
upstream = "rest-go"
environment = "staging"
default_ttl = "5m"
max_ttl = "10m"
[[scope.allow]]
method = "POST"
path = "/volumes/delete"
max_body = 64
approval = { approvers = ["admin"], timeout = "5m" }
[[scope.allow]]
method = "POST"
path = "/volumes/delete"
max_body = 65536
approval = { timeout = "5m" }
"#,
    );
    scopes.push("\"go-two-rules\"".into());
    extra.push_str(&upstream("go-mcp", go_mcp, "kind = \"mcp\"\n"));
    extra.push_str(
        r#"
[[scope]]
name = "go-mcp-staging"
upstream = "go-mcp"
environment = "staging"
default_ttl = "5m"
max_ttl = "10m"
[scope.params.namespace]
values = ["staging"]
[scope.mcp]
max_batch = 16
[[scope.mcp.tool]]
name = "scale_deployment"
arguments = { namespace = "{namespace}", replicas = { min = 1, max = 5 } }
required = ["namespace"]
[[scope.mcp.tool]]
name = "delete_volume"
approval = { confirm = "environment", timeout = "5m" }
"#,
    );
    scopes.push("\"go-mcp-staging\"".into());
    for (name, server) in graphql {
        extra.push_str(&upstream(&format!("graphql-{name}"), &server.url, ""));
        extra.push_str(&format!(
            r#"
[[scope]]
name = "{name}-domains"
upstream = "graphql-{name}"
environment = "staging"
default_ttl = "5m"
max_ttl = "10m"
[[scope.allow]]
path = "/graphql"
max_calls = 3
graphql = {{ mutation = ["customDomainCreate"] }}
"#
        ));
        scopes.push(format!("\"{name}-domains\""));
    }
    standard_config(&extra)
        .replace(
            "listen = \"127.0.0.1:0\"\n",
            "listen = \"127.0.0.1:0\"\ngateway_listen = \"127.0.0.1:0\"\n",
        )
        .replace(
            "scopes = [\"deploy-staging\", \"limited\", \"short\"]",
            &format!(
                "scopes = [\"deploy-staging\", \"limited\", \"short\", {}]",
                scopes.join(", ")
            ),
        )
}

/// Every server, and a valetd whose gateway fronts them.
struct Stack {
    rest: Vec<(&'static str, Framework)>,
    go_mcp: Framework,
    graphql: Vec<(&'static str, Framework)>,
    _deployment: Deployment,
    valetd: Valetd,
}

impl Stack {
    fn start() -> Stack {
        let rest: Vec<(&str, Framework)> = REST
            .into_iter()
            .map(|name| {
                let server = match name {
                    "express" => Framework::express_rest(),
                    "fastapi" => Framework::fastapi(),
                    "go" => Framework::go(),
                    _ => Framework::php(),
                };
                (name, server)
            })
            .collect();
        let go_mcp = Framework::go();
        let graphql = vec![
            ("express", Framework::express_graphql()),
            ("strawberry", Framework::strawberry()),
        ];
        let servers: Vec<(&str, &Framework)> =
            rest.iter().map(|(name, server)| (*name, server)).collect();
        let graphql_servers: Vec<(&str, &Framework)> = graphql
            .iter()
            .map(|(name, server)| (*name, server))
            .collect();
        let deployment = Deployment::new(&config(
            &servers,
            &format!("{}/mcp", go_mcp.url),
            &graphql_servers,
        ));
        let valetd = deployment.start(&[]);
        Stack {
            rest,
            go_mcp,
            graphql,
            _deployment: deployment,
            valetd,
        }
    }

    fn gateway(&self) -> String {
        self.valetd.gateway.clone().expect("the gateway listens")
    }

    async fn token(&self, scope: &str, task: &str) -> String {
        let mut request = TokenRequest::new(scope, task);
        if scope == "go-mcp-staging" {
            request = request.with_param("namespace", "staging");
        }
        if scope.ends_with("-deploy") {
            request = request.with_param("env", "staging");
        }
        self.valetd
            .client(AGENT_KEY)
            .await
            .request_token(request)
            .await
            .unwrap()
            .token_str()
            .to_string()
    }
}

async fn post(
    gateway: &str,
    path: &str,
    token: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> Call {
    call(gateway, "POST", path, token, body, headers).await
}

async fn approve(valetd: &Valetd, id: &str) {
    valetd
        .client(OPERATOR_KEY)
        .await
        .admin()
        .approve(v1::ApproveRequest {
            id: id.into(),
            confirm: String::new(),
            reason: "read it whole".into(),
        })
        .await
        .expect("the operator approves");
}

async fn pending(valetd: &Valetd, id: &str) -> v1::Approval {
    valetd
        .pending_approvals()
        .await
        .into_iter()
        .find(|approval| approval.id == id)
        .expect("the approval waits")
}

fn executed_volumes(server: &Framework) -> Vec<String> {
    server
        .executed()
        .iter()
        .filter(|record| record["route"] == "delete_volume")
        .map(|record| record["volumeId"].as_str().unwrap_or("(none)").to_string())
        .collect()
}

#[tokio::test]
async fn an_approved_call_runs_exactly_as_rendered_and_no_retyped_retry_is_released() {
    let stack = Stack::start();
    let gateway = stack.gateway();
    for (name, server) in &stack.rest {
        let token = stack
            .token(&format!("{name}-volumes"), &format!("canon-{name}"))
            .await;
        let path = format!("/u/rest-{name}/volumes/delete");
        // The body read as JSON names a scratch volume; read as a form it would name prod.
        let body = r#"{"volumeId":"scratch","note":"x&volumeId=prod"}"#;
        let asked = post(&gateway, &path, &token, body, &[]).await;
        assert_eq!(asked.status, 428, "{name}: {}", asked.body);
        let id = asked.json()["approval_id"].as_str().unwrap().to_string();
        let shown = pending(&stack.valetd, &id).await;
        assert!(
            shown.rendered.contains("content-type: application/json")
                && shown.rendered.contains("\"volumeId\": \"scratch\""),
            "{name}: {}",
            shown.rendered
        );
        approve(&stack.valetd, &id).await;
        let with = |content_type: &'static str| {
            [
                ("content-type", content_type),
                ("valet-approval", id.as_str()),
            ]
        };
        // The same bytes under another type are another call: refused, the approval kept.
        let retyped = post(
            &gateway,
            &path,
            &token,
            body,
            &with("application/x-www-form-urlencoded"),
        )
        .await;
        assert_eq!(retyped.status, 400, "{name}: {}", retyped.body);
        let merge = post(
            &gateway,
            &path,
            &token,
            body,
            &with("application/merge-patch+json"),
        )
        .await;
        assert_eq!(merge.status, 403, "{name}: {}", merge.body);
        assert!(
            merge
                .body
                .contains("Content-Type application/merge-patch+json instead of application/json"),
            "{name}: {}",
            merge.body
        );
        assert!(
            executed_volumes(server).is_empty(),
            "{name}: nothing ran yet"
        );
        // The approved call, once: what runs is what the approver read.
        let released = post(&gateway, &path, &token, body, &with("application/json")).await;
        assert_eq!(released.status, 200, "{name}: {}", released.body);
        assert_eq!(executed_volumes(server), ["scratch"], "{name}");
        let again = post(&gateway, &path, &token, body, &with("application/json")).await;
        assert_eq!(again.status, 403, "{name}: {}", again.body);
        assert_eq!(executed_volumes(server), ["scratch"], "{name}");
    }
}

#[tokio::test]
async fn the_approver_reads_the_whole_call_and_a_call_too_large_to_read_cannot_be_approved() {
    let stack = Stack::start();
    let gateway = stack.gateway();
    let (name, server) = &stack.rest[2];
    let token = stack.token(&format!("{name}-volumes"), "canon-whole").await;
    let path = format!("/u/rest-{name}/volumes/delete");
    // The volume deleted is named after a long note: an excerpt would show only the note.
    let note = "scratch volume, safe to drop. ".repeat(40);
    let body = serde_json::json!({"note": note, "volumeId": "prod-db"}).to_string();
    let asked = post(&gateway, &path, &token, &body, &[]).await;
    assert_eq!(asked.status, 428, "{}", asked.body);
    let id = asked.json()["approval_id"].as_str().unwrap().to_string();
    let shown = pending(&stack.valetd, &id).await;
    assert!(
        shown.rendered.contains("\"volumeId\": \"prod-db\""),
        "{}",
        shown.rendered
    );
    assert!(shown.rendered.contains(&note), "the whole note is shown");
    // Beyond what a person can read whole: refused, and nothing waits for a person.
    let huge = serde_json::json!({"note": "x".repeat(20_000), "volumeId": "prod-db"}).to_string();
    let refused = post(&gateway, &path, &token, &huge, &[]).await;
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert!(
        refused
            .body
            .contains("a person approves only what they read whole"),
        "{}",
        refused.body
    );
    assert_eq!(stack.valetd.pending_approvals().await.len(), 1);
    assert!(executed_volumes(server).is_empty());
}

#[tokio::test]
async fn repeated_and_case_folded_names_are_refused_in_every_json_type_before_any_server() {
    let stack = Stack::start();
    let gateway = stack.gateway();
    let bodies = [
        r#"{"namespace":"staging","namespace":"production","deployment":"web"}"#.to_string(),
        r#"{"namespace":"staging","Namespace":"production","deployment":"web"}"#.to_string(),
        // U+017F folds to s in Go's encoding/json; U+212A (Kelvin) to k.
        "{\"namespace\":\"staging\",\"name\u{17F}pace\":\"production\",\"deployment\":\"web\"}"
            .into(),
        "{\"namespace\":\"staging\",\"deployment\":\"web\",\"\u{212A}ind\":1,\"kind\":2}".into(),
    ];
    for (name, server) in &stack.rest {
        let token = stack
            .token(&format!("{name}-volumes"), &format!("fold-{name}"))
            .await;
        let path = format!("/u/rest-{name}/deployments/scale");
        for content_type in [
            "application/json",
            "application/merge-patch+json",
            "application/vnd.api+json",
        ] {
            for body in &bodies {
                let refused = post(
                    &gateway,
                    &path,
                    &token,
                    body,
                    &[("content-type", content_type)],
                )
                .await;
                assert_eq!(
                    refused.status, 400,
                    "{name} {content_type} {body}: {}",
                    refused.body
                );
                assert!(refused.body.contains("more than once"), "{}", refused.body);
            }
        }
        assert!(
            server.executed().is_empty(),
            "{name}: {:?}",
            server.executed()
        );
        // The same call with each name once runs, as sent.
        let fine = post(
            &gateway,
            &path,
            &token,
            r#"{"namespace":"staging","deployment":"web"}"#,
            &[],
        )
        .await;
        assert_eq!(fine.status, 200, "{name}: {}", fine.body);
        let executed = server.executed();
        assert_eq!(executed.len(), 1, "{name}: {executed:?}");
        assert_eq!(executed[0]["namespace"], "staging", "{name}");
    }
}

#[tokio::test]
async fn a_grant_bound_to_staging_reaches_no_other_namespace_through_a_case_folding_decoder() {
    let stack = Stack::start();
    let gateway = stack.gateway();
    let token = stack.token("go-mcp-staging", "fold-mcp").await;
    let tool = |arguments: serde_json::Value, id: u64| {
        serde_json::json!({
            "jsonrpc": "2.0", "id": id, "method": "tools/call",
            "params": {"name": "scale_deployment", "arguments": arguments},
        })
        .to_string()
    };
    for (index, arguments) in [
        serde_json::json!({"namespace": "staging", "deployment": "web", "Namespace": "production"}),
        serde_json::json!({"namespace": "staging", "deployment": "web", "name\u{17F}pace": "production"}),
        serde_json::json!({"namespace": "staging", "deployment": "web", "NAMESPACE": "production"}),
        serde_json::json!({"namespace": "staging", "deployment": "web", "r\u{E9}plicas": 500}),
    ]
    .into_iter()
    .enumerate()
    {
        let refused = post(&gateway, "/mcp/go-mcp", &token, &tool(arguments, index as u64), &[]).await;
        assert!(
            refused.body.contains("Valet refused this"),
            "{index}: {} {}",
            refused.status,
            refused.body
        );
    }
    assert!(
        stack.go_mcp.executed().is_empty(),
        "{:?}",
        stack.go_mcp.executed()
    );
    let allowed = tool(
        serde_json::json!({"namespace": "staging", "deployment": "web", "replicas": 2}),
        9,
    );
    let reply = post(&gateway, "/mcp/go-mcp", &token, &allowed, &[]).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let executed = stack.go_mcp.executed();
    assert_eq!(executed.len(), 1, "{executed:?}");
    assert_eq!(executed[0]["namespace"], "staging");
    assert_eq!(executed[0]["replicas"], 2);
}

#[tokio::test]
async fn mcp_batches_are_bounded_and_carry_each_id_once() {
    let stack = Stack::start();
    let gateway = stack.gateway();
    let token = stack.token("go-mcp-staging", "batches").await;
    let message = |id: serde_json::Value| {
        serde_json::json!({
            "jsonrpc": "2.0", "id": id, "method": "tools/call",
            "params": {"name": "scale_deployment", "arguments": {"namespace": "staging", "deployment": "web"}},
        })
    };
    let listing = |id: serde_json::Value| serde_json::json!({"jsonrpc": "2.0", "id": id, "method": "tools/list"});
    // A repeated id would let one reply pass for another's (an unnarrowed tools/list).
    for batch in [
        serde_json::json!([listing(1.into()), message(1.into())]),
        serde_json::json!([listing("7".into()), message(7.into())]),
        serde_json::Value::Array((0..17).map(|id| message(id.into())).collect()),
        serde_json::Value::Array((0..3000).map(|id| message(id.into())).collect()),
    ] {
        let refused = post(&gateway, "/mcp/go-mcp", &token, &batch.to_string(), &[]).await;
        assert!(
            refused.body.contains("Valet refused this"),
            "{} {}",
            refused.status,
            refused.body
        );
    }
    assert!(
        stack.go_mcp.executed().is_empty(),
        "{:?}",
        stack.go_mcp.executed()
    );
    let sixteen = serde_json::Value::Array((0..16).map(|id| message(id.into())).collect());
    let reply = post(&gateway, "/mcp/go-mcp", &token, &sixteen.to_string(), &[]).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(stack.go_mcp.executed().len(), 16);
}

#[tokio::test]
async fn graphql_counts_count_every_field_that_executes_aliases_included() {
    let stack = Stack::start();
    let gateway = stack.gateway();
    for (name, server) in &stack.graphql {
        let token = stack
            .token(&format!("{name}-domains"), &format!("aliases-{name}"))
            .await;
        let path = format!("/u/graphql-{name}/graphql");
        let create = |alias: &str, domain: &str| {
            format!(
                "{alias}: customDomainCreate(input: {{projectId: \"p\", environmentId: \"e\", domain: \"{domain}\"}}) {{ id }}"
            )
        };
        let many: Vec<String> = (0..25)
            .map(|index| create(&format!("a{index}"), &format!("d{index}.test")))
            .collect();
        let batch =
            serde_json::json!({"query": format!("mutation {{ {} }}", many.join(" "))}).to_string();
        let refused = post(&gateway, &path, &token, &batch, &[]).await;
        assert_eq!(refused.status, 403, "{name}: {}", refused.body);
        assert!(
            refused.body.contains("makes 25 calls"),
            "{name}: {}",
            refused.body
        );
        for index in 0..3 {
            let one = serde_json::json!({"query": format!("mutation {{ {} }}", create("one", &format!("ok{index}.test")))}).to_string();
            let reply = post(&gateway, &path, &token, &one, &[]).await;
            assert_eq!(reply.status, 200, "{name}: {}", reply.body);
        }
        let fourth =
            serde_json::json!({"query": format!("mutation {{ {} }}", create("one", "late.test"))})
                .to_string();
        assert_eq!(
            post(&gateway, &path, &token, &fourth, &[]).await.status,
            403,
            "{name}"
        );
        let executed: Vec<serde_json::Value> = server
            .executed()
            .into_iter()
            .filter(|record| record["field"] == "customDomainCreate")
            .collect();
        assert_eq!(executed.len(), 3, "{name}: {executed:?}");
    }
}

#[tokio::test]
async fn a_body_of_many_distinct_names_costs_little_and_others_are_served_meanwhile() {
    let stack = Stack::start();
    let gateway = stack.gateway();
    // Go's server reads bodies of any size (Express stops at 100 KB).
    let (name, server) = &stack.rest[2];
    let token = stack.token(&format!("{name}-volumes"), "many-names").await;
    let mut body = String::from("{\"namespace\":\"staging\",\"deployment\":\"web\"");
    for index in 0..30_000 {
        body.push_str(&format!(",\"k{index}\":{index}"));
    }
    body.push('}');
    assert!(body.len() > 400_000);
    let path = format!("/u/rest-{name}/deployments/scale");
    let heavy: Vec<_> = (0..4)
        .map(|_| {
            let (gateway, path, token, body) =
                (gateway.clone(), path.clone(), token.clone(), body.clone());
            tokio::spawn(async move { post(&gateway, &path, &token, &body, &[]).await })
        })
        .collect();
    // Meanwhile valetd answers everyone else.
    let health = tokio::time::timeout(Duration::from_secs(30), async {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Full<bytes::Bytes>>();
        client
            .get(format!("{gateway}/healthz").parse().unwrap())
            .await
            .map(|answer| answer.status().as_u16())
    })
    .await;
    assert!(matches!(health, Ok(Ok(200))), "{health:?}");
    for answer in heavy {
        let answer = tokio::time::timeout(Duration::from_secs(60), answer)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            answer.status,
            200,
            "{}",
            &answer.body[..answer.body.len().min(300)]
        );
    }
    assert_eq!(server.executed().len(), 4);
}

#[tokio::test]
async fn text_that_would_disguise_itself_is_refused_where_it_enters() {
    let stack = Stack::start();
    let agent = stack.valetd.client(AGENT_KEY).await;
    for purpose in [
        "rotate keys \u{202E}exe.gnp",
        "zero\u{200B}width",
        "bell\u{7}",
    ] {
        let error = agent
            .request_token(TokenRequest::new("express-volumes", "disguised").with_purpose(purpose))
            .await
            .unwrap_err();
        assert_eq!(error.code(), Some(tonic::Code::InvalidArgument), "{error}");
        assert!(error.to_string().contains("purpose"), "{error}");
        assert!(
            !error.to_string().contains('\u{202E}'),
            "the refusal shows it escaped: {error}"
        );
    }
}

/// A rendering with its grant id written as docs/approvals.md writes it.
fn as_documented(rendered: &str) -> String {
    let mut lines: Vec<String> = rendered.lines().map(str::to_string).collect();
    if let Some(first) = lines.first_mut()
        && let Some((head, _)) = first.rsplit_once(" with grant ")
    {
        *first = format!("{head} with grant 01kcq3xv8h2m9t6r4w0e5nd7y1:");
    }
    lines.join("\n")
}

#[tokio::test]
async fn docs_approvals_md_shows_what_an_approver_reads_for_a_rest_and_an_mcp_call() {
    let stack = Stack::start();
    let gateway = stack.gateway();
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/approvals.md"),
    )
    .unwrap();
    // REST: the whole body, pretty, names sorted as the upstream receives them.
    let token = stack.token("go-volumes", "drop-scratch").await;
    let body = r#"{"volumeId":"vol-scratch-7","keepBackups":false,"note":"done with it"}"#;
    let asked = post(&gateway, "/u/rest-go/volumes/delete", &token, body, &[]).await;
    assert_eq!(asked.status, 428, "{}", asked.body);
    let id = asked.json()["approval_id"].as_str().unwrap().to_string();
    let rest = as_documented(&pending(&stack.valetd, &id).await.rendered);
    assert!(
        doc.contains(&rest),
        "docs/approvals.md shows a REST call as valetd renders it:\n{rest}"
    );
    // MCP: the tool and every argument; the held call is released by the denial.
    let token = stack.token("go-mcp-staging", "drop-volume").await;
    let message = serde_json::json!({
        "jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "delete_volume", "arguments": {"volumeId": "v-shop-db", "force": true}},
    })
    .to_string();
    let held = {
        let gateway = gateway.clone();
        tokio::spawn(async move { post(&gateway, "/mcp/go-mcp", &token, &message, &[]).await })
    };
    let mut waiting = None;
    for _ in 0..200 {
        waiting = stack
            .valetd
            .pending_approvals()
            .await
            .into_iter()
            .find(|approval| approval.task_id == "drop-volume");
        if waiting.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let waiting = waiting.expect("the MCP call waits for a person");
    let mcp = as_documented(&waiting.rendered);
    assert!(
        doc.contains(&mcp),
        "docs/approvals.md shows an MCP call as valetd renders it:\n{mcp}"
    );
    stack
        .valetd
        .client(OPERATOR_KEY)
        .await
        .admin()
        .deny(v1::DenyRequest {
            id: waiting.id.clone(),
            reason: "not today".into(),
        })
        .await
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(30), held)
        .await
        .unwrap()
        .unwrap();
    assert!(answer.body.contains("not today"), "{}", answer.body);
    assert!(stack.go_mcp.executed().is_empty());
}

#[tokio::test]
async fn json_under_another_type_and_types_read_by_prefix_are_refused() {
    let stack = Stack::start();
    let gateway = stack.gateway();
    let (name, server) = &stack.rest[2];
    let token = stack.token(&format!("{name}-volumes"), "sniffed").await;
    let path = format!("/u/rest-{name}/deployments/scale");
    // Go's handler reads the body as JSON whatever its type says.
    let folded = r#"{"namespace": "staging", "deployment": "web", "NAMESPACE": "production"}"#;
    for content_type in ["text/plain", "application/octet-stream"] {
        let refused = post(
            &gateway,
            &path,
            &token,
            folded,
            &[("content-type", content_type)],
        )
        .await;
        assert_eq!(refused.status, 400, "{content_type}: {}", refused.body);
        assert!(
            refused
                .body
                .contains(&format!("the body is JSON sent as {content_type}")),
            "{}",
            refused.body
        );
    }
    // Symfony reads any type starting with application/x-www-form-urlencoded as a form.
    let prefixed = post(
        &gateway,
        &path,
        &token,
        r#"{"namespace": "staging", "deployment": "web"}"#,
        &[("content-type", "application/x-www-form-urlencoded+json")],
    )
    .await;
    assert_eq!(prefixed.status, 400, "{}", prefixed.body);
    assert!(server.executed().is_empty(), "{:?}", server.executed());
    // Plain text that is valid JSON, each name once, is refused all the same (under text/plain
    // the query, method and size checks of JSON are not made); as JSON it passes.
    let body = r#"{"namespace": "staging", "deployment": "web"}"#;
    let text = post(
        &gateway,
        &path,
        &token,
        body,
        &[("content-type", "text/plain")],
    )
    .await;
    assert_eq!(text.status, 400, "{}", text.body);
    assert!(server.executed().is_empty(), "{:?}", server.executed());
    let fine = post(&gateway, &path, &token, body, &[]).await;
    assert_eq!(fine.status, 200, "{}", fine.body);
    assert_eq!(server.executed()[0]["namespace"], "staging");
}

#[tokio::test]
async fn a_body_cannot_override_a_bound_query_parameter_or_the_method() {
    let stack = Stack::start();
    let gateway = stack.gateway();
    for (name, server) in &stack.rest {
        if !["go", "php"].contains(name) {
            continue;
        }
        let token = stack
            .token(&format!("{name}-deploy"), &format!("merge-{name}"))
            .await;
        let path = format!("/u/rest-{name}/deploy?env=staging");
        let form = [("content-type", "application/x-www-form-urlencoded")];
        // PHP's $_REQUEST and Go's r.FormValue take the body's env over the query's.
        for body in ["env=production", "ENV=production"] {
            let refused = post(&gateway, &path, &token, body, &form).await;
            assert_eq!(refused.status, 400, "{name} {body}: {}", refused.body);
            assert!(
                refused.body.contains("also a query parameter"),
                "{}",
                refused.body
            );
        }
        let json = post(&gateway, &path, &token, r#"{"env": "production"}"#, &[]).await;
        assert_eq!(json.status, 400, "{name}: {}", json.body);
        assert!(
            server.executed().is_empty(),
            "{name}: {:?}",
            server.executed()
        );
        let fine = post(&gateway, &path, &token, "note=ok", &form).await;
        assert_eq!(fine.status, 200, "{name}: {}", fine.body);
        let executed = server.executed();
        let env = if *name == "go" {
            "formvalue_env"
        } else {
            "request_env"
        };
        assert_eq!(executed[0][env], "staging", "{name}: {executed:?}");
    }
    // method-override reading `_method` from a form or JSON body (Express).
    let (name, server) = &stack.rest[0];
    let token = stack.token(&format!("{name}-volumes"), "override").await;
    let path = format!("/u/rest-{name}/deployments/scale");
    for (body, content_type) in [
        (
            "_method=DELETE&namespace=staging",
            "application/x-www-form-urlencoded",
        ),
        (
            r#"{"_method": "DELETE", "namespace": "staging"}"#,
            "application/json",
        ),
        (
            r#"{"_METHOD": "DELETE", "namespace": "staging"}"#,
            "application/json",
        ),
    ] {
        let refused = post(
            &gateway,
            &path,
            &token,
            body,
            &[("content-type", content_type)],
        )
        .await;
        assert_eq!(refused.status, 400, "{body}: {}", refused.body);
        assert!(refused.body.contains("method-override"), "{}", refused.body);
    }
    assert!(server.executed().is_empty(), "{:?}", server.executed());
}

#[tokio::test]
async fn an_approval_binds_the_headers_the_upstream_receives_and_the_rule_that_asked() {
    let stack = Stack::start();
    let gateway = stack.gateway();
    let (name, server) = &stack.rest[3];
    let token = stack.token(&format!("{name}-volumes"), "headers").await;
    let path = format!("/u/rest-{name}/volumes/delete");
    let body = r#"{"volumeId":"scratch"}"#;
    let asked = post(
        &gateway,
        &path,
        &token,
        body,
        &[("x-api-version", "2023-01-01")],
    )
    .await;
    assert_eq!(asked.status, 428, "{}", asked.body);
    let id = asked.json()["approval_id"].as_str().unwrap().to_string();
    let shown = pending(&stack.valetd, &id).await;
    assert!(
        shown.rendered.contains("x-api-version: 2023-01-01"),
        "{}",
        shown.rendered
    );
    approve(&stack.valetd, &id).await;
    let other_version = post(
        &gateway,
        &path,
        &token,
        body,
        &[("x-api-version", "2099-12-31"), ("valet-approval", &id)],
    )
    .await;
    assert_eq!(other_version.status, 403, "{}", other_version.body);
    assert!(
        other_version.body.contains("headers"),
        "{}",
        other_version.body
    );
    let added = post(
        &gateway,
        &path,
        &token,
        body,
        &[
            ("x-api-version", "2023-01-01"),
            ("if-match", "*"),
            ("valet-approval", &id),
        ],
    )
    .await;
    assert_eq!(added.status, 403, "{}", added.body);
    let twice = post(
        &gateway,
        &path,
        &token,
        body,
        &[
            ("x-api-version", "2023-01-01"),
            ("x-api-version", "2099-12-31"),
        ],
    )
    .await;
    assert_eq!(twice.status, 400, "a header sent twice: {}", twice.body);
    assert!(server.executed().is_empty());
    let released = post(
        &gateway,
        &path,
        &token,
        body,
        &[("x-api-version", "2023-01-01"), ("valet-approval", &id)],
    )
    .await;
    assert_eq!(released.status, 200, "{}", released.body);

    // Padding the body does not move the call to a rule with a weaker approval: rules bound what
    // the upstream receives, and an approval is for the rule that asked.
    let token = stack.token("go-two-rules", "two-rules").await;
    let padded = format!("{{\"volumeId\":\"prod-db\"{}}}", " ".repeat(100));
    let asked = post(&gateway, "/u/rest-go/volumes/delete", &token, &padded, &[]).await;
    assert_eq!(asked.status, 428, "{}", asked.body);
    let id = asked.json()["approval_id"].as_str().unwrap().to_string();
    let shown = pending(&stack.valetd, &id).await;
    assert_eq!(
        shown.approvers,
        ["admin"],
        "the first rule's policy: {shown:?}"
    );
    let by_operator = stack
        .valetd
        .client(OPERATOR_KEY)
        .await
        .admin()
        .approve(v1::ApproveRequest {
            id: id.clone(),
            confirm: String::new(),
            reason: "not mine to give".into(),
        })
        .await;
    assert!(by_operator.is_err(), "only admin approves under allow[0]");
}
