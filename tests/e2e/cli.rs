//! The `valet` command line against a real valetd: the offline checks and the audit verifier.

use std::process::Command;

use valet_client::TokenRequest;
use valet_tests::{AGENT_KEY, Deployment, OPERATOR_KEY, binary, standard_config};

fn valet(arguments: &[&str], server: &str, key: &str) -> (i32, String, String) {
    let output = Command::new(binary("valet"))
        .args(arguments)
        .env("VALET_SERVER", server)
        .env("VALET_KEY", key)
        .output()
        .expect("run valet");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn audit_verify_finds_edits_deletions_reordering_and_a_cut_tail() {
    let deployment = Deployment::standard();
    let valetd = deployment.start(&[]);
    let agent = valetd.client(AGENT_KEY).await;
    for index in 0..4 {
        agent
            .request_token(TokenRequest::new("limited", format!("audit-{index}")))
            .await
            .unwrap();
    }
    let path = deployment.audit_path();
    let path_text = path.to_str().unwrap();

    let (code, stdout, _) = valet(
        &["audit", "verify", path_text, "--fetch-head"],
        &valetd.address,
        OPERATOR_KEY,
    );
    assert_eq!(code, 0, "{stdout}");
    assert!(
        stdout
            .contains("chain intact from the first record to the head valetd recorded, 4 records"),
        "{stdout}"
    );

    let original = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = original.lines().collect();
    let copy = deployment.path("copy.jsonl");
    let copy_text = copy.to_str().unwrap();
    let check = |content: String, extra: &[&str]| {
        std::fs::write(&copy, content).unwrap();
        let mut arguments = vec!["audit", "verify", copy_text];
        arguments.extend_from_slice(extra);
        valet(&arguments, &valetd.address, OPERATOR_KEY)
    };

    let (code, stdout, _) = check(original.replace("audit-2", "audit-9"), &[]);
    assert_eq!(code, 1);
    assert!(
        stdout.contains(
            "chain broken at line 3 (record 3): the record's hash does not match its contents"
        ),
        "{stdout}"
    );

    let deleted = [lines[0], lines[2], lines[3]].join("\n");
    let (code, stdout, _) = check(deleted, &[]);
    assert_eq!(code, 1);
    assert!(
        stdout.contains("expected record 2 here, found 3"),
        "{stdout}"
    );

    let reordered = [lines[0], lines[2], lines[1], lines[3]].join("\n");
    assert_eq!(check(reordered, &[]).0, 1);

    let cut = lines[..2].join("\n");
    assert_eq!(
        check(cut.clone(), &[]).0,
        0,
        "without the head, a prefix is a valid chain"
    );
    let (code, stdout, _) = check(cut, &["--fetch-head"]);
    assert_eq!(code, 1);
    assert!(stdout.contains("the tail was cut"), "{stdout}");
}

#[tokio::test]
async fn config_check_and_keygen_work_offline() {
    let deployment = Deployment::standard();
    let config = deployment.config_path();
    // The standard config reads the GitHub credential from a variable this process lacks.
    let (code, stdout, _) = valet(
        &["config", "check", "--offline", config.to_str().unwrap()],
        "http://127.0.0.1:1",
        "unused",
    );
    assert_eq!(code, 0, "{stdout}");
    assert!(
        stdout.contains("is valid: 4 principals, 4 scopes, 2 credentials"),
        "{stdout}"
    );
    assert!(
        stdout.contains("offline: the key-encryption key"),
        "{stdout}"
    );

    // The example runs with `valetd --dev` (no [seal]); its demo credentials are files.
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples/valet.toml");
    assert_eq!(
        valet(
            &["config", "check", "--dev", example],
            "http://127.0.0.1:1",
            "unused"
        )
        .0,
        0
    );
    // Without --dev the missing [seal] is a problem, and the hint names the command to check a
    // development config with.
    let (code, stdout, _) = valet(
        &["config", "check", example],
        "http://127.0.0.1:1",
        "unused",
    );
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains("no key-encryption key") && stdout.contains("`valet config check --dev`"),
        "{stdout}"
    );

    std::fs::write(&config, "[server]\nlisten = \"nowhere\"\n").unwrap();
    let (code, stdout, _) = valet(
        &["config", "check", config.to_str().unwrap()],
        "http://127.0.0.1:1",
        "unused",
    );
    assert_eq!(code, 1);
    assert!(
        stdout.contains("server.listen: \"nowhere\" is not a valid socket address"),
        "{stdout}"
    );
    assert!(stdout.contains("audit: missing"), "{stdout}");

    let (code, stdout, _) = valet(
        &["keygen", "--name", "new-agent", "--json"],
        "http://127.0.0.1:1",
        "unused",
    );
    assert_eq!(code, 0);
    let made: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let key = made["key"].as_str().unwrap();
    let hash: String = valet_core::Secret::from(key.to_string())
        .sha256()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    assert_eq!(made["key_sha256"].as_str(), Some(hash.as_str()));

    // Redirected, the key is not "above": the note says where it went.
    let (code, stdout, stderr) = valet(
        &["keygen", "--name", "new-agent"],
        "http://127.0.0.1:1",
        "unused",
    );
    assert_eq!(code, 0);
    assert!(stdout.trim().starts_with("vk_"), "{stdout}");
    assert!(
        stderr.contains("The key went to standard output, once") && !stderr.contains("above"),
        "{stderr}"
    );
}

