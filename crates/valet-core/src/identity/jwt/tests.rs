//! The pinned verifier against tokens signed here: what verifies, and each way a token is refused.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair};
use serde_json::json;

use super::*;

const NOW: UnixTime = 1_800_000_000;

fn encode(value: &serde_json::Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap())
}

struct Signer {
    ed25519: Ed25519KeyPair,
    p256: EcdsaKeyPair,
}

impl Signer {
    fn new() -> Signer {
        let random = SystemRandom::new();
        let ed = Ed25519KeyPair::generate_pkcs8(&random).unwrap();
        let ec = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &random).unwrap();
        Signer {
            ed25519: Ed25519KeyPair::from_pkcs8(ed.as_ref()).unwrap(),
            p256: EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, ec.as_ref(), &random)
                .unwrap(),
        }
    }

    fn jwks(&self) -> Vec<u8> {
        let point = self.p256.public_key().as_ref();
        serde_json::to_vec(&json!({"keys": [
            {"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": URL_SAFE_NO_PAD.encode(self.ed25519.public_key().as_ref())},
            {"kty": "EC", "crv": "P-256", "kid": "ec", "use": "sig", "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..])},
            {"kty": "oct", "kid": "secret", "k": "c2VjcmV0"},
        ]}))
        .unwrap()
    }

    fn sign(&self, header: serde_json::Value, claims: serde_json::Value) -> String {
        let signed = format!("{}.{}", encode(&header), encode(&claims));
        let signature = match header["alg"].as_str() {
            Some("EdDSA") => self.ed25519.sign(signed.as_bytes()).as_ref().to_vec(),
            Some("ES256") => self
                .p256
                .sign(&SystemRandom::new(), signed.as_bytes())
                .unwrap()
                .as_ref()
                .to_vec(),
            _ => b"not a signature".to_vec(),
        };
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature))
    }
}

fn claims() -> serde_json::Value {
    json!({
        "iss": "https://issuer.test",
        "aud": ["valet"],
        "sub": "system:serviceaccount:ci:builder",
        "iat": NOW - 60,
        "nbf": NOW - 60,
        "exp": NOW + 540,
        "kubernetes.io": {"namespace": "ci", "serviceaccount": {"name": "builder"}},
    })
}

fn check(token: &str, keys: &[PublicJwk]) -> Result<(), Refusal> {
    let audiences = ["valet".to_string()];
    let pins = Pins {
        issuer: "https://issuer.test",
        audiences: &audiences,
        algorithms: &[Algorithm::EdDsa, Algorithm::Es256],
        clock_skew: Duration::from_secs(30),
        max_token_age: Duration::from_secs(3600),
    };
    let decoded = decode(token).map_err(Refusal::Invalid)?;
    verify(&decoded, pins, keys, NOW).map(|_| ())
}

