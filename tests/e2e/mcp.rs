//! MCP through the gateway with the real MCP Python SDK on both sides: a deployment platform's
//! MCP server (remote over Streamable HTTP, and stdio run by valetd with the account token in its
//! environment only) and the SDK's client as the agent, in the handshake (2025-11-25) and
//! stateless (2026-07-28) revisions, plus raw 2025-06-18 JSON-RPC. Every assertion about what
//! ran comes from the server's own execution log.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use valet_client::{TokenRequest, v1};
use valet_tests::frameworks::{Framework, executed_log, repository, venv_python};
use valet_tests::upstream::call;
use valet_tests::{
    AGENT_KEY, Deployment, OPERATOR_KEY, OTHER_AGENT_KEY, RAILWAY_ROOT_SECRET, sha256_hex,
    standard_config,
};

/// The tools, resources and prompts both MCP scopes allow.
fn mcp_scope(name: &str, upstream: &str, extra_tools: &str) -> String {
    format!(
        r#"
[[scope]]
name = "{name}"
credential = "railway"
environment = "staging"
default_ttl = "5m"
max_ttl = "10m"
upstream = "{upstream}"
[scope.params.project]
pattern = "p-[a-z]+"
[scope.mcp]
resources = ["deploy://projects/{{project}}/*"]
prompts = ["summarise"]
[[scope.mcp.tool]]
name = "list_*"
[[scope.mcp.tool]]
name = "create_custom_domain"
arguments = {{ projectId = "{{project}}", environment = "staging", port = {{ min = 1, max = 65535 }} }}
required = ["projectId", "environment"]
[[scope.mcp.tool]]
name = "delete_volume"
approval = true
[[scope.mcp.tool]]
name = "account_settings"
{extra_tools}
"#
    )
}

fn config(remote_url: &str, stdio_log: &Path) -> String {
    let extra = format!(
        r#"
[[upstream]]
name = "deploy-remote"
kind = "mcp"
base_url = "{remote_url}/mcp"
credential = "railway"
[upstream.inject]
header = {{ Authorization = "Bearer {{secret}}" }}

[[upstream]]
name = "deploy-stdio"
kind = "mcp"
command = "{python}"
args = ["{script}", "--stdio", "{log}"]
credential = "railway"
env = {{ DEPLOY_TOKEN = "{{secret}}" }}
max_processes = 2
max_processes_per_principal = 2

[[upstream]]
name = "deploy-shared"
kind = "mcp"
command = "{python}"
args = ["{script}", "--stdio", "{log}"]
credential = "railway"
env = {{ DEPLOY_TOKEN = "{{secret}}" }}
shared = true
{remote}{stdio}{shared}"#,
        python = venv_python().display(),
        script = repository().join("tests/upstreams/mcp_deploy.py").display(),
        log = stdio_log.display(),
        remote = mcp_scope("deploy-mcp-remote", "deploy-remote", ""),
        stdio = mcp_scope(
            "deploy-mcp-stdio",
            "deploy-stdio",
            "[[scope.mcp.tool]]\nname = \"crash\"\n"
        ),
        shared = mcp_scope(
            "deploy-mcp-shared",
            "deploy-shared",
            "[[scope.mcp.tool]]\nname = \"crash\"\n"
        ),
    );
    standard_config(&extra)
        .replace(
            "listen = \"127.0.0.1:0\"\n",
            "listen = \"127.0.0.1:0\"\ngateway_listen = \"127.0.0.1:0\"\n",
        )
        .replace(
            "scopes = [\"deploy-staging\", \"limited\", \"short\"]",
            "scopes = [\"deploy-staging\", \"limited\", \"short\", \"deploy-mcp-remote\", \"deploy-mcp-stdio\", \"deploy-mcp-shared\"]",
        )
        .replace(
            "scopes = [\"deploy-staging\", \"prod-db\"]",
            "scopes = [\"deploy-staging\", \"prod-db\", \"deploy-mcp-stdio\", \"deploy-mcp-shared\"]",
        )
}

struct Stack {
    remote: Framework,
    stdio_log: PathBuf,
    _directory: tempfile::TempDir,
    deployment: Deployment,
    valetd: valet_tests::Valetd,
}

impl Stack {
    fn start() -> Stack {
        Stack::start_with(|config| config)
    }

    /// [`Stack::start`] with the config as `edit` changes it.
    fn start_with(edit: impl FnOnce(String) -> String) -> Stack {
        let remote = Framework::mcp_deploy(RAILWAY_ROOT_SECRET);
        let directory = tempfile::tempdir().unwrap();
        let stdio_log = directory.path().join("stdio-executed.jsonl");
        let deployment = Deployment::new(&edit(config(&remote.url, &stdio_log)));
        let valetd = deployment.start(&[]);
        Stack {
            remote,
            stdio_log,
            _directory: directory,
            deployment,
            valetd,
        }
    }

