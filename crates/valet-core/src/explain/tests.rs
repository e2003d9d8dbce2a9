//! Explaining the Railway example: what the maintenance agent may do, and three calls decided as
//! the gateway decides them.

use std::collections::BTreeMap;
use std::path::Path;

use super::*;

const RAILWAY: &str = include_str!("../../../../deploy/examples/railway.toml");
const PROJECT: &str = "2f9c6a1e-4b7d-4c1a-9e3f-5a6b7c8d9e0f";

fn config() -> Config {
    Config::parse(RAILWAY, Path::new("/repo/deploy/examples")).unwrap()
}

#[test]
fn a_principal_is_explained_scope_by_scope() {
    let config = config();
    let params = BTreeMap::from([("project_id".to_string(), PROJECT.to_string())]);
    let explanation = explain(&config, "maintenance-agent", None, &params).unwrap();
    assert_eq!(explanation.scopes.len(), 1);
    let text = words(&explanation);
    for expected in [
        "scope railway-production-maintenance — environment production",
        "GraphQL query [project], mutation []",
        "GraphQL query [], mutation [volumeBackupCreate]",
        "project.id = the grant's {project_id}",
        "mutation [volumeDelete]; each call needs 1 approval(s) from any operator or admin",
        "typing the environment to confirm",
    ] {
        assert!(text.contains(expected), "{expected:?} in:\n{text}");
    }
    let refused = explain(
        &config,
        "domains-agent",
        Some("railway-production-maintenance"),
        &params,
    )
    .unwrap_err();
    assert!(refused.contains("may not request scope"), "{refused}");
}

#[test]
fn calls_are_decided_as_the_gateway_decides_them() {
    let config = config();
    let scope = &config.scopes["railway-production-maintenance"];
    let params = BTreeMap::from([("project_id".to_string(), PROJECT.to_string())]);
    let json = Some("application/json");
    let read = format!(r#"{{"query":"{{ project(id: \"{PROJECT}\") {{ name }} }}"}}"#);
    assert!(matches!(
        explain_call(scope, &params, "POST", "/graphql/v2", json, read.as_bytes()),
        CallVerdict::Allow { .. }
    ));
    let other_project =
        r#"{"query":"{ project(id: \"00000000-0000-0000-0000-000000000000\") { name } }"}"#;
    assert!(matches!(
        explain_call(
            scope,
            &params,
            "POST",
            "/graphql/v2",
            json,
            other_project.as_bytes()
        ),
        CallVerdict::Deny { .. }
    ));
    let delete = r#"{"query":"mutation { volumeDelete(volumeId: \"vol-1\") }"}"#;
    match explain_call(
        scope,
        &params,
        "POST",
        "/graphql/v2",
        json,
        delete.as_bytes(),
    ) {
        CallVerdict::NeedsApproval { approval, .. } => {
            assert!(approval.contains("typing the environment"), "{approval}")
        }
        other => panic!("volumeDelete needs approval, got {other:?}"),
    }
    match explain_call(scope, &params, "DELETE", "/graphql/v2", None, b"") {
        CallVerdict::Deny { reason } => assert!(reason.contains("no rule"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn every_example_config_passes_its_policy_tests() {
    for (name, config_text, cases_text) in [
        (
            "valet",
            include_str!("../../../../deploy/examples/valet.toml"),
            include_str!("../../../../deploy/examples/valet.test.toml"),
        ),
        (
            "github",
            include_str!("../../../../deploy/examples/github.toml"),
            include_str!("../../../../deploy/examples/github.test.toml"),
        ),
        (
            "aws",
            include_str!("../../../../deploy/examples/aws.toml"),
            include_str!("../../../../deploy/examples/aws.test.toml"),
        ),
        (
            "railway",
            RAILWAY,
            include_str!("../../../../deploy/examples/railway.test.toml"),
        ),
        (
            "mcp",
            include_str!("../../../../deploy/examples/mcp.toml"),
            include_str!("../../../../deploy/examples/mcp.test.toml"),
        ),
    ] {
        let config = Config::parse(config_text, Path::new("/repo/deploy/examples")).unwrap();
        let outcomes = cases::run(&config, &cases::parse(cases_text).unwrap());
        assert!(!outcomes.is_empty(), "{name}");
        let failed: Vec<_> = outcomes.iter().filter(|outcome| !outcome.passed).collect();
        assert!(failed.is_empty(), "{name}: {failed:#?}");
    }
}

#[test]
fn the_railway_examples_policy_tests_pass() {
    let file = cases::parse(include_str!(
        "../../../../deploy/examples/railway.test.toml"
    ))
    .unwrap();
    assert_eq!(file.config.as_deref(), Some("railway.toml"));
    let outcomes = cases::run(&config(), &file);
    assert_eq!(outcomes.len(), 7);
    let failed: Vec<_> = outcomes.iter().filter(|outcome| !outcome.passed).collect();
    assert!(failed.is_empty(), "{failed:#?}");
}

#[test]
fn a_case_that_does_not_hold_fails_with_what_happened() {
    let file = cases::parse(
        r#"
[[case]]
name = "production is approval-gated"
environment = "production"
expect = "needs_approval"

[[case]]
name = "wrongly expected to be granted"
principal = "domains-agent"
scope = "railway-production-maintenance"
expect = "granted"

[[case]]
name = "neither scope nor environment"
principal = "domains-agent"
"#,
    )
    .unwrap();
    let outcomes = cases::run(&config(), &file);
    assert!(
        outcomes.iter().all(|outcome| !outcome.passed),
        "{outcomes:#?}"
    );
    assert!(
        outcomes[0].detail.contains(
            "issued without approval to [maintenance-agent via railway-production-maintenance]"
        ),
        "{}",
        outcomes[0].detail
    );
    assert!(
        outcomes[1]
            .detail
            .starts_with("expected granted, got refused"),
        "{}",
        outcomes[1].detail
    );
    assert!(cases::parse("[[case]]\nname = \"x\"\ncolour = \"blue\"\n").is_err());
}

#[test]
fn an_aws_scope_is_explained_with_the_session_policy_a_grant_would_carry() {
    let config = Config::parse(
        include_str!("../../../../deploy/examples/aws.toml"),
        Path::new("/repo/deploy/examples"),
    )
    .unwrap();
    let params = BTreeMap::from([("team".to_string(), "blue".to_string())]);
    let explanation = explain(&config, "report-agent", Some("reports-read"), &params).unwrap();
    let aws = explanation.scopes[0].aws.as_ref().expect("an aws scope");
    let policy = aws
        .session_policy
        .as_ref()
        .expect("rendered with every param given");
    assert_eq!(
        policy["Statement"][0]["Resource"],
        serde_json::json!(["arn:aws:s3:::reports-blue", "arn:aws:s3:::reports-blue/*"])
    );
    let without = explain(&config, "report-agent", None, &BTreeMap::new()).unwrap();
    assert!(
        without.scopes[0]
            .aws
            .as_ref()
            .unwrap()
            .session_policy
            .is_none()
    );
    assert!(words(&without).contains("give every param (--param) to render it"));
}
