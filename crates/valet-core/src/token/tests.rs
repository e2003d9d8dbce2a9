//! Verification rules, one test per way a token can be wrong.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::*;
use crate::keyring::SigningKey;

fn claims(now: UnixTime) -> Claims {
    Claims {
        iss: "https://valet.test".into(),
        sub: "ci-agent".into(),
        aud: "railway".into(),
        iat: now,
        nbf: now,
        exp: now + 300,
        jti: "01grant".into(),
        task: "task-1".into(),
        scope: "railway-domains".into(),
        env: "staging".into(),
        params: BTreeMap::from([("project".to_string(), "web".to_string())]),
    }
}

fn expect(now: UnixTime) -> Expectations<'static> {
    Expectations {
        issuer: "https://valet.test",
        audience: Some("railway"),
        now,
        leeway_seconds: 0,
    }
}

fn ring_of(key: &SigningKey) -> BTreeMap<String, [u8; 32]> {
    BTreeMap::from([(key.kid().to_string(), key.public_key())])
}

fn reassemble(header: &serde_json::Value, token: &str) -> String {
    let rest: Vec<&str> = token.splitn(2, '.').collect();
    format!("{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), rest[1])
}

#[test]
fn a_signed_token_verifies_and_yields_its_claims() {
    let key = SigningKey::generate().unwrap();
    let token = sign(&claims(1_000), &key);
    assert_eq!(
        verify(&token, &ring_of(&key), expect(1_000)).unwrap(),
        claims(1_000)
    );
}

#[test]
fn alg_none_is_refused_even_with_no_signature() {
    let key = SigningKey::generate().unwrap();
    let token = sign(&claims(1_000), &key);
    let header = serde_json::json!({"alg": "none", "typ": TOKEN_TYPE, "kid": key.kid()});
    let forged = reassemble(&header, &token);
    let unsigned = format!("{}.", forged.rsplit_once('.').unwrap().0);
    for candidate in [forged, unsigned] {
        assert_eq!(
            verify(&candidate, &ring_of(&key), expect(1_000)),
            Err(VerifyError::AlgorithmNotAllowed { alg: "none".into() })
        );
    }
}

#[test]
fn hs256_with_the_public_key_as_secret_is_refused() {
    let key = SigningKey::generate().unwrap();
    let header = serde_json::json!({"alg": "HS256", "typ": TOKEN_TYPE, "kid": key.kid()});
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims(1_000)).unwrap())
    );
    let hmac_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key.public_key());
    let tag = ring::hmac::sign(&hmac_key, signing_input.as_bytes());
    let forged = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()));
    assert_eq!(
        verify(&forged, &ring_of(&key), expect(1_000)),
        Err(VerifyError::AlgorithmNotAllowed {
            alg: "HS256".into()
        })
    );
}

#[test]
fn unknown_key_is_refused() {
    let key = SigningKey::generate().unwrap();
    let other = SigningKey::generate().unwrap();
    let token = sign(&claims(1_000), &key);
    assert_eq!(
        verify(&token, &ring_of(&other), expect(1_000)),
        Err(VerifyError::UnknownKey {
            kid: key.kid().into()
        })
    );
}

#[test]
fn a_kid_swapped_to_a_known_key_fails_the_signature() {
    let key = SigningKey::generate().unwrap();
    let other = SigningKey::generate().unwrap();
    let token = sign(&claims(1_000), &other);
    let header = serde_json::json!({"alg": "EdDSA", "typ": TOKEN_TYPE, "kid": key.kid()});
    let forged = reassemble(&header, &token);
    assert_eq!(
        verify(&forged, &ring_of(&key), expect(1_000)),
        Err(VerifyError::BadSignature)
    );
}