    fn gateway(&self) -> String {
        self.valetd.gateway.clone().expect("the gateway listens")
    }

    /// What the server behind `upstream` executed.
    fn executed(&self, upstream: &str) -> Vec<Value> {
        if upstream == "deploy-remote" {
            self.remote.executed()
        } else {
            executed_log(&self.stdio_log)
        }
    }

    async fn token(&self, upstream: &str, task: &str) -> String {
        self.token_of(AGENT_KEY, upstream, task).await
    }

    /// A token of the principal with `key`.
    async fn token_of(&self, key: &str, upstream: &str, task: &str) -> String {
        let scope = match upstream {
            "deploy-remote" => "deploy-mcp-remote",
            "deploy-shared" => "deploy-mcp-shared",
            _ => "deploy-mcp-stdio",
        };
        let agent = self.valetd.client(key).await;
        agent
            .request_token(TokenRequest::new(scope, task).with_param("project", "p-shop"))
            .await
            .unwrap()
            .token_str()
            .to_string()
    }
}

/// Runs the SDK's client against `/mcp/<upstream>` and returns one JSON object per step.
async fn agent(gateway: &str, upstream: &str, token: &str, mode: &str, steps: Value) -> Vec<Value> {
    run_agent(gateway, upstream, token, mode, steps)
        .await
        .unwrap_or_else(|failure| panic!("the MCP agent failed: {failure}"))
}

/// The agent's steps, or how it failed (a client that could not connect at all).
async fn run_agent(
    gateway: &str,
    upstream: &str,
    token: &str,
    mode: &str,
    steps: Value,
) -> Result<Vec<Value>, String> {
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(venv_python())
            .arg(repository().join("tests/clients/mcp_agent.py"))
            .arg(format!("{gateway}/mcp/{upstream}"))
            .arg(token)
            .arg(mode)
            .arg(steps.to_string())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the MCP agent finishes within 120 s")
    .expect("run the MCP agent");
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(stdout
        .lines()
        .map(|line| serde_json::from_str(line).expect("the agent prints JSON lines"))
        .collect())
}

fn tool_calls(executed: &[Value]) -> Vec<(String, Value)> {
    executed
        .iter()
        .filter(|entry| entry["kind"] != "refused")
        .map(|entry| {
            (
                entry["name"].as_str().unwrap().to_string(),
                entry["arguments"].clone(),
            )
        })
        .collect()
}

