//! Session policies are exactly what the scope says with the grant's params bound; config check
//! catches what STS would refuse; the revocation policy grows, prunes and falls back.

use std::collections::BTreeMap;
use std::path::Path;

use super::*;
use crate::config::Config;

const BASE: &str = r#"
[server]
data_dir = "data"
issuer = "https://valet.test"
max_ttl = "12h"
[audit]
path = "audit.jsonl"
[[credential]]
name = "aws"
kind = "aws"
access_key_id = "AKIAIOSFODNN7EXAMPLE"
env = "AWS_ROOT_SECRET"
region = "eu-west-1"
"#;

fn parse(scope: &str) -> Result<Config, crate::config::ConfigErrors> {
    Config::parse(&format!("{BASE}\n{scope}"), Path::new("/etc/valet"))
}

fn problems(scope: &str) -> Vec<String> {
    match parse(scope) {
        Ok(_) => Vec::new(),
        Err(errors) => errors.0.iter().map(ToString::to_string).collect(),
    }
}

const REPORTS: &str = r#"
[[scope]]
name = "reports"
credential = "aws"
provider = "aws-sts"
environment = "staging"
default_ttl = "15m"
max_ttl = "1h"
role_arn = "arn:aws:iam::123456789012:role/agents"
actions = ["s3:GetObject", "s3:ListBucket"]
resources = ["arn:aws:s3:::reports-{team}", "arn:aws:s3:::reports-{team}/${aws:userid}/*"]
[scope.conditions.StringEquals]
"aws:RequestedRegion" = "eu-west-1"
"s3:prefix" = ["{team}/", "shared/"]
[scope.params.team]
pattern = "[a-z0-9-]{1,32}"
"#;

fn params(team: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("team".to_string(), team.to_string())])
}

#[test]
fn the_session_policy_binds_params_and_keeps_iam_policy_variables() {
    let config = parse(REPORTS).unwrap();
    let scope = config.scopes["reports"].aws.as_ref().unwrap();
    assert_eq!(scope.revoke, crate::config::AwsRevoke::AtExpiry);
    assert_eq!(config.scopes["reports"].audience, "aws");
    assert_eq!(
        session_policy(scope, &params("blue")).unwrap(),
        r#"{"Statement":[{"Action":["s3:GetObject","s3:ListBucket"],"Condition":{"StringEquals":{"aws:RequestedRegion":"eu-west-1","s3:prefix":["blue/","shared/"]}},"Effect":"Allow","Resource":["arn:aws:s3:::reports-blue","arn:aws:s3:::reports-blue/${aws:userid}/*"]}],"Version":"2012-10-17"}"#
    );
}

#[test]
fn a_bound_value_may_not_widen_the_policy() {
    let config = parse(REPORTS).unwrap();
    let scope = config.scopes["reports"].aws.as_ref().unwrap();
    for value in ["*", "a?", "${aws:username}", "a\"b", "a\\b"] {
        let error = session_policy(scope, &params(value)).unwrap_err();
        assert!(
            matches!(error, SessionPolicyError::UnsafeParamValue { ref param, .. } if param == "team"),
            "{value}: {error}"
        );
    }
    assert_eq!(
        session_policy(scope, &BTreeMap::new()).unwrap_err(),
        SessionPolicyError::MissingParam {
            param: "team".to_string()
        }
    );
}

