//! The masker replaces every complete occurrence, in every encoding, with one fixed marker, and
//! its output — bytes and chunk boundaries — never depends on the secret otherwise: the same
//! script of upstream chunks, run against two secrets, gives the same chunks.

use proptest::prelude::*;

use super::*;

fn stream(secret: &[u8], chunks: &[&[u8]]) -> Vec<Vec<u8>> {
    let mut masker = Masker::new(needles_of(secret)).unwrap();
    let mut out: Vec<Vec<u8>> = chunks
        .iter()
        .map(|chunk| masker.push(chunk).to_vec())
        .collect();
    out.push(masker.finish().to_vec());
    out
}

fn joined(chunks: &[Vec<u8>]) -> String {
    String::from_utf8(chunks.concat()).unwrap()
}

#[test]
fn every_occurrence_becomes_one_fixed_marker_in_any_encoding_and_across_chunks() {
    let secret = b"rk_live/Secret+42";
    let marker = String::from_utf8(MARKER.to_vec()).unwrap();
    assert_eq!(
        joined(&stream(secret, &[b"key=rk_live/Secret+42&x=1"])),
        format!("key={marker}&x=1")
    );
    assert_eq!(
        joined(&stream(secret, &[b"key=rk_li", b"ve/Secr", b"et+42!"])),
        format!("key={marker}!")
    );
    assert_eq!(
        joined(&stream(
            secret,
            &[b"u=rk_live%2FSecret%2B42 l=rk_live%2fSecret%2b42"]
        )),
        format!("u={marker} l={marker}")
    );
    assert_eq!(
        joined(&stream(secret, &[br#"{"a":"rk_live\/Secret+42"}"#])),
        format!(r#"{{"a":"{marker}"}}"#)
    );
    // A reflected Basic header: base64 of user:secret.
    use base64::Engine;
    let basic = base64::engine::general_purpose::STANDARD.encode(b"bot:rk_live/Secret+42");
    let masked = joined(&stream(
        secret,
        &[format!("Authorization: Basic {basic}").as_bytes()],
    ));
    assert!(masked.contains(&marker), "{masked}");
    assert!(!masked.contains(&basic[8..]), "{masked}");
    // Not the secret: untouched.
    assert_eq!(
        joined(&stream(secret, &[b"rk_live/Secret+43 is not it"])),
        "rk_live/Secret+43 is not it"
    );
}

#[test]
fn a_guessed_prefix_is_held_exactly_as_any_other_bytes_are() {
    // The old masker released "first\n" at once and held "SE" back when the secret began with SE:
    // where the chunk broke told the agent its guess was a prefix. Now only the window decides.
    let right = stream(b"SECRET42", &[b"first\nSE", b"X"]);
    let wrong = stream(b"QWERTY99", &[b"first\nSE", b"X"]);
    assert_eq!(right, wrong);
    assert_eq!(
        right[0], b"",
        "under the window, nothing is released before the end"
    );
    let long = vec![b'a'; WINDOW + 10];
    let out = stream(b"SECRET42", &[&long, b"SE"]);
    assert_eq!(out[0].len(), 10);
    assert_eq!(
        out[1].len(),
        2,
        "the window moves by the chunk's size, whatever the bytes"
    );
}

#[test]
fn a_credential_too_long_to_mask_in_a_stream_is_refused() {
    assert!(Masker::new(needles_of(&[b'x'; MAX_SECRET_BYTES])).is_ok());
    assert!(Masker::new(needles_of(&[b'/'; MAX_SECRET_BYTES + 400])).is_err());
}

/// One piece of what an upstream sends back: bytes the agent chose (the same in every run), a
/// guess at a prefix of the first secret (the same bytes in every run), or an echo of the run's
/// own secret in some encoding.
#[derive(Debug, Clone)]
enum Piece {
    Agent(Vec<u8>),
    Guess(usize),
    Echo(usize),
}

/// The upstream's chunks for a script; with an empty `secret`, echoes are left out.
fn render(pieces: &[Vec<Piece>], secret: &[u8], guessed: &[u8]) -> Vec<Vec<u8>> {
    let echoes = if secret.is_empty() {
        vec![Vec::new()]
    } else {
        echo_forms(secret)
    };
    pieces
        .iter()
        .map(|chunk| {
            let mut bytes = Vec::new();
            for piece in chunk {
                match piece {
                    Piece::Agent(agent) => bytes.extend_from_slice(agent),
                    Piece::Guess(length) => {
                        bytes.extend_from_slice(&guessed[..(*length).min(guessed.len() - 1)])
                    }
                    Piece::Echo(form) => bytes.extend_from_slice(&echoes[form % echoes.len()]),
                }
            }
            bytes
        })
        .collect()
}

/// The secret as upstreams write it: raw, percent-encoded, JSON-escaped, base64.
fn echo_forms(secret: &[u8]) -> Vec<Vec<u8>> {
    use base64::Engine;
    let text = String::from_utf8(secret.to_vec()).unwrap();
    // As URL encoders write it: unreserved characters as they are, the rest %XX.
    let percent: String = secret
        .iter()
        .map(|byte| {
            if byte.is_ascii_alphanumeric() || b"-._~".contains(byte) {
                char::from(*byte).to_string()
            } else {
                format!("%{byte:02X}")
            }
        })
        .collect();
    vec![
        secret.to_vec(),
        percent.into_bytes(),
        serde_json::to_string(&text).unwrap().into_bytes(),
        base64::engine::general_purpose::STANDARD
            .encode(secret)
            .into_bytes(),
    ]
}

fn piece() -> impl Strategy<Value = Piece> {
    prop_oneof![
        proptest::collection::vec(prop_oneof![Just(b'S'), Just(b'/'), any::<u8>()], 0..64)
            .prop_map(Piece::Agent),
        (0usize..48).prop_map(Piece::Guess),
        (0usize..4).prop_map(Piece::Echo),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 300,
        failure_persistence: None,
        .. ProptestConfig::default()
    })]

    /// The same script against two secrets (their lengths differ too): the same chunks, byte for
    /// byte — the echoes are the marker in both, and nothing else tells the secrets apart.
    #[test]
    fn what_the_agent_receives_does_not_depend_on_the_secret(
        first in "S[A-Za-z0-9/+]{7,40}",
        second in "[A-Za-z0-9_]{8,47}",
        script in proptest::collection::vec(proptest::collection::vec(piece(), 0..4), 1..8),
        padding in 0usize..(WINDOW + 200),
    ) {
        let mut script = script;
        // Sometimes push the guesses past the window, where the old masker released on a miss.
        script.insert(0, vec![Piece::Agent(vec![b'.'; padding])]);
        let guessed = first.as_bytes();
        // The agent's own bytes spelling out a whole secret is a correct guess of all of it, which
        // masking shows (and cannot help showing): only scripts that do not are compared.
        let without_echoes: Vec<u8> = render(&script, b"", guessed).concat();
        for secret in [first.as_bytes(), second.as_bytes()] {
            for needle in needles_of(secret) {
                prop_assume!(memchr::memmem::find(&without_echoes, &needle).is_none());
            }
        }
        let chunks = |secret: &[u8]| {
            let rendered = render(&script, secret, guessed);
            let slices: Vec<&[u8]> = rendered.iter().map(Vec::as_slice).collect();
            stream(secret, &slices)
        };
        prop_assert_eq!(chunks(first.as_bytes()), chunks(second.as_bytes()));
    }
}