#[tokio::test]
async fn an_mcp_sdk_agent_uses_allowed_tools_and_is_refused_the_rest_on_remote_and_stdio_servers() {
    let stack = Stack::start();
    let gateway = stack.gateway();
    for upstream in ["deploy-remote", "deploy-stdio"] {
        for mode in ["legacy", "2026-07-28"] {
            let before = stack.executed(upstream).len();
            let token = stack
                .token(upstream, &format!("mcp-{upstream}-{mode}"))
                .await;
            let steps = json!([
                ["list_tools"],
                ["call_tool", "list_volumes", {"projectId": "p-shop"}],
                ["call_tool", "create_custom_domain", {"projectId": "p-shop", "environment": "staging", "domain": "a.example"}],
                ["call_tool", "create_custom_domain", {"projectId": "p-blog", "environment": "staging", "domain": "b.example"}],
                ["call_tool", "create_custom_domain", {"projectId": "p-shop", "environment": "production", "domain": "c.example"}],
                ["call_tool", "create_custom_domain", {"projectId": "p-shop", "environment": "staging", "domain": "d.example", "port": 70000}],
                ["call_tool", "delete_project", {"projectId": "p-shop"}],
                ["call_tool", "account_settings", {}],
                ["list_resources"],
                ["read_resource", "deploy://projects/p-shop/status"],
                ["read_resource", "deploy://projects/p-blog/status"],
                ["get_prompt", "summarise", {"projectId": "p-shop"}],
            ]);
            let results = agent(&gateway, upstream, &token, mode, steps).await;
            let context = format!("{upstream} {mode}: {results:#?}");
            assert_eq!(results.len(), 12, "{context}");

            // A forbidden tool is never offered.
            assert_eq!(results[0]["ok"], true, "{context}");
            let tools: Vec<&str> = results[0]["result"]
                .as_array()
                .unwrap()
                .iter()
                .map(|tool| tool.as_str().unwrap())
                .collect();
            assert!(
                tools.contains(&"list_volumes") && tools.contains(&"create_custom_domain"),
                "{context}"
            );
            assert!(!tools.contains(&"delete_project"), "{context}");
            assert!(
                results[1]["ok"] == true && results[1]["result"].to_string().contains("p-shop-db"),
                "{context}"
            );
            assert_eq!(results[2]["ok"], true, "{context}");
            // Refusals speak MCP: the client sees an error naming the tool, the rule and why.
            for (index, needle) in [
                (3, "projectId"),
                (4, "environment"),
                (5, "port"),
                (6, "delete_project"),
            ] {
                assert_eq!(results[index]["ok"], false, "{context}");
                let error = results[index]["error"].as_str().unwrap();
                assert!(
                    error.contains("Valet refused this") && error.contains(needle),
                    "step {index}: {error}"
                );
            }
            assert!(
                results[5]["error"]
                    .as_str()
                    .unwrap()
                    .contains("tool[1] create_custom_domain"),
                "{context}"
            );
            // The root credential the server echoes never reaches the agent.
            assert_eq!(results[7]["ok"], true, "{context}");
            let everything = serde_json::to_string(&results).unwrap();
            assert!(!everything.contains(RAILWAY_ROOT_SECRET), "{context}");
            assert!(
                results[7]["result"].to_string().contains("account token: "),
                "{context}"
            );
            assert!(
                results[9]["ok"] == true
                    && results[9]["result"].to_string().contains("p-shop: healthy"),
                "{context}"
            );
            assert_eq!(results[10]["ok"], false, "{context}");
            assert_eq!(results[11]["ok"], true, "{context}");

            // The server's own log: exactly the allowed calls ran, with the root credential its
            // token (for stdio: from the environment valetd gave it).
            let executed = stack.executed(upstream)[before..].to_vec();
            assert_eq!(
                tool_calls(&executed),
                vec![
                    ("list_volumes".to_string(), json!({"projectId": "p-shop"})),
                    (
                        "create_custom_domain".to_string(),
                        json!({"projectId": "p-shop", "environment": "staging", "domain": "a.example", "port": 443})
                    ),
                    ("account_settings".to_string(), json!({})),
                    ("project_status".to_string(), json!({"projectId": "p-shop"})),
                    ("summarise".to_string(), json!({"projectId": "p-shop"})),
                ],
                "{context}"
            );
            for entry in &executed {
                assert_eq!(entry["token_sha256"], sha256_hex(RAILWAY_ROOT_SECRET));
            }
        }
    }

    // The audit log names each call's tool, rule, arguments digest and bound arguments.
    let records = stack.deployment.audit_records();
    let allowed = records
        .iter()
        .find(|record| {
            record["action"] == "gateway.call"
                && record["outcome"] == "allowed"
                && record["mcp"].to_string().contains("create_custom_domain")
        })
        .expect("an allowed MCP call is audited");
    let entry = &allowed["mcp"][0];
    assert_eq!(entry["rule"], "tool[1] create_custom_domain");
    assert_eq!(
        entry["bound_arguments"],
        json!({"projectId": "p-shop", "environment": "staging"})
    );
    assert_eq!(entry["arguments_sha256"].as_str().unwrap().len(), 64);
    assert!(
        records
            .iter()
            .any(|record| record["action"] == "gateway.call"
                && record["outcome"] == "denied"
                && record["asked"] == "tools/call delete_project")
    );
    let audit = std::fs::read_to_string(stack.deployment.audit_path()).unwrap();
    assert!(!audit.contains(RAILWAY_ROOT_SECRET));
    stack.valetd.stop().await;
}

