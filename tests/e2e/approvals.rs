//! Human approval: for a sensitive scope's tokens and for single destructive gateway calls.

use std::time::Duration;

use bytes::Bytes;
use valet_client::{ClientError, TokenRequest, v1};
use valet_tests::upstream::Upstream;
use valet_tests::{
    ADMIN_KEY, AGENT_KEY, Deployment, OPERATOR_KEY, OTHER_AGENT_KEY, RAILWAY_ROOT_SECRET,
    standard_config,
};

fn approval_config(upstream: &Upstream) -> String {
    let url = upstream.url();
    standard_config(&format!(
        r#"
[approvals]
webhook = "{url}/hook-flaky"

[[scope]]
name = "prod-deploy"
credential = "railway"
environment = "production"
audience = "railway"
default_ttl = "5m"
max_ttl = "10m"
[scope.params.project]
pattern = "[a-z]+"
[scope.approval]
approvers = ["role:operator", "other-agent"]
timeout = "1m"
confirm = "environment"

[[scope]]
name = "quick-approval"
credential = "railway"
environment = "production"
audience = "railway"
default_ttl = "5m"
max_ttl = "10m"
[scope.approval]
timeout = "2s"

[[scope]]
name = "two-person"
credential = "railway"
environment = "production"
audience = "railway"
default_ttl = "5m"
max_ttl = "10m"
[scope.approval]
count = 2

[[upstream]]
name = "railway"
base_url = "{url}"
credential = "railway"
[upstream.inject]
header = {{ Authorization = "Bearer {{secret}}" }}

[[scope]]
name = "railway-prod"
upstream = "railway"
environment = "production"
default_ttl = "5m"
max_ttl = "10m"
[[scope.allow]]
path = "/graphql/v2"
graphql = {{ query = ["project"], mutation = ["customDomainCreate"] }}
[[scope.allow]]
path = "/graphql/v2"
graphql = {{ mutation = ["volumeDelete"] }}
approval = {{ confirm = "environment", timeout = "1m" }}
"#
    ))
    .replace("listen = \"127.0.0.1:0\"\n", "listen = \"127.0.0.1:0\"\ngateway_listen = \"127.0.0.1:0\"\n")
    .replace(
        "scopes = [\"deploy-staging\", \"limited\", \"short\"]",
        "scopes = [\"deploy-staging\", \"limited\", \"short\", \"prod-deploy\", \"quick-approval\", \"two-person\", \"railway-prod\"]",
    )
    .replace(
        "name = \"admin\"\nroles = [\"admin\"]",
        "name = \"admin\"\nroles = [\"admin\"]\nscopes = [\"prod-deploy\"]",
    )
}

fn prod(task: &str) -> TokenRequest {
    TokenRequest::new("prod-deploy", task).with_param("project", "shop")
}

async fn approve(
    valetd: &valet_tests::Valetd,
    key: &str,
    id: &str,
    confirm: &str,
) -> Result<v1::Approval, tonic::Status> {
    let client = valetd.client(key).await;
    client
        .admin()
        .approve(v1::ApproveRequest {
            id: id.into(),
            confirm: confirm.into(),
            reason: "looked at it".into(),
        })
        .await
        .map(|reply| reply.into_inner())
}

