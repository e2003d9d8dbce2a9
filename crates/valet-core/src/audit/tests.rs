//! Chain tampering, one test per way a log can be falsified.

use super::*;

fn chain_of(n_records: u64) -> (Vec<String>, ChainHead) {
    let mut head = ChainHead::genesis();
    let mut lines = Vec::new();
    for index in 0..n_records {
        let event = AuditEvent::new(AuditAction::TokenIssue, Outcome::Allowed)
            .with("grant_id", format!("g{index}"));
        let (line, next) = chain(&head, &event, 1_700_000_000 + index as i64, None);
        lines.push(line);
        head = next;
    }
    (lines, head)
}

fn verify_all(lines: &[String], head: Option<&ChainHead>) -> Result<ChainSummary, ChainBreak> {
    verify(lines.iter().map(String::as_str), head)
}

#[test]
fn an_untouched_chain_verifies_against_its_head() {
    let (lines, head) = chain_of(5);
    let summary = verify_all(&lines, Some(&head)).unwrap();
    assert_eq!(summary.n_records, 5);
    assert_eq!(summary.head, head);
    assert!(lines[0].contains("\"action\":\"token.issue\""));
}

#[test]
fn an_edited_record_is_found() {
    let (mut lines, head) = chain_of(5);
    lines[2] = lines[2].replace("g2", "g9");
    let broken = verify_all(&lines, Some(&head)).unwrap_err();
    assert_eq!((broken.line, broken.kind), (3, BreakKind::HashMismatch));
}

#[test]
fn an_edit_with_a_recomputed_hash_still_breaks_the_next_link() {
    let (mut lines, _) = chain_of(4);
    let forged_event =
        AuditEvent::new(AuditAction::TokenIssue, Outcome::Allowed).with("grant_id", "forged");
    let before = ChainHead {
        sequence: 1,
        hash: parse_hash(&lines[0]),
    };
    lines[1] = chain(&before, &forged_event, 1, None).0;
    let broken = verify_all(&lines, None).unwrap_err();
    assert_eq!((broken.line, broken.kind), (3, BreakKind::PrevMismatch));
}

#[test]
fn a_deleted_record_is_found() {
    let (mut lines, _) = chain_of(5);
    lines.remove(1);
    let broken = verify_all(&lines, None).unwrap_err();
    assert_eq!(
        broken.kind,
        BreakKind::SequenceGap {
            expected: 2,
            found: 3
        }
    );
}

#[test]
fn reordered_records_are_found() {
    let (mut lines, _) = chain_of(5);
    lines.swap(1, 2);
    assert!(matches!(
        verify_all(&lines, None).unwrap_err().kind,
        BreakKind::SequenceGap {
            expected: 2,
            found: 3
        }
    ));
}

#[test]
fn a_cut_tail_is_found_only_against_the_kept_head() {
    let (mut lines, head) = chain_of(5);
    lines.truncate(3);
    assert!(
        verify_all(&lines, None).is_ok(),
        "without a head a prefix is a valid chain"
    );
    let broken = verify_all(&lines, Some(&head)).unwrap_err();
    assert_eq!(
        broken.kind,
        BreakKind::TailCut {
            expected: 5,
            found_sequence: 3
        }
    );
}

#[test]
fn a_rewritten_log_does_not_match_the_kept_head() {
    let (_, head) = chain_of(3);
    let (other, _) = {
        let mut h = ChainHead::genesis();
        let mut lines = Vec::new();
        for index in 0..3 {
            let (line, next) = chain(
                &h,
                &AuditEvent::new(AuditAction::TokenIssue, Outcome::Denied)
                    .with("n", index.to_string()),
                5,
                None,
            );
            lines.push(line);
            h = next;
        }
        (lines, h)
    };
    assert!(matches!(
        verify_all(&other, Some(&head)).unwrap_err().kind,
        BreakKind::HeadMismatch { .. }
    ));
}

#[test]
fn garbage_lines_are_reported_not_panicked_on() {
    for garbage in ["not json", "{}", "{\"seq\":1}", "é", "{\"hash\":\"zz\"}"] {
        let broken = verify([garbage], None).unwrap_err();
        assert_eq!(broken.kind, BreakKind::NotARecord, "{garbage}");
    }
}

#[test]
fn head_text_round_trips() {
    let (_, head) = chain_of(2);
    assert_eq!(head.to_string().parse::<ChainHead>().unwrap(), head);
    assert!("12".parse::<ChainHead>().is_err());
    assert!("x:abc".parse::<ChainHead>().is_err());
}