/// JSON-RPC as a hand-written client sends it (the 2025-06-18 revision, batches, responses).
async fn post(
    gateway: &str,
    upstream: &str,
    token: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> valet_tests::upstream::Call {
    let mut all = vec![
        ("content-type", "application/json"),
        ("accept", "application/json, text/event-stream"),
    ];
    all.extend_from_slice(headers);
    call(
        gateway,
        "POST",
        &format!("/mcp/{upstream}"),
        token,
        &body.to_string(),
        &all,
    )
    .await
}

#[tokio::test]
async fn batches_and_smuggled_messages_are_refused_whole_and_never_execute() {
    let stack = Stack::start();
    let gateway = stack.gateway();
    for upstream in ["deploy-remote", "deploy-stdio"] {
        let token = stack.token(upstream, &format!("smuggle-{upstream}")).await;
        // A 2025-06-18 session, as a client without the SDK opens it.
        let initialize = post(&gateway, upstream, &token, &[], &json!({
            "jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-06-18", "capabilities": {"sampling": {}}, "clientInfo": {"name": "raw", "version": "1"}},
        })).await;
        assert_eq!(initialize.status, 200, "{upstream}: {}", initialize.body);
        let session = initialize
            .headers
            .get("mcp-session-id")
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_string();
        if upstream == "deploy-remote" {
            // The session is this grant's: another grant's token cannot use it.
            assert!(!session.is_empty(), "the remote server opened a session");
            let other = stack.token(upstream, "smuggle-other-grant").await;
            let hijack = post(
                &gateway,
                upstream,
                &other,
                &[
                    ("mcp-protocol-version", "2025-06-18"),
                    ("mcp-session-id", session.as_str()),
                ],
                &json!({"jsonrpc": "2.0", "id": 20, "method": "tools/list"}),
            )
            .await;
            assert_eq!(hijack.status, 403, "{}", hijack.body);
            assert!(hijack.body.contains("did not open"), "{}", hijack.body);
        }
        let mut headers = vec![("mcp-protocol-version", "2025-06-18")];
        if !session.is_empty() {
            headers.push(("mcp-session-id", session.as_str()));
        }
        let _ = post(
            &gateway,
            upstream,
            &token,
            &headers,
            &json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        )
        .await;
        let before = stack.executed(upstream).len();

        let allowed = post(
            &gateway,
            upstream,
            &token,
            &headers,
            &json!({
                "jsonrpc": "2.0", "id": 2, "method": "tools/call",
                "params": {"name": "list_volumes", "arguments": {"projectId": "p-shop"}},
            }),
        )
        .await;
        assert_eq!(allowed.status, 200, "{upstream}: {}", allowed.body);
        assert!(
            allowed.body.contains("p-shop-db"),
            "{upstream}: {}",
            allowed.body
        );

        let smuggled = [
            // A forbidden call behind an innocent one in a batch.
            json!([
                {"jsonrpc": "2.0", "id": 3, "method": "tools/list"},
                {"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "delete_project", "arguments": {"projectId": "p-shop"}}},
            ]),
            // The approval-gated tool in a batch: a person approves one call at a time.
            json!([
                {"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": "list_projects"}},
                {"jsonrpc": "2.0", "id": 6, "method": "tools/call", "params": {"name": "delete_volume", "arguments": {"volumeId": "v-prod"}}},
            ]),
            // A response to a request the server never made through the gateway.
            json!({"jsonrpc": "2.0", "id": 7, "result": {"action": "accept"}}),
            // One id twice: the tools/list reply would be matched to the call, unnarrowed (on a
            // stdio server the forbidden tools were listed).
            json!([
                {"jsonrpc": "2.0", "id": 11, "method": "tools/list"},
                {"jsonrpc": "2.0", "id": 11, "method": "tools/call", "params": {"name": "list_projects"}},
            ]),
            // More messages than a POST may batch.
            Value::Array(
                (0..3000)
                    .map(|id| json!({"jsonrpc": "2.0", "id": 100 + id, "method": "tools/call", "params": {"name": "list_projects"}}))
                    .collect(),
            ),
            // A method that is not JSON-RPC 2.0, and one the gateway does not know.
            json!({"jsonrpc": "1.0", "id": 8, "method": "tools/call", "params": {"name": "delete_project"}}),
            json!({"jsonrpc": "2.0", "id": 9, "method": "tasks/run", "params": {"name": "delete_project"}}),
        ];
        // A bound argument given twice (the last one wins in most parsers): refused as JSON.
        for body in smuggled {
            let refused = post(&gateway, upstream, &token, &headers, &body).await;
            assert_eq!(refused.status, 403, "{upstream} {body}: {}", refused.body);
            let reply: Value = serde_json::from_str(&refused.body).unwrap();
            assert!(
                reply["error"]["message"]
                    .as_str()
                    .unwrap()
                    .starts_with("Valet refused this"),
                "{}",
                refused.body
            );
        }
        let duplicate = r#"{"jsonrpc":"2.0","id":10,"method":"tools/call","params":{"name":"create_custom_domain","arguments":{"projectId":"p-shop","environment":"staging","domain":"x.example","projectId":"p-blog"}}}"#;
        let mut all = vec![
            ("content-type", "application/json"),
            ("accept", "application/json, text/event-stream"),
        ];
        all.extend_from_slice(&headers);
        let refused = call(
            &gateway,
            "POST",
            &format!("/mcp/{upstream}"),
            &token,
            duplicate,
            &all,
        )
        .await;
        assert_eq!(refused.status, 403, "{upstream}: {}", refused.body);

        // Extra members are not forwarded: the server sees only what was checked.
        let extra = post(&gateway, upstream, &token, &headers, &json!({
            "jsonrpc": "2.0", "id": 11, "method": "tools/call",
            "params": {"name": "list_volumes", "arguments": {"projectId": "p-shop"}, "name2": "delete_project"},
            "method2": "tools/call",
        })).await;
        assert_eq!(extra.status, 200, "{upstream}: {}", extra.body);

        // A protocol revision the gateway does not serve, or a body that is not JSON, is refused
        // saying what is served.
        let unknown = post(
            &gateway,
            upstream,
            &token,
            &[("mcp-protocol-version", "1999-01-01")],
            &json!({"jsonrpc": "2.0", "id": 12, "method": "tools/list"}),
        )
        .await;
        assert_eq!(unknown.status, 400, "{}", unknown.body);
        assert!(
            unknown.body.contains("MCP-Protocol-Version") && unknown.body.contains("2025-06-18"),
            "{}",
            unknown.body
        );
        let form = call(
            &gateway,
            "POST",
            &format!("/mcp/{upstream}"),
            &token,
            "a=b",
            &[("content-type", "application/x-www-form-urlencoded")],
        )
        .await;
        assert_eq!(form.status, 400, "{}", form.body);
        assert!(form.body.contains("bad_header"), "{}", form.body);

        // Not POST: no server-initiated stream through the gateway.
        let get = call(
            &gateway,
            "GET",
            &format!("/mcp/{upstream}"),
            &token,
            "",
            &[],
        )
        .await;
        assert_eq!(get.status, 405);
        // No token, or a token for another upstream.
        let anonymous = call(
            &gateway,
            "POST",
            &format!("/mcp/{upstream}"),
            "",
            "{}",
            &[("content-type", "application/json")],
        )
        .await;
        assert_eq!(anonymous.status, 401);

        let executed = stack.executed(upstream)[before..].to_vec();
        assert_eq!(
            tool_calls(&executed),
            vec![
                ("list_volumes".to_string(), json!({"projectId": "p-shop"})),
                ("list_volumes".to_string(), json!({"projectId": "p-shop"})),
            ],
            "{upstream}"
        );
    }
    // A REST route to an MCP upstream is refused with where it is served.
    let token = stack.token("deploy-remote", "wrong-route").await;
    let wrong = call(&gateway, "POST", "/u/deploy-remote/mcp", &token, "{}", &[]).await;
    assert!(wrong.body.contains("/mcp/deploy-remote"), "{}", wrong.body);
    stack.valetd.stop().await;
}

