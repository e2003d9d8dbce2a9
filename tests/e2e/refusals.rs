//! Every refusal takes valet-service's one path: it leaves exactly one audit record, with its
//! reason, before the caller is answered. The RPCs come from the proto files themselves, so an RPC
//! added without a case here fails this test.

use std::collections::BTreeSet;
use std::str::FromStr;

use valet_client::{TokenRequest, v1};
use valet_tests::{AGENT_KEY, Deployment, OPERATOR_KEY, OTHER_AGENT_KEY};

/// Every `Service/Method` the wire contract defines.
fn rpcs_in_proto() -> BTreeSet<String> {
    let directory = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto/valet/v1");
    let mut rpcs = BTreeSet::new();
    for entry in std::fs::read_dir(&directory).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        let mut service = None;
        for line in text.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("service ") {
                service = rest.split_whitespace().next().map(str::to_string);
            } else if let Some(rest) = line.strip_prefix("rpc ") {
                let method = rest.split('(').next().unwrap().trim();
                rpcs.insert(format!("{}/{method}", service.clone().unwrap()));
            }
        }
    }
    assert!(
        rpcs.len() >= 19,
        "the proto files define the RPCs: {rpcs:?}"
    );
    rpcs
}

fn audit_records(deployment: &Deployment) -> Vec<serde_json::Value> {
    deployment.audit_records()
}

/// Asserts the records written since `before` are exactly one refusal with its reason.
fn one_refusal_record(deployment: &Deployment, before: usize, rpc: &str) -> serde_json::Value {
    let records = audit_records(deployment);
    assert_eq!(
        records.len(),
        before + 1,
        "{rpc}: exactly one audit record for the refusal, got {:?}",
        &records[before..]
    );
    let record = records[before].clone();
    assert_eq!(record["outcome"], "denied", "{rpc}: {record}");
    assert!(
        record["reason"]
            .as_str()
            .is_some_and(|reason| !reason.is_empty()),
        "{rpc}: the record says why: {record}"
    );
    record
}

