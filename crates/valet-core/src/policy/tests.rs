//! Scope evaluation: every way a request can be refused, and the narrowing that is granted.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use super::*;
use crate::config::Config;

const CONFIG: &str = r#"
[server]
data_dir = "data"
issuer = "https://valet.test"
max_ttl = "1h"

[audit]
path = "audit.jsonl"

[[credential]]
name = "railway"
env = "RAILWAY_TOKEN"

[[scope]]
name = "railway-domains"
credential = "railway"
environment = "staging"
audience = "railway"
default_ttl = "5m"
max_ttl = "30m"
max_uses = 10
[scope.params.project]
pattern = "[a-z0-9-]{1,32}"
[scope.params.service]
values = ["web", "worker"]
required = false

[[scope]]
name = "railway-admin"
credential = "railway"
environment = "production"
audience = "railway"
default_ttl = "5m"
max_ttl = "1h"
renewable = false

[[principal]]
name = "ci-agent"
roles = ["agent"]
key_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
scopes = ["railway-domains"]

[[principal]]
name = "ops"
roles = ["operator"]
key_sha256 = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752"

[[principal]]
name = "root"
roles = ["admin"]
key_sha256 = "fd61a03af4f77d870fc21e05e7e80678095c92d808cfb3b5c279ee04c74aca13"
"#;

fn config() -> Config {
    Config::parse(CONFIG, Path::new("/etc/valet")).unwrap()
}

fn request(params: &[(&str, &str)]) -> TokenRequest {
    TokenRequest {
        scope: "railway-domains".into(),
        task_id: "task-42".into(),
        purpose: "add a custom domain".into(),
        ttl: None,
        params: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        audience: None,
    }
}

#[test]
fn a_valid_request_gets_the_scope_defaults_and_only_its_params() {
    let config = config();
    let agent = &config.principals["ci-agent"];
    let terms = authorize(&config, agent, &request(&[("project", "shop-web")])).unwrap();
    assert_eq!(terms.ttl, Duration::from_secs(300));
    assert_eq!(terms.max_lifetime, Duration::from_secs(1800));
    assert_eq!(terms.environment, "staging");
    assert_eq!(terms.max_uses, Some(10));
    assert_eq!(
        terms.params,
        BTreeMap::from([("project".to_string(), "shop-web".to_string())])
    );
}

#[test]
fn unknown_and_unlisted_scopes_are_denied_naming_what_is_allowed() {
    let config = config();
    let agent = &config.principals["ci-agent"];
    let mut unknown = request(&[("project", "a")]);
    unknown.scope = "nope".into();
    let error = authorize(&config, agent, &unknown).unwrap_err();
    assert_eq!(
        error.to_string(),
        "scope \"nope\" does not exist; scopes you may request: [railway-domains]"
    );
    let mut unlisted = request(&[]);
    unlisted.scope = "railway-admin".into();
    let error = authorize(&config, agent, &unlisted).unwrap_err();
    assert!(matches!(error, RequestError::ScopeNotAllowed { .. }));
    assert!(error.to_string().contains("[railway-domains]"));
}

#[test]
fn ttl_above_a_cap_is_an_error_naming_the_cap_not_a_clamp() {
    let config = config();
    let agent = &config.principals["ci-agent"];
    let mut long = request(&[("project", "a")]);
    long.ttl = Some(Duration::from_secs(3600));
    let error = authorize(&config, agent, &long).unwrap_err();
    assert_eq!(
        error.to_string(),
        "ttl 1h exceeds scope \"railway-domains\" max_ttl 30m"
    );
    long.ttl = Some(Duration::from_secs(1800));
    assert_eq!(
        authorize(&config, agent, &long).unwrap().ttl,
        Duration::from_secs(1800)
    );
}

#[test]
fn params_missing_unknown_or_outside_their_rule_are_refused() {
    let config = config();
    let agent = &config.principals["ci-agent"];
    assert!(matches!(
        authorize(&config, agent, &request(&[])),
        Err(RequestError::ParamMissing { .. })
    ));
    assert!(matches!(
        authorize(
            &config,
            agent,
            &request(&[("project", "a"), ("region", "eu")])
        ),
        Err(RequestError::ParamUnknown { .. })
    ));
    let error = authorize(&config, agent, &request(&[("project", "Shop Web")])).unwrap_err();
    assert_eq!(
        error.to_string(),
        "scope \"railway-domains\" refuses project=\"Shop Web\": the parameter must be a value matching [a-z0-9-]{1,32}"
    );
    let error = authorize(
        &config,
        agent,
        &request(&[("project", "a"), ("service", "db")]),
    )
    .unwrap_err();
    assert!(error.to_string().contains("one of [web, worker]"));
    assert!(
        authorize(
            &config,
            agent,
            &request(&[("project", "a"), ("service", "web")])
        )
        .is_ok()
    );
}

