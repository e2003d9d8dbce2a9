//! The gateway against real upstream frameworks, tried as an attacker would: for each stack, an
//! allowed request and the smuggling variants that talked earlier gateways round, asserting from
//! the upstream's own execution log that nothing outside the scope ran and that the root secret
//! never reached the agent.

use std::time::Duration;

use valet_client::TokenRequest;
use valet_core::rules::encode_component;
use valet_tests::frameworks::Framework;
use valet_tests::upstream::call;
use valet_tests::{AGENT_KEY, Deployment, RAILWAY_ROOT_SECRET, standard_config};

/// An upstream on `url` holding the railway credential, injected as a bearer header.
fn upstream(name: &str, url: &str) -> String {
    format!(
        r#"
[[upstream]]
name = "{name}"
base_url = "{url}"
credential = "railway"
[upstream.inject]
header = {{ Authorization = "Bearer {{secret}}" }}
"#
    )
}

fn config(express_graphql: &str, strawberry: &str, express_rest: &str) -> String {
    let mut extra = String::new();
    for (name, url) in [
        ("graphql-express", express_graphql),
        ("graphql-strawberry", strawberry),
    ] {
        extra.push_str(&upstream(name, url));
        extra.push_str(&format!(
            r#"
[[scope]]
name = "{name}-staging"
credential = "railway"
environment = "staging"
default_ttl = "5m"
max_ttl = "10m"
upstream = "{name}"
[scope.params.project_id]
pattern = "p-[a-z]+"
[scope.params.environment_id]
pattern = "env-[a-z]+"
[[scope.allow]]
path = "/graphql"
[scope.allow.graphql]
query = ["projects", "project", "echo"]
mutation = ["customDomainCreate"]
[scope.allow.graphql.arguments]
"customDomainCreate.input.projectId" = "{{project_id}}"
"customDomainCreate.input.environmentId" = "{{environment_id}}"
"project.id" = "{{project_id}}"
"#
        ));
    }
    extra.push_str(&upstream("rest-express", express_rest));
    extra.push_str(
        r#"
[[scope]]
name = "rest-express-pulls"
credential = "railway"
environment = "staging"
default_ttl = "5m"
max_ttl = "10m"
upstream = "rest-express"
[[scope.allow]]
method = "POST"
path = "/repos/acme/web/pulls"
[[scope.allow]]
method = "GET"
path = "/echo"
[[scope.allow]]
method = "GET"
path = "/gzip-anyway"
[[scope.allow]]
method = "GET"
path = "/redirect"
"#,
    );
    standard_config(&extra)
        .replace(
            "listen = \"127.0.0.1:0\"\n",
            "listen = \"127.0.0.1:0\"\ngateway_listen = \"127.0.0.1:0\"\n",
        )
        .replace(
        "scopes = [\"deploy-staging\", \"limited\", \"short\"]",
        "scopes = [\"deploy-staging\", \"limited\", \"short\", \"graphql-express-staging\", \"graphql-strawberry-staging\", \"rest-express-pulls\"]",
    )
}

/// The three framework processes and a valetd whose gateway fronts them.
struct Stack {
    express: Framework,
    strawberry: Framework,
    rest: Framework,
    deployment: Deployment,
    valetd: valet_tests::Valetd,
}

impl Stack {
    fn start() -> Stack {
        let express = Framework::express_graphql();
        let strawberry = Framework::strawberry();
        let rest = Framework::express_rest();
        let deployment = Deployment::new(&config(&express.url, &strawberry.url, &rest.url));
        let valetd = deployment.start(&[]);
        Stack {
            express,
            strawberry,
            rest,
            deployment,
            valetd,
        }
    }

    fn gateway(&self) -> String {
        self.valetd.gateway.clone().expect("the gateway listens")
    }
}

fn encoded(text: &str) -> String {
    encode_component(text)
}