/// Calls `/valet.v1.<rpc>` with an empty message and a key valetd does not know.
async fn call_with_wrong_key(address: &str, rpc: &str) -> tonic::Status {
    let channel = tonic::transport::Channel::from_shared(address.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let mut request = tonic::Request::new(());
    request
        .metadata_mut()
        .insert("authorization", "Bearer vk_not_a_key".parse().unwrap());
    let path = http::uri::PathAndQuery::from_str(&format!("/valet.v1.{rpc}")).unwrap();
    grpc.unary::<(), (), _>(request, path, tonic_prost::ProstCodec::default())
        .await
        .expect_err("an unknown key is refused")
}

#[tokio::test]
async fn every_rpc_refusal_leaves_one_audit_record_with_its_reason() {
    let deployment = Deployment::standard();
    let valetd = deployment.start(&[]);
    let rpcs = rpcs_in_proto();

    // Authentication comes first for every RPC. The first refusal of its kind from a source is
    // recorded at once; the rest in that window go into one summary (checked at the end).
    for (index, rpc) in rpcs.iter().enumerate() {
        let before = audit_records(&deployment).len();
        let status = call_with_wrong_key(&valetd.address, rpc).await;
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{rpc}");
        if index == 0 {
            let record = one_refusal_record(&deployment, before, rpc);
            assert_eq!(record["action"], "principal.authenticate", "{rpc}");
            assert_eq!(record["reason_kind"], "unknown_key", "{rpc}");
            assert_eq!(record["source"], "127.0.0.1", "{rpc}");
        } else {
            assert_eq!(
                audit_records(&deployment).len(),
                before,
                "{rpc}: a repeated refusal is counted, not written"
            );
        }
    }

    // Then each RPC's own refusals, by an authenticated principal.
    let agent = valetd.client(AGENT_KEY).await;
    let other = valetd.client(OTHER_AGENT_KEY).await;
    let operator = valetd.client(OPERATOR_KEY).await;
    let issued = agent
        .request_token(
            TokenRequest::new("deploy-staging", "t-refusals").with_param("project", "shop"),
        )
        .await
        .unwrap();
    let grant_id = issued.grant.id.clone();
    let others_grants = Some(v1::GrantFilter {
        principal: "operator".into(),
        ..v1::GrantFilter::default()
    });
    let mut covered = BTreeSet::new();
    macro_rules! refused {
        ($rpc:expr, $call:expr) => {{
            let before = audit_records(&deployment).len();
            let outcome = $call.await;
            assert!(outcome.is_err(), "{} is refused", $rpc);
            one_refusal_record(&deployment, before, $rpc);
            covered.insert($rpc.to_string());
        }};
    }
    refused!(
        "Broker/RequestToken",
        agent.request_token(TokenRequest::new("drop-production", "t"))
    );
    refused!(
        "Broker/WaitForGrant",
        other.broker().wait_for_grant(v1::WaitForGrantRequest {
            grant_id: grant_id.clone(),
            timeout_seconds: 1,
        })
    );
    refused!("Broker/RenewToken", other.renew(&grant_id, None));
    refused!("Broker/RevokeToken", other.revoke(&grant_id, "not mine"));
    refused!("Broker/RevokeTask", agent.revoke_task("two words", ""));
    refused!("Broker/Introspect", other.introspect(issued.token_str()));
    refused!(
        "Admin/ListGrants",
        agent.admin().list_grants(v1::ListGrantsRequest {
            filter: others_grants.clone(),
            ..v1::ListGrantsRequest::default()
        })
    );
    refused!(
        "Admin/WatchGrants",
        agent.admin().watch_grants(v1::WatchGrantsRequest {
            filter: others_grants.clone(),
        })
    );
    refused!(
        "Admin/RevokeAll",
        agent.admin().revoke_all(v1::RevokeAllRequest {
            target: Some(v1::revoke_all_request::Target::Environment(
                "staging".into()
            )),
            reason: "not an operator".into(),
        })
    );
    refused!(
        "Admin/RotateSigningKey",
        operator
            .admin()
            .rotate_signing_key(v1::RotateSigningKeyRequest {})
    );
    refused!(
        "Admin/ReloadConfig",
        operator.admin().reload_config(v1::ReloadConfigRequest {})
    );
    refused!(
        "Admin/GetAuditHead",
        agent.admin().get_audit_head(v1::GetAuditHeadRequest {})
    );
    refused!(
        "Admin/AuditTail",
        agent.admin().audit_tail(v1::AuditTailRequest {
            last: 1,
            follow: false,
        })
    );
    refused!(
        "Admin/GetApproval",
        agent.admin().get_approval(v1::GetApprovalRequest {
            id: "ap_none".into()
        })
    );
    refused!(
        "Admin/Approve",
        operator.admin().approve(v1::ApproveRequest {
            id: "ap_none".into(),
            ..v1::ApproveRequest::default()
        })
    );
    refused!(
        "Admin/Deny",
        operator.admin().deny(v1::DenyRequest {
            id: "ap_none".into(),
            reason: "no".into(),
        })
    );
    refused!(
        "Admin/CreateConsoleLogin",
        agent
            .admin()
            .create_console_login(v1::CreateConsoleLoginRequest {})
    );
    refused!(
        "Admin/ListConsoleSessions",
        agent
            .admin()
            .list_console_sessions(v1::ListConsoleSessionsRequest {})
    );
    refused!(
        "Admin/EndConsoleSession",
        agent
            .admin()
            .end_console_session(v1::EndConsoleSessionRequest {
                id: "0123456789abcdef0123456789abcdef".into()
            })
    );
    // These refuse nothing beyond authentication: the JWKS is public, every principal may ask
    // who it is, and list and watch the approval requests it may see (its own; operators: all).
    for rpc in [
        "Broker/GetJwks",
        "Broker/WhoAmI",
        "Admin/ListApprovals",
        "Admin/WatchApprovals",
    ] {
        covered.insert(rpc.to_string());
    }
    assert_eq!(
        covered, rpcs,
        "every RPC of the proto files has its refusal case here"
    );

    // Stopping records the open window's summary: nothing is lost.
    valetd.stop().await;
    let summary = audit_records(&deployment)
        .into_iter()
        .find(|record| record["aggregated"] == "true" && record["reason_kind"] == "unknown_key")
        .expect("a summary of the repeated authentication refusals");
    assert_eq!(summary["action"], "principal.authenticate");
    assert_eq!(summary["source"], "127.0.0.1");
    assert_eq!(summary["n_more"], (rpcs.len() - 1).to_string());
}
