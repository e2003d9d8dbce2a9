//! AWS scopes against a local moto server with authentication on: real signed AssumeRole calls,
//! the exact session policy moto received, revocation through the role policy, a wrong root key,
//! and `valet exec` running boto3 with the injected credentials.

use std::process::Command;

use valet_client::{TokenRequest, v1};
use valet_tests::moto::{Moto, python};
use valet_tests::{Deployment, binary, standard_config};

const REPORT_AGENT_KEY: &str = "vk_test_report_agent_51d0a7";

fn deployment(moto: &Moto, secret: &str, revoke: &str) -> Deployment {
    deployment_on(moto, secret, revoke, "")
}

/// [`deployment`], with `store` (a `[store]` section) appended.
fn deployment_on(moto: &Moto, secret: &str, revoke: &str, store: &str) -> Deployment {
    let key_sha256 = hex(&valet_core::Secret::from(REPORT_AGENT_KEY.to_string()).sha256());
    let extra = format!(
        r#"
[[credential]]
name = "aws-root"
kind = "aws"
access_key_id = "{access_key_id}"
file = "aws.secret"
region = "us-east-1"
endpoint = "{endpoint}"

[[scope]]
name = "reports-read"
credential = "aws-root"
provider = "aws-sts"
environment = "staging"
default_ttl = "5m"
max_ttl = "1h"
role_arn = "{role_arn}"
actions = ["s3:ListBucket", "s3:GetObject"]
resources = ["arn:aws:s3:::reports-{{team}}", "arn:aws:s3:::reports-{{team}}/*"]
revoke = "{revoke}"
[scope.conditions.StringEquals]
"aws:RequestedRegion" = "us-east-1"
[scope.params.team]
pattern = "[a-z]{{1,16}}"

[[principal]]
name = "report-agent"
roles = ["agent"]
key_sha256 = "{key_sha256}"
scopes = ["reports-read"]
"#,
        access_key_id = moto.access_key_id,
        endpoint = moto.endpoint,
        role_arn = moto.role_arn,
    );
    let deployment = Deployment::new(&standard_config(&format!("{extra}{store}")));
    std::fs::write(deployment.path("aws.secret"), format!("{secret}\n")).unwrap();
    deployment
}

/// moto, a deployment against it with the right root key, valetd, and the report agent.
struct Running {
    moto: Moto,
    deployment: Deployment,
    valetd: valet_tests::Valetd,
    agent: valet_client::Client,
}

