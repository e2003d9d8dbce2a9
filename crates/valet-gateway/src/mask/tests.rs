//! The masker replaces every complete occurrence, in every form decoders read, with one fixed
//! marker, and its output — bytes, chunk sizes, and what has left by the end of each write of
//! the upstream — never depends on the secret otherwise: the same script of upstream writes, cut
//! into frames wherever the raw bytes fall, run against two secrets, gives the same result.

use proptest::prelude::*;

use super::*;

/// Every chunk released, pushing each of `writes` whole.
fn stream(secret: &[u8], writes: &[&[u8]]) -> Vec<Vec<u8>> {
    let mut masker = Masker::new(secret).unwrap();
    let mut out: Vec<Vec<u8>> = writes
        .iter()
        .map(|write| masker.push(write).to_vec())
        .collect();
    out.push(masker.finish().to_vec());
    out
}

fn whole(secret: &[u8], text: &str) -> String {
    String::from_utf8(Masker::new(secret).unwrap().mask_whole(text.as_bytes())).unwrap()
}

const MARK: &str = "[masked by valet]";

#[test]
fn every_form_decoders_read_becomes_one_fixed_marker() {
    let secret = b"AbC/dEf+GhIj&KlM\"nOp";
    for written in [
        "AbC/dEf+GhIj&KlM\"nOp",
        // Percent-encoded, in any mixture (Go's url.PathEscape, Python's quote).
        "AbC%2FdEf%2BGhIj%26KlM%22nOp",
        "AbC%2fdEf+GhIj%26KlM%22nOp",
        "AbC/dEf%2BGhIj&KlM%22nOp",
        "%41%62%43%2F%64%45%66%2B%47%68%49%6A%26%4B%6C%4D%22%6E%4F%70",
        // JSON-escaped (Go writes & as \u0026), and JSON inside JSON.
        "AbC\\/dEf+GhIj\\u0026KlM\\\"nOp",
        "AbC/dEf\\u002bGhIj\\\\u0026KlM\\\\\\\"nOp",
        // HTML references, named and numeric.
        "AbC/dEf&#43;GhIj&amp;KlM&quot;nOp",
        "AbC&#x2F;dEf&#x002b;GhIj&#38;KlM&#34;nOp",
        // Stacked: Go's html/template inside Go's JSON, percent-encoding applied twice, JSON in
        // a URL, JSON in an HTML attribute, HTML escaped twice.
        "AbC/dEf\\u0026#43;GhIj\\u0026amp;KlM\\u0026#34;nOp",
        "AbC%252FdEf%252BGhIj%2526KlM%2522nOp",
        "AbC%5C/dEf+GhIj%5Cu0026KlM%5C%22nOp",
        "AbC/dEf+GhIj&KlM\\&quot;nOp",
        "AbC/dEf&amp;#43;GhIj&amp;amp;KlM&amp;quot;nOp",
    ] {
        assert_eq!(
            whole(secret, &format!("<{written}>")),
            format!("<{MARK}>"),
            "{written}"
        );
    }
    assert_eq!(
        whole(secret, "AbC/dEf+GhIj&KlM\"nOq"),
        "AbC/dEf+GhIj&KlM\"nOq"
    );
}

#[test]
fn base64_is_masked_with_the_characters_it_shares_with_its_neighbours() {
    use base64::Engine;
    let encode = |text: &str| base64::engine::general_purpose::STANDARD.encode(text);
    for secret in ["sk_live_4f8c2a7e9b1d", "ck_other_93jd71kaQQ"] {
        for (before, after) in [
            ("", ""),
            ("Bearer ", ""),
            ("{\"auth\":\"Bearer ", "\",\"n\":1}"),
            ("x", "yz"),
        ] {
            let text = format!(
                "state={}&next=1",
                encode(&format!("{before}{secret}{after}"))
            );
            let masked = whole(secret.as_bytes(), &text);
            assert!(masked.contains(MARK), "{secret} {before}…{after}: {masked}");
        }
    }
    // What is left around the marker does not tell the two secrets apart.
    let around = |secret: &str| {
        whole(
            secret.as_bytes(),
            &format!(
                "state={}&next=1",
                encode(&format!("{{\"auth\":\"Bearer {secret}\",\"n\":1}}"))
            ),
        )
    };
    assert_eq!(
        around("sk_live_4f8c2a7e9b1d"),
        around("ck_other_93jd71kaQQ")
    );
}

