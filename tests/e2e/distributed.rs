//! Distributed mode: the store conformance suite against a real etcd, and several valetd replicas
//! sharing grants, revocations and signing keys through a three-member etcd cluster.

use std::time::{Duration, Instant};

use valet_client::TokenRequest;
use valet_store::{EtcdOptions, EtcdStore};
use valet_tests::etcd::EtcdCluster;
use valet_tests::{
    ADMIN_KEY, AGENT_KEY, Deployment, OPERATOR_KEY, Valetd, is_active, issue_until, standard_config,
};

/// A one-member etcd cluster (a real process) and an engine on it, for one conformance check.
async fn etcd_engine() -> (EtcdCluster, Box<dyn valet_store::Store>) {
    let cluster = EtcdCluster::start(1);
    let store = EtcdStore::connect(EtcdOptions {
        endpoints: cluster.endpoints(),
        prefix: "/conformance".into(),
        username: None,
        password: None,
        replica: "r1".into(),
        retention: Duration::from_secs(3600),
        ca_file: None,
        client_certificate: None,
        // Short, so the conformance check holds a lock past its lease in a few seconds.
        lock_lease: Duration::from_secs(2),
    })
    .await
    .unwrap();
    (cluster, Box::new(store))
}

/// The store conformance suite against a real etcd, one test per check.
mod etcd_conformance {
    valet_store::conformance_tests!(super::etcd_engine);
}

/// Three replicas of one deployment on `cluster`, each with its own data dir and audit log.
fn replicas(cluster: &EtcdCluster) -> (Vec<Deployment>, Vec<Valetd>) {
    let mut deployments = Vec::new();
    let mut valetds = Vec::new();
    for index in 0..3 {
        let store = format!(
            "\n[store]\nengine = \"etcd\"\nendpoints = {}\nprefix = \"/valet/test\"\nreplica = \"replica-{index}\"\n",
            cluster.endpoints_toml()
        );
        let deployment = Deployment::new(&standard_config(&store));
        valetds.push(deployment.start(&[]));
        deployments.push(deployment);
    }
    (deployments, valetds)
}

fn staging(task: &str) -> TokenRequest {
    TokenRequest::new("deploy-staging", task)
        .with_purpose("distributed")
        .with_param("project", "shop")
}