#[tokio::test]
async fn an_unreachable_server_is_exit_4_naming_the_address() {
    let (code, _, stderr) = valet(&["grants", "list"], "http://127.0.0.1:9", OPERATOR_KEY);
    assert_eq!(code, 4, "{stderr}");
    assert!(
        stderr.contains("cannot reach valetd at http://127.0.0.1:9"),
        "{stderr}"
    );
    assert!(stderr.contains("VALET_SERVER"), "{stderr}");
}

mod daily {
    //! The everyday commands, as a developer and an operator type them.

    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use std::time::Duration;

    use valet_tests::{ADMIN_KEY, AGENT_KEY, Deployment, OPERATOR_KEY, binary};

    use super::valet;

    fn request(server: &str, extra: &[&str]) -> (i32, String, String) {
        let mut arguments = vec![
            "token",
            "request",
            "--scope",
            "deploy-staging",
            "--task",
            "cli-task",
            "--param",
            "project=shop",
        ];
        arguments.extend_from_slice(extra);
        valet(&arguments, server, AGENT_KEY)
    }

    #[tokio::test]
    async fn token_commands_print_only_the_token_on_stdout_and_json_on_request() {
        let deployment = Deployment::standard();
        let valetd = deployment.start(&[]);
        let server = valetd.address.as_str();

        let (code, token, stderr) = request(server, &["--ttl", "2m"]);
        assert_eq!(code, 0, "{stderr}");
        let token = token.trim().to_string();
        assert_eq!(
            token.split('.').count(),
            3,
            "stdout is the token alone: {token:?}"
        );
        assert!(
            stderr.contains("grant ")
                && stderr.contains("task cli-task")
                && stderr.contains("scope deploy-staging"),
            "{stderr}"
        );

        let (code, stdout, _) = request(server, &["--json"]);
        assert_eq!(code, 0);
        let reply: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        for key in [
            "id",
            "principal",
            "task",
            "scope",
            "environment",
            "issued_at",
            "expires_at",
            "status",
        ] {
            assert!(
                !reply["grant"][key].is_null(),
                "grant.{key} missing: {reply}"
            );
        }
        let grant_id = reply["grant"]["id"].as_str().unwrap().to_string();

        let (code, stdout, _) = valet(&["token", "introspect", &token], server, AGENT_KEY);
        assert_eq!(code, 0);
        assert!(stdout.starts_with("active: true"), "{stdout}");

        let (code, stdout, _) = valet(
            &["token", "verify", &token, "--audience", "github"],
            server,
            AGENT_KEY,
        );
        assert_eq!(code, 3);
        assert!(
            stdout.contains("invalid: the token is for audience \"railway\"; expected \"github\""),
            "{stdout}"
        );

        let (code, stdout, _) = valet(
            &["token", "renew", &grant_id, "--ttl", "8m", "--json"],
            server,
            AGENT_KEY,
        );
        assert_eq!(code, 0, "{stdout}");
        let renewed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_ne!(renewed["grant"]["expires_at"], reply["grant"]["expires_at"]);

        let (code, stdout, _) = valet(
            &[
                "token", "revoke", &grant_id, "--reason", "cli test", "--json",
            ],
            server,
            AGENT_KEY,
        );
        assert_eq!(code, 0);
        let revoked: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(revoked["status"], "revoked");

        let (code, stdout, _) = valet(&["task", "revoke", "cli-task", "--json"], server, AGENT_KEY);
        assert_eq!(code, 0);
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&stdout).unwrap()["revoked"]
                .as_array()
                .unwrap()
                .len(),
            1
        );

        // Introspection of a revoked token reads from stdin with "-" and exits 3.
        let mut child = Command::new(binary("valet"))
            .args(["token", "introspect", "-"])
            .env("VALET_SERVER", server)
            .env("VALET_KEY", AGENT_KEY)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), token.as_bytes()).unwrap();
        let output = child.wait_with_output().unwrap();
        assert_eq!(output.status.code(), Some(3));
        assert!(
            String::from_utf8_lossy(&output.stdout).contains("reason: grant"),
            "{}",
            String::from_utf8_lossy(&output.stdout)
        );

        // A denial is exit 3 with one sentence naming the rule, and a hint.
        let (code, _, stderr) = valet(
            &["token", "request", "--scope", "prod-db", "--task", "t"],
            server,
            AGENT_KEY,
        );
        assert_eq!(code, 3);
        assert!(
            stderr.starts_with("valet: principal \"agent\" may not request scope \"prod-db\""),
            "{stderr}"
        );
        assert!(stderr.contains("hint:"), "{stderr}");
        assert!(!stderr.contains(&token), "tokens never appear in errors");
    }

    #[tokio::test]
    async fn grants_list_is_stable_when_piped_and_watch_streams_changes() {
        let deployment = Deployment::standard();
        let valetd = deployment.start(&[]);
        let server = valetd.address.as_str();
        request(server, &[]);
        request(server, &[]);

        let (code, stdout, _) = valet(
            &["grants", "list", "--status", "active"],
            server,
            OPERATOR_KEY,
        );
        assert_eq!(code, 0);
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(
            lines[0],
            "ID\tPRINCIPAL\tTASK\tSCOPE\tENV\tISSUED_AT\tEXPIRES_AT\tUSES\tSTATUS"
        );
        assert_eq!(lines.len(), 3, "{stdout}");
        assert!(
            lines[1].contains("\tagent\tcli-task\tdeploy-staging\tstaging\t")
                && lines[1].ends_with("\t0\tactive"),
            "{}",
            lines[1]
        );

        let (_, stdout, _) = valet(
            &["grants", "list", "--json", "--principal", "agent"],
            server,
            OPERATOR_KEY,
        );
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&stdout)
                .unwrap()
                .as_array()
                .unwrap()
                .len(),
            2
        );

        let mut watcher = Command::new(binary("valet"))
            .args(["grants", "watch", "--json"])
            .env("VALET_SERVER", server)
            .env("VALET_KEY", OPERATOR_KEY)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = watcher.stdout.take().unwrap();
        let (lines_sender, lines_receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = lines_sender.send(line);
            }
        });
        // The watch starts asynchronously: issue until it reports one.
        let mut event = None;
        for _ in 0..50 {
            request(server, &[]);
            if let Ok(line) = lines_receiver.recv_timeout(Duration::from_millis(200)) {
                event = Some(line);
                break;
            }
        }
        let _ = watcher.kill();
        let _ = watcher.wait();
        let event: serde_json::Value =
            serde_json::from_str(&event.expect("watch printed an event")).unwrap();
        assert_eq!(event["event"], "issued");
        assert_eq!(event["grant"]["task"], "cli-task");
    }

    #[tokio::test]
    async fn revoke_all_asks_for_confirmation_unless_told_yes() {
        let deployment = Deployment::standard();
        let valetd = deployment.start(&[]);
        let server = valetd.address.as_str();
        request(server, &[]);
        let (code, _, stderr) = valet(
            &[
                "revoke-all",
                "--environment",
                "staging",
                "--reason",
                "drill",
            ],
            server,
            OPERATOR_KEY,
        );
        assert_eq!(code, 2, "no terminal, no --yes: a usage error");
        assert!(stderr.contains("pass --yes in scripts"), "{stderr}");
        let (code, stdout, _) = valet(
            &[
                "revoke-all",
                "--environment",
                "staging",
                "--reason",
                "drill",
                "--yes",
                "--json",
            ],
            server,
            OPERATOR_KEY,
        );
        assert_eq!(code, 0);
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&stdout).unwrap()["revoked"],
            1
        );
        let (code, _, stderr) = valet(
            &[
                "revoke-all",
                "--environment",
                "staging",
                "--reason",
                "drill",
                "--yes",
            ],
            server,
            AGENT_KEY,
        );
        assert_eq!(code, 3, "{stderr}");

        // On a terminal (util-linux `script` gives valet one), it states the count and the target
        // and revokes only when the target's name is typed.
        request(server, &[]);
        request(server, &[]);
        let on_terminal = |answer: &str| {
            let command = format!(
                "{} revoke-all --environment staging --reason drill",
                binary("valet").display()
            );
            let mut child = Command::new("script")
                .args(["-qec", &command, "/dev/null"])
                .env("VALET_SERVER", server)
                .env("VALET_KEY", OPERATOR_KEY)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("util-linux script runs");
            std::io::Write::write_all(
                child.stdin.as_mut().unwrap(),
                format!("{answer}\n").as_bytes(),
            )
            .unwrap();
            let output = child.wait_with_output().unwrap();
            (
                output.status.code(),
                String::from_utf8_lossy(&output.stdout).into_owned(),
            )
        };
        let (code, transcript) = on_terminal("production");
        assert_eq!(code, Some(1), "{transcript}");
        assert!(
            transcript.contains("This revokes 2 active grant(s) of environment \"staging\""),
            "{transcript}"
        );
        assert!(
            transcript.contains("not confirmed; nothing was revoked"),
            "{transcript}"
        );
        let (code, transcript) = on_terminal("staging");
        assert_eq!(code, Some(0), "{transcript}");
        assert!(
            transcript.contains("revoked 2 grant(s) of environment staging"),
            "{transcript}"
        );
    }

    #[tokio::test]
    async fn admin_commands_and_the_audit_tail() {
        let deployment = Deployment::standard();
        let valetd = deployment.start(&[]);
        let server = valetd.address.as_str();
        let (code, stdout, _) = valet(&["keys", "rotate", "--json"], server, ADMIN_KEY);
        assert_eq!(code, 0);
        assert!(
            serde_json::from_str::<serde_json::Value>(&stdout).unwrap()["new_key_id"].is_string()
        );
        let (code, stdout, _) = valet(&["config", "reload"], server, ADMIN_KEY);
        assert_eq!(code, 0);
        assert!(
            stdout.contains("config reloaded: 4 principals, 4 scopes, 2 credentials"),
            "{stdout}"
        );
        let (code, _, stderr) = valet(&["config", "reload"], server, OPERATOR_KEY);
        assert_eq!(code, 3);
        assert!(stderr.contains("needs role admin"), "{stderr}");

        let (code, stdout, _) = valet(&["audit", "tail", "--last", "2"], server, OPERATOR_KEY);
        assert_eq!(code, 0);
        let records: Vec<serde_json::Value> = stdout
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0]["action"], "config.reload");
        assert_eq!(
            (&records[1]["action"], &records[1]["outcome"]),
            (
                &serde_json::json!("config.reload"),
                &serde_json::json!("denied")
            ),
            "the operator's refused reload is the latest record"
        );

        let mut follower = Command::new(binary("valet"))
            .args(["audit", "tail", "--last", "1", "--follow"])
            .env("VALET_SERVER", server)
            .env("VALET_KEY", OPERATOR_KEY)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(follower.stdout.take().unwrap()).lines();
        let first = lines.next().unwrap().unwrap();
        assert!(
            first.contains("\"action\":\"config.reload\"") && first.contains("\"denied\""),
            "{first}"
        );
        request(server, &[]);
        let next = lines.next().unwrap().unwrap();
        let _ = follower.kill();
        let _ = follower.wait();
        assert!(next.contains("\"action\":\"token.issue\""), "{next}");
    }

    #[tokio::test]
    async fn completions_and_the_man_page_come_from_the_same_definitions() {
        let (code, stdout, _) = valet(&["completions", "bash"], "http://127.0.0.1:1", "unused");
        assert_eq!(code, 0);
        assert!(
            stdout.contains("revoke-all") && stdout.contains("exec"),
            "completions list the commands"
        );
        let (code, stdout, _) = valet(&["man"], "http://127.0.0.1:1", "unused");
        assert_eq!(code, 0);
        assert!(
            stdout.starts_with(".ie") || stdout.contains(".TH valet"),
            "{}",
            &stdout[..stdout.len().min(200)]
        );
    }
}