#[test]
fn base64_inside_a_url_or_broken_into_lines_is_masked_and_its_rest_goes_with_it() {
    use base64::Engine;
    let secret = "sk_live_4f8c>?~2a7e9b1d";
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("Bearer {secret}"));
    let percent = encoded
        .replace('+', "%2B")
        .replace('/', "%2F")
        .replace('=', "%3D");
    let masked = whole(secret.as_bytes(), &format!("?t={percent}&next=1"));
    assert!(masked.ends_with("[masked by valet]&next=1"), "{masked}");
    let mime = format!("{}\r\n{}", &encoded[..14], &encoded[14..]);
    let masked = whole(secret.as_bytes(), &format!("<{mime}>"));
    assert!(masked.contains(MARK), "{masked}");
    // However long the text after it, all of it goes: what follows the secret is encoded at an
    // alignment its length decides.
    let around = |secret: &str| {
        let encoded = base64::engine::general_purpose::STANDARD
            .encode(format!("|{secret}{}", "A".repeat(2100)));
        whole(secret.as_bytes(), &format!("<{encoded}>"))
    };
    assert_eq!(
        around("sk_live_4f8c2a7e9b1d"),
        around("ck_other_93jd71kaQQx")
    );
}

#[test]
fn base64url_text_goes_whole_whichever_alphabet_the_secret_matched_in() {
    use base64::Engine;
    // An alphanumeric secret's base64 has neither `+` nor `/`: its standard form matches inside
    // base64url text, and the text's rest (after a `-` or `_`) must go all the same — it tells
    // the secret's length modulo 3 and bits of its last byte.
    let text = |secret: &str| {
        let mut bytes = format!("Bearer {secret}").into_bytes();
        bytes.extend_from_slice(&[0xff; 6]);
        bytes.extend_from_slice(b"ABCDEF");
        let encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&bytes);
        whole(secret.as_bytes(), &format!("tok={encoded} end"))
    };
    let masked = text("sk_live_9fK2mQ7xR4tZ8wL1pN6vB3cH5jD0gYaE");
    assert_eq!(masked, text("sk_live_Hq3XbV2nR8yT5kW9mZ4cJ7dF1gP6sLoo"));
    assert_eq!(masked, text("sk_live_Hq3XbV2nR8yT5kW9mZ4cJ7dF1gP6sLoo1"));
    assert!(masked.ends_with(&format!("{MARK} end")), "{masked}");
}

#[test]
fn when_a_block_leaves_does_not_tell_whether_a_guess_begins_the_secret() {
    // The attack on the masker before: base64 of the echo, a long base64 tail the agent wrote,
    // then a guess at the secret's first bytes that leaves it undecided (a lone percent sign);
    // the next byte comes seconds later. Whether the first block left at once told the agent
    // whether its guess was right.
    use base64::Engine;
    let secret = b"rk_live_4f8c/2a7e+9b";
    let echo = base64::engine::general_purpose::STANDARD.encode(b"Bearer rk_live_4f8c/2a7e+9b");
    let first_write = |guess: &str| {
        let mut write = "."
            .repeat(12_288 - 26 - 2000 - guess.len() + 20)
            .into_bytes();
        write.extend_from_slice(echo.as_bytes());
        write.extend(std::iter::repeat_n(b'B', 2000));
        write.extend_from_slice(guess.as_bytes());
        let mut masker = Masker::new(secret).unwrap();
        let released = masker.push(&write).len();
        (released, masker.push(b"|").len() + masker.finish().len())
    };
    let right = first_write("rk%5Fl%");
    for wrong in ["rj%5Fl%", "qk%5Fl%", "rk%5Fm%"] {
        assert_eq!(first_write(wrong), right, "{wrong}");
    }
}

#[test]
fn a_guessed_prefix_is_held_exactly_as_any_other_bytes_are() {
    let right = stream(b"SECRET42", &[b"first\nSE", b"X"]);
    let wrong = stream(b"QWERTY99", &[b"first\nSE", b"X"]);
    assert_eq!(right, wrong);
    let mut long = vec![b'a'; WINDOW + BLOCK + 10];
    long.extend_from_slice(b"SE");
    let out = stream(b"SECRET42", &[&long, b"CRET42"]);
    assert_eq!(
        out[0].len(),
        BLOCK,
        "released in whole blocks, whatever the bytes"
    );
    assert_eq!(
        String::from_utf8(out.concat())
            .unwrap()
            .matches(MARK)
            .count(),
        1
    );
}