async fn running(revoke: &str) -> Running {
    let moto = Moto::start();
    let deployment = deployment(&moto, &moto.secret_access_key, revoke);
    let valetd = deployment.start(&[]);
    let agent = valetd.client(REPORT_AGENT_KEY).await;
    Running {
        moto,
        deployment,
        valetd,
        agent,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn reports(team: &str) -> TokenRequest {
    TokenRequest::new("reports-read", "task-aws")
        .with_purpose("summarise the quarter")
        .with_param("team", team)
}

const BOTO3_CHECK: &str = r#"
import os, sys, boto3
endpoint = sys.argv[1]
identity = boto3.client("sts", endpoint_url=endpoint).get_caller_identity()
listed = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=sys.argv[2])
print(identity["Arn"])
print(",".join(item["Key"] for item in listed.get("Contents", [])))
"#;

#[tokio::test]
async fn sts_credentials_work_and_carry_exactly_the_scopes_policy() {
    let Running {
        moto,
        deployment,
        valetd,
        agent,
    } = running("expiry").await;

    let issued = agent.request_token(reports("blue")).await.unwrap();
    let session = issued
        .aws
        .clone()
        .expect("an aws-sts scope returns STS credentials");
    let grant_id = &issued.grant.id;
    assert!(
        session.access_key_id.starts_with("ASIA"),
        "{}",
        session.access_key_id
    );
    assert_eq!(session.region, "us-east-1");
    assert!(
        session
            .assumed_role_arn
            .ends_with(&format!("assumed-role/valet-agent/valet-{grant_id}")),
        "{}",
        session.assumed_role_arn
    );
    // The grant asked for 5 minutes; STS's shortest session is 15, and the reply says so.
    let grant_expiry = issued.grant.expires_at.unwrap().seconds;
    assert!(
        session.expires_at >= grant_expiry + 590,
        "{} vs {grant_expiry}",
        session.expires_at
    );
    assert!(
        session.notice.contains("at least 900 s"),
        "{}",
        session.notice
    );
    assert!(
        session.notice.contains("revoke = \"expiry\""),
        "{}",
        session.notice
    );

    // The exact policy moto received, with the team bound into both resources.
    let sessions = moto.sessions();
    assert_eq!(
        sessions,
        vec![(
            format!("valet-{grant_id}"),
            r#"{"Statement":[{"Action":["s3:ListBucket","s3:GetObject"],"Condition":{"StringEquals":{"aws:RequestedRegion":"us-east-1"}},"Effect":"Allow","Resource":["arn:aws:s3:::reports-blue","arn:aws:s3:::reports-blue/*"]}],"Version":"2012-10-17"}"#.to_string()
        )]
    );

    // The credentials work for an allowed call, signed and checked by moto.
    let output = Command::new(python())
        .args(["-c", BOTO3_CHECK, &moto.endpoint, &moto.bucket])
        .env_clear()
        .envs(session.environment())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains(&format!("valet-{grant_id}")), "{stdout}");
    assert!(stdout.contains("q3/summary.txt"), "{stdout}");

    // Renewal is a new session for the new lifetime, with the same policy.
    // Ask for longer than the default, so the renewal extends the grant even within its first second.
    let renewed = agent
        .renew(grant_id, Some(std::time::Duration::from_secs(600)))
        .await
        .unwrap();
    let renewed_session = renewed.aws.expect("renewal returns fresh credentials");
    assert_ne!(renewed_session.access_key_id, session.access_key_id);
    assert_eq!(moto.sessions().len(), 2);

    // The audit log says which session and policy, and holds no secret.
    let audit = std::fs::read_to_string(deployment.audit_path()).unwrap();
    assert!(
        audit.contains(&session.access_key_id),
        "the temporary key id is recorded"
    );
    assert!(audit.contains("aws_session_policy"));
    for secret in [
        moto.secret_access_key.as_str(),
        session.secret_access_key.expose_str().unwrap(),
        session.session_token.expose_str().unwrap(),
        renewed_session.secret_access_key.expose_str().unwrap(),
    ] {
        assert!(!audit.contains(secret), "a secret reached the audit log");
        assert!(
            !valetd.output().contains(secret),
            "a secret reached valetd's log"
        );
    }
}

#[tokio::test]
async fn a_param_outside_its_pattern_never_reaches_aws() {
    let Running {
        moto,
        deployment: _deployment,
        valetd: _valetd,
        agent,
    } = running("expiry").await;

    for team in ["*", "blue/*", "x?", "${aws:username}"] {
        let error = agent.request_token(reports(team)).await.unwrap_err();
        let message = error.to_string();
        assert!(message.contains("team"), "{team}: {message}");
        assert!(message.contains("[a-z]{1,16}"), "{team}: {message}");
    }
    assert!(moto.sessions().is_empty(), "no AssumeRole was made");
}