/// The SDK agent running `steps` in the background (it waits while a person decides).
fn spawn_agent(
    gateway: &str,
    upstream: &str,
    token: &str,
    steps: Value,
) -> tokio::task::JoinHandle<Vec<Value>> {
    let (gateway, upstream, token) = (gateway.to_string(), upstream.to_string(), token.to_string());
    tokio::spawn(async move { agent(&gateway, &upstream, &token, "legacy", steps).await })
}

async fn pending_approval(valetd: &valet_tests::Valetd) -> v1::Approval {
    for _ in 0..200 {
        if let Some(approval) = valetd.pending_approvals().await.into_iter().next() {
            return approval;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no approval was asked for within 20 s");
}

#[tokio::test]
async fn an_approval_gated_tool_call_is_held_shown_exactly_approved_and_runs_once() {
    let stack = Stack::start();
    let gateway = stack.gateway();
    for upstream in ["deploy-remote", "deploy-stdio"] {
        let token = stack.token(upstream, &format!("approval-{upstream}")).await;
        let before = stack.executed(upstream).len();
        let waiting = spawn_agent(
            &gateway,
            upstream,
            &token,
            json!([["call_tool", "delete_volume", {"volumeId": "v-staging-cache"}]]),
        );
        let approval = pending_approval(&stack.valetd).await;
        // The approver sees the tool, its full arguments, the upstream and the environment.
        assert!(
            approval.rendered.contains("tools/call delete_volume"),
            "{}",
            approval.rendered
        );
        assert!(
            approval.rendered.contains("v-staging-cache"),
            "{}",
            approval.rendered
        );
        assert!(
            approval.rendered.contains(upstream) && approval.rendered.contains("staging"),
            "{}",
            approval.rendered
        );
        // Nothing ran while it waits.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(stack.executed(upstream).len(), before);
        stack
            .valetd
            .client(OPERATOR_KEY)
            .await
            .admin()
            .approve(v1::ApproveRequest {
                id: approval.id.clone(),
                confirm: String::new(),
                reason: "staging cache, fine".into(),
            })
            .await
            .unwrap();
        let results = waiting.await.unwrap();
        assert_eq!(results[0]["ok"], true, "{results:?}");
        assert!(
            results[0]["result"]
                .to_string()
                .contains("deleted v-staging-cache")
        );
        // While it waited, the agent heard why, as MCP progress.
        let progress = results[0]["result"]["progress"].to_string();
        assert!(
            progress.contains("waiting for a person to approve tools/call delete_volume")
                && progress.contains(&approval.id),
            "{results:?}"
        );
        assert_eq!(
            tool_calls(&stack.executed(upstream)[before..]),
            vec![(
                "delete_volume".to_string(),
                json!({"volumeId": "v-staging-cache"})
            )]
        );

        // The approval was used once: the identical call again waits for a new decision, and
        // denied, it ends with the refusal and nothing runs.
        let first_approval = approval.id.clone();
        let waiting = spawn_agent(
            &gateway,
            upstream,
            &token,
            json!([["call_tool", "delete_volume", {"volumeId": "v-staging-cache"}]]),
        );
        let approval = pending_approval(&stack.valetd).await;
        assert_ne!(approval.id, first_approval, "an approval releases one call");
        stack
            .valetd
            .client(OPERATOR_KEY)
            .await
            .admin()
            .deny(v1::DenyRequest {
                id: approval.id.clone(),
                reason: "that is production data".into(),
            })
            .await
            .unwrap();
        let results = waiting.await.unwrap();
        assert_eq!(results[0]["ok"], false, "{results:?}");
        assert!(
            results[0]["error"].as_str().unwrap().contains("denied"),
            "{results:?}"
        );
        assert_eq!(stack.executed(upstream).len(), before + 1);
    }
    stack.valetd.stop().await;
}

#[tokio::test]
async fn a_post_without_a_valid_token_is_refused_before_its_body_is_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stack = Stack::start();
    let gateway = stack.gateway();
    for authorization in ["", "Authorization: Bearer not-a-token\r\n"] {
        let mut stream = tokio::net::TcpStream::connect(gateway.trim_start_matches("http://"))
            .await
            .unwrap();
        // A megabyte announced, none of it sent: the answer comes without waiting for it.
        let head = format!(
            "POST /mcp/deploy-remote HTTP/1.1\r\nHost: valet\r\nContent-Type: application/json\r\n{authorization}Content-Length: 1000000\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut answer = vec![0u8; 4096];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer))
            .await
            .expect("answered without the body")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer[..read]).to_string();
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    }
    stack.valetd.stop().await;
}

#[tokio::test]
async fn identical_held_calls_share_one_approval_and_past_the_grants_share_are_answered_at_once() {
    let stack = Stack::start();
    let gateway = stack.gateway();
    let upstream = "deploy-remote";
    let token = stack.token(upstream, "held-flood").await;
    let initialize = post(&gateway, upstream, &token, &[], &json!({
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}},
    })).await;
    assert_eq!(initialize.status, 200, "{}", initialize.body);
    let session = initialize
        .headers
        .get("mcp-session-id")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_string();
    // Twenty identical approval-gated calls at once.
    let flood: Vec<_> = (0..20)
        .map(|_| {
            let (gateway, token, session) = (gateway.clone(), token.clone(), session.clone());
            tokio::spawn(async move {
                let headers = [
                    ("mcp-protocol-version", "2025-06-18"),
                    ("mcp-session-id", session.as_str()),
                ];
                post(&gateway, upstream, &token, &headers, &json!({
                    "jsonrpc": "2.0", "id": 100, "method": "tools/call",
                    "params": {"name": "delete_volume", "arguments": {"volumeId": "v-staging-cache"}},
                }))
                .await
            })
        })
        .collect();
    let approval = pending_approval(&stack.valetd).await;
    // Past the grant's share (8 held), calls are answered at once, saying why.
    let mut answered = Vec::new();
    for _ in 0..100 {
        if flood.iter().filter(|call| call.is_finished()).count() >= 12 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut held = Vec::new();
    for call in flood {
        if call.is_finished() {
            answered.push(call.await.unwrap());
        } else {
            held.push(call);
        }
    }
    assert_eq!((answered.len(), held.len()), (12, 8));
    for call in &answered {
        assert_eq!(call.status, 429, "{}", call.body);
        assert!(
            call.body.contains("already held waiting for approval"),
            "{}",
            call.body
        );
        assert!(call.body.contains(&approval.id), "{}", call.body);
    }
    assert_eq!(
        stack.valetd.pending_approvals().await.len(),
        1,
        "identical calls wait on one approval"
    );
    // The gateway still answers others while they wait.
    let health = call(&gateway, "GET", "/healthz", "", "", &[]).await;
    assert_eq!(health.status, 200);
    // Denied, every held call ends with the refusal.
    stack
        .valetd
        .client(OPERATOR_KEY)
        .await
        .admin()
        .deny(v1::DenyRequest {
            id: approval.id.clone(),
            reason: "not now".into(),
        })
        .await
        .unwrap();
    for call in held {
        let ended = tokio::time::timeout(Duration::from_secs(20), call)
            .await
            .expect("a held call ends once its approval is decided")
            .unwrap();
        assert!(ended.body.contains("denied"), "{}", ended.body);
    }
    stack.valetd.stop().await;
}

