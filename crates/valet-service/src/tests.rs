//! In-process tests of the service's rules: a real sled store in a temp dir, a real audit log, an
//! injected clock (so no test sleeps for an expiry), and no network.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use valet_core::call::CallRefusal;
use valet_core::config::Config;
use valet_core::grant::{Grant, GrantStatus};
use valet_core::keyring::SealKey;
use valet_core::policy::TokenRequest;
use valet_core::token::{self, Token};
use valet_core::{FakeClock, Secret};
use valet_store::{GrantFilter, SledStore};

use crate::{
    BodySource, CallOutcome, CallRequest, CallSite, Caller, Issued, LoadedConfig, Outbound,
    OutboundAnswer, Overrides, Parts, ServiceError, Valet,
};

const START: i64 = 1_800_000_000;

const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
data_dir = "data"
issuer = "https://valet.test"
max_ttl = "1h"
grant_retention = "1h"

[audit]
path = "audit.jsonl"

[[credential]]
name = "railway"
env = "UNUSED_IN_PROCESS"

[[credential]]
name = "github"
env = "UNUSED_IN_PROCESS_TOO"

[[scope]]
name = "deploy-staging"
credential = "railway"
environment = "staging"
audience = "railway"
default_ttl = "5m"
max_ttl = "10m"
upstream = "railway"
[scope.params.project]
pattern = "[a-z][a-z0-9-]{0,31}"
[[scope.allow]]
methods = ["GET"]
path = "/v1/projects/{project}/**"
[[scope.allow]]
methods = ["POST"]
path = "/v1/deploys"
max_calls = 1
max_body = 64
[[scope.allow]]
methods = ["DELETE"]
path = "/v1/volumes/*"
query = { force = { one_of = ["true", "false"] } }
approval = true

[[scope]]
name = "github-read"
credential = "github"
environment = "ci"
audience = "github"
default_ttl = "5m"
max_ttl = "10m"
upstream = "github"
[[scope.allow]]
methods = ["GET"]
path = "/repos/**"

[[scope]]
name = "prod-deploy"
credential = "railway"
environment = "production"
audience = "railway"
default_ttl = "5m"
max_ttl = "10m"
[scope.approval]
approvers = ["role:operator"]
timeout = "1m"
confirm = "environment"

[[upstream]]
name = "railway"
base_url = "http://127.0.0.1:9"
credential = "railway"
[upstream.inject]
header = { Authorization = "Bearer {secret}" }

[[upstream]]
name = "github"
base_url = "http://127.0.0.1:9"
credential = "github"
[upstream.inject]
header = { Authorization = "Bearer {secret}" }

[[upstream]]
name = "deploy-tools"
kind = "mcp"
base_url = "http://127.0.0.1:9/mcp"
credential = "railway"
[upstream.inject]
header = { Authorization = "Bearer {secret}" }

[[principal]]
name = "agent"
roles = ["agent"]
key_sha256 = "5c2b1d0f2a4e54f7bb4b9d2b1a0a3c1f6f1a0d7a4b8d1f0e2c3a4b5c6d7e8f90"
scopes = ["deploy-staging", "github-read", "prod-deploy"]

[[principal]]
name = "other-agent"
roles = ["agent"]
key_sha256 = "6c2b1d0f2a4e54f7bb4b9d2b1a0a3c1f6f1a0d7a4b8d1f0e2c3a4b5c6d7e8f90"
scopes = ["deploy-staging"]

[[principal]]
name = "operator"
roles = ["operator"]
key_sha256 = "7c2b1d0f2a4e54f7bb4b9d2b1a0a3c1f6f1a0d7a4b8d1f0e2c3a4b5c6d7e8f90"

[[principal]]
name = "admin"
roles = ["admin"]
key_sha256 = "8c2b1d0f2a4e54f7bb4b9d2b1a0a3c1f6f1a0d7a4b8d1f0e2c3a4b5c6d7e8f90"
"#;

/// Tests reach no network: every outbound request fails, as an unreachable host would.
pub(crate) struct NoNetwork;

#[async_trait]
impl Outbound for NoNetwork {
    async fn send(
        &self,
        _request: http::Request<Bytes>,
        _timeout: Duration,
        _max_answer_bytes: usize,
    ) -> Result<OutboundAnswer, String> {
        Err("in-process tests reach no network".into())
    }

    async fn send_trusting(
        &self,
        _ca_pem: &[u8],
        request: http::Request<Bytes>,
        timeout: Duration,
        max_answer_bytes: usize,
    ) -> Result<OutboundAnswer, String> {
        self.send(request, timeout, max_answer_bytes).await
    }
}

struct Fixture {
    directory: tempfile::TempDir,
    valet: Arc<Valet>,
    clock: Arc<FakeClock>,
    /// The engine under the service, as someone with write access to it would reach it.
    raw: Arc<SledStore>,
    seal_key: Secret,
}

async fn fixture() -> Fixture {
    open_fixture(
        tempfile::tempdir().unwrap(),
        SealKey::generate_base64().unwrap(),
        Arc::new(FakeClock::at(START)),
    )
    .await
    .unwrap()
}

async fn open_fixture(
    directory: tempfile::TempDir,
    seal_key: Secret,
    clock: Arc<FakeClock>,
) -> Result<Fixture, ServiceError> {
    let mut config = Config::parse(CONFIG, directory.path()).expect("the test config is valid");
    config.audit.path = directory.path().join("audit.jsonl");
    let raw = Arc::new(SledStore::open(&directory.path().join("store")).unwrap());
    let store = raw.clone();
    let credentials = BTreeMap::from([
        (
            "railway".to_string(),
            Secret::from("railway-root-secret-0123".to_string()),
        ),
        (
            "github".to_string(),
            Secret::from("github-root-secret-4567".to_string()),
        ),
    ]);
    let valet = Valet::open(Parts {
        loaded: LoadedConfig {
            config,
            credentials,
        },
        config_path: directory.path().join("unused.toml"),
        overrides: Overrides::default(),
        seal_key: SealKey::from_base64(&seal_key).unwrap(),
        store,
        clock: clock.clone(),
        outbound: Arc::new(NoNetwork),
        replica: None,
    })
    .await?;
    Ok(Fixture {
        directory,
        valet,
        clock,
        raw,
        seal_key,
    })
}