#[test]
fn config_check_reports_every_aws_mistake_with_its_key_path() {
    let found = problems(
        r#"
[[credential]]
name = "aws-bad"
kind = "aws"
access_key_id = "not-a-key"
access_key_id_env = "ALSO"
env = "X"
region = "Europe"
endpoint = "ftp://moto"

[[credential]]
name = "plain"
env = "PLAIN"
region = "eu-west-1"

[[scope]]
name = "bad"
credential = "plain"
provider = "aws-sts"
environment = "staging"
default_ttl = "15m"
max_ttl = "13h"
max_uses = 3
role_arn = "arn:aws:iam::1234:role/agents"
actions = ["s3 GetObject"]
resources = ["arn:aws:s3:::reports-{tema}", "bucket", "arn:aws:s3:::x-{opt}"]
revoke = "now"
[scope.params.opt]
values = ["a"]
required = false

[[scope]]
name = "root-key-in-a-token"
credential = "aws"
environment = "staging"
audience = "anything"
default_ttl = "15m"
max_ttl = "1h"
role_arn = "arn:aws:iam::123456789012:role/agents"
"#,
    );
    let expected = [
        "credential[1]: set both access_key_id and access_key_id_env",
        "credential[1].region: \"Europe\" is not a valid AWS region",
        "credential[1].endpoint: \"ftp://moto\" is not a valid endpoint",
        "credential[2].region: \"region\" is not a valid key for this credential; expected only in a credential with kind = \"aws\"",
        "scope[0].credential: \"plain\" is not a valid credential for an aws-sts scope",
        "scope[0].max_uses: \"max_uses\" is not a valid key for this scope",
        "scope[0].max_ttl: 13h exceeds STS's longest role session 12h",
        "scope[0].role_arn: \"arn:aws:iam::1234:role/agents\" is not a valid role ARN",
        "scope[0].actions[0]: \"s3 GetObject\" is not a valid IAM action",
        "scope[0].resources[0]: \"arn:aws:s3:::reports-{tema}\" is not a valid policy value; expected placeholders naming params of this scope; {tema} is not one",
        "scope[0].resources[1]: \"bucket\" is not a valid resource",
        "scope[0].resources[2]: \"arn:aws:s3:::x-{opt}\" is not a valid policy value; expected placeholders naming required params; {opt} is optional",
        "scope[0].revoke: \"now\" is not a valid revocation",
        "scope[1].role_arn: \"role_arn\" is not a valid key for this scope; expected only in a scope with provider = \"aws-sts\"",
        "scope[1].credential: \"aws\" is not a valid credential for this scope",
    ];
    for wanted in expected {
        assert!(
            found.iter().any(|problem| problem.starts_with(wanted)),
            "missing {wanted:?} in:\n{}",
            found.join("\n")
        );
    }
}

#[test]
fn config_check_refuses_a_scope_whose_policy_could_outgrow_sts() {
    let many_resources: Vec<String> = (0..40)
        .map(|index| format!("\"arn:aws:s3:::bucket-number-{index}-{{team}}/*\""))
        .collect();
    let found = problems(&format!(
        r#"
[[scope]]
name = "big"
credential = "aws"
provider = "aws-sts"
environment = "staging"
default_ttl = "15m"
max_ttl = "1h"
role_arn = "arn:aws:iam::123456789012:role/agents"
actions = ["s3:GetObject"]
resources = [{}]
[scope.params.team]
pattern = "[a-z]{{1,20}}"
"#,
        many_resources.join(", ")
    ));
    assert!(
        found
            .iter()
            .any(|problem| problem.starts_with("scope[0].resources: ")
                && problem.contains("at most 2048 characters with every param at its longest")),
        "{found:?}"
    );

    let unbounded = problems(&REPORTS.replace("[a-z0-9-]{1,32}", "[a-z0-9-]+"));
    assert!(
        unbounded.iter().any(
            |problem| problem.starts_with("scope[0].params.team.pattern: ")
                && problem.contains("a length bound")
        ),
        "{unbounded:?}"
    );
}

#[test]
fn an_aws_key_is_never_injected_by_the_gateway() {
    let found = problems(
        r#"
[[upstream]]
name = "api"
base_url = "https://api.example.com"
credential = "aws"
[upstream.inject]
header = { Authorization = "Bearer {secret}" }
"#,
    );
    assert!(
        found.iter().any(|problem| problem.starts_with(
            "upstream[0].credential: \"aws\" is not a valid credential for an upstream"
        )),
        "{found:?}"
    );
}

