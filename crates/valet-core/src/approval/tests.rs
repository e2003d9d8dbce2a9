//! Who may decide an approval, and how an approved call is used exactly once.

use std::collections::BTreeMap;

use super::*;

fn principal(name: &str, roles: &[Role]) -> Principal {
    crate::config::principal_for_tests(name, roles)
}

fn call() -> CallFingerprint {
    CallFingerprint {
        method: "POST".into(),
        target: "/graphql/v2".into(),
        content_type: "application/json".into(),
        body_sha256: "ab".repeat(32),
        graphql: vec!["mutation volumeDelete".into()],
        upstream: "railway".into(),
        calls: vec!["mutation volumeDelete(volumeId: \"v1\")".into()],
        body_bytes: 90,
        rendering: "document:\n  mutation {\n    volumeDelete(volumeId: \"v1\")\n  }".into(),
        headers: Vec::new(),
        rule: "allow[1] POST /graphql/v2".into(),
    }
}

fn request(required: u32, approvers: &[&str], confirm: Option<(&str, &str)>) -> ApprovalRequest {
    ApprovalRequest {
        id: "a1".into(),
        kind: ApprovalKind::Call,
        grant_id: "g1".into(),
        requester: "agent".into(),
        scope: "railway".into(),
        environment: "production".into(),
        task_id: "t".into(),
        purpose: String::new(),
        params: BTreeMap::new(),
        ttl_seconds: 0,
        call: Some(call()),
        created_at: 1_000,
        expires_at: 1_900,
        required,
        approvers: approvers.iter().map(|text| text.to_string()).collect(),
        confirm: confirm.map(|(what, value)| (what.to_string(), value.to_string())),
        approvals: Vec::new(),
        status: ApprovalStatus::Pending,
        status_reason: None,
        updated_at: 1_000,
        mac: None,
    }
}

#[test]
fn n_distinct_approvers_are_needed() {
    let pending = request(2, &[], None);
    let alice = principal("alice", &[Role::Operator]);
    let once = pending.approved_by(&alice, None, "ok", 1_001).unwrap();
    assert_eq!(once.status, ApprovalStatus::Pending);
    assert!(matches!(
        once.approved_by(&alice, None, "again", 1_002),
        Err(ApprovalError::AlreadyApproved { .. })
    ));
    let twice = once
        .approved_by(&principal("bob", &[Role::Admin]), None, "ok", 1_003)
        .unwrap();
    assert_eq!(twice.status, ApprovalStatus::Approved);
    assert_eq!(
        twice.status_reason.as_deref(),
        Some("approved by alice, bob")
    );
}

#[test]
fn no_self_approval_no_agents_and_only_listed_approvers() {
    let pending = request(1, &["carol", "role:admin"], None);
    let requester_as_admin = principal("agent", &[Role::Admin]);
    assert!(matches!(
        pending.approved_by(&requester_as_admin, None, "", 1_001),
        Err(ApprovalError::SelfApproval { .. })
    ));
    assert!(matches!(
        pending.approved_by(&principal("carol", &[Role::Agent]), None, "", 1_001),
        Err(ApprovalError::AgentCannotApprove { .. })
    ));
    assert!(matches!(
        pending.approved_by(&principal("dave", &[Role::Operator]), None, "", 1_001),
        Err(ApprovalError::NotAnApprover { .. })
    ));
    assert!(
        pending
            .approved_by(&principal("carol", &[Role::Operator]), None, "", 1_001)
            .is_ok()
    );
    assert!(
        pending
            .approved_by(&principal("erin", &[Role::Admin]), None, "", 1_001)
            .is_ok()
    );
}

#[test]
fn the_confirmation_must_be_typed_exactly() {
    let pending = request(1, &[], Some(("environment", "production")));
    let alice = principal("alice", &[Role::Operator]);
    assert!(matches!(
        pending.approved_by(&alice, None, "", 1_001),
        Err(ApprovalError::WrongConfirmation { .. })
    ));
    assert!(matches!(
        pending.approved_by(&alice, Some("staging"), "", 1_001),
        Err(ApprovalError::WrongConfirmation { .. })
    ));
    assert_eq!(
        pending
            .approved_by(&alice, Some("production"), "", 1_001)
            .unwrap()
            .status,
        ApprovalStatus::Approved
    );
}