#[tokio::test]
async fn a_sensitive_scope_issues_only_after_approval_with_the_typed_confirmation() {
    let upstream = Upstream::start().await;
    let deployment = Deployment::new(&approval_config(&upstream));
    let valetd = deployment.start(&[]);
    let agent = valetd.client(AGENT_KEY).await;

    let pending = agent
        .request_token(prod("deploy-1").with_purpose("ship v2"))
        .await
        .unwrap();
    assert!(pending.is_pending(), "no token before approval");
    let approval = pending.approval.clone().unwrap();
    assert_eq!(approval.confirm, "environment");
    assert_eq!(pending.grant.status, v1::GrantStatus::Pending as i32);
    assert!(
        agent
            .introspect(pending.token_str())
            .await
            .is_ok_and(|reply| !reply.active)
    );

    let waiter = {
        let agent = agent.clone();
        let grant_id = pending.grant.id.clone();
        tokio::spawn(async move {
            agent
                .wait_for_grant(&grant_id, Duration::from_secs(30))
                .await
        })
    };

    let missing = approve(&valetd, OPERATOR_KEY, &approval.id, "")
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::FailedPrecondition);
    assert!(
        missing
            .message()
            .contains("needs the environment typed to confirm"),
        "{}",
        missing.message()
    );
    let wrong = approve(&valetd, OPERATOR_KEY, &approval.id, "staging")
        .await
        .unwrap_err();
    assert!(
        wrong.message().contains("does not match"),
        "{}",
        wrong.message()
    );
    let agent_approver = approve(&valetd, OTHER_AGENT_KEY, &approval.id, "production")
        .await
        .unwrap_err();
    assert_eq!(
        agent_approver.code(),
        tonic::Code::PermissionDenied,
        "listed, but an agent: never"
    );
    assert!(
        agent_approver.message().contains("agents never approve"),
        "{}",
        agent_approver.message()
    );

    let decided = approve(&valetd, OPERATOR_KEY, &approval.id, "production")
        .await
        .unwrap();
    assert_eq!(decided.status, v1::ApprovalStatus::Approved as i32);
    let issued = waiter
        .await
        .unwrap()
        .expect("the waiting agent receives its token");
    assert_eq!(issued.grant.status, v1::GrantStatus::Active as i32);
    assert!(agent.introspect(issued.token_str()).await.unwrap().active);
    let lifetime =
        issued.grant.expires_at.unwrap().seconds - issued.grant.issued_at.unwrap().seconds;
    assert_eq!(lifetime, 300, "the TTL starts at approval");

    // The decision and its audit trail.
    let audit = std::fs::read_to_string(deployment.audit_path()).unwrap();
    for action in ["approval.request", "approval.approve"] {
        assert!(
            audit.contains(&format!("\"action\":\"{action}\"")),
            "{action} is audited"
        );
    }
    assert!(
        audit.contains("\"principal\":\"operator\""),
        "who approved is recorded"
    );
    // The token the approval released is issued on the record, like any other (the record
    // valet_tokens_issued_total counts).
    let fingerprint = valet_core::token::fingerprint(issued.token_str());
    let released: Vec<_> = deployment
        .audit_records()
        .into_iter()
        .filter(|record| {
            record["action"] == "token.issue"
                && record["outcome"] == "allowed"
                && record["grant_id"] == pending.grant.id.as_str()
        })
        .collect();
    assert_eq!(released.len(), 1, "{released:?}");
    assert_eq!(released[0]["token_fingerprint"], fingerprint.as_str());
    assert_eq!(released[0]["via"], "wait");
}

