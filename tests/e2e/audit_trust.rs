//! Trusting the record: an audit log someone rewrote — with write access to the audit directory,
//! but not to valetd's keys — is refused by `valet audit verify` and by valetd at start, and two
//! valetd processes never share one audit log.

use std::process::Command;
use std::time::Duration;

use valet_client::TokenRequest;
use valet_core::audit::{self, AuditEvent, ChainHead};
use valet_tests::{AGENT_KEY, Deployment, OPERATOR_KEY, binary};

fn valet(arguments: &[&str], server: &str) -> (i32, String) {
    let output = Command::new(binary("valet"))
        .args(arguments)
        .env("VALET_SERVER", server)
        .env("VALET_KEY", OPERATOR_KEY)
        .output()
        .expect("run valet");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

/// Re-chains `records` after `head` the way anyone can: plain SHA-256, no MAC.
fn rechain(head: &ChainHead, records: &[&str]) -> (Vec<String>, ChainHead) {
    let mut head = head.clone();
    let mut lines = Vec::new();
    for record in records {
        let mut fields: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(record).unwrap();
        for member in ["seq", "time", "prev", "hash", "mac"] {
            fields.remove(member);
        }
        let mut event = AuditEvent::new(audit::AuditAction::TokenIssue, audit::Outcome::Allowed);
        for (key, value) in fields {
            event = event.with_value(&key, value);
        }
        let (line, next) = audit::chain(&head, &event, 1_800_000_000, None);
        lines.push(line);
        head = next;
    }
    (lines, head)
}

#[tokio::test]
async fn a_rewritten_audit_log_is_refused_by_verify_and_by_valetd_at_start() {
    let deployment = Deployment::standard();
    let valetd = deployment.start(&[]);
    let agent = valetd.client(AGENT_KEY).await;
    for index in 0..6 {
        agent
            .request_token(TokenRequest::new("limited", format!("trust-{index}")))
            .await
            .unwrap();
    }
    let path = deployment.audit_path();
    let seal_key = deployment.path("seal.key");
    let seal_key = seal_key.to_str().unwrap();
    let original = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = original.lines().collect();
    let copy = deployment.path("copy.jsonl");
    let copy_text = copy.to_str().unwrap();
    let verify = |content: &str, extra: &[&str]| {
        std::fs::write(&copy, content).unwrap();
        let mut arguments = vec!["audit", "verify", copy_text];
        arguments.extend_from_slice(extra);
        valet(&arguments, &valetd.address)
    };

    // The real log: authenticated, from the first record to the recorded head.
    let (code, stdout) = verify(&original, &["--fetch-head", "--seal-key-file", seal_key]);
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("every record's MAC checks"), "{stdout}");

    // Records cut from its start.
    let (code, stdout) = verify(&lines[2..].join("\n"), &["--fetch-head"]);
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains("records were cut from its start"),
        "{stdout}"
    );

    // A forged record appended past the recorded head.
    let last = audit::verify(lines.iter().copied(), None).unwrap().head;
    let (forged, _) = rechain(&last, &[lines[1]]);
    let appended = format!("{original}{}\n", forged[0]);
    // Against the head alone it is a record written after the head was read, as on a live
    // log: counted and said to be uncovered, not trusted and not called forged...
    let (code, stdout) = verify(&appended, &["--fetch-head"]);
    assert_eq!(code, 0, "{stdout}");
    assert!(
        stdout.contains(
            "then 1 record written after that head was read (chained to it, not covered by it)"
        ),
        "{stdout}"
    );
    // ...its MAC gives it away.
    let (code, stdout) = verify(&appended, &["--seal-key-file", seal_key]);
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("MAC is missing or wrong"), "{stdout}");

    // A record deleted, the rest re-chained, and padded to one past the head.
    let (rest, _) = rechain(
        &audit::verify(lines[..1].iter().copied(), None)
            .unwrap()
            .head,
        &lines[2..],
    );
    let (padding, _) = rechain(
        &audit::verify(rest.iter().map(String::as_str), None)
            .unwrap()
            .head,
        &lines[1..3],
    );
    let rewritten: Vec<&str> = std::iter::once(lines[0])
        .chain(rest.iter().map(String::as_str))
        .chain(padding.iter().map(String::as_str))
        .collect();
    let rewritten = format!("{}\n", rewritten.join("\n"));
    let (code, stdout) = verify(&rewritten, &["--seal-key-file", seal_key]);
    assert_eq!(code, 1, "{stdout}");

    // valetd refuses to start on either file, naming what is wrong.
    valetd.stop().await;
    for (what, content) in [("appended", &appended), ("re-chained", &rewritten)] {
        std::fs::write(&path, content).unwrap();
        let (code, output) = deployment.start_expecting_failure(&[]);
        assert_ne!(code, 0, "{what}");
        assert!(
            output.contains("runs past the chain head the store recorded")
                || output.contains("does not end with the chain head"),
            "{what}: {output}"
        );
    }
    std::fs::write(&path, &original).unwrap();
    let restarted = deployment.start(&[]);
    drop(restarted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verifying_a_live_log_against_its_fetched_head_never_cries_tampering() {
    let deployment = Deployment::standard();
    let valetd = deployment.start(&[]);
    let agent = valetd.client(AGENT_KEY).await;
    // valetd records all the while: the head is fetched, then the file read, so the file runs
    // on past the head in most runs.
    let writing = tokio::spawn(async move {
        for index in 0u64.. {
            let _ = agent
                .request_token(TokenRequest::new("limited", format!("live-{index}")))
                .await;
            // A steady writer, not a flood: the race needs records, not load.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    let path = deployment.audit_path();
    let seal_key = deployment.path("seal.key");
    let (path, seal_key) = (path.to_str().unwrap(), seal_key.to_str().unwrap());
    // Until the race has happened a few times (bounded): every verify passes.
    let mut past_head = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut runs = 0;
    while (runs < 10 || past_head < 2) && std::time::Instant::now() < deadline {
        let extra: &[&str] = if runs % 2 == 0 {
            &[]
        } else {
            &["--seal-key-file", seal_key]
        };
        let mut arguments = vec!["audit", "verify", path, "--fetch-head"];
        arguments.extend_from_slice(extra);
        let (code, stdout) = valet(&arguments, &valetd.address);
        assert_eq!(code, 0, "{stdout}");
        assert!(stdout.contains("chain intact"), "{stdout}");
        past_head += usize::from(stdout.contains("written after that head was read"));
        runs += 1;
    }
    writing.abort();
    assert!(
        past_head > 0,
        "the log never ran past its fetched head: the race went untested"
    );
}

#[tokio::test]
async fn two_valetd_processes_never_share_one_audit_log() {
    let deployment = Deployment::standard();
    let first = deployment.start(&[]);
    // A second valetd with its own data dir but the same audit log.
    let (code, output) = deployment.start_expecting_failure(&[
        "--data-dir",
        deployment.path("other-data").to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(
        output.contains("is in use by another valetd (pid"),
        "{output}"
    );
    drop(first);
}