impl Fixture {
    /// Stops this service as a crash would (no checkpoint), runs `between` on the directory it
    /// leaves (the store closed), and opens the service again on it.
    async fn crash_and_restart(
        self,
        between: impl FnOnce(&std::path::Path),
    ) -> Result<Fixture, ServiceError> {
        let Fixture {
            directory,
            valet,
            clock,
            raw,
            seal_key,
        } = self;
        drop(valet);
        // The audit writer lets go of the store once its last handle is gone.
        for _ in 0..5000 {
            if Arc::strong_count(&raw) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(Arc::strong_count(&raw), 1, "the store is still held");
        drop(raw);
        between(directory.path());
        open_fixture(directory, seal_key, clock).await
    }

    fn caller(&self, name: &str) -> Caller {
        let principal = self.valet.config().principals[name].clone();
        Caller {
            credential: valet_core::identity::Credential::PrincipalKey {
                fingerprint: valet_core::identity::key_fingerprint(
                    principal.key_sha256.as_ref().unwrap(),
                ),
            },
            principal,
            authentication: valet_core::identity::AuthenticatedBy::principal_key(),
            request_id: format!("test-{name}"),
        }
    }

    fn audit_path(&self) -> PathBuf {
        self.directory.path().join("audit.jsonl")
    }

    fn records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.audit_path())
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    async fn issue(&self, who: &str, scope: &str, task: &str) -> (Grant, Token) {
        let mut request = TokenRequest {
            scope: scope.into(),
            task_id: task.into(),
            ..TokenRequest::default()
        };
        if scope == "deploy-staging" {
            request.params.insert("project".into(), "shop".into());
        }
        match self.valet.issue(&self.caller(who), request).await.unwrap() {
            Issued::Token { grant, token, .. } => (grant, token),
            Issued::Pending { .. } => panic!("expected a token"),
        }
    }

    fn advance(&self, seconds: u64) {
        self.clock.advance(Duration::from_secs(seconds));
    }
}

fn request(scope: &str, task: &str) -> TokenRequest {
    TokenRequest {
        scope: scope.into(),
        task_id: task.into(),
        ..TokenRequest::default()
    }
}

#[tokio::test]
async fn an_issued_grant_and_its_audit_record_are_durable_before_the_answer() {
    let fixture = fixture().await;
    let (grant, token) = fixture.issue("agent", "deploy-staging", "t-1").await;
    assert_eq!(grant.expires_at, START + 300);
    let stored = fixture
        .valet
        .store
        .get_grant(&grant.id)
        .await
        .unwrap()
        .unwrap();
    assert!(stored.mac.is_some(), "the stored record carries its MAC");
    assert_eq!(
        Grant {
            mac: None,
            ..stored
        },
        grant
    );
    let records = fixture.records();
    let issued = records.last().unwrap();
    assert_eq!(issued["action"], "token.issue");
    assert_eq!(issued["outcome"], "allowed");
    assert_eq!(issued["grant_id"], grant.id.as_str());
    assert_eq!(issued["token_fingerprint"], token.fingerprint());
    assert!(
        !format!("{token:?}").contains(token.expose()),
        "a token never prints"
    );
}

/// Removes grants from the closed embedded store, as a crash before its flush would have left it.
fn lose_grants(directory: &std::path::Path, grants: &[&Grant]) {
    let db = sled::open(directory.join("store")).unwrap();
    let stored = db.open_tree("grants").unwrap();
    let task_index = db.open_tree("task_index").unwrap();
    for grant in grants {
        assert!(stored.remove(grant.id.as_bytes()).unwrap().is_some());
        let mut key = grant.task_id.as_bytes().to_vec();
        key.push(0);
        key.extend_from_slice(grant.id.as_bytes());
        task_index.remove(key).unwrap();
    }
    db.flush().unwrap();
}