#[test]
fn timeouts_deny_and_denials_need_a_reason() {
    let pending = request(1, &[], None);
    assert_eq!(pending.timed_out(1_899), None);
    let expired = pending.timed_out(1_900).unwrap();
    assert_eq!(expired.status, ApprovalStatus::Expired);
    assert!(matches!(
        pending.approved_by(&principal("alice", &[Role::Operator]), None, "", 1_950),
        Err(ApprovalError::NotPending { .. })
    ));
    let alice = principal("alice", &[Role::Operator]);
    assert!(matches!(
        pending.denied_by(&alice, " ", 1_001),
        Err(ApprovalError::ReasonRequired { .. })
    ));
    assert_eq!(
        pending
            .denied_by(&alice, "not today", 1_001)
            .unwrap()
            .status_reason
            .as_deref(),
        Some("denied by alice: not today")
    );
}

#[test]
fn an_approved_call_is_used_once_and_only_for_the_identical_call() {
    let approved = request(1, &[], None)
        .approved_by(&principal("alice", &[Role::Operator]), None, "", 1_001)
        .unwrap();
    let mut changed_body = call();
    changed_body.body_sha256 = "cd".repeat(32);
    assert!(matches!(
        approved.consumed_by("g1", &changed_body, 1_002),
        Err(ApprovalError::DifferentRequest { .. })
    ));
    let mut changed_target = call();
    changed_target.target = "/graphql/v1".into();
    assert!(matches!(
        approved.consumed_by("g1", &changed_target, 1_002),
        Err(ApprovalError::DifferentRequest { .. })
    ));
    assert!(matches!(
        approved.consumed_by("g2", &call(), 1_002),
        Err(ApprovalError::DifferentRequest { .. })
    ));
    let used = approved.consumed_by("g1", &call(), 1_002).unwrap();
    assert!(matches!(
        used.consumed_by("g1", &call(), 1_003),
        Err(ApprovalError::NotUsable {
            status: ApprovalStatus::Consumed,
            ..
        })
    ));
    assert!(matches!(
        approved.consumed_by("g1", &call(), 1_900),
        Err(ApprovalError::NotUsable {
            status: ApprovalStatus::Expired,
            ..
        })
    ));
    assert!(matches!(
        request(1, &[], None).consumed_by("g1", &call(), 1_001),
        Err(ApprovalError::NotUsable {
            status: ApprovalStatus::Pending,
            ..
        })
    ));
}

#[test]
fn the_rendering_shows_every_call_and_escapes_what_could_disguise_it() {
    let mut approval = request(1, &[], None);
    approval.requester = "agent".into();
    approval.environment = "production".into();
    approval.task_id = "t-1".into();
    approval.purpose = "clean up \u{202E}gnp.exe".into();
    let mut graphql_call = call();
    graphql_call.calls = vec![
        "mutation volumeDelete(volumeId: \"scratch-tmp-42\")".into(),
        "mutation b: volumeDelete(volumeId: \"prod-db\")".into(),
    ];
    approval.call = Some(graphql_call);
    let rendered = approval.render();
    assert_eq!(
        rendered,
        [
            "agent asks to call railway (environment production) with grant g1:",
            "  POST /graphql/v2",
            "  content-type: application/json",
            "  executes:",
            "    mutation volumeDelete(volumeId: \"scratch-tmp-42\")",
            "    mutation b: volumeDelete(volumeId: \"prod-db\")",
            &format!("  body (90 bytes, sha256 {}):", "ab".repeat(32)),
            "    document:",
            "      mutation {",
            "        volumeDelete(volumeId: \"v1\")",
            "      }",
            "  task t-1",
            "  purpose: clean up \\u{202E}gnp.exe",
        ]
        .join("\n")
    );
    assert_eq!(
        escape_for_people("a\u{0007}b\u{2066}c"),
        "a\\u{0007}b\\u{2066}c"
    );

    let mut rest = request(1, &[], None);
    let mut rest_call = call();
    rest_call.calls = Vec::new();
    rest_call.method = "DELETE".into();
    rest_call.target = "/repos/acme/web?force=true".into();
    rest_call.rendering = crate::json::render(&serde_json::json!({"confirm": true}));
    rest.call = Some(rest_call);
    let rendered = rest.render();
    assert!(
        rendered.contains("  DELETE /repos/acme/web?force=true"),
        "{rendered}"
    );
    assert!(rendered.contains("\"confirm\": true"), "{rendered}");
}

#[test]
fn a_request_for_an_ended_grant_is_withdrawn_and_cannot_be_decided() {
    let approval = request(1, &[], None);
    let withdrawn = approval.withdrawn("grant g1 was revoked", 1).unwrap();
    assert_eq!(withdrawn.status, ApprovalStatus::Denied);
    assert!(withdrawn.withdrawn("again", 2).is_none());
}