#[test]
fn oversized_and_malformed_fields_are_refused_naming_the_bound() {
    let config = config();
    let agent = &config.principals["ci-agent"];
    let mut long_task = request(&[("project", "a")]);
    long_task.task_id = "t".repeat(limits::MAX_TASK_ID_BYTES + 1);
    assert_eq!(
        authorize(&config, agent, &long_task)
            .unwrap_err()
            .to_string(),
        "task_id is 129 bytes; at most 128 are allowed"
    );
    let mut long_purpose = request(&[("project", "a")]);
    long_purpose.purpose = "p".repeat(limits::MAX_PURPOSE_BYTES + 1);
    assert!(matches!(
        authorize(&config, agent, &long_purpose),
        Err(RequestError::FieldTooLong { .. })
    ));
    let mut long_value = request(&[("project", &"a".repeat(300))]);
    long_value.scope = "railway-domains".into();
    assert!(matches!(
        authorize(&config, agent, &long_value),
        Err(RequestError::FieldTooLong { .. })
    ));
    let mut spaced = request(&[("project", "a")]);
    spaced.task_id = "task with spaces".into();
    assert!(matches!(
        authorize(&config, agent, &spaced),
        Err(RequestError::FieldInvalid { .. })
    ));
    let mut empty = request(&[("project", "a")]);
    empty.task_id.clear();
    assert_eq!(
        authorize(&config, agent, &empty).unwrap_err(),
        RequestError::FieldMissing { field: "task_id" }
    );
    let many: Vec<(String, String)> = (0..40)
        .map(|i| (format!("p{i}"), "v".to_string()))
        .collect();
    let mut crowded = request(&[]);
    crowded.params = many.into_iter().collect();
    assert!(matches!(
        authorize(&config, agent, &crowded),
        Err(RequestError::TooManyEntries { .. })
    ));
}

#[test]
fn a_different_audience_is_refused() {
    let config = config();
    let agent = &config.principals["ci-agent"];
    let mut other = request(&[("project", "a")]);
    other.audience = Some("github".into());
    assert!(matches!(
        authorize(&config, agent, &other),
        Err(RequestError::AudienceNotAllowed { .. })
    ));
    other.audience = Some("railway".into());
    assert!(authorize(&config, agent, &other).is_ok());
}

#[test]
fn roles_gate_admin_actions_and_agents_act_only_on_their_own_grants() {
    let config = config();
    let agent = &config.principals["ci-agent"];
    let operator = &config.principals["ops"];
    let admin = &config.principals["root"];
    let error = require_role(agent, crate::config::Role::Operator, "listing grants").unwrap_err();
    assert_eq!(
        error.to_string(),
        "principal \"ci-agent\" has roles [agent]; listing grants needs role operator"
    );
    assert!(require_role(admin, crate::config::Role::Operator, "x").is_ok());
    assert!(require_role(operator, crate::config::Role::Admin, "x").is_err());

    let terms = authorize(&config, agent, &request(&[("project", "a")])).unwrap();
    let grant = terms.into_grant("g1".into(), "someone-else", &request(&[]), "k", 0);
    assert!(may_act_on(agent, &grant).is_err());
    assert!(may_act_on(operator, &grant).is_ok());
}

#[test]
fn renewal_respects_the_scope() {
    let config = config();
    let admin_scope_grant = authorize(
        &config,
        &config.principals["ci-agent"],
        &request(&[("project", "a")]),
    )
    .unwrap()
    .into_grant("g".into(), "ci-agent", &request(&[]), "k", 0);
    assert_eq!(
        authorize_renewal(&config, &admin_scope_grant, None).unwrap(),
        Duration::from_secs(300)
    );
    let mut not_renewable = admin_scope_grant.clone();
    not_renewable.scope = "railway-admin".into();
    assert!(matches!(
        authorize_renewal(&config, &not_renewable, None),
        Err(RequestError::RenewalNotAllowed { .. })
    ));
}

mod visibility_and_settlement {
    use std::time::Duration;

    use crate::config::Role;
    use crate::policy::{
        AccessError, may_receive_token, may_see_approval, settlement_lifetime, visible_principal,
    };