#[tokio::test]
async fn grants_the_store_lost_in_a_crash_are_restored_from_their_issue_records() {
    let fixture = fixture().await;
    let (first, first_token) = fixture.issue("agent", "deploy-staging", "t-lost-1").await;
    let (second, second_token) = fixture.issue("agent", "github-read", "t-lost-2").await;
    let (kept, _) = fixture.issue("agent", "deploy-staging", "t-kept").await;
    let issued = fixture
        .records()
        .into_iter()
        .find(|record| record["grant_id"] == first.id.as_str())
        .unwrap();
    assert_eq!(issued["grant"]["id"], first.id.as_str(), "{issued}");
    assert!(issued["grant"].get("mac").is_none(), "{issued}");

    let fixture = fixture
        .crash_and_restart(|directory| lose_grants(directory, &[&first, &second]))
        .await
        .unwrap();
    for (grant, token) in [(&first, &first_token), (&second, &second_token)] {
        let introspection = fixture
            .valet
            .introspect(&fixture.caller("agent"), token)
            .await
            .unwrap();
        assert!(introspection.active, "{introspection:?}");
        let stored = fixture.valet.store.get_grant(&grant.id).await.unwrap();
        assert_eq!(
            stored.map(|stored| Grant {
                mac: None,
                ..stored
            }),
            Some(grant.clone()),
            "restored as issued, with its MAC (read through the checking store)"
        );
    }
    let restored: Vec<String> = fixture
        .records()
        .into_iter()
        .filter(|record| record["action"] == "grant.restore")
        .map(|record| record["grant_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(restored, [first.id.clone(), second.id.clone()]);
    assert!(
        !restored.contains(&kept.id),
        "a grant the store kept is left as it is"
    );
    let first_restore = fixture
        .records()
        .into_iter()
        .find(|record| record["action"] == "grant.restore")
        .unwrap();
    assert_eq!(
        fixture
            .valet
            .store
            .grants_checkpoint()
            .await
            .unwrap()
            .map(|checkpoint| checkpoint.sequence),
        Some(first_restore["seq"].as_u64().unwrap() - 1),
        "start ends with a checkpoint at the head it found"
    );

    // A grant past its expiry when valetd starts again is of no use: not restored.
    let (expired, _) = fixture.issue("agent", "deploy-staging", "t-expired").await;
    fixture.advance(301);
    let fixture = fixture
        .crash_and_restart(|directory| lose_grants(directory, &[&expired]))
        .await
        .unwrap();
    assert!(
        fixture
            .valet
            .store
            .get_grant(&expired.id)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        fixture
            .records()
            .iter()
            .filter(|record| record["action"] == "grant.restore")
            .count(),
        2
    );
}

#[tokio::test]
async fn an_issue_record_altered_after_a_crash_restores_nothing_and_valetd_says_why() {
    let fixture = fixture().await;
    let (grant, _) = fixture.issue("agent", "deploy-staging", "t-forged").await;
    let audit_path = fixture.audit_path();
    let outcome = fixture
        .crash_and_restart(|directory| {
            lose_grants(directory, &[&grant]);
            // Someone widens the recorded grant's environment, keeping the line well formed.
            let text = std::fs::read_to_string(&audit_path).unwrap();
            let altered = text.replace(
                "\"environment\":\"staging\",\"expires_at\"",
                "\"environment\":\"production\",\"expires_at\"",
            );
            assert_ne!(text, altered);
            std::fs::write(&audit_path, altered).unwrap();
        })
        .await;
    let Err(error) = outcome else {
        panic!("valetd started on an altered audit log");
    };
    let message = error.to_string();
    assert!(message.contains("audit"), "{message}");
}

#[tokio::test]
async fn a_checkpoint_makes_issued_grants_durable_in_the_store_and_records_the_head() {
    let fixture = fixture().await;
    let (grant, _) = fixture
        .issue("agent", "deploy-staging", "t-checkpoint")
        .await;
    assert_eq!(fixture.valet.checkpoint_grants().await.unwrap(), 0);
    let head = fixture.valet.audit.durable_sequence();
    assert_eq!(
        fixture.valet.store.grants_checkpoint().await.unwrap(),
        Some(valet_store::GrantsCheckpoint {
            sequence: head,
            at_stop: false
        })
    );
    // Nothing new: no write.
    assert_eq!(fixture.valet.checkpoint_grants().await.unwrap(), 0);
    // After the checkpoint the grant no longer depends on its record: a crash that loses
    // nothing after it restores nothing.
    let fixture = fixture.crash_and_restart(|_| {}).await.unwrap();
    assert!(
        fixture
            .valet
            .store
            .get_grant(&grant.id)
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        fixture
            .records()
            .iter()
            .all(|record| record["action"] != "grant.restore")
    );
}

#[tokio::test]
async fn renewal_extends_within_the_max_lifetime_then_refuses() {
    let fixture = fixture().await;
    let agent = fixture.caller("agent");
    let (grant, _) = fixture.issue("agent", "deploy-staging", "t-renew").await;
    fixture.advance(240);
    let renewed = fixture.valet.renew(&agent, &grant.id, None).await.unwrap();
    assert_eq!(renewed.grant.expires_at, START + 240 + 300);
    fixture.advance(240);
    let renewed = fixture.valet.renew(&agent, &grant.id, None).await.unwrap();
    assert_eq!(
        renewed.grant.expires_at,
        START + 600,
        "capped at the scope's max lifetime, counted from the issue"
    );
    fixture.advance(60);
    let error = fixture
        .valet
        .renew(&agent, &grant.id, None)
        .await
        .unwrap_err();
    assert!(
        matches!(error, ServiceError::Transition(_)),
        "{error}: at its max lifetime"
    );
    let last = fixture.records().pop().unwrap();
    assert_eq!(
        (last["action"].as_str(), last["outcome"].as_str()),
        (Some("token.renew"), Some("denied"))
    );
    let asked_too_long = fixture
        .valet
        .renew(&agent, &grant.id, Some(Duration::from_secs(3600)))
        .await
        .unwrap_err();
    assert!(
        asked_too_long.to_string().contains("max_ttl"),
        "{asked_too_long}"
    );
}

#[tokio::test]
async fn revocation_is_in_force_at_once_and_a_task_revocation_ends_only_the_callers_grants() {
    let fixture = fixture().await;
    let agent = fixture.caller("agent");
    let (first, first_token) = fixture
        .issue("agent", "deploy-staging", "shared-task")
        .await;
    let (second, _) = fixture.issue("agent", "github-read", "shared-task").await;
    let (others, others_token) = fixture
        .issue("other-agent", "deploy-staging", "shared-task")
        .await;
    let revoked = fixture
        .valet
        .revoke_task(&agent, "shared-task", "done")
        .await
        .unwrap();
    let mut ids: Vec<&str> = revoked.iter().map(|grant| grant.id.as_str()).collect();
    ids.sort();
    let mut expected = vec![first.id.as_str(), second.id.as_str()];
    expected.sort();
    assert_eq!(ids, expected);
    let introspected = fixture
        .valet
        .introspect(&agent, &first_token)
        .await
        .unwrap();
    assert!(!introspected.active);
    assert!(
        introspected.reason.unwrap().contains("revoked"),
        "the reason says why"
    );
    let theirs = fixture
        .valet
        .introspect(&fixture.caller("other-agent"), &others_token)
        .await
        .unwrap();
    assert!(
        theirs.active,
        "another principal's grant in the same task stays"
    );
    assert_eq!(theirs.grant.unwrap().id, others.id);
    // Revoking again changes nothing and is no refusal.
    let (again, notice) = fixture
        .valet
        .revoke_grant(&agent, &first.id, "again")
        .await
        .unwrap();
    assert_eq!((again.status, notice), (GrantStatus::Revoked, None));
}

#[tokio::test]
async fn an_approved_grant_lives_for_its_ttl_from_the_approval_and_a_timeout_denies() {
    let fixture = fixture().await;
    let agent = fixture.caller("agent");
    let operator = fixture.caller("operator");
    let Issued::Pending { grant, approval } = fixture
        .valet
        .issue(&agent, request("prod-deploy", "t-approve"))
        .await
        .unwrap()
    else {
        panic!("prod-deploy needs approval");
    };
    assert_eq!(grant.status, GrantStatus::Pending);
    fixture.advance(30);
    let wrong = fixture
        .valet
        .approve(&operator, &approval.id, Some("staging"), "")
        .await
        .unwrap_err();
    assert!(
        wrong.to_string().contains("environment typed to confirm"),
        "{wrong}"
    );
    fixture
        .valet
        .approve(&operator, &approval.id, Some("production"), "ok")
        .await
        .unwrap();
    let active = fixture.valet.fetch_grant(&grant.id).await.unwrap();
    assert_eq!(active.status, GrantStatus::Active);
    assert_eq!(
        active.expires_at,
        START + 30 + 300,
        "the TTL starts at approval"
    );

    let Issued::Pending { grant, .. } = fixture
        .valet
        .issue(&agent, request("prod-deploy", "t-timeout"))
        .await
        .unwrap()
    else {
        panic!("prod-deploy needs approval");
    };
    fixture.advance(61);
    assert_eq!(fixture.valet.expire_approvals().await.unwrap(), 1);
    let denied = fixture.valet.fetch_grant(&grant.id).await.unwrap();
    assert_eq!(denied.status, GrantStatus::Denied);
}

#[tokio::test]
async fn agents_list_only_their_own_grants_and_operators_every_grant() {
    let fixture = fixture().await;
    fixture.issue("agent", "deploy-staging", "t-list").await;
    fixture
        .issue("other-agent", "deploy-staging", "t-list")
        .await;
    let own = fixture
        .valet
        .list_grants(&fixture.caller("agent"), GrantFilter::default(), 0, "")
        .await
        .unwrap();
    assert_eq!(own.grants.len(), 1);
    assert_eq!(own.grants[0].principal, "agent");
    let all = fixture
        .valet
        .list_grants(&fixture.caller("operator"), GrantFilter::default(), 0, "")
        .await
        .unwrap();
    assert_eq!(all.grants.len(), 2);
    let peeking = GrantFilter {
        principal: Some("other-agent".into()),
        ..GrantFilter::default()
    };
    assert!(
        fixture
            .valet
            .list_grants(&fixture.caller("agent"), peeking, 0, "")
            .await
            .is_err()
    );
}

/// The body of a test call.
struct TestBody {
    bytes: Bytes,
    declared: Option<u64>,
    broken: bool,
}

#[async_trait]
impl BodySource for TestBody {
    fn declared_length(&self) -> Option<u64> {
        self.declared
    }

    async fn read(self: Box<Self>, max: u64) -> Result<Bytes, CallRefusal> {
        if self.broken {
            return Err(CallRefusal::BadBody("the connection broke mid-body".into()));
        }
        if self.bytes.len() as u64 > max {
            return Err(CallRefusal::BodyTooLarge { max });
        }
        Ok(self.bytes)
    }
}

fn site(upstream: &str, method: &str, path: &str) -> CallSite {
    CallSite {
        request_id: "call-test".into(),
        peer: "127.0.0.1:1".parse().unwrap(),
        upstream: upstream.into(),
        method: method.into(),
        path: path.into(),
        query: None,
    }
}

/// Authorizes one call; `Err` carries the refusal's kind.
async fn call(
    fixture: &Fixture,
    site: &CallSite,
    token: Option<&str>,
    approval: Option<&str>,
    body: TestBody,
) -> Result<crate::CallDecision, &'static str> {
    let authorization = token.map(|token| format!("Bearer {token}"));
    fixture
        .valet
        .authorize_call(CallRequest {
            site,
            authorization: authorization.as_deref(),
            approval,
            content_types: vec!["application/json"],
            content_encodings: Vec::new(),
            headers: Vec::new(),
            body: Box::new(body),
            on_authenticated: None,
        })
        .await
        .map_err(|denial| match denial.error {
            ServiceError::Call(refusal) => refusal.kind(),
            other => panic!("not a call refusal: {other}"),
        })
}

fn empty() -> TestBody {
    TestBody {
        bytes: Bytes::new(),
        declared: None,
        broken: false,
    }
}

/// Asserts `refused` left exactly one audit record, denied or failed, with its reason.
fn one_record_with_reason(before: usize, fixture: &Fixture, what: &str) {
    let records = fixture.records();
    assert_eq!(
        records.len(),
        before + 1,
        "{what}: exactly one audit record; got {:?}",
        &records[before..]
    );
    let record = &records[before];
    assert!(
        matches!(record["outcome"].as_str(), Some("denied" | "failed")),
        "{what}: {record}"
    );
    assert!(
        record["reason"]
            .as_str()
            .is_some_and(|reason| !reason.is_empty()),
        "{what}: the record says why: {record}"
    );
}

#[tokio::test]
async fn every_gateway_refusal_kind_leaves_one_audit_record_with_its_reason() {
    let fixture = fixture().await;
    let (grant, token) = fixture.issue("agent", "deploy-staging", "t-gw").await;
    let (_, github_token) = fixture.issue("agent", "github-read", "t-gw").await;
    let (revoked, revoked_token) = fixture.issue("agent", "deploy-staging", "t-gw-2").await;
    fixture
        .valet
        .revoke_grant(&fixture.caller("agent"), &revoked.id, "test")
        .await
        .unwrap();
    let unknown_grant = {
        let mut claims = grant.claims("https://valet.test", START);
        claims.jti = "01JDNOSUCHGRANT00000000000".into();
        token::issue(&claims, fixture.valet.keys.ring().unwrap().current())
    };
    let token = token.expose();
    let allowed = site("railway", "GET", "/v1/projects/shop/services");
    // A reload moves github-read to another upstream: its tokens no longer fit github.
    let mut moved = (*fixture.valet.config()).clone();
    moved.scopes.get_mut("github-read").unwrap().upstream = Some("railway".into());
    fixture.valet.config.store(Arc::new(moved));
    let mut covered = std::collections::BTreeSet::new();
    let refused = |what: &str, outcome: Result<crate::CallDecision, &'static str>| {
        outcome.err().unwrap_or_else(|| panic!("{what}: refused"))
    };

    // (kind, where, token, Valet-Approval header, body)
    type Case<'a> = (
        &'a str,
        CallSite,
        Option<&'a str>,
        Option<&'a str>,
        TestBody,
    );
    let cases: Vec<Case> = vec![
        ("no_token", allowed.clone(), None, None, empty()),
        (
            "bad_token",
            allowed.clone(),
            Some("not-a-token"),
            None,
            empty(),
        ),
        (
            "unknown_grant",
            allowed.clone(),
            Some(unknown_grant.expose()),
            None,
            empty(),
        ),
        (
            "inactive",
            allowed.clone(),
            Some(revoked_token.expose()),
            None,
            empty(),
        ),
        (
            "unknown_upstream",
            site("nope", "GET", "/"),
            Some(token),
            None,
            empty(),
        ),
        (
            "wrong_upstream",
            site("github", "GET", "/repos/a"),
            Some(github_token.expose()),
            None,
            empty(),
        ),
        (
            "wrong_route",
            site("deploy-tools", "GET", "/v1/x"),
            Some(token),
            None,
            empty(),
        ),
        (
            "bad_path",
            site("railway", "GET", "/v1/projects/shop/../x"),
            Some(token),
            None,
            empty(),
        ),
        (
            "bad_query",
            {
                let mut repeated = site("railway", "GET", "/v1/projects/shop/x");
                repeated.query = Some("page=1&Page=2".into());
                repeated
            },
            Some(token),
            None,
            empty(),
        ),
        (
            "denied",
            site("railway", "GET", "/v1/projects/other/x"),
            Some(token),
            None,
            empty(),
        ),
        (
            "body_too_large",
            site("railway", "POST", "/v1/deploys"),
            Some(token),
            None,
            TestBody {
                bytes: Bytes::from(vec![b'x'; 65]),
                declared: Some(65),
                broken: false,
            },
        ),
        (
            "bad_body",
            site("railway", "POST", "/v1/deploys"),
            Some(token),
            None,
            TestBody {
                bytes: Bytes::new(),
                declared: None,
                broken: true,
            },
        ),
        (
            "approval_required",
            site("railway", "DELETE", "/v1/volumes/v1"),
            Some(token),
            None,
            empty(),
        ),
        (
            "approval_refused",
            site("railway", "DELETE", "/v1/volumes/v1"),
            Some(token),
            Some("ap_nosuchapproval"),
            empty(),
        ),
    ];
    for (what, site, token, approval, body) in cases {
        let before = fixture.records().len();
        let kind = refused(what, call(&fixture, &site, token, approval, body).await);
        assert_eq!(kind, what);
        covered.insert(kind);
        let records = fixture.records();
        // An approval request is recorded as its own (allowed) record before the refusal.
        let refusal_records: Vec<&serde_json::Value> = records[before..]
            .iter()
            .filter(|record| record["action"] == "gateway.call")
            .collect();
        assert_eq!(refusal_records.len(), 1, "{what}: {:?}", &records[before..]);
        assert_eq!(refusal_records[0]["refusal"], what);
        assert!(
            refusal_records[0]["reason"]
                .as_str()
                .is_some_and(|reason| !reason.is_empty())
        );
    }

    // The call limit: the first POST passes, the second is refused.
    let deploy = site("railway", "POST", "/v1/deploys");
    call(&fixture, &deploy, Some(token), None, empty())
        .await
        .unwrap();
    let before = fixture.records().len();
    let kind = refused(
        "limit_reached",
        call(&fixture, &deploy, Some(token), None, empty()).await,
    );
    assert_eq!(kind, "limit_reached");
    covered.insert(kind);
    one_record_with_reason(before, &fixture, "limit_reached");

    // A route the gateway does not serve.
    let before = fixture.records().len();
    let error = fixture
        .valet
        .refuse_call(&site("", "GET", "/favicon.ico"), CallRefusal::NotFound)
        .await;
    covered.insert(match &error {
        ServiceError::Call(refusal) => refusal.kind(),
        other => panic!("{other}"),
    });
    one_record_with_reason(before, &fixture, "not_found");

    // A header the gateway refuses before anything else (an MCP protocol revision it does not
    // serve).
    let before = fixture.records().len();
    let error = fixture
        .valet
        .refuse_call(
            &site("deploy-tools", "POST", "/"),
            CallRefusal::BadHeader {
                header: "MCP-Protocol-Version".into(),
                reason: "\"1999-01-01\" is not a revision the gateway serves".into(),
            },
        )
        .await;
    covered.insert(match &error {
        ServiceError::Call(refusal) => refusal.kind(),
        other => panic!("{other}"),
    });
    one_record_with_reason(before, &fixture, "bad_header");

    // Failures after forwarding, recorded as failed.
    let decision = call(&fixture, &allowed, Some(token), None, empty())
        .await
        .unwrap();
    for failure in [
        CallRefusal::UpstreamFailed {
            upstream: "railway".into(),
            detail: "connection refused".into(),
        },
        CallRefusal::UpstreamTimeout {
            upstream: "railway".into(),
            seconds: 30,
        },
    ] {
        let kind = failure.kind();
        let before = fixture.records().len();
        let error = fixture
            .valet
            .record_call_outcome(&decision, CallOutcome::Failed(failure))
            .await
            .unwrap_err();
        assert!(matches!(error, ServiceError::Call(_)));
        covered.insert(kind);
        one_record_with_reason(before, &fixture, kind);
        assert_eq!(fixture.records()[before]["outcome"], "failed");
    }
    // At its share of what serving the upstream costs: refused, not failed.
    let busy = CallRefusal::UpstreamBusy {
        upstream: "railway".into(),
        reason: "principal \"agent\" started 10 server processes in 60 s".into(),
        retry_after_seconds: 6,
    };
    let kind = busy.kind();
    let before = fixture.records().len();
    let error = fixture
        .valet
        .record_call_outcome(&decision, CallOutcome::Failed(busy))
        .await
        .unwrap_err();
    assert!(matches!(error, ServiceError::Call(_)));
    covered.insert(kind);
    one_record_with_reason(before, &fixture, kind);
    assert_eq!(fixture.records()[before]["outcome"], "denied");

    let all: std::collections::BTreeSet<&str> = CallRefusal::KINDS.into_iter().collect();
    assert_eq!(covered, all, "every kind of gateway refusal is exercised");
}