mod exec {
    //! `valet exec`: the token reaches the command, exit codes and signals pass through, and the
    //! task is revoked however the command (or valet itself) ends.

    use std::process::{Command, Stdio};
    use std::time::Duration;

    use valet_client::v1;
    use valet_tests::{AGENT_KEY, Deployment, OPERATOR_KEY, binary, eventually};

    fn exec_command(
        server: &str,
        task: &str,
        scope_arguments: &[&str],
        command: &[&str],
    ) -> Command {
        let mut process = Command::new(binary("valet"));
        process
            .args(["exec", "--task", task])
            .args(scope_arguments)
            .arg("--")
            .args(command);
        process
            .env("VALET_SERVER", server)
            .env("VALET_KEY", AGENT_KEY)
            .stdin(Stdio::null());
        process
    }

    const STAGING: &[&str] = &["--scope", "deploy-staging", "--param", "project=shop"];

    async fn task_statuses(valetd: &valet_tests::Valetd, task: &str) -> Vec<i32> {
        let operator = valetd.client(OPERATOR_KEY).await;
        let filter = v1::GrantFilter {
            task_id: task.into(),
            ..Default::default()
        };
        let grants = operator
            .admin()
            .list_grants(v1::ListGrantsRequest {
                filter: Some(filter),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .grants;
        grants.into_iter().map(|grant| grant.status).collect()
    }

    #[tokio::test]
    async fn the_command_sees_the_token_its_exit_code_passes_through_and_the_task_is_revoked() {
        let deployment = Deployment::standard();
        let valetd = deployment.start(&[]);
        let script = r#"test -n "$VALET_TOKEN" && test -n "$VALET_GRANT" && test "$(cat "$VALET_TOKEN_FILE")" = "$VALET_TOKEN" && echo "grant=$VALET_GRANT" && exit 7"#;
        let output = exec_command(&valetd.address, "exec-1", STAGING, &["sh", "-c", script])
            .output()
            .unwrap();
        assert_eq!(
            output.status.code(),
            Some(7),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(String::from_utf8_lossy(&output.stdout).starts_with("grant="));
        assert_eq!(
            task_statuses(&valetd, "exec-1").await,
            vec![v1::GrantStatus::Revoked as i32]
        );

        let output = exec_command(
            &valetd.address,
            "exec-2",
            &["--env-name", "RAILWAY_TOKEN", "--scope", "limited"],
            &["sh", "-c", r#"test -n "$RAILWAY_TOKEN""#],
        )
        .output()
        .unwrap();
        assert_eq!(
            output.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );

        let output = exec_command(
            &valetd.address,
            "exec-3",
            STAGING,
            &["sh", "-c", "kill -USR1 $$"],
        )
        .output()
        .unwrap();
        assert_eq!(
            output.status.code(),
            Some(128 + 10),
            "death by a signal is 128 + its number"
        );
        assert_eq!(
            task_statuses(&valetd, "exec-3").await,
            vec![v1::GrantStatus::Revoked as i32]
        );

        let output = exec_command(
            &valetd.address,
            "exec-4",
            &["--scope", "prod-db"],
            &["true"],
        )
        .output()
        .unwrap();
        assert_eq!(
            output.status.code(),
            Some(3),
            "a denied request runs nothing"
        );
    }

    #[tokio::test]
    async fn the_command_never_gets_the_principals_key_and_cannot_ask_for_anything() {
        let deployment = Deployment::standard();
        let valetd = deployment.start(&[]);
        // Each attempt the wrapped command makes must fail the way it says (2: no principal key;
        // 3: refused by valetd); the exit code says which attempt did not.
        let script = r#"
            test -z "${VALET_KEY+set}" || exit 10
            "$VALET_BIN" token request --scope limited --task escaped 2>/dev/null; test $? -eq 2 || exit 11
            "$VALET_BIN" token renew "$VALET_GRANT" 2>/dev/null; test $? -eq 2 || exit 12
            "$VALET_BIN" token revoke "$VALET_GRANT" 2>/dev/null; test $? -eq 2 || exit 13
            "$VALET_BIN" task revoke exec-escape 2>/dev/null; test $? -eq 2 || exit 14
            "$VALET_BIN" revoke-all --principal demo-agent --reason x --yes 2>/dev/null; test $? -eq 2 || exit 15
            # The grant's own token is no principal credential either.
            VALET_KEY="$VALET_TOKEN" "$VALET_BIN" token request --scope limited --task escaped 2>/dev/null; test $? -eq 3 || exit 16
            VALET_KEY="$VALET_TOKEN" "$VALET_BIN" token renew "$VALET_GRANT" 2>/dev/null; test $? -eq 3 || exit 17
            VALET_KEY="$VALET_TOKEN" "$VALET_BIN" task revoke exec-escape 2>/dev/null; test $? -eq 3 || exit 18
            exit 0
        "#;
        let output = exec_command(
            &valetd.address,
            "exec-escape",
            STAGING,
            &["sh", "-c", script],
        )
        .env("VALET_BIN", binary("valet"))
        .output()
        .unwrap();
        assert_eq!(
            output.status.code(),
            Some(0),
            "the wrapped command got further than it may: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        // Nothing was issued to the escaped task, and the exec's own grant ended when it did.
        assert!(task_statuses(&valetd, "escaped").await.is_empty());
        assert_eq!(
            task_statuses(&valetd, "exec-escape").await,
            vec![v1::GrantStatus::Revoked as i32]
        );
    }

    #[tokio::test]
    async fn an_interrupted_valet_exec_forwards_the_signal_and_still_revokes() {
        let deployment = Deployment::standard();
        let valetd = deployment.start(&[]);
        for (task, signal, code) in [("exec-term", "TERM", 143), ("exec-int", "INT", 130)] {
            let mut child = exec_command(&valetd.address, task, STAGING, &["sleep", "30"])
                .spawn()
                .unwrap();
            let started = eventually(Duration::from_secs(10), || async {
                task_statuses(&valetd, task).await == vec![v1::GrantStatus::Active as i32]
            })
            .await;
            assert!(started, "the grant was issued");
            let status = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(child.id().to_string())
                .status()
                .unwrap();
            assert!(status.success());
            let exit = child.wait().unwrap();
            assert_eq!(
                exit.code(),
                Some(code),
                "the command died of the forwarded SIG{signal}"
            );
            assert_eq!(
                task_statuses(&valetd, task).await,
                vec![v1::GrantStatus::Revoked as i32]
            );
        }
    }

    #[tokio::test]
    async fn a_command_that_outlives_the_ttl_gets_renewed_tokens_in_its_token_file() {
        let deployment = Deployment::standard();
        let valetd = deployment.start(&[]);
        // "short" lasts 2 s and may be renewed up to 6 s: the file must hold a newer token by 3 s.
        let script =
            r#"first="$VALET_TOKEN"; sleep 3; test "$(cat "$VALET_TOKEN_FILE")" != "$first""#;
        let output = exec_command(
            &valetd.address,
            "exec-renew",
            &["--scope", "short"],
            &["sh", "-c", script],
        )
        .output()
        .unwrap();
        assert_eq!(
            output.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// Prepares a deployment's files and returns the config to write.
type Arrange = Box<dyn Fn(&Deployment) -> String>;

/// Runs `valet config check` on a deployment's config with the test's environment.
fn config_check(deployment: &Deployment, extra: &[&str]) -> (i32, String) {
    let config = deployment.config_path();
    let output = Command::new(binary("valet"))
        .args(["config", "check"])
        .args(extra)
        .arg(&config)
        .env("VALET_TEST_GITHUB_TOKEN", valet_tests::GITHUB_ROOT_SECRET)
        .output()
        .expect("run valet");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[tokio::test]
async fn config_check_and_valetd_refuse_the_same_missing_inputs_all_at_once() {
    // Each kind of missing input, alone: config check exits 1 naming it; valetd exits 64
    // naming the same key path.
    let cases: Vec<(&str, Arrange)> = vec![
        (
            "seal: the key-encryption key (file",
            Box::new(|deployment: &Deployment| {
                std::fs::remove_file(deployment.path("seal.key")).unwrap();
                standard_config("")
            }),
        ),
        (
            "is unusable: the key-encryption key is not",
            Box::new(|deployment: &Deployment| {
                std::fs::write(deployment.path("seal.key"), "not base64").unwrap();
                standard_config("")
            }),
        ),
        (
            "seal: no key-encryption key",
            Box::new(|_: &Deployment| {
                standard_config("").replace("[seal]\nkey_file = \"seal.key\"\n", "")
            }),
        ),
        (
            "credential \"railway\": file",
            Box::new(|deployment: &Deployment| {
                std::fs::remove_file(deployment.path("railway.secret")).unwrap();
                standard_config("")
            }),
        ),
        (
            "credential \"github\": environment variable VALET_TEST_GITHUB_TOKEN_UNSET",
            Box::new(|_: &Deployment| {
                standard_config("").replace(
                    "env = \"VALET_TEST_GITHUB_TOKEN\"",
                    "env = \"VALET_TEST_GITHUB_TOKEN_UNSET\"",
                )
            }),
        ),
        (
            "server.tls_cert_file: file",
            Box::new(|_: &Deployment| {
                standard_config("").replace("grant_retention = \"1h\"", "grant_retention = \"1h\"\ntls_cert_file = \"missing.crt\"\ntls_key_file = \"missing.key\"")
            }),
        ),
        (
            "upstream \"tools\".command: program \"no-such-mcp-server-4e1\"",
            Box::new(|_: &Deployment| {
                standard_config(
                    "\n[[upstream]]\nname = \"tools\"\nkind = \"mcp\"\ncommand = \"no-such-mcp-server-4e1\"\nenv = { TOKEN = \"{secret}\" }\ncredential = \"railway\"\n",
                )
            }),
        ),
        (
            "it is not executable",
            Box::new(|deployment: &Deployment| {
                std::fs::write(deployment.path("server.sh"), "#!/bin/sh\n").unwrap();
                standard_config(
                    "\n[[upstream]]\nname = \"tools\"\nkind = \"mcp\"\ncommand = \"./server.sh\"\nenv = { TOKEN = \"{secret}\" }\ncredential = \"railway\"\n",
                )
            }),
        ),
        (
            "issuer \"k8s\".jwks_file: file",
            Box::new(|deployment: &Deployment| {
                std::fs::write(deployment.path("jwks.json"), "{\"keys\": []}").unwrap();
                standard_config(
                    "\n[[issuer]]\nname = \"k8s\"\nissuer = \"https://k8s.example\"\naudiences = [\"valet\"]\njwks_file = \"jwks.json\"\nalgorithms = [\"RS256\"]\n",
                )
            }),
        ),
    ];
    for (expected, arrange) in &cases {
        let deployment = Deployment::standard();
        let config = arrange(&deployment);
        std::fs::write(deployment.config_path(), config).unwrap();
        let (code, stdout) = config_check(&deployment, &[]);
        assert_eq!(code, 1, "config check for {expected}: {stdout}");
        assert!(
            stdout.contains(expected),
            "config check names {expected:?}: {stdout}"
        );
        let (code, output) = deployment.start_expecting_failure(&[]);
        assert_eq!(code, 64, "valetd for {expected}: {output}");
        assert!(
            output.contains(expected),
            "valetd names {expected:?}: {output}"
        );
        // Offline, only the file is checked, and the output says so.
        let (code, stdout) = config_check(&deployment, &["--offline"]);
        assert_eq!(code, 0, "offline for {expected}: {stdout}");
        assert!(stdout.contains("offline:"), "{stdout}");
    }

    // All of them at once: both report every one, in one go.
    let deployment = Deployment::standard();
    std::fs::remove_file(deployment.path("seal.key")).unwrap();
    std::fs::remove_file(deployment.path("railway.secret")).unwrap();
    let config = standard_config("")
        .replace("env = \"VALET_TEST_GITHUB_TOKEN\"", "env = \"VALET_TEST_GITHUB_TOKEN_UNSET\"")
        .replace("grant_retention = \"1h\"", "grant_retention = \"1h\"\ntls_cert_file = \"missing.crt\"\ntls_key_file = \"missing.key\"");
    std::fs::write(deployment.config_path(), config).unwrap();
    let (_, stdout) = config_check(&deployment, &[]);
    let (_, output) = deployment.start_expecting_failure(&[]);
    for text in [&stdout, &output] {
        assert!(text.contains("the config has 5 problems"), "{text}");
        for expected in [
            "seal:",
            "credential \"railway\"",
            "credential \"github\"",
            "server.tls_cert_file",
            "server.tls_key_file",
        ] {
            assert!(text.contains(expected), "{expected} in {text}");
        }
    }
}

/// Runs valet with a stdout whose reader is gone before valet starts (as after `| head` has
/// read enough); returns the exit code and stderr. The pipe's read end is closed before the
/// spawn, so no other process can be holding it when valet writes.
fn with_closed_stdout(arguments: &[&str], server: &str) -> (i32, String) {
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    let output = Command::new(binary("valet"))
        .args(arguments)
        .env("VALET_SERVER", server)
        .env("VALET_KEY", OPERATOR_KEY)
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("run valet");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_closed_stdout_ends_every_command_quietly_with_141() {
    let deployment = Deployment::standard();
    let valetd = deployment.start(&[]);
    let agent = valetd.client(AGENT_KEY).await;
    let issued = agent
        .request_token(TokenRequest::new("limited", "pipe"))
        .await
        .unwrap();
    let token = issued.token_str().to_string();
    for arguments in [
        vec!["completions", "bash"],
        vec!["man"],
        vec!["grants", "list"],
        vec!["token", "introspect", token.as_str()],
        vec!["--json", "grants", "list"],
    ] {
        let (code, stderr) = with_closed_stdout(&arguments, &valetd.address);
        assert_eq!(code, 141, "valet {arguments:?}: {stderr}");
        assert!(stderr.is_empty(), "valet {arguments:?} printed: {stderr}");
    }
}

#[tokio::test]
async fn whoami_names_the_principal_its_roles_scopes_and_server() {
    let deployment = Deployment::standard();
    let valetd = deployment.start(&[]);
    let (code, stdout, stderr) = valet(&["whoami"], &valetd.address, AGENT_KEY);
    assert_eq!(code, 0, "{stdout}{stderr}");
    for expected in [
        "principal  agent",
        "roles      agent",
        "scopes     deploy-staging, limited, short",
        "via        principal_key",
        &format!("server     {}", valetd.address),
    ] {
        assert!(stdout.contains(expected), "{expected:?} in {stdout}");
    }
    let (code, stdout, _) = valet(&["--json", "whoami"], &valetd.address, OPERATOR_KEY);
    assert_eq!(code, 0);
    let me: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(me["principal"], "operator");
    assert_eq!(me["roles"], serde_json::json!(["operator"]));
    // An unknown key is refused as any call is.
    let (code, _, stderr) = valet(&["whoami"], &valetd.address, "vk_nobody");
    assert_eq!(code, 3, "{stderr}");
}

/// A child's output lines as they come, on a channel.
fn lines_of(stream: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stream)
            .lines()
            .map_while(Result::ok)
        {
            if sender.send(line).is_err() {
                return;
            }
        }
    });
    receiver
}

/// Waits up to `limit` for a line containing `text`; returns every line read meanwhile.
fn wait_for_line(
    lines: &std::sync::mpsc::Receiver<String>,
    text: &str,
    limit: std::time::Duration,
    seen: &mut Vec<String>,
) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match lines.recv_timeout(left) {
            Ok(line) => {
                let found = line.contains(text);
                seen.push(line);
                if found {
                    return true;
                }
            }
            Err(_) => return false,
        }
    }
    false
}

#[tokio::test]
async fn a_grants_watch_survives_a_restart_without_losing_or_repeating_changes() {
    let deployment = Deployment::standard();
    let first = deployment.start(&[]);
    let address = first.address.clone();
    let listen = address.trim_start_matches("http://").to_string();
    let mut watch = Command::new(binary("valet"))
        .args(["--json", "grants", "watch"])
        .env("VALET_SERVER", &address)
        .env("VALET_KEY", OPERATOR_KEY)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run valet grants watch");
    let stdout = lines_of(watch.stdout.take().unwrap());
    let stderr = lines_of(watch.stderr.take().unwrap());
    let (mut out, mut err) = (Vec::new(), Vec::new());
    assert!(
        wait_for_line(
            &stderr,
            "watching grant changes",
            std::time::Duration::from_secs(10),
            &mut err
        ),
        "{err:?}"
    );

    let before = first
        .client(AGENT_KEY)
        .await
        .request_token(TokenRequest::new("limited", "watch-before"))
        .await
        .unwrap();
    assert!(
        wait_for_line(
            &stdout,
            &before.grant.id,
            std::time::Duration::from_secs(10),
            &mut out
        ),
        "{out:?}"
    );

    // valetd ends the watch at once when it stops, instead of waiting out its grace period.
    let stopped = first.stop_with_output().await;
    assert!(
        !stopped.contains("still open after the shutdown grace period"),
        "valetd waited for the watch: {stopped}"
    );
    assert!(
        wait_for_line(
            &stderr,
            "reconnecting",
            std::time::Duration::from_secs(10),
            &mut err
        ),
        "{err:?}"
    );

    // Back on the same address; a grant issued right away is seen once, by the stream or the
    // catch-up, whichever comes first.
    let second = deployment.start(&["--listen", &listen]);
    let agent = second.client(AGENT_KEY).await;
    let during = agent
        .request_token(TokenRequest::new("limited", "watch-during"))
        .await
        .unwrap();
    assert!(
        wait_for_line(
            &stderr,
            "watching grant changes again",
            std::time::Duration::from_secs(30),
            &mut err
        ),
        "{err:?}"
    );
    let after = agent
        .request_token(TokenRequest::new("limited", "watch-after"))
        .await
        .unwrap();
    assert!(
        wait_for_line(
            &stdout,
            &after.grant.id,
            std::time::Duration::from_secs(10),
            &mut out
        ),
        "{out:?}"
    );
    // Let anything late arrive, then count.
    while let Ok(line) = stdout.recv_timeout(std::time::Duration::from_millis(500)) {
        out.push(line);
    }
    for grant in [&before.grant.id, &during.grant.id, &after.grant.id] {
        let n_lines = out
            .iter()
            .filter(|line| line.contains(grant.as_str()))
            .count();
        assert_eq!(
            n_lines, 1,
            "grant {grant} printed {n_lines} times: {out:#?}"
        );
    }
    let _ = watch.kill();
    let _ = watch.wait();
    drop(second);
}

#[tokio::test]
async fn a_config_reload_valetd_cannot_apply_exits_1_with_its_problems() {
    let deployment = Deployment::standard();
    let valetd = deployment.start(&[]);
    let config = std::fs::read_to_string(deployment.config_path()).unwrap();
    std::fs::write(
        deployment.config_path(),
        config.replace("max_ttl = \"1h\"", "max_ttl = \"forever\""),
    )
    .unwrap();
    let (code, stdout, stderr) = valet(
        &["config", "reload"],
        &valetd.address,
        valet_tests::ADMIN_KEY,
    );
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stderr.contains("server.max_ttl: \"forever\" is not a valid duration"),
        "{stderr}"
    );
    // Refusals stay refusals: an agent may not reload.
    let (code, _, stderr) = valet(&["config", "reload"], &valetd.address, AGENT_KEY);
    assert_eq!(code, 3, "{stderr}");
}

#[tokio::test]
async fn config_check_lints_warn_fail_with_strict_and_keep_a_stated_exception() {
    let deployment = Deployment::standard();
    let broad = standard_config("").replace(
        "[scope.params.project]\npattern = \"[a-z][a-z0-9-]{0,31}\"",
        "[scope.params.project]\npattern = \".*\"",
    );
    std::fs::write(deployment.config_path(), &broad).unwrap();
    let (code, stdout) = config_check(&deployment, &[]);
    assert_eq!(code, 0, "{stdout}");
    assert!(
        stdout.contains("warning: scope[0].params.project [param-matches-anything]")
            && stdout.contains("  fix: "),
        "{stdout}"
    );
    let (code, stdout) = config_check(&deployment, &["--strict"]);
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains("error: scope[0].params.project"),
        "{stdout}"
    );
    let (_, stdout) = config_check(&deployment, &["--strict", "--json"]);
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["valid"], false);
    assert!(
        report["lints"]
            .as_array()
            .unwrap()
            .iter()
            .any(|lint| lint["code"] == "param-matches-anything" && lint["silenced"].is_null())
    );

    // A stated exception silences it where it is, and the reason is kept.
    let excused = broad.replace(
        "pattern = \".*\"",
        "pattern = \".*\"\nallow_broad = \"test fixture: any project name is acceptable here\"",
    );
    std::fs::write(deployment.config_path(), excused).unwrap();
    let (_, stdout) = config_check(&deployment, &["--strict", "--json"]);
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let lint = report["lints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|lint| lint["code"] == "param-matches-anything")
        .cloned()
        .unwrap();
    assert_eq!(
        lint["silenced"],
        "test fixture: any project name is acceptable here"
    );
}

#[tokio::test]
async fn config_explain_prints_what_docs_policy_md_shows() {
    let repository = valet_tests::frameworks::repository();
    let doc = std::fs::read_to_string(repository.join("docs/policy.md")).unwrap();
    let example = repository.join("deploy/examples/railway.toml");
    let output = Command::new(binary("valet"))
        .args(["config", "explain"])
        .arg(&example)
        .args(["--principal", "maintenance-agent"])
        .output()
        .unwrap();
    assert!(output.status.success());
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        doc.contains(printed.trim_end()),
        "docs/policy.md shows the output of `valet config explain` as it is:\n{printed}"
    );

    let body = deployment_body();
    let output = Command::new(binary("valet"))
        .args(["config", "explain"])
        .arg(&example)
        .args([
            "--principal",
            "maintenance-agent",
            "--scope",
            "railway-production-maintenance",
            "--param",
            "project_id=2f9c6a1e-4b7d-4c1a-9e3f-5a6b7c8d9e0f",
            "--call",
            "POST /graphql/v2",
            "--body",
        ])
        .arg(body.path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(3));
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(printed.starts_with("needs approval: allow[2]"), "{printed}");
    assert!(doc.contains(printed.trim_end()), "{printed}");
}

/// The body docs/policy.md calls delete-volume.json.
fn deployment_body() -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        file.path(),
        r#"{"query":"mutation { volumeDelete(volumeId: \"vol-1\") }"}"#,
    )
    .unwrap();
    file
}