#[tokio::test]
async fn graphql_smuggling_is_refused_and_never_executes_on_real_servers() {
    let stack = Stack::start();
    let (express, strawberry) = (&stack.express, &stack.strawberry);
    let gateway = stack.gateway();
    let agent = stack.valetd.client(AGENT_KEY).await;

    for (upstream, framework) in [
        ("graphql-express", &express),
        ("graphql-strawberry", &strawberry),
    ] {
        let issued = agent
            .request_token(
                TokenRequest::new(format!("{upstream}-staging"), "diff-graphql")
                    .with_param("project_id", "p-shop")
                    .with_param("environment_id", "env-staging"),
            )
            .await
            .unwrap();
        let token = issued.token_str();
        let path = format!("/u/{upstream}/graphql");
        let allowed = serde_json::json!({"query": "{ projects { id } }"}).to_string();
        let volume_delete = "mutation { volumeDelete(volumeId: \"prod-db\") }";

        // The allowed request runs, with the root credential on the upstream leg.
        let reply = call(&gateway, "POST", &path, token, &allowed, &[]).await;
        assert_eq!(reply.status, 200, "{upstream}: {}", reply.body);
        let staging = serde_json::json!({
            "query": "mutation M($input: DomainInput!) { customDomainCreate(input: $input) { __typename } }",
            "variables": {"input": {"projectId": "p-shop", "environmentId": "env-staging", "domain": "a.example"}},
        })
        .to_string();
        let reply = call(&gateway, "POST", &path, token, &staging, &[]).await;
        assert_eq!(reply.status, 200, "{upstream}: {}", reply.body);

        // (trick, method, target, body, headers)
        type Smuggled<'a> = (&'a str, &'a str, String, String, Vec<(&'a str, &'a str)>);
        let smuggled: Vec<Smuggled> = vec![
            (
                "an allowed body with the mutation in ?query=",
                "POST",
                format!("{path}?query={}", encoded(volume_delete)),
                allowed.clone(),
                vec![],
            ),
            (
                "GET with ?query=",
                "GET",
                format!("{path}?query={}", encoded(volume_delete)),
                String::new(),
                vec![],
            ),
            (
                "a form-encoded body",
                "POST",
                path.clone(),
                format!("query={}", encoded(volume_delete)),
                vec![("content-type", "application/x-www-form-urlencoded")],
            ),
            (
                "an application/graphql body",
                "POST",
                path.clone(),
                volume_delete.to_string(),
                vec![("content-type", "application/graphql")],
            ),
            (
                "a repeated query key (last wins in JSON.parse)",
                "POST",
                path.clone(),
                format!(
                    r#"{{"query": "{{ projects {{ id }} }}", "query": "{}"}}"#,
                    volume_delete.replace('"', "\\\"")
                ),
                vec![],
            ),
            (
                "a case-variant query key",
                "POST",
                path.clone(),
                format!(
                    r#"{{"query": "{{ projects {{ id }} }}", "Query": "{}"}}"#,
                    volume_delete.replace('"', "\\\"")
                ),
                vec![],
            ),
            (
                "an operationName naming the harmless operation",
                "POST",
                path.clone(),
                serde_json::json!({"query": format!("query Safe {{ projects {{ id }} }} mutation Evil {{ volumeDelete(volumeId: \"prod-db\") }}"), "operationName": "Safe"}).to_string(),
                vec![],
            ),
            (
                "an alias dressed as an allowed field",
                "POST",
                path.clone(),
                serde_json::json!({"query": "mutation { customDomainCreate: volumeDelete(volumeId: \"prod-db\") }"}).to_string(),
                vec![],
            ),
            (
                "an allowed mutation aimed at production through a variable",
                "POST",
                path.clone(),
                serde_json::json!({
                    "query": "mutation M($input: DomainInput!) { customDomainCreate(input: $input) { __typename } }",
                    "variables": {"input": {"projectId": "p-shop", "environmentId": "env-production", "domain": "b.example"}},
                })
                .to_string(),
                vec![],
            ),
            (
                "an allowed mutation aimed at production in an inline literal",
                "POST",
                path.clone(),
                serde_json::json!({"query": "mutation { customDomainCreate(input: {projectId: \"p-shop\", environmentId: \"env-production\", domain: \"c.example\"}) { __typename } }"}).to_string(),
                vec![],
            ),
            (
                "a persisted-query extension",
                "POST",
                path.clone(),
                serde_json::json!({"query": "{ projects { id } }", "extensions": {"persistedQuery": {"version": 1, "sha256Hash": "0"}}}).to_string(),
                vec![],
            ),
            (
                "a gzip-encoded body",
                "POST",
                path.clone(),
                allowed.clone(),
                vec![("content-encoding", "gzip")],
            ),
        ];
        for (trick, method, target, body, headers) in smuggled {
            let reply = call(&gateway, method, &target, token, &body, &headers).await;
            assert!(
                (400..500).contains(&reply.status),
                "{upstream}, {trick}: refused, got {} {}",
                reply.status,
                reply.body
            );
            let reason = reply.json()["message"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            assert!(
                !reason.is_empty(),
                "{upstream}, {trick}: the refusal says why"
            );
        }

        // From the server's own log: only the allowed fields ran, each with the root credential,
        // and nothing touched a volume or production.
        let executed = framework.executed();
        let fields: Vec<&str> = executed
            .iter()
            .map(|record| record["field"].as_str().unwrap())
            .collect();
        assert_eq!(
            fields,
            ["projects", "customDomainCreate"],
            "{upstream}: {executed:?}"
        );
        assert_eq!(
            executed[1]["args"]["input"]["environmentId"], "env-staging",
            "{upstream}"
        );
        for record in &executed {
            assert_eq!(
                record["authorization"],
                format!("Bearer {RAILWAY_ROOT_SECRET}"),
                "{upstream}: the upstream saw the root credential, injected by the gateway"
            );
        }
    }

    // Every refusal is accounted for in the audit log: the first of each kind (and each
    // different call no rule allows) whole, with its reason, repeats in a summary.
    stack.valetd.stop().await;
    let refused = stack.deployment.refused_calls();
    assert!(refused >= 2 * 12, "{refused} refusals audited");
    let audit = std::fs::read_to_string(stack.deployment.audit_path()).unwrap();
    assert!(!audit.contains(RAILWAY_ROOT_SECRET));
}

#[tokio::test]
async fn method_overrides_never_reach_a_real_express_server() {
    let stack = Stack::start();
    let rest = &stack.rest;
    let gateway = stack.gateway();
    let agent = stack.valetd.client(AGENT_KEY).await;
    let issued = agent
        .request_token(TokenRequest::new("rest-express-pulls", "diff-rest"))
        .await
        .unwrap();
    let token = issued.token_str();
    let pulls = "/u/rest-express/repos/acme/web/pulls";
    for header in [
        "X-HTTP-Method-Override",
        "X-HTTP-Method",
        "X-Method-Override",
    ] {
        let reply = call(&gateway, "POST", pulls, token, "{}", &[(header, "DELETE")]).await;
        assert_eq!(reply.status, 200, "{header}: {}", reply.body);
        assert_eq!(
            reply.json()["method"],
            "POST",
            "{header}: the server ran POST"
        );
    }
    let reply = call(
        &gateway,
        "POST",
        &format!("{pulls}?_method=DELETE"),
        token,
        "{}",
        &[],
    )
    .await;
    assert_eq!(reply.status, 403, "{}", reply.body);
    assert!(reply.body.contains("_method"), "{}", reply.body);
    for (trick, target) in [
        ("a matrix parameter", format!("{pulls};_method=DELETE")),
        (
            "an encoded dot segment",
            "/u/rest-express/repos/acme/web/%2e%2e/web/pulls".to_string(),
        ),
        (
            "double encoding",
            "/u/rest-express/repos/acme/web/pull%2573".to_string(),
        ),
        (
            "a trailing dot",
            "/u/rest-express/repos/acme/web./pulls".to_string(),
        ),
    ] {
        let reply = call(&gateway, "POST", &target, token, "{}", &[]).await;
        assert_eq!(reply.status, 400, "{trick}: {}", reply.body);
    }
    let executed = rest.executed();
    assert!(
        executed.iter().all(|record| record["method"] == "POST"),
        "the server ran only POST: {executed:?}"
    );
    assert_eq!(executed.len(), 3, "{executed:?}");
    for record in &executed {
        let headers = record["headers"].as_object().unwrap();
        for dropped in [
            "x-http-method-override",
            "x-http-method",
            "x-method-override",
        ] {
            assert!(
                !headers.contains_key(dropped),
                "{dropped} reached the upstream"
            );
        }
    }
}

#[tokio::test]
async fn the_root_secret_cannot_be_recovered_from_any_answer() {
    let stack = Stack::start();
    let rest = &stack.rest;
    let gateway = stack.gateway();
    let agent = stack.valetd.client(AGENT_KEY).await;
    let issued = agent
        .request_token(TokenRequest::new("rest-express-pulls", "diff-leak"))
        .await
        .unwrap();
    let token = issued.token_str();
    let masked = "[masked by valet]";
    for (what, encoding, range) in [
        ("plain", None, None),
        ("gzip asked", Some("gzip"), None),
        ("deflate asked", Some("deflate"), None),
        ("br asked", Some("br"), None),
        ("a range holding half the secret", None, Some("bytes=0-60")),
    ] {
        let mut headers = Vec::new();
        if let Some(encoding) = encoding {
            headers.push(("accept-encoding", encoding));
        }
        if let Some(range) = range {
            headers.push(("range", range));
        }
        let reply = call(&gateway, "GET", "/u/rest-express/echo", token, "", &headers).await;
        assert_eq!(reply.status, 200, "{what}: {}", reply.body);
        assert!(
            reply.headers.get("content-encoding").is_none(),
            "{what}: the upstream was asked for an unencoded answer"
        );
        assert!(
            !reply.body.contains(RAILWAY_ROOT_SECRET),
            "{what}: {}",
            reply.body
        );
        assert!(reply.body.contains(masked), "{what}: the echo is masked");
    }
    // An upstream that encodes anyway: nothing of its answer is passed on.
    let reply = call(
        &gateway,
        "GET",
        "/u/rest-express/gzip-anyway",
        token,
        "",
        &[],
    )
    .await;
    assert_eq!(reply.status, 502, "{}", reply.body);
    assert!(
        reply.body.contains("Content-Encoding other than identity"),
        "{}",
        reply.body
    );
    // A redirect whose URL carries the credential.
    let reply = call(&gateway, "GET", "/u/rest-express/redirect", token, "", &[]).await;
    assert_eq!(reply.status, 302);
    let location = reply.headers["location"].to_str().unwrap();
    assert!(!location.contains(RAILWAY_ROOT_SECRET), "{location}");
    // What the server received: identity asked, no range.
    for record in rest.executed() {
        assert_eq!(record["headers"]["accept-encoding"], "identity");
        assert!(record["headers"].get("range").is_none());
    }
}

#[tokio::test]
async fn documents_that_fan_out_never_stall_other_callers() {
    let stack = Stack::start();
    let express = &stack.express;
    let gateway = stack.gateway();
    let agent = stack.valetd.client(AGENT_KEY).await;
    let issued = agent
        .request_token(
            TokenRequest::new("graphql-express-staging", "diff-fanout")
                .with_param("project_id", "p-shop")
                .with_param("environment_id", "env-staging"),
        )
        .await
        .unwrap();
    let token = issued.token_str().to_string();
    // Each fragment spreads the next twice: 2^25 selections if expanded, in about a kilobyte.
    let mut query = String::from("query { ...F0 }");
    for level in 0..25 {
        query.push_str(&format!(
            " fragment F{level} on Query {{ ...F{n} ...F{n} }}",
            n = level + 1
        ));
    }
    query.push_str(" fragment F25 on Query { projects { id } }");
    let bomb = serde_json::json!({ "query": query }).to_string();
    let mut attackers = Vec::new();
    for _ in 0..16 {
        let (gateway, token, bomb) = (gateway.clone(), token.clone(), bomb.clone());
        attackers.push(tokio::spawn(async move {
            call(
                &gateway,
                "POST",
                "/u/graphql-express/graphql",
                &token,
                &bomb,
                &[],
            )
            .await
        }));
    }
    // While they arrive, gRPC and the gateway keep answering: each probe is bounded at a second.
    for _ in 0..5 {
        let probe = tokio::time::timeout(
            Duration::from_secs(1),
            agent.request_token(
                TokenRequest::new("graphql-express-staging", "diff-probe")
                    .with_param("project_id", "p-shop")
                    .with_param("environment_id", "env-staging"),
            ),
        )
        .await;
        assert!(matches!(probe, Ok(Ok(_))), "gRPC answered within a second");
        let gateway_probe = tokio::time::timeout(
            Duration::from_secs(1),
            call(
                &gateway,
                "POST",
                "/u/graphql-express/graphql",
                &token,
                &serde_json::json!({"query": "{ projects { id } }"}).to_string(),
                &[],
            ),
        )
        .await;
        assert_eq!(gateway_probe.map(|reply| reply.status).ok(), Some(200));
    }
    for attacker in attackers {
        let reply = attacker.await.unwrap();
        assert_eq!(reply.status, 403, "{}", reply.body);
        assert!(reply.body.contains("selections"), "{}", reply.body);
    }
    assert!(
        express
            .executed()
            .iter()
            .all(|record| record["field"] == "projects"),
        "only the probes ran"
    );
}

#[tokio::test]
async fn the_railway_example_holds_its_grant_to_one_project_and_environment() {
    let railway = Framework::express_graphql();
    let repository = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let example = std::fs::read_to_string(repository.join("deploy/examples/railway.toml")).unwrap();
    // The docs' example as it ships, pointed at a local GraphQL server standing in for Railway.
    let config = example
        .replace("https://backboard.railway.app", &railway.url)
        .replace("127.0.0.1:7470", "127.0.0.1:0")
        .replace("127.0.0.1:7471", "127.0.0.1:0")
        .replace("env = \"RAILWAY_TOKEN\"", "file = \"railway.secret\"")
        .replace("[audit]", "[seal]\nkey_file = \"seal.key\"\n\n[audit]");
    let deployment = Deployment::new(&config);
    let valetd = deployment.start(&[]);
    let gateway = valetd.gateway.clone().unwrap();
    let agent_key =
        std::fs::read_to_string(repository.join("deploy/examples/demo-keys/agent.key")).unwrap();
    let agent = valetd.client(agent_key.trim()).await;
    let (project, staging, production) = (
        "2f1c0e7a-0000-4000-8000-000000000001",
        "9a7e0000-0000-4000-8000-000000000002",
        "9a7e0000-0000-4000-8000-000000000003",
    );
    let issued = agent
        .request_token(
            TokenRequest::new("railway-staging-domains", "fix-dns-42")
                .with_param("project_id", project)
                .with_param("environment_id", staging),
        )
        .await
        .unwrap();
    let create = |environment: &str| {
        serde_json::json!({
            "query": "mutation($i: DomainInput!) { customDomainCreate(input: $i) { id } }",
            "variables": {"i": {"domain": "shop.example.com", "projectId": project, "environmentId": environment}},
        })
        .to_string()
    };
    let path = "/u/railway/graphql/v2";
    let token = issued.token_str();
    let reply = call(&gateway, "POST", path, token, &create(staging), &[]).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let reply = call(&gateway, "POST", path, token, &create(production), &[]).await;
    assert_eq!(reply.status, 403, "{}", reply.body);
    assert!(reply.body.contains("input.environmentId"), "{}", reply.body);
    let delete = serde_json::json!({"query": "mutation { customDomainCreate: volumeDelete(volumeId: \"prod-db\") }"}).to_string();
    let reply = call(&gateway, "POST", path, token, &delete, &[]).await;
    assert_eq!(reply.status, 403, "{}", reply.body);
    let executed = railway.executed();
    assert_eq!(executed.len(), 1, "{executed:?}");
    assert_eq!(executed[0]["args"]["input"]["environmentId"], staging);
}
