//! Verifying a two-signature update message end to end (parse, two ES256
//! verifications, claim checks). Goal: median ≤ 0.5 ms on x86-64.

use criterion::{criterion_group, criterion_main, Criterion};
use fleetd::trust::{Claims, Envelope, Image, Policy, SigningKey, Target, TrustState, CLAIMS_TYPE};
use std::collections::BTreeMap;
use std::hint::black_box;

fn bench_verify(c: &mut Criterion) {
    let fleet = SigningKey::generate().expect("keygen");
    let cosigner = SigningKey::generate().expect("keygen");
    let now = 1_795_000_000;
    let claims = Claims {
        typ: CLAIMS_TYPE.into(),
        jti: "01JD3Z6W8V1T3M5Q9R2K4H7N0C".into(),
        iat: now,
        nbf: now,
        exp: now + 3600,
        project: "acme-gateways".into(),
        target: Target { hardware: "rpi4-gw".into(), devices: vec!["gw-0042".into()], groups: vec![] },
        version: 42,
        name: "2026.11.1".into(),
        image: Image {
            url: "https://updates.example.com/rpi4-gw/2026.11.1.img".into(),
            size: 268_435_456,
            sha256: "c7be90c1253943c94f256c17c430305e300d117d8a70adaf749bf2488913b184".into(),
            encoding: Default::default(),
            index: None,
        },
        requires: vec![],
        rollout: None,
    };
    let mut envelope = Envelope::new(&claims.to_json());
    envelope.add_signature(&fleet, "fleet").expect("sign");
    envelope.add_signature(&cosigner, "cosigner").expect("sign");
    let message = envelope.to_json().into_bytes();
    let policy = Policy {
        keys: vec![("fleet".into(), fleet.public_key()), ("cosigner".into(), cosigner.public_key())],
        project: "acme-gateways".into(),
        hardware: "rpi4-gw".into(),
        device_id: "gw-0042".into(),
        groups: vec![],
        leeway_s: 60,
        max_validity_s: 7 * 86400,
        allow_http: false,
        max_image_size: Some(1 << 30),
    };
    let seen = BTreeMap::new();
    let state = TrustState { installed_version: 7, clock_floor: 0, seen_jtis: &seen };
    policy.verify(&message, &state, now + 10).expect("the bench message verifies");
    c.bench_function("verify_two_signature_message", |b| {
        b.iter(|| policy.verify(black_box(&message), &state, now + 10))
    });
}

criterion_group!(benches, bench_verify);
criterion_main!(benches);