#[test]
fn an_echo_in_one_large_frame_releases_the_same_blocks_for_any_secret_length() {
    // The attack that found the last masker out: one write of the echo and 200,000 bytes, cut by
    // the upstream into frames of 16,384 raw bytes; the first chunk was 12,305 minus the secret's
    // length.
    let frames = |secret: &[u8]| {
        let mut raw = secret.to_vec();
        raw.extend(std::iter::repeat_n(b'x', 200_000));
        let mut masker = Masker::new(secret).unwrap();
        let mut chunks = Vec::new();
        for frame in raw.chunks(16_384) {
            let released = masker.push(frame);
            chunks.extend(released.chunks(BLOCK).map(<[u8]>::to_vec));
        }
        chunks.push(masker.finish().to_vec());
        chunks
    };
    let (one, two) = (
        frames(b"sk_short_20_bytes_x"),
        frames(b"sk_longer_secret_of_23b"),
    );
    assert!(one.iter().rev().skip(1).all(|chunk| chunk.len() == BLOCK));
    assert_eq!(one, two);
}

#[test]
fn a_credential_too_long_to_mask_is_refused() {
    assert!(Masker::new(&[b'x'; MAX_SECRET_BYTES]).is_ok());
    assert!(Masker::new(&[b'x'; MAX_SECRET_BYTES + 1]).is_err());
}

/// One piece of what the upstream writes: bytes the agent chose (the same in every run), a guess
/// at a prefix of the first secret (the same bytes in every run), or the run's own secret in one
/// of the forms upstreams write it.
#[derive(Debug, Clone)]
enum Piece {
    Agent(Vec<u8>),
    Guess(usize),
    Echo(usize),
}

/// The secret as upstreams write it: raw, percent-encoded, JSON-escaped, HTML-escaped, base64.
fn echo_forms(secret: &[u8]) -> Vec<Vec<u8>> {
    use base64::Engine;
    let text = String::from_utf8(secret.to_vec()).unwrap();
    let percent: String = secret
        .iter()
        .map(|byte| {
            if byte.is_ascii_alphanumeric() {
                char::from(*byte).to_string()
            } else {
                format!("%{byte:02x}")
            }
        })
        .collect();
    vec![
        secret.to_vec(),
        percent.into_bytes(),
        serde_json::to_string(&text)
            .unwrap()
            .replace('/', "\\/")
            .into_bytes(),
        text.replace('+', "&#43;")
            .replace('/', "&#x2F;")
            .into_bytes(),
        base64::engine::general_purpose::STANDARD
            .encode(format!("Bearer {text}"))
            .into_bytes(),
        // Base64 in a URL.
        base64::engine::general_purpose::STANDARD
            .encode(format!("Bearer {text}"))
            .replace('+', "%2B")
            .replace('/', "%2F")
            .replace('=', "%3D")
            .into_bytes(),
        // Go's html/template inside Go's JSON; percent-encoding applied twice.
        text.replace('+', "\\u0026#43;")
            .replace('/', "\\u0026#x2f;")
            .into_bytes(),
        text.replace('+', "%252B")
            .replace('/', "%252F")
            .into_bytes(),
    ]
}