    fn principal(name: &str, role: Role) -> crate::config::Principal {
        let mut principal = super::config().principals.get("ops").unwrap().clone();
        principal.name = name.to_string();
        principal.roles = [role].into_iter().collect();
        principal
    }

    #[test]
    fn agents_list_only_their_own_records_and_operators_everyone() {
        let agent = principal("agent", Role::Agent);
        let operator = principal("ops", Role::Operator);
        assert_eq!(
            visible_principal(&agent, None, "grants").unwrap(),
            Some("agent".into())
        );
        assert_eq!(
            visible_principal(&agent, Some("agent"), "grants").unwrap(),
            Some("agent".into())
        );
        assert!(matches!(
            visible_principal(&agent, Some("other"), "grants"),
            Err(AccessError::NotOwnRecord { .. })
        ));
        assert_eq!(visible_principal(&operator, None, "grants").unwrap(), None);
        assert_eq!(
            visible_principal(&operator, Some("other"), "grants").unwrap(),
            Some("other".into())
        );
        assert!(may_see_approval(&agent, "agent").is_ok());
        assert!(may_see_approval(&agent, "other").is_err());
        assert!(may_see_approval(&operator, "other").is_ok());
    }

    #[test]
    fn only_the_requester_receives_a_token() {
        let config = super::config();
        let asker = config.principals.get("ci-agent").unwrap();
        let request = super::request(&[("project", "web")]);
        let grant = crate::policy::authorize(&config, asker, &request)
            .unwrap()
            .into_grant("g-1".into(), "ci-agent", &request, "k", 1_000);
        let owner = principal(&grant.principal, Role::Agent);
        let operator = principal("ops", Role::Operator);
        assert!(may_receive_token(&owner, &grant).is_ok());
        assert!(matches!(
            may_receive_token(&operator, &grant),
            Err(AccessError::NotRequester { .. })
        ));
    }

    #[test]
    fn settlement_caps_the_asked_ttl_as_issue_would() {
        let config = super::config();
        let scope = config.scopes.values().next().unwrap();
        let cap = scope.max_ttl.min(config.server.max_ttl);
        let (ttl, max) = settlement_lifetime(&config, &scope.name, 0).unwrap();
        assert_eq!((ttl, max), (scope.default_ttl.min(cap), cap));
        let (ttl, _) = settlement_lifetime(&config, &scope.name, 10 * 86_400).unwrap();
        assert_eq!(ttl, cap);
        let (ttl, _) = settlement_lifetime(&config, &scope.name, 7).unwrap();
        assert_eq!(ttl, Duration::from_secs(7).min(cap));
        assert!(settlement_lifetime(&config, "gone", 0).is_err());
    }
}

mod reload {
    use std::time::Duration;

    use crate::policy::{LiveGrantDecision, authorize, redecide};

    fn live_grant() -> (crate::config::Config, crate::grant::Grant) {
        let config = super::config();
        let asker = config.principals.get("ci-agent").unwrap();
        let request = super::request(&[("project", "web")]);
        let grant = authorize(&config, asker, &request).unwrap().into_grant(
            "g-1".into(),
            "ci-agent",
            &request,
            "k",
            1_000,
        );
        (config, grant)
    }

    #[test]
    fn a_reload_ends_what_the_new_config_no_longer_allows() {
        let (config, grant) = live_grant();
        assert_eq!(redecide(&config, &grant), LiveGrantDecision::Keep);

        let mut gone = config.clone();
        gone.principals.remove("ci-agent");
        assert!(
            matches!(redecide(&gone, &grant), LiveGrantDecision::Revoke(reason) if reason.contains("no longer exists"))
        );

        let mut unlisted = config.clone();
        unlisted
            .principals
            .get_mut("ci-agent")
            .unwrap()
            .scopes
            .clear();
        assert!(
            matches!(redecide(&unlisted, &grant), LiveGrantDecision::Revoke(reason) if reason.starts_with("config reload: principal"))
        );

        let mut moved = config.clone();
        moved.scopes.get_mut("railway-domains").unwrap().environment = "production".into();
        assert!(
            matches!(redecide(&moved, &grant), LiveGrantDecision::Revoke(reason) if reason.contains("environment"))
        );

        let mut shorter = config.clone();
        shorter.scopes.get_mut("railway-domains").unwrap().max_ttl = Duration::from_secs(60);
        assert_eq!(redecide(&shorter, &grant), LiveGrantDecision::Clamp(1_060));
    }
}