#[tokio::test]
async fn every_refused_operation_leaves_one_audit_record_with_its_reason() {
    let fixture = fixture().await;
    let valet = &fixture.valet;
    let agent = fixture.caller("agent");
    let other = fixture.caller("other-agent");
    let operator = fixture.caller("operator");
    let (grant, token) = fixture.issue("agent", "deploy-staging", "t-refusals").await;
    let others_filter = GrantFilter {
        principal: Some("operator".into()),
        ..GrantFilter::default()
    };
    macro_rules! refused {
        ($what:expr, $operation:expr) => {{
            let before = fixture.records().len();
            let outcome = $operation.await;
            assert!(outcome.is_err(), "{} is refused", $what);
            one_record_with_reason(before, &fixture, $what);
        }};
    }
    refused!(
        "authenticate",
        valet.authenticate(
            crate::Presented {
                bearer: Some(b"Bearer wrong"),
                certificate: None,
                source: None,
            },
            "/x",
            "r"
        )
    );
    refused!("issue", valet.issue(&agent, request("no-such-scope", "t")));
    refused!("renew", valet.renew(&other, &grant.id, None));
    refused!("revoke_grant", valet.revoke_grant(&other, &grant.id, ""));
    refused!("revoke_task", valet.revoke_task(&agent, "two words", ""));
    refused!(
        "revoke_all",
        valet.revoke_all(&agent, Some(GrantFilter::default()), "x")
    );
    refused!("introspect", valet.introspect(&other, &token));
    refused!("wait_for_grant", valet.wait_for_grant(&other, &grant.id, 1));
    refused!(
        "list_grants",
        valet.list_grants(&agent, others_filter.clone(), 0, "")
    );
    refused!("watch_grants", valet.watch_grants(&agent, others_filter));
    refused!("get_approval", valet.get_approval(&agent, "ap_none"));
    refused!("approve", valet.approve(&agent, "ap_none", None, ""));
    refused!(
        "deny_approval",
        valet.deny_approval(&operator, "ap_none", "no")
    );
    refused!("audit_head", valet.audit_head(&agent));
    refused!("audit_tail", valet.audit_tail(&agent, 1, false));
    refused!("rotate_signing_key", valet.rotate_signing_key(&operator));
    refused!(
        "reload",
        valet.reload(crate::ReloadTrigger::Caller(&operator))
    );
    refused!(
        "refuse",
        valet.refuse::<()>(
            &agent,
            valet_core::audit::AuditAction::GrantsList,
            ServiceError::InvalidField {
                field: "filter.status",
                problem: "9 is not a grant status".into()
            }
        )
    );
}