#[tokio::test]
async fn revocation_writes_a_deny_for_the_session_into_the_role_policy() {
    let Running {
        moto,
        deployment,
        valetd: _valetd,
        agent,
    } = running("role-policy").await;

    let first = agent.request_token(reports("blue")).await.unwrap();
    assert!(
        first
            .aws
            .as_ref()
            .unwrap()
            .notice
            .contains("denies its sessions at once"),
        "{}",
        first.aws.as_ref().unwrap().notice
    );
    let second = agent.request_token(reports("blue")).await.unwrap();
    assert_eq!(moto.role_policy("valet-revoked-sessions"), None);

    let revoked = agent
        .revoke(&first.grant.id, "task finished")
        .await
        .unwrap();
    assert_eq!(revoked.grant.status, v1::GrantStatus::Revoked as i32);
    let notice = revoked.notice.expect("a notice for an aws-sts grant");
    assert!(notice.contains("valet-revoked-sessions"), "{notice}");
    let policy = moto
        .role_policy("valet-revoked-sessions")
        .expect("the deny policy is written");
    let document: serde_json::Value = serde_json::from_str(&policy).unwrap();
    let statement = &document["Statement"][0];
    assert_eq!(statement["Effect"], "Deny");
    assert_eq!(statement["Action"], "*");
    assert_eq!(
        statement["Condition"]["StringEquals"]["aws:SourceIdentity"],
        serde_json::json!([format!("valet-{}", first.grant.id)])
    );

    // A second revocation joins the list; the policy the role already had stays.
    agent.revoke(&second.grant.id, "also done").await.unwrap();
    let policy = moto.role_policy("valet-revoked-sessions").unwrap();
    assert!(
        policy.contains(&format!("valet-{}", first.grant.id)),
        "{policy}"
    );
    assert!(
        policy.contains(&format!("valet-{}", second.grant.id)),
        "{policy}"
    );
    assert!(moto.role_policy("read-reports").is_some());

    let audit = std::fs::read_to_string(deployment.audit_path()).unwrap();
    assert!(
        audit.contains("\"aws.revoke\""),
        "the AWS side of the revocation is audited"
    );
}

#[tokio::test]
async fn revocation_of_an_expiry_scope_says_when_aws_stops_honouring_it() {
    let moto = Moto::start();
    let deployment = deployment(&moto, &moto.secret_access_key, "expiry");
    // The access key id may come from the environment, like the secret.
    let config = std::fs::read_to_string(deployment.config_path()).unwrap();
    let config = config.replace(
        &format!("access_key_id = \"{}\"", moto.access_key_id),
        "access_key_id_env = \"TEST_AWS_ACCESS_KEY_ID\"",
    );
    std::fs::write(deployment.config_path(), config).unwrap();
    let valetd = deployment.start_with_env(&[("TEST_AWS_ACCESS_KEY_ID", &moto.access_key_id)]);
    let agent = valetd.client(REPORT_AGENT_KEY).await;
    let issued = agent.request_token(reports("blue")).await.unwrap();
    let revoked = agent.revoke(&issued.grant.id, "done").await.unwrap();
    let notice = revoked.notice.unwrap();
    assert!(notice.contains("until they expire"), "{notice}");
    assert_eq!(moto.role_policy("valet-revoked-sessions"), None);
}

#[tokio::test]
async fn a_wrong_root_key_is_a_clear_error_that_never_shows_the_key() {
    let moto = Moto::start();
    let wrong = "WRONGwrongWRONGwrongWRONGwrong0123456789";
    let deployment = deployment(&moto, wrong, "expiry");
    let valetd = deployment.start(&[]);
    let agent = valetd.client(REPORT_AGENT_KEY).await;

    let error = agent.request_token(reports("blue")).await.unwrap_err();
    let message = error.to_string();
    assert_eq!(
        error.code(),
        Some(tonic::Code::FailedPrecondition),
        "{message}"
    );
    assert!(
        message.contains("reports-read"),
        "names the scope: {message}"
    );
    assert!(message.contains("AssumeRole"), "names the call: {message}");
    assert!(
        message.contains("SignatureDoesNotMatch"),
        "names AWS's code: {message}"
    );
    assert!(!message.contains(wrong));
    let audit = std::fs::read_to_string(deployment.audit_path()).unwrap();
    assert!(
        audit.contains("SignatureDoesNotMatch"),
        "the failure is audited"
    );
    assert!(!audit.contains(wrong));
    assert!(!valetd.output().contains(wrong));
    assert!(moto.sessions().is_empty());
}