#[tokio::test]
async fn config_test_runs_policy_cases_and_fails_on_a_broken_promise() {
    let repository = valet_tests::frameworks::repository();
    let doc = std::fs::read_to_string(repository.join("docs/policy.md")).unwrap();
    for example in ["valet", "github", "aws", "railway", "mcp"] {
        // From the repository, with a relative path: as docs/policy.md shows it.
        let output = Command::new(binary("valet"))
            .current_dir(&repository)
            .args(["config", "test"])
            .arg(format!("deploy/examples/{example}.test.toml"))
            .output()
            .unwrap();
        let printed = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{example}: {printed}");
        if example == "railway" {
            assert!(
                doc.contains(printed.trim_end()),
                "docs/policy.md shows:\n{printed}"
            );
        }
    }
    // A promise the config does not keep fails the run, saying what happened.
    let cases = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        cases.path(),
        "[[case]]\nname = \"production needs a person\"\nenvironment = \"production\"\nexpect = \"needs_approval\"\n",
    )
    .unwrap();
    let output = Command::new(binary("valet"))
        .args(["config", "test"])
        .arg(cases.path())
        .arg("--config")
        .arg(repository.join("deploy/examples/railway.toml"))
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{printed}");
    assert!(
        printed.contains(
            "FAIL production needs a person — tokens for production are issued without approval"
        ),
        "{printed}"
    );
}