#[tokio::test]
async fn an_approver_is_shown_the_rest_call_as_it_will_run() {
    let fixture = fixture().await;
    let (_, token) = fixture
        .issue("agent", "deploy-staging", "t-rest-approval")
        .await;
    let mut site = site("railway", "DELETE", "/v1/volumes/vol-scratch-7");
    site.query = Some("force=true".into());
    let body = TestBody {
        bytes: Bytes::from_static(
            br#"{"reason":"scratch volume, done with it","keepBackups":false}"#,
        ),
        declared: None,
        broken: false,
    };
    let kind = call(&fixture, &site, Some(token.expose()), None, body)
        .await
        .unwrap_err();
    assert_eq!(kind, "approval_required");
    let pending = fixture
        .valet
        .store
        .list_approvals(true)
        .await
        .unwrap()
        .pop()
        .unwrap();
    let rendered = pending.render();
    let lines: Vec<&str> = rendered.lines().collect();
    assert_eq!(
        lines[..3],
        [
            format!(
                "agent asks to call railway (environment staging) with grant {}:",
                pending.grant_id
            )
            .as_str(),
            "  DELETE /v1/volumes/vol-scratch-7?force=true",
            "  content-type: application/json",
        ]
    );
    // The body as the upstream receives it: canonical JSON, names sorted.
    let forwarded = br#"{"keepBackups":false,"reason":"scratch volume, done with it"}"#;
    let digest = ring::digest::digest(&ring::digest::SHA256, forwarded);
    assert_eq!(
        lines[3],
        format!(
            "  body (61 bytes, sha256 {}):",
            hex::encode(digest.as_ref())
        )
    );
    assert_eq!(
        lines[4..],
        [
            "    {",
            "      \"keepBackups\": false,",
            "      \"reason\": \"scratch volume, done with it\"",
            "    }",
            "  task t-rest-approval",
        ]
    );
}