#[tokio::test]
async fn valet_exec_runs_boto3_with_the_injected_credentials() {
    let moto = Moto::start();
    let deployment = deployment(&moto, &moto.secret_access_key, "expiry");
    let valetd = deployment.start(&[]);

    let python = python();
    let output = Command::new(binary("valet"))
        .args([
            "exec",
            "--scope",
            "reports-read",
            "--task",
            "task-exec",
            "--param",
            "team=blue",
            "--",
        ])
        .arg(&python)
        .args(["-c", BOTO3_CHECK, &moto.endpoint, &moto.bucket])
        .env("VALET_SERVER", &valetd.address)
        .env("VALET_KEY", REPORT_AGENT_KEY)
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_PROFILE")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("assumed-role/valet-agent/valet-"),
        "{stdout}"
    );
    assert!(stdout.contains("q3/summary.txt"), "{stdout}");

    // The task's grant was revoked when the command ended.
    let operator = valetd.client(valet_tests::OPERATOR_KEY).await;
    let grants = operator
        .admin()
        .list_grants(v1::ListGrantsRequest {
            filter: Some(v1::GrantFilter {
                task_id: "task-exec".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .grants;
    assert_eq!(grants.len(), 1);
    assert_eq!(grants[0].status, v1::GrantStatus::Revoked as i32);
}

#[tokio::test]
async fn an_approved_aws_grant_gets_its_credentials_when_the_decision_lands() {
    let moto = Moto::start();
    let deployment = deployment(&moto, &moto.secret_access_key, "expiry");
    let config = std::fs::read_to_string(deployment.config_path()).unwrap();
    let config = config.replace(
        "[scope.params.team]",
        "[scope.approval]\napprovers = [\"role:operator\"]\n[scope.params.team]",
    );
    std::fs::write(deployment.config_path(), config).unwrap();
    let valetd = deployment.start(&[]);
    let agent = valetd.client(REPORT_AGENT_KEY).await;

    let pending = agent.request_token(reports("blue")).await.unwrap();
    assert!(pending.is_pending());
    assert!(pending.aws.is_none(), "no credentials before approval");
    assert!(moto.sessions().is_empty(), "no session before approval");

    let operator = valetd.client(valet_tests::OPERATOR_KEY).await;
    operator
        .admin()
        .approve(v1::ApproveRequest {
            id: pending.approval.unwrap().id,
            confirm: String::new(),
            reason: "quarterly report".into(),
        })
        .await
        .unwrap();
    let approved = agent
        .wait_for_grant(&pending.grant.id, std::time::Duration::from_secs(30))
        .await
        .unwrap();
    let session = approved
        .aws
        .expect("the approved grant carries STS credentials");
    assert!(
        session
            .assumed_role_arn
            .ends_with(&format!("valet-{}", pending.grant.id))
    );
    assert_eq!(moto.sessions().len(), 1);
    let audit = std::fs::read_to_string(deployment.audit_path()).unwrap();
    assert!(
        audit.contains("\"aws.session\""),
        "the session minted on approval is audited"
    );
    // Waiting again hands the same session back: no new one is minted per wait.
    for _ in 0..3 {
        let again = agent
            .wait_for_grant(&pending.grant.id, std::time::Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(
            again.aws.expect("credentials again").access_key_id,
            session.access_key_id
        );
    }
    assert_eq!(
        moto.sessions().len(),
        1,
        "one session, however often it waits"
    );
}

/// Revocation lands on the role a grant's sessions were issued on, whatever the config says now,
/// and for as long as those sessions can be valid.
mod revocation_follows_the_grant {
    use std::time::Duration;

    use valet_client::TokenRequest;
    use valet_tests::ADMIN_KEY;

    use super::{reports, running};

    fn denied(moto: &valet_tests::moto::Moto, grant_id: &str) -> bool {
        moto.role_policy("valet-revoked-sessions")
            .is_some_and(|policy| policy.contains(&format!("valet-{grant_id}")))
    }

    #[tokio::test]
    async fn after_the_role_changes_in_config_the_deny_lands_on_the_role_of_the_sessions() {
        let running = running("role-policy").await;
        let issued = running.agent.request_token(reports("blue")).await.unwrap();
        let config = std::fs::read_to_string(running.deployment.config_path()).unwrap();
        std::fs::write(
            running.deployment.config_path(),
            config.replace(
                &running.moto.role_arn,
                "arn:aws:iam::123456789012:role/renamed",
            ),
        )
        .unwrap();
        running
            .valetd
            .client(ADMIN_KEY)
            .await
            .admin()
            .reload_config(valet_client::v1::ReloadConfigRequest {})
            .await
            .unwrap();
        let revoked = running
            .agent
            .revoke(&issued.grant.id, "done")
            .await
            .unwrap();
        let notice = revoked.notice.unwrap();
        assert!(notice.contains(&running.moto.role_arn), "{notice}");
        assert!(denied(&running.moto, &issued.grant.id));
    }

    #[tokio::test]
    async fn when_a_reload_removes_the_scope_its_sessions_are_denied() {
        let running = running("role-policy").await;
        let issued = running.agent.request_token(reports("blue")).await.unwrap();
        let config = std::fs::read_to_string(running.deployment.config_path()).unwrap();
        std::fs::write(
            running.deployment.config_path(),
            config.replace("scopes = [\"reports-read\"]", "scopes = []"),
        )
        .unwrap();
        let reply = running
            .valetd
            .client(ADMIN_KEY)
            .await
            .admin()
            .reload_config(valet_client::v1::ReloadConfigRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.n_grants_ended, 1);
        assert!(denied(&running.moto, &issued.grant.id));
    }

    #[tokio::test]
    async fn after_valets_own_expiry_a_revocation_still_denies_the_live_sessions() {
        let running = running("role-policy").await;
        let issued = running
            .agent
            .request_token(reports("blue").with_ttl(Duration::from_secs(2)))
            .await
            .unwrap();
        // The grant ends in Valet after 2 s; its STS session lasts at least 900 s.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let revoked = running
            .agent
            .revoke(&issued.grant.id, "done")
            .await
            .unwrap();
        assert!(
            revoked
                .notice
                .unwrap()
                .contains("Revoked in Valet and at AWS")
        );
        assert!(denied(&running.moto, &issued.grant.id));
        // Ending the task does the same for whatever of it still lives at AWS.
        let other = running
            .agent
            .request_token(
                TokenRequest::new("reports-read", "task-aws-2")
                    .with_param("team", "blue")
                    .with_ttl(Duration::from_secs(2)),
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        running
            .agent
            .revoke_task("task-aws-2", "done")
            .await
            .unwrap();
        assert!(denied(&running.moto, &other.grant.id));
    }
}

#[tokio::test]
async fn twenty_revocations_across_two_replicas_all_land_in_the_deny() {
    let moto = Moto::start();
    let cluster = valet_tests::etcd::EtcdCluster::start(1);
    let deployments: Vec<Deployment> = (0..2)
        .map(|index| {
            deployment_on(
                &moto,
                &moto.secret_access_key,
                "role-policy",
                &format!(
                    "\n[store]\nengine = \"etcd\"\nendpoints = {}\nprefix = \"/valet/aws\"\nreplica = \"aws-{index}\"\n",
                    cluster.endpoints_toml()
                ),
            )
        })
        .collect();
    let valetds: Vec<valet_tests::Valetd> = deployments
        .iter()
        .map(|deployment| deployment.start(&[]))
        .collect();
    let agents = [
        std::sync::Arc::new(valetds[0].client(REPORT_AGENT_KEY).await),
        std::sync::Arc::new(valetds[1].client(REPORT_AGENT_KEY).await),
    ];
    let mut grants = Vec::new();
    for _ in 0..20 {
        grants.push(
            agents[0]
                .request_token(reports("blue"))
                .await
                .unwrap()
                .grant
                .id,
        );
    }
    // Half through each replica, all at once: each read-modify-write of the role's deny policy
    // holds the role's lock in etcd, so none loses another's entry.
    let revocations: Vec<_> = grants
        .iter()
        .enumerate()
        .map(|(index, id)| {
            let (agent, id) = (agents[index % 2].clone(), id.clone());
            tokio::spawn(async move { agent.revoke(&id, "done").await })
        })
        .collect();
    for revocation in revocations {
        let revoked = revocation.await.unwrap().unwrap();
        assert!(
            revoked
                .notice
                .unwrap()
                .contains("Revoked in Valet and at AWS"),
            "every reply says the deny is in force"
        );
    }
    let policy = moto.role_policy("valet-revoked-sessions").unwrap();
    for id in &grants {
        assert!(
            policy.contains(&format!("valet-{id}")),
            "grant {id} is in the deny"
        );
    }
}