/// A running process's niceness, from `/proc/PID/stat` (the field after the priority).
fn niceness(pid: u64) -> i64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name, in parentheses, may hold spaces: count fields after its end.
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    after_name.split(' ').nth(16).unwrap().parse().unwrap()
}

/// The pids that served each call so far, in order.
fn serving_pids(stack: &Stack) -> Vec<u64> {
    executed_log(&stack.stdio_log)
        .iter()
        .map(|entry| entry["pid"].as_u64().unwrap())
        .collect()
}

#[tokio::test]
async fn server_processes_are_shared_where_the_config_says_so_and_a_principal_keeps_its_share() {
    let stack = Stack::start_with(|config| {
        config.replace(
            "max_processes = 2\nmax_processes_per_principal = 2\n",
            "max_processes = 2\nmax_processes_per_principal = 1\nstarts_per_principal = \"3/min\"\n",
        )
    });
    let gateway = stack.gateway();
    let steps = json!([["call_tool", "list_projects", {}]]);
    // The other principal's grant has its warm process...
    let theirs = stack
        .token_of(OTHER_AGENT_KEY, "deploy-stdio", "share-theirs")
        .await;
    agent(&gateway, "deploy-stdio", &theirs, "legacy", steps.clone()).await;
    let their_pid = serving_pids(&stack)[0];
    // It runs at a lower CPU priority than valetd (its start yields to answering calls).
    let valetd_niceness = niceness(u64::from(stack.valetd.pid().unwrap()));
    assert_eq!(niceness(their_pid), (valetd_niceness + 10).min(19));
    // ...and fresh grants of one principal, past its share (1 of 2), take only its own place.
    for task in ["share-mine-1", "share-mine-2", "share-mine-3"] {
        let mine = stack.token("deploy-stdio", task).await;
        let results = agent(&gateway, "deploy-stdio", &mine, "legacy", steps.clone()).await;
        assert_eq!(results[0]["ok"], true, "{results:?}");
    }
    agent(&gateway, "deploy-stdio", &theirs, "legacy", steps.clone()).await;
    let pids = serving_pids(&stack);
    assert_eq!(
        pids.last(),
        Some(&their_pid),
        "the other principal's warm process was kept: {pids:?}"
    );
    let mine: std::collections::BTreeSet<u64> = pids[1..4].iter().copied().collect();
    assert_eq!(
        mine.len(),
        3,
        "each of my fresh grants had a process of its own"
    );
    assert!(!mine.contains(&their_pid));
    // A fourth fresh grant within the minute is past the principal's starts: refused, not
    // served by a process of its own.
    let fourth = stack.token("deploy-stdio", "share-mine-4").await;
    let refused = initialize(&gateway, "deploy-stdio", &fourth).await;
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert!(
        refused.body.contains("upstream_busy") && refused.body.contains("starts_per_principal"),
        "{}",
        refused.body
    );
    assert!(refused.headers.contains_key("retry-after"));
    assert_eq!(serving_pids(&stack).len(), pids.len(), "no process started");

    // A server that keeps no per-grant state serves every grant from one process.
    let before = serving_pids(&stack).len();
    for (key, task) in [
        (AGENT_KEY, "shared-1"),
        (AGENT_KEY, "shared-2"),
        (OTHER_AGENT_KEY, "shared-3"),
    ] {
        let token = stack.token_of(key, "deploy-shared", task).await;
        let results = agent(&gateway, "deploy-shared", &token, "legacy", steps.clone()).await;
        assert_eq!(results[0]["ok"], true, "{results:?}");
    }
    let shared: std::collections::BTreeSet<u64> =
        serving_pids(&stack)[before..].iter().copied().collect();
    assert_eq!(shared.len(), 1, "one process for every grant: {shared:?}");
    stack.valetd.stop().await;
}