#[tokio::test]
async fn denial_timeout_self_approval_and_n_of_m() {
    let upstream = Upstream::start().await;
    let deployment = Deployment::new(&approval_config(&upstream));
    let valetd = deployment.start(&[]);
    let agent = valetd.client(AGENT_KEY).await;
    let operator = valetd.client(OPERATOR_KEY).await;

    // Denied: the waiting agent hears why.
    let pending = agent.request_token(prod("deny-1")).await.unwrap();
    let id = pending.approval.unwrap().id;
    let no_reason = operator
        .admin()
        .deny(v1::DenyRequest {
            id: id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(no_reason.code(), tonic::Code::InvalidArgument);
    operator
        .admin()
        .deny(v1::DenyRequest {
            id: id.clone(),
            reason: "not during the freeze".into(),
        })
        .await
        .unwrap();
    match agent
        .wait_for_grant(&pending.grant.id, Duration::from_secs(10))
        .await
    {
        Err(ClientError::NotApproved { reason, .. }) => assert!(
            reason.contains("denied by operator: not during the freeze"),
            "{reason}"
        ),
        other => panic!("expected a denial, got {other:?}"),
    }
    assert_eq!(
        approve(&valetd, ADMIN_KEY, &id, "production")
            .await
            .unwrap_err()
            .code(),
        tonic::Code::FailedPrecondition,
        "decided is final"
    );

    // Timed out: counts as denied.
    let quick = agent
        .request_token(TokenRequest::new("quick-approval", "timeout-1"))
        .await
        .unwrap();
    match agent
        .wait_for_grant(&quick.grant.id, Duration::from_secs(20))
        .await
    {
        Err(ClientError::NotApproved { .. }) => {}
        other => panic!("expected a timeout, got {other:?}"),
    }
    let timed_out = valet_tests::eventually(Duration::from_secs(10), || async {
        std::fs::read_to_string(deployment.audit_path())
            .unwrap()
            .contains("\"action\":\"approval.timeout\"")
    })
    .await;
    assert!(timed_out, "the timeout is audited");

    // No self-approval, even for an admin who may request the scope and is an approver by role.
    let admin = valetd.client(ADMIN_KEY).await;
    let own = admin.request_token(prod("self-1")).await.unwrap();
    let refused = approve(&valetd, ADMIN_KEY, &own.approval.unwrap().id, "production")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(
        refused.message().contains("no self-approval"),
        "{}",
        refused.message()
    );

    // Two distinct approvers.
    let two = agent
        .request_token(TokenRequest::new("two-person", "two-1"))
        .await
        .unwrap();
    let id = two.approval.unwrap().id;
    let first = approve(&valetd, OPERATOR_KEY, &id, "").await.unwrap();
    assert_eq!(first.status, v1::ApprovalStatus::Pending as i32);
    assert_eq!(
        approve(&valetd, OPERATOR_KEY, &id, "")
            .await
            .unwrap_err()
            .code(),
        tonic::Code::FailedPrecondition,
        "the same approver twice counts once"
    );
    let second = approve(&valetd, ADMIN_KEY, &id, "").await.unwrap();
    assert_eq!(second.status, v1::ApprovalStatus::Approved as i32);
    assert!(
        agent
            .wait_for_grant(&two.grant.id, Duration::from_secs(10))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn pending_requests_survive_a_restart_and_the_webhook_is_retried() {
    let upstream = Upstream::start().await;
    // With the console on, the payload links to the request's page in it.
    let config = approval_config(&upstream).replacen(
        "grant_retention = \"1h\"\n",
        "grant_retention = \"1h\"\nconsole_listen = \"127.0.0.1:0\"\n",
        1,
    );
    assert!(config.contains("console_listen"));
    let deployment = Deployment::new(&config);
    let valetd = deployment.start(&[]);
    let agent = valetd.client(AGENT_KEY).await;
    let pending = agent.request_token(prod("restart-1")).await.unwrap();
    let id = pending.approval.unwrap().id;

    // The webhook's first delivery fails (500); the retry delivers.
    let delivered = valet_tests::eventually(Duration::from_secs(15), || async {
        upstream
            .seen()
            .iter()
            .filter(|seen| seen.target == "/hook-flaky")
            .count()
            >= 2
    })
    .await;
    assert!(delivered, "the webhook was retried after failing");
    let hook: serde_json::Value = serde_json::from_slice(
        &upstream
            .seen()
            .iter()
            .find(|seen| seen.target == "/hook-flaky")
            .unwrap()
            .body,
    )
    .unwrap();
    assert_eq!(hook["event"], "approval.pending");
    assert_eq!(hook["approval"]["id"], id.as_str());
    let link = hook["console_url"].as_str().expect("a link to the console");
    assert!(
        link.starts_with("http://127.0.0.1:") && link.ends_with(&format!("/approvals/{id}")),
        "{link}"
    );
    assert!(
        !link.contains(":0/"),
        "the bound port, not the configured 0: {link}"
    );
    assert!(
        hook["approval"]["summary"]
            .as_str()
            .unwrap()
            .contains("scope prod-deploy")
    );
    let audit = std::fs::read_to_string(deployment.audit_path()).unwrap();
    assert!(
        audit.contains("\"action\":\"approval.webhook\",")
            && audit.contains("\"outcome\":\"failed\""),
        "the failed delivery is audited"
    );
    valetd.stop().await;

    let valetd = deployment.start(&[]);
    let listed = valetd.pending_approvals().await;
    assert_eq!(
        listed
            .iter()
            .map(|approval| approval.id.as_str())
            .collect::<Vec<_>>(),
        [id.as_str()]
    );
    approve(&valetd, OPERATOR_KEY, &id, "production")
        .await
        .unwrap();
    let agent = valetd.client(AGENT_KEY).await;
    let issued = agent
        .wait_for_grant(&pending.grant.id, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(agent.introspect(issued.token_str()).await.unwrap().active);
}

async fn gateway_call(
    gateway: &str,
    token: &str,
    body: &str,
    extra: &[(&str, &str)],
    path: &str,
) -> (u16, serde_json::Value) {
    let reply = valet_tests::upstream::call(gateway, "POST", path, token, body, extra).await;
    (
        reply.status,
        serde_json::from_str(&reply.body).unwrap_or(serde_json::Value::Null),
    )
}

#[tokio::test]
async fn a_destructive_call_goes_through_once_and_only_as_approved() {
    let upstream = Upstream::start().await;
    let deployment = Deployment::new(&approval_config(&upstream));
    let valetd = deployment.start(&[]);
    let gateway = valetd.gateway.clone().unwrap();
    let agent = valetd.client(AGENT_KEY).await;
    let issued = agent
        .request_token(TokenRequest::new("railway-prod", "volume-1"))
        .await
        .unwrap();
    let token = issued.token_str();
    let graphql_calls = || {
        upstream
            .seen()
            .into_iter()
            .filter(|seen| seen.target.starts_with("/graphql"))
            .collect::<Vec<_>>()
    };
    let delete = serde_json::json!({"query": "mutation Drop($id: String!) { volumeDelete(volumeId: $id) }", "variables": {"id": "vol-prod-db"}}).to_string();
    let path = "/u/railway/graphql/v2";

    // Allowed fields pass without approval.
    let (status, _) = gateway_call(
        &gateway,
        token,
        &serde_json::json!({"query": "{ project(id: \"p\") { id } }"}).to_string(),
        &[],
        path,
    )
    .await;
    assert_eq!(status, 200);

    let (status, asked) = gateway_call(&gateway, token, &delete, &[], path).await;
    assert_eq!(status, 428, "{asked}");
    let approval_id = asked["approval_id"].as_str().unwrap().to_string();
    assert_eq!(
        asked["approve_command"],
        format!("valet approve {approval_id} --confirm production"),
        "the agent can hand on the exact command: {asked}"
    );
    assert_eq!(asked["call"]["method"], "POST");
    assert_eq!(asked["call"]["target"], "/graphql/v2");
    assert_eq!(
        asked["call"]["graphql"],
        serde_json::json!(["mutation volumeDelete"])
    );
    assert_eq!(asked["call"]["content_type"], "application/json");
    assert!(
        asked["call"]["rendering"]
            .as_str()
            .unwrap()
            .contains("variables:\n  {\n    \"id\": \"vol-prod-db\"\n  }"),
        "the whole call, variables included: {asked}"
    );
    assert_eq!(asked["call"]["body_sha256"].as_str().unwrap().len(), 64);
    assert_eq!(
        graphql_calls().len(),
        1,
        "the destructive call did not reach the upstream"
    );

    // Still pending: the retry is told to wait, and nothing is forwarded.
    let (status, _) = gateway_call(
        &gateway,
        token,
        &delete,
        &[("valet-approval", &approval_id)],
        path,
    )
    .await;
    assert_eq!(status, 428);
    approve(&valetd, OPERATOR_KEY, &approval_id, "production")
        .await
        .unwrap();

    // Any difference is refused.
    let other_variable = delete.replace("vol-prod-db", "vol-prod-backups");
    let (status, reply) = gateway_call(
        &gateway,
        token,
        &other_variable,
        &[("valet-approval", &approval_id)],
        path,
    )
    .await;
    assert_eq!(status, 403, "{reply}");
    assert!(
        reply["message"]
            .as_str()
            .unwrap()
            .contains("a different body"),
        "{reply}"
    );
    // A different document (here an alias) is a different call; spacing alone is not (the
    // document is printed canonically before it is compared).
    let reformatted = delete.replace(
        "volumeDelete(volumeId: $id)",
        "renamed: volumeDelete(volumeId: $id)",
    );
    assert_eq!(
        gateway_call(
            &gateway,
            token,
            &reformatted,
            &[("valet-approval", &approval_id)],
            path
        )
        .await
        .0,
        403,
        "a changed body"
    );
    let (status, reply) = gateway_call(
        &gateway,
        token,
        &delete,
        &[("valet-approval", &approval_id)],
        "/u/railway/graphql/v2?dry_run=false",
    )
    .await;
    assert_eq!(status, 403, "a different target: {reply}");
    assert_eq!(graphql_calls().len(), 1);

    // The identical call goes through, once, with the root credential and without the approval header.
    let (status, reply) = gateway_call(
        &gateway,
        token,
        &delete,
        &[("valet-approval", &approval_id)],
        path,
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    let seen = graphql_calls();
    assert_eq!(seen.len(), 2);
    // What runs is the canonical call the approver read: the document as printed, names sorted.
    assert_eq!(
        seen[1].body,
        Bytes::from(
            r#"{"query":"mutation Drop($id: String!) {\n  volumeDelete(volumeId: $id)\n}","variables":{"id":"vol-prod-db"}}"#
        )
    );
    assert_eq!(
        seen[1].header("authorization"),
        Some(format!("Bearer {RAILWAY_ROOT_SECRET}").as_str())
    );
    assert_eq!(seen[1].header("valet-approval"), None);

    let (status, reply) = gateway_call(
        &gateway,
        token,
        &delete,
        &[("valet-approval", &approval_id)],
        path,
    )
    .await;
    assert_eq!(status, 403, "a replay: {reply}");
    assert!(
        reply["message"]
            .as_str()
            .unwrap()
            .contains("already used once"),
        "{reply}"
    );
    assert_eq!(graphql_calls().len(), 2, "exactly once");
    let audit = std::fs::read_to_string(deployment.audit_path()).unwrap();
    assert!(audit.contains("\"action\":\"approval.use\""));
}

#[tokio::test]
async fn operators_see_and_decide_requests_from_the_cli() {
    let upstream = Upstream::start().await;
    let deployment = Deployment::new(&approval_config(&upstream));
    let valetd = deployment.start(&[]);
    let agent = valetd.client(AGENT_KEY).await;
    let pending = agent
        .request_token(prod("cli-1").with_purpose("hotfix"))
        .await
        .unwrap();
    let id = pending.approval.unwrap().id;
    let valet = |arguments: &[&str], key: &str| {
        let output = std::process::Command::new(valet_tests::binary("valet"))
            .args(arguments)
            .env("VALET_SERVER", &valetd.address)
            .env("VALET_KEY", key)
            .output()
            .unwrap();
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (code, stdout, _) = valet(&["approvals", "list"], OPERATOR_KEY);
    assert_eq!(code, 0);
    assert!(
        stdout.contains(&id) && stdout.contains("agent asks for a token for scope prod-deploy"),
        "{stdout}"
    );
    let (code, stdout, _) = valet(&["approvals", "show", &id], OPERATOR_KEY);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("purpose: hotfix")
            && stdout
                .contains("agent asks for a token for scope prod-deploy (environment production)")
            && stdout.contains("--confirm VALUE"),
        "{stdout}"
    );
    let (code, _, stderr) = valet(&["approve", &id, "--confirm", "staging"], OPERATOR_KEY);
    assert_eq!(code, 3, "{stderr}");
    let (code, stdout, _) = valet(
        &[
            "approve",
            &id,
            "--confirm",
            "production",
            "--reason",
            "change 42",
        ],
        OPERATOR_KEY,
    );
    assert_eq!(code, 0);
    assert!(stdout.contains("is approved"), "{stdout}");

    // `valet token request` waits for the decision and then prints the token.
    let waiting = std::process::Command::new(valet_tests::binary("valet"))
        .args([
            "token",
            "request",
            "--scope",
            "prod-deploy",
            "--task",
            "cli-2",
            "--param",
            "project=shop",
            "--wait",
            "30s",
        ])
        .env("VALET_SERVER", &valetd.address)
        .env("VALET_KEY", AGENT_KEY)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut second = None;
    for _ in 0..100 {
        if let Some(approval) = valetd
            .pending_approvals()
            .await
            .into_iter()
            .find(|approval| approval.task_id == "cli-2")
        {
            second = Some(approval.id);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, _, _) = valet(
        &[
            "deny",
            &second.expect("the request is pending"),
            "--reason",
            "wrong window",
        ],
        OPERATOR_KEY,
    );
    assert_eq!(code, 0);
    let output = waiting.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("denied by operator: wrong window"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.stdout.is_empty(), "no token on a denial");
}

/// The holes an attacker found in approvals and revocation, each closed: what a person approves
/// is exactly what runs, and every revocation ends everything it names.
mod holes {
    use std::time::Duration;

    use valet_client::{TokenRequest, v1};
    use valet_tests::upstream::Upstream;
    use valet_tests::{AGENT_KEY, Deployment, OPERATOR_KEY};

    use super::{approval_config, approve, gateway_call, prod};

    fn bounded_config(upstream: &Upstream) -> String {
        approval_config(upstream)
            .replace("[approvals]\n", "[approvals]\nmax_pending_per_grant = 3\n")
            .replace(
                "approval = { confirm = \"environment\", timeout = \"1m\" }",
                "max_calls = 5\napproval = { confirm = \"environment\", timeout = \"1m\" }",
            )
    }

    #[tokio::test]
    async fn an_approver_sees_every_call_as_it_will_run_and_repeated_gated_fields_are_split() {
        let upstream = Upstream::start().await;
        let deployment = Deployment::new(&approval_config(&upstream));
        let valetd = deployment.start(&[]);
        let gateway = valetd.gateway.clone().unwrap();
        let agent = valetd.client(AGENT_KEY).await;
        let operator = valetd.client(OPERATOR_KEY).await;
        let issued = agent
            .request_token(TokenRequest::new("railway-prod", "deception"))
            .await
            .unwrap();
        let path = "/u/railway/graphql/v2";
        // The first call takes a variable (shown: a scratch volume); aliased copies hard-code
        // production volumes. Refused: one gated call per request.
        let deceptive = serde_json::json!({
            "query": "mutation Drop($id: String!) { volumeDelete(volumeId: $id) b: volumeDelete(volumeId: \"prod-db\") c: volumeDelete(volumeId: \"prod-backups\") }",
            "variables": {"id": "scratch-tmp-42"},
        })
        .to_string();
        let (status, reply) =
            gateway_call(&gateway, issued.token_str(), &deceptive, &[], path).await;
        assert_eq!(status, 403, "{reply}");
        assert!(
            reply["message"]
                .as_str()
                .unwrap()
                .contains("mutation volumeDelete appears 3 times"),
            "{reply}"
        );
        // One call: the approver sees it with its variable substituted.
        let single = serde_json::json!({
            "query": "mutation Drop($id: String!) { volumeDelete(volumeId: $id) }",
            "variables": {"id": "scratch-tmp-42"},
        })
        .to_string();
        let (status, asked) = gateway_call(&gateway, issued.token_str(), &single, &[], path).await;
        assert_eq!(status, 428, "{asked}");
        let id = asked["approval_id"].as_str().unwrap();
        let approval = operator
            .admin()
            .get_approval(v1::GetApprovalRequest { id: id.into() })
            .await
            .unwrap()
            .into_inner();
        assert!(
            approval
                .rendered
                .contains("mutation volumeDelete(volumeId: \"scratch-tmp-42\")"),
            "{}",
            approval.rendered
        );
        assert!(
            approval
                .rendered
                .contains("railway (environment production)")
        );
        assert!(
            upstream
                .seen()
                .iter()
                .filter(|seen| seen.target.starts_with("/graphql"))
                .all(|seen| !String::from_utf8_lossy(&seen.body).contains("volumeDelete")),
            "no volumeDelete reached the upstream"
        );
    }

    #[tokio::test]
    async fn revocation_ends_pending_grants_and_withdraws_their_requests() {
        let upstream = Upstream::start().await;
        let deployment = Deployment::new(&approval_config(&upstream));
        let valetd = deployment.start(&[]);
        let agent = valetd.client(AGENT_KEY).await;
        let operator = valetd.client(OPERATOR_KEY).await;

        // RevokeToken on a pending grant.
        let pending = agent.request_token(prod("hole-revoke")).await.unwrap();
        assert!(pending.is_pending());
        let revoked = agent
            .revoke(&pending.grant.id, "changed my mind")
            .await
            .unwrap();
        assert_eq!(revoked.grant.status, v1::GrantStatus::Revoked as i32);
        let approval_id = pending.approval.unwrap().id;
        let refused = approve(&valetd, OPERATOR_KEY, &approval_id, "production")
            .await
            .unwrap_err();
        assert_eq!(
            refused.code(),
            tonic::Code::FailedPrecondition,
            "{refused:?}"
        );
        assert!(
            refused.message().contains("nothing can be approved"),
            "{}",
            refused.message()
        );

        // RevokeTask and RevokeAll reach pending grants too.
        let in_task = agent.request_token(prod("hole-task")).await.unwrap();
        let reply = agent.revoke_task("hole-task", "done").await.unwrap();
        assert_eq!(reply, vec![in_task.grant.id.clone()]);
        let in_env = agent.request_token(prod("hole-all")).await.unwrap();
        let reply = operator
            .admin()
            .revoke_all(v1::RevokeAllRequest {
                target: Some(v1::revoke_all_request::Target::Environment(
                    "production".into(),
                )),
                reason: "incident".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(reply.n_revoked >= 1);
        let refused = approve(
            &valetd,
            OPERATOR_KEY,
            &in_env.approval.unwrap().id,
            "production",
        )
        .await
        .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        let audit = std::fs::read_to_string(deployment.audit_path()).unwrap();
        assert!(audit.contains("\"action\":\"approval.withdraw\""));
    }

    #[tokio::test]
    async fn an_operator_renewing_an_agents_grant_receives_no_token() {
        let deployment = Deployment::standard();
        let valetd = deployment.start(&[]);
        let agent = valetd.client(AGENT_KEY).await;
        let operator = valetd.client(OPERATOR_KEY).await;
        let issued = agent
            .request_token(
                TokenRequest::new("deploy-staging", "hole-renew")
                    .with_param("project", "shop")
                    .with_ttl(Duration::from_secs(60)),
            )
            .await
            .unwrap();
        let renewed = operator
            .renew(&issued.grant.id, Some(Duration::from_secs(300)))
            .await
            .unwrap();
        assert!(
            renewed.token.is_empty(),
            "only the requester receives a token"
        );
        assert!(
            renewed.grant.expires_at.unwrap().seconds > issued.grant.expires_at.unwrap().seconds,
            "the grant was extended"
        );
        let own = agent
            .renew(&issued.grant.id, Some(Duration::from_secs(600)))
            .await
            .unwrap();
        assert!(
            !own.token.is_empty(),
            "the requester still receives its token"
        );
    }

    #[tokio::test]
    async fn a_reload_ends_live_grants_the_new_config_no_longer_allows() {
        let deployment = Deployment::standard();
        let valetd = deployment.start(&[]);
        let agent = valetd.client(AGENT_KEY).await;
        let admin = valetd.client(valet_tests::ADMIN_KEY).await;
        let issued = agent
            .request_token(
                TokenRequest::new("deploy-staging", "hole-reload").with_param("project", "shop"),
            )
            .await
            .unwrap();
        let limited = agent
            .request_token(TokenRequest::new("limited", "hole-reload"))
            .await
            .unwrap();
        // The agent may no longer request deploy-staging.
        let config = std::fs::read_to_string(deployment.config_path()).unwrap();
        std::fs::write(
            deployment.config_path(),
            config.replace(
                "scopes = [\"deploy-staging\", \"limited\", \"short\"]",
                "scopes = [\"limited\", \"short\"]",
            ),
        )
        .unwrap();
        let reply = admin
            .admin()
            .reload_config(v1::ReloadConfigRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.n_grants_ended, 1, "{reply:?}");
        let introspected = agent.introspect(issued.token_str()).await.unwrap();
        assert!(!introspected.active);
        assert!(
            introspected.reason.contains(
                "config reload: principal \"agent\" may no longer request scope \"deploy-staging\""
            ),
            "{}",
            introspected.reason
        );
        assert!(agent.renew(&issued.grant.id, None).await.is_err());
        assert!(
            agent.introspect(limited.token_str()).await.unwrap().active,
            "the rest stays"
        );
    }

    #[tokio::test]
    async fn call_approvals_are_bounded_reused_counted_and_listed_in_pages() {
        let upstream = Upstream::start().await;
        let deployment = Deployment::new(&bounded_config(&upstream));
        let valetd = deployment.start(&[]);
        let gateway = valetd.gateway.clone().unwrap();
        let agent = valetd.client(AGENT_KEY).await;
        let operator = valetd.client(OPERATOR_KEY).await;
        let issued = agent
            .request_token(TokenRequest::new("railway-prod", "flood"))
            .await
            .unwrap();
        let path = "/u/railway/graphql/v2";
        let delete = |volume: &str| {
            serde_json::json!({"query": format!("mutation {{ volumeDelete(volumeId: \"{volume}\") }}")}).to_string()
        };
        // Identical retries point at one request.
        let mut ids = std::collections::BTreeSet::new();
        for _ in 0..10 {
            let (status, asked) =
                gateway_call(&gateway, issued.token_str(), &delete("v-1"), &[], path).await;
            assert_eq!(status, 428, "{asked}");
            ids.insert(asked["approval_id"].as_str().unwrap().to_string());
        }
        assert_eq!(ids.len(), 1, "identical pending calls reuse one request");
        // Distinct calls are capped per grant.
        for volume in ["v-2", "v-3"] {
            let (status, _) =
                gateway_call(&gateway, issued.token_str(), &delete(volume), &[], path).await;
            assert_eq!(status, 428);
        }
        let (status, refused) =
            gateway_call(&gateway, issued.token_str(), &delete("v-4"), &[], path).await;
        assert_eq!(status, 403, "{refused}");
        assert!(
            refused["message"]
                .as_str()
                .unwrap()
                .contains("max_pending_per_grant"),
            "{refused}"
        );
        // Listing pages: two per page, every request once.
        let mut seen = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = operator
                .admin()
                .list_approvals(v1::ListApprovalsRequest {
                    pending_only: true,
                    page_size: 2,
                    page_token: page_token.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            assert!(page.approvals.len() <= 2);
            seen.extend(page.approvals.into_iter().map(|approval| approval.id));
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        assert_eq!(seen.len(), 3, "{seen:?}");
        // Asking counted as a use of the grant.
        let grant = operator
            .admin()
            .list_grants(v1::ListGrantsRequest {
                filter: Some(v1::GrantFilter {
                    task_id: "flood".into(),
                    ..v1::GrantFilter::default()
                }),
                ..v1::ListGrantsRequest::default()
            })
            .await
            .unwrap()
            .into_inner()
            .grants
            .remove(0);
        assert_eq!(grant.uses, 3);
    }

    #[tokio::test]
    async fn text_that_could_disguise_a_request_is_refused_or_escaped_for_the_approver() {
        let upstream = Upstream::start().await;
        let deployment = Deployment::new(&approval_config(&upstream));
        let valetd = deployment.start(&[]);
        let agent = valetd.client(AGENT_KEY).await;
        let operator = valetd.client(OPERATOR_KEY).await;
        // Where the agent writes free text, such characters are refused as they enter.
        let refused = agent
            .request_token(prod("bidi").with_purpose("rotate logs \u{202E}gnp.exe\u{202C} now"))
            .await
            .unwrap_err();
        assert_eq!(
            refused.code(),
            Some(tonic::Code::InvalidArgument),
            "{refused}"
        );
        // In a call's arguments they are the agent's data: shown escaped, never as they act.
        let issued = agent
            .request_token(TokenRequest::new("railway-prod", "bidi-call"))
            .await
            .unwrap();
        let gateway = valetd.gateway.clone().unwrap();
        let delete = serde_json::json!({
            "query": "mutation Drop($id: String!) { volumeDelete(volumeId: $id) }",
            "variables": {"id": "vol-\u{202E}bd-dorp"},
        })
        .to_string();
        let (status, asked) = gateway_call(
            &gateway,
            issued.token_str(),
            &delete,
            &[],
            "/u/railway/graphql/v2",
        )
        .await;
        assert_eq!(status, 428, "{asked}");
        let approval = operator
            .admin()
            .get_approval(v1::GetApprovalRequest {
                id: asked["approval_id"].as_str().unwrap().to_string(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            !approval.rendered.contains('\u{202E}'),
            "{}",
            approval.rendered
        );
        assert!(
            approval.rendered.contains("\\u{202E}"),
            "{}",
            approval.rendered
        );
    }
}

/// Runs the CLI as `key` against `server`; returns the exit code, stdout and stderr.
fn cli(server: &str, key: &str, arguments: &[&str]) -> (i32, String, String) {
    let output = std::process::Command::new(valet_tests::binary("valet"))
        .args(arguments)
        .env("VALET_SERVER", server)
        .env("VALET_KEY", key)
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn waiting_for_an_approval_is_a_flow_an_agent_can_hand_on_and_resume() {
    let upstream = Upstream::start().await;
    let deployment = Deployment::new(&approval_config(&upstream));
    let valetd = deployment.start(&[]);
    let server = valetd.address.clone();

    // --no-wait --json: the pending grant and approval as JSON, the exact command on stderr.
    let (code, stdout, stderr) = cli(
        &server,
        AGENT_KEY,
        &[
            "--json",
            "token",
            "request",
            "--scope",
            "prod-deploy",
            "--task",
            "flow-1",
            "--param",
            "project=shop",
            "--no-wait",
        ],
    );
    assert_eq!(code, 3, "{stderr}");
    let pending: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(pending["status"], "pending");
    let approval_id = pending["approval"]["id"].as_str().unwrap().to_string();
    let grant_id = pending["grant"]["id"].as_str().unwrap().to_string();
    let command = format!("valet approve {approval_id} --confirm production");
    assert!(
        stderr.contains(&command),
        "the hint names {command:?}: {stderr}"
    );
    assert!(
        stderr.contains(&format!("valet token wait {grant_id}")),
        "{stderr}"
    );

    // A bounded wait that ends undecided says how to resume.
    let (code, _, stderr) = cli(
        &server,
        AGENT_KEY,
        &["token", "wait", &grant_id, "--wait", "1s"],
    );
    assert_eq!(code, 3, "{stderr}");
    assert!(
        stderr.contains(&format!("valet token wait {grant_id}")),
        "{stderr}"
    );

    // The approver runs exactly the command handed on; the waiter resumes and gets the token.
    let waiter = {
        let server = server.clone();
        let grant_id = grant_id.clone();
        tokio::task::spawn_blocking(move || cli(&server, AGENT_KEY, &["token", "wait", &grant_id]))
    };
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let words: Vec<&str> = command.split(' ').skip(1).collect();
    let (code, _, stderr) = cli(&server, OPERATOR_KEY, &words);
    assert_eq!(code, 0, "{stderr}");
    let (code, stdout, stderr) = waiter.await.unwrap();
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        stdout.trim().split('.').count(),
        3,
        "a token on stdout: {stdout}"
    );

    // The default wait follows the request's timeout (2 s here), and exec waits the same way:
    // undecided, the command is not run.
    let marker = deployment.path("ran");
    let started = std::time::Instant::now();
    let (code, _, stderr) = cli(
        &server,
        AGENT_KEY,
        &[
            "exec",
            "--scope",
            "quick-approval",
            "--task",
            "flow-2",
            "--",
            "touch",
            marker.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 3, "{stderr}");
    assert!(!marker.exists(), "the command ran without approval");
    assert!(stderr.contains("until the request expires"), "{stderr}");
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
}