#[tokio::test]
async fn a_grant_altered_or_planted_in_the_store_is_refused() {
    use valet_store::Store;
    let fixture = fixture().await;
    let agent = fixture.caller("agent");
    let (grant, token) = fixture.issue("agent", "deploy-staging", "t-forge").await;
    // Someone with write access to the store stretches the grant to a day and widens it.
    let stored = fixture.raw.get_grant(&grant.id).await.unwrap().unwrap();
    let altered = Grant {
        expires_at: stored.expires_at + 86_400,
        environment: "production".into(),
        ..stored.clone()
    };
    fixture.raw.update_grant(&stored, &altered).await.unwrap();
    let error = fixture.valet.introspect(&agent, &token).await.unwrap_err();
    assert!(error.to_string().contains("MAC does not check"), "{error}");
    assert!(fixture.valet.renew(&agent, &grant.id, None).await.is_err());
    // A grant planted without a MAC is not listed, and reading it is refused.
    let mut planted = stored.clone();
    planted.id = "01JDPLANTED000000000000000".into();
    planted.mac = None;
    fixture.raw.create_grant(&planted).await.unwrap();
    let listing = fixture
        .valet
        .list_grants(&fixture.caller("operator"), GrantFilter::default(), 0, "")
        .await
        .unwrap();
    assert!(listing.grants.iter().all(|grant| grant.id != planted.id));
}