/// An `initialize` through the gateway: answered from the server process's own
/// initialization, so it needs the grant's process running.
async fn initialize(gateway: &str, upstream: &str, token: &str) -> valet_tests::upstream::Call {
    post(gateway, upstream, token, &[], &json!({
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}},
    }))
    .await
}

#[tokio::test]
async fn a_slow_server_start_holds_up_no_call_to_a_process_already_running() {
    // Each start of the per-grant server takes four seconds more.
    let stack = Stack::start_with(|config| {
        let python = venv_python().display().to_string();
        config.replacen(
            &format!("command = \"{python}\"\nargs = [\""),
            &format!(
                "command = \"sh\"\nargs = [\"-c\", \"sleep 4; exec \\\"$0\\\" \\\"$@\\\"\", \"{python}\", \""
            ),
            1,
        )
    });
    let gateway = stack.gateway();
    let mine = stack.token("deploy-stdio", "running").await;
    let answer = initialize(&gateway, "deploy-stdio", &mine).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    // Another principal's grant starts its process...
    let theirs = stack
        .token_of(OTHER_AGENT_KEY, "deploy-stdio", "starting")
        .await;
    let starting = {
        let gateway = gateway.clone();
        tokio::spawn(async move { initialize(&gateway, "deploy-stdio", &theirs).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // ...while mine, already running, answers.
    let answer = initialize(&gateway, "deploy-stdio", &mine).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(
        !starting.is_finished(),
        "the other start was over before my call was answered"
    );
    assert_eq!(starting.await.unwrap().status, 200);
    stack.valetd.stop().await;
}

#[tokio::test]
async fn a_server_crashing_under_one_principal_holds_back_only_that_principals_starts() {
    let stack = Stack::start();
    let gateway = stack.gateway();
    // One principal's call crashes the server.
    let token = stack.token("deploy-stdio", "crash").await;
    let steps = json!([["call_tool", "crash", {}]]);
    let crashed = agent(&gateway, "deploy-stdio", &token, "legacy", steps).await;
    assert_eq!(crashed[0]["ok"], false, "{crashed:?}");
    // Its next start backs off; another principal's fresh grant, at the same moment, starts.
    let mine = stack.token("deploy-stdio", "crash-again").await;
    let theirs = stack
        .token_of(OTHER_AGENT_KEY, "deploy-stdio", "not-held-back")
        .await;
    let (mine, theirs) = tokio::join!(
        initialize(&gateway, "deploy-stdio", &mine),
        initialize(&gateway, "deploy-stdio", &theirs)
    );
    assert_eq!(mine.status, 429, "{}", mine.body);
    assert!(mine.body.contains("exited"), "{}", mine.body);
    assert_eq!(theirs.status, 200, "{}", theirs.body);

    // On a shared server the crash counts against the principal whose call went to it last,
    // not the one whose call happened to start it.
    let starter = stack
        .token_of(OTHER_AGENT_KEY, "deploy-shared", "starts-shared")
        .await;
    let listed = agent(
        &gateway,
        "deploy-shared",
        &starter,
        "legacy",
        json!([["call_tool", "list_projects", {}]]),
    )
    .await;
    assert_eq!(listed[0]["ok"], true, "{listed:?}");
    let crasher = stack.token("deploy-shared", "crash-shared").await;
    let crashed = agent(
        &gateway,
        "deploy-shared",
        &crasher,
        "legacy",
        json!([["call_tool", "crash", {}]]),
    )
    .await;
    assert_eq!(crashed[0]["ok"], false, "{crashed:?}");
    let again = stack.token("deploy-shared", "crash-shared-again").await;
    let (mine, theirs) = tokio::join!(
        initialize(&gateway, "deploy-shared", &again),
        initialize(&gateway, "deploy-shared", &starter)
    );
    assert_eq!(theirs.status, 200, "{}", theirs.body);
    assert_eq!(mine.status, 429, "{}", mine.body);
    stack.valetd.stop().await;
}

#[tokio::test]
async fn a_stdio_server_is_per_grant_restarted_after_a_crash_and_ends_with_its_grant() {
    let stack = Stack::start();
    let gateway = stack.gateway();
    let first = stack.token("deploy-stdio", "crash-one").await;
    let second = stack.token("deploy-stdio", "crash-two").await;
    let steps = json!([["call_tool", "list_projects", {}]]);
    agent(&gateway, "deploy-stdio", &first, "legacy", steps.clone()).await;
    agent(&gateway, "deploy-stdio", &second, "legacy", steps.clone()).await;
    let pids: Vec<u64> = executed_log(&stack.stdio_log)
        .iter()
        .map(|entry| entry["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(pids.len(), 2);
    assert_ne!(pids[0], pids[1], "each grant has its own server process");

    let crashed = agent(
        &gateway,
        "deploy-stdio",
        &first,
        "legacy",
        json!([["call_tool", "crash", {}]]),
    )
    .await;
    assert_eq!(crashed[0]["ok"], false, "{crashed:?}");
    // Restarted (after its backoff) on the next call.
    let mut restarted = None;
    for _ in 0..40 {
        // While the server backs off, the agent cannot even connect: that is an answer too.
        if let Ok(results) =
            run_agent(&gateway, "deploy-stdio", &first, "legacy", steps.clone()).await
            && results[0]["ok"] == true
        {
            restarted = Some(results);
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(restarted.is_some(), "the crashed server was not restarted");
    let last = executed_log(&stack.stdio_log).last().unwrap()["pid"]
        .as_u64()
        .unwrap();
    assert!(
        !pids.contains(&last),
        "a new process serves the grant after the crash"
    );

    // A process holds the root credential, so it ends with its grant.
    let agent_client = stack.valetd.client(AGENT_KEY).await;
    agent_client.revoke_task("crash-two", "done").await.unwrap();
    let running = |pid: u64| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| stat.rsplit(')').next().map(|rest| rest.trim().to_string()))
            .is_some_and(|rest| !rest.starts_with('Z'))
    };
    let mut ended = false;
    for _ in 0..60 {
        if !running(pids[1]) {
            ended = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(ended, "the revoked grant's server process still runs");
    assert!(running(last), "the other grant's server keeps running");
    stack.valetd.stop().await;
}
