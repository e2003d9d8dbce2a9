//! Micro-benchmarks of the hot pieces in valet-core: token signing and verification, REST rule
//! matching, and appending to the audit chain.

use std::collections::BTreeMap;

use criterion::{Criterion, criterion_group, criterion_main};
use valet_core::audit::{self, AuditEvent, ChainHead, Outcome};
use valet_core::keyring::SigningKey;
use valet_core::rules::{self, PathPattern};
use valet_core::token::{self, Claims, Expectations};

fn claims() -> Claims {
    Claims {
        iss: "https://valet.bench".into(),
        sub: "agent".into(),
        aud: "railway".into(),
        iat: 1_700_000_000,
        nbf: 1_700_000_000,
        exp: 1_700_000_300,
        jti: "01m85j5fd02fceax4cf7q3tgx3".into(),
        task: "fix-dns-42".into(),
        scope: "railway-staging-domains".into(),
        env: "staging".into(),
        params: BTreeMap::from([("project".to_string(), "shop".to_string())]),
    }
}

fn tokens(criterion: &mut Criterion) {
    let key = SigningKey::generate().expect("a key");
    let keys = BTreeMap::from([(key.kid().to_string(), key.public_key())]);
    let claims = claims();
    criterion.bench_function("token sign", |bench| {
        bench.iter(|| token::sign(std::hint::black_box(&claims), &key))
    });
    let signed = token::sign(&claims, &key);
    let expect = Expectations {
        issuer: "https://valet.bench",
        audience: Some("railway"),
        now: 1_700_000_100,
        leeway_seconds: 0,
    };
    criterion.bench_function("token verify", |bench| {
        bench.iter(|| token::verify(std::hint::black_box(&signed), &keys, expect).expect("valid"))
    });
}

fn rule_matching(criterion: &mut Criterion) {
    let pattern =
        PathPattern::parse("/v1/projects/{project}/services/*/deployments/**").expect("a pattern");
    let params = BTreeMap::from([("project".to_string(), "shop".to_string())]);
    criterion.bench_function("REST path normalise + match", |bench| {
        bench.iter(|| {
            let segments = rules::normalized_segments(std::hint::black_box(
                "/v1/projects/shop/services/web/deployments/42/logs",
            ))
            .expect("clean");
            pattern.matches(&segments, &params)
        })
    });
}

fn audit_append(criterion: &mut Criterion) {
    let head = ChainHead::genesis();
    let event = AuditEvent::new(valet_core::audit::AuditAction::TokenIssue, Outcome::Allowed)
        .with("grant_id", "01m85j5fd02fceax4cf7q3tgx3")
        .with("principal", "agent")
        .with("scope", "railway-staging-domains")
        .with("task_id", "fix-dns-42");
    let seal_key = valet_core::keyring::SealKey::from_base64(
        &valet_core::keyring::SealKey::generate_base64().expect("randomness"),
    )
    .expect("a fresh key");
    let key = audit::ChainKey::from_seal_key(&seal_key);
    criterion.bench_function("audit chain append (format + hash + MAC)", |bench| {
        bench.iter(|| {
            audit::chain(
                &head,
                std::hint::black_box(&event),
                1_700_000_000,
                Some(&key),
            )
        })
    });
}

criterion_group!(hot_paths, tokens, rule_matching, audit_append);
criterion_main!(hot_paths);