#[tokio::test]
async fn an_approval_marked_approved_in_the_store_releases_nothing() {
    use valet_store::Store;
    let fixture = fixture().await;
    let (_, token) = fixture
        .issue("agent", "deploy-staging", "t-forged-approval")
        .await;
    let delete = site("railway", "DELETE", "/v1/volumes/vol-prod");
    let kind = call(&fixture, &delete, Some(token.expose()), None, empty())
        .await
        .unwrap_err();
    assert_eq!(kind, "approval_required");
    let pending = fixture
        .raw
        .list_approvals(true)
        .await
        .unwrap()
        .pop()
        .unwrap();
    // Someone with write access to the store approves it in the record.
    let forged = valet_core::approval::ApprovalRequest {
        status: valet_core::approval::ApprovalStatus::Approved,
        ..pending.clone()
    };
    fixture
        .raw
        .update_approval(&pending, &forged)
        .await
        .unwrap();
    let released = fixture
        .valet
        .authorize_call(CallRequest {
            site: &delete,
            authorization: Some(&format!("Bearer {}", token.expose())),
            approval: Some(&pending.id),
            content_types: Vec::new(),
            content_encodings: Vec::new(),
            headers: Vec::new(),
            body: Box::new(empty()),
            on_authenticated: None,
        })
        .await;
    let denial = released.expect_err("a forged approval releases nothing");
    assert!(
        denial.error.to_string().contains("MAC does not check"),
        "{}",
        denial.error
    );
}