#[test]
fn revoked_sessions_are_listed_until_their_hour_then_pruned() {
    let now = 1_700_000_000;
    let first = add_revoked_session(None, "valet-A", now + 900, now, 0).unwrap();
    assert_eq!(first.denied_all_issued_before, None);
    let until = (now + 900) / 3600 * 3600 + 3600;
    assert_eq!(
        first.document,
        format!(
            r#"{{"Statement":[{{"Action":"*","Condition":{{"StringEquals":{{"aws:SourceIdentity":["valet-A"]}}}},"Effect":"Deny","Resource":"*","Sid":"ValetRevokedUntil{until}"}}],"Version":"2012-10-17"}}"#
        )
    );
    // A second session in the same hour joins the list; the same one again changes nothing.
    let second = add_revoked_session(Some(&first.document), "valet-B", now + 1000, now, 0).unwrap();
    let again = add_revoked_session(Some(&second.document), "valet-B", now + 1000, now, 0).unwrap();
    assert_eq!(second.document, again.document);
    assert!(second.document.contains(r#"["valet-A","valet-B"]"#));
    // Past its hour, an entry is dropped at the next write.
    let later = add_revoked_session(
        Some(&second.document),
        "valet-C",
        until + 7200,
        until + 1,
        0,
    )
    .unwrap();
    assert!(!later.document.contains("valet-A"));
    assert!(later.document.contains("valet-C"));
}

#[test]
fn statements_valet_did_not_write_are_kept() {
    let foreign = r#"{"Version":"2012-10-17","Statement":[{"Sid":"Ops","Effect":"Deny","Action":"s3:DeleteBucket","Resource":"*"}]}"#;
    let update = add_revoked_session(Some(foreign), "valet-A", 1_000_000, 0, 0).unwrap();
    assert!(update.document.contains(r#""Sid":"Ops""#));
    assert!(update.document.contains("valet-A"));
    assert!(add_revoked_session(Some("not json"), "valet-A", 1, 0, 0).is_err());
}

#[test]
fn too_many_sessions_to_name_deny_every_session_issued_before_now() {
    let now = 1_700_000_000;
    let mut document: Option<String> = None;
    let mut fell_back = None;
    for index in 0..400 {
        let update = add_revoked_session(
            document.as_deref(),
            &source_identity(&format!("01JEXAMPLEGRANT{index:011}")),
            now + 3600,
            now,
            0,
        )
        .unwrap();
        assert!(update.document.chars().count() <= MAX_ROLE_POLICY_CHARS);
        if update.denied_all_issued_before.is_some() {
            fell_back = Some(update);
            break;
        }
        document = Some(update.document);
    }
    let update = fell_back.expect("the list outgrew IAM's limit");
    // A minute ahead of valetd's clock: AWS's may be ahead.
    assert_eq!(update.denied_all_issued_before, Some(now + 60));
    assert!(
        update
            .document
            .contains(r#""DateLessThan":{"aws:TokenIssueTime":"2023-11-14T22:14:20Z"}"#)
    );
    assert!(!update.document.contains("aws:SourceIdentity"));
}

#[test]
fn the_other_inline_policies_of_the_role_count_against_its_limit() {
    let now = 1_700_000_000;
    let mut document: Option<String> = None;
    for index in 0..40 {
        let identity = source_identity(&format!("01JEXAMPLEGRANT{index:011}"));
        let update =
            add_revoked_session(document.as_deref(), &identity, now + 3600, now, 0).unwrap();
        assert_eq!(update.denied_all_issued_before, None);
        document = Some(update.document);
    }
    let next = source_identity("01JEXAMPLEGRANT99999999999");
    // Alone, the role has room for all 41 names.
    let roomy = add_revoked_session(document.as_deref(), &next, now + 3600, now, 0).unwrap();
    assert_eq!(roomy.denied_all_issued_before, None);
    // Another inline policy of 9,800 characters leaves room only for the short fallback.
    let crowded = add_revoked_session(document.as_deref(), &next, now + 3600, now, 9_800).unwrap();
    assert!(crowded.denied_all_issued_before.is_some());
    // One that fills the role leaves no room at all: a clear error, not a silent drop.
    assert!(add_revoked_session(document.as_deref(), &next, now + 3600, now, 10_200).is_err());
}