#[test]
fn edited_claims_fail_the_signature() {
    let key = SigningKey::generate().unwrap();
    let token = sign(&claims(1_000), &key);
    let mut widened = claims(1_000);
    widened.scope = "railway-admin".into();
    let parts: Vec<&str> = token.split('.').collect();
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&widened).unwrap()),
        parts[2]
    );
    assert_eq!(
        verify(&forged, &ring_of(&key), expect(1_000)),
        Err(VerifyError::BadSignature)
    );
}

#[test]
fn expiry_not_before_issuer_audience_and_type_are_checked() {
    let key = SigningKey::generate().unwrap();
    let keys = ring_of(&key);
    let token = sign(&claims(1_000), &key);
    assert_eq!(
        verify(&token, &keys, expect(1_300)),
        Err(VerifyError::Expired { exp: 1_300 })
    );
    assert_eq!(
        verify(&token, &keys, expect(999)),
        Err(VerifyError::NotYetValid { nbf: 1_000 })
    );
    let wrong_audience = Expectations {
        audience: Some("github"),
        ..expect(1_000)
    };
    assert!(matches!(
        verify(&token, &keys, wrong_audience),
        Err(VerifyError::WrongAudience { .. })
    ));
    let wrong_issuer = Expectations {
        issuer: "https://other",
        ..expect(1_000)
    };
    assert!(matches!(
        verify(&token, &keys, wrong_issuer),
        Err(VerifyError::WrongIssuer { .. })
    ));
    let lenient = Expectations {
        leeway_seconds: 30,
        ..expect(1_310)
    };
    assert!(verify(&token, &keys, lenient).is_ok());

    let header = serde_json::json!({"alg": "EdDSA", "typ": "JWT", "kid": key.kid()});
    let retyped = reassemble(&header, &token);
    assert_eq!(
        verify(&retyped, &keys, expect(1_000)),
        Err(VerifyError::WrongType { typ: "JWT".into() })
    );
}

#[test]
fn garbage_is_malformed_not_a_panic() {
    let key = SigningKey::generate().unwrap();
    let keys = ring_of(&key);
    for garbage in [
        "",
        ".",
        "..",
        "a.b.c",
        "a.b.c.d",
        "!!!.???.***",
        "\u{0}.\u{0}.\u{0}",
    ] {
        assert!(
            matches!(
                verify(garbage, &keys, expect(1_000)),
                Err(VerifyError::Malformed { .. })
            ),
            "{garbage:?}"
        );
    }
    assert!(matches!(
        verify("eyJhbGciOiJFZERTQSJ9..", &keys, expect(1_000)),
        Err(VerifyError::WrongType { .. })
    ));
    let huge = "a".repeat(MAX_TOKEN_BYTES + 1);
    assert!(matches!(
        verify(&huge, &keys, expect(1_000)),
        Err(VerifyError::TooLong { .. })
    ));
}

proptest::proptest! {
    /// Whatever `exp` and `nbf` hold, the window check neither panics nor wraps into a pass: an
    /// accepted token is, in exact arithmetic, inside its window.
    #[test]
    fn the_window_holds_in_exact_arithmetic_for_any_claim_values(
        now in proptest::prop_oneof![proptest::prelude::Just(i64::MIN), proptest::prelude::Just(i64::MAX), proptest::prelude::any::<i64>()],
        exp in proptest::prop_oneof![proptest::prelude::Just(i64::MIN), proptest::prelude::Just(i64::MAX), proptest::prelude::any::<i64>()],
        nbf in proptest::prop_oneof![proptest::prelude::Just(i64::MIN), proptest::prelude::Just(i64::MAX), proptest::prelude::any::<i64>()],
        leeway in proptest::prop_oneof![proptest::prelude::Just(i64::MAX), 0i64..3600],
    ) {
        let mut token = claims(0);
        token.exp = exp;
        token.nbf = nbf;
        let accepted = check_window(&token, now, leeway).is_ok();
        let (now, exp, nbf, leeway) =
            (i128::from(now), i128::from(exp), i128::from(nbf), i128::from(leeway));
        proptest::prop_assert_eq!(accepted, now < exp + leeway && nbf <= now + leeway);
    }
}