fn parse_hash(line: &str) -> String {
    let value: serde_json::Value = serde_json::from_str(line).unwrap();
    value["hash"].as_str().unwrap().to_string()
}

#[test]
fn every_action_has_its_own_name_and_the_config_reference_lists_it() {
    let names: std::collections::BTreeSet<&str> = AuditAction::ALL
        .iter()
        .map(|action| action.as_str())
        .collect();
    assert_eq!(names.len(), AuditAction::ALL.len(), "names are unique");
    let reference = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/configuration.md"),
    )
    .unwrap();
    for name in names {
        assert!(
            reference.contains(&format!("`{name}`")),
            "docs/configuration.md names audit action {name}"
        );
    }
}

mod keyed {
    use super::*;
    use crate::keyring::{SealKey, SigningKey};

    fn seal_key() -> SealKey {
        SealKey::from_base64(&SealKey::generate_base64().unwrap()).unwrap()
    }

    /// A keyed chain of `n` records, with a checkpoint after every `every` records.
    fn keyed_chain(
        key: &ChainKey,
        signer: &SigningKey,
        start: ChainHead,
        n: u64,
        every: u64,
    ) -> (Vec<String>, ChainHead) {
        let mut head = start;
        let mut lines = Vec::new();
        if head.sequence > 0 {
            let (line, next) = chain(&head, &checkpoint(&head, signer), 9, Some(key));
            lines.push(line);
            head = next;
        }
        for index in 0..n {
            let event = AuditEvent::new(AuditAction::TokenIssue, Outcome::Allowed)
                .with("grant_id", format!("g{index}"));
            let (line, next) = chain(&head, &event, 10, Some(key));
            lines.push(line);
            head = next;
            if (index + 1) % every == 0 {
                let (line, next) = chain(&head, &checkpoint(&head, signer), 11, Some(key));
                lines.push(line);
                head = next;
            }
        }
        (lines, head)
    }

