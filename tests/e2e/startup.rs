//! Starting valetd: every config mistake reported at once, missing keys and unusable paths
//! refused with what to do, and an audit log that cannot be written fails requests closed.

use valet_client::{TokenRequest, v1};
use valet_tests::{AGENT_KEY, Deployment, OPERATOR_KEY, standard_config};

#[tokio::test]
async fn an_invalid_config_reports_every_problem_and_exits_64() {
    let broken = standard_config("")
        .replace("max_ttl = \"10m\"\n[scope.params.project]", "max_ttl = \"2h\"\n[scope.params.project]")
        .replace("credential = \"github\"\nenvironment = \"ci\"\naudience = \"github\"\ndefault_ttl = \"5m\"", "credential = \"gitlab\"\nenvironment = \"ci\"\naudience = \"github\"\ndefault_ttl = \"5m\"")
        .replace("grant_retention = \"1h\"", "grant_retention = \"1h\"\ncolour = \"blue\"");
    let deployment = Deployment::new(&broken);
    let (code, output) = deployment.start_expecting_failure(&[]);
    assert_eq!(code, 64, "{output}");
    for expected in [
        "the config has 3 problems",
        "server.colour: unknown key",
        "scope[0].max_ttl: 2h exceeds server.max_ttl 1h",
        "scope[1].credential: names credential \"gitlab\", which is not defined; defined credentials: [github, railway]",
    ] {
        assert!(
            output.contains(expected),
            "missing {expected:?} in:\n{output}"
        );
    }
}

#[tokio::test]
async fn a_missing_key_encryption_key_says_what_to_do_and_dev_mode_makes_one() {
    let config = standard_config("").replace("[seal]\nkey_file = \"seal.key\"\n", "");
    let deployment = Deployment::new(&config);
    let (code, output) = deployment.start_expecting_failure(&[]);
    assert_eq!(code, 64, "{output}");
    assert!(
        output.contains("no key-encryption key: set [seal] key_file or key_env"),
        "{output}"
    );
    assert!(output.contains("openssl rand -base64 32"), "{output}");

    let valetd = deployment.start(&["--dev"]);
    assert!(
        valetd.output().contains("DEVELOPMENT MODE"),
        "{}",
        valetd.output()
    );
    assert!(deployment.path("data/dev-seal.key").exists());
    let agent = valetd.client(AGENT_KEY).await;
    agent
        .request_token(TokenRequest::new("limited", "task-dev"))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_wrong_key_encryption_key_cannot_open_the_signing_keys() {
    let deployment = Deployment::standard();
    deployment.start(&[]).stop().await;
    std::fs::write(
        deployment.path("seal.key"),
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
    )
    .unwrap();
    let (code, output) = deployment.start_expecting_failure(&[]);
    assert_eq!(code, 1);
    assert!(
        output.contains("the key-encryption key from file ")
            && output.contains("seal.key ([seal]) does not open signing key"),
        "{output}"
    );
}

#[tokio::test]
async fn an_unusable_data_dir_or_credential_is_a_clear_startup_error() {
    let deployment = Deployment::standard();
    std::fs::write(deployment.path("not-a-dir"), "x").unwrap();
    let data_dir = deployment.path("not-a-dir/data");
    let (code, output) =
        deployment.start_expecting_failure(&["--data-dir", data_dir.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        output.contains(&format!("data dir {} cannot be used", data_dir.display())),
        "{output}"
    );

    std::fs::remove_file(deployment.path("railway.secret")).unwrap();
    let (_, output) = deployment.start_expecting_failure(&[]);
    assert!(output.contains("credential \"railway\": file "), "{output}");
    assert!(output.contains("is unusable: No such file"), "{output}");
}

#[tokio::test]
async fn when_the_audit_log_cannot_be_written_requests_fail_closed() {
    // /dev/full accepts the open and refuses every write: a disk that filled up under valetd.
    let config =
        standard_config("").replace("path = \"audit/audit.jsonl\"", "path = \"/dev/full\"");
    let deployment = Deployment::new(&config);
    let valetd = deployment.start(&[]);
    let agent = valetd.client(AGENT_KEY).await;
    let error = agent
        .request_token(TokenRequest::new("limited", "task-audit"))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(tonic::Code::Unavailable), "{error}");
    assert!(error.to_string().contains("fail closed"), "{error}");
    assert!(
        error.to_string().contains("/dev/full cannot be written"),
        "{error}"
    );

    // The grant that was stored before the audit write failed can never be used.
    let operator = valetd.client(OPERATOR_KEY).await;
    let grants = operator
        .admin()
        .list_grants(v1::ListGrantsRequest::default())
        .await;
    // Listing needs no audit record, so it answers; every grant it shows is revoked.
    for grant in grants.unwrap().into_inner().grants {
        assert_eq!(grant.status, v1::GrantStatus::Revoked as i32, "{grant:?}");
        assert!(grant.status_reason.contains("audit record"), "{grant:?}");
    }
}

#[tokio::test]
async fn json_logs_carry_a_request_id_and_sigterm_stops_cleanly() {
    let deployment = Deployment::standard();
    let valetd = deployment.start(&["--log-format", "json"]);
    let agent = valetd.client(AGENT_KEY).await;
    agent
        .request_token(TokenRequest::new("limited", "task-log"))
        .await
        .unwrap();
    let output = valetd.output();
    let rpc_line = output
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|line| line["span"]["method"].as_str() == Some("/valet.v1.Broker/RequestToken"))
        .unwrap_or_else(|| panic!("no JSON log line for the RPC in:\n{output}"));
    assert_eq!(
        rpc_line["span"]["request_id"].as_str().map(str::len),
        Some(16)
    );
    assert_eq!(valetd.stop().await, Some(0));
}

