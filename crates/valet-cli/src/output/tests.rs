//! Snapshots of what people and scripts read: the grant table in both styles, and errors.

use super::*;

const NOW: UnixTime = 1_700_000_000;

fn grant(
    id: &str,
    principal: &str,
    task: &str,
    status: v1::GrantStatus,
    issued_ago: i64,
    expires_in: i64,
    (uses, max_uses): (u64, u64),
) -> v1::Grant {
    v1::Grant {
        id: id.into(),
        principal: principal.into(),
        task_id: task.into(),
        purpose: "snapshot".into(),
        scope: "railway-staging-domains".into(),
        environment: "staging".into(),
        audience: "railway".into(),
        params: [("project".to_string(), "shop".to_string())]
            .into_iter()
            .collect(),
        issued_at: Some(prost_types::Timestamp {
            seconds: NOW - issued_ago,
            nanos: 0,
        }),
        expires_at: Some(prost_types::Timestamp {
            seconds: NOW + expires_in,
            nanos: 0,
        }),
        uses,
        max_uses,
        status: status as i32,
        status_reason: String::new(),
        key_id: "95520d6587185015".into(),
        max_expires_at: Some(prost_types::Timestamp {
            seconds: NOW + 1800,
            nanos: 0,
        }),
    }
}

fn grants() -> Vec<v1::Grant> {
    vec![
        grant(
            "01m85j5fd02fceax4cf7q3tgx3",
            "demo-agent",
            "fix-dns-42",
            v1::GrantStatus::Active,
            75,
            225,
            (3, 100),
        ),
        grant(
            "01m85j6a9k3sd0f7w2c4xq8y1n",
            "ci-agent",
            "deploy-7",
            v1::GrantStatus::Revoked,
            3_700,
            20,
            (0, 0),
        ),
        grant(
            "01m85j7b2m4te1g8x3d5yr9z2p",
            "demo-agent",
            "t",
            v1::GrantStatus::Expired,
            90_000,
            -86_000,
            (1, 0),
        ),
    ]
}

#[test]
fn the_terminal_table_is_aligned_with_relative_times() {
    let table = grant_table(&grants(), NOW, Style::Terminal { colour: true });
    // Colour codes are part of the output; show them readably in the snapshot.
    insta::assert_snapshot!(table.replace('\x1b', "^["));
}

#[test]
fn the_piped_table_is_tab_separated_with_absolute_times() {
    insta::assert_snapshot!(grant_table(&grants(), NOW, Style::Plain));
}

#[test]
fn an_empty_terminal_table_says_so() {
    insta::assert_snapshot!(grant_table(&[], NOW, Style::Terminal { colour: true }));
}

#[test]
fn spans_use_the_two_largest_units() {
    assert_eq!(span(42), "42s");
    assert_eq!(span(60), "1m");
    assert_eq!(span(252), "4m 12s");
    assert_eq!(span(3_600), "1h");
    assert_eq!(span(11_100), "3h 5m");
    assert_eq!(span(90_000), "1d 1h");
    assert_eq!(relative(NOW - 30, NOW), "30s ago");
    assert_eq!(relative(NOW + 30, NOW), "in 30s");
}

#[test]
fn errors_are_one_sentence_with_a_hint_and_their_exit_code() {
    let cases: Vec<anyhow::Error> = vec![
        ClientError::Unreachable { server: "http://127.0.0.1:7470".into(), detail: "transport error: Connection refused".into() }.into(),
        ClientError::NoKey.into(),
        ClientError::Status(tonic::Status::permission_denied(
            "principal \"demo-agent\" may not request scope \"prod-db\"; scopes it may request: [railway-staging-domains]",
        ))
        .into(),
        ClientError::Status(tonic::Status::unauthenticated("the principal key is not known to valetd (revoked, mistyped, or for another deployment)")).into(),
        ClientError::Status(tonic::Status::invalid_argument("ttl 2h exceeds scope \"railway-staging-domains\" max_ttl 30m")).into(),
        UsageError("revoke-all needs confirmation: run it on a terminal, or pass --yes in scripts".into()).into(),
    ];
    let rendered: Vec<String> = cases
        .iter()
        .map(|error| format!("[exit {}] {}", exit_code_of(error), render_error(error)))
        .collect();
    insta::assert_snapshot!(rendered.join("\n"));
}

#[test]
fn no_color_turns_colour_off_and_changes_nothing_else() {
    let coloured = grant_table(&grants(), NOW, Style::Terminal { colour: true });
    let plain = grant_table(&grants(), NOW, Style::Terminal { colour: false });
    assert!(!plain.contains('\x1b'));
    let without_escapes = coloured
        .replace("\x1b[32m", "")
        .replace("\x1b[31m", "")
        .replace("\x1b[33m", "")
        .replace("\x1b[0m", "");
    assert_eq!(without_escapes, plain);
}