#[tokio::test]
async fn a_console_login_link_opens_one_session_which_ends_at_its_lifetime_or_logout() {
    let fixture = fixture().await;
    let operator = fixture.caller("operator");
    // Off until the listener is bound.
    assert!(matches!(
        fixture.valet.create_console_login(&operator).await,
        Err(ServiceError::ConsoleOff)
    ));
    fixture
        .valet
        .serve_console_at("https://valet.test:7473".into());
    let refused = fixture
        .valet
        .create_console_login(&fixture.caller("agent"))
        .await
        .err()
        .unwrap();
    assert!(
        refused.to_string().contains("opening the web console"),
        "{refused}"
    );

    let login = fixture.valet.create_console_login(&operator).await.unwrap();
    let link = login
        .url
        .strip_prefix("https://valet.test:7473/login?link=")
        .expect("the link leads to the console");
    // The link alone opens nothing: its code, shown only to the CLI, goes with it.
    for attempt in 1..=2 {
        let wrong = fixture
            .valet
            .open_console_session(link, "AAAA-AAAA", None, "r0")
            .await
            .err()
            .unwrap();
        assert!(
            wrong
                .to_string()
                .contains(&format!("attempt {attempt} of 5")),
            "{wrong}"
        );
    }
    let opened = fixture
        .valet
        .open_console_session(link, &login.code, None, "r1")
        .await
        .unwrap();
    assert_eq!(opened.pass.principal, "operator");
    let used = fixture
        .valet
        .open_console_session(link, &login.code, None, "r2")
        .await
        .err()
        .unwrap();
    assert!(used.to_string().contains("used already"), "{used}");
    // Five wrong codes use a link up, the right one included after them.
    let guessed = fixture.valet.create_console_login(&operator).await.unwrap();
    let guessed_link = guessed.url.split_once("link=").unwrap().1;
    for _ in 0..5 {
        assert!(
            fixture
                .valet
                .open_console_session(guessed_link, "BBBB-BBBB", None, "r-guess")
                .await
                .is_err()
        );
    }
    let used_up = fixture
        .valet
        .open_console_session(guessed_link, &guessed.code, None, "r-guess")
        .await
        .err()
        .unwrap();
    assert!(used_up.to_string().contains("used"), "{used_up}");

    let session = fixture
        .valet
        .console_caller(&opened.cookie, None, "r3")
        .await
        .unwrap();
    assert_eq!(session.caller.principal.name, "operator");
    assert_eq!(session.caller.authentication.method, crate::CONSOLE_SESSION);
    let csrf = fixture.valet.console_csrf(&session.session);
    fixture
        .valet
        .check_console_csrf(&session, &csrf, "/revoke-all")
        .await
        .unwrap();
    assert!(
        fixture
            .valet
            .check_console_csrf(&session, "stale", "/revoke-all")
            .await
            .is_err()
    );

    // Forged cookies spend their source's failed-authentication budget (60 a minute by
    // default); past it the source is throttled, while a valid session from it still gets in.
    let source = Some("127.0.0.9".parse().unwrap());
    for attempt in 0..60 {
        let refused = fixture
            .valet
            .console_caller("forged.cookie", source, "r-forged")
            .await
            .err()
            .unwrap();
        assert!(
            matches!(refused, ServiceError::Console(_)),
            "attempt {attempt}: {refused}"
        );
    }
    let throttled = fixture
        .valet
        .console_caller("forged.cookie", source, "r-forged")
        .await
        .err()
        .unwrap();
    assert!(
        matches!(throttled, ServiceError::RateLimited { .. }),
        "{throttled}"
    );
    assert!(
        fixture
            .valet
            .console_caller(&opened.cookie, source, "r-valid")
            .await
            .is_ok()
    );

    // The default lifetime is 15 minutes; no sleeping, the clock moves.
    fixture.advance(15 * 60 - 1);
    assert!(
        fixture
            .valet
            .console_caller(&opened.cookie, None, "r4")
            .await
            .is_ok()
    );
    fixture.advance(1);
    let expired = fixture
        .valet
        .console_caller(&opened.cookie, None, "r5")
        .await
        .err()
        .unwrap();
    assert!(expired.to_string().contains("expired"), "{expired}");

    // A link expires after a minute unused.
    let late = fixture.valet.create_console_login(&operator).await.unwrap();
    fixture.advance(60);
    let late_link = late.url.split_once("link=").unwrap().1;
    assert!(
        fixture
            .valet
            .open_console_session(late_link, &late.code, None, "r6")
            .await
            .err()
            .unwrap()
            .to_string()
            .contains("expired")
    );

    // Logging out ends the session for every holder of its cookie.
    let fresh = fixture.valet.create_console_login(&operator).await.unwrap();
    let fresh = fixture
        .valet
        .open_console_session(
            fresh.url.split_once("link=").unwrap().1,
            &fresh.code,
            None,
            "r7",
        )
        .await
        .unwrap();
    let session = fixture
        .valet
        .console_caller(&fresh.cookie, None, "r8")
        .await
        .unwrap();
    fixture.valet.end_console_session(&session).await.unwrap();
    let ended = fixture
        .valet
        .console_caller(&fresh.cookie, None, "r9")
        .await
        .err()
        .unwrap();
    assert!(ended.to_string().contains("logged out"), "{ended}");

    // Operators list the sessions open (read back and MAC-checked) and end any of them.
    let other = fixture.valet.create_console_login(&operator).await.unwrap();
    let other = fixture
        .valet
        .open_console_session(
            other.url.split_once("link=").unwrap().1,
            &other.code,
            None,
            "r10",
        )
        .await
        .unwrap();
    let open = fixture.valet.console_sessions(&operator).await.unwrap();
    let ids: Vec<&str> = open.iter().map(|open| open.pass.id.as_str()).collect();
    assert_eq!(
        ids,
        [other.pass.id.as_str()],
        "ended and expired ones are not listed"
    );
    assert!(open[0].credential_accepted.is_ok());
    assert!(
        fixture
            .valet
            .console_sessions(&fixture.caller("agent"))
            .await
            .is_err()
    );
    fixture
        .valet
        .end_console_session_by_id(&operator, &other.pass.id)
        .await
        .unwrap();
    let ended = fixture
        .valet
        .console_caller(&other.cookie, None, "r11")
        .await
        .err()
        .unwrap();
    assert!(ended.to_string().contains("by an operator"), "{ended}");
    assert!(matches!(
        fixture
            .valet
            .end_console_session_by_id(&operator, &other.pass.id)
            .await,
        Err(ServiceError::ConsoleSessionNotFound { .. })
    ));
    // A session record planted in the store without the key is left out.
    assert!(
        valet_store::Store::claim_once_with(
            &*fixture.raw,
            "console-session/planted",
            START + 6_000,
            b"forged.pass"
        )
        .await
        .unwrap()
    );
    assert!(
        fixture
            .valet
            .console_sessions(&operator)
            .await
            .unwrap()
            .is_empty()
    );

    let records = fixture.records();
    let actions: Vec<(&str, &str)> = records
        .iter()
        .filter(|record| record["action"].as_str().unwrap().starts_with("console."))
        .map(|record| {
            (
                record["action"].as_str().unwrap(),
                record["outcome"].as_str().unwrap(),
            )
        })
        .collect();
    assert!(actions.contains(&("console.login", "denied")));
    assert!(actions.contains(&("console.refuse", "denied")));
    assert!(actions.contains(&("console.logout", "allowed")));
    assert!(
        actions.contains(&("console.sessions", "allowed")),
        "{actions:?}"
    );
    assert!(actions.contains(&("console.session_end", "allowed")));
    // No pass is ever written to the audit log.
    let text = std::fs::read_to_string(fixture.audit_path()).unwrap();
    assert!(!text.contains(&opened.cookie) && !text.contains(link) && !text.contains(&csrf));
}