#[tokio::test]
async fn token_verify_with_a_jwks_file_needs_no_server_and_no_credential() {
    let deployment = Deployment::standard();
    let valetd = deployment.start(&[]);
    let agent = valetd.client(AGENT_KEY).await;
    let issued = agent
        .request_token(TokenRequest::new("limited", "jwks-file"))
        .await
        .unwrap();
    let jwks = agent
        .broker()
        .get_jwks(valet_client::v1::GetJwksRequest {})
        .await
        .unwrap()
        .into_inner();
    let document = serde_json::json!({"keys": jwks.keys.iter().map(|key| serde_json::json!({
        "kty": key.kty, "crv": key.crv, "x": key.x, "kid": key.kid, "alg": key.alg, "use": key.r#use,
    })).collect::<Vec<_>>()});
    let path = deployment.path("jwks.json");
    std::fs::write(&path, document.to_string()).unwrap();
    drop(agent);
    drop(valetd);

    let verify = |issuer: &str| {
        Command::new(binary("valet"))
            .env_clear()
            .env("VALET_SERVER", "http://127.0.0.1:1")
            .args([
                "token",
                "verify",
                issued.token_str(),
                "--audience",
                "github",
                "--jwks",
            ])
            .arg(&path)
            .args(["--issuer", issuer])
            .output()
            .unwrap()
    };
    let output = verify("https://valet.test");
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("valid signature and times"));
    let output = verify("https://someone-else.test");
    assert_eq!(output.status.code(), Some(3), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("invalid:"),
        "{output:?}"
    );
}