    fn public(signer: &SigningKey) -> impl Fn(&str) -> Option<[u8; 32]> + '_ {
        move |kid: &str| (kid == signer.kid()).then(|| signer.public_key())
    }

    #[test]
    fn a_re_chained_log_fails_the_mac_and_the_checkpoints() {
        let (key, signer) = (
            ChainKey::from_seal_key(&seal_key()),
            SigningKey::generate().unwrap(),
        );
        let (lines, head) = keyed_chain(&key, &signer, ChainHead::genesis(), 10, 4);
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        let public_keys = public(&signer);
        let full = Verification {
            key: Some(&key),
            public_keys: Some(&public_keys),
            expected_head: Some(&head),
        };
        let summary = verify_with(refs.iter().copied(), &full).unwrap();
        assert!(summary.macs_checked);
        assert_eq!(summary.attested_through, Some(head.sequence - 3));

        // Delete record 2, re-chain everything after it with plain SHA-256 (what anyone can do),
        // and pad back to the kept head's length.
        let mut forged = ChainHead::genesis();
        let mut rewritten = Vec::new();
        for (index, line) in refs.iter().enumerate() {
            if index == 1 {
                continue;
            }
            let mut body: serde_json::Map<String, Value> = serde_json::from_str(line).unwrap();
            for member in ["seq", "time", "prev", "hash", "mac"] {
                body.remove(member);
            }
            let (line, next) = chain(&forged, &AuditEvent { fields: body }, 10, None);
            rewritten.push(line);
            forged = next;
        }
        let rewritten: Vec<&str> = rewritten.iter().map(String::as_str).collect();
        let with_key = Verification {
            key: Some(&key),
            ..Verification::default()
        };
        assert_eq!(
            verify_with(rewritten.iter().copied(), &with_key)
                .unwrap_err()
                .kind,
            BreakKind::MacMismatch
        );
        // Without the key, the signed checkpoints catch it.
        let offline = Verification {
            public_keys: Some(&public_keys),
            ..Verification::default()
        };
        assert_eq!(
            verify_with(rewritten.iter().copied(), &offline)
                .unwrap_err()
                .kind,
            BreakKind::CheckpointMismatch
        );
    }

    #[test]
    fn records_after_a_head_are_counted_a_head_not_held_and_a_cut_front_are_refused() {
        let (key, signer) = (
            ChainKey::from_seal_key(&seal_key()),
            SigningKey::generate().unwrap(),
        );
        let (lines, head) = keyed_chain(&key, &signer, ChainHead::genesis(), 6, 100);
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        let kept = ChainHead {
            sequence: 4,
            hash: verify(refs[..4].iter().copied(), None).unwrap().head.hash,
        };
        let verification = Verification {
            key: Some(&key),
            expected_head: Some(&kept),
            ..Verification::default()
        };
        // Records after a head were written after it was read: counted, not refused.
        let summary = verify_with(refs.iter().copied(), &verification).unwrap();
        assert_eq!((summary.n_after_head, summary.head.sequence), (2, 6));
        // A head the chain does not hold at its sequence is a rewrite, however far it runs on.
        let elsewhere = ChainHead {
            sequence: 4,
            hash: "0".repeat(64),
        };
        let rewritten = Verification {
            expected_head: Some(&elsewhere),
            ..Verification::default()
        };
        assert!(matches!(
            verify_with(refs.iter().copied(), &rewritten)
                .unwrap_err()
                .kind,
            BreakKind::HeadMismatch { .. }
        ));
        // A file that starts right after the head holds it (its first record's prev); one that
        // starts later cannot show it.
        assert_eq!(
            verify(refs[4..].iter().copied(), Some(&kept))
                .unwrap()
                .n_after_head,
            2
        );
        assert_eq!(
            verify(refs.iter().copied(), Some(&ChainHead::genesis()))
                .unwrap()
                .n_after_head,
            6
        );
        assert!(matches!(
            verify(refs[4..].iter().copied(), Some(&elsewhere))
                .unwrap_err()
                .kind,
            BreakKind::HeadMismatch { .. }
        ));
        let earlier = ChainHead {
            sequence: 3,
            hash: verify(refs[..3].iter().copied(), None).unwrap().head.hash,
        };
        assert!(matches!(
            verify(refs[4..].iter().copied(), Some(&earlier))
                .unwrap_err()
                .kind,
            BreakKind::HeadBeforeFile {
                expected: 3,
                first: 5
            }
        ));
        let public_keys = public(&signer);
        let offline = Verification {
            public_keys: Some(&public_keys),
            expected_head: Some(&head),
            ..Verification::default()
        };
        assert_eq!(
            verify_with(refs[2..].iter().copied(), &offline)
                .unwrap_err()
                .kind,
            BreakKind::NoStart { found: 3 }
        );
    }

    #[test]
    fn a_rotated_file_opens_with_a_checkpoint_and_verifies_on_its_own() {
        let (key, signer) = (
            ChainKey::from_seal_key(&seal_key()),
            SigningKey::generate().unwrap(),
        );
        let (first, head) = keyed_chain(&key, &signer, ChainHead::genesis(), 3, 100);
        let (second, end) = keyed_chain(&key, &signer, head.clone(), 3, 100);
        let public_keys = public(&signer);
        let offline = Verification {
            public_keys: Some(&public_keys),
            expected_head: Some(&end),
            ..Verification::default()
        };
        let summary = verify_with(second.iter().map(String::as_str), &offline).unwrap();
        assert_eq!(summary.first_sequence, head.sequence + 1);
        assert_eq!(summary.attested_through, Some(head.sequence));
        let both: Vec<&str> = first.iter().chain(&second).map(String::as_str).collect();
        let with_key = Verification {
            key: Some(&key),
            expected_head: Some(&end),
            ..Verification::default()
        };
        assert!(verify_with(both, &with_key).is_ok());
    }
}

#[test]
fn long_values_keep_an_excerpt_their_length_and_their_digest() {
    let long = "é".repeat(400);
    let event = AuditEvent::new(AuditAction::GatewayCall, Outcome::Denied)
        .with("query", &long)
        .with("rules", &long)
        .with("short", "kept as it is")
        .with_value("arguments", serde_json::json!({"note": long}))
        .bounded(101, &["rules"]);
    let query = event.text("query").unwrap();
    assert!(
        query.starts_with(&"é".repeat(50)),
        "cut at a character boundary"
    );
    assert!(query.ends_with(&format!(
        "… [800 bytes, sha256 {}]",
        hex::encode(ring::digest::digest(&ring::digest::SHA256, long.as_bytes()))
    )));
    assert!(query.len() < 200);
    assert_eq!(event.text("rules"), Some(long.as_str()), "exempt");
    assert_eq!(event.text("short"), Some("kept as it is"));
    assert!(
        event.value("arguments").unwrap()["note"]
            .as_str()
            .unwrap()
            .len()
            < 200
    );
}