fn render(writes: &[Vec<Piece>], secret: &[u8], guessed: &[u8]) -> Vec<Vec<u8>> {
    let echoes = if secret.is_empty() {
        vec![Vec::new()]
    } else {
        echo_forms(secret)
    };
    writes
        .iter()
        .map(|write| {
            let mut bytes = Vec::new();
            for piece in write {
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

fn piece() -> impl Strategy<Value = Piece> {
    prop_oneof![
        proptest::collection::vec(
            prop_oneof![Just(b'S'), Just(b'/'), Just(b'%'), any::<u8>()],
            0..64
        )
        .prop_map(Piece::Agent),
        (1usize..48).prop_map(|length| Piece::Agent(vec![b'.'; length * 400])),
        // A base64 text of the agent's own, long or short.
        (1usize..3000).prop_map(|length| Piece::Agent(vec![b'B'; length])),
        Just(Piece::Agent(b"%".to_vec())),
        Just(Piece::Agent(b"|".to_vec())),
        (0usize..48).prop_map(Piece::Guess),
        (0usize..8).prop_map(Piece::Echo),
    ]
}

/// Whether an occurrence of `secret` starts in bytes the agent wrote (running into an echo).
fn agent_bytes_start_an_occurrence(writes: &[Vec<Piece>], secret: &[u8], guessed: &[u8]) -> bool {
    let echoes = echo_forms(secret);
    let mut stream = Vec::new();
    let mut agent_spans = Vec::new();
    for write in writes {
        for piece in write {
            let start = stream.len();
            match piece {
                Piece::Agent(agent) => stream.extend_from_slice(agent),
                Piece::Guess(length) => {
                    stream.extend_from_slice(&guessed[..(*length).min(guessed.len() - 1)])
                }
                Piece::Echo(form) => {
                    stream.extend_from_slice(&echoes[form % echoes.len()]);
                    continue;
                }
            }
            agent_spans.push(start..stream.len());
        }
    }
    agent_spans.into_iter().flatten().any(|at| {
        matches!(escaped_match(&stream, at, secret), Found::Occurrence(..))
            || base64_forms(secret)
                .iter()
                .any(|form| matches!(form.match_at(&stream, at), Found::Occurrence(..)))
    })
}

/// Chunks as text, runs of padding counted, for a failure's message.
fn shown(chunks: &[Vec<u8>]) -> Vec<String> {
    chunks
        .iter()
        .map(|chunk| {
            let text = String::from_utf8_lossy(chunk).into_owned();
            let mut out = String::new();
            let mut dots = 0;
            for character in text.chars() {
                if character == '.' {
                    dots += 1;
                    continue;
                }
                if dots > 0 {
                    out.push_str(&format!(".{{{dots}}}"));
                    dots = 0;
                }
                out.push(character);
            }
            if dots > 0 {
                out.push_str(&format!(".{{{dots}}}"));
            }
            out
        })
        .collect()
}

/// What has left the masker by the end of each write (the upstream cuts each write into frames
/// of `frame` raw bytes), and every chunk's size.
fn run(secret: &[u8], writes: &[Vec<u8>], frame: usize) -> (Vec<Vec<u8>>, Vec<usize>) {
    let mut masker = Masker::new(secret).unwrap();
    let mut per_write = Vec::new();
    let mut sizes = Vec::new();
    for write in writes {
        let mut released = Vec::new();
        for piece in write.chunks(frame.max(1)) {
            let chunk = masker.push(piece);
            if !chunk.is_empty() {
                sizes.push(chunk.len());
            }
            released.extend_from_slice(&chunk);
        }
        per_write.push(released);
    }
    let rest = masker.finish();
    sizes.push(rest.len());
    per_write.push(rest.to_vec());
    (per_write, sizes)
}

proptest! {
    // VALET_MASK_CASES runs more (the suite runs 300; thousands before a change to the masker).
    #![proptest_config(ProptestConfig {
        cases: std::env::var("VALET_MASK_CASES").ok().and_then(|cases| cases.parse().ok()).unwrap_or(300),
        failure_persistence: None,
        .. ProptestConfig::default()
    })]

    /// The same writes against two secrets (their lengths differ too): the same bytes leave by the
    /// end of each write, in chunks of one size — the echoes are the marker in both, and nothing
    /// else tells the secrets apart.
    #[test]
    fn what_the_agent_receives_does_not_depend_on_the_secret(
        first in "S[A-Za-z0-9/+]{7,40}",
        second in "[A-Za-z0-9_]{8,47}",
        writes in proptest::collection::vec(proptest::collection::vec(piece(), 0..5), 1..8),
        frame in 1usize..20_000,
    ) {
        let guessed = first.as_bytes();
        // The agent's own bytes spelling out a whole secret is a correct guess of all of it,
        // which masking shows (and cannot help showing): only scripts that do not are compared.
        let without_echoes = render(&writes, b"", guessed).concat();
        for secret in [first.as_bytes(), second.as_bytes()] {
            let masker = Masker::new(secret).unwrap();
            prop_assume!(masker.mask_whole(&without_echoes) == without_echoes);
        }
        // Nor an agent's guess that runs into the echo after it to spell the whole secret (a
        // secret whose first characters repeat at its end, guessed to all but those): the
        // occurrence found first then shows the echo's last characters, which the guess had
        // all but named. Masking cannot hide what the agent already knows.
        for secret in [first.as_bytes(), second.as_bytes()] {
            prop_assume!(!agent_bytes_start_an_occurrence(&writes, secret, guessed));
        }
        let (one, one_sizes) = run(first.as_bytes(), &render(&writes, first.as_bytes(), guessed), frame);
        let (two, two_sizes) = run(second.as_bytes(), &render(&writes, second.as_bytes(), guessed), frame);
        prop_assert!(one == two, "{:?}\n!=\n{:?}\nwrites {:?}", shown(&one), shown(&two), shown(&render(&writes, first.as_bytes(), guessed)));
        let last = one_sizes.len() - 1;
        prop_assert!(one_sizes[..last].iter().all(|size| *size % BLOCK == 0));
        prop_assert!(two_sizes[..last].iter().all(|size| *size % BLOCK == 0));
    }
}
