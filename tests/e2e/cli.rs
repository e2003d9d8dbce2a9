//! The `valet` command line against a real valetd: the offline checks and the audit verifier.

use std::process::Command;

use valet_client::TokenRequest;
use valet_tests::{AGENT_KEY, Deployment, OPERATOR_KEY, binary};

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
    assert!(stdout.contains("chain intact, 4 records"), "{stdout}");

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
    let (code, stdout, _) = valet(
        &["config", "check", config.to_str().unwrap()],
        "http://127.0.0.1:1",
        "unused",
    );
    assert_eq!(code, 0, "{stdout}");
    assert!(
        stdout.contains("is valid: 4 principals, 4 scopes, 2 credentials"),
        "{stdout}"
    );

    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples/valet.toml");
    assert_eq!(
        valet(
            &["config", "check", example],
            "http://127.0.0.1:1",
            "unused"
        )
        .0,
        0
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