#[tokio::test]
async fn plaintext_off_loopback_is_refused_unless_the_config_says_so() {
    // Refused before anything is bound, so this test listens on nothing but loopback.
    let config = standard_config("").replace("listen = \"127.0.0.1:0\"", "listen = \"0.0.0.0:0\"");
    let deployment = Deployment::new(&config);
    let (code, output) = deployment.start_expecting_failure(&[]);
    assert_eq!(code, 64, "{output}");
    let expected = [
        "server.listen: valetd will not serve gRPC in plaintext on 0.0.0.0:0, which is not a loopback address",
        "Listen on 127.0.0.1",
        "`[server] insecure_plaintext = true`",
    ];
    for expected in expected {
        assert!(
            output.contains(expected),
            "missing {expected:?} in:\n{output}"
        );
    }
    // `valet config check` says the same, online or offline: one rule.
    for offline in [false, true] {
        let mut check = std::process::Command::new(valet_tests::binary("valet"));
        check
            .args(["config", "check"])
            .env("VALET_TEST_GITHUB_TOKEN", valet_tests::GITHUB_ROOT_SECRET);
        if offline {
            check.arg("--offline");
        }
        let checked = check.arg(deployment.config_path()).output().unwrap();
        let printed = String::from_utf8_lossy(&checked.stdout).into_owned()
            + &String::from_utf8_lossy(&checked.stderr);
        assert!(!checked.status.success(), "{printed}");
        for expected in expected {
            assert!(
                printed.contains(expected),
                "missing {expected:?} in:\n{printed}"
            );
        }
    }
    // Allowed by the config: both accept it, and say it is a risk.
    let allowed =
        Deployment::new(&config.replace("[server]\n", "[server]\ninsecure_plaintext = true\n"));
    let checked = std::process::Command::new(valet_tests::binary("valet"))
        .args(["config", "check"])
        .env("VALET_TEST_GITHUB_TOKEN", valet_tests::GITHUB_ROOT_SECRET)
        .arg(allowed.config_path())
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&checked.stdout).into_owned();
    assert!(checked.status.success(), "{printed}");
    assert!(printed.contains("plaintext-off-loopback"), "{printed}");

    let deployment = Deployment::standard();
    let (code, output) = deployment.start_expecting_failure(&["--gateway-listen", "0.0.0.0:0"]);
    assert_eq!(code, 64, "{output}");
    assert!(
        output.contains("valetd will not serve gateway in plaintext on 0.0.0.0:0"),
        "{output}"
    );
    assert!(
        !deployment.path("data/store").exists(),
        "nothing is opened before the listeners are checked"
    );
}

#[tokio::test]
async fn an_upstream_credential_too_long_to_mask_keeps_valetd_from_starting() {
    // The gateway masks an upstream's credential in every answer; one longer than it can mask
    // would reach agents in a stream, so valetd refuses it at start and names it.
    let config = standard_config(
        r#"
[[upstream]]
name = "railway"
base_url = "http://127.0.0.1:9"
credential = "railway"
[upstream.inject]
header = { Authorization = "Bearer {secret}" }
"#,
    );
    let deployment = Deployment::new(&config);
    std::fs::write(deployment.path("railway.secret"), "x".repeat(1025)).unwrap();
    let (code, output) = deployment.start_expecting_failure(&[]);
    assert_eq!(code, 64, "{output}");
    assert!(
        output.contains("credential \"railway\"") && output.contains("1025 bytes"),
        "{output}"
    );
}

/// valetd's open-file limits, soft and hard, from `/proc/PID/limits`.
fn open_file_limits(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .unwrap();
    let numbers: Vec<u64> = line
        .split_whitespace()
        .filter_map(|word| word.parse().ok())
        .collect();
    (numbers[0], numbers[1])
}

#[tokio::test]
async fn the_open_file_limit_is_raised_to_what_the_connection_budgets_need_or_a_warning_says_so() {
    let deployment = Deployment::standard();
    // The standard deployment's one listener (gRPC), 512 connections: 512 + 1,024 held before
    // closing + 256 = 1,792.
    let valetd = deployment.start_with_file_limits(1024, 8192);
    assert_eq!(open_file_limits(valetd.pid().unwrap()), (1792, 8192));
    let output = valetd.stop_with_output().await;
    assert!(output.contains("raised the open-file limit"), "{output}");
    // A hard limit below it: raised as far as it goes, and the log says what to do.
    let valetd = deployment.start_with_file_limits(1024, 1536);
    assert_eq!(open_file_limits(valetd.pid().unwrap()), (1536, 1536));
    let output = valetd.stop_with_output().await;
    assert!(
        output.contains("the open-file limit is below what the connection budgets need")
            && output.contains("needed=1792")
            && output.contains("LimitNOFILE"),
        "{output}"
    );
}