fn refusal(token: &str, keys: &[PublicJwk]) -> String {
    match check(token, keys) {
        Err(Refusal::Invalid(reason)) => reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn tokens_signed_with_a_pinned_algorithm_verify_and_their_claims_are_read() {
    let signer = Signer::new();
    let keys = parse_jwks(&signer.jwks()).unwrap();
    assert_eq!(keys.len(), 2, "the symmetric key is skipped");
    for (alg, kid) in [("EdDSA", "ed"), ("ES256", "ec")] {
        let token = signer.sign(json!({"alg": alg, "kid": kid, "typ": "JWT"}), claims());
        assert!(looks_like_jwt(&token));
        check(&token, &keys).unwrap();
    }
    let token = signer.sign(json!({"alg": "EdDSA"}), claims());
    let decoded = decode(&token).unwrap();
    assert_eq!(
        claim_text(&decoded.claims, "kubernetes.io/serviceaccount/name").as_deref(),
        Some("builder")
    );
    assert_eq!(claim_text(&decoded.claims, "kubernetes.io/pod/name"), None);
}

#[test]
fn every_pinned_check_refuses_with_its_reason() {
    let signer = Signer::new();
    let keys = parse_jwks(&signer.jwks()).unwrap();
    let with = |change: &dyn Fn(&mut serde_json::Value)| {
        let mut claims = claims();
        change(&mut claims);
        signer.sign(json!({"alg": "EdDSA", "kid": "ed"}), claims)
    };
    // alg none, and HS256 "signed" with the public key: neither is pinned.
    let none = format!("{}.{}.", encode(&json!({"alg": "none"})), encode(&claims()));
    assert!(refusal(&none, &keys).contains("pinned to [EdDSA, ES256]"));
    let public = URL_SAFE_NO_PAD.encode(signer.ed25519.public_key().as_ref());
    let hmac_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, public.as_bytes());
    let signed = format!(
        "{}.{}",
        encode(&json!({"alg": "HS256", "kid": "ed"})),
        encode(&claims())
    );
    let hs256 = format!(
        "{signed}.{}",
        URL_SAFE_NO_PAD.encode(ring::hmac::sign(&hmac_key, signed.as_bytes()).as_ref())
    );
    assert!(refusal(&hs256, &keys).contains("alg \"HS256\""));
    // A header that names the other pinned algorithm does not make an Ed25519 key verify it.
    let swapped = signer.sign(json!({"alg": "ES256", "kid": "ed"}), claims());
    assert!(matches!(
        check(&swapped, &keys),
        Err(Refusal::UnknownKey { .. })
    ));
    // A changed payload breaks the signature.
    let token = signer.sign(json!({"alg": "EdDSA", "kid": "ed"}), claims());
    let mut parts: Vec<&str> = token.split('.').collect();
    let mut forged = claims();
    forged["sub"] = json!("system:serviceaccount:prod:admin");
    let forged_payload = encode(&forged);
    parts[1] = &forged_payload;
    assert!(refusal(&parts.join("."), &keys).contains("signature does not verify"));

    for (change, expected) in [
        (
            Box::new(|claims: &mut serde_json::Value| claims["iss"] = json!("https://evil.test"))
                as Box<dyn Fn(&mut serde_json::Value)>,
            "iss is \"https://evil.test\"",
        ),
        (
            Box::new(|claims| claims["aud"] = json!("kubernetes")),
            "valetd accepts [valet]",
        ),
        (
            Box::new(|claims| claims["exp"] = json!(NOW - 100)),
            "expired 100 s ago",
        ),
        (
            Box::new(|claims| claims["nbf"] = json!(NOW + 600)),
            "not valid yet",
        ),
        (
            Box::new(|claims| claims["iat"] = json!(NOW + 600)),
            "issued in the future",
        ),
        (
            Box::new(|claims| {
                claims["iat"] = json!(NOW - 7200);
                claims["exp"] = json!(NOW + 7200);
            }),
            "accepted for 3600 s",
        ),
        (
            Box::new(|claims| {
                claims
                    .as_object_mut()
                    .unwrap()
                    .remove("exp")
                    .map(drop)
                    .unwrap_or(())
            }),
            "no exp claim",
        ),
        (Box::new(|claims| claims["sub"] = json!("")), "no sub claim"),
    ] {
        let reason = refusal(&with(&*change), &keys);
        assert!(reason.contains(expected), "{expected:?} in {reason:?}");
    }
    // An unknown kid is reported as such, so the caller can refresh the JWKS once.
    let unknown = signer.sign(json!({"alg": "EdDSA", "kid": "rotated"}), claims());
    assert_eq!(
        check(&unknown, &keys),
        Err(Refusal::UnknownKey {
            kid: "rotated".into()
        })
    );
}

#[test]
fn malformed_tokens_and_jwks_are_refused_not_panicked_on() {
    for token in [
        "",
        "a.b",
        "a.b.c.d",
        "eyJ.eyJ.x",
        "!!!.???.***",
        &"x".repeat(20_000),
    ] {
        assert!(decode(token).is_err(), "{token:?}");
    }
    assert!(!looks_like_jwt("vk_test_agent_3b1f0c6e5d4a"));
    for document in [
        &b"not json"[..],
        b"{}",
        b"{\"keys\": []}",
        b"{\"keys\": [{\"kty\": \"RSA\", \"n\": \"AQAB\", \"e\": \"AQAB\"}]}",
    ] {
        assert!(parse_jwks(document).is_err());
    }
}

/// Claim values at and near the ends of `i64`, and ordinary ones.
fn extreme_time() -> impl proptest::strategy::Strategy<Value = i64> {
    use proptest::prelude::*;
    prop_oneof![
        Just(i64::MIN),
        Just(i64::MIN + 1),
        Just(i64::MAX),
        Just(i64::MAX - 1),
        Just(0),
        -1_000_000i64..1_000_000_000_000,
        any::<i64>(),
    ]
}

proptest::proptest! {
    /// Whatever the claims hold, the checks neither panic nor wrap into a pass: an accepted
    /// token is, in exact arithmetic, unexpired, already valid, not from the future and younger
    /// than the maximum age.
    #[test]
    fn time_checks_hold_in_exact_arithmetic_for_any_claim_values(
        now in extreme_time(),
        expires in extreme_time(),
        not_before in proptest::option::of(extreme_time()),
        issued in extreme_time(),
        skew in 0u64..=u64::MAX,
        max_age in 0u64..=u64::MAX,
    ) {
        let accepted = check_times(
            now,
            expires,
            not_before,
            issued,
            Duration::from_secs(skew),
            Duration::from_secs(max_age),
        )
        .is_ok();
        let (now, expires, issued) = (i128::from(now), i128::from(expires), i128::from(issued));
        let (skew, max_age) = (i128::from(skew), i128::from(max_age));
        let within = now <= expires + skew
            && not_before.is_none_or(|not_before| i128::from(not_before) <= now + skew)
            && issued <= now + skew
            && now - issued <= max_age + skew;
        proptest::prop_assert_eq!(accepted, within);
    }
}

#[test]
fn an_iat_at_the_end_of_i64_is_refused_not_wrapped() {
    let now = 1_800_000_000;
    let hour = Duration::from_secs(3600);
    let refused = check_times(now, now + 60, None, i64::MIN, Duration::from_secs(60), hour)
        .expect_err("an iat of i64::MIN is older than any maximum age");
    assert!(refused.contains("issued"), "{refused}");
    assert!(check_times(now, i64::MIN, None, now, hour, hour).is_err());
    assert!(check_times(now, now + 60, Some(i64::MAX), now, hour, hour).is_err());
    assert!(check_times(now, i64::MAX, None, i64::MAX, hour, hour).is_err());
}