#[tokio::test]
async fn replicas_share_grants_revocations_and_signing_keys() {
    let cluster = EtcdCluster::start(3);
    let (deployments, valetds) = replicas(&cluster);
    let agents = [
        valetds[0].client(AGENT_KEY).await,
        valetds[1].client(AGENT_KEY).await,
        valetds[2].client(AGENT_KEY).await,
    ];

    // Issued on A: active on B and C.
    let issued = agents[0].request_token(staging("task-d1")).await.unwrap();
    assert!(is_active(&agents[1], issued.token_str()).await);
    assert!(is_active(&agents[2], issued.token_str()).await);

    // Revoked on B: refused on A and C from then on. The ordering is asserted; the time it took
    // is reported, not asserted.
    let revoked_at = Instant::now();
    agents[1].revoke(&issued.grant.id, "done").await.unwrap();
    assert!(!is_active(&agents[0], issued.token_str()).await);
    assert!(!is_active(&agents[2], issued.token_str()).await);
    println!(
        "revocation on replica B refused on A and C within {:?} of the revoke call",
        revoked_at.elapsed()
    );

    // A key rotated on A is used by all: every replica serves the same JWKS soon after.
    let admin = valetds[0].client(ADMIN_KEY).await;
    let rotated = admin
        .admin()
        .rotate_signing_key(valet_client::v1::RotateSigningKeyRequest {})
        .await
        .unwrap()
        .into_inner();
    let started = Instant::now();
    for valetd in &valetds[1..] {
        let client = valetd.client(AGENT_KEY).await;
        loop {
            let jwks = client
                .broker()
                .get_jwks(valet_client::v1::GetJwksRequest {})
                .await
                .unwrap()
                .into_inner();
            if jwks.keys.iter().any(|key| key.kid == rotated.new_key_id) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "replica never picked up the rotated key"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // A token signed on C with the new key verifies on A.
    let fresh = agents[2].request_token(staging("task-d2")).await.unwrap();
    assert!(is_active(&agents[0], fresh.token_str()).await);

    // Every replica keeps its own audit log, each record naming the replica, each log verifiable
    // against the chain head that replica keeps in etcd.
    for (index, deployment) in deployments.iter().enumerate() {
        let audit = std::fs::read_to_string(deployment.audit_path()).unwrap();
        assert!(
            audit.contains(&format!("\"replica\":\"replica-{index}\"")),
            "replica {index}'s records name it"
        );
        let verified = std::process::Command::new(valet_tests::binary("valet"))
            .args(["audit", "verify", "--fetch-head"])
            .arg(deployment.audit_path())
            .env("VALET_SERVER", &valetds[index].address)
            .env("VALET_KEY", OPERATOR_KEY)
            .output()
            .unwrap();
        assert!(
            verified.status.success(),
            "replica {index}: {}{}",
            String::from_utf8_lossy(&verified.stdout),
            String::from_utf8_lossy(&verified.stderr)
        );
    }
    let operator = valetds[2].client(OPERATOR_KEY).await;
    let listed = operator
        .admin()
        .list_grants(valet_client::v1::ListGrantsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .grants;
    assert_eq!(listed.len(), 2, "every replica lists every grant");
}

#[tokio::test]
async fn losing_etcd_quorum_fails_closed_and_nothing_is_lost_when_it_returns() {
    let mut cluster = EtcdCluster::start(3);
    let (_deployments, valetds) = replicas(&cluster);
    let agent = valetds[0].client(AGENT_KEY).await;
    let before = agent.request_token(staging("task-q1")).await.unwrap();

    // One member down: the cluster still has quorum, and valetd carries on — once a new leader
    // is elected, if the killed member led (a few seconds on a busy machine; meanwhile requests
    // fail closed, UNAVAILABLE).
    cluster.kill(2);
    cluster.wait_healthy(Duration::from_secs(20));
    let during = agent.request_token(staging("task-q2")).await.unwrap();
    let mut introspected = agent.introspect(during.token_str()).await;
    let started = std::time::Instant::now();
    while introspected
        .as_ref()
        .is_err_and(|error| error.code() == Some(tonic::Code::Unavailable))
        && started.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
        introspected = agent.introspect(during.token_str()).await;
    }
    assert!(
        introspected.as_ref().is_ok_and(|reply| reply.active),
        "with one member of three down the token introspects as active: {introspected:?}"
    );

    // Quorum lost: issuing and introspection fail closed with UNAVAILABLE, not a guess.
    cluster.kill(1);
    let refused = agent.request_token(staging("task-q3")).await.unwrap_err();
    assert_eq!(refused.code(), Some(tonic::Code::Unavailable), "{refused}");
    assert!(refused.to_string().contains("etcd"), "{refused}");
    let introspected = agent.introspect(before.token_str()).await;
    assert!(
        introspected.is_err_and(|error| error.code() == Some(tonic::Code::Unavailable)),
        "introspection never answers active without the store"
    );
    // Readiness follows the store: the broker reports NOT_SERVING, the process stays alive.
    use tonic_health::pb::health_check_response::ServingStatus;
    let broker_health = || async {
        let channel = tonic::transport::Endpoint::from_shared(valetds[0].address.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let health = tonic_health::pb::health_client::HealthClient::new(channel);
        let status = |service: &'static str| {
            let mut health = health.clone();
            async move {
                health
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: service.into(),
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .status()
            }
        };
        let overall = status("").await;
        let broker = status("valet.v1.Broker").await;
        (overall, broker)
    };
    let started = Instant::now();
    loop {
        let (overall, broker) = broker_health().await;
        assert_eq!(overall, ServingStatus::Serving, "liveness stays up");
        if broker == ServingStatus::NotServing {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the broker never reported NOT_SERVING without etcd"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Quorum back: everything issued before is still there, and issuing works again.
    cluster.restart(1);
    cluster.restart(2);
    cluster.wait_healthy(Duration::from_secs(30));
    let started = Instant::now();
    loop {
        if agent.request_token(staging("task-q4")).await.is_ok() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "valetd did not recover"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let started = Instant::now();
    while broker_health().await.1 != ServingStatus::Serving {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the broker never reported SERVING again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Replica B reconnects to etcd on its own schedule: wait until it answers at all; what it
    // answers must then be that both grants are still active.
    let other = valetds[1].client(AGENT_KEY).await;
    for token in [before.token_str(), during.token_str()] {
        let started = Instant::now();
        let reply = loop {
            match other.introspect(token).await {
                Ok(reply) => break reply,
                Err(error) => {
                    assert!(
                        started.elapsed() < Duration::from_secs(20),
                        "replica B did not recover: {error}"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        assert!(reply.active, "a grant issued around the outage was lost");
    }

    // The replicas' watches resumed after the outage: a rotation on A reaches B.
    let rotated = valetds[0]
        .client(ADMIN_KEY)
        .await
        .admin()
        .rotate_signing_key(valet_client::v1::RotateSigningKeyRequest {})
        .await
        .unwrap()
        .into_inner();
    let fresh = agent.request_token(staging("task-q5")).await.unwrap();
    assert!(fresh.grant.key_id == rotated.new_key_id);
    let started = Instant::now();
    while !is_active(&other, fresh.token_str()).await {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "replica B never learnt the key rotated on A after the outage"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_an_etcd_member_under_load_does_not_stop_the_service() {
    let mut cluster = EtcdCluster::start(3);
    let (_deployments, valetds) = replicas(&cluster);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = Instant::now();
    let mut workers = Vec::new();
    for (index, valetd) in valetds.iter().enumerate() {
        for worker in 0..2 {
            let client = valetd.client(AGENT_KEY).await;
            workers.push(tokio::spawn(issue_until(
                client,
                staging(&format!("load-{index}-{worker}")),
                stop.clone(),
                started,
            )));
        }
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let killed_at = started.elapsed();
    cluster.kill(0);
    // Once the two left elect a leader (if the killed member led), the load goes on a while.
    tokio::task::block_in_place(|| cluster.wait_healthy(Duration::from_secs(20)));
    tokio::time::sleep(Duration::from_millis(2000)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut issued = Vec::new();
    let mut failed = Vec::new();
    for worker in workers {
        let (more_issued, more_failed) = worker.await.unwrap();
        issued.extend(more_issued);
        failed.extend(more_failed);
    }
    let after_kill = issued.iter().filter(|(at, _)| *at > killed_at).count();
    println!(
        "etcd member killed at {killed_at:?}: {} tokens issued ({after_kill} after the kill), {} requests refused: {:?}",
        issued.len(),
        failed.len(),
        failed
            .iter()
            .map(|(at, _, message)| (at, message))
            .collect::<Vec<_>>()
    );
    assert!(after_kill > 0, "the service carried on after the kill");
    for (_, code, message) in &failed {
        assert_eq!(
            *code,
            tonic::Code::Unavailable,
            "a refusal fails closed: {message}"
        );
    }
    // Requests succeed again once etcd has a new leader: on every replica.
    for valetd in &valetds {
        valetd
            .client(AGENT_KEY)
            .await
            .request_token(staging("after-the-kill"))
            .await
            .expect("a replica issues once etcd has a new leader");
    }
    // Every token a client received is known and active on every replica.
    let checker = valetds[2].client(AGENT_KEY).await;
    for (_, token) in &issued {
        assert!(is_active(&checker, token.token_str()).await);
    }
}

#[tokio::test]
async fn every_token_a_client_received_survives_a_replica_killed_mid_issue() {
    let cluster = EtcdCluster::start(3);
    let (_deployments, mut valetds) = replicas(&cluster);
    let victim = valetds.remove(0);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..8 {
        let client = victim.client(AGENT_KEY).await;
        workers.push(tokio::spawn(issue_until(
            client,
            staging(&format!("victim-{worker}")),
            stop.clone(),
            started,
        )));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    victim.signal("KILL");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut issued = Vec::new();
    for worker in workers {
        issued.extend(worker.await.unwrap().0);
    }
    assert!(!issued.is_empty());
    println!(
        "{} tokens received from the replica before kill -9",
        issued.len()
    );
    let survivor = valetds[0].client(AGENT_KEY).await;
    for (_, token) in &issued {
        assert!(
            is_active(&survivor, token.token_str()).await,
            "grant {} was handed out, so it must be in the store",
            token.grant.id
        );
    }
}

#[tokio::test]
async fn valetd_logs_in_to_etcd_and_a_wrong_password_stops_it_at_start() {
    let cluster = EtcdCluster::start(1);
    cluster.enable_auth("valet", "etcd-password-for-valet", "/valet/");
    let config = |password_file: &str| {
        standard_config(&format!(
            "\n[store]\nengine = \"etcd\"\nendpoints = {}\nprefix = \"/valet/auth\"\nusername = \"valet\"\npassword_file = \"{password_file}\"\n",
            cluster.endpoints_toml()
        ))
    };
    let deployment = Deployment::new(&config("etcd.password"));
    std::fs::write(
        deployment.path("etcd.password"),
        "etcd-password-for-valet\n",
    )
    .unwrap();
    let valetd = deployment.start(&[]);
    let agent = valetd.client(AGENT_KEY).await;
    let issued = agent.request_token(staging("task-auth")).await.unwrap();
    assert!(is_active(&agent, issued.token_str()).await);
    assert!(!valetd.output().contains("etcd-password-for-valet"));

    let wrong = Deployment::new(&config("etcd.password"));
    std::fs::write(wrong.path("etcd.password"), "not-the-password\n").unwrap();
    let (code, output) = wrong.start_expecting_failure(&[]);
    assert_eq!(code, 1, "{output}");
    assert!(output.contains("etcd"), "{output}");
    assert!(
        output.contains("authentication failed") || output.contains("invalid user ID or password"),
        "says why: {output}"
    );
    assert!(!output.contains("not-the-password"));
}

#[tokio::test]
async fn valetd_speaks_tls_to_etcd_with_a_client_certificate() {
    let cluster = EtcdCluster::start_tls(1);
    let tls = cluster.tls.as_ref().unwrap();
    let config = |with_client_certificate: bool| {
        let client = if with_client_certificate {
            format!(
                "cert_file = \"{}\"\nkey_file = \"{}\"\n",
                tls.client_cert.display(),
                tls.client_key.display()
            )
        } else {
            String::new()
        };
        standard_config(&format!(
            "\n[store]\nengine = \"etcd\"\nendpoints = {}\nprefix = \"/valet/tls\"\nca_file = \"{}\"\n{client}",
            cluster.endpoints_toml(),
            tls.ca.display()
        ))
    };
    let deployment = Deployment::new(&config(true));
    let valetd = deployment.start(&[]);
    let agent = valetd.client(AGENT_KEY).await;
    let issued = agent.request_token(staging("task-tls")).await.unwrap();
    assert!(is_active(&agent, issued.token_str()).await);

    // Without the client certificate the cluster refuses valetd, and valetd says so at start.
    let refused = Deployment::new(&config(false));
    let (code, output) = refused.start_expecting_failure(&[]);
    assert_eq!(code, 1, "{output}");
    assert!(output.contains("etcd"), "{output}");
}

#[tokio::test]
async fn the_gateway_forwards_nothing_while_etcd_is_unreachable() {
    let upstream = valet_tests::upstream::Upstream::start().await;
    let mut cluster = EtcdCluster::start(1);
    let config = format!(
        "{}\n[store]\nengine = \"etcd\"\nendpoints = {}\nprefix = \"/valet/gateway\"\n",
        crate::gateway::gateway_config(&upstream),
        cluster.endpoints_toml()
    );
    let deployment = Deployment::new(&config);
    let valetd = deployment.start(&[]);
    let gateway = valetd.gateway.clone().expect("the gateway listens");
    let agent = valetd.client(AGENT_KEY).await;
    let issued = agent
        .request_token(TokenRequest::new("rest-projects", "gw-etcd").with_param("project", "shop"))
        .await
        .unwrap();
    let path = "/u/rest/v1/projects/shop/services";
    let call = || valet_tests::upstream::call(&gateway, "GET", path, issued.token_str(), "", &[]);
    assert_eq!(call().await.status, 200);
    assert_eq!(upstream.seen().len(), 1);

    cluster.kill(0);
    let refused = call().await;
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert!(refused.body.contains("etcd"), "{}", refused.body);
    assert_eq!(
        upstream.seen().len(),
        1,
        "nothing was forwarded without the store"
    );
}

#[tokio::test]
async fn grant_records_carry_a_lease_that_outlives_their_retention() {
    let cluster = EtcdCluster::start(1);
    let store = EtcdStore::connect(EtcdOptions {
        endpoints: cluster.endpoints(),
        prefix: "/leases".into(),
        username: None,
        password: None,
        replica: "r1".into(),
        retention: Duration::from_secs(600),
        ca_file: None,
        client_certificate: None,
        lock_lease: EtcdOptions::DEFAULT_LOCK_LEASE,
    })
    .await
    .unwrap();
    let now = valet_core::Clock::now(&valet_core::SystemClock);
    let grant = valet_store::conformance::grant("lease-1", "task-lease", now);
    valet_store::Store::create_grant(&store, &grant)
        .await
        .unwrap();

    let etcdctl = |arguments: &[&str]| {
        let output = std::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args([
                "--endpoints",
                &cluster.endpoints().join(","),
                "--write-out",
                "json",
            ])
            .args(arguments)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap()
    };
    let record = etcdctl(&["get", "/leases/grants/lease-1"]);
    let lease = record["kvs"][0]["lease"].as_i64().unwrap_or(0);
    assert_ne!(lease, 0, "the grant record is attached to a lease");
    let index = etcdctl(&["get", "--prefix", "/leases/tasks/task-lease"]);
    assert_eq!(
        index["kvs"][0]["lease"].as_i64(),
        Some(lease),
        "the task index shares it"
    );
    let ttl = etcdctl(&["lease", "timetolive", &format!("{lease:x}")])["ttl"]
        .as_i64()
        .unwrap();
    // The grant lives 300 s, then is kept for 600 s of retention: the lease must outlast both.
    assert!(ttl >= 900, "lease ttl {ttl} s");
    assert!(
        ttl <= 900 + 180,
        "lease ttl {ttl} s is not far past what is needed"
    );
}

#[tokio::test]
async fn a_reload_on_one_replica_ends_the_grants_on_every_replica() {
    let cluster = EtcdCluster::start(1);
    let (deployments, valetds) = replicas(&cluster);
    let agent_on_b = valetds[1].client(AGENT_KEY).await;
    let issued = agent_on_b
        .request_token(staging("task-reload"))
        .await
        .unwrap();
    assert!(is_active(&valetds[2].client(AGENT_KEY).await, issued.token_str()).await);
    // Replica A's config no longer lets the agent request deploy-staging; A reloads.
    let config = std::fs::read_to_string(deployments[0].config_path()).unwrap();
    std::fs::write(
        deployments[0].config_path(),
        config.replace(
            "scopes = [\"deploy-staging\", \"limited\", \"short\"]",
            "scopes = [\"limited\", \"short\"]",
        ),
    )
    .unwrap();
    let reply = valetds[0]
        .client(ADMIN_KEY)
        .await
        .admin()
        .reload_config(valet_client::v1::ReloadConfigRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.n_grants_ended, 1);
    // The grant ended in the shared store: B and C refuse it at once, before they reload.
    for valetd in &valetds[1..] {
        let reply = valetd
            .client(AGENT_KEY)
            .await
            .introspect(issued.token_str())
            .await
            .unwrap();
        assert!(!reply.active);
        assert!(reply.reason.contains("config reload"), "{}", reply.reason);
    }
}

#[tokio::test]
async fn a_key_record_planted_in_etcd_is_refused_by_every_replica() {
    let cluster = EtcdCluster::start(1);
    let (_deployments, valetds) = replicas(&cluster);
    let agents = [
        valetds[0].client(AGENT_KEY).await,
        valetds[1].client(AGENT_KEY).await,
    ];
    // Someone with write access to etcd plants a verifying key whose private half they hold,
    // and signs a ten-day admin token with it.
    let outside = valet_core::keyring::SigningKey::generate().unwrap();
    let planted = serde_json::json!({
        "kid": outside.kid(),
        "public_key": base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, outside.public_key()),
        "sealed_private": null,
        "created_at": 1,
        "retired_at": 2,
        "verify_until": 4_000_000_000i64,
    });
    let now = valet_core::Clock::now(&valet_core::SystemClock);
    let forged = valet_core::token::sign(
        &valet_core::token::Claims {
            iss: "https://valet.test".into(),
            sub: "admin".into(),
            aud: "railway".into(),
            iat: now,
            nbf: now,
            exp: now + 10 * 86_400,
            jti: "01JDFORGEDGRANT00000000000".into(),
            task: "t".into(),
            scope: "deploy-staging".into(),
            env: "staging".into(),
            params: Default::default(),
        },
        &outside,
    );
    let put = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &cluster.endpoints().join(",")])
        .args([
            "put",
            &format!("/valet/test/keys/{}", outside.kid()),
            &planted.to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    // Every replica stops trusting its key ring: nothing is signed or verified, and the forged
    // token is never active.
    for agent in &agents {
        let refused = valet_tests::eventually(Duration::from_secs(10), || async {
            agent.request_token(staging("task-planted")).await.is_err()
        })
        .await;
        assert!(
            refused,
            "the replica refuses to sign with an untrusted key ring"
        );
        let error = agent
            .request_token(staging("task-planted"))
            .await
            .unwrap_err();
        assert!(
            error
                .to_string()
                .contains("does not carry the MAC valetd writes"),
            "{error}"
        );
        assert!(
            !is_active(agent, &forged).await,
            "the forged token is never active"
        );
    }
    // Once the planted record is gone, the replicas trust their ring again.
    let delete = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &cluster.endpoints().join(",")])
        .args(["del", &format!("/valet/test/keys/{}", outside.kid())])
        .output()
        .unwrap();
    assert!(delete.status.success());
    for agent in &agents {
        let resumed = valet_tests::eventually(Duration::from_secs(10), || async {
            agent.request_token(staging("task-after")).await.is_ok()
        })
        .await;
        assert!(resumed, "the replica signs again");
    }
}

#[tokio::test]
async fn a_grant_altered_in_etcd_is_refused_by_every_replica() {
    let cluster = EtcdCluster::start(1);
    let (_deployments, valetds) = replicas(&cluster);
    let agent = valetds[0].client(AGENT_KEY).await;
    let issued = agent.request_token(staging("task-altered")).await.unwrap();
    let etcdctl = |arguments: &[&str]| {
        let output = std::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &cluster.endpoints().join(",")])
            .args(arguments)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let key = format!("/valet/test/grants/{}", issued.grant.id);
    let value = etcdctl(&["get", &key, "--print-value-only"]);
    let mut record: serde_json::Value = serde_json::from_str(value.trim()).unwrap();
    // A day more, in production: what someone with etcd write access would like.
    record["expires_at"] = serde_json::json!(record["expires_at"].as_i64().unwrap() + 86_400);
    record["environment"] = serde_json::json!("production");
    etcdctl(&["put", &key, &record.to_string()]);
    for valetd in &valetds {
        let error = valetd
            .client(AGENT_KEY)
            .await
            .introspect(issued.token_str())
            .await
            .unwrap_err();
        assert!(error.to_string().contains("MAC does not check"), "{error}");
    }
}

#[tokio::test]
async fn a_second_live_replica_with_the_same_name_refuses_to_start() {
    let cluster = EtcdCluster::start(1);
    let store = format!(
        "\n[store]\nengine = \"etcd\"\nendpoints = {}\nprefix = \"/valet/test\"\nreplica = \"same-name\"\n",
        cluster.endpoints_toml()
    );
    let first = Deployment::new(&standard_config(&store));
    let _running = first.start(&[]);
    let second = Deployment::new(&standard_config(&store));
    let (code, output) = second.start_expecting_failure(&[]);
    assert_ne!(code, 0);
    assert!(
        output.contains("replica name \"same-name\" is held by another live valetd (pid"),
        "{output}"
    );
    // The same deployment under another name starts.
    let _other = second.start(&["--replica", "other-name"]);
}
